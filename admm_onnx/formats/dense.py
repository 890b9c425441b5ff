"""``dense``: plain initializers, the reference every other format is compared with."""
from __future__ import annotations

import onnx

from . import register
from .base import Format


class Dense(Format):
    name = "dense"
    summary = "plain dense initializers (the reference; no encoding)"
    limits = "none: the file is a standard ONNX model."

    def encode(self, model: onnx.ModelProto, **options):
        from ..sparse import ExportReport, _candidates, _check_model_arg, _to_array, WeightRow

        _check_model_arg(model)
        out = onnx.ModelProto()
        out.CopyFrom(model)
        report = ExportReport(format="dense", values="fp32", min_sparsity=1.0, model_bytes_before=model.ByteSize())
        for _, tensor in _candidates(out):
            arr = _to_array(tensor)
            report.rows.append(WeightRow(tensor.name, "", tuple(arr.shape), int(arr.size), int((arr != 0).sum()),
                                         "dense", int(arr.nbytes), int(arr.nbytes)))
        report.model_bytes_after = out.ByteSize()
        return out, report

    def detect(self, model: onnx.ModelProto) -> bool:
        from .. import formats

        return not any(f.detect(model) for f in formats.REGISTRY.values() if f is not self)

    def decode(self, model: onnx.ModelProto) -> onnx.ModelProto:
        out = onnx.ModelProto()
        out.CopyFrom(model)
        return out


DENSE = register(Dense())
