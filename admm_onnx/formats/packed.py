"""``packed``: Golomb-coded positions and k-bit integer levels, bit-packed into uint8 initializers.

For storage and transmission: the smallest file, decoded by standard ONNX ops that onnxruntime
folds at session creation (so inference runs dense kernels on the exact weights).

Per encoded weight ``W`` (flattened in C order, ``N`` entries, ``n`` of them stored: the
nonzeros), one call node of a model-local function (domain :data:`DOMAIN`; ``G`` for levels,
``R`` for raw values; each stored once) writes ``W`` under its own name from two initializers
and a few attributes:

- *positions*, Golomb-coded with a per-weight modulus ``M``: the gap before entry i,
  ``g[i] = pos[i] - pos[i-1] - 1`` (from a virtual ``pos[-1] = -M``), is ``M * a[i] + b[i]``;
  the remainder goes into the entry's field as ``r[i] = M - 1 - b[i]``, the quotient into
  *unary* bits (``a[i]`` ones, then a zero). Decode: ``pos = M * j - cumsum(r)`` where ``j[i]``
  is the index of the i-th zero among the unary bits. ``M`` and the field width ``w`` are
  chosen per weight to minimise the bits (Golomb codes suit the geometric gaps of random
  positions: on a 4-bit LeNet-5 at x150, 1,956 bytes against the 1,911 of their entropy,
  where version 2's fixed-width steps with filler entries took 2,260);
- values, one of:

  - *levels* (a weight with a quantization spec: ``W = float32(q) * float32(scale)``, integer
    ``q`` in ``[-L, L]``, ``L = 2^(k-1) - 1``, from ``admm-onnx prune --bits``): only nonzero
    levels are stored, as the code ``c = q + L`` (q < 0) or ``q + L - 1`` (q > 0), one of
    ``R = 2L``; the field is ``c + R * r`` (``M = 2^w // R``); input 2 is the scale (shape
    ``[]`` per tensor, or the weight's rank with only the channel axis kept: per channel),
    float32, or float16 when every scale is exactly a float16 number (cast back to the same
    float32 values: lossless);
  - *raw* (no spec): the field is ``r`` (``M = 2^w``); input 2 holds the values in the
    weight's own float type.

- input 1 (uint8, shape ``[bytes, 1]``): the ``n`` fields of ``w`` bits (LSB first, ``w`` <= 16),
  then the unary bits, then at least one padding bit of 1 (to the byte's end);
- attributes ``f = [n, w]``, ``h`` = the weight's shape, ``m = M``, and ``l = L`` (levels) or
  ``to`` (raw: the weight's type).

Decode: bytes -> bits by ``BitShift(RIGHT)`` and ``Mod 2`` on uint8 (cast to float), the first
``n * w`` bits -> field integers by a float ``Gemm`` with powers of two (exact: integers below
2^16) cast to int64; the remaining bits but the last -> ``j`` by ``TopK(K = n, smallest)``,
whose ties come out in index order (so the zeros, in order); ``Div``/``Mod`` by ``R``
(remainder, code), ``CumSum``, ``M * j - cumsum`` (positions), ``ScatterElements`` of the
levels (as float) into zeros, ``Reshape``, and for levels a ``Mul`` by the scale: the same
single float32 multiply that produced the weights, so the decoded weight equals the dense one
bit for bit (a zero entry becomes ``+0.0``). Every node's output shape follows from constant
inputs (``TopK``'s from ``K``), so onnxruntime (1.19 and >= 1.27 alike) folds it all.

By default (``names="short"``) the file is also compacted: the graph's internal value names
(activations, biases, the packed arrays) become short generated names, node names, doc strings
and ``value_info`` are dropped, and so are attributes equal to their schema defaults, all-zero
``pads`` and a Conv ``kernel_shape`` equal to its weight's (the spec infers the same); graph
inputs, outputs and the encoded weights keep their names (a graph with subgraphs keeps every
name). ``names="keep"`` keeps them all (packed arrays then
``<W>.p`` / ``<W>.s`` / ``<W>.v``). ``values="fp16"`` (lossy, off by default) also stores the
float32 biases left dense (initializers read only as the bias of Conv, ConvTranspose or Gemm)
of at least 16 entries as float16, cast back to float32 by a ``Cast`` node that onnxruntime
folds.

Files of earlier versions still decode, inspect and run: version 2 (metadata version 2,
functions ``Q``/``F`` in the same domain: positions as fixed-width steps below a per-weight
bound, longer steps bridged by filler entries of value 0, levels as ``code + (2L + 1) * step``
in one field, attributes ``f, h, r, l``; its first release held ``step + code * 2^b`` with
attribute ``d = 2^b``) and version 1 (``<W>.p``, ``<W>.s``/``<W>.v`` and an int32 ``<W>.m``,
gaps ``pos[i] = pos[i-1] + 1 + g[i]``, functions ``PackedQ``/``PackedF`` in domain
:data:`DOMAIN_V1`; in its very first layout the codes in their own ``<W>.q``).

Needs opset >= 11 (BitShift, CumSum, ScatterElements, TopK with K as input) and raises IR to 8
(functions) like ``csr``. Limits: like ``csr`` (folding needs graph optimisations on; a node
output above 1 GB is not folded by onnxruntime >= 1.27; onnxslim and ORT's optimized-model
output write the dense weights back); a weight has at most 2^31 - 1 entries.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Mapping, Optional, Set, Tuple

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

DOMAIN = "admm.pk"
OP_LEVELS = "G"
OP_RAW = "R"
#: Version 2's function names (same domain; still read).
OP_LEVELS_V2 = "Q"
OP_RAW_V2 = "F"
#: The first version's domain and function names (still read).
DOMAIN_V1 = "admm_onnx.packed"
OP_LEVELS_V1 = "PackedQ"
OP_RAW_V1 = "PackedF"
MIN_OPSET = 11
MIN_FUNCTION_IR = 8
SUFFIXES = (".p", ".q", ".s", ".v", ".m")
#: Widest field (remainder and level code; its integer is exact in a float32 Gemm).
MAX_FIELD_BITS = 16
#: ``values="fp16"`` converts a float32 initializer only from this many entries (below, the
#: Cast node costs more than the bytes saved).
FP16_MIN_ENTRIES = 16
NAMES = ("short", "keep")
VALUES = ("exact", "fp16")


# --------------------------------------------------------------------------------------------
# Bit packing (NumPy side)
# --------------------------------------------------------------------------------------------


def field_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """``values`` (non-negative integers below ``2**bits``) as ``bits``-bit fields, LSB first:
    one uint8 0/1 per bit."""
    v = np.asarray(values, dtype=np.int64).reshape(-1)
    if v.size and (v.min() < 0 or v.max() >= 1 << bits):
        raise ValueError(f"values do not fit in {bits} bits")
    return (((v[:, None] >> np.arange(bits)) & 1).astype(np.uint8)).reshape(-1)


def fields_of(flat_bits: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`field_bits` for the first ``count`` fields of ``flat_bits`` (int64)."""
    flat = flat_bits[: count * bits]
    if flat.size != count * bits:
        raise ModelError("packed array shorter than its entry count")
    return flat.reshape(count, bits).astype(np.int64) @ (1 << np.arange(bits, dtype=np.int64))


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """``values`` (non-negative integers below ``2**bits``) as ``bits``-bit fields, LSB first,
    in a uint8 array of ``ceil(len * bits / 8)`` bytes."""
    return np.packbits(field_bits(values, bits), bitorder="little")


