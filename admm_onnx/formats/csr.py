"""``csr``: CSR arrays per weight plus a decode of standard ONNX ops (see admm_onnx.sparse)."""
from __future__ import annotations

import onnx

from . import register
from .base import Format


class Csr(Format):
    name = "csr"
    summary = "CSR arrays + decode function of standard ops (smallest fp32 file)"
    limits = "see admm_onnx.sparse"
    options = ("min_sparsity", "values")

    def encode(self, model: onnx.ModelProto, min_sparsity: float = 0.5, values: str = "fp32", **options):
        from ..sparse import export_sparse

        return export_sparse(model, fmt="csr", min_sparsity=min_sparsity, values=values)

    def detect(self, model: onnx.ModelProto) -> bool:
        from ..sparse import _read_metadata

        meta = _read_metadata(model)
        return meta is not None and meta["format"] == "csr"

    def decode(self, model: onnx.ModelProto) -> onnx.ModelProto:
        from ..sparse import densify

        return densify(model)


CSR = register(Csr())
