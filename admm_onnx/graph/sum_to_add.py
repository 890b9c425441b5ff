"""Rewrite variadic ``Sum`` into a chain of binary ``Add`` nodes.

Math: Sum(x1, ..., xn) = (((x1 + x2) + x3) + ... + xn), with the same multidirectional
broadcasting. ORT training 1.19.2 has no gradient builder for ``Sum``; ``Add`` has one. The
forward result is identical up to float summation order, which is the same left-to-right order
ORT's Sum kernel uses. A one-input Sum becomes ``Identity``.
"""
from __future__ import annotations

import onnx
from onnx import helper

from ._util import NameScope, checked


def sum_to_add(model: onnx.ModelProto) -> int:
    """Rewrite every ``Sum`` in the main graph in place; returns how many were rewritten."""
    graph = model.graph
    names = NameScope(graph)
    new_nodes, count = [], 0
    for node in graph.node:
        if node.op_type != "Sum" or node.domain not in ("", "ai.onnx"):
            new_nodes.append(node)
            continue
        count += 1
        inputs, out = list(node.input), node.output[0]
        base = node.name or out
        if len(inputs) == 1:
            new_nodes.append(helper.make_node("Identity", inputs, [out], name=names(base)))
            continue
        acc = inputs[0]
        for i, x in enumerate(inputs[1:], start=1):
            last = i == len(inputs) - 1
            target = out if last else names(f"{base}/add{i}")
            new_nodes.append(helper.make_node("Add", [acc, x], [target], name=names(f"{base}/add{i}")))
            acc = target
    if count:
        del graph.node[:]
        graph.node.extend(new_nodes)
        checked(model, "sum_to_add")
    return count
