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

import onnx
from onnx import helper

from ._util import NameScope, checked


def prelu_to_relu(model: onnx.ModelProto) -> int:
    """Rewrite every default-domain ``PRelu`` of the main graph in place; returns how many."""
    graph = model.graph
    if not any(n.op_type == "PRelu" and n.domain in ("", "ai.onnx") for n in graph.node):
        return 0
    names = NameScope(graph)
    new_nodes, count = [], 0
    for node in graph.node:
        if node.op_type != "PRelu" or node.domain not in ("", "ai.onnx"):
            new_nodes.append(node)
            continue
        count += 1
        x, slope, y = node.input[0], node.input[1], node.output[0]
        base = node.name or y
        pos, neg, negpos, scaled = (names(f"{base}/{k}") for k in ("pos", "neg", "neg_relu", "scaled"))
        new_nodes += [
            helper.make_node("Relu", [x], [pos], name=names(f"{base}/Relu")),
            helper.make_node("Neg", [x], [neg], name=names(f"{base}/Neg")),
            helper.make_node("Relu", [neg], [negpos], name=names(f"{base}/NegRelu")),
            helper.make_node("Mul", [negpos, slope], [scaled], name=names(f"{base}/Slope")),
            helper.make_node("Sub", [pos, scaled], [y], name=names(f"{base}/Sub")),
        ]
    del graph.node[:]
    graph.node.extend(new_nodes)
    checked(model, "prelu_to_relu")
    return count
