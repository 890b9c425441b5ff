"""Sparse deployment export: store pruned weights compactly inside a standard ONNX file.

Two storage formats, both plain ONNX that any runtime can load:

``csr`` (default)
    Each selected weight ``W`` of shape ``(d0, d1, ..., dk)`` is viewed as the 2-D matrix
    ``M = W.reshape(d0, d1 * ... * dk)`` (R rows, C columns) and stored as three ordinary
    initializers in CSR form (see :func:`_encode_csr`):

    - ``<name>.csr_values``  the nonzero entries of ``M`` in row-major order (fp32, i.e. the
      weight's own float type, or fp16 when asked: lossy);
    - ``<name>.csr_indices`` their column numbers, in the narrowest unsigned integer type
      that holds ``C - 1`` (uint8 / uint16 / uint32 / uint64);
    - ``<name>.csr_indptr``  the R + 1 row pointers, in the narrowest unsigned integer type
      that holds ``nnz``.

    A decode function built from standard ONNX operators rebuilds the dense weight under its
    *original* tensor name, so every other node is untouched: the body is stored once as the
    model-local function ``CsrDecode`` (domain :data:`DOMAIN`, see :func:`_decode_function`)
    and each weight costs one call node ``W = CsrDecode(values, indices, indptr, shape)``,
    ``shape`` being a small int64 initializer ``<name>.csr_shape``. All zeros are produced by
    ``ConstantOfShape`` at run time, never stored. The decode copies the stored values bit for
    bit (``ScatterElements`` without reduction), so fp32 storage is exact. ONNX Runtime
    inlines the function and constant-folds the whole decode at session creation: the cost is
    paid once, at load time, and inference runs the usual dense kernels. Outputs then equal
    the dense model's bit for bit. (With every graph optimisation disabled the decode runs
    at each call and the weights are not constants, so ORT cannot pre-pack them for Conv and
    Gemm; the unpacked kernels may round differently, about 1 ulp.)

    Opset and IR: the body uses only operators that exist with unchanged semantics (for the
    way they are used here) from opset 11 through 21 (Constant, Cast, Slice, Sub, Add, Div,
    Greater, ReduceProd without axes, Reshape, Range, Compress, Concat, Shape,
    ConstantOfShape, ScatterElements without ``reduction``, CumSum) and imports the model's
    own default-domain opset, so that import is never changed; models below opset 11 are
    refused. Model-local functions need IR version 8: a model with IR 4..7 is raised to IR 8
    (a newer IR only adds features; it does not change the meaning of an existing graph) and
    the opset import ``admm_onnx.sparse`` version 1 is added. :func:`densify` undoes both.

    The encoded weights are tagged three ways: the initializer name suffixes above, the
    ``CsrDecode`` call nodes, and the ``metadata_props`` entry :data:`METADATA_KEY` (JSON:
    original shape and element type of each weight, original IR version), which
    :func:`inspect_model`, :func:`densify` and :func:`csr_weights` read.

``coo``
    Each selected weight moves from ``graph.initializer`` to ``graph.sparse_initializer`` as
    a standard ``SparseTensorProto`` (values in the weight's own type, int64 linear indices,
    sorted), which the ONNX checker validates and ONNX Runtime densifies at load time.

Zeros are counted with ``w == 0``, so ``-0.0`` counts as zero; a decoded or densified weight
has ``+0.0`` in its place (numerically equal; the bit pattern of that zero differs).

Saving: write the result with :func:`admm_onnx.io.save_model`. CSR arrays are ordinary
initializers, so ``external_data=True`` moves them to the ``.data`` file like any weight.
Sparse initializers (``coo``) cannot be stored as external data by onnx, so a ``coo`` export
whose sparse tensors alone exceed 2 GB is refused.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .errors import ConfigError, ModelError
from .graph.analysis import analyse

logger = logging.getLogger(__name__)

FORMATS = ("csr", "coo")
VALUE_TYPES = ("fp32", "fp16")

#: ``metadata_props`` key tagging a model written by :func:`export_sparse`.
METADATA_KEY = "admm_onnx.sparse"
#: Initializer name suffixes of the three CSR arrays of a weight.
SUFFIX_VALUES = ".csr_values"
SUFFIX_INDICES = ".csr_indices"
SUFFIX_INDPTR = ".csr_indptr"
#: Suffix of the int64 initializer holding a weight's original shape.
SUFFIX_SHAPE = ".csr_shape"
#: Domain and name of the model-local decode function.
DOMAIN = "admm_onnx.sparse"
DECODE_OP = "CsrDecode"
#: Model-local functions exist from this IR version on.
MIN_FUNCTION_IR = 8

#: Lowest default-domain opset at which the decode subgraph is valid.
MIN_CSR_OPSET = 11
#: Lowest IR version that has ``sparse_initializer``.
MIN_COO_IR = 6
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
    kept at full precision) or ``coo``. ``stored_bytes`` counts the tensor payload only (values
    plus indices plus row pointers), not names or the decode constants; ``dense_bytes`` is what
    the same weight costs as a plain dense tensor.
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
            if not isinstance(meta, dict) or meta.get("format") not in FORMATS:
                raise ModelError(f"malformed {METADATA_KEY} metadata: unknown format")
            return meta
    return None


def _drop_metadata(model: onnx.ModelProto) -> None:
    keep = [(p.key, p.value) for p in model.metadata_props if p.key != METADATA_KEY]
    del model.metadata_props[:]
    for key, value in keep:
        model.metadata_props.add(key=key, value=value)


def _storage_name(fmt: str, values_dtype: np.dtype) -> str:
    if fmt == "coo":
        return "coo"
    return "csr-fp" + str(np.dtype(values_dtype).itemsize * 8)


def _run_checker(model: onnx.ModelProto, what: str) -> None:
    if model.ByteSize() >= _PROTOBUF_LIMIT:
        logger.info("%s: model exceeds 2 GB in memory; the checker runs when it is saved", what)
        return
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise ModelError(f"{what} produced an invalid model: {' '.join(str(exc).split())}") from exc


# --------------------------------------------------------------------------------------------
# CSR encoding and decode subgraph
# --------------------------------------------------------------------------------------------


def _encode_csr(dense: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR arrays of the 2-D view of ``dense``.

    Contract: with ``M = dense.reshape(R, C)``, ``values[k]`` is the k-th nonzero of ``M`` in
    row-major order, ``indices[k]`` its column, and row ``r`` owns entries
    ``indptr[r] : indptr[r + 1]``; so ``M[r, indices[k]] = values[k]`` for those k and every
    other entry is zero. Index arrays use the narrowest unsigned type that fits.
    """
    rows, cols = _view_2d(dense.shape)
    mat = dense.reshape(rows, cols)
    r_idx, c_idx = np.nonzero(mat != 0)
    values = mat[r_idx, c_idx]
    indptr = np.zeros(rows + 1, np.int64)
    np.cumsum(np.bincount(r_idx, minlength=rows), out=indptr[1:])
    nnz = int(values.size)
    indices = c_idx.astype(_narrowest_unsigned(max(cols - 1, 0)))
    indptr = indptr.astype(_narrowest_unsigned(nnz))
    return values, indices, indptr


