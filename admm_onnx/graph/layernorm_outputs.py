"""Give every ``LayerNormalization`` its optional outputs (Mean, InvStdDev).

Contract: ORT training 1.19.2's LayerNormalization gradient builder reads outputs 1 and 2 and
fails with an output-index error when an exported node only has output 0. Adding the two
optional outputs (unused by any consumer) changes nothing in the forward pass.
"""
from __future__ import annotations

import onnx

from ._util import NameScope, checked


def add_layernorm_outputs(model: onnx.ModelProto) -> int:
    """Add missing optional outputs in place; returns how many nodes were changed."""
    names = NameScope(model.graph)
    count = 0
    for node in model.graph.node:
        if node.op_type != "LayerNormalization" or node.domain not in ("", "ai.onnx"):
            continue
        if len(node.output) >= 3 and all(node.output[1:3]):
            continue
        base = node.output[0]
        outs = list(node.output) + [""] * (3 - len(node.output))
        outs[1] = outs[1] or names(f"{base}/mean")
        outs[2] = outs[2] or names(f"{base}/inv_std")
        del node.output[:]
        node.output.extend(outs)
        count += 1
    if count:
        checked(model, "add_layernorm_outputs")
    return count
