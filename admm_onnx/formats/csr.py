"""``csr``: each sparse weight as CSR arrays plus a decode function of standard ONNX ops.

Each selected weight ``W`` of shape ``(d0, d1, ..., dk)`` is viewed as the 2-D matrix
``M = W.reshape(d0, d1 * ... * dk)`` (R rows, C columns) and stored as three ordinary
initializers in CSR form (see :func:`encode_csr`):

- ``<name>.csr_values``  the stored entries of ``M`` in row-major order (fp32, i.e. the weight's
  own float type, or fp16 when asked: lossy);
- ``<name>.csr_indices`` their column numbers, in the narrowest unsigned integer type that holds
  ``C - 1`` (uint8 / uint16 / uint32 / uint64);
- ``<name>.csr_indptr``  the R + 1 row pointers, in the narrowest unsigned type holding ``nnz``.

The stored entries are the nonzeros (below opset 16 also one explicit zero at column 0 in each
row without nonzeros, see :func:`decode_function`). A decode function of standard operators rebuilds
the dense weight under its *original* name, so every other node is untouched: its body is stored
once as the model-local function ``CsrDecode`` (domain :data:`DOMAIN`, :func:`decode_function`)
and each weight costs one call node ``W = CsrDecode(values, indices, indptr, shape)``, ``shape``
being a small int64 initializer ``<name>.csr_shape``. Zeros come from ``ConstantOfShape`` at
load, never stored. The decode copies the stored values bit for bit (``ScatterElements`` without
reduction at distinct positions), so fp32 storage is exact.

Folding in onnxruntime: every node of the decode has an output shape that ONNX shape inference
knows once its inputs are constants, so onnxruntime's constant folding (on by default, graph
optimisation level basic and above) replaces the whole decode by the dense weight at session
creation, in 1.19 as in 1.27+. (onnxruntime >= 1.27 skips folding any node whose output size it
cannot estimate before running it, a guard against huge constants, PR 28055: ``Compress`` and
``NonZero`` have data-dependent output shapes and are never folded there. The first version of
this decode used ``Compress`` and ran unfolded in 1.32, 6x slower than dense.) Inference then
runs the usual dense kernels, with the weights as constants (pre-packed), and outputs equal the
dense model's bit for bit.

Opset and IR: the body uses only operators that mean the same (as used here) from opset 11 to 21
(Constant, Cast, Slice, Div, ReduceProd without axes, Expand, Shape, ConstantOfShape,
ScatterElements, with ``reduction="add"`` from opset 16 on, CumSum, Add, Reshape) and imports the model's own
default-domain opset; models below opset 11 are refused. Model-local functions need IR 8: a
model with IR 4..7 is raised to IR 8 and the opset import ``admm_onnx.sparse`` version 1 is added;
decoding undoes both.

The encoded weights are tagged three ways: the initializer name suffixes, the ``CsrDecode`` call
nodes, and the ``metadata_props`` entry :data:`~admm_onnx.formats.base.METADATA_KEY` (JSON:
original shape and element type of each weight, original IR version).
"""
from __future__ import annotations

import json
from typing import Dict, Iterable, List, Mapping, Sequence, Set, Tuple

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import ConfigError, ModelError
from . import register
from .base import (
    METADATA_KEY,
    _FLOAT_TYPES,
    ExportReport,
    Format,
    StoredWeight,
    WeightRow,
    _all_names,
    _check_domain_free,
    _check_model_arg,
    _default_opset,
    _finish_encode,
    _narrowest_unsigned,
    _read_metadata,
    _replace_graph_content,
    _require_opset,
    _run_checker,
    _to_array,
    _undo_encoding,
    _view_2d,
    check_min_sparsity,
    copy_model,
    logger,
    select_weights,
)

VALUE_TYPES = ("fp32", "fp16")
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
#: 1: decode with Compress (not folded by onnxruntime >= 1.27); 2: no Compress (see decode_function).
VERSION = 2
_FP16_MAX = float(np.finfo(np.float16).max)


