"""What every export format provides (:class:`Format`), the report types they share and helpers.

Moved here from ``admm_onnx.sparse`` (which re-exports the public names).
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from typing import ClassVar, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from ..errors import ConfigError, ModelError

logger = logging.getLogger("admm_onnx.formats")

#: ``metadata_props`` key tagging a model written by an encoding format (JSON with "format").
METADATA_KEY = "admm_onnx.sparse"
#: protobuf refuses to serialise a message of 2 GiB or more.
_PROTOBUF_LIMIT = 2**31 - 1
_FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE)
_UNSIGNED = (np.uint8, np.uint16, np.uint32, np.uint64)

_FP16_MAX = float(np.finfo(np.float16).max)


# --------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------


@dataclass
class WeightRow:
    """One weight of a model: where it is used, its size, its sparsity and how it is stored.

    ``storage`` is ``dense``, ``csr-fp32`` / ``csr-fp16`` (``csr-fp64`` for a float64 weight
    kept at full precision), ``coo``, or ``packed-<k>bit`` / ``packed-fp32``. ``stored_bytes``
    counts the tensor payload only (values, positions, scales), not names or the decode
    constants; ``dense_bytes`` is what the same weight costs as a plain dense tensor; ``bits`` is
    the width of one stored value.
    """

    name: str
    op: str
    shape: Tuple[int, ...]
    #: number of entries (the report's vocabulary: admm_onnx.report)
    weights: int
    nonzero: int
    storage: str
    stored_bytes: int
    dense_bytes: int
    #: "yes" if admm-onnx can prune it, else why not (dense weights only; "" otherwise)
    prunable: str = ""
    #: bits per stored value (32 for fp32, 16 for fp16, k for k-bit levels)
    bits: int = 32

    @property
    def kept_percent(self) -> float:
        """Percentage of entries that are nonzero."""
        return 100.0 * self.nonzero / self.weights if self.weights else 0.0

    count = property(lambda self: self.weights, doc="Old name of :attr:`weights`.")
    kept_pct = property(lambda self: self.kept_percent, doc="Old name of :attr:`kept_percent`.")

    def to_dict(self) -> dict:
        out = asdict(self)
        out["shape"] = list(self.shape)
        out["kept_percent"] = round(self.kept_percent, 4)
        out["prunable"] = self.prunable == "yes"
        out["reason"] = None if self.prunable in ("yes", "") else self.prunable
        return out


def _total_row(rows: Sequence[WeightRow]) -> WeightRow:
    return WeightRow(
        name="TOTAL",
        op="",
        shape=(),
        weights=sum(r.weights for r in rows),
        nonzero=sum(r.nonzero for r in rows),
        storage="",
        stored_bytes=sum(r.stored_bytes for r in rows),
        dense_bytes=sum(r.dense_bytes for r in rows),
    )


class WeightTable(list):
    """A list of :class:`WeightRow`; ``.totals`` sums them into one row named ``TOTAL``."""

    @property
    def totals(self) -> WeightRow:
        return _total_row(self)

    def to_dict(self) -> dict:
        """``{"layers": [...], "total": {...}}``, the report's layout and vocabulary."""
        t = self.totals
        total = {"weights": t.weights, "nonzero": t.nonzero, "kept_percent": round(t.kept_percent, 4),
                 "compression": round(t.weights / t.nonzero, 3) if t.nonzero else None,
                 "stored_bytes": t.stored_bytes, "dense_bytes": t.dense_bytes}
        return {"layers": [r.to_dict() for r in self], "total": total}


