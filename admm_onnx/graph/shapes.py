"""Static shapes of every tensor of a graph, inferred without copying the weights.

Contract: :func:`tensor_shapes` runs ONNX shape inference (with data propagation, so Reshape
targets held in small int64 initializers are followed) on a light copy of the model in which
every initializer of more than :data:`KEEP_ELEMENTS` elements becomes a graph input of the same
type and shape. The result maps tensor name -> list of dims (int, symbol string or None)
(and, from :func:`tensor_info`, name -> element type); tensors inference could not type are
missing. Inference errors are swallowed: callers treat
unknown shapes conservatively. Nothing is mutated.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np
import onnx
from onnx import helper

#: Initializers up to this many elements keep their values (shape tensors, axes, scalars).
KEEP_ELEMENTS = 64


def _dims(value: onnx.ValueInfoProto) -> List[object]:
    t = value.type.tensor_type
    if not t.HasField("shape"):
        return None
    out = []
    for d in t.shape.dim:
        if d.HasField("dim_value"):
            out.append(int(d.dim_value))
        else:
            out.append(d.dim_param or None)
    return out


def light_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with its large initializers turned into typed graph inputs (no weight data)."""
    light = onnx.ModelProto()
    light.ir_version = max(model.ir_version, 4)
    light.opset_import.extend(model.opset_import)
    g = light.graph
    g.name = model.graph.name
    g.node.extend(model.graph.node)
    g.output.extend(model.graph.output)
    g.value_info.extend(model.graph.value_info)
    inits = {t.name for t in model.graph.initializer}
    g.input.extend(i for i in model.graph.input if i.name not in inits)
    for t in model.graph.initializer:
        if int(np.prod(t.dims)) <= KEEP_ELEMENTS and t.data_location != onnx.TensorProto.EXTERNAL:
            g.initializer.append(t)
        else:
            g.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    light.functions.extend(model.functions)
    return light


def tensor_info(model: onnx.ModelProto) -> Tuple[Dict[str, List[object]], Dict[str, int]]:
    """(tensor name -> inferred shape, tensor name -> element type) for graph inputs, outputs,
    initializers and node outputs that inference could type."""
    light = light_copy(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(light, data_prop=True)
    except Exception:  # inference is best effort here
        inferred = light
    shapes: Dict[str, List[object]] = {}
    types: Dict[str, int] = {}
    for t in model.graph.initializer:
        shapes[t.name] = [int(d) for d in t.dims]
        types[t.name] = t.data_type
    for v in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
        if v.type.tensor_type.elem_type and v.name not in types:
            types[v.name] = v.type.tensor_type.elem_type
        dims = _dims(v)
        if dims is not None and v.name not in shapes:
            shapes[v.name] = dims
    return shapes, types


def tensor_shapes(model: onnx.ModelProto) -> Dict[str, List[object]]:
    """Tensor name -> inferred shape (see :func:`tensor_info`)."""
    return tensor_info(model)[0]
