"""Train on logits: the training copy's class outputs become (N, C) logits.

Decision: a classifier whose output is ``Softmax(logits)`` is trained on the logits (the
cross-entropy of probabilities taken as logits has vanishing gradients), and an output of
shape (N, C, 1, ..., 1) (SqueezeNet, DenseNet: a 1x1 conv head) is trained as (N, C).

Detection (:func:`output_view`, on any graph): walking back from a graph output through
view-only ops (Reshape, Flatten, Squeeze, Unsqueeze, Identity), a ``Softmax`` over the class
axis is found: for opset >= 13 its axis is the last axis or every axis after it has size 1;
for opset < 13 (which flattens from ``axis`` on) its axis is 1. The chain must keep the
per-sample element count (the class count C). Its input is the logits tensor.
``LogSoftmax`` is left alone: cross-entropy on log-probabilities equals cross-entropy on logits.

Rewrite (:func:`train_on_logits`, training copy only, every graph output): the graph output
keeps its name but is recomputed as ``Flatten(logits, axis=1)`` (or ``Flatten(output)`` for a
bare (N, C, 1, ..., 1) output), so it holds (N, C) logits; the old producer writes to a renamed
tensor that stays available to any other consumer. The user's graph is not rewritten: the
written model still ends in its Softmax and original shape. :class:`OutputView` converts
between the two (``to_logits`` for evaluating a written model, ``from_logits`` to compare the
trained model's output with the written one). A scikit-learn ``ZipMap`` output (a list of
{label: probability} maps, trained as its (N, C) tensor: see zipmap.py) is read back as an
array by :meth:`OutputView.as_tensor`.

Default output (:func:`default_output`): the first graph output that is a float tensor and
depends on a float initializer of more than one element (a weight); int64 labels, ZipMap maps
and outputs computed from the inputs alone are never chosen. Run it on the training copy
(after zipmap.py), where a ZipMap output is already a float tensor.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np
import onnx
from onnx import helper

from ..errors import ModelError
from ._util import NameScope, attr, checked, opset_version
from .shapes import tensor_shapes
from .zipmap import is_zipmap

#: Ops that only change the view of a tensor, never its values.
VIEW_OPS = ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity")


@dataclass(frozen=True)
class OutputView:
    """How a written model's output relates to the (N, C) logits the training copy outputs."""

    name: str
    #: The written output is softmax(logits) (over the classes).
    softmax: bool = False
    #: The written output has trailing singleton dims the training copy drops.
    flattened: bool = False
    #: The logits tensor in the graph this view was made from (None if the output itself).
    logits: Optional[str] = None
    #: The written output is a ZipMap (list of maps) with these class labels, in order.
    zipmap: Optional[Tuple[object, ...]] = None

    def as_tensor(self, written) -> np.ndarray:
        """The written model's output as an array (a ZipMap's maps as (N, C) in label order)."""
        if isinstance(written, (list, tuple)) and written and isinstance(written[0], dict):
            keys = list(self.zipmap) if self.zipmap else list(written[0].keys())
            return np.array([[row[k] for k in keys] for row in written], dtype=np.float32)
        return np.asarray(written)

    def to_logits(self, written: np.ndarray) -> np.ndarray:
        """The written model's output as (N, C) logits: log-probabilities for a softmax output
        (same argmax, same cross-entropy), trailing singleton dims dropped."""
        x = self.as_tensor(written)
        if x.ndim > 2 and all(d == 1 for d in x.shape[2:]):
            x = x.reshape(x.shape[0], x.shape[1])
        if self.softmax:
            x = np.log(np.maximum(x.astype(np.float64), np.finfo(np.float64).tiny))
        return x

    def from_logits(self, logits: np.ndarray, like: Optional[np.ndarray] = None) -> np.ndarray:
        """What the written model outputs for training-copy ``logits`` (reshaped like ``like``)."""
        x = np.asarray(logits, dtype=np.float64)
        if self.softmax:
            z = x - x.max(axis=-1, keepdims=True)
            e = np.exp(z)
            x = e / e.sum(axis=-1, keepdims=True)
        if like is not None:
            like = self.as_tensor(like)
            if x.size == like.size:
                x = x.reshape(like.shape)
        return x



def _per_sample(shape) -> Optional[int]:
    if not shape or any(not isinstance(d, int) for d in shape[1:]):
        return None
    return int(np.prod(shape[1:])) if len(shape) > 1 else 1


def _softmax_over_classes(node: onnx.NodeProto, opset: int, shape) -> bool:
    """Does this Softmax normalise over all non-batch elements of its (N, ...) input?"""
    if opset < 13:
        return attr(node, "axis", 1) == 1
    axis = attr(node, "axis", -1)
    if shape is None:
        return axis == -1
    rank = len(shape)
    axis = axis % rank if rank else axis
    if axis == 0:
        return False
    return all(d == 1 for d in shape[1:axis]) and all(d == 1 for d in shape[axis + 1 :])


