"""Rewrite ``HardSigmoid`` and ``HardSwish`` (MobileNetV3 and friends) into ops ORT training
can differentiate (1.19.2 has no gradient builder for either).

Math (the ONNX spec):

    HardSigmoid(x; alpha, beta) = max(0, min(1, alpha * x + beta))   (defaults 0.2, 0.5)
                                = Clip(Add(Mul(x, alpha), beta), 0, 1)
    HardSwish(x)                = x * max(0, min(1, x / 6 + 1 / 2))
                                = Div(Mul(x, Clip(Add(x, 3), 0, 6)), 6)

The second form of HardSwish is PyTorch's definition (``x * relu6(x + 3) / 6``); it equals the
spec's to float rounding (tested within 1e-6 of ORT's kernels). Clip, Add, Mul and Div have
gradient builders; Clip's gradient is zero outside its bounds, as the original's. The
constants are 0-d initializers of the input's type, which analysis never trains.
"""
from __future__ import annotations

from typing import List

import onnx
from onnx import helper

from ._util import NameScope, attr, float_type, replace_nodes, scalar
from .shapes import tensor_info


def hard_activations(model: onnx.ModelProto) -> int:
    """Rewrite every default-domain HardSigmoid and HardSwish in place; returns how many."""
    ops = {n.op_type for n in model.graph.node if n.domain in ("", "ai.onnx")}
    if not ops & {"HardSigmoid", "HardSwish"}:
        return 0
    _, types = tensor_info(model)

    def hard_sigmoid(node: onnx.NodeProto, names: NameScope, graph: onnx.GraphProto) -> List[onnx.NodeProto]:
        x, y = node.input[0], node.output[0]
        base = node.name or y
        t = float_type(types, x)
        alpha = scalar(graph, names, f"{base}/alpha", float(attr(node, "alpha", 0.2)), t)
        beta = scalar(graph, names, f"{base}/beta", float(attr(node, "beta", 0.5)), t)
        lo, hi = scalar(graph, names, f"{base}/zero", 0.0, t), scalar(graph, names, f"{base}/one", 1.0, t)
        scaled, shifted = names(f"{base}/scaled"), names(f"{base}/shifted")
        return [
            helper.make_node("Mul", [x, alpha], [scaled], name=names(f"{base}/Mul")),
            helper.make_node("Add", [scaled, beta], [shifted], name=names(f"{base}/Add")),
            helper.make_node("Clip", [shifted, lo, hi], [y], name=names(f"{base}/Clip")),
        ]

    def hard_swish(node: onnx.NodeProto, names: NameScope, graph: onnx.GraphProto) -> List[onnx.NodeProto]:
        x, y = node.input[0], node.output[0]
        base = node.name or y
        t = float_type(types, x)
        three = scalar(graph, names, f"{base}/three", 3.0, t)
        lo, six = scalar(graph, names, f"{base}/zero", 0.0, t), scalar(graph, names, f"{base}/six", 6.0, t)
        shifted, gate, prod = names(f"{base}/shifted"), names(f"{base}/relu6"), names(f"{base}/prod")
        return [
            helper.make_node("Add", [x, three], [shifted], name=names(f"{base}/Add")),
            helper.make_node("Clip", [shifted, lo, six], [gate], name=names(f"{base}/Clip")),
            helper.make_node("Mul", [x, gate], [prod], name=names(f"{base}/Mul")),
            helper.make_node("Div", [prod, six], [y], name=names(f"{base}/Div")),
        ]

    count = replace_nodes(model, "HardSigmoid", hard_sigmoid, "hard_activations")
    count += replace_nodes(model, "HardSwish", hard_swish, "hard_activations")
    return count
