"""Rewrite ``PRelu`` into ops ORT training can differentiate.

Math: PRelu(x, slope) = x for x >= 0, slope * x otherwise, which equals

    Relu(x) - slope * Relu(-x)

exactly in floating point (for x >= 0 the second term is slope * 0 = 0; for x < 0 the first
is 0 and slope * (-(-x)) = slope * x, negation being exact). ORT training 1.19.2 has no
gradient builder for PRelu; Relu, Neg, Mul and Sub have one. The slope keeps its name and
shape (PRelu broadcasts it unidirectionally to x, Mul's broadcast gives the same result), so
a per-channel slope stays a trainable parameter; a single shared slope (one element) is a
scalar Mul operand, which analysis leaves frozen.
"""
from __future__ import annotations

from typing import List

import onnx
from onnx import helper

from ._util import NameScope, replace_nodes


def _as_relus(node: onnx.NodeProto, names: NameScope, graph: onnx.GraphProto) -> List[onnx.NodeProto]:
    x, slope, y = node.input[0], node.input[1], node.output[0]
    base = node.name or y
    pos, neg, negpos, scaled = (names(f"{base}/{k}") for k in ("pos", "neg", "neg_relu", "scaled"))
    return [
        helper.make_node("Relu", [x], [pos], name=names(f"{base}/Relu")),
        helper.make_node("Neg", [x], [neg], name=names(f"{base}/Neg")),
        helper.make_node("Relu", [neg], [negpos], name=names(f"{base}/NegRelu")),
        helper.make_node("Mul", [negpos, slope], [scaled], name=names(f"{base}/Slope")),
        helper.make_node("Sub", [pos, scaled], [y], name=names(f"{base}/Sub")),
    ]


def prelu_to_relu(model: onnx.ModelProto) -> int:
    """Rewrite every default-domain ``PRelu`` of the main graph in place; returns how many."""
    return replace_nodes(model, "PRelu", _as_relus, "prelu_to_relu")
