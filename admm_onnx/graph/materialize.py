"""Turn weights computed by ``ConstantOfShape`` nodes into random initializers.

Contract: the ONNX model zoo's "light" models (``onnx/backend/test/data/light/``) replace every
float initializer by ``ConstantOfShape(shape)`` with one constant value, so they carry the
architecture without the weights. :func:`materialize_weights` returns a copy in which each
such node whose shape is a constant int64 initializer becomes an initializer of that shape
and the node's output name, holding seeded random values:

- the weight operand of Conv, ConvTranspose, Gemm or MatMul: He-normal,
  N(0, 2 / fan_in), fan_in being the number of inputs one output sums over
  (Conv: C_in/group * prod(kernel); Gemm: the contracted dimension);
- a BatchNormalization scale or variance, or a Mul/Div operand: 1 (found through
  Unsqueeze/Reshape/Squeeze/Flatten/Identity chains);
- anything else (biases, BN shift and mean, Add operands): 0.

The shape initializers become unused and are removed. IR < 4 requires every initializer to be
listed in ``graph.input``: the new ones are listed there as well, so the copy keeps the
original IR and opset (upgrading is :mod:`admm_onnx.graph.opset`'s job). Everything else is
unchanged; the copy is checked.

:func:`resize_input` changes the spatial size of a model's image input where the architecture
allows it (all shapes still infer and the outputs keep their shapes), to make tests cheaper.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import ModelError
from ._util import checked

#: Ops that only move or reshape data: a constant is followed through them to its real use.
_PASS_THROUGH = {"Unsqueeze", "Reshape", "Squeeze", "Flatten", "Identity", "Transpose", "Cast"}


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _final_uses(graph: onnx.GraphProto, name: str) -> List[Tuple[onnx.NodeProto, int]]:
    """(node, slot) pairs that consume ``name``, looking through shape-only ops."""
    consumers: Dict[str, List[Tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for slot, inp in enumerate(node.input):
            consumers.setdefault(inp, []).append((node, slot))
    out, todo, seen = [], [name], set()
    while todo:
        cur = todo.pop()
        if cur in seen:
            continue
        seen.add(cur)
        for node, slot in consumers.get(cur, []):
            if node.op_type in _PASS_THROUGH and slot == 0:
                todo.extend(node.output)
            else:
                out.append((node, slot))
    return out


def _fan_in(node: onnx.NodeProto, slot: int, shape: Tuple[int, ...]) -> Optional[int]:
    """Fan-in if ``shape`` is the weight operand of ``node`` at ``slot``, else None."""
    op = node.op_type
    if op == "Conv" and slot == 1 and len(shape) >= 3:
        return int(np.prod(shape[1:]))
    if op == "ConvTranspose" and slot == 1 and len(shape) >= 3:
        return int(shape[0] // max(1, _attr(node, "group", 1)) * np.prod(shape[2:]))
    if op == "Gemm" and slot == 1 and len(shape) == 2:
        return int(shape[1] if _attr(node, "transB", 0) else shape[0])
    if op == "Gemm" and slot == 0 and len(shape) == 2:
        return int(shape[0] if _attr(node, "transA", 0) else shape[1])
    if op == "MatMul" and len(shape) >= 2:
        return int(shape[-2] if slot == 1 else shape[-1])
    return None


def _values(graph, name: str, shape: Tuple[int, ...], dtype, rng: np.random.Generator) -> np.ndarray:
    for node, slot in _final_uses(graph, name):
        fan_in = _fan_in(node, slot, shape)
        if fan_in:
            return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(dtype)
    for node, slot in _final_uses(graph, name):
        if (node.op_type == "BatchNormalization" and slot in (1, 4)) or node.op_type in ("Mul", "Div"):
            return np.ones(shape, dtype)
    return np.zeros(shape, dtype)


def materialize_weights(model: onnx.ModelProto, seed: int = 0) -> onnx.ModelProto:
    """A copy of ``model`` with ``ConstantOfShape`` weights replaced by random initializers.

    Only nodes whose shape input is a constant initializer and whose value is a float tensor
    are replaced; returns the copy (``model`` is not modified).
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    inits = {t.name: t for t in graph.initializer}
    rng = np.random.default_rng(seed)
    replaced, new_inits = [], []
    for node in graph.node:
        if node.op_type != "ConstantOfShape" or node.domain not in ("", "ai.onnx"):
            continue
        if not node.input or node.input[0] not in inits:
            continue
        value = _attr(node, "value")
        elem = value.data_type if value is not None else TensorProto.FLOAT
        if elem not in (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16):
            continue
        shape = tuple(int(d) for d in numpy_helper.to_array(inits[node.input[0]]).ravel())
        dtype = helper.tensor_dtype_to_np_dtype(elem)
        new_inits.append(numpy_helper.from_array(_values(graph, node.output[0], shape, dtype, rng), node.output[0]))
        replaced.append(node)
    if not replaced:
        return out
    for node in replaced:
        graph.node.remove(node)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    dead = {n.input[0] for n in replaced if n.input[0] not in used}
    keep = [t for t in graph.initializer if t.name not in dead]
    del graph.initializer[:]
    graph.initializer.extend(keep + new_inits)
    listed = [i for i in graph.input if i.name not in dead]
    if out.ir_version < 4:
        listed += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in new_inits]
    del graph.input[:]
    graph.input.extend(listed)
    new_names = {t.name for t in new_inits}
    keep_vi = [v for v in graph.value_info if v.name not in new_names]
    del graph.value_info[:]
    graph.value_info.extend(keep_vi)
    return checked(out, "materialize_weights")


def resize_input(model: onnx.ModelProto, size: Sequence[int], input_name: Optional[str] = None) -> onnx.ModelProto:
    """A copy of ``model`` whose image input takes spatial size ``size`` (e.g. ``(64, 64)``).

    Allowed only where the architecture allows it: strict shape inference must succeed at the
    new size and every graph output must keep its shape (a baked-in Reshape constant or a
    fixed-size pooling window that no longer fits makes this raise a ModelError).
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    inits = {t.name for t in graph.initializer}
    real = [i for i in graph.input if i.name not in inits]
    target = next((i for i in real if i.name == input_name), None) if input_name else (real[0] if real else None)
    if target is None:
        raise ModelError(f"no input {input_name!r} to resize")
    dims = target.type.tensor_type.shape.dim
    if len(dims) != 2 + len(size):
        raise ModelError(f"input {target.name!r} has {len(dims)} dims; cannot give it spatial size {tuple(size)}")
    for d, s in zip(dims[2:], size):
        d.Clear()
        d.dim_value = int(s)
    before = {o.name: [d.dim_value or d.dim_param for d in o.type.tensor_type.shape.dim] for o in graph.output}
    del graph.value_info[:]
    try:
        inferred = onnx.shape_inference.infer_shapes(out, check_type=True, strict_mode=True)
    except Exception as exc:  # onnx raises InferenceError and friends
        raise ModelError(f"the architecture does not allow input size {tuple(size)}: {str(exc).splitlines()[0]}") from exc
    for o in inferred.graph.output:
        after = [d.dim_value or d.dim_param for d in o.type.tensor_type.shape.dim]
        if after != before[o.name]:
            raise ModelError(f"input size {tuple(size)} changes output {o.name!r} from {before[o.name]} to {after}")
    return checked(out, "resize_input")