def _decode_csr_numpy(values: np.ndarray, indices: np.ndarray, indptr: np.ndarray, shape: Sequence[int],
                      dtype: np.dtype) -> np.ndarray:
    """NumPy twin of the decode subgraph (used by :func:`densify` and :func:`csr_weights`)."""
    rows, cols = _view_2d(shape)
    if indptr.size != rows + 1:
        raise ModelError(f"CSR row pointers have {indptr.size} entries, expected {rows + 1}")
    counts = np.diff(indptr.astype(np.int64))
    if (counts < 0).any() or int(indptr[-1]) != values.size or indices.size != values.size:
        raise ModelError("inconsistent CSR arrays (row pointers do not match the values)")
    row_of = np.repeat(np.arange(rows, dtype=np.int64), counts)
    col = indices.astype(np.int64)
    if col.size and (col.max() >= cols):
        raise ModelError("CSR column index out of range")
    flat = np.zeros(rows * cols, dtype=dtype)
    flat[row_of * cols + col] = values.astype(dtype)
    return flat.reshape(tuple(shape))


def _decode_function(opset: int) -> onnx.FunctionProto:
    """The model-local function ``W = CsrDecode<to>(values, indices, indptr, shape)``.

    Math (all integer steps in int64), with ``ip = indptr``, ``R = shape[0]``,
    ``N = prod(shape)`` and ``C = N / R`` (the 2-D view has R rows and C columns):

    1. ``start = ip[:-1]``, ``count = ip[1:] - ip[:-1]``, ``ne = count > 0`` (nonempty rows).
    2. ``off = Range(0, N, C)`` = ``r * C`` for every row r; keep the nonempty rows:
       ``o = Compress(off, ne)``, ``s = Compress(start, ne)``. The ``s`` are distinct.
    3. ``marks = zeros(nnz)``; ``marks[s[j]] = o[j] - o[j-1]`` (with ``o[-1] := 0``). A row's
       entries are contiguous and nonempty rows start at distinct places, so the running sum
       ``CumSum(marks)[k]`` is ``row(k) * C`` for every nonzero k.
    4. ``lin = CumSum(marks) + indices``: the flat position of each nonzero in the R*C view.
    5. ``W = Reshape(ScatterElements(zeros(N), lin, Cast<to>(values)), shape)``, zeros from
       ConstantOfShape. ScatterElements without reduction copies each value and the positions
       are unique, so the result is bit-exact and independent of write order. The Cast is a
       no-op copy for values stored in the weight's own type; for fp16 storage it is where the
       rounded values come back to the weight's type (the lossy step happened at export).

    With no nonzero at all every intermediate is empty and the result is all zeros.
    ``opset`` is the model's default-domain opset (>= 11); the body means the same for 11..21.
    """
    i64 = TensorProto.INT64

    def const(name: str, values, dims) -> onnx.NodeProto:
        return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, i64, dims, values))

    # helper.make_attribute_ref (onnx 1.17) leaves ref_attr_name unset: build it by hand.
    cast_to = onnx.AttributeProto(name="to", ref_attr_name="to", type=onnx.AttributeProto.INT)
    n = helper.make_node
    body = [
        const("c0", [0], [1]),
        const("c1", [1], [1]),
        const("cm1", [-1], [1]),
        const("cmax", [np.iinfo(np.int64).max], [1]),
        const("cs", [], [0]),  # Reshape target [] -> scalar
        const("z", [0], []),  # scalar 0: Range start, CumSum axis
        n("Cast", ["indptr"], ["ip"], to=i64),
        n("Slice", ["ip", "c0", "cm1"], ["st"]),  # row starts
        n("Slice", ["ip", "c1", "cmax"], ["en"]),  # row ends
        n("Sub", ["en", "st"], ["cnt"]),
        n("Greater", ["cnt", "c0"], ["ne"]),  # nonempty rows
        n("Slice", ["shape", "c0", "c1"], ["R"]),
        n("ReduceProd", ["shape"], ["N"], keepdims=1),
        n("Div", ["N", "R"], ["C"]),
        n("Reshape", ["N", "cs"], ["Ns"]),
        n("Reshape", ["C", "cs"], ["Cs"]),
        n("Range", ["z", "Ns", "Cs"], ["off"]),  # r * C for every row
        n("Compress", ["off", "ne"], ["o"], axis=0),
        n("Compress", ["st", "ne"], ["s"], axis=0),
        n("Slice", ["o", "c0", "cm1"], ["op"]),
        n("Concat", ["c0", "op"], ["oc"], axis=0),
        n("Sub", ["o", "oc"], ["d"]),  # jump of r * C at each nonempty row start
        n("Shape", ["values"], ["nz"]),
        n("ConstantOfShape", ["nz"], ["mz"], value=helper.make_tensor("v", i64, [1], [0])),
        n("ScatterElements", ["mz", "s", "d"], ["mk"], axis=0),
        n("CumSum", ["mk", "z"], ["ro"]),  # row(k) * C
        n("Cast", ["indices"], ["ci"], to=i64),
        n("Add", ["ro", "ci"], ["lin"]),  # flat position of each nonzero
        n("ConstantOfShape", ["N"], ["fz"]),  # float32 zeros
        n("Cast", ["fz"], ["wz"]),
        n("Cast", ["values"], ["v"]),
        n("ScatterElements", ["wz", "lin", "v"], ["flat"], axis=0),
        n("Reshape", ["flat", "shape"], ["W"]),
    ]
    for node in body:
        if node.op_type == "Cast" and node.output[0] in ("wz", "v"):
            node.attribute.append(cast_to)
    return helper.make_function(
        DOMAIN, DECODE_OP, ["values", "indices", "indptr", "shape"], ["W"], body,
        opset_imports=[helper.make_opsetid("", opset)], attributes=["to"],
    )


