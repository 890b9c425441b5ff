"""One ORT training session: artifacts in a directory, a checkpoint, a module, an optimizer.

:class:`Trainer` wraps ``generate_artifacts`` + ``CheckpointState`` + ``Module`` +
``Optimizer`` for a classifier. It runs epochs from a :class:`~admm_onnx.data.DataReader`,
evaluates top-1 accuracy and loss from the logits, and exposes the checkpoint parameters by
name (read with :meth:`get`, write with :meth:`set`: a write is seen by the next step).
"""
from __future__ import annotations

import logging
import math
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import onnx

from ._ort import api, artifacts, onnxblock
from .data import LABELS, DataReader
from .errors import DataError, TrainingError
from .graph.ir_version import normalise_ir_file

log = logging.getLogger(__name__)

OPTIMIZERS = {"adamw": artifacts.OptimType.AdamW, "sgd": artifacts.OptimType.SGD}
#: How many of the last training batches (and bytes at most) a Trainer keeps for BatchNorm statistics.
RECENT_BATCHES = 20
RECENT_BYTES = 256 << 20


class Progress:
    """Progress hook: the library reports, a front end (the CLI) draws."""

    def start(self, total: int, label: str) -> None:  # pragma: no cover - interface
        pass

    def advance(self, n: int = 1, **info) -> None:  # pragma: no cover - interface
        pass

    def finish(self) -> None:  # pragma: no cover - interface
        pass


NO_PROGRESS = Progress()


@dataclass
class EpochStats:
    loss: float
    accuracy: float
    samples: int
    seconds: float

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else float("nan")


