"""Training objectives as onnxblock Blocks: labels, distillation from the dense model, or both.

Every objective is a Block whose ``build(*outputs)`` receives the names of the selected model
outputs, appends its nodes (and the graph inputs it reads) to ``self.base`` and returns the
name of a scalar float loss. Pass any other onnxblock ``Block`` to :func:`admm_onnx.prune` in
the API (``loss=``); in the CLI and config, objectives are chosen by name (:data:`LOSSES`).

- ``cross_entropy`` (:class:`CrossEntropy`): softmax cross-entropy of class scores against
  int64 class indices fed as :data:`~admm_onnx.data.LABELS`: (N, C) with labels (N,); per
  token (N, T, C) with (N, T); per pixel (N, C, H, W) with (N, H, W). Label -100 is ignored
  (padding tokens, Hugging Face's convention).
- ``mse`` (:class:`MSE`): mean squared error against LABELS: float targets of the output's
  shape (regression), or one-hot vectors the trainer makes from class indices.
- ``distill`` (:class:`Distillation`): self-distillation from the dense model (the teacher).
  The teacher's output for each selected output ``o`` is fed as graph input
  :func:`teacher_name` (o); class scores are pulled by ``T^2 * KL(softmax(t/T) || softmax(s/T))``
  over the class axis, averaged over positions (samples, tokens, pixels); any other float
  output (embeddings, regression, boxes) by the mean squared error. Terms of several outputs
  add up.
- ``ce+distill`` (:class:`Mixed`): ``(1 - a) * cross_entropy + a * distill``, ``a`` =
  ``distill_weight``.
- ``auto`` (the default): ``cross_entropy`` when the data has class labels, ``mse`` for float
  targets, ``distill`` when it has none.

The class axis of class scores: rank 2 -> 1, rank 3 -> 2 (per token, (N, T, C)), rank 4 and
more -> 1 (per pixel, NCHW); ``class_axis`` overrides it. The math is written with ops that
have the same meaning in every opset the project supports (the class axis is moved last,
Softmax/LogSoftmax run on the last axis, sums reduce every axis).
"""
from __future__ import annotations

import re
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ._ort import onnxblock
from .data import LABELS
from .errors import ConfigError

LOSSES = ("auto", "cross_entropy", "mse", "distill", "ce+distill")
#: Label value that cross-entropy ignores (padding tokens).
IGNORE_INDEX = -100
#: Kinds of distillation term per output.
DISTILL_KINDS = ("kl", "mse")
_CLASSY = re.compile(r"logit|score|prob|class|label", re.I)


def teacher_name(output: str) -> str:
    """Graph input (and feed key) holding the teacher's value of model output ``output``."""
    return f"admm_teacher.{output}"


def class_axis_for(rank: Optional[int], class_axis: Optional[int] = None) -> int:
    """The class axis (non-negative when the rank is known) of class scores of ``rank``."""
    if class_axis is not None:
        if rank is not None:
            if not -rank <= class_axis < rank:
                raise ConfigError(f"class_axis {class_axis} is out of range for an output of rank {rank}")
            return class_axis % rank
        return class_axis
    if rank is None:
        return -1
    return 1 if rank == 2 or rank >= 4 else rank - 1


def _output_value(model: onnx.ModelProto, name: str) -> Optional[onnx.ValueInfoProto]:
    for v in model.graph.output:
        if v.name == name:
            return v
    return None


def _rank(model: onnx.ModelProto, name: str) -> Optional[int]:
    v = _output_value(model, name)
    if v is None or not v.type.tensor_type.HasField("shape"):
        return None
    return len(v.type.tensor_type.shape.dim)


def distill_kind(model: onnx.ModelProto, output: str) -> str:
    """"kl" for class scores (a softmax head in the graph, a ZipMap, or a name that says logits,
    scores, probabilities or classes), else "mse"."""
    from .graph.outputs import output_view

    try:
        view = output_view(model, output)
        if view.softmax or view.zipmap:
            return "kl"
    except Exception:  # noqa: BLE001 - detection is best effort
        pass
    rank = _rank(model, output)
    return "kl" if _CLASSY.search(output) and (rank is None or rank >= 2) else "mse"


