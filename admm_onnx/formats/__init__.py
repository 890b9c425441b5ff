"""Export formats: one module per way of storing weights, behind a registry.

A format (:class:`~admm_onnx.formats.base.Format`) knows how to *encode* a model's weights
(returning a new model and an :class:`~admm_onnx.formats.base.ExportReport`), how to recognise a
model it wrote (``detect``), how to turn such a model back into plain dense initializers
(``decode``), and how much each weight costs (``stored``, for ``inspect``). Its ``limits`` text
says what other tools and runtime settings do to its files.

``REGISTRY`` maps a name to its format; ``admm-onnx export --format NAME``, ``densify`` and
``inspect`` go through it. A new format is one module calling :func:`register`.
"""
from __future__ import annotations

import logging
from typing import Dict, Optional, Tuple

import onnx

from ..errors import ConfigError
from .base import METADATA_KEY, ExportReport, Format, StoredWeight, WeightRow, WeightTable

#: name -> format, in registration order (the CLI lists them in this order).
REGISTRY: Dict[str, Format] = {}


def register(fmt: Format) -> Format:
    """Add ``fmt`` under ``fmt.name`` (a name may be registered once)."""
    if fmt.name in REGISTRY and REGISTRY[fmt.name] is not fmt:
        raise ValueError(f"format {fmt.name!r} is already registered")
    REGISTRY[fmt.name] = fmt
    return fmt


def get(name: str) -> Format:
    """The format called ``name``; :class:`ConfigError` naming the choices otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown export format {name!r}; choose one of {', '.join(REGISTRY)}") from None


def names() -> Tuple[str, ...]:
    return tuple(REGISTRY)


def detect(model: onnx.ModelProto) -> Optional[Format]:
    """The registered format that wrote ``model`` (``None`` for a plain dense model)."""
    for fmt in REGISTRY.values():
        if fmt.name != "dense" and fmt.detect(model):
            return fmt
    return None


def export(model: onnx.ModelProto, fmt: str = "csr", **options) -> Tuple[onnx.ModelProto, ExportReport]:
    """``get(fmt).encode(model, **options)``; the input model is never modified.

    Weights also listed as graph inputs (exporters' "keep initializers as inputs") are written
    as constants first: a deployment file does not let them be overridden, and onnxruntime
    folds or quantizes only constants (it warns about such inputs for the same reason)."""
    return get(fmt).encode(constant_weights(model), **options)


def constant_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model``, or a copy whose initializers are no longer also graph inputs (IR >= 4)."""
    if not isinstance(model, onnx.ModelProto):
        return model  # the format's encode says what it takes
    inits = {t.name for t in model.graph.initializer}
    listed = [v.name for v in model.graph.input if v.name in inits]
    if not listed:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    keep = [v for v in out.graph.input if v.name not in inits]
    del out.graph.input[:]
    out.graph.input.extend(keep)
    out.ir_version = max(out.ir_version, 4)  # below IR 4 every initializer had to be an input
    logging.getLogger(__name__).info(
        "%d initializer(s) listed as graph inputs written as constants: %s", len(listed),
        ", ".join(listed[:5]) + (", ..." if len(listed) > 5 else ""))
    return out


def decode(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with every stored weight back as a plain dense initializer."""
    return densify(model)


# Registration order = CLI order. Imported last: the modules import the names above.
from . import dense as _dense  # noqa: E402,F401
from . import csr as _csr  # noqa: E402,F401
from . import coo as _coo  # noqa: E402,F401
from . import packed as _packed  # noqa: E402,F401
from . import qdq as _qdq  # noqa: E402,F401
from .tables import csr_weights, densify, inspect_model, max_output_change, sample_feeds  # noqa: E402

__all__ = ["REGISTRY", "METADATA_KEY", "Format", "ExportReport", "StoredWeight", "WeightRow", "WeightTable",
           "register", "get", "names", "detect", "export", "decode", "densify", "inspect_model", "csr_weights",
           "sample_feeds", "max_output_change"]