@dataclass
class ExportReport:
    """What :func:`export_sparse` did.

    ``rows`` has one :class:`WeightRow` per weight (float initializer with ndim >= 2): encoded
    ones with their sparse storage, the others with ``storage == "dense"``. ``skipped`` maps
    each weight left dense to the reason. Byte totals cover those weights only;
    ``model_bytes_before`` / ``model_bytes_after`` are the serialized sizes of the whole models.
    For ``values="fp16"`` measure the effect with :func:`max_output_change`.
    """

    format: str
    values: str
    min_sparsity: float
    rows: WeightTable = field(default_factory=WeightTable)
    skipped: Dict[str, str] = field(default_factory=dict)
    model_bytes_before: int = 0
    model_bytes_after: int = 0
    #: initializers left dense but stored as float16 (``packed`` with ``values="fp16"``: lossy)
    float16: List[str] = field(default_factory=list)

    @property
    def encoded(self) -> List[str]:
        return [r.name for r in self.rows if r.storage != "dense"]

    @property
    def total_dense_bytes(self) -> int:
        return sum(r.dense_bytes for r in self.rows)

    @property
    def total_stored_bytes(self) -> int:
        return sum(r.stored_bytes for r in self.rows)

    @property
    def ratio(self) -> float:
        """Dense weight bytes / stored weight bytes."""
        return self.total_dense_bytes / self.total_stored_bytes if self.total_stored_bytes else math.inf


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _check_model_arg(model) -> None:
    if not isinstance(model, onnx.ModelProto):
        raise ModelError(f"expected an onnx.ModelProto, got {type(model).__name__}")
    if not model.HasField("graph"):
        raise ModelError("the model has no graph")


def _default_opset(model: onnx.ModelProto) -> Optional[int]:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return None


def _to_array(tensor: TensorProto) -> np.ndarray:
    if tensor.data_location == TensorProto.EXTERNAL and not tensor.HasField("raw_data"):
        raise ModelError(
            f"initializer {tensor.name!r} is stored as external data that is not loaded",
            hint="load the model with admm_onnx.io.load_model",
        )
    try:
        return numpy_helper.to_array(tensor)
    except Exception as exc:  # onnx raises assorted errors on malformed tensors
        raise ModelError(f"cannot read initializer {tensor.name!r}: {exc}") from exc


def _narrowest_unsigned(max_value: int) -> type:
    """Smallest unsigned integer type holding ``max_value`` (ONNX Cast accepts them all)."""
    for dtype in _UNSIGNED:
        if max_value <= np.iinfo(dtype).max:
            return dtype
    raise ModelError(f"index {max_value} does not fit in 64 bits")


def _view_2d(shape: Sequence[int]) -> Tuple[int, int]:
    rows = int(shape[0])
    cols = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
    return rows, cols


def _consumers(graph: onnx.GraphProto, skip: Set[int] = frozenset()) -> Dict[str, List[str]]:
    """Tensor name -> op types of the nodes (outside ``skip``) reading it, incl. subgraphs."""
    out: Dict[str, List[str]] = {}

    def visit(g: onnx.GraphProto, top: bool) -> None:
        for i, node in enumerate(g.node):
            if top and i in skip:
                continue
            for name in node.input:
                if name and node.op_type not in out.setdefault(name, []):
                    out[name].append(node.op_type)
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    visit(attr.g, False)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for sub in attr.graphs:
                        visit(sub, False)

    visit(graph, True)
    return out


def _all_names(graph: onnx.GraphProto) -> Set[str]:
    names: Set[str] = set()
    names.update(t.name for t in graph.initializer)
    names.update(s.values.name for s in graph.sparse_initializer)
    names.update(v.name for v in graph.input)
    names.update(v.name for v in graph.output)
    names.update(v.name for v in graph.value_info)
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
    return names


def _read_metadata(model: onnx.ModelProto) -> Optional[dict]:
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            try:
                meta = json.loads(prop.value)
            except ValueError as exc:
                raise ModelError(f"malformed {METADATA_KEY} metadata: {exc}") from exc
            if not isinstance(meta, dict) or not isinstance(meta.get("format"), str):
                raise ModelError(f"malformed {METADATA_KEY} metadata: unknown format")
            return meta
    return None


def _drop_metadata(model: onnx.ModelProto) -> None:
    keep = [(p.key, p.value) for p in model.metadata_props if p.key != METADATA_KEY]
    del model.metadata_props[:]
    for key, value in keep:
        model.metadata_props.add(key=key, value=value)


