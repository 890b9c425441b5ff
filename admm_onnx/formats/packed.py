"""``packed``: delta-coded positions and k-bit integer levels, bit-packed into uint8 initializers.

For storage and transmission: the smallest file, decoded by standard ONNX ops that onnxruntime
folds at session creation (so inference runs dense kernels on the exact weights).

Per encoded weight ``W`` (flattened in C order, ``N`` entries):

- *positions* of the stored entries as gaps: entry i sits at ``pos[i] = pos[i-1] + 1 + g[i]``
  (``pos[-1] = -1``), each ``g[i]`` in ``[0, 2^b - 1]``, ``b`` in 1..8 chosen per weight to
  minimise the bytes. A gap too long for ``b`` bits is bridged by *filler* entries holding the
  value 0 (as in Deep Compression's relative indices): stored entries = nonzeros + fillers.
- values, one of:

  - *levels* (a weight with a quantization spec: ``W = float32(q) * float32(scale)``, integer
    ``q`` in ``[-L, L]``, ``L = 2^(k-1) - 1``, from ``admm-onnx prune --bits``): the code
    ``q + L`` in ``k`` bits, and ``<W>.s`` the float32 scale (shape ``[]`` per tensor, or the
    weight's rank with only the channel axis kept: per channel);
  - *raw* (no spec): ``<W>.v``, the stored values in the weight's own float type.

- ``<W>.p`` (uint8): one field per entry, LSB first: ``g + (q + L) * 2^b`` in ``b + k`` bits
  for levels, ``g`` in ``b`` bits for raw values.
- ``<W>.m`` (int32): ``[b, k, entries, L, *shape]`` (``k = L = 0`` for raw values).

Decode (model-local functions ``PackedQ`` / ``PackedF``, domain :data:`DOMAIN`, stored once;
one call node per weight writes the weight under its own name): bytes -> bits by
``BitShift(RIGHT)`` and ``Mod 2`` on uint8, bits -> field integers by a float ``MatMul`` with
powers of two (exact: below 2^16), fields split by a division by ``2^b`` and ``Floor`` (exact),
gaps -> positions by ``CumSum`` in int64, then ``ScatterElements`` of the values
(``code - L`` for levels) into zeros, ``Reshape``, and for levels a ``Mul`` by the scale: the
same single float32 multiply that produced the weights, so the decoded weight equals the dense
one bit for bit (a zero entry becomes ``+0.0``). No node has a data-dependent output shape, so
onnxruntime (1.19 and >= 1.27 alike) folds it all.

Needs opset >= 11 (BitShift, CumSum, ScatterElements) and raises IR to 8 (functions) like
``csr``. Limits: like ``csr`` (folding needs graph optimisations on; a node output above 1 GB is
not folded by onnxruntime >= 1.27; onnxslim and ORT's optimized-model output write the dense
weights back); the int32 metadata caps a weight at 2^31 - 1 entries.
"""
from __future__ import annotations

import json
from typing import Dict, List, Mapping, Optional, Set, Tuple

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import ConfigError, ModelError
from ..quantization import METADATA_KEY as QUANT_KEY
from ..quantization import QuantSpec, max_level, read_quantization, to_integers
from . import register
from .base import (
    METADATA_KEY,
    ExportReport,
    Format,
    StoredWeight,
    _all_names,
    _check_domain_free,
    _check_model_arg,
    _finish_encode,
    _read_metadata,
    _replace_graph_content,
    _require_opset,
    _run_checker,
    _to_array,
    _undo_encoding,
    check_min_sparsity,
    copy_model,
    select_weights,
)

DOMAIN = "admm_onnx.packed"
OP_LEVELS = "PackedQ"
OP_RAW = "PackedF"
MIN_OPSET = 11
MIN_FUNCTION_IR = 8
SUFFIXES = (".p", ".s", ".v", ".m")
MAX_POSITION_BITS = 8


# --------------------------------------------------------------------------------------------
# Bit packing (NumPy side)
# --------------------------------------------------------------------------------------------


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """``values`` (non-negative integers below ``2**bits``) as ``bits``-bit fields, LSB first,
    in a uint8 array of ``ceil(len * bits / 8)`` bytes."""
    v = np.asarray(values, dtype=np.int64).reshape(-1)
    if v.size and (v.min() < 0 or v.max() >= 1 << bits):
        raise ValueError(f"values do not fit in {bits} bits")
    fields = (v[:, None] >> np.arange(bits)) & 1
    return np.packbits(fields.astype(np.uint8).reshape(-1), bitorder="little")