def encode_csr(dense: np.ndarray, pad_empty_rows: bool = False) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR arrays of the 2-D view of ``dense``.

    Contract: with ``M = dense.reshape(R, C)``, ``values[k]`` is the k-th stored entry of ``M``
    in row-major order, ``indices[k]`` its column, and row ``r`` owns entries
    ``indptr[r] : indptr[r + 1]``; so ``M[r, indices[k]] = values[k]`` for those k and every
    other entry is zero. The stored entries are the nonzeros; with ``pad_empty_rows`` a row
    without nonzeros also stores one explicit zero at column 0, so no range is empty and
    ``indptr[:-1]`` is strictly increasing (what the decode needs below opset 16). Index arrays
    use the narrowest unsigned type that fits.
    """
    rows, cols = _view_2d(dense.shape)
    mat = dense.reshape(rows, cols)
    keep = mat != 0
    if pad_empty_rows and cols:
        keep[~keep.any(axis=1), 0] = True
    r_idx, c_idx = np.nonzero(keep)
    values = np.where(mat[r_idx, c_idx] != 0, mat[r_idx, c_idx], np.zeros((), mat.dtype)).astype(mat.dtype)
    indptr = np.zeros(rows + 1, np.int64)
    np.cumsum(np.bincount(r_idx, minlength=rows), out=indptr[1:])
    nnz = int(values.size)
    indices = c_idx.astype(_narrowest_unsigned(max(cols - 1, 0)))
    indptr = indptr.astype(_narrowest_unsigned(nnz))
    return values, indices, indptr


def decode_csr_numpy(values: np.ndarray, indices: np.ndarray, indptr: np.ndarray, shape: Sequence[int],
                     dtype: np.dtype) -> np.ndarray:
    """NumPy twin of the decode (any valid CSR arrays, empty rows or not)."""
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


#: From this opset on ScatterElements can add (``reduction="add"``): rows may be empty.
ADD_OPSET = 16


def decode_function(opset: int) -> onnx.FunctionProto:
    """The model-local function ``W = CsrDecode<to>(values, indices, indptr, shape)``.

    Math (integer steps in int64), with ``ip = indptr``, ``R = shape[0]``, ``N = prod(shape)``
    and ``C = N / R``:

    1. Row offsets: ``marks[ip[r]] += C`` for r = 1..R-1, then ``CumSum(marks)[k] = row(k) * C``
       for every stored entry k. From opset 16 on this is ``ScatterElements(reduction="add")``
       into ``nnz + 1`` zeros (empty rows make starts repeat, trailing ones point at ``nnz``;
       integer adds are exact and order-free), then the first ``nnz`` kept. Below opset 16 the
       encoder stored every row nonempty (:func:`encode_csr` with ``pad_empty_rows``), so the
       starts are distinct and below ``nnz`` and a plain ScatterElements into ``nnz`` zeros does.
    2. ``lin = CumSum(marks) + indices``: the flat position of each entry in the R*C view.
    3. ``W = Reshape(ScatterElements(zeros(N), lin, Cast<to>(values)), shape)``, zeros from
       ConstantOfShape. Positions are distinct, so the result is bit-exact and independent of
       write order. The Cast is a no-op copy for values stored in the weight's own type; for
       fp16 storage it is where the rounded values come back to the weight's type.

    No node has a data-dependent output shape (no Compress, NonZero), so onnxruntime's constant
    folding evaluates all of it at session creation.
    """
    i64 = TensorProto.INT64
    add = opset >= ADD_OPSET

    def const(name: str, values, dims) -> onnx.NodeProto:
        return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, i64, dims, values))

    # helper.make_attribute_ref (onnx 1.17) leaves ref_attr_name unset: build it by hand.
    cast_to = onnx.AttributeProto(name="to", ref_attr_name="to", type=onnx.AttributeProto.INT)
    n = helper.make_node
    body = [
        const("c0", [0], [1]),
        const("c1", [1], [1]),
        const("cm1", [-1], [1]),
        const("z", [0], []),  # CumSum axis
        n("Cast", ["indptr"], ["ip"], to=i64),
        n("Slice", ["ip", "c1", "cm1"], ["st"]),  # starts of rows 1..R-1
        n("Slice", ["shape", "c0", "c1"], ["R"]),
        n("ReduceProd", ["shape"], ["N"], keepdims=1),
        n("Div", ["N", "R"], ["C"]),
        n("Shape", ["st"], ["ns"]),
        n("Expand", ["C", "ns"], ["d"]),  # C for each of those rows
        n("Shape", ["values"], ["nz"]),
    ]
    if add:
        body += [
            n("Add", ["nz", "c1"], ["nz1"]),
            n("ConstantOfShape", ["nz1"], ["mz"], value=helper.make_tensor("v", i64, [1], [0])),
            n("ScatterElements", ["mz", "st", "d"], ["mk1"], axis=0, reduction="add"),
            n("Slice", ["mk1", "c0", "nz"], ["mk"]),
        ]
    else:
        body += [
            n("ConstantOfShape", ["nz"], ["mz"], value=helper.make_tensor("v", i64, [1], [0])),
            n("ScatterElements", ["mz", "st", "d"], ["mk"], axis=0),
        ]
    body += [
        n("CumSum", ["mk", "z"], ["ro"]),  # row(k) * C
        n("Cast", ["indices"], ["ci"], to=i64),
        n("Add", ["ro", "ci"], ["lin"]),  # flat position of each entry
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


def decode_call(name: str, orig_type: int) -> onnx.NodeProto:
    """The call node rebuilding weight ``name`` (of ONNX element type ``orig_type``)."""
    return helper.make_node(
        DECODE_OP,
        [name + SUFFIX_VALUES, name + SUFFIX_INDICES, name + SUFFIX_INDPTR, name + SUFFIX_SHAPE],
        [name], domain=DOMAIN, to=orig_type,
    )


def decode_tensor_names(name: str) -> Set[str]:
    return {name + s for s in (SUFFIX_VALUES, SUFFIX_INDICES, SUFFIX_INDPTR, SUFFIX_SHAPE)}


def is_decode_node(node: onnx.NodeProto, weights: Iterable[str]) -> bool:
    """A ``CsrDecode`` call writing one of ``weights``."""
    return node.domain == DOMAIN and node.op_type == DECODE_OP and any(o in weights for o in node.output)


def storage_name(values_dtype: np.dtype) -> str:
    return "csr-fp" + str(np.dtype(values_dtype).itemsize * 8)


def csr_entries(model: onnx.ModelProto, meta: dict) -> Dict[str, Tuple[np.ndarray, np.ndarray, np.ndarray, Tuple[int, ...], np.dtype]]:
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
        stored_shape = inits.get(name + SUFFIX_SHAPE)
        if stored_shape is not None and tuple(int(d) for d in _to_array(stored_shape).reshape(-1)) != shape:
            # the decode function builds the weight from this one: it must be the metadata's
            raise ModelError(f"CSR weight {name!r}: {name + SUFFIX_SHAPE} {[int(d) for d in _to_array(stored_shape).reshape(-1)]} "
                             f"does not match its shape {list(shape)}", hint="export the file again")
        idx, ptr = arrays[1].astype(np.int64, copy=False), arrays[2].astype(np.int64, copy=False)
        if (idx.size and idx.min() < 0) or (ptr.size and ptr.min() < 0):
            raise ModelError(f"CSR weight {name!r} has negative indices", hint="export the file again")
        out[name] = (*arrays, shape, dtype)
    return out


class Csr(Format):
    name = "csr"
    summary = "CSR arrays + a decode function of standard ops that onnxruntime folds at load"
    limits = (
        "The decode is folded by onnxruntime's constant folding (graph optimisation level basic or "
        "above, the default); with optimisations disabled it runs at every call. onnxruntime >= 1.27 "
        "does not fold a node whose output exceeds optimization.constant_folding_max_output_size_in_bytes "
        "(default 1 GB): a weight above 1 GB (or 128 M entries, whose int64 positions exceed it) stays a "
        "per-call decode. onnxslim folds the decode into a dense initializer (the file grows back to "
        "dense); saving onnxruntime's optimized model (optimized_model_filepath) writes the dense weights."
    )
    options = ("min_sparsity", "values")

    def encode(self, model: onnx.ModelProto, min_sparsity: float = 0.5, values: str = "fp32", **options):
        """Return a copy of ``model`` with its sparse weights in CSR form, and a report.

        A weight is a float initializer (float32/float16/float64) of ndim >= 2 of the main graph,
        encoded when its fraction of exact zeros is at least ``min_sparsity``. ``values="fp16"``
        stores the nonzeros as float16 (lossy; :func:`admm_onnx.formats.tables.max_output_change`
        measures it). Raises :class:`ConfigError` for bad options and :class:`ModelError` when no
        weight is sparse enough or the model cannot carry the format (opset < 11, IR < 4, already
        encoded).
        """
        self.check_options({**options, "min_sparsity": min_sparsity, "values": values})
        if values not in VALUE_TYPES:
            raise ConfigError(f"unknown value type {values!r}; choose one of {', '.join(VALUE_TYPES)}")
        min_sparsity = check_min_sparsity(min_sparsity)
        _check_model_arg(model)
        if _read_metadata(model) is not None or len(model.graph.sparse_initializer):
            raise ModelError("the model already has sparse weights", hint="densify it first")
        _require_opset(model, "csr", MIN_CSR_OPSET)
        _check_domain_free(model, DOMAIN, hint="densify it first")
        if model.ir_version < 4:
            raise ModelError(f"csr export needs IR version >= 4, the model has {model.ir_version}")
        out = copy_model(model)
        report = ExportReport(format="csr", values=values, min_sparsity=min_sparsity,
                              model_bytes_before=model.ByteSize())
        taken = _all_names(out.graph)

        def clash(name):
            return "a CSR array name is already used in the graph" if decode_tensor_names(name) & taken else None

        selected = select_weights(out, report, min_sparsity, clash)
        if values == "fp16":
            for name, arr in selected.items():
                big = float(np.max(np.abs(arr[np.isfinite(arr)]), initial=0.0))
                if big > _FP16_MAX:
                    raise ConfigError(f"weight {name!r} has values beyond the fp16 range (max |w| = {big:g})",
                                      hint="use --values fp32")
        self._apply(out, selected, values, {r.name: r for r in report.rows})
        _finish_encode(out, report, len(selected))
        return out, report

    @staticmethod
    def _apply(model: onnx.ModelProto, selected: Mapping[str, np.ndarray], values: str,
               rows_by_name: Mapping[str, WeightRow]) -> None:
        graph = model.graph
        new_inits: List[TensorProto] = []
        calls: List[onnx.NodeProto] = []
        meta_weights = {}
        for tensor in graph.initializer:
            arr = selected.get(tensor.name)
            if arr is None:
                new_inits.append(tensor)
                continue
            name = tensor.name
            vals, indices, indptr = encode_csr(arr, pad_empty_rows=_default_opset(model) < ADD_OPSET)
            if values == "fp16":
                vals = vals.astype(np.float16)
            new_inits += [
                numpy_helper.from_array(vals, name + SUFFIX_VALUES),
                numpy_helper.from_array(indices, name + SUFFIX_INDICES),
                numpy_helper.from_array(indptr, name + SUFFIX_INDPTR),
                numpy_helper.from_array(np.array(arr.shape, np.int64), name + SUFFIX_SHAPE),
            ]
            calls.append(decode_call(name, tensor.data_type))
            meta_weights[name] = {"shape": list(arr.shape), "dtype": int(tensor.data_type)}
            row = rows_by_name[name]
            row.storage = storage_name(vals.dtype)
            row.bits = vals.dtype.itemsize * 8
            row.stored_bytes = int(vals.nbytes + indices.nbytes + indptr.nbytes)
        _replace_graph_content(graph, new_inits, calls + list(graph.node))
        model.functions.append(decode_function(_default_opset(model)))
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
        meta = {"version": VERSION, "format": "csr", "values": values, "ir_version": int(model.ir_version),
                "weights": meta_weights}
        model.ir_version = max(model.ir_version, MIN_FUNCTION_IR)
        model.metadata_props.add(key=METADATA_KEY, value=json.dumps(meta, separators=(",", ":")))

    def decode(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """A copy with every CSR weight a dense initializer at the place of its CSR arrays; the
        decode calls, CSR arrays, function, opset import and metadata removed, the IR restored.
        For an fp32 export the initializers equal the original model's (up to the sign of zeros);
        for fp16 they are the rounded values the decode computes."""
        _check_model_arg(model)
        meta = _read_metadata(model)
        out = copy_model(model)
        graph = out.graph
        entries = csr_entries(out, meta)
        dense = {n: decode_csr_numpy(v, i, p, s, d) for n, (v, i, p, s, d) in entries.items()}
        drop = set().union(*(decode_tensor_names(n) for n in dense)) if dense else set()
        new_inits = []
        for tensor in graph.initializer:
            name = tensor.name
            if name.endswith(SUFFIX_VALUES) and name[: -len(SUFFIX_VALUES)] in dense:
                w = name[: -len(SUFFIX_VALUES)]
                new_inits.append(numpy_helper.from_array(dense[w], w))
            elif name not in drop:
                new_inits.append(tensor)
        nodes = [nd for nd in graph.node if not is_decode_node(nd, dense)]
        _replace_graph_content(graph, new_inits, nodes)
        # The function and opset import stay while a decode call of ours is left in the graph.
        in_use = any(nd.domain == DOMAIN for nd in graph.node)
        _undo_encoding(out, meta, None if in_use else DOMAIN)
        _run_checker(out, "densify")
        logger.info("densified csr weights")
        return out

    def stored(self, model: onnx.ModelProto) -> Dict[str, StoredWeight]:
        meta = _read_metadata(model)
        out = {}
        for name, (vals, idx, ptr, shape, dtype) in csr_entries(model, meta).items():
            out[name] = StoredWeight(
                name, decode_csr_numpy(vals, idx, ptr, shape, dtype), storage_name(vals.dtype),
                int(vals.nbytes + idx.nbytes + ptr.nbytes), vals.dtype.itemsize * 8,
                anchor=name + SUFFIX_VALUES, tensors=decode_tensor_names(name),
            )
        return out

    def decode_nodes(self, model: onnx.ModelProto) -> Set[int]:
        weights = set(csr_entries(model, _read_metadata(model)))
        return {i for i, nd in enumerate(model.graph.node) if is_decode_node(nd, weights)}


CSR = register(Csr())
