"""Rewrite ``InstanceNormalization`` into ReduceMean/Sub/Mul/Sqrt/Div/Add, which ORT training
1.19.2 can differentiate (it has no gradient builder for InstanceNormalization).

Both torch exporters write ``nn.GroupNorm`` as Reshape -> InstanceNormalization -> Reshape ->
Mul -> Add and ``nn.InstanceNorm2d`` as InstanceNormalization (detection heads such as FCOS
and RetinaNet, style-transfer and diffusion U-Nets), so without this rewrite none of them
trains.

Math (the ONNX spec): over the spatial axes 2..r-1 of each (sample, channel),

    y = scale[c] * (x - mean) / sqrt(var + epsilon) + B[c],   var = mean((x - mean)^2)

``scale`` and ``B`` (C,) are read through a Reshape to (C, 1, ..., 1): they stay the same
trainable parameters. Checked against the node on a random input (1e-4 relative) and kept only
if they agree. Needs the input's rank; left alone otherwise (the differentiability check then
names the node). The user's graph is never rewritten.
"""
from __future__ import annotations

import logging
from typing import List, Optional

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ._util import (NameScope, attr, constant_values, is_default_domain, opset_version, probe_agrees,
                    probe_passes, replace_nodes)
from .shapes import tensor_info

log = logging.getLogger(__name__)

_TOLERANCE = 1e-4


def _nodes(node: onnx.NodeProto, rank: int, opset: int, names: NameScope, dtype) -> List[onnx.NodeProto]:
    x, scale, bias = node.input[0], node.input[1], node.input[2]
    y = node.output[0]
    base = node.name or y
    axes = list(range(2, rank))
    nodes: List[onnx.NodeProto] = []
    consts = {}

    def const(key: str, value: np.ndarray) -> str:
        if key not in consts:
            name = names(f"{base}/{key}")
            nodes.append(helper.make_node("Constant", [], [name], name=names(f"{base}/Constant_{key}"),
                                          value=numpy_helper.from_array(value, name)))
            consts[key] = name
        return consts[key]

    def reduce_mean(src: str, out: str) -> onnx.NodeProto:
        if opset >= 18:
            return helper.make_node("ReduceMean", [src, const("axes", np.array(axes, np.int64))], [out],
                                    name=names(f"{base}/ReduceMean"), keepdims=1)
        return helper.make_node("ReduceMean", [src], [out], name=names(f"{base}/ReduceMean"), axes=axes, keepdims=1)

    mean, diff, sq, var = (names(f"{base}/{k}") for k in ("mean", "centered", "squared", "var"))
    shifted, std, normed = names(f"{base}/var_eps"), names(f"{base}/std"), names(f"{base}/normalized")
    scale_c, bias_c, scaled = names(f"{base}/scale_c"), names(f"{base}/bias_c"), names(f"{base}/scaled")
    eps = const("epsilon", np.array(attr(node, "epsilon", 1e-5), dtype))
    per_channel = const("per_channel", np.array([-1] + [1] * (rank - 2), np.int64))
    nodes += [
        reduce_mean(x, mean),
        helper.make_node("Sub", [x, mean], [diff], name=names(f"{base}/Sub")),
        helper.make_node("Mul", [diff, diff], [sq], name=names(f"{base}/Square")),
        reduce_mean(sq, var),
        helper.make_node("Add", [var, eps], [shifted], name=names(f"{base}/AddEps")),
        helper.make_node("Sqrt", [shifted], [std], name=names(f"{base}/Sqrt")),
        helper.make_node("Div", [diff, std], [normed], name=names(f"{base}/Div")),
        helper.make_node("Reshape", [scale, per_channel], [scale_c], name=names(f"{base}/ScaleShape")),
        helper.make_node("Reshape", [bias, per_channel], [bias_c], name=names(f"{base}/BiasShape")),
        helper.make_node("Mul", [normed, scale_c], [scaled], name=names(f"{base}/Scale")),
        helper.make_node("Add", [scaled, bias_c], [y], name=names(f"{base}/Bias")),
    ]
    return nodes


def _agrees(node, nodes, shape, elem, opset, values) -> bool:
    dims = [2] + [d if isinstance(d, int) and d > 0 else 5 for d in shape[1:]]
    if not (isinstance(shape[1], int) and shape[1] > 0) and values.get(node.input[1]) is not None:
        dims[1] = int(np.asarray(values[node.input[1]]).size)
    channels = dims[1]
    dtype = helper.tensor_dtype_to_np_dtype(elem)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(dims).astype(dtype)
    inits = []
    for name in node.input[1:3]:
        value = values.get(name)
        if value is None:
            value = rng.standard_normal(channels).astype(dtype)
        inits.append(numpy_helper.from_array(np.asarray(value, dtype).reshape(-1), name))
    return probe_agrees(node, nodes, x, elem, opset, inits, _TOLERANCE)


def instancenorm_to_reductions(model: onnx.ModelProto) -> int:
    """Rewrite every applicable default-domain InstanceNormalization of the main graph in place."""
    graph = model.graph
    if not any(is_default_domain(n, "InstanceNormalization") for n in graph.node):
        return 0
    shapes, types = tensor_info(model)
    opset = opset_version(model)
    values = constant_values(graph)

    def expand(node, names, _graph) -> Optional[List[onnx.NodeProto]]:
        shape = shapes.get(node.input[0])
        elem = types.get(node.input[0]) or onnx.TensorProto.FLOAT
        if not (shape and len(shape) >= 3 and elem in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE)):
            return None
        made = _nodes(node, len(shape), opset, names, helper.tensor_dtype_to_np_dtype(elem))
        return made if probe_passes(lambda: _agrees(node, made, shape, elem, opset, values), node, log) else None

    return replace_nodes(model, "InstanceNormalization", expand, "instancenorm_to_reductions")