def _decode_call(name: str, orig_type: int) -> onnx.NodeProto:
    """The call node rebuilding weight ``name`` (of ONNX element type ``orig_type``)."""
    return helper.make_node(
        DECODE_OP,
        [name + SUFFIX_VALUES, name + SUFFIX_INDICES, name + SUFFIX_INDPTR, name + SUFFIX_SHAPE],
        [name], domain=DOMAIN, to=orig_type,
    )


def _decode_tensor_names(name: str) -> Set[str]:
    return {name + s for s in (SUFFIX_VALUES, SUFFIX_INDICES, SUFFIX_INDPTR, SUFFIX_SHAPE)}


def _is_decode_node(node: onnx.NodeProto, weights: Iterable[str]) -> bool:
    """A ``CsrDecode`` call writing one of ``weights``."""
    return node.domain == DOMAIN and node.op_type == DECODE_OP and any(o in weights for o in node.output)


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


def _candidates(model: onnx.ModelProto) -> List[Tuple[int, TensorProto]]:
    """(position, initializer) for every float initializer of ndim >= 2."""
    return [
        (i, t) for i, t in enumerate(model.graph.initializer)
        if t.data_type in _FLOAT_TYPES and len(t.dims) >= 2
    ]


def export_sparse(
    model: onnx.ModelProto, fmt: str = "csr", min_sparsity: float = 0.5, values: str = "fp32"
) -> Tuple[onnx.ModelProto, ExportReport]:
    """Return a copy of ``model`` with its sparse weights stored in ``fmt``, and a report.

    A weight is a float initializer (float32/float16/float64) of ndim >= 2 of the main graph;
    it is encoded when its fraction of exact zeros is at least ``min_sparsity``. Every other
    tensor, node, input, output and the opset imports stay as they are. ``values="fp16"``
    (csr only) stores the nonzeros as float16 and casts them back in the decode: lossy, check
    with :func:`max_output_change`. ``values="fp32"`` keeps each weight's own precision.

    Raises :class:`ConfigError` for a bad ``fmt`` / ``values`` / ``min_sparsity``, and
    :class:`ModelError` when no weight is sparse enough or the model cannot carry the format
    (opset < 11 for csr, IR < 6 for coo, already sparse). The input is never modified.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"unknown sparse format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if values not in VALUE_TYPES:
        raise ConfigError(f"unknown value type {values!r}; choose one of {', '.join(VALUE_TYPES)}")
    if fmt == "coo" and values != "fp32":
        raise ConfigError("coo stores values in the weight's own type; --values fp16 needs --format csr")
    try:
        min_sparsity = float(min_sparsity)
    except (TypeError, ValueError):
        raise ConfigError(f"min_sparsity must be a number in [0, 1], got {min_sparsity!r}") from None
    if not 0.0 <= min_sparsity <= 1.0:
        raise ConfigError(f"min_sparsity must be in [0, 1], got {min_sparsity}")
    _check_model_arg(model)
    if _read_metadata(model) is not None or len(model.graph.sparse_initializer):
        raise ModelError("the model already has sparse weights", hint="densify it first")
    if fmt == "csr":
        opset = _default_opset(model)
        if opset is None or opset < MIN_CSR_OPSET:
            raise ModelError(
                f"csr export needs opset >= {MIN_CSR_OPSET}, the model has {opset}",
                hint="use --format coo, or convert the model with onnx.version_converter",
            )
    elif model.ir_version < MIN_COO_IR:
        raise ModelError(f"coo export needs IR version >= {MIN_COO_IR}, the model has {model.ir_version}",
                         hint="use --format csr")

    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    report = ExportReport(format=fmt, values=values, min_sparsity=min_sparsity,
                          model_bytes_before=model.ByteSize())
    graph_inputs = {v.name for v in graph.input}
    consumers = _consumers(graph)
    taken = _all_names(graph)

    selected: Dict[str, np.ndarray] = {}
    best = 0.0
    for _, tensor in _candidates(out):
        arr = _to_array(tensor)
        op = ",".join(consumers.get(tensor.name, []))
        count = int(arr.size)
        nonzero = int(np.count_nonzero(arr))
        sparsity = 1.0 - nonzero / count if count else 0.0
        dense_row = WeightRow(tensor.name, op, tuple(arr.shape), count, nonzero, "dense",
                              int(arr.nbytes), int(arr.nbytes))
        reason = None
        if count == 0:
            reason = "empty tensor"
        elif tensor.name in graph_inputs:
            reason = "also a graph input (overridable initializer)"
        elif sparsity < min_sparsity:
            best = max(best, sparsity)
            reason = f"sparsity {sparsity:.1%} < {min_sparsity:.1%}"
        elif fmt == "csr" and _decode_tensor_names(tensor.name) & taken:
            reason = "a CSR array name is already used in the graph"
        if reason is not None:
            report.skipped[tensor.name] = reason
            report.rows.append(dense_row)
            logger.debug("keeping %s dense: %s", tensor.name, reason)
            continue
        selected[tensor.name] = arr
        report.rows.append(dense_row)  # storage filled in below
    if not selected:
        raise ModelError(
            f"no sparse weights: no float weight (ndim >= 2) has >= {min_sparsity:.1%} zeros "
            f"(sparsest: {best:.1%})",
            hint="prune the model first or lower --min-sparsity",
        )
    if fmt == "csr" and values == "fp16":
        for name, arr in selected.items():
            big = float(np.max(np.abs(arr[np.isfinite(arr)]), initial=0.0))
            if big > _FP16_MAX:
                raise ConfigError(f"weight {name!r} has values beyond the fp16 range (max |w| = {big:g})",
                                  hint="use --values fp32")

    rows_by_name = {r.name: r for r in report.rows}
    if fmt == "csr":
        _apply_csr(out, selected, values, rows_by_name, taken)
    else:
        _apply_coo(out, selected, rows_by_name)
    _run_checker(out, f"{fmt} export")
    report.model_bytes_after = out.ByteSize()
    logger.info("%s export: %d weight(s) encoded, %d -> %d weight bytes", fmt, len(selected),
                report.total_dense_bytes, report.total_stored_bytes)
    return out, report


def _apply_csr(model: onnx.ModelProto, selected: Mapping[str, np.ndarray], values: str,
               rows_by_name: Mapping[str, WeightRow], taken: Set[str]) -> None:
    """Replace each selected initializer by its CSR arrays and prepend its decode call."""
    graph = model.graph
    if any(f.domain == DOMAIN for f in model.functions) or any(o.domain == DOMAIN for o in model.opset_import):
        raise ModelError(f"the model already uses the {DOMAIN!r} domain", hint="densify it first")
    if model.ir_version < 4:
        raise ModelError(f"csr export needs IR version >= 4, the model has {model.ir_version}")
    new_inits: List[TensorProto] = []
    calls: List[onnx.NodeProto] = []
    meta_weights = {}
    for tensor in graph.initializer:
        arr = selected.get(tensor.name)
        if arr is None:
            new_inits.append(tensor)
            continue
        name = tensor.name
        vals, indices, indptr = _encode_csr(arr)
        if values == "fp16":
            vals = vals.astype(np.float16)
        new_inits += [
            numpy_helper.from_array(vals, name + SUFFIX_VALUES),
            numpy_helper.from_array(indices, name + SUFFIX_INDICES),
            numpy_helper.from_array(indptr, name + SUFFIX_INDPTR),
            numpy_helper.from_array(np.array(arr.shape, np.int64), name + SUFFIX_SHAPE),
        ]
        calls.append(_decode_call(name, tensor.data_type))
        meta_weights[name] = {"shape": list(arr.shape), "dtype": int(tensor.data_type)}
        row = rows_by_name[name]
        row.storage = _storage_name("csr", vals.dtype)
        row.stored_bytes = int(vals.nbytes + indices.nbytes + indptr.nbytes)
    del graph.initializer[:]
    graph.initializer.extend(new_inits)
    old_nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(calls + old_nodes)
    model.functions.append(_decode_function(_default_opset(model)))
    model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    meta = {"version": 1, "format": "csr", "values": values, "ir_version": int(model.ir_version),
            "weights": meta_weights}
    model.ir_version = max(model.ir_version, MIN_FUNCTION_IR)
    model.metadata_props.add(key=METADATA_KEY, value=json.dumps(meta, separators=(",", ":")))


def _apply_coo(model: onnx.ModelProto, selected: Mapping[str, np.ndarray],
               rows_by_name: Mapping[str, WeightRow]) -> None:
    """Move each selected initializer to ``sparse_initializer`` (int64 linear indices)."""
    graph = model.graph
    keep: List[TensorProto] = []
    meta_weights = {}
    sparse_bytes = 0
    for pos, tensor in enumerate(graph.initializer):
        arr = selected.get(tensor.name)
        if arr is None:
            keep.append(tensor)
            continue
        flat = arr.reshape(-1)
        lin = np.flatnonzero(flat != 0).astype(np.int64)  # sorted, as the checker requires
        vals = numpy_helper.from_array(flat[lin], tensor.name)
        idx = numpy_helper.from_array(lin, "")
        graph.sparse_initializer.append(helper.make_sparse_tensor(vals, idx, list(arr.shape)))
        meta_weights[tensor.name] = {"index": pos}
        row = rows_by_name[tensor.name]
        row.storage = "coo"
        row.stored_bytes = int(flat[lin].nbytes + lin.nbytes)
        sparse_bytes += row.stored_bytes
    if sparse_bytes >= _PROTOBUF_LIMIT:
        raise ModelError("the coo sparse tensors exceed 2 GB and onnx cannot store them as external data",
                         hint="use --format csr")
    del graph.initializer[:]
    graph.initializer.extend(keep)
    model.metadata_props.add(
        key=METADATA_KEY,
        value=json.dumps({"version": 1, "format": "coo", "weights": meta_weights}, separators=(",", ":")),
    )


# --------------------------------------------------------------------------------------------
# Reading sparse models back
# --------------------------------------------------------------------------------------------


def _csr_entries(model: onnx.ModelProto, meta: dict) -> Dict[str, Tuple[np.ndarray, np.ndarray, np.ndarray, Tuple[int, ...], np.dtype]]:
    """name -> (values, indices, indptr, shape, decoded dtype) for every CSR weight."""
    inits = {t.name: t for t in model.graph.initializer}
    out = {}
    weights = meta.get("weights")
    if not isinstance(weights, dict):
        raise ModelError(f"malformed {METADATA_KEY} metadata: no weight list")
    for name, info in weights.items():
        try:
            arrays = [_to_array(inits[name + s]) for s in (SUFFIX_VALUES, SUFFIX_INDICES, SUFFIX_INDPTR)]
            shape = tuple(int(d) for d in info["shape"])
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(int(info["dtype"])))
        except KeyError as exc:
            raise ModelError(f"CSR weight {name!r} is incomplete: missing {exc}") from None
        out[name] = (*arrays, shape, dtype)
    return out


def _sparse_to_dense(sparse: onnx.SparseTensorProto) -> np.ndarray:
    """Dense array of a SparseTensorProto with linear (1-D) or coordinate (2-D) indices."""
    vals = _to_array(sparse.values)
    idx = _to_array(sparse.indices).astype(np.int64)
    shape = tuple(int(d) for d in sparse.dims)
    flat = np.zeros(int(np.prod(shape, dtype=np.int64)), dtype=vals.dtype)
    if idx.ndim == 2:
        idx = np.ravel_multi_index(tuple(idx.T), shape) if idx.size else idx.reshape(-1)
    flat[idx] = vals
    return flat.reshape(shape)


def densify(model: onnx.ModelProto) -> onnx.ModelProto:
    """Inverse of :func:`export_sparse`: a copy of ``model`` with plain dense initializers.

    Contract: every CSR weight (found through the :data:`METADATA_KEY` metadata) loses its
    decode nodes, CSR arrays and decode constants and becomes a dense initializer under its
    own name, at the position its CSR arrays had; the shared decode constants and the metadata
    entry are removed. Every ``sparse_initializer`` (ours or anyone's) becomes a dense
    initializer, at its original position when we wrote it. For an fp32 export,
    ``densify(export_sparse(m)[0])`` has initializers identical to ``m``'s (up to the sign of
    zeros). For an fp16 export the values are the fp16-rounded ones the decode computes.
    Raises :class:`ModelError` when the model has nothing sparse.
    """
    _check_model_arg(model)
    meta = _read_metadata(model)
    if meta is None and not len(model.graph.sparse_initializer):
        raise ModelError("the model has no sparse weights to densify")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    if meta is not None and meta["format"] == "csr":
        entries = _csr_entries(out, meta)
        dense = {n: _decode_csr_numpy(v, i, p, s, d) for n, (v, i, p, s, d) in entries.items()}
        drop = set().union(*(_decode_tensor_names(n) for n in dense))
        new_inits = []
        for tensor in graph.initializer:
            name = tensor.name
            if name.endswith(SUFFIX_VALUES) and name[: -len(SUFFIX_VALUES)] in dense:
                w = name[: -len(SUFFIX_VALUES)]
                new_inits.append(numpy_helper.from_array(dense[w], w))
            elif name not in drop:
                new_inits.append(tensor)
        nodes = [nd for nd in graph.node if not _is_decode_node(nd, dense)]
        del graph.initializer[:]
        graph.initializer.extend(new_inits)
        del graph.node[:]
        graph.node.extend(nodes)
        if not any(nd.domain == DOMAIN for nd in graph.node):
            funcs = [f for f in out.functions if f.domain != DOMAIN]
            del out.functions[:]
            out.functions.extend(funcs)
            imports = [o for o in out.opset_import if o.domain != DOMAIN]
            del out.opset_import[:]
            out.opset_import.extend(imports)
        ir = meta.get("ir_version")
        if isinstance(ir, int) and 0 < ir <= out.ir_version:
            out.ir_version = ir
    if len(graph.sparse_initializer):
        order = meta.get("weights", {}) if meta is not None and meta["format"] == "coo" else {}
        inits = list(graph.initializer)
        placed, appended = [], []
        for sp in graph.sparse_initializer:
            tensor = numpy_helper.from_array(_sparse_to_dense(sp), sp.values.name)
            info = order.get(sp.values.name) if isinstance(order, dict) else None
            pos = info.get("index") if isinstance(info, dict) else None
            if isinstance(pos, int) and pos >= 0:
                placed.append((pos, tensor))
            else:
                appended.append(tensor)
        # Inserting in increasing original position rebuilds the original order.
        for pos, tensor in sorted(placed, key=lambda pt: pt[0]):
            inits.insert(min(pos, len(inits)), tensor)
        inits += appended
        del graph.sparse_initializer[:]
        del graph.initializer[:]
        graph.initializer.extend(inits)
    _drop_metadata(out)
    _run_checker(out, "densify")
    logger.info("densified %s", "csr weights" if meta and meta["format"] == "csr" else "sparse initializers")
    return out


def csr_weights(model: onnx.ModelProto) -> Dict[str, "scipy.sparse.csr_matrix"]:  # noqa: F821
    """Sparse weights of ``model`` as SciPy CSR matrices over their 2-D views.

    For a weight of shape ``(d0, d1, ..., dk)`` the matrix has shape ``(d0, d1 * ... * dk)``;
    ``matrix.toarray().reshape(shape)`` is the weight. Covers our CSR weights (values in the
    weight's own type, i.e. fp16-stored values are returned cast back as the decode does) and
    every ``sparse_initializer``. Dense initializers are not included; a model without sparse
    weights gives an empty dict.
    """
    import scipy.sparse

    _check_model_arg(model)
    out: Dict[str, scipy.sparse.csr_matrix] = {}
    meta = _read_metadata(model)
    if meta is not None and meta["format"] == "csr":
        for name, (vals, idx, ptr, shape, dtype) in _csr_entries(model, meta).items():
            rows, cols = _view_2d(shape)
            _decode_csr_numpy(vals, idx, ptr, shape, dtype)  # validates the arrays
            out[name] = scipy.sparse.csr_matrix(
                (vals.astype(dtype), idx.astype(np.int64), ptr.astype(np.int64)), shape=(rows, cols)
            )
    for sp in model.graph.sparse_initializer:
        arr = _sparse_to_dense(sp)
        rows, cols = _view_2d(arr.shape) if arr.ndim else (1, 1)
        out[sp.values.name] = scipy.sparse.csr_matrix(arr.reshape(rows, cols))
    return out


def _prunability(model: onnx.ModelProto):
    """What ``prune`` would see: the analysis of the prepared training copy (rewrites and
    re-ties included); the plain analysis when the model cannot be prepared (a CSR file)."""
    from .errors import AdmmOnnxError
    from .pipeline import prepare_model

    try:
        return prepare_model(model).info
    except (AdmmOnnxError, onnx.checker.ValidationError, ValueError):
        return analyse(model)


def inspect_model(model: onnx.ModelProto) -> WeightTable:
    """Per-weight sparsity and storage of ``model`` (dense, our CSR, or sparse_initializer).

    Rows (:class:`WeightRow`) cover every float initializer of ndim >= 2, every CSR weight and
    every sparse initializer, in graph order; ``op`` lists the op types reading the weight
    (decode nodes excluded); ``prunable`` says "yes" or why admm-onnx would not prune a dense
    weight. ``.totals`` sums them.
    """
    _check_model_arg(model)
    graph = model.graph
    meta = _read_metadata(model)
    csr = _csr_entries(model, meta) if meta is not None and meta["format"] == "csr" else {}
    skip = {i for i, nd in enumerate(graph.node) if _is_decode_node(nd, csr)} if csr else set()
    consumers = _consumers(graph, skip)
    csr_names = set().union(*(_decode_tensor_names(n) for n in csr)) if csr else set()
    info = _prunability(model)
    table = WeightTable()
    for tensor in graph.initializer:
        name = tensor.name
        if name.endswith(SUFFIX_VALUES) and name[: -len(SUFFIX_VALUES)] in csr:
            w = name[: -len(SUFFIX_VALUES)]
            vals, idx, ptr, shape, dtype = csr[w]
            count = int(np.prod(shape, dtype=np.int64))
            table.append(WeightRow(
                w, ",".join(consumers.get(w, [])), shape, count, int(np.count_nonzero(vals)),
                _storage_name("csr", vals.dtype), int(vals.nbytes + idx.nbytes + ptr.nbytes),
                count * dtype.itemsize,
            ))
            continue
        if name in csr_names or tensor.data_type not in _FLOAT_TYPES or len(tensor.dims) < 2:
            continue
        arr = _to_array(tensor)
        why = "yes" if name in info.prunable else info.not_prunable.get(name, "")
        table.append(WeightRow(name, ",".join(consumers.get(name, [])), tuple(arr.shape), int(arr.size),
                               int(np.count_nonzero(arr)), "dense", int(arr.nbytes), int(arr.nbytes), why))
    for sp in graph.sparse_initializer:
        vals = _to_array(sp.values)
        idx = _to_array(sp.indices)
        shape = tuple(int(d) for d in sp.dims)
        count = int(np.prod(shape, dtype=np.int64))
        table.append(WeightRow(sp.values.name, ",".join(consumers.get(sp.values.name, [])), shape, count,
                               int(np.count_nonzero(vals)), "coo", int(vals.nbytes + idx.nbytes),
                               count * vals.dtype.itemsize))
    return table


# --------------------------------------------------------------------------------------------
# Checking outputs
# --------------------------------------------------------------------------------------------


def sample_feeds(model: onnx.ModelProto, seed: int = 0) -> Dict[str, np.ndarray]:
    """A random batch for every real input of ``model`` (symbolic dims set to 1): standard
    normal floats, integers in [0, 10) for integer inputs (token ids)."""
    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    feeds = {}
    for value in model.graph.input:
        if value.name in inits:
            continue
        tt = value.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1 for d in tt.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if np.issubdtype(dtype, np.integer):
            feeds[value.name] = rng.integers(0, 10, shape).astype(dtype)
        else:
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def max_output_change(dense_model: onnx.ModelProto, sparse_model: onnx.ModelProto,
                      feeds: Mapping[str, np.ndarray]) -> float:
    """Largest absolute difference over all outputs of the two models on ``feeds``.

    Both run in ``onnxruntime.InferenceSession`` on CPU with default options. 0.0 means
    identical outputs (NaNs in the same places count as equal). Models must fit in one
    protobuf (< 2 GB in memory).
    """
    import onnxruntime as ort

    results = []
    for m in (dense_model, sparse_model):
        _check_model_arg(m)
        try:
            sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
            results.append(sess.run(None, dict(feeds)))
        except Exception as exc:  # ORT raises its own exception types
            raise ModelError(f"onnxruntime could not run the model: {' '.join(str(exc).split())}") from exc
    worst = 0.0
    for a, b in zip(*results):
        a = np.asarray(a, np.float64)
        b = np.asarray(b, np.float64)
        if a.shape != b.shape:
            raise ModelError(f"output shapes differ: {a.shape} vs {b.shape}")
        diff = np.abs(a - b)
        diff[np.isnan(a) & np.isnan(b)] = 0.0
        if diff.size:
            worst = max(worst, float(np.max(diff)))
    return worst
