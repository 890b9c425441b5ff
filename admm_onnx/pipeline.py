"""Orchestration: dense training, ADMM pruning with masked retraining, evaluation.

:func:`prune` mirrors ONNX Runtime's ``quantize_static(model_input, model_output,
data_reader, ...)``: a model in, a model out, data readers for training and evaluation.

Phases of :func:`prune`:
1. prepare a training copy of the model (graph rewrites for ORT training), resolve the rules;
2. ADMM: up to ``admm_iters`` x ``epochs_per_iter`` epochs on base loss + penalty, a Z/U update
   every ``admm_update_steps`` optimizer steps and at the end of every iteration (admm.py), rho
   calibrated then adapted per layer after every update; ends (mid-epoch too) once every primal
   residual is under ``admm_tol``;
3. hard step: each variable projected onto its constraint set (sparsity, levels, ...);
4. masked retraining, ``retrain_epochs`` epochs with a fresh optimizer, W * M in the graph,
   quantized weights read through fake quantization (graph/fake_quant.py: levels in the forward
   pass, straight-through gradient, scales refitted per epoch), written on their levels;
5. the original graph written back with the trained weights, pruned ones exactly zero.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import onnx
from onnx import numpy_helper

from .admm import AdmmState
from .config import PruneConfig, WeightPlan
from .data import LABELS, ArrayReader, Dataset, DataReader
from .feeds import FeedDataset, InputSpec, fit_dataset, input_specs, model_feed, reader_for
from .errors import ConfigError, DataError, ModelError, clean_message, error_text
from .graph.analysis import GraphInfo, analyse, graph_inputs, value_shape
from .graph.masks import insert_masks, mask_name
from .graph.penalty import AdmmPenalty
from .graph.batchnorm_frozen import freeze_batchnorm
from .graph._util import opset_version
from .graph.ml_linear import ML_LINEAR_OPS, lift_ml_linear
from .graph.opset import MAX_IR_VERSION, MAX_OPSET, within_runtime_versions
from .graph.outputs import default_output, output_view
from .graph.prepare import prepare_for_training, speed_up_for_training
from .errors import TrainingError
from .interrupts import deferred
from .io import (check_in_memory, check_output_path, check_window_attributes, OutputPlan, load_model, save_model,
                 uses_external_data)
from .workdir import WorkDir, fingerprint_bytes, fingerprint_file
from .losses import distill_kind, make_loss
from .metrics import Evaluator
from .teacher import Teacher, with_teacher
from .progress import as_progress
from .quantization import QuantSpec, fit_levels, mark_model, max_level, read_quantization
from .report import PruneReport, model_rows, utc_now, weight_histograms
from .training import NO_PROGRESS, EpochStats, Progress, Trainer, build_artifacts, cosine_schedule

log = logging.getLogger(__name__)

ModelInput = Union[str, Path, onnx.ModelProto]


# -- model preparation -----------------------------------------------------------------
@dataclass
class PreparedModel:
    """The user's model, and a copy rewritten so ORT training can differentiate it."""

    original: onnx.ModelProto
    training: onnx.ModelProto
    info: GraphInfo
    output_name: str
    input_name: str
    input_shape: List[object]
    used_external_data: bool = False
    source: Optional[str] = None
    #: Every real input of the model (name, dtype, shape): feeds carry one array per input.
    inputs: List[InputSpec] = None
    #: The outputs the objective trains on (``output_name`` first); several with
    #: ``--model-output A --model-output B``.
    output_names: List[str] = None

    def __post_init__(self):
        if self.inputs is None:
            self.inputs = input_specs(self.training)
        if self.output_names is None:
            self.output_names = [self.output_name]

    @property
    def fixed_batch(self) -> Optional[int]:
        first = self.input_shape[0] if self.input_shape else None
        return first if isinstance(first, int) and first > 0 else None


def _data_fingerprint(reader) -> Optional[str]:
    """A digest of the training arrays of an :class:`ArrayReader` (names, types, shapes, bytes,
    labels), so that ``--resume`` refuses other data; None for other readers."""
    arrays = getattr(reader, "arrays", None)
    if not isinstance(arrays, dict):
        return None
    import hashlib

    digest = hashlib.sha256()
    labels = getattr(reader, "y", None)
    for name, a in sorted(arrays.items()) + ([("__labels__", labels)] if labels is not None else []):
        a = np.ascontiguousarray(a)
        digest.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        digest.update(memoryview(a).cast("B"))
    return digest.hexdigest()


def _decoded(model: onnx.ModelProto) -> onnx.ModelProto:
    """A file admm-onnx exported with compact weights (csr, coo, packed) as its dense model (the
    same weights as plain initializers: what training and the pruning rules see; outputs are
    bit-exact to the file's own). Other models pass through."""
    from . import formats

    fmt = formats.detect(model)
    if fmt is not None and fmt.name == "qdq":
        raise ModelError("the model is an int8 qdq deployment file: it trains and prunes no more",
                         hint="work on the float model it was exported from")
    if fmt is None or fmt.name not in ("csr", "coo", "packed"):
        return model
    log.info("the model stores its weights as %s: decoded to dense initializers first", fmt.name)
    return formats.decode(model)