def _replace_graph_content(graph: onnx.GraphProto, initializers, nodes) -> None:
    """Set ``graph``'s initializers and nodes to the given lists (in that order)."""
    initializers, nodes = list(initializers), list(nodes)
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    del graph.node[:]
    graph.node.extend(nodes)


def _undo_encoding(model: onnx.ModelProto, meta: Optional[dict], domain: Optional[str] = None) -> None:
    """Densify epilogue shared by the encoding formats, in place: drop the model-local functions
    and the opset import of ``domain`` (when given), restore the IR version recorded in ``meta``
    at encode time (only if it is positive and not above the current one), drop our metadata."""
    if domain is not None:
        funcs = [f for f in model.functions if f.domain != domain]
        del model.functions[:]
        model.functions.extend(funcs)
        imports = [o for o in model.opset_import if o.domain != domain]
        del model.opset_import[:]
        model.opset_import.extend(imports)
    ir = meta.get("ir_version") if meta else None
    if isinstance(ir, int) and 0 < ir <= model.ir_version:
        model.ir_version = ir
    _drop_metadata(model)


def _require_opset(model: onnx.ModelProto, fmt: str, min_opset: int) -> int:
    """The model's default-domain opset; refused below ``min_opset`` (``fmt`` names the format)."""
    opset = _default_opset(model)
    if opset is None or opset < min_opset:
        raise ModelError(f"{fmt} export needs opset >= {min_opset}, the model has {opset}",
                         hint="use --format coo, or convert the model with onnx.version_converter")
    return opset


def _check_domain_free(model: onnx.ModelProto, domain: str, hint: str = "") -> None:
    """Refuse a model that already has functions or an opset import of ``domain``."""
    if any(f.domain == domain for f in model.functions) or any(o.domain == domain for o in model.opset_import):
        raise ModelError(f"the model already uses the {domain!r} domain", hint=hint)


def _finish_encode(model: onnx.ModelProto, report: "ExportReport", n_encoded: int) -> None:
    """Encode epilogue shared by the formats: check the model, record its size, log the totals."""
    what = f"{report.format} export"
    _run_checker(model, what)
    report.model_bytes_after = model.ByteSize()
    logger.info("%s: %d weight(s) encoded, %d -> %d weight bytes", what, n_encoded,
                report.total_dense_bytes, report.total_stored_bytes)


def _run_checker(model: onnx.ModelProto, what: str) -> None:
    if model.ByteSize() >= _PROTOBUF_LIMIT:
        logger.info("%s: model exceeds 2 GB in memory; the checker runs when it is saved", what)
        return
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise ModelError(f"{what} produced an invalid model: {' '.join(str(exc).split())}") from exc




def _candidates(model: onnx.ModelProto) -> List[Tuple[int, TensorProto]]:
    """(position, initializer) for every float initializer of ndim >= 2."""
    return [
        (i, t) for i, t in enumerate(model.graph.initializer)
        if t.data_type in _FLOAT_TYPES and len(t.dims) >= 2
    ]


def check_min_sparsity(min_sparsity) -> float:
    try:
        value = float(min_sparsity)
    except (TypeError, ValueError):
        raise ConfigError(f"min_sparsity must be a number in [0, 1], got {min_sparsity!r}") from None
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"min_sparsity must be in [0, 1], got {value}")
    return value


