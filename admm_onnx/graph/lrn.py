"""Rewrite ``LRN`` (local response normalisation) into differentiable standard ops.

Math (the ONNX spec): for X of shape (N, C, D1, ..., Dk),

    square_sum[n, c, ...] = sum_{i = max(0, c - floor((size-1)/2))}^{min(C-1, c + ceil((size-1)/2))} X[n, i, ...]^2
    Y = X / (bias + alpha / size * square_sum) ^ beta

square_sum / size is an average over a channel window of ``size`` that counts the zero padding,
so it is computed as

    S = Reshape(Unsqueeze(X * X, 1), [0, 0, 0, -1])          # (N, 1, C, D1*...*Dk)
    A = AveragePool(S, kernel [size, 1], pads [floor((size-1)/2), 0, ceil((size-1)/2), 0],
                    count_include_pad = 1)                   # square_sum / size
    Y = X / Pow(bias + alpha * Reshape(A, Shape(X)), beta)

Every op used has an ORT training gradient builder (ORT 1.19.2 has none for LRN). The
forward result matches ORT's LRN kernel to float rounding (tested within 1e-5). The scalars
(alpha, bias, beta) are single-element initializers, which analysis never treats as trainable.
"""
from __future__ import annotations

from typing import List

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ._util import NameScope, attr, replace_nodes


def _as_pool(node: onnx.NodeProto, names: NameScope, graph: onnx.GraphProto) -> List[onnx.NodeProto]:
    size = int(attr(node, "size", 1))
    alpha = float(attr(node, "alpha", 1e-4))
    beta = float(attr(node, "beta", 0.75))
    bias = float(attr(node, "bias", 1.0))
    x, y = node.input[0], node.output[0]
    base = node.name or y
    n = lambda what: names(f"{base}/{what}")  # noqa: E731
    consts = {
        "axes": np.array([1], np.int64),
        "flat": np.array([0, 0, 0, -1], np.int64),
        "alpha": np.array(alpha, np.float32),
        "bias": np.array(bias, np.float32),
        "beta": np.array(beta, np.float32),
    }
    c = {k: n(k) for k in consts}
    for k, v in consts.items():
        graph.initializer.append(numpy_helper.from_array(v, c[k]))
    sq, unsq, flat, avg, shape, back, scaled, denom_in, denom = (
        n(k) for k in ("sq", "unsq", "flat_sq", "avg", "shape", "avg_nd", "scaled", "base", "denom")
    )
    return [
        helper.make_node("Mul", [x, x], [sq], name=n("Square")),
        helper.make_node("Unsqueeze", [sq, c["axes"]], [unsq], name=n("Unsqueeze")),
        helper.make_node("Reshape", [unsq, c["flat"]], [flat], name=n("Flatten")),
        helper.make_node(
            "AveragePool", [flat], [avg], name=n("WindowMean"),
            kernel_shape=[size, 1], pads=[(size - 1) // 2, 0, size // 2, 0], count_include_pad=1,
        ),
        helper.make_node("Shape", [x], [shape], name=n("Shape")),
        helper.make_node("Reshape", [avg, shape], [back], name=n("Restore")),
        helper.make_node("Mul", [back, c["alpha"]], [scaled], name=n("Alpha")),
        helper.make_node("Add", [scaled, c["bias"]], [denom_in], name=n("Bias")),
        helper.make_node("Pow", [denom_in, c["beta"]], [denom], name=n("Pow")),
        helper.make_node("Div", [x, denom], [y], name=n("Div")),
    ]


def lrn_to_pool(model: onnx.ModelProto) -> int:
    """Rewrite every default-domain ``LRN`` in the main graph in place; returns how many."""
    return replace_nodes(model, "LRN", _as_pool, "lrn_to_pool")
