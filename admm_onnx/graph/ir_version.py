"""Normalise the IR version of models handed to ONNX Runtime training 1.19.2.

Contract: ORT 1.19.2 loads IR <= 10. onnx >= 1.18 stamps IR 11+ on models it builds (for
instance the optimizer model of ``generate_artifacts``) although they use nothing newer than
IR 10. Lowering the stamp is safe when the model uses no IR-11 feature; the opsets we emit
are all <= 21 (IR 10).
"""
from __future__ import annotations

from pathlib import Path

import onnx

#: Highest IR version ORT training 1.19.2 accepts.
MAX_IR_VERSION = 10


def normalise_ir(model: onnx.ModelProto) -> bool:
    """Lower ``model.ir_version`` to at most :data:`MAX_IR_VERSION`; True if it changed."""
    if model.ir_version > MAX_IR_VERSION:
        model.ir_version = MAX_IR_VERSION
        return True
    return False


def normalise_ir_file(path) -> bool:
    """Rewrite the model file at ``path`` in place if its IR version is too new."""
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    if normalise_ir(model):
        onnx.save(model, str(path))
        return True
    return False