def select_weights(out: onnx.ModelProto, report: "ExportReport", min_sparsity: float,
                   clash=None, always: Iterable[str] = ()) -> Dict[str, np.ndarray]:
    """The weights of ``out`` to encode, with a dense row in ``report`` for every candidate.

    A candidate is a float initializer of ndim >= 2 (or named in ``always``); it is selected
    when its fraction of exact zeros is at least ``min_sparsity`` (names in ``always`` are
    selected whatever their sparsity), it is not also a graph input, and ``clash(name)``
    (the format's own check, returning a reason or None) allows it. Skipped ones get their
    reason in ``report.skipped``. Raises :class:`ModelError` when nothing is selected.
    """
    graph = out.graph
    graph_inputs = {v.name for v in graph.input}
    consumers = _consumers(graph)
    always = set(always)
    cands = [t for t in graph.initializer
             if t.data_type in _FLOAT_TYPES and (len(t.dims) >= 2 or t.name in always)]
    selected: Dict[str, np.ndarray] = {}
    best = 0.0
    for tensor in cands:
        arr = _to_array(tensor)
        op = ",".join(consumers.get(tensor.name, []))
        count = int(arr.size)
        nonzero = int(np.count_nonzero(arr))
        sparsity = 1.0 - nonzero / count if count else 0.0
        row = WeightRow(tensor.name, op, tuple(arr.shape), count, nonzero, "dense",
                        int(arr.nbytes), int(arr.nbytes), bits=arr.dtype.itemsize * 8)
        reason = None
        if count == 0:
            reason = "empty tensor"
        elif tensor.name in graph_inputs:
            reason = "also a graph input (overridable initializer)"
        elif count - nonzero < min_sparsity * count - 1e-9 * count and tensor.name not in always:
            # (counted in zeros: 1 - nz/n rounds 20% of 10 to 0.19999999999999996)
            best = max(best, sparsity)
            reason = f"sparsity {sparsity:.1%} < {min_sparsity:.1%}"
        elif clash is not None:
            reason = clash(tensor.name)
        report.rows.append(row)
        if reason is not None:
            report.skipped[tensor.name] = reason
            logger.debug("keeping %s dense: %s", tensor.name, reason)
            continue
        selected[tensor.name] = arr
    if not selected:
        raise ModelError(
            f"no sparse weights: no float weight (ndim >= 2) has >= {min_sparsity:.1%} zeros "
            f"(sparsest: {best:.1%})",
            hint="prune the model first or lower --min-sparsity",
        )
    return selected


def copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


@dataclass
class StoredWeight:
    """One encoded weight of a model, as ``inspect`` reports it.

    ``anchor`` is the initializer at whose place the weight is listed (None: appended);
    ``tensors`` the initializer names the encoding owns (not listed on their own).
    """

    name: str
    dense: np.ndarray
    storage: str
    stored_bytes: int
    bits: int
    anchor: Optional[str] = None
    tensors: Set[str] = field(default_factory=set)


class Format:
    """One way of storing a model's weights in an ONNX file.

    Subclasses set ``name`` (the ``--format`` value), ``summary`` (one line for ``--help``),
    ``limits`` (what runtimes and other tools do to such files) and ``options`` (the keyword
    options ``encode`` accepts), and implement:

    - ``encode(model, **options) -> (model, ExportReport)``: a new model; the input is never
      modified; its outputs in onnxruntime equal, bit for bit, those of ``decode(new_model)``
      (the same weights stored dense);
    - ``detect(model) -> bool``: whether ``model`` carries weights in this format;
    - ``decode(model) -> model``: a copy with every such weight a plain dense initializer;
    - ``stored(model) -> {name: StoredWeight}``: its encoded weights, for ``inspect``;
    - ``decode_nodes(model) -> set of node indices`` of the main graph that only decode.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    limits: ClassVar[str] = ""
    options: ClassVar[Tuple[str, ...]] = ()
    #: False for a lossy format (int8 QDQ): ``decode`` is then its float reference, compared by
    #: accuracy rather than bit for bit, and ``encode`` may need options (calibration data).
    exact: ClassVar[bool] = True

    def encode(self, model: onnx.ModelProto, **options):
        raise NotImplementedError

    def detect(self, model: onnx.ModelProto) -> bool:
        meta = _read_metadata(model)
        return meta is not None and meta.get("format") == self.name

    def decode(self, model: onnx.ModelProto) -> onnx.ModelProto:
        raise NotImplementedError

    def stored(self, model: onnx.ModelProto) -> Dict[str, StoredWeight]:
        return {}

    def decode_nodes(self, model: onnx.ModelProto) -> Set[int]:
        return set()

    def check_options(self, options: Mapping[str, object]) -> None:
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise ConfigError(f"format {self.name!r} takes no option {', '.join(unknown)}"
                              f"{'; it takes ' + ', '.join(self.options) if self.options else ''}")

    def __repr__(self) -> str:
        return f"<format {self.name}>"
