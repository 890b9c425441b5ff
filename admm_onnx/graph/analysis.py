"""Read-only analysis of an ONNX graph: which initializers are prunable weights and which are
trainable parameters.

Contract:
- A *prunable weight* is a float initializer used as the weight operand of Conv,
  ConvTranspose, Gemm (B, either transB) or MatMul (the constant operand, on either side).
  A weight consumed by several nodes (tied weights) is one entry listing every consumer.
  Each entry records its output axis (the filter axis) and input axis, used by structured
  projections.
- A *trainable parameter* is a float initializer with at least one consumer slot that is a
  differentiable parameter slot (weights, biases, normalisation scale/shift, embeddings,
  elementwise tensors with more than one element). Never: BatchNormalization running
  statistics, shape or index tensors, scalar constants (Clip bounds, exponents, epsilons...).
- Nothing here mutates the model.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
import onnx
from onnx import TensorProto

FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}

#: Ops whose weight operand is prunable -> input slots that may hold it.
PRUNABLE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")

#: Parameter slots of ops: an initializer consumed here is trainable (if float).
_PARAM_SLOTS: Dict[str, Tuple[int, ...]] = {
    "Conv": (1, 2),
    "ConvTranspose": (1, 2),
    "Gemm": (0, 1, 2),
    "MatMul": (0, 1),
    "BatchNormalization": (1, 2),
    "InstanceNormalization": (1, 2),
    "LayerNormalization": (1, 2),
    "GroupNormalization": (1, 2),
    "SkipLayerNormalization": (2, 3, 4),
    "PRelu": (1,),
    "Gather": (0,),
}
#: Elementwise ops whose constant operands are parameters when they have more than one element
#: (MatMul + Add biases, layer-scale multipliers, positional embeddings).
_ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Einsum"}


@dataclass(frozen=True)
class WeightInfo:
    """One prunable weight."""

    name: str
    shape: Tuple[int, ...]
    consumers: Tuple[Tuple[str, str], ...]  # (op_type, node name)
    out_axis: int
    in_axis: int

    @property
    def size(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1

    @property
    def op_types(self) -> Tuple[str, ...]:
        return tuple(sorted({op for op, _ in self.consumers}))


@dataclass
class GraphInfo:
    """What the analysis found."""

    prunable: Dict[str, WeightInfo] = field(default_factory=dict)
    trainable: List[str] = field(default_factory=list)
    #: initializer name -> why it is not prunable (for inspect and error messages)
    not_prunable: Dict[str, str] = field(default_factory=dict)
    inputs: List[onnx.ValueInfoProto] = field(default_factory=list)
    outputs: List[onnx.ValueInfoProto] = field(default_factory=list)


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _weight_axes(node: onnx.NodeProto, slot: int, ndim: int) -> Optional[Tuple[int, int]]:
    """(out_axis, in_axis) of the weight at input ``slot`` of ``node``, or None if not a weight."""
    op = node.op_type
    if op == "Conv" and slot == 1 and ndim >= 3:
        return 0, 1
    if op == "ConvTranspose" and slot == 1 and ndim >= 3:
        return 1, 0
    if op == "Gemm" and slot == 1 and ndim == 2:
        return (0, 1) if _attr(node, "transB", 0) else (1, 0)
    if op == "MatMul" and ndim >= 2:
        if slot == 1:  # X @ W, W is (..., in, out)
            return ndim - 1, ndim - 2
        if slot == 0:  # W @ X, W is (..., out, in)
            return ndim - 2, ndim - 1
    return None


def graph_inputs(model: onnx.ModelProto) -> List[onnx.ValueInfoProto]:
    """Real inputs: graph inputs that are not initializers (IR < 4 lists both)."""
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def analyse(model: onnx.ModelProto) -> GraphInfo:
    """Find prunable weights and trainable parameters of ``model``'s main graph."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    info = GraphInfo(inputs=graph_inputs(model), outputs=list(graph.output))
    uses: Dict[str, List[Tuple[onnx.NodeProto, int]]] = defaultdict(list)
    for node in graph.node:
        for slot, name in enumerate(node.input):
            if name in inits:
                uses[name].append((node, slot))
    graph_outputs = {o.name for o in graph.output}

    for name, tensor in inits.items():
        is_float = tensor.data_type in FLOAT_TYPES
        shape = tuple(int(d) for d in tensor.dims)
        size = int(np.prod(shape)) if shape else 1
        consumers = uses.get(name, [])
        if not consumers:
            info.not_prunable[name] = "unused"
            continue
        trainable = False
        if is_float and name not in graph_outputs:
            for node, slot in consumers:
                if slot in _PARAM_SLOTS.get(node.op_type, ()):
                    trainable = trainable or size > 1 or node.op_type == "PRelu"
                elif node.op_type in _ELEMENTWISE and size > 1:
                    trainable = True
        if trainable:
            info.trainable.append(name)

        axes = [(_weight_axes(n, s, len(shape)), n) for n, s in consumers]
        weight_uses = [(a, n) for a, n in axes if a is not None]
        if not is_float:
            info.not_prunable[name] = f"{onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)} tensor"
        elif not weight_uses:
            ops = sorted({n.op_type for n, _ in consumers})
            if set(ops) <= set(PRUNABLE_OPS):
                info.not_prunable[name] = f"a bias or data operand of {', '.join(ops)}, not its weight"
            else:
                info.not_prunable[name] = f"not a Conv/Gemm/MatMul weight (used by {', '.join(ops)})"
        elif len(weight_uses) != len(consumers):
            other = sorted({n.op_type for a, n in axes if a is None})
            info.not_prunable[name] = f"also used outside a weight slot (by {', '.join(other)})"
        elif len({a for a, _ in weight_uses}) != 1:
            info.not_prunable[name] = "consumers disagree on its layout"
        elif not trainable:
            info.not_prunable[name] = "not trainable"
        else:
            (out_axis, in_axis), _ = weight_uses[0]
            info.prunable[name] = WeightInfo(
                name=name,
                shape=shape,
                consumers=tuple((n.op_type, n.name or n.output[0]) for _, n in weight_uses),
                out_axis=out_axis,
                in_axis=in_axis,
            )
    return info


def value_shape(value: onnx.ValueInfoProto) -> List[object]:
    """Shape of a value info: ints for fixed dims, the symbol (or None) for dynamic ones."""
    dims = []
    for d in value.type.tensor_type.shape.dim:
        if d.HasField("dim_value") and d.dim_value > 0:
            dims.append(int(d.dim_value))
        else:
            dims.append(d.dim_param or None)
    return dims
