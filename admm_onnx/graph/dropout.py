"""Switch ``Dropout`` on in the training copy (it is an identity at inference).

Contract (decision): a Dropout node stays where the exporter put it and is *active* while
training, as it was when the model was first trained (AlexNet, VGG and friends rely on it).
ORT training reads the mode from Dropout's optional third input ``training_mode``:
``generate_artifacts`` empties that input in the eval model it derives, so evaluation,
``Trainer.logits`` and the written model all see the identity. This rewrite gives every
default-domain Dropout (opset >= 12, which :mod:`.opset` guarantees) that has no
``training_mode`` a constant ``True`` one, and its optional ``mask`` output if missing (ORT's
Dropout gradient builder reads output 1, like LayerNormalization's; see layernorm_outputs.py).
The ``ratio`` (input 1, default 0.5) is kept. A Dropout whose ``training_mode`` is already
wired is left alone.

Forward: the eval graph is unchanged; only the training graph samples masks.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from ._util import NameScope, checked, opset_version


def enable_dropout(model: onnx.ModelProto) -> int:
    """Give Dropout nodes ``training_mode = True`` in place; returns how many were changed."""
    graph = model.graph
    nodes = [n for n in graph.node if n.op_type == "Dropout" and n.domain in ("", "ai.onnx")]
    nodes = [n for n in nodes if len(n.input) < 3 or not n.input[2]]
    if not nodes or opset_version(model) < 12:
        return 0
    names = NameScope(graph)
    flag = names("admm/dropout/training_mode")
    graph.initializer.append(numpy_helper.from_array(np.array(True), flag))
    for node in nodes:
        inputs = list(node.input) + [""] * (3 - len(node.input))
        inputs[2] = flag
        del node.input[:]
        node.input.extend(inputs)
        if len(node.output) < 2 or not node.output[1]:
            outputs = [node.output[0], names(f"{node.output[0]}/mask")]
            del node.output[:]
            node.output.extend(outputs)
    checked(model, "enable_dropout")
    return len(nodes)