def unpack_bits(data: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits` (int64)."""
    flat = np.unpackbits(np.asarray(data, dtype=np.uint8), bitorder="little")[: count * bits]
    if flat.size != count * bits:
        raise ModelError("packed array shorter than its entry count")
    return flat.reshape(count, bits).astype(np.int64) @ (1 << np.arange(bits, dtype=np.int64))


def entries_for(positions: np.ndarray, bits: int) -> int:
    """Stored entries (nonzeros + fillers) when gaps have ``bits`` bits."""
    steps = np.diff(np.concatenate([[-1], positions.astype(np.int64)]))
    return int(np.sum(-(-steps // (1 << bits))))


def delta_code(positions: np.ndarray, bits: int) -> Tuple[np.ndarray, np.ndarray]:
    """(gaps g, index into the nonzeros or -1 for a filler) of sorted ``positions``."""
    reach = 1 << bits
    gaps: List[int] = []
    source: List[int] = []
    prev = -1
    for i, p in enumerate(positions.tolist()):
        step = p - prev
        while step > reach:
            gaps.append(reach - 1)
            source.append(-1)
            step -= reach
        gaps.append(step - 1)
        source.append(i)
        prev = p
    return np.asarray(gaps, np.int64), np.asarray(source, np.int64)


def positions_of(gaps: np.ndarray) -> np.ndarray:
    return np.cumsum(gaps.astype(np.int64) + 1) - 1


def best_position_bits(positions: np.ndarray, value_bits: int) -> int:
    """The gap width 1..8 giving the fewest bits in total (entries * (gap bits + value bits))."""
    costs = {b: entries_for(positions, b) * (b + value_bits) for b in range(1, MAX_POSITION_BITS + 1)}
    return min(costs, key=lambda b: (costs[b], b))


# --------------------------------------------------------------------------------------------
# Decode functions
# --------------------------------------------------------------------------------------------


def _decode_function(levels: bool, opset: int) -> onnx.FunctionProto:
    """``W = PackedQ(p, s, m)`` (levels) or ``W = PackedF<to>(p, v, m)`` (raw values).

    ``p`` holds one field of ``w`` bits per entry (LSB first): ``gap + code * 2^b`` for levels
    (``w = b + k``), ``gap`` for raw values (``w = b``). Bytes -> bits by BitShift/Mod on uint8,
    bits -> integers by a float MatMul with powers of two (exact: below 2^16), the field split
    by a division by ``2^b`` and Floor (exact: powers of two, small integers), gaps -> positions
    in int64. Every output shape follows from constant inputs: onnxruntime folds it all.
    """
    i64, f32 = TensorProto.INT64, TensorProto.FLOAT

    def const(name, dtype, dims, values):
        return helper.make_node("Constant", [], [name], value=helper.make_tensor("", dtype, dims, values))

    n = helper.make_node
    body = [
        const("c0", i64, [1], [0]),
        const("c1", i64, [1], [1]),
        const("c2", i64, [1], [2]),
        const("c3", i64, [1], [3]),
        const("c4", i64, [1], [4]),
        const("m1", i64, [1], [-1]),
        const("col", i64, [2], [-1, 1]),
        const("big", i64, [1], [2**62]),
        const("z", i64, [], [0]),
        const("sh8", TensorProto.UINT8, [1, 8], list(range(8))),
        const("two8", TensorProto.UINT8, [1], [2]),
        const("pw", f32, [16], [float(1 << i) for i in range(16)]),
        n("Cast", ["m"], ["mi"], to=i64),
        n("Slice", ["mi", "c0", "c1"], ["b"]),  # gap bits
        n("Slice", ["mi", "c2", "c3"], ["ne"]),  # entries
        n("Slice", ["mi", "c4", "big"], ["shape"]),
        n("ReduceProd", ["shape"], ["N"], keepdims=1),
    ]
    if levels:
        body += [
            n("Slice", ["mi", "c1", "c2"], ["k"]),  # level bits
            n("Slice", ["mi", "c3", "c4"], ["L"]),
            n("Add", ["b", "k"], ["w"]),
        ]
        width = "w"
    else:
        width = "b"
    body += [  # p -> ne integers u of `width` bits (float)
        n("Reshape", ["p", "col"], ["pc"]),  # [nbytes, 1]
        n("BitShift", ["pc", "sh8"], ["ps"], direction="RIGHT"),  # [nbytes, 8]
        n("Mod", ["ps", "two8"], ["pbit"]),
        n("Reshape", ["pbit", "m1"], ["bits"]),
        n("Mul", ["ne", width], ["nbits"]),
        n("Slice", ["bits", "c0", "nbits"], ["used"]),
        n("Concat", ["m1", width], ["fs"], axis=0),
        n("Reshape", ["used", "fs"], ["fm"]),  # [ne, width]
        n("Cast", ["fm"], ["ff"], to=f32),
        n("Slice", ["pw", "c0", width], ["pv"]),
        n("Reshape", ["pv", "col"], ["pvc"]),  # [width, 1]: 1, 2, 4, ...
        n("MatMul", ["ff", "pvc"], ["uc"]),
        n("Reshape", ["uc", "m1"], ["u"]),
    ]
    if levels:
        body += [
            n("Add", ["b", "c1"], ["b1"]),
            n("Slice", ["pw", "b", "b1"], ["P"]),  # 2^b
            n("Div", ["u", "P"], ["ud"]),
            n("Floor", ["ud"], ["code"]),
            n("Mul", ["code", "P"], ["hi"]),
            n("Sub", ["u", "hi"], ["gap"]),
        ]
        gap = "gap"
    else:
        gap = "u"
    body += [  # positions: CumSum(gap + 1) - 1
        n("Cast", [gap], ["gi"], to=i64),
        n("Add", ["gi", "c1"], ["g1"]),
        n("CumSum", ["g1", "z"], ["cs"]),
        n("Sub", ["cs", "c1"], ["pos"]),
    ]
    if levels:
        body += [
            n("Cast", ["L"], ["Lf"], to=f32),
            n("Sub", ["code", "Lf"], ["qf"]),  # exact: small integers
            n("ConstantOfShape", ["N"], ["zf"]),  # float32 zeros
            n("ScatterElements", ["zf", "pos", "qf"], ["flat"], axis=0),
            n("Reshape", ["flat", "shape"], ["qw"]),
            n("Mul", ["qw", "s"], ["W"]),  # float32(q) * float32(scale), as the weights were made
        ]
        inputs, attrs, name = ["p", "s", "m"], [], OP_LEVELS
    else:
        cast_to = onnx.AttributeProto(name="to", ref_attr_name="to", type=onnx.AttributeProto.INT)
        zc = n("Cast", ["zf"], ["zw"])
        zc.attribute.append(cast_to)
        body += [
            n("ConstantOfShape", ["N"], ["zf"]),
            zc,
            n("ScatterElements", ["zw", "pos", "v"], ["flat"], axis=0),  # copies the values
            n("Reshape", ["flat", "shape"], ["W"]),
        ]
        inputs, attrs, name = ["p", "v", "m"], ["to"], OP_RAW
    return helper.make_function(DOMAIN, name, inputs, ["W"], body,
                                opset_imports=[helper.make_opsetid("", opset)], attributes=attrs)


# --------------------------------------------------------------------------------------------
# Encoding one weight
# --------------------------------------------------------------------------------------------


def _scale_array(spec: QuantSpec, shape: Tuple[int, ...]) -> np.ndarray:
    scale = np.asarray(spec.scale, dtype=np.float32)
    if spec.axis is None:
        return scale.reshape(())
    dims = [1] * len(shape)
    dims[spec.axis % len(shape)] = scale.size
    return scale.reshape(dims)


def encode_weight(name: str, arr: np.ndarray, spec: Optional[QuantSpec]) -> Dict[str, np.ndarray]:
    """The initializers (suffix -> array) storing ``arr``; levels when ``spec`` is given."""
    if arr.size >= 2**31:
        raise ModelError(f"weight {name!r} has {arr.size} entries; packed stores at most 2^31 - 1")
    flat = arr.reshape(-1)
    positions = np.flatnonzero(flat != 0)
    if spec is not None:
        if arr.dtype != np.float32:
            raise ModelError(f"weight {name!r} is {arr.dtype}; k-bit levels are float32 weights")
        try:
            q = to_integers(arr, spec).reshape(-1).astype(np.int64)
        except ValueError as exc:
            raise ModelError(f"weight {name!r}: {exc}", hint="export the model the quantized run wrote") from None
        L = max_level(spec.bits)
        vbits = spec.bits
    else:
        L, vbits = 0, 0
    pb = best_position_bits(positions, vbits if spec is not None else arr.dtype.itemsize * 8)
    gaps, source = delta_code(positions, pb)
    if spec is not None:
        codes = np.where(source >= 0, q[positions[np.maximum(source, 0)]] if positions.size else 0, 0) + L
        out = {".p": pack_bits(gaps + (codes << pb), pb + vbits), ".s": _scale_array(spec, arr.shape)}
    else:
        out = {".p": pack_bits(gaps, pb)}
        vals = flat[positions[np.maximum(source, 0)]] if positions.size else flat[:0]
        out[".v"] = np.where(source >= 0, vals, np.zeros((), arr.dtype)).astype(arr.dtype)
    out[".m"] = np.array([pb, vbits, gaps.size, L, *arr.shape], np.int32)
    return out


def decode_weight(parts: Mapping[str, np.ndarray], dtype=np.float32) -> np.ndarray:
    """NumPy twin of the decode functions."""
    meta = parts[".m"].astype(np.int64)
    pb, vbits, count, L = (int(x) for x in meta[:4])
    shape = tuple(int(d) for d in meta[4:])
    levels = ".s" in parts
    fields = unpack_bits(parts[".p"], pb + (vbits if levels else 0), count)
    pos = positions_of(fields & ((1 << pb) - 1))
    size = int(np.prod(shape, dtype=np.int64))
    if pos.size and (pos.max() >= size or pos.min() < 0):
        raise ModelError("packed position out of range")
    if levels:
        qf = np.zeros(size, np.float32)
        qf[pos] = ((fields >> pb) - L).astype(np.float32)
        return qf.reshape(shape) * parts[".s"].astype(np.float32)
    flat = np.zeros(size, dtype)
    flat[pos] = parts[".v"]
    return flat.reshape(shape)


# --------------------------------------------------------------------------------------------
# The format
# --------------------------------------------------------------------------------------------


def _specs(model: onnx.ModelProto, quantization) -> Dict[str, QuantSpec]:
    if quantization is None:
        from ..quantization import model_quantization

        return model_quantization(model)
    if isinstance(quantization, Mapping) and all(isinstance(v, QuantSpec) for v in quantization.values()):
        return dict(quantization)
    try:
        return read_quantization(quantization)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"cannot read the quantization specs: {exc}") from None


class Packed(Format):
    name = "packed"
    summary = ("delta-coded positions + k-bit levels (quantized weights) or raw values, bit-packed; "
               "the smallest file, folded by onnxruntime at load")
    limits = __doc__.split("Limits: ")[1].strip()
    options = ("min_sparsity", "quantization")

    def encode(self, model: onnx.ModelProto, min_sparsity: float = 0.5, quantization=None, **options):
        """Copy of ``model`` with its quantized weights (specs from ``quantization``: a report
        dict/path, {name: QuantSpec}, or by default the specs recorded in the model) stored as
        k-bit levels, and its other weights of sparsity >= ``min_sparsity`` with raw values."""
        self.check_options({**options, "min_sparsity": min_sparsity, "quantization": quantization})
        min_sparsity = check_min_sparsity(min_sparsity)
        _check_model_arg(model)
        if _read_metadata(model) is not None or len(model.graph.sparse_initializer):
            raise ModelError("the model already has encoded weights", hint="densify it first")
        opset = _require_opset(model, "packed", MIN_OPSET)
        if model.ir_version < 4:
            raise ModelError(f"packed export needs IR version >= 4, the model has {model.ir_version}")
        _check_domain_free(model, DOMAIN)
        specs = _specs(model, quantization)
        inits = {t.name for t in model.graph.initializer}
        unknown = sorted(set(specs) - inits)
        if unknown and quantization is not None:
            raise ConfigError(f"quantization specs name weights the model does not have: {', '.join(unknown[:5])}")
        specs = {k: v for k, v in specs.items() if k in inits}
        out = copy_model(model)
        report = ExportReport(format="packed", values="levels" if specs else "fp32", min_sparsity=min_sparsity,
                              model_bytes_before=model.ByteSize())
        taken = _all_names(out.graph)

        def clash(name):
            return "a packed array name is already used in the graph" if tensor_names(name) & taken else None

        selected = select_weights(out, report, min_sparsity, clash, always=specs)
        rows = {r.name: r for r in report.rows}
        graph = out.graph
        new_inits: List[TensorProto] = []
        calls: List[onnx.NodeProto] = []
        used = set()
        for tensor in graph.initializer:
            arr = selected.get(tensor.name)
            if arr is None:
                new_inits.append(tensor)
                continue
            name = tensor.name
            spec = specs.get(name)
            parts = encode_weight(name, arr, spec)
            new_inits += [numpy_helper.from_array(a, name + s) for s, a in parts.items()]
            if spec is not None:
                calls.append(helper.make_node(OP_LEVELS, [name + s for s in (".p", ".s", ".m")], [name],
                                              domain=DOMAIN))
                used.add(True)
            else:
                calls.append(helper.make_node(OP_RAW, [name + s for s in (".p", ".v", ".m")], [name],
                                              domain=DOMAIN, to=tensor.data_type))
                used.add(False)
            row = rows[name]
            row.storage, row.bits = storage_of(parts, arr.dtype)
            row.stored_bytes = sum(int(a.nbytes) for s, a in parts.items() if s != ".m")
        _replace_graph_content(graph, new_inits, calls + list(graph.node))
        for levels in sorted(used):
            out.functions.append(_decode_function(levels, opset))
        out.opset_import.append(helper.make_opsetid(DOMAIN, 1))
        # The scales now live in the file's .s tensors: drop the (large, JSON) spec record.
        keep = [p for p in out.metadata_props if p.key != QUANT_KEY]
        del out.metadata_props[:]
        out.metadata_props.extend(keep)
        meta = {"version": 1, "format": "packed", "ir_version": int(out.ir_version)}
        if any(p.key == QUANT_KEY for p in model.metadata_props):
            meta["quantization"] = True
        out.ir_version = max(out.ir_version, MIN_FUNCTION_IR)
        out.metadata_props.add(key=METADATA_KEY, value=json.dumps(meta, separators=(",", ":")))
        _finish_encode(out, report, len(selected))
        return out, report

    # -- reading back -------------------------------------------------------------------------

    @staticmethod
    def _calls(model: onnx.ModelProto) -> List[Tuple[int, onnx.NodeProto]]:
        return [(i, nd) for i, nd in enumerate(model.graph.node)
                if nd.domain == DOMAIN and nd.op_type in (OP_LEVELS, OP_RAW)]

    def _weights(self, model: onnx.ModelProto) -> Dict[str, Tuple[Dict[str, np.ndarray], np.dtype]]:
        inits = {t.name: t for t in model.graph.initializer}
        out = {}
        for _, nd in self._calls(model):
            name = nd.output[0]
            try:
                parts = {s: _to_array(inits[name + s]) for s in SUFFIXES if name + s in inits}
            except KeyError as exc:  # pragma: no cover - guarded by the membership test
                raise ModelError(f"packed weight {name!r} is incomplete: {exc}") from None
            need = {".p", ".m"} | ({".s"} if nd.op_type == OP_LEVELS else {".v"})
            if not need <= set(parts):
                raise ModelError(f"packed weight {name!r} is incomplete: missing {sorted(need - set(parts))}")
            to = next((a.i for a in nd.attribute if a.name == "to"), TensorProto.FLOAT)
            out[name] = (parts, np.dtype(helper.tensor_dtype_to_np_dtype(to)))
        return out

    def decode(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """Dense initializers back at the place of their packed arrays; calls, functions, opset
        import and metadata removed, IR restored; quantization specs recorded again."""
        from ..quantization import QuantSpec as _Q
        from ..quantization import mark_model

        _check_model_arg(model)
        meta = _read_metadata(model) or {}
        weights = self._weights(model)
        dense = {n: decode_weight(p, d) for n, (p, d) in weights.items()}
        out = copy_model(model)
        graph = out.graph
        owned = set().union(*(tensor_names(n) for n in dense)) if dense else set()
        new_inits = []
        for t in graph.initializer:
            if t.name.endswith(".p") and t.name[:-2] in dense:
                new_inits.append(numpy_helper.from_array(dense[t.name[:-2]], t.name[:-2]))
            elif t.name not in owned:
                new_inits.append(t)
        calls = {i for i, _ in self._calls(model)}
        nodes = [nd for i, nd in enumerate(graph.node) if i not in calls]
        _replace_graph_content(graph, new_inits, nodes)
        _undo_encoding(out, meta, DOMAIN)
        specs = {}
        for name, (parts, _) in weights.items():
            if ".s" in parts:
                m = parts[".m"]
                s = parts[".s"]
                big = [i for i, d in enumerate(s.shape) if d > 1]
                axis = None if s.ndim == 0 else (big[0] if big else 0)
                specs[name] = _Q(int(m[1]), tuple(float(x) for x in s.reshape(-1)), axis)
        if specs and meta.get("quantization"):
            mark_model(out, specs)
        _run_checker(out, "densify")
        return out

    def stored(self, model: onnx.ModelProto) -> Dict[str, StoredWeight]:
        out = {}
        for name, (parts, dtype) in self._weights(model).items():
            storage, bits = storage_of(parts, dtype)
            out[name] = StoredWeight(name, decode_weight(parts, dtype), storage,
                                     sum(int(a.nbytes) for s, a in parts.items() if s != ".m"), bits,
                                     anchor=name + ".p", tensors=tensor_names(name))
        return out

    def decode_nodes(self, model: onnx.ModelProto) -> Set[int]:
        return {i for i, _ in self._calls(model)}


def tensor_names(name: str) -> Set[str]:
    return {name + s for s in SUFFIXES}


def storage_of(parts: Mapping[str, np.ndarray], dtype) -> Tuple[str, int]:
    """(storage label, bits per value) of a packed weight."""
    meta = parts[".m"]
    if ".s" in parts:
        scope = "tensor" if parts[".s"].size == 1 and parts[".s"].ndim == 0 else "channel"
        return f"packed-{int(meta[1])}bit/{scope} pos{int(meta[0])}", int(meta[1])
    bits = np.dtype(dtype).itemsize * 8
    return f"packed-fp{bits} pos{int(meta[0])}", bits


PACKED = register(Packed())


# --------------------------------------------------------------------------------------------
# Where the bytes of a packed file go
# --------------------------------------------------------------------------------------------


def _field_bytes(msg) -> int:
    """Serialized bytes of ``msg`` as a length-delimited field of its parent (tag + length + body)."""
    from google.protobuf.internal import encoder

    size = msg.ByteSize()
    return 1 + len(encoder._VarintBytes(size)) + size


def size_breakdown(model: onnx.ModelProto) -> Dict[str, int]:
    """Bytes of a ``packed`` file by part; the parts sum to ``model.ByteSize()``.

    ``positions`` / ``codes``: the bits of the packed fields that hold gaps / level codes (a
    field's bytes split in proportion to its bits; padding goes to positions); ``raw values``:
    values of weights without levels; ``scales``: the float32 scale tensors' data; ``tensor
    headers``: names, dims and types of those packed tensors plus their metadata (shapes,
    widths); ``other initializers``: everything else stored as initializers (biases), whole;
    ``decode functions``: the model-local functions; ``graph nodes``: every node (the decode
    calls included); ``rest``: graph inputs/outputs, value_info, opset imports, metadata, names.
    """
    _check_model_arg(model)
    out = {k: 0 for k in ("positions", "codes", "raw values", "scales", "tensor headers",
                          "other initializers", "decode functions", "graph nodes", "rest")}
    weights = PACKED._weights(model)
    owned: Dict[str, str] = {}
    for name, (parts, _) in weights.items():
        for tensor_name, role in _part_names(model, name).items():
            owned[tensor_name] = role
    meta_of = {name: parts[".m"] for name, (parts, _) in weights.items()}
    for t in model.graph.initializer:
        whole = _field_bytes(t)
        role = owned.get(t.name)
        if role is None:
            out["other initializers"] += whole
            continue
        data = len(t.raw_data) if t.HasField("raw_data") else 0
        out["tensor headers"] += whole - data
        if role == ".p":
            meta = meta_of[_owner(model, t.name)]
            b, k = int(meta[0]), int(meta[1])
            levels = ".s" in weights[_owner(model, t.name)][0]
            width = b + (k if levels else 0)
            used = int(meta[2]) * width
            code_bytes = (data * 8 * (k if levels else 0) // width) // 8 if used else 0
            out["codes"] += code_bytes
            out["positions"] += data - code_bytes
        elif role == ".s":
            out["scales"] += data
        elif role == ".v":
            out["raw values"] += data
        else:
            out["tensor headers"] += data
    out["decode functions"] = sum(_field_bytes(f) for f in model.functions)
    out["graph nodes"] = sum(_field_bytes(n) for n in model.graph.node)
    out["rest"] = model.ByteSize() - sum(out.values())
    return out


def _part_names(model: onnx.ModelProto, name: str) -> Dict[str, str]:
    """Initializer name -> role (``.p``/``.s``/``.v``/``.m``) of packed weight ``name``."""
    return {name + s: s for s in SUFFIXES}


def _owner(model: onnx.ModelProto, tensor_name: str) -> str:
    return tensor_name.rsplit(".", 1)[0]
