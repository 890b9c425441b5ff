"""Rewrite ``Pad`` in ``reflect``, ``edge`` or ``wrap`` mode (image-to-image generators,
style transfer, super-resolution: ``nn.ReflectionPad2d``, ``nn.ReplicationPad2d``, circular
padding) into Gathers, which ORT training 1.19.2 can differentiate ("Pad gradient currently
supports constant mode only").

Math: along one axis of static size n with pads (b, e), every mode is an index map from the
b + n + e output positions to input positions: ``edge`` clamps ``i - b`` into [0, n-1],
``reflect`` mirrors it about both ends without repeating the edge, ``wrap`` takes it modulo n.
So the padded tensor is ``Gather(x, indices, axis)`` per padded axis (GatherGrad scatters the
gradient back, summing repeated indices). Negative pads (cropping) work the same way. The
pads (and axes, opset 18+) must be constants and the padded axes' sizes static; checked
against the node on a random input and kept only if they agree; otherwise the node is left
alone (and the training graph build names it). The user's graph is never rewritten.
"""
from __future__ import annotations

import logging
from typing import Dict, List, Optional

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ._util import attr, constant_values, is_default_domain, opset_version, probe_agrees, probe_passes, replace_nodes
from .shapes import tensor_info

log = logging.getLogger(__name__)

_TOLERANCE = 1e-5


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else (value or "constant")


def _index(mode: str, n: int, before: int, after: int) -> Optional[np.ndarray]:
    i = np.arange(-before, n + after)
    if mode == "edge":
        return np.clip(i, 0, n - 1)
    if mode == "wrap":
        return np.mod(i, n)
    if mode == "reflect":
        if n == 1:
            return np.zeros_like(i)
        if before >= n or after >= n:
            return None
        period = 2 * (n - 1)
        j = np.mod(i, period)
        return np.where(j < n, j, period - j)
    return None


def _pads(node: onnx.NodeProto, rank: int, opset: int, consts: Dict[str, np.ndarray]) -> Optional[Dict[int, tuple]]:
    if opset < 11:
        pads = attr(node, "pads")
        axes = list(range(rank))
    else:
        if len(node.input) < 2 or node.input[1] not in consts:
            return None
        pads = [int(v) for v in consts[node.input[1]].ravel()]
        axes = list(range(rank))
        if len(node.input) > 3 and node.input[3]:
            if node.input[3] not in consts:
                return None
            axes = [int(a) % rank for a in consts[node.input[3]].ravel()]
    if pads is None or len(pads) != 2 * len(axes):
        return None
    k = len(axes)
    return {a: (int(pads[j]), int(pads[k + j])) for j, a in enumerate(axes) if pads[j] or pads[k + j]}


def _nodes(node, shape, per_axis, mode, names) -> Optional[List[onnx.NodeProto]]:
    base = node.name or node.output[0]
    nodes, cur = [], node.input[0]
    axes = sorted(per_axis)
    for k, a in enumerate(axes):
        n = shape[a]
        if not isinstance(n, int) or n <= 0:
            return None
        idx = _index(mode, n, *per_axis[a])
        if idx is None:
            return None
        const, out = names(f"{base}/index{a}"), node.output[0] if k == len(axes) - 1 else names(f"{base}/axis{a}")
        nodes += [helper.make_node("Constant", [], [const], name=names(f"{base}/Index{a}"),
                                   value=numpy_helper.from_array(idx.astype(np.int64), const)),
                  helper.make_node("Gather", [cur, const], [out], name=names(f"{base}/Gather{a}"), axis=a)]
        cur = out
    if not nodes:
        nodes = [helper.make_node("Identity", [cur], [node.output[0]], name=names(f"{base}/Identity"))]
    return nodes


def _agrees(node, nodes, shape, elem, opset, consts) -> bool:
    dims = [2] + [d if isinstance(d, int) and d > 0 else 3 for d in shape[1:]]
    x = np.random.default_rng(0).standard_normal(dims).astype(helper.tensor_dtype_to_np_dtype(elem))
    inits = [numpy_helper.from_array(consts[i], i) for i in node.input[1:] if i and i in consts]
    return probe_agrees(node, nodes, x, elem, opset, inits, _TOLERANCE)


def pad_modes_to_gather(model: onnx.ModelProto) -> int:
    """Rewrite every applicable reflect/edge/wrap Pad of the main graph in place."""
    graph = model.graph
    if not any(is_default_domain(n, "Pad") and _text(attr(n, "mode")) != "constant" for n in graph.node):
        return 0
    shapes, types = tensor_info(model)
    opset = opset_version(model)
    consts = constant_values(graph, max_size=64)

    def expand(node, names, _graph) -> Optional[List[onnx.NodeProto]]:
        mode = _text(attr(node, "mode"))
        shape = shapes.get(node.input[0])
        elem = types.get(node.input[0]) or onnx.TensorProto.FLOAT
        if mode == "constant" or not (shape and elem in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE)):
            return None
        per_axis = _pads(node, len(shape), opset, consts)
        made = _nodes(node, shape, per_axis, mode, names) if per_axis is not None else None
        if made is None:
            return None
        return made if probe_passes(lambda: _agrees(node, made, shape, elem, opset, consts), node, log) else None

    return replace_nodes(model, "Pad", expand, "pad_modes_to_gather")
