"""Rewrite ``AveragePool`` (DenseNet transitions, Inception branches, ResNet-D shortcuts) into
a depthwise ``Conv`` with a constant kernel, which ORT training 1.19.2 can differentiate.

Why: ORT 1.19.2's CPU ``AveragePoolGrad`` kernel kills the process with SIGFPE (an integer
division by zero) on the first training step, for every AveragePool tried (kernel 2 or 3,
stride 1 or 2, with or without pads, count_include_pad 0 or 1, opset 11, 17 and 19): a
DenseNet-121 export crashes the training session with no Python error at all.

Math: ``AveragePool(x)`` with kernel k, strides, pads and ``count_include_pad = 1`` is
``Conv(x, K, group=C)`` with the same strides and pads and ``K[c, 0] = 1 / prod(k)`` (zero
padding counted in every window). With ``count_include_pad = 0`` a window that overlaps the
padding averages only its real elements: ``Conv(x, ones) / counts`` where ``counts`` is that
same sum over an all-ones input, a constant map computed here (it needs the static spatial
size). The kernel and the counts are Constant nodes (never initializers), so analysis never
trains or prunes them. The rewrite is checked against the node on a random input (1e-4
relative) and kept only if they agree. Left alone: ``ceil_mode = 1`` (partial windows at the
end), ``auto_pad`` other than NOTSET, dilations other than 1, an unknown channel count (or
spatial size, with count_include_pad = 0 and pads). The user's graph is never rewritten.
"""
from __future__ import annotations

import logging
from typing import List, Optional

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ._util import (NameScope, attr, auto_pad, is_default_domain, opset_version, probe_agrees, probe_passes,
                    replace_nodes)
from .shapes import tensor_info

log = logging.getLogger(__name__)

_TOLERANCE = 1e-4


def _counts(shape, kernel, strides, pads) -> np.ndarray:
    """Real (non-pad) elements in each output window, (1, 1, *out) float32."""
    nsp = len(kernel)
    per_axis = []
    for i in range(nsp):
        n, k, s, b, e = shape[2 + i], kernel[i], strides[i], pads[i], pads[nsp + i]
        out = (n + b + e - k) // s + 1
        starts = np.arange(out) * s - b
        per_axis.append(np.clip(starts + k, 0, n) - np.clip(starts, 0, n))
    grid = per_axis[0].astype(np.float64)
    for c in per_axis[1:]:
        grid = np.multiply.outer(grid, c)
    return grid.reshape((1, 1) + grid.shape).astype(np.float32)


def _nodes(node: onnx.NodeProto, shape, names: NameScope, dtype) -> Optional[List[onnx.NodeProto]]:
    rank = len(shape) if shape else 0
    if rank < 3 or not isinstance(shape[1], int) or shape[1] <= 0:
        return None
    if attr(node, "ceil_mode", 0) or auto_pad(node) != "NOTSET":
        return None
    kernel = list(attr(node, "kernel_shape"))
    nsp = len(kernel)
    if any(d != 1 for d in (attr(node, "dilations") or [1] * nsp)):
        return None
    strides = list(attr(node, "strides") or [1] * nsp)
    pads = list(attr(node, "pads") or [0] * (2 * nsp))
    channels = shape[1]
    base = node.name or node.output[0]
    weight = names(f"{base}/kernel")
    value = np.full((channels, 1, *kernel), 1.0 / float(np.prod(kernel)), dtype)
    nodes = [helper.make_node("Constant", [], [weight], name=names(f"{base}/Kernel"),
                              value=numpy_helper.from_array(value, weight))]
    conv = dict(group=channels, kernel_shape=kernel, strides=strides, pads=pads)
    if attr(node, "count_include_pad", 0) or not any(pads):
        nodes.append(helper.make_node("Conv", [node.input[0], weight], [node.output[0]], name=names(f"{base}/Conv"),
                                      **conv))
        return nodes
    if any(not isinstance(d, int) or d <= 0 for d in shape[2:]):
        return None
    counts = _counts(shape, kernel, strides, pads) / float(np.prod(kernel))
    summed, scale = names(f"{base}/window_mean"), names(f"{base}/counts")
    nodes += [
        helper.make_node("Conv", [node.input[0], weight], [summed], name=names(f"{base}/Conv"), **conv),
        helper.make_node("Constant", [], [scale], name=names(f"{base}/Counts"),
                         value=numpy_helper.from_array(counts.astype(dtype), scale)),
        helper.make_node("Div", [summed, scale], [node.output[0]], name=names(f"{base}/Div")),
    ]
    return nodes


def _agrees(node: onnx.NodeProto, nodes: List[onnx.NodeProto], shape, elem: int, opset: int) -> bool:
    dims = [2] + [d if isinstance(d, int) and d > 0 else 7 for d in shape[1:]]
    x = np.random.default_rng(0).standard_normal(dims).astype(helper.tensor_dtype_to_np_dtype(elem))
    return probe_agrees(node, nodes, x, elem, opset, tolerance=_TOLERANCE)


def avgpool_to_conv(model: onnx.ModelProto) -> int:
    """Rewrite every applicable default-domain AveragePool of the main graph in place."""
    graph = model.graph
    if not any(is_default_domain(n, "AveragePool") for n in graph.node):
        return 0
    shapes, types = tensor_info(model)
    opset = opset_version(model)

    def expand(node, names, _graph) -> Optional[List[onnx.NodeProto]]:
        elem = types.get(node.input[0]) or onnx.TensorProto.FLOAT
        shape = shapes.get(node.input[0])
        if not (elem in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE) and shape):
            return None
        nodes = _nodes(node, shape, names, helper.tensor_dtype_to_np_dtype(elem))
        if nodes is None:
            return None
        return nodes if probe_passes(lambda: _agrees(node, nodes, shape, elem, opset), node, log) else None

    return replace_nodes(model, "AveragePool", expand, "avgpool_to_conv")
