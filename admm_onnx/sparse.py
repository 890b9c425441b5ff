"""Sparse deployment export (compatibility module): the formats live in :mod:`admm_onnx.formats`.

``export_sparse(model, fmt, min_sparsity, values)`` is ``formats.export(model, fmt, ...)`` for the
sparse formats; ``densify``, ``inspect_model``, ``csr_weights``, ``sample_feeds`` and
``max_output_change`` work on every registered format. See :mod:`admm_onnx.formats.csr`
(CSR arrays + a decode function onnxruntime folds at load), :mod:`admm_onnx.formats.coo`
(standard ``sparse_initializer``) and :mod:`admm_onnx.formats.packed` (Golomb-coded positions
and k-bit levels).
"""
from __future__ import annotations

from typing import Tuple

import onnx

from .errors import ConfigError
from .formats import REGISTRY, export
from .formats.base import METADATA_KEY, ExportReport, WeightRow, WeightTable
from .formats.csr import (
    DECODE_OP,
    DOMAIN,
    MIN_CSR_OPSET,
    MIN_FUNCTION_IR,
    SUFFIX_INDICES,
    SUFFIX_INDPTR,
    SUFFIX_SHAPE,
    SUFFIX_VALUES,
    VALUE_TYPES,
)
from .formats.coo import MIN_COO_IR
from .formats.tables import csr_weights, densify, inspect_model, max_output_change, sample_feeds

#: Formats :func:`export_sparse` writes (every registered format except ``dense``).
FORMATS = tuple(n for n in REGISTRY if n != "dense")


def export_sparse(
    model: onnx.ModelProto, fmt: str = "csr", min_sparsity: float = 0.5, values: str = "fp32", **options
) -> Tuple[onnx.ModelProto, ExportReport]:
    """Return a copy of ``model`` with its sparse weights stored in ``fmt``, and a report.

    ``values`` is the csr value type (``fp16`` is lossy); other formats take their own
    ``options`` (see :mod:`admm_onnx.formats`). The input is never modified.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"unknown sparse format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if values not in VALUE_TYPES:
        raise ConfigError(f"unknown value type {values!r}; choose one of {', '.join(VALUE_TYPES)}")
    if fmt in ("csr", "packed"):
        options["values"] = values
    elif values != "fp32":
        raise ConfigError(f"{fmt} does not take --values {values}; --values fp16 needs --format csr or packed")
    return export(model, fmt, min_sparsity=min_sparsity, **options)


__all__ = [
    "FORMATS", "VALUE_TYPES", "METADATA_KEY", "DOMAIN", "DECODE_OP", "MIN_CSR_OPSET", "MIN_COO_IR",
    "MIN_FUNCTION_IR", "SUFFIX_VALUES", "SUFFIX_INDICES", "SUFFIX_INDPTR", "SUFFIX_SHAPE", "ExportReport",
    "WeightRow", "WeightTable", "export_sparse", "densify", "inspect_model", "csr_weights", "sample_feeds",
    "max_output_change",
]
