"""What every export format provides (:class:`Format`) and the report types they share."""
from __future__ import annotations

from typing import ClassVar, Tuple

import onnx

# The report types live in admm_onnx.sparse today; they move here with the format code.
from ..sparse import ExportReport, WeightRow, WeightTable  # noqa: F401


class Format:
    """One way of storing a model's weights in an ONNX file.

    Subclasses set ``name`` (the ``--format`` value), ``summary`` (one line for ``--help``),
    ``limits`` (what runtimes and other tools do to such files) and ``options`` (the keyword
    options ``encode`` accepts besides ``min_sparsity``), and implement:

    - ``encode(model, **options) -> (model, ExportReport)``: a new model; the input is never
      modified; outputs of the new model in onnxruntime equal, bit for bit, those of
      ``decode(new_model)`` (the same weights stored dense);
    - ``detect(model) -> bool``: whether ``model`` carries weights in this format;
    - ``decode(model) -> model``: a copy with every such weight a plain dense initializer.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    limits: ClassVar[str] = ""
    options: ClassVar[Tuple[str, ...]] = ()

    def encode(self, model: onnx.ModelProto, **options):
        raise NotImplementedError

    def detect(self, model: onnx.ModelProto) -> bool:
        raise NotImplementedError

    def decode(self, model: onnx.ModelProto) -> onnx.ModelProto:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<format {self.name}>"