class _Graph:
    """Small helper to append uniquely named nodes and constants to ``base``."""

    def __init__(self, base: onnx.ModelProto, prefix: str):
        self.base, self.prefix, self.count = base, prefix, 0

    def name(self, what: str) -> str:
        self.count += 1
        return f"{self.prefix}/{what}{self.count}"

    def node(self, op: str, inputs: Sequence[str], **attrs) -> str:
        out = self.name(op)
        self.base.graph.node.append(helper.make_node(op, list(inputs), [out], name=out, **attrs))
        return out

    def const(self, value, dtype=np.float32) -> str:
        out = self.name("const")
        self.base.graph.initializer.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), out))
        return out

    def last_axis(self, x: str, axis: int, rank: Optional[int]) -> str:
        """``x`` with ``axis`` moved last (a Transpose when it is not last already)."""
        if rank is None or axis in (-1, rank - 1):
            return x
        perm = [i for i in range(rank) if i != axis] + [axis]
        return self.node("Transpose", [x], perm=perm)

    def scalar(self, x: str) -> str:
        return self.node("Reshape", [x, self.const(np.zeros(0, np.int64), np.int64)])

    def add_input(self, name: str, like: onnx.ValueInfoProto, elem_type=None, drop_axis: Optional[int] = None):
        if any(i.name == name for i in self.base.graph.input):
            return
        v = onnx.ValueInfoProto()
        v.CopyFrom(like)
        v.name = name
        if elem_type is not None:
            v.type.tensor_type.elem_type = elem_type
        if drop_axis is not None and v.type.tensor_type.HasField("shape"):
            del v.type.tensor_type.shape.dim[drop_axis]
        self.base.graph.input.append(v)

    def to_float(self, x: str, model_output: str) -> str:
        v = _output_value(self.base, model_output)
        if v is not None and v.type.tensor_type.elem_type not in (TensorProto.FLOAT, 0):
            return self.node("Cast", [x], to=TensorProto.FLOAT)
        return x


class Objective(onnxblock.Block):
    """Base of admm-onnx's objectives. ``needs_labels`` / ``needs_teacher`` tell the pipeline
    what the feeds must carry."""

    needs_labels = False
    needs_teacher = False
    #: How the trainer turns class indices into the LABELS feed ("indices" or "onehot").
    labels_as = "indices"


class CrossEntropy(Objective):
    """Softmax cross-entropy of the first output against LABELS (see the module docstring)."""

    needs_labels = True

    def __init__(self, class_axis: Optional[int] = None, ignore_index: int = IGNORE_INDEX):
        super().__init__()
        self.class_axis, self.ignore_index = class_axis, ignore_index

    def build(self, output: str, *others: str) -> str:
        g = _Graph(self.base, "admm/ce")
        rank = _rank(self.base, output)
        axis = class_axis_for(rank, self.class_axis)
        scores = g.to_float(output, output)
        if rank is not None and rank > 2 and axis != 1:  # SoftmaxCrossEntropyLoss wants (N, C, d1, ...)
            perm = [0, axis] + [i for i in range(1, rank) if i != axis]
            scores = g.node("Transpose", [scores], perm=perm)
        like = _output_value(self.base, output)
        g.add_input(LABELS, like, TensorProto.INT64, drop_axis=axis if rank is not None else None)
        loss = g.name("SoftmaxCrossEntropyLoss")
        self.base.graph.node.append(helper.make_node(
            "SoftmaxCrossEntropyLoss", [scores, LABELS], [loss, g.name("log_prob")], name=loss,
            reduction="mean", ignore_index=self.ignore_index))
        return loss


class MSE(Objective):
    """Mean squared error of the first output against LABELS (float targets of its shape, or
    one-hot vectors made from class indices)."""

    needs_labels = True
    labels_as = "onehot"

    def build(self, output: str, *others: str) -> str:
        g = _Graph(self.base, "admm/mse")
        g.add_input(LABELS, _output_value(self.base, output), TensorProto.FLOAT)
        diff = g.node("Sub", [g.to_float(output, output), LABELS])
        return g.node("ReduceMean", [g.node("Mul", [diff, diff])], keepdims=0)