def _check_precision(model: onnx.ModelProto) -> None:
    """Training runs in float32: a float16 / bfloat16 model is refused with a clear line (the
    loss graph would not type-check, and ORT's fp16 training kernels are incomplete)."""
    half = {onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
    names = [t.name for t in model.graph.initializer if t.data_type in half]
    names += [v.name for v in model.graph.input if v.type.tensor_type.elem_type in half]
    if names:
        raise ModelError(
            f"the model computes in float16/bfloat16 ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}); "
            "admm-onnx trains float32 models",
            hint="export the model in float32; convert the pruned model to float16 afterwards",
        )


def prepare_model(
    model_input: "ModelInput | PreparedModel", output: Optional[str] = None, speedups: bool = True
) -> PreparedModel:
    """Load (if a path) and prepare ``model_input`` for training (a PreparedModel passes through).

    ``speedups=False`` leaves out the exact speed rewrites (graph/prepare.py ``SPEEDUPS``), so
    the training graph computes in the user's order (for comparisons and debugging)."""
    _check_model_arg(model_input)
    if isinstance(model_input, PreparedModel):
        if output is not None and _output_list(output) != model_input.output_names:
            return prepare_model(model_input.original, output, speedups)
        return model_input
    if isinstance(model_input, onnx.ModelProto):
        original, external = model_input, False
        check_in_memory(original)
        check_window_attributes(original.graph)  # as load_model does for a file
    else:
        original = load_model(model_input)
        external = _file_used_external_data(model_input)
    original = _decoded(original)
    if any(op.domain in ("", "ai.onnx") for op in original.opset_import) and opset_version(original) < 7:
        raise ModelError(f"the model uses opset {opset_version(original)}; ONNX Runtime runs opset 7 and newer",
                         hint="convert it first: onnx.version_converter.convert_version(model, 17)")
    _check_precision(original)
    original = within_runtime_versions(original)  # the user's graph too: it is run in ORT 1.19 and written
    if any(n.domain == "ai.onnx.ml" and n.op_type in ML_LINEAR_OPS for n in original.graph.node):
        lifted = onnx.ModelProto()
        lifted.CopyFrom(original)
        count = lift_ml_linear(lifted)  # the user's graph too: its weights are node attributes
        if count:
            log.warning("%d scikit-learn linear node(s) (LinearClassifier/LinearRegressor/Normalizer) read and "
                        "written as MatMul/Add/Softmax... with initializer weights, the same outputs", count)
            original = lifted
    training = onnx.ModelProto()
    training.CopyFrom(original)
    prepare_for_training(training)
    inputs = graph_inputs(training)
    if not inputs:
        raise ModelError("the model has no inputs")
    outputs = [o.name for o in training.graph.output]
    selected = _output_list(output)
    if not selected:
        selected = [default_output(training)]  # first float output computed from weights
    for name in selected:
        if name not in outputs:
            raise ConfigError(f"--model-output {name!r} is not a model output; outputs: {', '.join(outputs)}")
    output = selected[0]
    info = analyse(training, selected)
    if speedups:
        speed_up_for_training(training, info.trainable)
    return PreparedModel(
        original=original,
        training=training,
        info=info,
        output_name=output,
        input_name=inputs[0].name,
        input_shape=value_shape(inputs[0]),
        used_external_data=external,
        source=None if isinstance(model_input, onnx.ModelProto) else str(model_input),
        output_names=list(dict.fromkeys(selected)),
    )


def _output_list(output) -> List[str]:
    """The selected outputs of a config's ``output`` (None, a name, or a list of names)."""
    if output is None:
        return []
    if isinstance(output, str):
        return [output]
    if not isinstance(output, (list, tuple)) or not all(isinstance(o, str) for o in output):
        raise ConfigError(f"output must be an output name or a list of names, got {output!r}"[:200])
    return list(dict.fromkeys(output))


def _check_writable(prepared: "PreparedModel") -> None:
    """The user's graph passes the ONNX checker, as every model written is checked: an invalid
    one is refused before training, not after it."""
    model = prepared.original
    try:
        if model.ByteSize() < 2**31 - 1:
            onnx.checker.check_model(model)
    except ValueError:  # over 2 GB in memory: checked when written
        return
    except onnx.checker.ValidationError as exc:
        raise ModelError(f"the model is not valid ONNX, and the pruned model would not be either: "
                         f"{clean_message(str(exc))[:250]}",
                         hint="check it with onnx.checker.check_model(model)") from None


def _check_trainable_graph(prepared: "PreparedModel") -> None:
    """ORT training can build the gradient graph of the training copy: an op it has no
    gradient for (Loop, an If reading trained values, ...) or a graph it would abort on is
    refused in one line before any work directory, artifact or sensitivity sweep."""
    from .graph.differentiable import check_differentiable

    trainable = list(prepared.info.trainable)
    if not trainable:
        return  # _trainer says so
    for name in prepared.output_names:
        check_differentiable(prepared.training, trainable, name)


def _check_model_arg(model_input, what: str = "model") -> None:
    """The API's model arguments: a path, an ``onnx.ModelProto`` or a :class:`PreparedModel`."""
    if not isinstance(model_input, (PreparedModel, onnx.ModelProto, str, os.PathLike)):
        raise ConfigError(f"{what} must be a file path or an onnx.ModelProto, got {type(model_input).__name__}")


def _check_path_arg(path, what: str, optional: bool = False) -> None:
    if path is None and optional:
        return
    if not isinstance(path, (str, os.PathLike)):
        raise ConfigError(f"{what} must be a file path, got {type(path).__name__}")


def _check_count(value, what: str, low: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ConfigError(f"{what} must be a whole number >= {low}, got {value!r}")


def _file_used_external_data(path) -> bool:
    return uses_external_data(onnx.load(str(path), load_external_data=False))


def with_weights(model: onnx.ModelProto, weights: Dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of ``model`` whose initializers named in ``weights`` hold the given values."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for i, tensor in enumerate(out.graph.initializer):
        if tensor.name in weights:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
            value = np.asarray(weights[tensor.name], dtype=dtype)
            if value.size != int(np.prod(tensor.dims)):
                raise ConfigError(f"the new value of {tensor.name!r} has shape {value.shape}, the weight "
                                  f"{tuple(tensor.dims)}")
            value = value.reshape(tuple(tensor.dims))
            out.graph.initializer[i].CopyFrom(numpy_helper.from_array(value, tensor.name))
    return out


def output_model(prepared: PreparedModel, weights: Dict[str, np.ndarray]) -> onnx.ModelProto:
    """The user's graph with the trained ``weights``.

    One deliberate change: BatchNormalization nodes exported in training mode (batch
    statistics) are written in inference mode, the way they were trained (see
    graph/batchnorm_frozen.py); otherwise the written model would not compute what was
    trained and evaluated.
    """
    final = with_weights(prepared.original, prepared.info.expand_weights(weights))
    changed = freeze_batchnorm(final)
    if changed:
        log.warning(
            "%d BatchNormalization node(s) were exported in training mode; written in inference mode "
            "(running statistics), as they were trained", changed,
        )
    return final


def export_pruned(
    model_input: "ModelInput | PreparedModel",
    model_output,
    weights,
    masks: Optional[Dict[str, np.ndarray]] = None,
) -> Path:
    """Write the user's graph with new weights: the inference model of a pruning run.

    ``weights``: a dict name -> array, or an ORT ``CheckpointState`` (or anything holding one
    as ``.state``), from which every parameter that is an initializer of the model is taken.
    ``masks`` (name -> 0/1 array) zero the pruned entries exactly. External data is kept if
    the input used it. Returns the output path.
    """
    prepared = prepare_model(model_input)
    out = check_output_path(model_output, prepared.source)
    weights = _weights_for(prepared.original, weights)
    for name, m in (masks or {}).items():
        if name not in weights:
            raise ConfigError(f"a mask names {name!r}, which has no weight among those given")
        m = np.asarray(m, dtype=bool)
        if m.shape != np.shape(weights[name]):
            raise ConfigError(f"the mask for {name} has shape {m.shape}, the weight {np.shape(weights[name])}")
        weights[name] = np.where(m, weights[name], np.zeros_like(weights[name]))
    save_model(output_model(prepared, weights), out, external_data=prepared.used_external_data or None)
    return out


def _weights_for(model: onnx.ModelProto, weights) -> Dict[str, np.ndarray]:
    """A dict of weights, from a dict or from the parameters of an ORT ``CheckpointState``."""
    if isinstance(weights, dict):
        return dict(weights)
    params = getattr(getattr(weights, "state", weights), "parameters", None)
    if params is None:
        raise ConfigError(f"weights must be a dict name -> array or an ORT CheckpointState, got {type(weights).__name__}")
    names = {t.name for t in model.graph.initializer}
    return {name: np.array(p.data) for name, p in params if name in names}


def masked_model(
    model: onnx.ModelProto, weights, masks: Dict[str, np.ndarray]
) -> Tuple[onnx.ModelProto, List[str]]:
    """The model for masked retraining: ``weights`` written in, every masked W read as W * M.

    Returns the model and the mask parameter names to pass as ``frozen_params`` to
    ``generate_artifacts`` (so the masks live in the checkpoint).
    """
    out = with_weights(model, _weights_for(model, weights))
    insert_masks(out, {n: np.asarray(m) for n, m in masks.items()})
    return out, [mask_name(n) for n in masks]


# -- readers -----------------------------------------------------------------------------
def make_readers(
    prepared: PreparedModel, data: "Dataset | FeedDataset", batch_size: int, seed: int = 0
) -> Tuple[ArrayReader, ArrayReader, int]:
    """Training and evaluation readers fitted to the model's inputs; returns the batch size used.

    ``data``: a :class:`~admm_onnx.data.Dataset` (one input array, labels) or a
    :class:`~admm_onnx.feeds.FeedDataset` (arrays keyed by input name, labels optional); each
    array is fitted to its input's dtype and shape (admm_onnx/feeds.py).
    A model whose batch dimension is fixed (zoo models often have 1 baked in) is trained and
    evaluated at that batch size whatever was asked, and the log says so.
    """
    if not isinstance(prepared, PreparedModel):
        prepared = prepare_model(prepared)  # a path or ModelProto (checked there)
    if not isinstance(data, (Dataset, FeedDataset)):
        raise ConfigError(f"data must be a Dataset (load_dataset) or a FeedDataset, got {type(data).__name__}")
    _check_count(batch_size, "batch_size")
    if isinstance(data, Dataset):
        if len(prepared.inputs) > 1:
            raise DataError(
                f"the model takes {len(prepared.inputs)} inputs ({', '.join(s.name for s in prepared.inputs)}); give "
                "a .npz with one array per input, keyed by the input names (plus labels)"
            )
        data = FeedDataset({prepared.input_name: data.x_train}, {prepared.input_name: data.x_test},
                           data.y_train, data.y_test, name=data.name)
    data = fit_dataset(data, prepared.inputs)
    classes = _num_classes(prepared)
    if classes is not None and data.num_classes is not None and data.num_classes > classes:
        raise DataError(
            f"labels go up to {data.num_classes - 1} but the model output {prepared.output_name!r} has {classes} classes"
        )
    if prepared.fixed_batch and prepared.fixed_batch != batch_size:
        log.warning(
            "model input %r has a fixed batch size of %d; training and evaluating with batch %d instead of %d",
            prepared.input_name, prepared.fixed_batch, prepared.fixed_batch, batch_size,
        )
        batch_size = prepared.fixed_batch
    train = ArrayReader(data.train, data.y_train, batch_size, prepared.input_name, shuffle=True, seed=seed, drop_last=True)
    evaluate = ArrayReader(data.test, data.y_test, batch_size, prepared.input_name, pad_last=prepared.fixed_batch is not None)
    train.fitted = evaluate.fitted = True
    return train, evaluate, batch_size


def _num_classes(prepared: PreparedModel) -> Optional[int]:
    for o in prepared.training.graph.output:
        if o.name == prepared.output_name:
            shape = value_shape(o)
            return shape[-1] if shape and isinstance(shape[-1], int) else None
    return None


# -- phases --------------------------------------------------------------------------------
@contextmanager
def _workdir(path: Optional[Path], keep: bool = True, resume: bool = False,
             resumable: bool = True) -> Iterator[Path]:
    """A work directory for one run: ``path`` claimed (created, marked, locked: see
    workdir.WorkDir.claim) or a temporary folder. What the run wrote is removed on the way out
    unless ``keep`` and there is progress to resume from (never for a run that cannot be
    resumed, ``resumable=False``); a failed ``resume`` leaves the folder as it found it."""
    if path is not None:
        work = WorkDir(path)
        work.claim()
        restore = False
        try:
            yield Path(path)
        except BaseException:
            if not (keep and resumable and work.has_progress()) and (work.created or not resume):
                work.remove()  # nothing to resume from: leave no debris
            else:
                restore = resume  # a refused --resume leaves the folder as it was (the lock's pid too)
            raise
        else:
            if not keep:
                work.remove()
        finally:
            work.release(restore)
        return
    tmp = Path(tempfile.mkdtemp(prefix="admm-onnx-"))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_checkpoint(checkpoint: Path) -> None:
    """A resumed run's checkpoint must load: else one line saying the work directory is damaged."""
    from ._ort import api

    try:
        api.CheckpointState.load_checkpoint(str(checkpoint))
    except Exception as exc:  # ORT raises its own exception types
        from .errors import clean_message

        raise ConfigError(f"cannot resume from {checkpoint}: {clean_message(str(exc))[:200]}",
                          hint=f"the checkpoint is damaged; remove {checkpoint.parent.parent} and start again") from None


def _trainer(
    prepared: PreparedModel,
    model: onnx.ModelProto,
    directory: Path,
    config: PruneConfig,
    loss,
    frozen: Sequence[str],
    lr: float,
    checkpoint: Optional[Path] = None,
    trainable: Optional[Sequence[str]] = None,
) -> Trainer:
    """Build training artifacts for ``model`` in ``directory`` and open a Trainer on them
    (from ``checkpoint`` when resuming, else from the generated one)."""
    trainable = prepared.info.trainable if trainable is None else list(trainable)
    if not trainable:
        raise ModelError("the model has no trainable weights (float initializers the output depends on)")
    if checkpoint is not None:
        _check_checkpoint(Path(checkpoint))  # before the artifacts beside it are rebuilt
    # Loss only in the training graph (no additional outputs: a BERT graph built with them
    # crashed ORT training); evaluation runs ``model`` in an InferenceSession (metrics.py).
    build_artifacts(model, directory, trainable, loss, prepared.output_names, frozen, config.optimizer, outputs=False)
    workers = config.workers
    if workers > 1 and prepared.fixed_batch:
        log.info("the model has a fixed batch size (%d): training in one process", prepared.fixed_batch)
        workers = 1
    base = getattr(loss, "loss", loss)  # an AdmmPenalty wraps the base objective
    try:
        trainer = Trainer(directory, lr=lr, loss_kind="mse" if getattr(base, "labels_as", "") == "onehot" else "cross_entropy",
                          num_classes=_num_classes(prepared), checkpoint=checkpoint, threads=config.threads, workers=workers)
    except TrainingError as exc:
        if checkpoint is None:
            raise
        raise ConfigError(f"cannot resume from {checkpoint}: {exc}",
                          hint=f"the checkpoint is damaged; remove {Path(checkpoint).parent.parent} and start again") from exc
    trainer.evaluator = Evaluator(model, prepared.output_names, output_kinds(prepared, config), config.class_axis)
    return trainer


def output_kinds(prepared: PreparedModel, config: PruneConfig) -> Dict[str, str]:
    """Selected output -> "kl" (class scores) or "mse" (losses.distill_kind; config.distill_kind
    overrides every output)."""
    return {o: config.distill_kind or distill_kind(prepared.training, o) for o in prepared.output_names}


def base_loss(prepared: PreparedModel, config: PruneConfig, reader, loss=None):
    """The objective Block of a run: ``loss`` when given (any onnxblock Block), else
    losses.make_loss(config.loss) for what the data holds (labels or not, read off the first
    batch). The Block carries ``resolved_name``."""
    if loss is not None:
        if not hasattr(loss, "resolved_name"):
            loss.resolved_name = type(loss).__name__
        return loss
    feed = _first_batch(reader)
    labels = feed.get(LABELS)
    floats = labels is not None and np.asarray(labels).dtype.kind == "f"
    name, block = make_loss(config.loss, labels is not None, floats, config.temperature, config.distill_weight,
                            config.class_axis, output_kinds(prepared, config))
    block.resolved_name = name
    if getattr(block, "needs_labels", False):
        _check_label_rank(prepared, np.asarray(labels), block.labels_as == "indices")
    return block


def _check_label_rank(prepared: PreparedModel, labels: np.ndarray, indices: bool) -> None:
    """Class indices have one axis less than the class scores (per sample, token or pixel)."""
    for o in prepared.training.graph.output:
        if o.name == prepared.output_name and o.type.tensor_type.HasField("shape"):
            rank = len(o.type.tensor_type.shape.dim)
            want = rank - 1 if labels.dtype.kind in "iu" else rank  # class indices, or float targets
            if labels.ndim != want:
                shape = [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim]
                raise DataError(
                    f"labels have shape {tuple(labels.shape)} (per batch) but output {o.name!r} has shape {shape}: "
                    + (f"class indices need {rank - 1} axes (one per sample{', token' if rank == 3 else ''}"
                       f"{', pixel' if rank >= 4 else ''})" if want == rank - 1 else f"float targets need {rank} axes"),
                    hint="or prune without labels (distillation)")


def _objective(prepared: PreparedModel, config: PruneConfig, train_reader, eval_reader, loss, report):
    """(base loss Block, training reader, evaluation reader): the readers carry the dense
    model's outputs (teacher.py) for distillation (training) and fidelity (evaluation)."""
    block = base_loss(prepared, config, train_reader, loss)
    needs_teacher = bool(getattr(block, "needs_teacher", False))
    report.objective, report.outputs = block.resolved_name, list(prepared.output_names)
    log.info("objective: %s on %s", block.resolved_name, ", ".join(prepared.output_names))
    if needs_teacher or eval_reader is not None:
        teacher = Teacher(prepared.training, prepared.output_names)
        eval_reader = with_teacher(eval_reader, teacher)
        if needs_teacher:
            train_reader = with_teacher(train_reader, teacher)
    return block, train_reader, eval_reader


def _epoch(
    trainer: Trainer,
    reader: DataReader,
    eval_reader: Optional[DataReader],
    label: str,
    progress: Progress,
    report: PruneReport,
    after_step=None,
) -> Optional[EpochStats]:
    """One training epoch (+ evaluation if a reader is given), logged and recorded in ``report``."""
    stats = trainer.train_epoch(reader, progress, label, after_step)
    report.samples_seen += stats.samples
    ev = trainer.evaluate(eval_reader) if eval_reader is not None else None
    report.epochs.append(
        {
            "phase": label,
            "train_loss": stats.loss,
            "train_accuracy": stats.accuracy,
            "samples_per_s": stats.samples_per_s,
            "seconds": stats.seconds,
            "eval_loss": ev.loss if ev else None,
            "eval_accuracy": ev.accuracy if ev else None,
            "eval_fidelity": getattr(ev, "fidelity", None) if ev else None,
        }
    )
    log.info(
        "%s: loss %.4f%s%s%s, %.0f samples/s",
        label, stats.loss, "" if stats.accuracy is None else f", train acc {100 * stats.accuracy:.2f}%",
        f", eval acc {100 * ev.accuracy:.2f}%" if ev is not None and ev.accuracy is not None else "",
        f", fidelity {_fid(ev)}" if getattr(ev, "fidelity", None) else "", stats.samples_per_s,
    )
    return ev


def _fid(ev) -> str:
    from .metrics import fidelity_line

    return fidelity_line(getattr(ev, "fidelity", None))


def _record(report: PruneReport, phase: str, ev) -> None:
    """Top-1 (when labels exist) and fidelity of an evaluation as the report's ``phase`` entry."""
    acc, fid = {"before": ("accuracy_before", "fidelity_before"), "admm": ("accuracy_after_admm", "fidelity_after_admm"),
                "hard": ("accuracy_hard_pruned", "fidelity_hard_pruned"), "after": ("accuracy_after", "fidelity_after")}[phase]
    setattr(report, acc, ev.accuracy)
    setattr(report, fid, getattr(ev, "fidelity", None))
    if phase == "before":
        report.loss_before = ev.loss
    elif phase == "after":
        report.loss_after = ev.loss


def train(
    model_input: ModelInput,
    model_output,
    train_reader: DataReader,
    epochs: int,
    eval_reader: Optional[DataReader] = None,
    config: Optional[PruneConfig] = None,
    progress: Progress = NO_PROGRESS,
    workdir: Optional[Path] = None,
    schedule: str = "constant",
) -> PruneReport:
    """Dense training (no pruning) of all trainable parameters; writes ``model_output``.

    ``workdir``: where the training artifacts go (claimed like prune's, always removed after);
    a temporary folder by default. ``schedule``: "constant" (``config.lr`` throughout) or
    "cosine" (from ``config.lr`` down to 0 over the ``epochs``; needs a reader with a length)."""
    config = _as_config(config or PruneConfig())
    if schedule not in ("constant", "cosine"):
        raise ConfigError(f"schedule must be 'constant' or 'cosine', got {schedule!r}")
    _check_count(epochs, "epochs")
    _check_path_arg(model_output, "model_output")
    _check_path_arg(workdir, "workdir", optional=True)
    progress = as_progress(progress)
    prepared = prepare_model(model_input, config.output)
    _check_writable(prepared)
    _check_trainable_graph(prepared)
    out = check_output_path(model_output, prepared.source)
    train_reader, eval_reader = _readers(prepared, config, train_reader, eval_reader)
    report = PruneReport(config=config.to_dict(), input=_input_identity(prepared))
    loss = base_loss(prepared, config, train_reader)
    if getattr(loss, "needs_teacher", False):
        raise ConfigError("dense training needs labels (distillation needs a trained teacher)",
                          hint="give labels (labels/y, --labels-key) and --loss cross_entropy or mse")
    report.objective, report.outputs = loss.resolved_name, list(prepared.output_names)
    with _workdir(workdir, keep=False) as work:
        trainer = _trainer(prepared, prepared.training, work / "dense", config, loss, (), config.lr)
        if schedule == "cosine":
            try:
                steps_per_epoch = len(train_reader)
            except TypeError:
                raise ConfigError("a cosine schedule needs a training reader with a length") from None
            trainer.schedule = cosine_schedule(config.lr, steps_per_epoch * epochs)
        if eval_reader is not None:
            before = trainer.evaluate(eval_reader)
            report.accuracy_before, report.loss_before = before.accuracy, before.loss
        t0 = time.perf_counter()
        last = None
        for e in range(epochs):
            _set_epoch(train_reader, e)
            last = _epoch(trainer, train_reader, eval_reader, f"train {e + 1}/{epochs}", progress, report)
        report.phase_seconds["train"] = time.perf_counter() - t0
        weights = {n: trainer.get(n) for n in prepared.info.trainable}
        trainer.close()
    bad = [n for n, w in weights.items() if np.issubdtype(np.asarray(w).dtype, np.floating) and
           not np.isfinite(w).all()]
    if bad or (last is not None and last.loss is not None and not math.isfinite(last.loss)):
        raise TrainingError(f"training diverged: {'the weights ' + ', '.join(bad[:3]) + ' are' if bad else 'the loss is'} "
                            "not finite after training; nothing was written", hint="lower --lr")
    if last is not None:
        report.accuracy_after, report.loss_after = last.accuracy, last.loss
    final, report.batchnorm, after = refresh_batchnorm(output_model(prepared, weights), train_reader, eval_reader,
                                                       prepared.output_name)
    if report.batchnorm and report.batchnorm["kept"] and after is not None:
        report.accuracy_after, report.loss_after = after.accuracy, after.loss  # the written model's own figure
    save_model(final, out, external_data=prepared.used_external_data or None)
    report.output = str(out)
    report.layers = model_rows(final, prepared.info)
    report.finished = utc_now()
    return report


def _model_fingerprint(prepared: PreparedModel) -> str:
    if prepared.source is not None:
        return fingerprint_file(prepared.source)
    try:
        return fingerprint_bytes(prepared.original.SerializeToString())
    except ValueError:  # > 2 GB in memory: fall back on the graph alone
        return fingerprint_bytes(prepared.original.graph.name.encode())


def _input_identity(prepared: PreparedModel) -> Dict[str, object]:
    return {"path": None if prepared.source is None else str(prepared.source), "sha256": _model_fingerprint(prepared)}


def _plan_identity(plan: Dict[str, WeightPlan]) -> Dict[str, object]:
    return {n: [p.sparsity, p.structure] + ([p.bits, p.quant_scale] if p.bits else []) for n, p in plan.items()}


def _readers(prepared: PreparedModel, config: PruneConfig, train_reader, eval_reader):
    """The training and evaluation readers as the run uses them (admm_onnx/feeds.py
    ``reader_for``): admm-onnx readers fitted to the inputs batch by batch, any other object
    with ``get_next()`` (an ORT ``CalibrationDataReader``) read once and served in batches."""
    fixed = prepared.fixed_batch
    train = reader_for(train_reader, prepared.inputs, config.batch_size, config.seed, True, config.labels_key, fixed)
    if train is None:
        raise DataError("no training reader")
    return train, reader_for(eval_reader, prepared.inputs, config.batch_size, config.seed, False, config.labels_key, fixed)


def _set_epoch(reader: DataReader, epoch: int) -> None:
    if hasattr(reader, "set_epoch"):
        reader.set_epoch(epoch)


def _as_config(config) -> PruneConfig:
    from .config import config_from_dict, load_config

    if isinstance(config, PruneConfig):
        return config
    if isinstance(config, (str, Path)):
        return load_config(config)
    if isinstance(config, dict):
        return config_from_dict(config)
    raise ConfigError(f"config must be a PruneConfig, a dict or a TOML/JSON path, not {type(config).__name__}")


def prune(
    model_input: ModelInput,
    model_output,
    train_reader: DataReader,
    config: Union[PruneConfig, dict, str, Path],
    eval_reader: Optional[DataReader] = None,
    progress: Progress = NO_PROGRESS,
    workdir: Optional[Path] = None,
    resume: bool = False,
    channels=None,
    loss=None,
    keep_workdir: bool = False,
) -> PruneReport:
    """ADMM-prune ``model_input`` and write the pruned model to ``model_output``.

    ``keep_workdir``: keep ``workdir`` (what the run wrote there) after success; by default it
    is removed, as the CLI does without ``--keep-workdir``.

    ``channels``: a :class:`~admm_onnx.structured.targets.ChannelTargets` removes whole
    channels instead (structured/phase.py: ADMM over channel groups, shrink + verify, dense
    retraining of the smaller model; no resume).

    ``model_input``: a path, a ``ModelProto`` or a :class:`PreparedModel`. ``train_reader``
    yields feed dicts with the model input and :data:`~admm_onnx.data.LABELS`; ``eval_reader``
    (optional) the same for evaluation. ``config``: a :class:`PruneConfig`, a dict or a
    TOML/JSON path. With ``workdir`` the run saves its state there after every ADMM iteration
    and retraining epoch, and ``resume=True`` continues from the last completed step.
    ``loss``: any onnxblock ``Block`` as the objective (its ``build`` gets the selected output
    names); default ``config.loss`` (admm_onnx/losses.py: labels -> cross-entropy, no labels ->
    distillation from the dense model). Fidelity to the dense model is measured on
    ``eval_reader`` whenever one is given.
    Returns a :class:`PruneReport`.
    """
    config = _as_config(config)
    _check_path_arg(model_output, "model_output")
    _check_path_arg(workdir, "workdir", optional=True)
    if loss is not None and not callable(getattr(loss, "build", None)):
        raise ConfigError(f"loss must be an onnxblock Block (with a build method), got {type(loss).__name__}; "
                          "name a built-in one with PruneConfig(loss=...)")
    progress = as_progress(progress)
    prepared = prepare_model(model_input, config.output)
    _check_writable(prepared)
    _check_trainable_graph(prepared)
    outputs = OutputPlan()
    outputs.add_model_input(prepared.source)
    out = outputs.add_output(model_output, "model_output", model=True,
                             external=True if prepared.used_external_data else None)
    outputs.add_workdir(workdir, "workdir")  # neither the model nor model_output (or its data) inside it
    train_reader, eval_reader = _readers(prepared, config, train_reader, eval_reader)
    probe_report = PruneReport()
    loss, train_reader, eval_reader = _objective(prepared, config, train_reader, eval_reader, loss, probe_report)
    if channels is not None:
        from .structured.phase import prune_channels

        if resume:
            raise ConfigError("--resume is not supported with --structure channel")
        return prune_channels(prepared, out, train_reader, config, channels, eval_reader, progress, workdir)
    from .allocation import apply_budget

    config, allocation = apply_budget(prepared, config, train_reader)  # a budget becomes per-layer rules
    plan = config.plan(prepared.info)
    if resume and workdir is None:
        raise ConfigError("resume needs the work directory of the interrupted run")
    with _workdir(workdir, resume=resume) as path:
        work = WorkDir(path)
        run_config = {k: v for k, v in config.to_dict().items() if k not in ("threads", "workers")}  # may change on --resume
        # what the defaults resolved to: "--model-output logits" or "--loss cross_entropy" that only
        # spell them out are the same run
        defaults = {}  # what this run resolved a default to: a run saved before such were resolved matches it
        if config.output is None:
            defaults["output"] = list(prepared.output_names)
        run_config["output"] = list(prepared.output_names)
        if run_config.get("loss") == "auto" and getattr(loss, "resolved_name", None):
            run_config["loss"] = defaults["loss"] = loss.resolved_name
        identity = {"model": _model_fingerprint(prepared), "plan": _plan_identity(plan), "config": run_config}
        data = _data_fingerprint(train_reader)
        if data is not None:
            identity["data"] = data
        if resume:
            work.check_identity(identity, defaults)
            saved = work.read_progress()
            try:
                report = PruneReport.from_dict(saved["report"])
                report.to_dict()  # every field readable back as the run will write it
            except (TypeError, ValueError, KeyError, AttributeError, IndexError):
                raise work.damaged(work.progress_file) from None
            last = config.admm_iters if saved["phase"] == "admm" else config.retrain_epochs
            if saved["step"] > last:
                raise work.damaged(work.progress_file, f"step {saved['step']} of {saved['phase']}, which has {last}")
            log.info("resuming %s: %s", path, saved["phase"] if saved["phase"] != "admm" else f"ADMM iteration {saved['step'] + 1}")
        else:
            if work.has_progress():
                raise ConfigError(
                    f"{path} holds an earlier run's state (unfinished, or kept by --keep-workdir)",
                    hint="add --resume to continue an unfinished run, or delete the directory"
                )
            work.start(identity)
            saved = {"phase": "admm", "step": 0}
            report = PruneReport(config=config.to_dict(), allocation=allocation, input=_input_identity(prepared))
            report.objective, report.outputs = probe_report.objective, probe_report.outputs
            for p in plan.values():
                log.info("will prune %s %s to %.2f%% zeros%s (rho %s, %s)", p.name, p.shape, 100 * p.sparsity,
                         f", {p.bits}-bit levels per {p.quant_scale}" if p.bits else "",
                         "auto" if p.rho is None else f"{p.rho:.2e}", p.structure)
        run = _PruneRun(prepared, plan, config, work, report, train_reader, eval_reader, progress)
        run.loss = loss
        if saved["phase"] == "admm":
            run.admm(start=saved["step"])
            saved = {"phase": "retrain", "step": 0}
        weights, reference, probe, last_eval = run.retrain(start=saved["step"])

    # The original graph with the new weights (and the quantized weights' specs, for exports).
    final = output_model(prepared, weights)
    mark_model(final, report.quantization)
    save_model(final, out, external_data=prepared.used_external_data or None)
    report.output = str(out)
    report.layers = model_rows(final, prepared.info, plan)
    report.histograms = weight_histograms(_initializers(prepared.original, plan), {n: weights[n] for n in plan})
    sess = _session(out)
    (written,) = sess.run([prepared.output_name], _model_feed(sess, probe))
    # The training copy outputs (N, C) logits; the user's graph may add a Softmax or keep
    # an (N, C, 1, 1) shape (graph/outputs.py): compare like with like.
    view = output_view(prepared.original, prepared.output_name)
    written = view.as_tensor(written)  # a ZipMap output's maps as an (N, C) array
    expected = view.from_logits(reference, like=written)
    report.max_output_diff = float(np.max(np.abs(written.astype(np.float64) - expected)))
    log.info("written model vs trained model on one batch: max |output difference| %.3g", report.max_output_diff)
    if report.max_output_diff > 1e-3 * max(1.0, float(np.max(np.abs(expected)))):
        log.warning("the written model's outputs differ from the trained model's by %.3g", report.max_output_diff)
    # The check above compared like with like (the trained copy normalises with the model's own
    # BatchNorm statistics in evaluation); the written model gets statistics of its new weights.
    refreshed, report.batchnorm, after = refresh_batchnorm(final, train_reader, eval_reader, prepared.output_name)
    if refreshed is not final:
        final = refreshed
        save_model(final, out, external_data=prepared.used_external_data or None)
    if eval_reader is not None:
        # Top-1 of the written model (when labels exist); fidelity of the trained copy, which
        # the check above showed computes what the written model computes.
        if last_eval is not None:
            _record(report, "after", last_eval)
        if after is None:  # refresh_batchnorm evaluated the written model already when it has BatchNorm
            after = evaluate(final, eval_reader, prepared.output_name)
        if after.accuracy is not None:  # (N, C) class scores against labels: the written model's own figure
            report.accuracy_after, report.loss_after = after.accuracy, after.loss
        log.info("after pruning: %s", _phase_line(report.accuracy_after, report.fidelity_after))
    report.finished = utc_now()
    if workdir is not None and not keep_workdir:
        WorkDir(workdir).remove()  # only what the run wrote
    return report


def _initializers(model: onnx.ModelProto, names) -> Dict[str, np.ndarray]:
    wanted = set(names)
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.name in wanted}


class _PruneRun:
    """The two training phases of :func:`prune`, saving their state in the work directory."""

    #: Batches whose gradient norms calibrate an automatic rho.
    CALIBRATION_BATCHES = 8

    def __init__(self, prepared, plan, config, work, report, train_reader, eval_reader, progress):
        self.prepared, self.plan, self.config, self.work = prepared, plan, config, work
        self.report, self.train_reader, self.eval_reader, self.progress = report, train_reader, eval_reader, progress

    def _commit(self, phase: str, step: int, checkpoint: Optional[str] = None) -> None:
        """Record the completed step; with ``checkpoint`` (a phase folder), also which checkpoint
        file goes with it (a resume refuses another one: a kill between the two writes)."""
        progress = {"phase": phase, "step": step, "report": self.report.to_dict()}
        if checkpoint is not None:
            progress["checkpoint"] = self.work.checkpoint_stamp(checkpoint)
        self.work.write_progress(progress)

    def admm(self, start: int) -> None:
        """ADMM iterations ``start``..``admm_iters``, then the hard prune."""
        c, work, report = self.config, self.work, self.report
        penalty = AdmmPenalty(self.loss, list(self.plan))
        trainer = _trainer(
            self.prepared, self.prepared.training, work.path / "admm", c, penalty, penalty.frozen_params, c.lr,
            checkpoint=work.existing_checkpoint("admm") if start else None,
        )
        from .allocation.plan import admm_variables

        variables, rho = admm_variables(self.plan, report.allocation)  # the plan, or a global top-k
        state = AdmmState(variables, policy=c.rho_policy(), rho=rho)
        if start:
            try:
                state.load(work.path / "admm_state.npz")
            except (OSError, ValueError, KeyError, EOFError, TypeError, IndexError) as exc:
                raise work.damaged(work.path / "admm_state.npz", type(exc).__name__) from None
            except Exception as exc:  # zipfile.BadZipFile, zlib.error
                if type(exc).__module__ in ("zipfile", "zlib"):
                    raise work.damaged(work.path / "admm_state.npz", type(exc).__name__) from None
                raise
        else:
            state.initialize(state.read_weights(trainer))
            if self.eval_reader is not None:
                before = trainer.evaluate(self.eval_reader)  # rho = 0 still: the plain model
                _record(report, "before", before)
                if before.accuracy is not None:
                    log.info("before pruning: top-1 %.2f%%, loss %.4f", 100 * before.accuracy, before.loss)
            if any(r is None for r in state.rho.values()):
                norms = _calibration_norms(trainer, self.train_reader, state, self.loss, self.CALIBRATION_BATCHES)
                for n, rho in state.calibrate(norms, state.read_weights(trainer), c.rho_ratio).items():
                    log.info("rho for %s: %.3g (auto)", n, rho)
            self._commit("admm", 0)
        state.write(trainer)
        updates = ZUUpdates(trainer, state, report, c.admm_update_steps, f"; the last good state is in {work.path}")
        for it in range(start, c.admm_iters):
            if state.converged():
                break
            t0 = time.perf_counter()
            label = f"ADMM {it + 1}/{c.admm_iters}"
            for e in range(c.epochs_per_iter):
                _set_epoch(self.train_reader, it * c.epochs_per_iter + e)
                sub = f" epoch {e + 1}/{c.epochs_per_iter}" if c.epochs_per_iter > 1 else ""
                _epoch(trainer, self.train_reader, None, label + sub, self.progress, report, updates.after_step(label))
                if state.converged():
                    break
            updates.end_iteration(label)
            report.phase_seconds["admm"] = report.phase_seconds.get("admm", 0.0) + time.perf_counter() - t0
            with deferred():  # the step's files and its commit are one step: a signal waits for all three
                work.save_checkpoint(trainer, "admm")
                work.save_state(state)
                self._commit("admm", it + 1, checkpoint="admm")
        _admm_outcome(state, c, report)

        state.disable(trainer)
        if self.eval_reader is not None and c.admm_iters:
            _record(report, "admm", trainer.evaluate(self.eval_reader))
            log.info("after ADMM: %s", _phase_line(report.accuracy_after_admm, report.fidelity_after_admm))
        hard = state.harden(trainer)
        report.quantization = hard.info
        if self.eval_reader is not None:
            _record(report, "hard", trainer.evaluate(self.eval_reader))
            log.info("hard-pruned: %s", _phase_line(report.accuracy_hard_pruned, report.fidelity_hard_pruned))
            if report.accuracy_after_admm is not None and report.accuracy_hard_pruned is not None:
                report.hard_prune_gap = report.accuracy_after_admm - report.accuracy_hard_pruned
                log.info("hard-prune gap: %.2f points", 100 * report.hard_prune_gap)
        arrays = {f"w/{n}": trainer.get(n) for n in self.prepared.info.trainable}
        # Quantized weights (frozen on levels by the engine) retrain through fake quantization:
        # their support mask is kept when it is not everything.
        arrays.update({f"m/{n}": m for n, m in hard.masks.items()
                       if n not in hard.frozen or (n in hard.info and not np.all(m))})
        arrays.update({f"f/{n}": np.ones(0, np.int8) for n in hard.frozen})
        work.save_arrays("pruned.npz", arrays)
        self._commit("retrain", 0)
        trainer.close()

    def retrain(self, start: int):
        """Masked retraining epochs ``start``..``retrain_epochs``; returns the final weights."""
        c, work, report = self.config, self.work, self.report
        arrays = work.load_arrays("pruned.npz")
        weights = {k[2:]: v for k, v in arrays.items() if k.startswith("w/")}
        if set(weights) != set(self.prepared.info.trainable):
            raise work.damaged(work.path / "pruned.npz", "it does not hold every trained weight")
        masks = {k[2:]: v.astype(bool) for k, v in arrays.items() if k.startswith("m/")}
        quant = read_quantization(report.to_dict())  # the hard step's levels
        # Fixed entirely; quantized weights instead retrain through fake quantization (STE).
        frozen = [k[2:] for k in arrays if k.startswith("f/") and k[2:] not in quant]
        model, mask_params = masked_model(self.prepared.training, weights, masks)
        fq = _FakeQuant(quant, weights, masks)
        lr = c.retrain_lr or c.lr
        trainer = _trainer(
            self.prepared, model, work.path / "retrain", c, self.loss,
            mask_params + fq.insert(model) + frozen, lr,
            checkpoint=work.existing_checkpoint("retrain") if start else None,
            trainable=[n for n in self.prepared.info.trainable if n not in frozen],
        )
        try:
            steps_per_epoch = len(self.train_reader)
        except TypeError:
            steps_per_epoch = 0
        if c.retrain_schedule == "cosine" and steps_per_epoch:
            trainer.schedule = cosine_schedule(lr, steps_per_epoch * c.retrain_epochs)
            trainer.step = steps_per_epoch * start
        for e in range(start, c.retrain_epochs):
            t0 = time.perf_counter()
            _set_epoch(self.train_reader, c.admm_iters * c.epochs_per_iter + e)
            label = f"retrain {e + 1}/{c.retrain_epochs}"
            fq.refit(trainer)  # scales fitted to the latent weights; the epoch trains and evaluates with them
            _epoch(trainer, self.train_reader, self.eval_reader, label, self.progress, report)
            report.phase_seconds["retrain"] = report.phase_seconds.get("retrain", 0.0) + time.perf_counter() - t0
            with deferred():
                work.save_checkpoint(trainer, "retrain")
                self._commit("retrain", e + 1, checkpoint="retrain")
        weights = {n: trainer.get(n) for n in self.prepared.info.trainable}
        for n, m in masks.items():
            weights[n] = np.where(m, weights[n], np.zeros_like(weights[n]))
        report.quantization.update(fq.finish(trainer, weights))  # exactly on the levels, final scales
        probe = _first_batch(self.eval_reader if self.eval_reader is not None else self.train_reader)
        logits = trainer.logits(probe)
        last = trainer.evaluate(self.eval_reader) if self.eval_reader is not None else None
        trainer.close()
        return weights, logits, probe, last


class _FakeQuant:
    """The quantized weights of masked retraining: fake quantization in the graph
    (graph/fake_quant.py), scales refitted per epoch, exact levels at the end."""

    def __init__(self, specs, weights, masks):
        self.specs, self.masks = dict(specs), masks
        self.shapes = {n: np.shape(weights[n]) for n in self.specs}

    def insert(self, model: onnx.ModelProto) -> List[str]:
        """Insert Q(W) for every quantized weight; returns the scale parameter names (frozen)."""
        from .graph.fake_quant import insert_fake_quant, scale_array

        if not self.specs:
            return []
        return list(insert_fake_quant(model, {
            n: (max_level(s.bits), scale_array(s.scale, self.shapes[n], s.axis)) for n, s in self.specs.items()
        }).values())

    def _latent(self, trainer, name):
        w = trainer.get(name)
        m = self.masks.get(name)
        return w if m is None else np.where(m, w, np.zeros_like(w))

    def refit(self, trainer) -> None:
        """Scales fitted (quantization.fit_levels) to the latent weights, written to the graph."""
        from .graph.fake_quant import scale_array, scale_name

        for n, s in self.specs.items():
            _, scale = fit_levels(self._latent(trainer, n), s.bits, s.axis, self.masks.get(n))
            trainer.set(scale_name(n), scale_array(scale, self.shapes[n], s.axis))

    def finish(self, trainer, weights: Dict[str, np.ndarray]) -> Dict[str, Dict[str, object]]:
        """Write the quantized weights (as the graph computed them, exactly on the levels of the
        scales of the last epoch) into ``weights``; returns their report facts."""
        from .graph.fake_quant import quantize_like_graph, scale_name

        out = {}
        for n, s in self.specs.items():
            scale = trainer.get(scale_name(n))
            _, weights[n] = quantize_like_graph(weights[n], scale, max_level(s.bits))
            out[n] = QuantSpec(s.bits, tuple(float(x) for x in scale.reshape(-1)), s.axis).to_dict()
        return out


def _phase_line(accuracy, fidelity) -> str:
    from .metrics import fidelity_line

    top1 = "" if accuracy is None else f"top-1 {100 * accuracy:.2f}%; "
    return f"{top1}fidelity {fidelity_line(fidelity)}"


def _calibration_norms(trainer: Trainer, reader: DataReader, state: AdmmState, loss, batches: int) -> Dict[str, float]:
    """Gradient norms that calibrate an automatic rho. A distillation loss is zero, with a zero
    gradient, at the dense weights (the student is the teacher): its norms are taken at the
    projected weights Z instead, where the loss measures what pruning costs (the weights are
    restored after)."""
    if not getattr(getattr(loss, "loss", loss), "needs_teacher", False):
        return _gradient_norms(trainer, reader, state.tensors, batches)
    dense = {n: trainer.get(n) for n in state.tensors}
    try:
        for n in state.tensors:
            trainer.set(n, state.Z[n])
        return _gradient_norms(trainer, reader, state.tensors, batches)
    finally:
        for n, w in dense.items():
            trainer.set(n, w)


def _gradient_norms(trainer: Trainer, reader: DataReader, names: Sequence[str], batches: int) -> Dict[str, float]:
    """Mean per-batch ||dL/dW|| of each weight over the first ``batches`` training batches
    (the penalty's rho is 0 then: the base loss alone). Parameters are not changed."""
    params = trainer.state.parameters
    sums = {n: 0.0 for n in names}
    seen = 0
    _set_epoch(reader, 0)
    reader.rewind()
    trainer.module.train()
    while seen < batches:
        feed = reader.get_next()
        if feed is None:
            break
        trainer.module.lazy_reset_grad()
        trainer.module(*trainer._inputs(feed))
        for n in names:
            sums[n] += float(np.linalg.norm(np.asarray(params[n].grad, np.float64)))
        seen += 1
    trainer.module.lazy_reset_grad()
    reader.rewind()
    if not seen:
        raise DataError("the training reader yielded no batch")
    return {n: v / seen for n, v in sums.items()}


class ZUUpdates:
    """When ADMM's Z/U updates happen: every ``every`` optimizer steps (0: only at the end of an
    iteration) and at the end of every iteration with steps since the last one. Each update
    records the residuals in ``report`` and raises TrainingError when they explode (``where``
    ends that message). Shared by the weight and the channel ADMM loops."""

    def __init__(self, trainer: Trainer, state: AdmmState, report: PruneReport, every: int, where: str = ""):
        self.trainer, self.state, self.report, self.every, self.where = trainer, state, report, every, where
        self.pending = 0  # optimizer steps since the last Z/U update

    def update(self, label: str) -> bool:
        """One Z/U update from the current weights; True once ADMM has converged."""
        self.pending = 0
        state = self.state
        residuals = state.update(self.trainer)
        self.report.residuals.append({n: {"primal": r.primal, "dual": r.dual, "rho": float(state.rho[n])}
                                      for n, r in residuals.items()})
        for n, r in residuals.items():
            log.debug("%s update %d %s: primal %.4f, dual %.4f, rho %.2e", label, state.iteration, n, r.primal,
                      r.dual, state.rho[n])
        if any(not math.isfinite(r.primal) or r.primal > 1e3 for r in residuals.values()):
            raise TrainingError(f"ADMM residuals exploded at update {state.iteration}{self.where}",
                                hint="lower --lr, or --rho (--rho-growth with --rho-mode growth)")
        return state.converged()

    def after_step(self, label: str):
        """The trainer's per-step callback for one epoch of iteration ``label``."""

        def step() -> bool:
            self.pending += 1
            if not self.every or self.pending < self.every:
                return False
            done = self.update(label)
            self.trainer.begin_training()  # workers see the new targets and rho
            return done

        return step

    def end_iteration(self, label: str) -> None:
        if self.pending or not self.every:
            self.update(label)
        for n, r in self.state.residuals().items():
            log.info("%s %s: primal %.4f, dual %.4f, rho %.2e (%d Z/U updates so far)", label, n, r.primal, r.dual,
                     self.state.rho[n], self.state.iteration)


def _admm_outcome(state: AdmmState, config: PruneConfig, report: PruneReport) -> None:
    """Record why ADMM stopped; warn with the residuals when it did not converge."""
    last = state.residuals()
    report.rho = {n: r for n, r in state.rho.items()}
    if not last:
        report.admm_stop = "no ADMM iterations"
        return
    if state.converged():
        report.admm_stop = f"converged: every primal residual <= {config.admm_tol:g} after {state.iteration} Z/U update(s)"
        log.info("ADMM %s", report.admm_stop)
        return
    if config.admm_tol <= 0:  # asked for a fixed number of iterations: nothing to warn about
        report.admm_stop = f"all {state.iteration} Z/U update(s) run (--admm-tol 0)"
        log.info("ADMM %s", report.admm_stop)
        return
    report.admm_stop = (f"iteration cap (--admm-iters {config.admm_iters} x --epochs-per-iter {config.epochs_per_iter}, "
                        f"{state.iteration} Z/U update(s)) before convergence")
    worst = sorted(last.items(), key=lambda kv: -kv[1].primal)
    above = [f"{n} {r.primal:.3f}" for n, r in worst if r.primal > config.admm_tol]
    log.warning(
        "ADMM did not converge in %d Z/U update(s): primal residual above %g for %s. The hard step will cut "
        "what ADMM did not reach; raise --admm-iters or --epochs-per-iter%s",
        state.iteration, config.admm_tol, ", ".join(above),
        "" if config.rho is None else ", or leave --rho unset (automatic)",
    )


def _session(model_input: ModelInput):
    """An ORT InferenceSession for a path or a ModelProto, with one-line errors."""
    import onnxruntime as ort

    from . import training

    training.flush_denormals()  # before the process's first session (training.flush_denormals)

    if isinstance(model_input, onnx.ModelProto):
        check_in_memory(model_input)
        if model_input.ByteSize() >= 2**31 - 1:
            raise ModelError("models over 2 GB must be evaluated from a file path")
        source = model_input.SerializeToString()
    else:
        header = load_model(model_input, load_external_data=False)  # one-line errors for bad files
        source = str(model_input)
        if header.ir_version > MAX_IR_VERSION or opset_version(header) > MAX_OPSET:
            # read as prepare_model reads it (which said so): lowered when nothing newer is used
            model_input = within_runtime_versions(load_model(model_input), quiet=True)
            if model_input.ByteSize() >= 2**31 - 1:
                raise ModelError("models over 2 GB with IR > 10 or opset > 21 cannot be evaluated here")
            source = model_input.SerializeToString()
    try:
        # the training sessions' options: intra-op spinning off (shared machines), denormals flushed
        return ort.InferenceSession(source, training.session_options(), providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ModelError(f"ONNX Runtime cannot load the model: {error_text(exc)}") from exc


def _model_feed(sess, feed: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    return model_feed(feed, [i.name for i in sess.get_inputs()])


def _first_batch(reader: DataReader) -> Dict[str, np.ndarray]:
    reader.rewind()
    feed = reader.get_next()
    reader.rewind()
    if feed is None:
        raise DataError("the data reader yielded no batch")
    return feed


def refresh_batchnorm(model: onnx.ModelProto, train_reader: DataReader, eval_reader: Optional[DataReader] = None,
                      output_name: Optional[str] = None, max_batches: int = 50):
    """(model, record, stats): BatchNormalization running statistics re-estimated on training batches.

    ORT training normalises with batch statistics and never writes the running ones back
    (graph/bn_recalibrate.py), so after training the model's own statistics belong to the old
    weights. The copy with re-estimated statistics is returned unless labelled evaluation data
    shows it scoring lower top-1 than the statistics the model came with (then ``model``, and
    the record says so). ``record`` is None for a model without inference-form BatchNorm;
    ``stats``: the returned model's :func:`evaluate` on ``eval_reader`` when it was run, else None."""
    from .graph.bn_recalibrate import recalibrate_batchnorm

    if not any(n.op_type == "BatchNormalization" for n in model.graph.node):
        return model, None, None
    candidate = onnx.ModelProto()
    candidate.CopyFrom(model)
    batches = 0

    def counted():
        nonlocal batches
        for feed in train_reader:
            batches += 1
            yield feed

    try:
        nodes = recalibrate_batchnorm(candidate, counted(), max_batches=max_batches)
    except Exception as exc:  # the statistics are a refinement: never fail a finished run on them
        log.warning("BatchNorm running statistics not re-estimated (%s); the written model keeps the ones it came "
                    "with", error_text(exc))
        return model, None, None
    finally:
        train_reader.rewind()
    if not nodes:
        return model, None, None
    record: Dict[str, object] = {"nodes": nodes, "batches": min(batches, max_batches), "kept": True,
                                 "accuracy_stale": None, "accuracy_recalibrated": None}
    stale_stats = fresh_stats = None
    if eval_reader is not None:
        stale_stats = evaluate(model, eval_reader, output_name)
        fresh_stats = evaluate(candidate, eval_reader, output_name)
        stale, fresh = stale_stats.accuracy, fresh_stats.accuracy
        record.update(accuracy_stale=stale, accuracy_recalibrated=fresh)
        if stale is not None and fresh is not None and fresh < stale:
            record["kept"] = False
    if record["kept"]:
        log.info("BatchNorm running statistics of %d node(s) re-estimated on %d training batch(es)%s", nodes,
                 record["batches"], "" if record["accuracy_stale"] is None else
                 f" (top-1 {100 * record['accuracy_stale']:.2f}% -> {100 * record['accuracy_recalibrated']:.2f}%)")
        return candidate, record, fresh_stats
    log.info("BatchNorm running statistics kept as they were: re-estimated ones scored %.2f%% vs %.2f%%",
             100 * record["accuracy_recalibrated"], 100 * record["accuracy_stale"])
    return model, record, stale_stats


def evaluate(model_input: ModelInput, reader: DataReader, output_name: Optional[str] = None) -> EpochStats:
    """Top-1 accuracy and cross-entropy of an inference model in an ORT ``InferenceSession``.

    ``reader``: any reader with ``get_next()`` (an admm-onnx reader, an ORT CalibrationDataReader)."""
    _check_model_arg(model_input)
    if isinstance(model_input, PreparedModel):
        model_input = model_input.original
    sess = _session(model_input)
    outputs = [o.name for o in sess.get_outputs()]
    if output_name is not None and output_name not in outputs:
        raise ConfigError(f"output {output_name!r} is not a model output; outputs: {', '.join(outputs)}")
    output_name = output_name or outputs[0]
    graph = model_input if isinstance(model_input, onnx.ModelProto) else load_model(model_input, load_external_data=False)
    reader = reader_for(reader, input_specs(graph), train=False)
    if reader is None:
        raise ConfigError("evaluate needs a reader (get_next() returning feed dicts), got None")
    view = output_view(graph, output_name)  # Softmax / (N, C, 1, 1) heads -> (N, C) logits
    t0 = time.perf_counter()
    correct, seen, nll, counted = 0, 0, 0.0, 0
    reader.rewind()
    while True:
        feed = reader.get_next()
        if feed is None:
            break
        (written,) = sess.run([output_name], _model_feed(sess, feed))
        logits = view.to_logits(written)
        if LABELS in feed and np.ndim(feed[LABELS]) == 1 and (np.ndim(logits) != 2 or len(logits) != len(feed[LABELS])):
            raise ModelError(
                f"model output {output_name!r} has shape {list(np.shape(written))} for a batch of {len(feed[LABELS])}; "
                "accuracy needs (batch, classes) scores",
                hint="choose the scores output with --model-output",
            )
        valid = int(feed.get("__valid__", len(logits)))
        seen += valid
        if LABELS not in feed or correct is None:
            correct = None
            continue
        logits, labels = logits[:valid], np.asarray(feed[LABELS])[:valid]
        if labels.dtype.kind not in "iu" or labels.shape != logits.shape[:-1]:
            correct = None  # labels that are no class indices of the last axis: see metrics.py
            continue
        keep = labels != -100  # ignored (padding) positions
        labels = np.where(keep, labels, 0)
        if labels.size and labels.max() >= logits.shape[-1]:
            raise DataError(f"labels go up to {int(labels.max())} but the model output {output_name!r} has "
                            f"{logits.shape[-1]} classes")
        correct += int(((np.argmax(logits, axis=-1) == labels) & keep).sum())
        logp = logits.astype(np.float64) - logits.max(-1, keepdims=True)
        logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
        nll -= float(np.take_along_axis(logp, labels[..., None], -1)[..., 0][keep].sum())
        counted += int(keep.sum())
    if seen == 0:
        raise DataError("no evaluation data")
    if correct is None or not counted:
        return EpochStats(None, None, seen, time.perf_counter() - t0)
    return EpochStats(nll / counted, correct / counted, seen, time.perf_counter() - t0)
