"""Put every training-mode ``BatchNormalization`` in inference mode for ADMM training.

Contract: PyTorch's legacy exporter in training mode writes BN nodes with
``training_mode = 1`` and two extra outputs (updated running mean and variance) that nothing
consumes. ORT training cannot write those statistics back into the checkpoint, and the eval
model it derives (training_mode = 0) is invalid with three outputs. So the training copy uses
frozen running statistics: y = scale * (x - mean) / sqrt(var + eps) + bias, with scale and
bias trained. The extra outputs are dropped when unused; a node whose extra outputs are
consumed is left alone (and will fail later with ORT's own message).
The user's graph, which is what gets written out, is not touched.
"""
from __future__ import annotations

import onnx

from ._util import checked


def freeze_batchnorm(model: onnx.ModelProto) -> int:
    """Rewrite training-mode BN nodes in place; returns how many were changed."""
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    count = 0
    for node in model.graph.node:
        if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx"):
            continue
        extra = [o for o in node.output[1:] if o]
        if any(o in used for o in extra):
            continue
        training = [a for a in node.attribute if a.name == "training_mode"]
        if not extra and not (training and training[0].i):
            continue
        del node.output[1:]
        for a in training:
            node.attribute.remove(a)
        count += 1
    if count:
        checked(model, "freeze_batchnorm")
    return count
