"""Drop initializers from ``graph.input`` in the training copy.

Contract: IR < 4 requires every initializer to be listed as a graph input too (old Caffe2 and
model-zoo exports), and some exporters list them at any IR. Such an input is only a default
value a caller could override; nothing in training feeds it. Left in place, ORT training would
see parameters that are also inputs, and the pipeline would count them as model inputs.
Removing the listings (for IR >= 4, where they are optional; :mod:`.opset` raises older IRs
first) leaves the forward pass identical with the defaults.
"""
from __future__ import annotations

import onnx

from ._util import checked


def drop_initializer_inputs(model: onnx.ModelProto) -> int:
    """Remove graph inputs that are initializers (in place); returns how many were removed."""
    if model.ir_version < 4:
        return 0
    inits = {t.name for t in model.graph.initializer}
    keep = [i for i in model.graph.input if i.name not in inits]
    count = len(model.graph.input) - len(keep)
    if count:
        del model.graph.input[:]
        model.graph.input.extend(keep)
        checked(model, "drop_initializer_inputs")
    return count
