"""Rewrite variadic ``Sum`` into a chain of binary ``Add`` nodes.

Math: Sum(x1, ..., xn) = (((x1 + x2) + x3) + ... + xn), with the same multidirectional
broadcasting. ORT training 1.19.2 has no gradient builder for ``Sum``; ``Add`` has one. The
forward result is identical up to float summation order, which is the same left-to-right order
ORT's Sum kernel uses. A one-input Sum becomes ``Identity``.
"""
from __future__ import annotations

from typing import List

import onnx
from onnx import helper

from ._util import NameScope, replace_nodes


def _as_adds(node: onnx.NodeProto, names: NameScope, graph: onnx.GraphProto) -> List[onnx.NodeProto]:
    inputs, out = list(node.input), node.output[0]
    base = node.name or out
    if len(inputs) == 1:
        return [helper.make_node("Identity", inputs, [out], name=names(base))]
    nodes, acc = [], inputs[0]
    for i, x in enumerate(inputs[1:], start=1):
        target = out if i == len(inputs) - 1 else names(f"{base}/add{i}")
        nodes.append(helper.make_node("Add", [acc, x], [target], name=names(f"{base}/add{i}")))
        acc = target
    return nodes


def sum_to_add(model: onnx.ModelProto) -> int:
    """Rewrite every ``Sum`` in the main graph in place; returns how many were rewritten."""
    return replace_nodes(model, "Sum", _as_adds, "sum_to_add")