def unpack_bits(data: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits` (int64)."""
    return fields_of(np.unpackbits(np.asarray(data, dtype=np.uint8).reshape(-1), bitorder="little"), bits, count)


# -- positions, Golomb-coded (this version) ----------------------------------------------------


def golomb_gaps(positions: np.ndarray, modulus: int) -> np.ndarray:
    """Gaps ``g[i] = pos[i] - pos[i-1] - 1`` of sorted ``positions``, from a virtual
    ``pos[-1] = -modulus`` (so that the decode needs no offset)."""
    return np.diff(np.concatenate([[-modulus], positions.astype(np.int64)])) - 1


def golomb_bits(positions: np.ndarray, width: int, radix: int) -> int:
    """Bits of ``positions`` in ``width``-bit fields of ``radix`` codes (modulus
    ``M = 2^width // radix``): one field per entry plus ``g // M + 1`` unary bits."""
    modulus = (1 << width) // radix
    unary = positions.size + int((golomb_gaps(positions, modulus) // modulus).sum()) if positions.size else 0
    return positions.size * width + unary


def best_golomb_width(positions: np.ndarray, radix: int = 1) -> int:
    """The field width w (1..16, ``2^w >= radix``) giving the fewest bits in total."""
    widths = [w for w in range(1, MAX_FIELD_BITS + 1) if (1 << w) >= radix]
    return min(widths, key=lambda w: (golomb_bits(positions, w, radix), w))


def golomb_code(positions: np.ndarray, width: int, radix: int = 1) -> Tuple[np.ndarray, np.ndarray, int]:
    """(remainders ``M - 1 - g % M`` per entry, unary bits (``g // M`` ones then a zero, per entry),
    modulus M) of sorted ``positions``; ``pos = M * j - cumsum(remainders)`` with ``j`` the
    index of each entry's zero in the unary bits."""
    modulus = (1 << width) // radix
    gaps = golomb_gaps(positions, modulus)
    quot = gaps // modulus
    unary = np.ones(int(quot.sum()) + gaps.size, np.uint8)
    unary[np.cumsum(quot + 1) - 1] = 0
    return modulus - 1 - gaps % modulus, unary, modulus


def golomb_positions(remainders: np.ndarray, unary: np.ndarray, modulus: int) -> np.ndarray:
    """Inverse of :func:`golomb_code` (the first ``len(remainders)`` zeros of ``unary`` count, as
    in the decode function's TopK)."""
    zeros = np.flatnonzero(np.asarray(unary) == 0)[: remainders.size]
    if zeros.size != remainders.size:
        raise ModelError("packed unary bits are fewer than the entry count")
    return modulus * zeros - np.cumsum(remainders)


# -- positions as gaps (version 1, read only) --------------------------------------------------


def positions_of(gaps: np.ndarray) -> np.ndarray:
    """Version 1: positions of gaps."""
    return np.cumsum(gaps.astype(np.int64) + 1) - 1


# --------------------------------------------------------------------------------------------
# Decode functions
# --------------------------------------------------------------------------------------------


#: From this opset ``Constant`` takes ``value_int(s)``; below, the call attributes are int64 tensors.
INT_ATTR_OPSET = 12


def _decode_function(levels: bool, opset: int, half_scales: bool = False) -> onnx.FunctionProto:
    """``W = G<f, h, m, l>(p, s)`` (levels) or ``W = R<f, h, m, to>(p, v)`` (raw values).

    One-letter value names and no doc strings: the function is stored in every file.
    """
    n = helper.make_node

    def _ref(out: str, attr: str, kind: str) -> onnx.NodeProto:
        """``Constant`` whose value is the call node's attribute ``attr``."""
        node = helper.make_node("Constant", [], [out])
        if opset < INT_ATTR_OPSET:
            node.attribute.append(onnx.AttributeProto(name="value", ref_attr_name=attr, type=onnx.AttributeProto.TENSOR))
        else:
            typ = onnx.AttributeProto.INTS if kind == "value_ints" else onnx.AttributeProto.INT
            node.attribute.append(onnx.AttributeProto(name=kind, ref_attr_name=attr, type=typ))
        return node

    def const(name, dtype, dims, values):
        return n("Constant", [], [name], value=helper.make_tensor("", dtype, dims, values))

    body = [
        _ref("F", "f", "value_ints"),  # [entries, w]
        _ref("H", "h", "value_ints"),  # shape
        _ref("G", "m", "value_int"),  # modulus M
        const("K", TensorProto.UINT8, [1, 8], list(range(8))),
        const("T", TensorProto.UINT8, [], [2]),
        const("M", TensorProto.INT64, [1], [-1]),
        const("Z", TensorProto.INT64, [1], [0]),
        const("Y", TensorProto.INT64, [2], [0, 0]),
        n("Constant", [], ["P"], value=numpy_helper.from_array(
            np.ldexp(np.float32(1), np.arange(MAX_FIELD_BITS)).astype(np.float32).reshape(1, -1), "")),
        # p [bytes, 1] -> bits (float) -> the first entries * w: [entries, w] -> field integers
        n("BitShift", ["p", "K"], ["a"], direction="RIGHT"),
        n("Mod", ["a", "T"], ["b"]),
        n("Reshape", ["b", "M"], ["c"]),
        n("Cast", ["c"], ["d"], to=TensorProto.FLOAT),
        n("ReduceProd", ["F"], ["e"]),
        n("Slice", ["d", "Z", "e"], ["g"]),
        n("Reshape", ["g", "F"], ["i"]),
        n("Slice", ["P", "Y", "F"], ["k"]),  # [1, w]: ends [entries, w], the first clamped to 1
        n("Gemm", ["i", "k"], ["o"], transB=1),  # exact: sums of distinct powers of two below 2^16
        n("Reshape", ["o", "M"], ["r"]),
        n("Cast", ["r"], ["u"], to=TensorProto.INT64),
        # the unary bits after the fields (all but the last bit, padding): j = index of each
        # entry's 0 bit (TopK orders ties by index)
        n("Slice", ["d", "e", "M"], ["q"]),
        n("Gather", ["F", "Z"], ["N"]),
        n("TopK", ["q", "N"], ["t", "j"], largest=0),
        n("Mul", ["j", "G"], ["X"]),
        n("ReduceProd", ["H"], ["B"]),
        n("ConstantOfShape", ["B"], ["C"]),  # float32 zeros, N entries
    ]
    if levels:
        body += [
            _ref("L", "l", "value_int"),
            n("Add", ["L", "L"], ["D"]),  # radix 2L
            n("Div", ["u", "D"], ["v"]),  # remainders M - 1 - g % M
            n("CumSum", ["v", "Z"], ["w"]),
            n("Sub", ["X", "w"], ["x"]),  # positions M * j - cumsum
            n("Mod", ["u", "D"], ["y"]),  # codes: q + L (q < 0) or q + L - 1 (q > 0)
            n("Sub", ["y", "L"], ["z"]),
            n("Div", ["y", "L"], ["A"]),
            n("Add", ["z", "A"], ["I"]),
            n("Cast", ["I"], ["J"], to=TensorProto.FLOAT),
            n("ScatterElements", ["C", "x", "J"], ["E"]),
            n("Reshape", ["E", "H"], ["V"]),
        ]
        if half_scales:  # some scale stored as float16 (exactly)
            body.append(n("Cast", ["s"], ["S"], to=TensorProto.FLOAT))
        body.append(n("Mul", ["V", "S" if half_scales else "s"], ["W"]))  # float32(q) * float32(scale)
        inputs, attrs, name = ["p", "s"], ["f", "h", "m", "l"], OP_LEVELS
    else:
        cast = n("Cast", ["C"], ["A"])
        cast.attribute.append(onnx.AttributeProto(name="to", ref_attr_name="to", type=onnx.AttributeProto.INT))
        body += [
            n("CumSum", ["u", "Z"], ["w"]),
            n("Sub", ["X", "w"], ["x"]),
            cast,
            n("ScatterElements", ["A", "x", "v"], ["E"]),  # copies the values
            n("Reshape", ["E", "H"], ["W"]),
        ]
        inputs, attrs, name = ["p", "v"], ["f", "h", "m", "to"], OP_RAW
    return helper.make_function(DOMAIN, name, inputs, ["W"], body,
                                opset_imports=[helper.make_opsetid("", opset)], attributes=attrs)


# --------------------------------------------------------------------------------------------
# One packed weight
# --------------------------------------------------------------------------------------------


@dataclass
class PackedWeight:
    """One weight as stored: ``fields`` (uint8 bytes), ``entries`` fields, ``scale`` (levels) or
    ``values`` (raw), the dense ``shape``.

    Version 3 (``modulus`` > 0): ``entries`` fields of ``step_bits`` bits (the whole field:
    ``code + radix * remainder`` for levels, the remainder for raw values), then the unary bits
    and padding ones; ``level_bits`` is k. Versions 1 and 2: fields of ``step_bits`` + ``level_bits`` bits (with
    ``radix``: ``code + radix * step``, else ``step + code << step_bits``); ``version`` 1 reads
    them as gaps (``pos = prev + 1 + g``), 2 as steps."""

    fields: np.ndarray
    step_bits: int
    level_bits: int
    entries: int
    shape: Tuple[int, ...]
    scale: Optional[np.ndarray] = None
    values: Optional[np.ndarray] = None
    version: int = 3
    #: levels: the number of codes in a field (3: 2L, nonzero levels only; 2: 2L + 1)
    radix: int = 0
    #: version 3: the Golomb modulus M
    modulus: int = 0
    #: the level codes in their own array (the very first layout, ``<W>.q``), else None
    codes: Optional[np.ndarray] = None
    #: initializer name -> role ("p", "q", "s", "v", "m") in the file
    tensors: Dict[str, str] = field(default_factory=dict)

    @property
    def levels(self) -> bool:
        return self.scale is not None

    @property
    def fields_name(self) -> str:
        """The initializer holding the packed fields (where the decoded weight goes back)."""
        return next(k for k, r in self.tensors.items() if r == "p")

    @property
    def max_level(self) -> int:
        return (1 << (self.level_bits - 1)) - 1 if self.levels else 0

    @property
    def width(self) -> int:
        """Bits per field."""
        if self.version == 3 or (self.levels and self.codes is not None) or not self.levels:
            return self.step_bits
        return self.step_bits + self.level_bits

    def code_bits(self) -> float:
        """Bits of the level codes in the fields (log2 of the radix per entry for mixed radix)."""
        if not self.levels:
            return 0.0
        per = float(np.log2(self.radix)) if self.radix else float(self.level_bits)
        return 0.0 if self.codes is not None else per * self.entries

    def stored_bytes(self) -> int:
        extra = self.scale if self.levels else self.values
        codes = 0 if self.codes is None else int(self.codes.nbytes)
        return int(self.fields.nbytes) + int(extra.nbytes) + codes

    def storage(self, dtype) -> Tuple[str, int]:
        """(storage label, bits per value)."""
        where = f"golomb{self.modulus}" if self.version == 3 else f"pos{self.step_bits}"
        if self.levels:
            scope = "tensor" if self.scale.ndim == 0 else "channel"
            return f"packed-{self.level_bits}bit/{scope} {where}", self.level_bits
        bits = np.dtype(dtype).itemsize * 8
        return f"packed-fp{bits} {where}", bits

    def _positions_and_codes(self) -> Tuple[np.ndarray, np.ndarray]:
        if self.version == 3:
            bits = np.unpackbits(self.fields.reshape(-1), bitorder="little")  # fields, unary bits, padding
            u = fields_of(bits, self.width, self.entries)
            if self.levels:
                rem, y = u // self.radix, u % self.radix
                L = self.max_level
                code = y - L + (y >= L)  # the level q itself (never 0)
            else:
                rem, code = u, None
            return golomb_positions(rem, bits[self.entries * self.width:-1], self.modulus), code
        u = unpack_bits(self.fields, self.width, self.entries)
        if self.codes is not None:  # codes in their own array: put them where the fields have them
            u = u + (unpack_bits(self.codes, self.level_bits, self.entries) << self.step_bits)
        if self.radix:  # code + radix * step
            low, code = u // self.radix, u % self.radix
        else:  # step + code << step_bits
            low, code = u & ((1 << self.step_bits) - 1), u >> self.step_bits
        pos = positions_of(low) if self.version == 1 else np.cumsum(low)
        return pos, (code - self.max_level if self.levels else None)

    def decode(self, dtype=np.float32) -> np.ndarray:
        """The dense weight (NumPy twin of the decode functions)."""
        try:
            pos, q = self._positions_and_codes()
            size = int(np.prod(self.shape, dtype=np.int64))
            if pos.size and (pos.max() >= size or pos.min() < 0):
                raise ModelError("packed position out of range")
            if self.levels:
                qf = np.zeros(size, np.float32)
                qf[pos] = q.astype(np.float32)
                out = qf.reshape(self.shape) * self.scale.astype(np.float32)
                if out.shape != tuple(self.shape):
                    raise ModelError(f"packed scale of shape {list(self.scale.shape)} does not fit the weight's "
                                     f"shape {list(self.shape)}")
                return out
            flat = np.zeros(size, dtype)
            flat[pos] = self.values
            return flat.reshape(self.shape)
        except (ValueError, TypeError, IndexError) as exc:  # arrays that do not fit the attributes
            raise ModelError(f"packed arrays do not fit their attributes: {exc}") from None


def _scale_array(spec: QuantSpec, shape: Tuple[int, ...]) -> np.ndarray:
    """The float32 scales shaped to broadcast against the weight; float16 when every scale is
    exactly a float16 number (then the same float32 values after the Cast: lossless)."""
    scale = np.asarray(spec.scale, dtype=np.float32)
    with np.errstate(over="ignore"):
        half = scale.astype(np.float16)
    if np.all(np.isfinite(half)) and np.array_equal(half.astype(np.float32), scale):
        scale = half
    if spec.axis is None:
        return scale.reshape(())
    dims = [1] * len(shape)
    dims[spec.axis % len(shape)] = scale.size
    return scale.reshape(dims)


def encode_weight(name: str, arr: np.ndarray, spec: Optional[QuantSpec]) -> PackedWeight:
    """``arr`` packed (levels when ``spec`` is given, else raw values)."""
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
        positions = np.flatnonzero(q)  # a weight rounding to level 0 is not stored
        L, k = max_level(spec.bits), spec.bits
        radix = 2 * L  # nonzero levels only
        w = best_golomb_width(positions, radix)
        rem, unary, modulus = golomb_code(positions, w, radix)
        qs = q[positions]
        fields = (qs + L - (qs > 0)) + radix * rem
        extra = dict(scale=_scale_array(spec, arr.shape), radix=radix)
    else:
        w = best_golomb_width(positions)
        fields, unary, modulus = golomb_code(positions, w)
        extra = dict(values=flat[positions].astype(arr.dtype))
    # fields, unary bits, then padding ones: at least one bit (the decode reads the unary bits
    # up to the last bit, excluded) up to a whole byte
    bits = np.concatenate([field_bits(fields, w), unary])
    bits = np.concatenate([bits, np.ones(8 - bits.size % 8, np.uint8)])
    data = np.packbits(bits.astype(np.uint8), bitorder="little").reshape(-1, 1)
    k = spec.bits if spec is not None else 0
    return PackedWeight(data, w, k, positions.size, tuple(arr.shape), modulus=modulus, **extra)


def decode_weight(parts: Mapping[str, np.ndarray], dtype=np.float32) -> np.ndarray:
    """Version 1 arrays (suffix -> array: ``.p``, ``.m`` and ``.s`` or ``.v``) decoded."""
    return _from_v1(parts).decode(dtype)


def _from_v1(parts: Mapping[str, np.ndarray]) -> PackedWeight:
    meta = parts[".m"].astype(np.int64)
    pb, vbits, count = (int(x) for x in meta[:3])
    shape = tuple(int(d) for d in meta[4:])
    if ".s" in parts:
        return PackedWeight(parts[".p"], pb, vbits, count, shape, scale=parts[".s"], version=1, codes=parts.get(".q"))
    return PackedWeight(parts[".p"], pb, 0, count, shape, values=parts[".v"], version=1)


def _call(pw: PackedWeight, name: str, p: str, extra: str, dtype: int, opset: int) -> onnx.NodeProto:
    attrs = {"f": [pw.entries, pw.width], "h": list(pw.shape), "m": pw.modulus}
    if pw.levels:
        attrs.update(l=pw.max_level)
    if opset < INT_ATTR_OPSET:  # int64 tensors (scalars for the single ints)
        attrs = {k: numpy_helper.from_array(np.asarray(v, np.int64), "") for k, v in attrs.items()}
    if pw.levels:
        return helper.make_node(OP_LEVELS, [p, extra], [name], domain=DOMAIN, **attrs)
    return helper.make_node(OP_RAW, [p, extra], [name], domain=DOMAIN, to=dtype, **attrs)


def _attr(a: onnx.AttributeProto):
    value = helper.get_attribute_value(a)
    if isinstance(value, TensorProto):
        value = numpy_helper.to_array(value).tolist()
    return value


# --------------------------------------------------------------------------------------------
# Compact names
# --------------------------------------------------------------------------------------------


def _short_names(taken: Set[str]) -> Iterator[str]:
    """"0", "1", ..., "z", "A", ..., "Z", "10", ... (base 62), skipping ``taken``."""
    digits = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
    i = 0
    while True:
        s, j = "", i
        while True:
            s = digits[j % 62] + s
            j //= 62
            if not j:
                break
        i += 1
        if s not in taken:
            yield s


def _has_subgraphs(graph: onnx.GraphProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
               for nd in graph.node for a in nd.attribute)


def _compact(model: onnx.ModelProto, keep: Set[str]) -> None:
    """In place: short generated names for every value of the main graph not in ``keep`` (nor a
    graph input or output); node names, doc strings and value_info dropped. Graphs with
    subgraphs (which may read outer names) keep their names."""
    graph = model.graph
    model.doc_string = ""
    graph.doc_string = ""
    del graph.value_info[:]
    for nd in graph.node:
        nd.name = ""
        nd.doc_string = ""
    if _has_subgraphs(graph):
        return
    keep = set(keep) | {v.name for v in graph.input} | {v.name for v in graph.output} | {""}
    names = _short_names(keep)
    new: Dict[str, str] = {}

    def rename(name: str) -> str:
        if name in keep:
            return name
        if name not in new:
            new[name] = next(names)
        return new[name]

    for t in graph.initializer:
        t.name = rename(t.name)
    for nd in graph.node:
        nd.input[:] = [rename(x) for x in nd.input]
        nd.output[:] = [rename(x) for x in nd.output]


#: Ops whose ``pads`` default to 0 when absent (with auto_pad NOTSET).
_PADDED = {"Conv", "MaxPool", "AveragePool", "LpPool", "ConvInteger", "QLinearConv"}


def _drop_default_attributes(model: onnx.ModelProto, shapes: Mapping[str, Tuple[int, ...]]) -> None:
    """In place: attributes of standard-domain nodes equal to their schema defaults dropped, and
    ``pads`` of all zeros (pooling/conv, auto_pad NOTSET) and a Conv ``kernel_shape`` equal to
    its weight's spatial dims (``shapes``: known weight shapes), which the spec infers the same."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None:
        return
    for nd in model.graph.node:
        if nd.domain not in ("", "ai.onnx"):
            continue
        try:
            schema = onnx.defs.get_schema(nd.op_type, opset, "")
        except Exception:  # noqa: BLE001 - unknown op: leave it alone
            continue
        values = {a.name: helper.get_attribute_value(a) for a in nd.attribute}
        drop = set()
        for a in nd.attribute:
            spec = schema.attributes.get(a.name)
            if spec is not None and spec.default_value.name and \
                    helper.get_attribute_value(spec.default_value) == values[a.name]:
                drop.add(a.name)
        notset = values.get("auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET")
        if nd.op_type in _PADDED and notset and "pads" in values and not any(values["pads"]):
            drop.add("pads")
        if nd.op_type == "Conv" and "kernel_shape" in values and len(nd.input) > 1:
            w = shapes.get(nd.input[1])
            if w is not None and list(w[2:]) == list(values["kernel_shape"]):
                drop.add("kernel_shape")
        keep = [a for a in nd.attribute if a.name not in drop]
        del nd.attribute[:]
        nd.attribute.extend(keep)


#: (op type, input index) of the biases ``values="fp16"`` may store as float16.
BIAS_INPUTS = {("Conv", 2), ("ConvTranspose", 2), ("Gemm", 2)}


def _biases(graph: onnx.GraphProto) -> Set[str]:
    """Names read only as a bias (:data:`BIAS_INPUTS`, standard domain) by the main graph's nodes,
    and not graph inputs or outputs."""
    uses: Dict[str, Set[Tuple[str, int]]] = {}
    for nd in graph.node:
        for i, x in enumerate(nd.input):
            uses.setdefault(x, set()).add((nd.op_type if nd.domain in ("", "ai.onnx") else "", i))
    io = {v.name for v in graph.input} | {v.name for v in graph.output}
    return {x for x, u in uses.items() if x not in io and u <= BIAS_INPUTS}


def _fp16_initializers(graph: onnx.GraphProto, skip: Set[str], names: Iterator[str]) -> List[str]:
    """In place: float32 biases (:func:`_biases`; not in ``skip``, >= FP16_MIN_ENTRIES entries)
    stored as float16 under a new name, a Cast node writing the float32 tensor under the old
    name (prepended to the nodes). Returns the converted names. A graph with subgraphs (which
    may read any outer name) is left alone."""
    if _has_subgraphs(graph):
        return []
    biases = _biases(graph)
    done, casts = [], []
    for t in graph.initializer:
        if t.name in skip or t.name not in biases or t.data_type != TensorProto.FLOAT:
            continue
        arr = numpy_helper.to_array(t)
        if arr.size < FP16_MIN_ENTRIES or not np.all(np.abs(arr) <= np.finfo(np.float16).max):
            continue  # too small to pay for its Cast, or outside float16's range (stays float32)
        old, half = t.name, next(names)
        t.CopyFrom(numpy_helper.from_array(arr.astype(np.float16), half))
        casts.append(helper.make_node("Cast", [half], [old], to=TensorProto.FLOAT))
        done.append(old)
    nodes = casts + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    return done


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
        specs = read_quantization(quantization)
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
        raise ConfigError(f"cannot read the quantization specs: {exc}") from None
    if not specs:
        raise ConfigError("the quantization report holds no quantization specs",
                          hint="pass the --report JSON of a prune run with --bits")
    return specs


class Packed(Format):
    name = "packed"
    summary = ("Golomb-coded positions + k-bit levels (quantized weights) or raw values, bit-packed; "
               "the smallest file, folded by onnxruntime at load")
    limits = __doc__.split("Limits: ")[1].strip()
    options = ("min_sparsity", "quantization", "names", "values")

    def encode(self, model: onnx.ModelProto, min_sparsity: float = 0.5, quantization=None, names: str = "short",
               values: str = "exact", **options):
        """Copy of ``model`` with its quantized weights (specs from ``quantization``: a report
        dict/path, {name: QuantSpec}, or by default the specs recorded in the model) stored as
        k-bit levels, and its other weights of sparsity >= ``min_sparsity`` with raw values.
        ``names``: "short" (compact the graph's internal names) or "keep"; ``values``: "exact"
        or "fp16" (lossy: float32 biases left dense stored as float16)."""
        self.check_options({**options, "min_sparsity": min_sparsity, "quantization": quantization,
                            "names": names, "values": values})
        if names not in NAMES:
            raise ConfigError(f"packed names must be one of {', '.join(NAMES)}, got {names!r}")
        if values in ("fp32",):
            values = "exact"
        if values not in VALUES:
            raise ConfigError(f"packed values must be one of {', '.join(VALUES)}, got {values!r}")
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
        report = ExportReport(format="packed", values=("levels" if specs else "fp32") + ("+fp16" if values == "fp16" else ""),
                              min_sparsity=min_sparsity, model_bytes_before=model.ByteSize())
        taken = _all_names(out.graph)

        def clash(name):
            return "a packed array name is already used in the graph" if tensor_names(name) & taken else None

        selected = select_weights(out, report, min_sparsity, clash, always=specs)
        rows = {r.name: r for r in report.rows}
        graph = out.graph
        new_inits: List[TensorProto] = []
        calls: List[onnx.NodeProto] = []
        used = set()
        half_scales = False
        for tensor in graph.initializer:
            arr = selected.get(tensor.name)
            if arr is None:
                new_inits.append(tensor)
                continue
            name = tensor.name
            pw = encode_weight(name, arr, specs.get(name))
            extra = pw.scale if pw.levels else pw.values
            suffix = ".s" if pw.levels else ".v"
            new_inits += [numpy_helper.from_array(pw.fields, name + ".p"), numpy_helper.from_array(extra, name + suffix)]
            calls.append(_call(pw, name, name + ".p", name + suffix, tensor.data_type, opset))
            used.add(pw.levels)
            half_scales = half_scales or (pw.levels and pw.scale.dtype == np.float16)
            row = rows[name]
            row.storage, row.bits = pw.storage(arr.dtype)
            row.stored_bytes = pw.stored_bytes()
        _replace_graph_content(graph, new_inits, calls + list(graph.node))
        meta = {"version": 3, "format": "packed"}
        if out.ir_version < MIN_FUNCTION_IR:  # restored by densify
            meta["ir_version"] = int(out.ir_version)
        if values == "fp16":
            meta["values"] = "fp16"
            packed_arrays = set().union(*(tensor_names(n) for n in selected))
            half = _fp16_initializers(graph, packed_arrays, _short_names(_all_names(graph)))
            report.float16 = half
        if names == "short":
            shapes = {t.name: tuple(t.dims) for t in graph.initializer}
            shapes.update({n: a.shape for n, a in selected.items()})
            _drop_default_attributes(out, shapes)
            _compact(out, set(selected))
        for levels in sorted(used):
            out.functions.append(_decode_function(levels, opset, half_scales))
        out.opset_import.append(helper.make_opsetid(DOMAIN, 1))
        # The scales now live in the file's scale tensors: drop the (large, JSON) spec record.
        keep = [p for p in out.metadata_props if p.key != QUANT_KEY]
        del out.metadata_props[:]
        out.metadata_props.extend(keep)
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
                if (nd.domain == DOMAIN and nd.op_type in (OP_LEVELS, OP_RAW, OP_LEVELS_V2, OP_RAW_V2))
                or (nd.domain == DOMAIN_V1 and nd.op_type in (OP_LEVELS_V1, OP_RAW_V1))]

    def _weights(self, model: onnx.ModelProto) -> Dict[str, Tuple[PackedWeight, np.dtype]]:
        inits = {t.name: t for t in model.graph.initializer}
        out = {}
        for _, nd in self._calls(model):
            try:
                out[nd.output[0]] = self._weight(nd, inits)
            except (ValueError, TypeError, IndexError, KeyError) as exc:  # attributes of the wrong kind
                raise ModelError(f"packed weight {nd.output[0] if nd.output else '?'!r} is malformed: "
                                 f"{type(exc).__name__}: {exc}") from None
        return out

    @staticmethod
    def _weight(nd: onnx.NodeProto, inits: Mapping[str, TensorProto]) -> Tuple[PackedWeight, np.dtype]:
        """One call node's weight (any version)."""
        name = nd.output[0]
        attrs = {a.name: _attr(a) for a in nd.attribute}
        to = attrs.get("to", TensorProto.FLOAT)
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(to))
        if nd.domain == DOMAIN_V1:
            parts = {s: _to_array(inits[name + s]) for s in SUFFIXES if name + s in inits}
            need = {".p", ".m"} | ({".s"} if nd.op_type == OP_LEVELS_V1 else {".v"})
            if not need <= set(parts):
                raise ModelError(f"packed weight {name!r} is incomplete: missing {sorted(need - set(parts))}")
            pw = _from_v1(parts)
            pw.tensors = {name + s: s[1:] for s in parts}
            return pw, dtype
        v3 = nd.op_type in (OP_LEVELS, OP_RAW)
        levels = nd.op_type in (OP_LEVELS, OP_LEVELS_V2)
        need = {"f", "h"} | ({"m"} | ({"l"} if levels else set()) if v3 else set())
        missing = [x for x in nd.input if x not in inits]
        if len(nd.input) != 2 or missing or not need <= set(attrs):
            raise ModelError(f"packed weight {name!r} is incomplete: inputs {list(nd.input)}, "
                             f"attributes {sorted(attrs)}")
        entries, width = (int(x) for x in attrs["f"])
        shape = tuple(int(x) for x in attrs["h"])
        p, extra = (_to_array(inits[x]) for x in nd.input)
        if v3:
            L = int(attrs["l"]) if levels else 0
            if (levels and not 1 <= L <= 127) or not 1 <= width <= MAX_FIELD_BITS or entries < 0 \
                    or not 1 <= int(attrs["m"]) <= 1 << width:
                raise ModelError(f"packed weight {name!r} has invalid attributes: f {[entries, width]}, "
                                 f"m {attrs['m']}" + (f", l {L}" if levels else ""))
            k = (L + 1).bit_length() if levels else 0  # L = 2^(k-1) - 1, 2L codes
            pw = PackedWeight(p, width, k, entries, shape, radix=2 * L, modulus=int(attrs["m"]),
                              **({"scale": extra} if levels else {"values": extra}))
        elif levels and "r" in attrs:
            radix = int(attrs["r"])
            k = (radix - 1).bit_length()  # 2L + 1 codes, L = 2^(k-1) - 1
            pw = PackedWeight(p, width - k, k, entries, shape, scale=extra, radix=radix, version=2)
        elif levels:  # the first files of version 2: step + code << b, d = 2^b
            b = int(attrs.get("d", 1)).bit_length() - 1
            pw = PackedWeight(p, b, width - b, entries, shape, scale=extra, version=2)
        else:
            pw = PackedWeight(p, width, 0, entries, shape, values=extra, version=2)
        pw.tensors = {nd.input[0]: "p", nd.input[1]: "s" if pw.levels else "v"}
        return pw, dtype

    def decode(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """Dense initializers back at the place of their packed arrays; calls, functions, opset
        import and metadata removed, IR restored; float16 initializers written by
        ``values="fp16"`` folded into float32 ones; quantization specs recorded again."""
        from ..quantization import QuantSpec as _Q
        from ..quantization import mark_model

        _check_model_arg(model)
        meta = _read_metadata(model) or {}
        weights = self._weights(model)
        dense = {n: pw.decode(d) for n, (pw, d) in weights.items()}
        anchor = {pw.fields_name: n for n, (pw, _) in weights.items()}
        owned = set().union(*(pw.tensors for pw, _ in weights.values())) if weights else set()
        out = copy_model(model)
        graph = out.graph
        halves = _half_casts(graph) if meta.get("values") == "fp16" else {}
        new_inits = []
        for t in graph.initializer:
            if t.name in anchor:
                new_inits.append(numpy_helper.from_array(dense[anchor[t.name]], anchor[t.name]))
            elif t.name in halves:
                new_inits.append(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), halves[t.name][1]))
            elif t.name not in owned:
                new_inits.append(t)
        drop = {i for i, _ in self._calls(model)} | {i for i, _ in halves.values()}
        nodes = [nd for i, nd in enumerate(graph.node) if i not in drop]
        _replace_graph_content(graph, new_inits, nodes)
        _undo_encoding(out, meta, DOMAIN)
        _undo_encoding(out, meta, DOMAIN_V1)
        specs = {}
        for name, (pw, _) in weights.items():
            if pw.levels:
                s = pw.scale
                big = [i for i, d in enumerate(s.shape) if d > 1]
                axis = None if s.ndim == 0 else (big[0] if big else 0)
                specs[name] = _Q(pw.level_bits, tuple(float(x) for x in s.reshape(-1)), axis)
        if specs and meta.get("quantization"):
            mark_model(out, specs)
        _run_checker(out, "densify")
        return out

    def stored(self, model: onnx.ModelProto) -> Dict[str, StoredWeight]:
        out = {}
        for name, (pw, dtype) in self._weights(model).items():
            storage, bits = pw.storage(dtype)
            out[name] = StoredWeight(name, pw.decode(dtype), storage, pw.stored_bytes(), bits,
                                     anchor=pw.fields_name, tensors=set(pw.tensors))
        return out

    def decode_nodes(self, model: onnx.ModelProto) -> Set[int]:
        nodes = {i for i, _ in self._calls(model)}
        meta = _read_metadata(model) or {}
        if meta.get("values") == "fp16":
            nodes |= {i for i, _ in _half_casts(model.graph).values()}
        return nodes


def _half_casts(graph: onnx.GraphProto) -> Dict[str, Tuple[int, str]]:
    """float16 initializer -> (index of the Cast node reading only it into float32, its output)."""
    halves = {t.name for t in graph.initializer if t.data_type == TensorProto.FLOAT16}
    readers: Dict[str, int] = {}
    for nd in graph.node:
        for x in nd.input:
            readers[x] = readers.get(x, 0) + 1
    out = {}
    for i, nd in enumerate(graph.node):
        if (nd.op_type == "Cast" and nd.domain in ("", "ai.onnx") and len(nd.input) == 1 and nd.input[0] in halves
                and readers.get(nd.input[0]) == 1
                and any(a.name == "to" and a.i == TensorProto.FLOAT for a in nd.attribute)):
            out[nd.input[0]] = (i, nd.output[0])
    return out


def tensor_names(name: str) -> Set[str]:
    return {name + s for s in SUFFIXES}


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

    ``positions`` / ``codes``: the bits of the packed arrays that hold positions (remainders,
    unary bits, padding; version 2: steps) / level codes (log2 of the radix per entry); ``raw values``:
    values of weights without levels; ``scales``: the float32 scale tensors' data; ``tensor
    headers``: names, dims and types of those packed tensors (and version 1's int32 metadata);
    ``other initializers``: everything else stored as initializers (biases), whole; ``decode
    functions``: the model-local functions; ``graph nodes``: every node (the decode calls with
    their attributes included); ``rest``: graph inputs/outputs, value_info, opset imports,
    metadata, names.
    """
    _check_model_arg(model)
    out = {k: 0 for k in ("positions", "codes", "raw values", "scales", "tensor headers",
                          "other initializers", "decode functions", "graph nodes", "rest")}
    roles: Dict[str, Tuple[str, PackedWeight]] = {}
    for pw, _ in PACKED._weights(model).values():
        for tensor_name, role in pw.tensors.items():
            roles[tensor_name] = (role, pw)
    for t in model.graph.initializer:
        whole = _field_bytes(t)
        if t.name not in roles:
            out["other initializers"] += whole
            continue
        role, pw = roles[t.name]
        data = len(t.raw_data) if t.HasField("raw_data") else 0
        out["tensor headers"] += whole - data
        if role == "q":
            out["codes"] += data
        elif role == "p":
            if pw.version == 3:
                code_bytes = int(pw.code_bits() / 8)
            else:  # a field's bytes in proportion to its bits
                code_bytes = int(data * pw.code_bits() / pw.entries / pw.width) if pw.entries and pw.width else 0
            out["codes"] += code_bytes
            out["positions"] += data - code_bytes
        elif role == "s":
            out["scales"] += data
        elif role == "v":
            out["raw values"] += data
        else:
            out["tensor headers"] += data
    out["decode functions"] = sum(_field_bytes(f) for f in model.functions)
    out["graph nodes"] = sum(_field_bytes(n) for n in model.graph.node)
    out["rest"] = model.ByteSize() - sum(out.values())
    return out
