"""``coo``: the standard ``sparse_initializer`` (values + int64 linear indices)."""
from __future__ import annotations

import onnx

from . import register
from .base import Format


class Coo(Format):
    name = "coo"
    summary = "standard sparse_initializer (onnxruntime densifies it at load)"
    limits = "see admm_onnx.sparse"
    options = ("min_sparsity",)

    def encode(self, model: onnx.ModelProto, min_sparsity: float = 0.5, **options):
        from ..sparse import export_sparse

        return export_sparse(model, fmt="coo", min_sparsity=min_sparsity)

    def detect(self, model: onnx.ModelProto) -> bool:
        return len(model.graph.sparse_initializer) > 0

    def decode(self, model: onnx.ModelProto) -> onnx.ModelProto:
        from ..sparse import densify

        return densify(model)


COO = register(Coo())
