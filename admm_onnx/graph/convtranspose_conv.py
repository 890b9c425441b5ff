"""Rewrite ``ConvTranspose`` (U-Net and FCN decoders, GAN generators) into a ``Conv`` that ORT
training 1.19.2 can differentiate on the CPU.

Why: ORT 1.19.2 has a gradient builder for ConvTranspose but its ``ConvTransposeGrad`` kernel
exists only for CUDA: a CPU training session refuses to start ("Could not find an
implementation for ConvTransposeGrad(1)").

Math, per spatial axis (input length H, kernel k, stride s, dilation d, pads b/e, output
padding p): a transposed convolution is the correlation, with the spatially flipped kernel
whose in/out channel axes are swapped, of the input with s-1 zeros inserted between samples and
``d(k-1)-b`` / ``d(k-1)-e+p`` zeros added before/after (negative: cropped). Flipping the kernel
is avoided by flipping the activations instead, ``corr(x, flip(K)) = flip(corr(flip(x), K))``,
so the weight is only transposed and stays a plain, prunable Conv weight:

    y = Flip( Conv( M_1 x_1 M_2 ... , Transpose(W, [1, 0, 2, ...]), B, dilations=d ) )

with ``M`` the constant (flip o pad o zero-insert) matrix of each axis and ``Flip`` a MatMul
with the anti-identity, both applied along their axis by graph/resize_matmul.along_axis
(Constant matrices, never trained). The weight keeps its name, its stored layout
(in, out, k...) and its axes for structured pruning (output channel = stored axis 1). The
rewrite is checked against the node on a random input (1e-4 relative) and kept only if they
agree. Left alone (the differentiability check then names the node): ``group`` > 1,
``output_shape`` or ``auto_pad`` other than NOTSET, a non-static non-batch input shape, a
weight that is not an initializer. The user's graph is never rewritten.
"""
from __future__ import annotations

import logging
from typing import List, Optional

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ._util import (NameScope, attr, auto_pad, is_default_domain, opset_version, probe_agrees, probe_passes,
                    replace_nodes)
from .resize_matmul import along_axis
from .shapes import tensor_info

log = logging.getLogger(__name__)

_TOLERANCE = 1e-4


def _plan(node: onnx.NodeProto, shape, weight: np.ndarray):
    """Per spatial axis (input matrix, output flip matrix), or None if the node is left alone."""
    rank = len(shape)
    if rank < 3 or any(not isinstance(d, int) or d <= 0 for d in shape[1:]) or weight.ndim != rank:
        return None
    if attr(node, "group", 1) != 1 or attr(node, "output_shape") is not None or auto_pad(node) != "NOTSET":
        return None
    nsp = rank - 2
    kernel = list(weight.shape[2:])
    strides = list(attr(node, "strides", [1] * nsp))
    dilations = list(attr(node, "dilations", [1] * nsp))
    pads = list(attr(node, "pads", [0] * (2 * nsp)))
    out_pad = list(attr(node, "output_padding", [0] * nsp))
    mats = []
    for i in range(nsp):
        h, k, s, d = shape[2 + i], kernel[i], strides[i], dilations[i]
        before = d * (k - 1) - pads[i]
        after = d * (k - 1) - pads[nsp + i] + out_pad[i]
        length = s * (h - 1) + 1 + before + after
        out_len = length - d * (k - 1)
        if out_len < 1:
            return None
        m = np.zeros((length, h), weight.dtype)
        for j in range(h):
            r = before + s * j
            if 0 <= r < length:
                m[length - 1 - r, j] = 1  # flipped
        mats.append((m, np.eye(out_len, dtype=weight.dtype)[::-1].copy()))
    return mats


def _nodes(node: onnx.NodeProto, mats, rank: int, names: NameScope, out: Optional[str] = None) -> List[onnx.NodeProto]:
    base = node.name or node.output[0]
    nodes, cur = [], node.input[0]
    for i, (m, _) in enumerate(mats):
        nxt = names(f"{base}/prepared{i}")
        nodes += along_axis(cur, m, 2 + i, rank, nxt, names, f"{base}/in")
        cur = nxt
    swapped = names(f"{base}/weight_as_conv")
    nodes.append(helper.make_node("Transpose", [node.input[1]], [swapped], name=names(f"{base}/TransposeWeight"),
                                  perm=[1, 0] + list(range(2, rank))))
    conv_out = names(f"{base}/flipped")
    conv_inputs = [cur, swapped] + ([node.input[2]] if len(node.input) > 2 and node.input[2] else [])
    dilations = attr(node, "dilations")
    kw = {"dilations": list(dilations)} if dilations else {}
    nodes.append(helper.make_node("Conv", conv_inputs, [conv_out], name=names(f"{base}/Conv"), **kw))
    cur = conv_out
    final = out or node.output[0]
    for i, (_, flip) in enumerate(mats):
        nxt = final if i == len(mats) - 1 else names(f"{base}/unflipped{i}")
        nodes += along_axis(cur, flip, 2 + i, rank, nxt, names, f"{base}/out")
        cur = nxt
    return nodes


def _agrees(node: onnx.NodeProto, mats, shape, weight: np.ndarray, bias: Optional[np.ndarray], opset: int) -> bool:
    """Run the node and its replacement on a random input; do they agree?"""
    rank = len(shape)
    elem = helper.np_dtype_to_tensor_dtype(weight.dtype)
    x = np.random.default_rng(0).standard_normal([2] + list(shape[1:])).astype(weight.dtype)
    inits = [numpy_helper.from_array(weight, node.input[1])]
    if bias is not None:
        inits.append(numpy_helper.from_array(bias, node.input[2]))
    replacement = _nodes(node, mats, rank, NameScope(onnx.GraphProto()))
    return probe_agrees(node, replacement, x, elem, max(opset, 13), inits, _TOLERANCE)


def convtranspose_to_conv(model: onnx.ModelProto) -> int:
    """Rewrite every applicable default-domain ConvTranspose of the main graph in place."""
    graph = model.graph
    if not any(is_default_domain(n, "ConvTranspose") for n in graph.node):
        return 0
    shapes, _ = tensor_info(model)
    inits = {t.name: t for t in graph.initializer}
    opset = opset_version(model)

    def expand(node, names, _graph) -> Optional[List[onnx.NodeProto]]:
        if node.input[1] not in inits:
            return None
        weight = numpy_helper.to_array(inits[node.input[1]])
        bias = None
        if len(node.input) > 2 and node.input[2]:
            bias = numpy_helper.to_array(inits[node.input[2]]) if node.input[2] in inits else None
        shape = shapes.get(node.input[0])
        mats = _plan(node, shape, weight) if shape and weight.dtype in (np.float32, np.float64) else None
        if mats is None or not (len(node.input) <= 2 or not node.input[2] or bias is not None):
            return None
        if not probe_passes(lambda: _agrees(node, mats, shape, weight, bias, opset), node, log):
            return None
        return _nodes(node, mats, len(shape), names)

    return replace_nodes(model, "ConvTranspose", expand, "convtranspose_to_conv")