class Distillation(Objective):
    """Pull every selected output to the dense model's (see the module docstring).

    ``kinds``: output name -> "kl" or "mse" (default: :func:`distill_kind` on the graph).
    ``temperature`` T softens both distributions of a KL term, scaled by T^2."""

    needs_teacher = True

    def __init__(self, temperature: float = 2.0, kinds: Optional[Dict[str, str]] = None,
                 class_axis: Optional[int] = None):
        super().__init__()
        if not temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {temperature}")
        for k in (kinds or {}).values():
            if k not in DISTILL_KINDS:
                raise ConfigError(f"distillation kind must be one of {', '.join(DISTILL_KINDS)}, got {k!r}")
        self.temperature, self.kinds, self.class_axis = float(temperature), dict(kinds or {}), class_axis

    def build(self, *outputs: str) -> str:
        g = _Graph(self.base, "admm/distill")
        terms = []
        for o in outputs:
            like = _output_value(self.base, o)
            t = teacher_name(o)
            g.add_input(t, like)
            kind = self.kinds.get(o) or distill_kind(self.base, o)
            s, t = g.to_float(o, o), g.to_float(t, o)
            if kind == "mse":
                diff = g.node("Sub", [s, t])
                terms.append(g.node("ReduceMean", [g.node("Mul", [diff, diff])], keepdims=0))
                continue
            rank = _rank(self.base, o)
            axis = class_axis_for(rank, self.class_axis)
            inv_t = g.const(1.0 / self.temperature)
            s_last = g.last_axis(g.node("Mul", [s, inv_t]), axis, rank)
            t_last = g.last_axis(g.node("Mul", [t, inv_t]), axis, rank)
            log_s = g.node("LogSoftmax", [s_last], axis=-1)
            log_t = g.node("LogSoftmax", [t_last], axis=-1)
            p_t = g.node("Exp", [log_t])
            pointwise = g.node("Mul", [p_t, g.node("Sub", [log_t, log_s])])
            total = g.node("ReduceSum", [pointwise], keepdims=0)
            # positions = elements / classes, from the teacher's shape (no gradient flows there)
            shape = g.node("Shape", [t_last])
            classes = g.node("Gather", [shape, g.const(-1, np.int64)], axis=0)
            positions = g.node("Div", [g.node("Size", [t_last]), classes])
            mean = g.node("Div", [total, g.node("Cast", [positions], to=TensorProto.FLOAT)])
            terms.append(g.node("Mul", [mean, g.const(self.temperature ** 2)]))
        loss = terms[0]
        for term in terms[1:]:
            loss = g.node("Add", [loss, term])
        return g.scalar(loss)


class Mixed(Objective):
    """Weighted sum of objectives: ``Mixed([(0.5, CrossEntropy()), (0.5, Distillation())])``."""

    def __init__(self, parts: Sequence[Tuple[float, onnxblock.Block]]):
        super().__init__()
        if not parts:
            raise ConfigError("a mixed loss needs at least one part")
        self.parts = [(float(w), b) for w, b in parts]
        self.needs_labels = any(getattr(b, "needs_labels", False) for _, b in self.parts)
        self.needs_teacher = any(getattr(b, "needs_teacher", False) for _, b in self.parts)
        self.labels_as = next((getattr(b, "labels_as") for _, b in self.parts if getattr(b, "needs_labels", False)),
                              "indices")

    def build(self, *outputs: str) -> str:
        g = _Graph(self.base, "admm/mix")
        loss = None
        for w, block in self.parts:
            term = g.node("Mul", [g.scalar(block(*outputs)), g.const(w)])
            loss = term if loss is None else g.node("Add", [loss, term])
        return loss


def make_loss(name: str, has_labels: bool, float_labels: bool = False, temperature: float = 2.0,
              distill_weight: float = 0.5, class_axis: Optional[int] = None,
              kinds: Optional[Dict[str, str]] = None) -> Tuple[str, onnxblock.Block]:
    """(resolved name, Block) for a loss name of :data:`LOSSES` and what the data holds."""
    if name not in LOSSES:
        raise ConfigError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
    if name == "auto":
        name = ("mse" if float_labels else "cross_entropy") if has_labels else "distill"
    if name in ("cross_entropy", "mse", "ce+distill") and not has_labels:
        raise ConfigError(f"loss {name} needs labels but the data has none",
                          hint="give labels (labels/y, --labels-key), or use --loss distill (the default without labels)")
    if name in ("cross_entropy", "ce+distill") and float_labels:
        raise ConfigError(f"loss {name} needs integer class labels; the labels are float (use --loss mse)")
    if name == "cross_entropy":
        return name, CrossEntropy(class_axis)
    if name == "mse":
        return name, MSE()
    distill = Distillation(temperature, kinds, class_axis)
    if name == "distill":
        return name, distill
    return name, Mixed([(1.0 - distill_weight, CrossEntropy(class_axis)), (distill_weight, distill)])


class ClassifierLoss(onnxblock.Block):
    """``cross_entropy`` or ``mse`` on the model output named at build time (the objective of
    labelled classifiers, kept for existing user code; :func:`make_loss` is the general one)."""

    def __init__(self, kind: str = "cross_entropy"):
        super().__init__()
        if kind not in ("cross_entropy", "mse"):
            raise ConfigError(f"unknown loss {kind!r}; choose one of cross_entropy, mse")
        self.kind = kind
        self.needs_labels, self.needs_teacher = True, False
        self.labels_as = "onehot" if kind == "mse" else "indices"
        self._block = onnxblock.loss.CrossEntropyLoss() if kind == "cross_entropy" else onnxblock.loss.MSELoss()

    def build(self, output_name: str, *others: str):
        return self._block(output_name, LABELS)
