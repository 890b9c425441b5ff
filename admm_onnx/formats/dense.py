"""``dense``: plain initializers, the reference every other format is compared with."""
from __future__ import annotations

import onnx

from . import register
from .base import ExportReport, Format, _check_model_arg, _to_array, copy_model, WeightRow, _candidates


class Dense(Format):
    name = "dense"
    summary = "plain dense initializers (the reference; nothing encoded)"
    limits = "none: a standard ONNX model."
    options = ("min_sparsity",)

    def encode(self, model: onnx.ModelProto, min_sparsity: float = 0.5, **options):
        """An unchanged copy of ``model`` (after decoding, if it was encoded) and its weight rows."""
        from .tables import densify

        self.check_options({**options, "min_sparsity": min_sparsity})
        _check_model_arg(model)
        out = densify(model) if not self.detect(model) else copy_model(model)
        report = ExportReport(format="dense", values="fp32", min_sparsity=1.0, model_bytes_before=model.ByteSize())
        for _, tensor in _candidates(out):
            arr = _to_array(tensor)
            report.rows.append(WeightRow(tensor.name, "", tuple(arr.shape), int(arr.size), int((arr != 0).sum()),
                                         "dense", int(arr.nbytes), int(arr.nbytes), bits=arr.dtype.itemsize * 8))
        report.model_bytes_after = out.ByteSize()
        return out, report

    def detect(self, model: onnx.ModelProto) -> bool:
        """True for a model no other format claims."""
        from . import detect

        return detect(model) is None

    def decode(self, model: onnx.ModelProto) -> onnx.ModelProto:
        return copy_model(model)


DENSE = register(Dense())