def _zipmap_labels(model: onnx.ModelProto, output: str) -> Optional[Tuple[object, ...]]:
    for node in model.graph.node:
        if is_zipmap(node) and node.output[0] == output:
            for a in node.attribute:
                if a.name.startswith("classlabels"):
                    values = helper.get_attribute_value(a)
                    return tuple(v.decode() if isinstance(v, bytes) else v for v in values)
            return ()
    return None


def _find(model: onnx.ModelProto, output: str, shapes: Dict[str, list]) -> Tuple[Optional[onnx.NodeProto], bool]:
    """(the class Softmax behind ``output`` or None, whether the output needs flattening)."""
    producers = {o: n for n in model.graph.node for o in n.output if o}
    if output in producers and is_zipmap(producers[output]):
        output = producers[output].input[0]
    opset = opset_version(model)
    out_shape = shapes.get(output)
    classes = _per_sample(out_shape)
    flatten = bool(out_shape) and len(out_shape) > 2 and all(d == 1 for d in out_shape[2:])
    cur = output
    for _ in range(16):
        node = producers.get(cur)
        if node is None or node.domain not in ("", "ai.onnx"):
            break
        in_shape = shapes.get(node.input[0]) if node.input else None
        if classes is not None and _per_sample(in_shape) not in (None, classes):
            break
        if node.op_type == "Softmax":
            if _softmax_over_classes(node, opset, in_shape):
                return node, flatten
            break
        if node.op_type not in VIEW_OPS:
            break
        cur = node.input[0]
    return None, flatten


def output_view(model: onnx.ModelProto, output: str, shapes: Optional[Dict[str, list]] = None) -> OutputView:
    """How ``output`` of ``model`` (the user's graph) maps to training logits."""
    shapes = shapes if shapes is not None else tensor_shapes(model)
    softmax, flatten = _find(model, output, shapes)
    return OutputView(
        output, softmax is not None, flatten, softmax.input[0] if softmax is not None else None,
        _zipmap_labels(model, output),
    )


def default_output(model: onnx.ModelProto) -> str:
    """The first graph output that is a float tensor computed from a weight (module docstring)."""
    from .analysis import FLOAT_TYPES, _reaching

    graph = model.graph
    weights = {t.name for t in graph.initializer if t.data_type in FLOAT_TYPES and int(np.prod(t.dims)) > 1}
    floats = [o.name for o in graph.output
              if o.type.HasField("tensor_type") and o.type.tensor_type.elem_type in FLOAT_TYPES]
    produced = {o for n in graph.node for o in n.output}
    for name in floats:  # an initializer passed straight through (an embedding table) is not computed
        if name in produced and _reaching(graph, name) & weights:
            return name
    if floats:
        return floats[0]
    kinds = ", ".join(f"{o.name} ({_type_name(o)})" for o in graph.output)
    raise ModelError(f"the model has no float tensor output to train on; outputs: {kinds}")


def _type_name(value: onnx.ValueInfoProto) -> str:
    t = value.type
    if t.HasField("tensor_type"):
        return helper.tensor_dtype_to_np_dtype(t.tensor_type.elem_type).name
    return t.WhichOneof("value") or "unknown"


def train_on_logits(model: onnx.ModelProto) -> int:
    """Make every class output of the training copy (N, C) logits, in place; returns how many."""
    graph = model.graph
    shapes = tensor_shapes(model)
    names = NameScope(graph)
    count = 0
    for out in graph.output:
        view = output_view(model, out.name, shapes)
        if not view.softmax and not view.flattened:
            continue
        source = view.logits if view.softmax else None
        renamed = names(f"{out.name}/{'probabilities' if view.softmax else 'unflattened'}")
        for node in graph.node:
            for i, o in enumerate(node.output):
                if o == out.name:
                    node.output[i] = renamed
            for i, x in enumerate(node.input):
                if x == out.name:
                    node.input[i] = renamed
        graph.node.append(
            helper.make_node("Flatten", [source or renamed], [out.name], name=names(f"{out.name}/as_logits"), axis=1)
        )
        dims = out.type.tensor_type.shape.dim
        batch = None
        if len(dims):
            batch = dims[0].dim_value if dims[0].HasField("dim_value") else (dims[0].dim_param or None)
        classes = _per_sample(shapes.get(out.name))
        out.CopyFrom(helper.make_tensor_value_info(out.name, out.type.tensor_type.elem_type, [batch, classes]))
        count += 1
    if count:
        checked(model, "train_on_logits")
    return count