def session_options(threads: int = 0):
    """Session options for every training session admm-onnx opens (``threads``: ORT intra-op
    threads, 0 = ORT's default, one per core).

    - Denormals flushed to zero: during ADMM the penalty drives pruned weights, their
      gradients and Adam's moments towards zero, into float32's denormal range, where MLAS
      Conv/Gemm kernels run about 10x slower (measured on LeNet-5: an ADMM step with denormal
      weights 385 ms vs 34 ms). The option covers ORT's pool threads; the calling thread is
      covered by :func:`flush_denormals`.
    - Intra-op spinning off: spin-waiting threads halved throughput on a shared 2-core machine
      (bench/throughput.py, "spinning off").
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.set_denormal_as_zero", "1")
    return options


_FLUSHING = False


def flush_denormals() -> None:
    """Make this thread flush float denormals to zero in ORT kernels (once per process).

    ORT sets flush-to-zero/denormals-are-zero on the calling thread only when the *first*
    session of the process has ``session.set_denormal_as_zero`` (a call_once in session
    initialisation); :func:`session_options` covers ORT's pool threads. :class:`Trainer` calls
    this before opening its sessions; call it yourself first thing if you drive ORT training
    sessions of your own with ADMM. Side effect: the control register is per thread and shared
    with NumPy, so NumPy on this thread flushes denormals (below 1.2e-38 in float32) to zero too.
    It has no effect if another ORT session was opened earlier in the process.
    """
    global _FLUSHING
    if _FLUSHING:
        return
    import onnxruntime
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "ftz",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    options = onnxruntime.SessionOptions()
    options.add_session_config_entry("session.set_denormal_as_zero", "1")
    onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    _FLUSHING = True


def _thread_flushes_denormals() -> bool:
    """True if float32 denormals become zero on this thread (NumPy shares the control register)."""
    tiny = np.array([1e-39], np.float32)
    return bool((tiny * np.float32(1.0))[0] == 0.0)


def build_artifacts(
    model: onnx.ModelProto,
    directory: Path,
    trainable: Sequence[str],
    loss: onnxblock.Block,
    output_name: "str | Sequence[str]",
    frozen: Sequence[str] = (),
    optimizer: str = "adamw",
    outputs: bool = True,
) -> Path:
    """Write training/eval/optimizer models and a checkpoint for ``model`` into ``directory``.

    ``output_name``: the model output the loss reads, or several. ``outputs=True`` also makes
    the training and eval models return the (first) output after the loss
    (``additional_output_names``); the pipeline passes False (loss only: a BERT graph built
    with that option crashed ORT training, issue 12) and evaluates in an InferenceSession.
    Every artifact's IR version is normalised for ORT 1.19.2 (see graph/ir_version.py).
    """
    from .graph.differentiable import check_differentiable, explain_gradient_error

    names = [output_name] if isinstance(output_name, str) else list(output_name)
    for name in names:
        check_differentiable(model, list(trainable), name)  # one-line error naming the op
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # generate_artifacts logs at INFO through the root logger; keep it out of ours.
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))
    try:
        artifacts.generate_artifacts(
            model,
            requires_grad=list(trainable),
            frozen_params=list(frozen),
            loss=loss,
            optimizer=OPTIMIZERS[optimizer],
            artifact_directory=str(directory),
            additional_output_names=names[:1] if outputs else None,
            loss_input_names=names,
        )
    except RuntimeError as exc:
        explained = explain_gradient_error(exc, model)
        if explained is not None:
            raise explained from exc
        raise TrainingError(f"ONNX Runtime could not build the training graph: {_first_line(exc)}") from exc
    except IndexError as exc:  # ORT's graph optimiser: a C++ map lookup of an attribute the node lacks
        raise TrainingError(
            f"ONNX Runtime could not build the training graph ({_first_line(exc)}): a node lacks an attribute "
            "it looks up; a Transpose without perm whose input rank is unknown, or inside an If/Loop body, is "
            "one such case",
            hint="re-export the model with every Transpose's perm written out") from exc
    finally:
        root.setLevel(level)
    for name in ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx"):
        normalise_ir_file(directory / name)
    return directory


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__


class Trainer:
    """Training session over artifacts in ``directory`` (see :func:`build_artifacts`).

    ``checkpoint`` defaults to the one generated with the artifacts; pass another path to
    resume from a saved state. ``threads``: ORT intra-op threads (0: ORT's default).
    ``workers`` > 1 splits every training batch over that many processes (this one included,
    see :mod:`admm_onnx.parallel`), each with ``threads`` or 1 ORT thread; call :meth:`close`
    (or use the Trainer as a context manager) to stop them.
    """

    def __init__(
        self,
        directory: Path,
        lr: float = 1e-3,
        loss_kind: str = "cross_entropy",
        num_classes: Optional[int] = None,
        checkpoint: Optional[Path] = None,
        threads: int = 0,
        workers: int = 1,
    ):
        self.directory = Path(directory)
        self.pool = None
        self.loss_kind = loss_kind
        self.num_classes = num_classes
        ckpt = Path(checkpoint) if checkpoint else self.directory / "checkpoint"
        flush_denormals()
        if not _thread_flushes_denormals():
            log.warning(
                "this thread does not flush float denormals (an ORT session was opened before admm-onnx's "
                "first one): late ADMM iterations may run several times slower"
            )
        try:
            self.state = api.CheckpointState.load_checkpoint(str(ckpt))
            self.module = api.Module(
                str(self.directory / "training_model.onnx"), self.state, str(self.directory / "eval_model.onnx"),
                session_options=session_options(threads or (1 if workers > 1 else 0)),
            )
            self.optimizer = api.Optimizer(str(self.directory / "optimizer_model.onnx"), self.module)
        except Exception as exc:  # ORT raises its own exception types
            raise TrainingError(f"ONNX Runtime could not load the training artifacts: {_first_line(exc)}") from exc
        self.optimizer.set_learning_rate(lr)
        self.input_names: List[str] = list(self.module.input_names())
        #: Optional per-step learning rate: ``schedule(step) -> lr``, step counted over epochs.
        self.schedule: Optional[Callable[[int], float]] = None
        self.step = 0
        #: The last training batches seen (at most RECENT_BATCHES, RECENT_BYTES in all): the
        #: evaluator re-estimates BatchNorm running statistics on them (ORT training never
        #: writes them back), so in-run figures of BN models are not those of stale statistics.
        self.recent_feeds: List[Dict[str, np.ndarray]] = []
        self.trainable = [name for name, p in self.state.parameters if p.requires_grad]
        if workers > 1:
            from .parallel import WorkerPool

            layout = [(n, str(self.state.parameters[n].data.dtype), tuple(self.state.parameters[n].data.shape))
                      for n in self.trainable]
            self.pool = WorkerPool(self.directory, ckpt, layout, workers, threads)
            self._finalizer = weakref.finalize(self, self.pool.close)

    def close(self) -> None:
        """Stop the worker processes, if any (the Trainer itself stays usable on one process)."""
        if self.pool is not None:
            self._finalizer()
            self.pool = None

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- parameters ---------------------------------------------------------------------
    def get(self, name: str) -> np.ndarray:
        return np.array(self.state.parameters[name].data)

    def set(self, name: str, value: np.ndarray) -> None:
        current = self.state.parameters[name].data
        self.state.parameters[name].data = np.asarray(value, dtype=current.dtype).reshape(current.shape)

    def parameter_names(self) -> List[str]:
        return [name for name, _ in self.state.parameters]

    #: ORT writes a checkpoint as one flatbuffer, which fails past 2 GB ("ToFile ... errno 34").
    CHECKPOINT_LIMIT = 1.9e9

    def parameter_bytes(self) -> int:
        """Bytes of all checkpoint parameters (trainable and frozen), computed once."""
        if not hasattr(self, "_parameter_bytes"):
            self._parameter_bytes = sum(p.data.nbytes for _, p in self.state.parameters)
        return self._parameter_bytes

    def save_checkpoint(self, path: Path) -> bool:
        """Save parameters, and the optimizer state when it fits; returns whether it did.

        AdamW keeps two moments per trainable parameter: with them a checkpoint is about
        three times the parameters. Past ORT's 2 GB file limit the optimizer state is left
        out, and a resumed run restarts the optimizer's moments (logged).
        """
        with_optimizer = 3 * self.parameter_bytes() < self.CHECKPOINT_LIMIT
        if not with_optimizer and not getattr(self, "_warned_checkpoint", False):
            log.warning(
                "parameters take %.2f GB: checkpoints leave out the optimizer state (ORT's 2 GB limit); "
                "a resumed run restarts the optimizer", self.parameter_bytes() / 1e9,
            )
            self._warned_checkpoint = True
        api.CheckpointState.save_checkpoint(self.state, str(path), include_optimizer_state=with_optimizer)
        return with_optimizer

    def set_lr(self, lr: float) -> None:
        self.optimizer.set_learning_rate(lr)

    # -- steps ---------------------------------------------------------------------------
    def _inputs(self, feed: Dict[str, np.ndarray]) -> List[np.ndarray]:
        """The training graph's inputs from a feed: every model input (in its own dtype), the
        labels when the loss reads them, and whatever else the loss declared (teacher outputs)."""
        out = []
        for name in self.input_names:
            if name == LABELS:
                out.append(self._labels(feed))
            elif name in feed:
                out.append(feed[name])
            elif len(self.input_names) == 2 and LABELS in self.input_names:  # one model input under another name
                from .feeds import model_feed

                out.append(next(iter(model_feed(feed, [name]).values())))
            else:
                raise DataError(f"the feed has no {name!r} (it has {', '.join(sorted(feed))})")
        return out

    def _labels(self, feed: Dict[str, np.ndarray]) -> np.ndarray:
        if LABELS not in feed:
            raise DataError("the loss needs labels but the data has none",
                            hint="give labels, or a label-free loss (distillation)")
        labels = np.asarray(feed[LABELS])
        if self.loss_kind == "mse" and labels.dtype.kind in "iu":
            if (labels < 0).any():
                raise DataError("--loss mse takes class labels as one-hot targets, and -100 (an ignored position) "
                                "has none", hint="use --loss cross_entropy, which skips -100, or drop those labels")
            if labels.size and labels.max() >= self.num_classes:
                raise DataError(f"labels go up to {int(labels.max())} but the output has {self.num_classes} classes")
            onehot = np.zeros((*labels.shape, self.num_classes), np.float32)
            np.put_along_axis(onehot, labels[..., None], 1.0, axis=-1)
            return onehot
        if labels.dtype.kind in "iu":
            return labels.astype(np.int64, copy=False)
        return labels.astype(np.float32, copy=False)

    def begin_training(self) -> None:
        """Training mode; with workers, hand them the current parameters (frozen ones such as ADMM
        targets may have been rewritten since the last epoch). :meth:`train_epoch` calls it."""
        self.module.train()
        if self.pool is not None:
            self.pool.sync_frozen({n: np.array(p.data) for n, p in self.state.parameters if not p.requires_grad})
            self._publish()

    def _publish(self) -> None:
        """Hand the trainable parameters to the worker processes (before their next step)."""
        params = self.state.parameters
        self.pool.publish({n: params[n].data for n in self.trainable})

    def train_step(self, feed: Dict[str, np.ndarray]) -> Tuple[float, np.ndarray]:
        """One optimizer step on one batch (after :meth:`begin_training`); returns the loss and
        the model output."""
        if self.schedule is not None:
            self.optimizer.set_learning_rate(self.schedule(self.step))
        loss, logits = self._forward_backward(self._inputs(feed))
        if not math.isfinite(loss):
            raise TrainingError(f"training diverged: the loss became {loss} at step {self.step + 1}",
                                hint="lower --lr")
        self.optimizer.step()
        self.module.lazy_reset_grad()
        if self.pool is not None:
            self._publish()
        self.step += 1
        return loss, logits

    def train_epoch(self, reader: DataReader, progress: Progress = NO_PROGRESS, label: str = "train",
                    after_step: Optional[Callable[[], bool]] = None) -> EpochStats:
        """One pass over ``reader`` with an optimizer step per batch.

        ``after_step`` (optional) is called after every step; when it returns True the epoch
        ends there (e.g. ADMM converged mid-epoch). It may rewrite frozen parameters: call
        :meth:`begin_training` from it so worker processes see them."""
        total_loss, correct, seen = 0.0, 0, 0
        try:
            total = len(reader)
        except TypeError:
            total = 0
        progress.start(total, label)
        reader.rewind()
        self.begin_training()
        t0 = time.perf_counter()
        try:
            while True:
                feed = reader.get_next()
                if feed is None:
                    break
                loss, logits = self.train_step(feed)
                self._remember(feed)
                n = len(next(v for k, v in feed.items() if k != LABELS)) if logits is None else len(logits)
                total_loss += loss * n
                if logits is None:
                    correct = None
                elif correct is not None and LABELS in feed and np.shape(feed[LABELS]) == np.shape(logits)[:-1]:
                    correct += int((np.argmax(logits, axis=-1) == feed[LABELS]).sum())
                seen += n
                progress.advance(1, loss=loss)
                if after_step is not None and after_step():
                    break
        finally:
            progress.finish()
        dt = time.perf_counter() - t0
        if seen == 0:
            raise TrainingError("the training reader yielded no batch")
        return EpochStats(total_loss / seen, None if correct is None else correct / seen, seen, dt)

    def _remember(self, feed: Dict[str, np.ndarray]) -> None:
        """Keep ``feed`` among the last training batches (see ``recent_feeds``)."""
        self.recent_feeds.append(feed)
        size = sum(int(getattr(v, "nbytes", 0)) for f in self.recent_feeds for v in f.values())
        while len(self.recent_feeds) > RECENT_BATCHES or (len(self.recent_feeds) > 1 and size > RECENT_BYTES):
            dropped = self.recent_feeds.pop(0)
            size -= sum(int(getattr(v, "nbytes", 0)) for v in dropped.values())

    def _forward_backward(self, inputs: List[np.ndarray]) -> Tuple[float, np.ndarray]:
        """Loss and output of one training batch, its gradient left in the parameters' buffers;
        with workers, computed over row slices in parallel and recombined (admm_onnx.parallel)."""
        n = len(inputs[0])
        if self.pool is None or n < self.pool.workers:
            return _loss_and_output(self.module(*inputs))
        bounds = np.linspace(0, n, self.pool.workers + 1).round().astype(int)
        slices = [[a[bounds[k] : bounds[k + 1]] for a in inputs] for k in range(self.pool.workers)]
        for rank in range(1, self.pool.workers):
            self.pool.start(rank, slices[rank])
        loss0, logits0 = _loss_and_output(self.module(*slices[0]))
        losses, outputs = [float(loss0)], [logits0]
        for rank in range(1, self.pool.workers):
            loss_k, logits_k = self.pool.finish(rank)
            losses.append(loss_k)
            outputs.append(logits_k)
        weights = np.diff(bounds) / n
        params, grads = self.state.parameters, self.pool.exchange.grads
        equal = bool(np.all(weights == weights[0]))
        for name in self.trainable:
            grad = params[name].grad
            if grad is None:
                continue
            if equal:  # sum in place, then scale once: no temporaries
                for rank in range(1, self.pool.workers):
                    np.add(grad, grads[rank][name], out=grad)
                grad *= weights[0]
            else:
                grad *= weights[0]
                for rank in range(1, self.pool.workers):
                    grad += weights[rank] * grads[rank][name]
        return float(np.dot(weights, losses)), (None if any(o is None for o in outputs) else np.concatenate(outputs))

    #: An admm_onnx.metrics.Evaluator over this trainer's model (set by the pipeline): then
    #: outputs and evaluation come from an InferenceSession with the current weights.
    evaluator = None

    def weights(self) -> Dict[str, np.ndarray]:
        """Every checkpoint parameter (trainable and frozen: masks, fake-quantization scales)."""
        return {n: np.array(p.data) for n, p in self.state.parameters}

    def logits(self, feed: Dict[str, np.ndarray]) -> np.ndarray:
        """Model output (the first selected one) for one feed dict, in eval mode."""
        if self.evaluator is not None:
            sess = self.evaluator.session(self.weights())
            return self.evaluator.outputs_for(sess, feed)[self.evaluator.outputs[0]]
        self.module.eval()
        _, logits = self.module(*self._inputs(feed))
        return logits

    def predict(self, reader: DataReader) -> Iterable[np.ndarray]:
        """Logits for every batch of ``reader`` (eval mode), trimmed of padding rows."""
        reader.rewind()
        while True:
            feed = reader.get_next()
            if feed is None:
                return
            logits = self.logits(feed)
            yield feed, logits[: int(feed.get("__valid__", len(logits)))]

    def evaluate(self, reader: DataReader) -> EpochStats:
        """Top-1 accuracy and mean cross-entropy of the logits over ``reader`` (with an
        evaluator: every metric, fidelity included, of the current weights)."""
        if self.evaluator is not None:
            return self.evaluator.evaluate(reader, self.weights(), bn_feeds=self.recent_feeds)
        t0 = time.perf_counter()
        correct, seen, nll = 0, 0, 0.0
        for feed, logits in self.predict(reader):
            labels = np.asarray(feed[LABELS])[: len(logits)]
            correct += int((np.argmax(logits, axis=-1) == labels).sum())
            nll += float(cross_entropy(logits, labels)) * len(labels)
            seen += len(labels)
        if seen == 0:
            raise TrainingError("the evaluation reader yielded no batch")
        return EpochStats(nll / seen, correct / seen, seen, time.perf_counter() - t0)


def _loss_and_output(result) -> Tuple[float, Optional[np.ndarray]]:
    """(loss, output or None) from a training module's return: the loss alone, or the loss
    and the model output when the artifacts were built with outputs."""
    if isinstance(result, (list, tuple)):
        return float(result[0]), (np.asarray(result[1]) if len(result) > 1 else None)
    return float(result), None


def cosine_schedule(lr: float, total_steps: int, floor: float = 0.0) -> Callable[[int], float]:
    """lr * (floor + (1 - floor) * (1 + cos(pi * step / total)) / 2): from lr down to lr * floor."""

    def schedule(step: int) -> float:
        t = min(step, total_steps) / max(1, total_steps)
        return lr * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t)))

    return schedule


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean softmax cross-entropy, computed stably in float64."""
    z = logits.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return float(-logp[np.arange(len(labels)), labels].mean())
