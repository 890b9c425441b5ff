"""Symmetric k-bit weight levels: the projection ADMM uses for quantization, and how to read them back.

Pure NumPy. A tensor quantized to ``bits`` takes only the values ``scale * q`` with integer
``q`` in ``[-L, L]``, ``L = 2**(bits - 1) - 1`` (2 bits: {-s, 0, s}; 8 bits: 255 levels, as
int8 without -128). Zero is always a level, so sparsity and levels combine. The scale is one
float32 per tensor (``axis=None``) or one per slice along ``axis`` (per channel); by default it
holds a float16 number (see :func:`fit_levels`), so exports may store it in two bytes.

Projection (the Z-update): minimise ``||x - s q||^2`` over ``s > 0`` and the integers ``q``.
For a fixed ``s`` the best ``q`` is ``clip(round(x / s), -L, L)``; for a fixed ``q`` the best
``s`` is ``<x, q> / <q, q>``. :func:`fit_levels` alternates the two (each step can only lower
the error, so it stops at a local minimum, at most ``iters`` rounds) from four starting scales
(``max|x| / L`` times 1, 0.75, 0.5, 0.35) and keeps the best; this is not the global optimum
(an exact 1-D search over all ``n * L`` breakpoints costs too much at 8 bits), but it is never
worse than the usual ``max|x| / L`` scale. With a ``keep`` mask (sparsity + levels) only the
kept entries take part; the others are zero.

Values are computed in float32 as ``float32(q) * float32(scale)``: the weights written by a
run are exactly what ONNX ``DequantizeLinear(q, scale)`` computes, and :func:`to_integers`
recovers ``q`` from them. Where the scales of a run are recorded: ``PruneReport.quantization``
(``"quantization"`` in the report JSON), ``{weight: {"bits", "axis", "scale": [...]}}``, and the
written model itself (metadata key :data:`METADATA_KEY`, the same JSON: exports and
``inspect`` read it from the file); :func:`read_quantization` reads either back as
:class:`QuantSpec` objects, :func:`model_quantization` keeps only the specs the model's
weights actually satisfy.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple, Union

import numpy as np

#: Bit widths a rule may ask for.
BITS = (2, 3, 4, 8)
_STARTS = (1.0, 0.75, 0.5, 0.35)
#: metadata_props key of a written model holding its quantized weights' specs (JSON).
METADATA_KEY = "admm_onnx.quantization"


def max_level(bits: int) -> int:
    """L: the integers are -L..L."""
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits!r}")
    return 2 ** (bits - 1) - 1


def _rows(x: np.ndarray, axis: Optional[int]) -> np.ndarray:
    """x as a (slices, entries) float64 matrix: one row per scale."""
    x = np.asarray(x, dtype=np.float64)
    if axis is None:
        return x.reshape(1, -1)
    return np.moveaxis(x, axis % x.ndim, 0).reshape(x.shape[axis % x.ndim], -1)


def _unrows(m: np.ndarray, shape: Tuple[int, ...], axis: Optional[int]) -> np.ndarray:
    if axis is None:
        return m.reshape(shape)
    axis = axis % len(shape)
    moved = (shape[axis],) + tuple(s for i, s in enumerate(shape) if i != axis)
    return np.moveaxis(m.reshape(moved), 0, axis)


def fit_levels(
    x: np.ndarray, bits: int, axis: Optional[int] = None, keep: Optional[np.ndarray] = None, iters: int = 20,
    half_scales: bool = True,
) -> Tuple[np.ndarray, np.ndarray]:
    """Integers ``q`` (int32, shape of x) and float32 scales (one per slice along ``axis``, or one)
    that (locally) minimise ``||x - scale * q||^2``; entries outside ``keep`` get q = 0.

    ``half_scales``: every scale is rounded to the nearest float16 number (relative change at most
    2**-11) and ``q`` refitted to it, so exports store the scales in two bytes, losslessly (the
    ``packed`` format does so whenever a weight's scales are all float16 numbers). Scales outside
    float16's normal range stay float32."""
    L = max_level(bits)
    shape = np.shape(x)
    rows = _rows(x, axis)
    w = np.ones_like(rows) if keep is None else _rows(np.asarray(keep, dtype=bool), axis)
    rows = rows * w
    peak = np.abs(rows).max(axis=1)
    best_q = np.zeros_like(rows)
    best_s = np.where(peak > 0, peak / L, 1.0)
    best_err = np.full(rows.shape[0], np.inf)
    for start in _STARTS:
        s = np.where(peak > 0, start * peak / L, 1.0)
        q = np.clip(np.rint(rows / s[:, None]), -L, L) * w
        for _ in range(iters):
            qq = np.einsum("ij,ij->i", q, q)
            s_new = np.where(qq > 0, np.einsum("ij,ij->i", rows, q) / np.where(qq > 0, qq, 1.0), s)
            s_new = np.where(s_new > 0, s_new, s)
            q_new = np.clip(np.rint(rows / s_new[:, None]), -L, L) * w
            done = np.array_equal(q_new, q) and np.allclose(s_new, s, rtol=0, atol=0)
            q, s = q_new, s_new
            if done:
                break
        # Final values as written: float32 scale, float32 products.
        s32 = s.astype(np.float32)
        err = ((rows - q * s32.astype(np.float64)[:, None]) ** 2).sum(axis=1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_q[better] = q[better]
        best_s = np.where(better, s, best_s)
    best_s = best_s.astype(np.float32)
    if half_scales:
        half = best_s.astype(np.float16).astype(np.float32)
        ok = np.isfinite(half) & (half >= np.finfo(np.float16).tiny)
        if ok.all() and not np.array_equal(half, best_s):
            best_s = half
            best_q = np.clip(np.rint(rows / best_s.astype(np.float64)[:, None]), -L, L) * w
    return _unrows(best_q, shape, axis).astype(np.int32), best_s


def dequantize(q: np.ndarray, scale: np.ndarray, axis: Optional[int] = None, dtype=np.float32) -> np.ndarray:
    """``float32(q) * float32(scale)``, the scale broadcast along ``axis``."""
    q = np.asarray(q)
    scale = np.asarray(scale, dtype=np.float32).reshape(-1)
    if axis is None:
        out = q.astype(np.float32) * scale[0]
    else:
        shape = [1] * q.ndim
        shape[axis % q.ndim] = scale.size
        out = q.astype(np.float32) * scale.reshape(shape)
    return out.astype(dtype, copy=False)


def project_levels(
    x: np.ndarray, bits: int, axis: Optional[int] = None, keep: Optional[np.ndarray] = None
) -> np.ndarray:
    """x moved onto its fitted levels (see :func:`fit_levels`), in x's dtype."""
    q, scale = fit_levels(x, bits, axis, keep)
    return dequantize(q, scale, axis, dtype=np.asarray(x).dtype)


@dataclass(frozen=True)
class QuantSpec:
    """How one weight was quantized: ``weight = float32(q) * float32(scale)`` along ``axis``."""

    bits: int
    scale: Tuple[float, ...]
    axis: Optional[int] = None

    def to_dict(self) -> Dict[str, object]:
        return {"bits": self.bits, "axis": self.axis, "scale": [float(s) for s in self.scale]}

    def __post_init__(self):
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be a whole number from 2 to 8, got {self.bits!r}")
        if not self.scale or not all(np.isfinite(s) and 0 < s < 1e30 for s in self.scale):
            raise ValueError(f"scales must be positive finite numbers below 1e30, got {list(self.scale)[:4]}")
        if self.axis is not None and (isinstance(self.axis, bool) or not isinstance(self.axis, int)):
            raise ValueError(f"axis must be a whole number or null, got {self.axis!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> "QuantSpec":
        """Raises ValueError (or TypeError) for a record that is not a spec."""
        bits, scale, axis = d["bits"], d["scale"], d.get("axis")
        if isinstance(bits, float) and bits.is_integer():
            bits = int(bits)
        if isinstance(scale, (str, bytes)) or not hasattr(scale, "__iter__"):
            raise ValueError(f"scale must be a list of numbers, got {scale!r}")
        if isinstance(axis, float) and axis.is_integer():
            axis = int(axis)
        return cls(bits, tuple(float(s) for s in scale), axis)

    def integers(self, weight: np.ndarray) -> np.ndarray:
        """The integers q of a weight written by a run (int8 for every supported bit width)."""
        return to_integers(weight, self)


def to_integers(weight: np.ndarray, spec: QuantSpec) -> np.ndarray:
    """Recover q (int8) from weights on ``spec``'s levels; raises ValueError if they are not."""
    w = np.asarray(weight, dtype=np.float32)
    scale = np.asarray(spec.scale, dtype=np.float32)
    if spec.axis is None:
        div = scale[0]
    else:
        shape = [1] * w.ndim
        shape[spec.axis % w.ndim] = scale.size
        div = scale.reshape(shape)
    q = np.rint(w.astype(np.float64) / np.asarray(div, dtype=np.float64))
    L = max_level(spec.bits)
    if np.abs(q).max(initial=0) > L or not np.array_equal(dequantize(q, scale, spec.axis), w):
        raise ValueError(f"the weight is not on the {spec.bits}-bit levels of its scale")
    return q.astype(np.int8)


def read_quantization(report) -> Dict[str, QuantSpec]:
    """Per-weight :class:`QuantSpec` from a run's report (a dict or the ``--report`` JSON path)
    or from a model it wrote (an ``onnx.ModelProto``: its metadata, see :func:`mark_model`)."""
    if hasattr(report, "metadata_props"):
        entry = next((p.value for p in report.metadata_props if p.key == METADATA_KEY), None)
        try:
            return read_quantization({"quantization": json.loads(entry) if entry else {}})
        except (ValueError, TypeError, RecursionError) as exc:
            from .errors import ModelError

            raise ModelError(f"the model's quantization record ({METADATA_KEY} metadata) is damaged: {exc}"[:300],
                             hint="export it again from the model prune --bits wrote") from None
    if not isinstance(report, Mapping):
        report = json.loads(Path(report).read_text(encoding="utf-8"))
    specs = report.get("quantization") if isinstance(report, Mapping) else None
    if specs is not None and not isinstance(specs, Mapping):
        raise ValueError(f"its \"quantization\" entry is a {type(specs).__name__}, not weight -> spec")
    # Only quantization facts ({"bits", "axis", "scale"}); other constraints' describe() facts are skipped.
    out = {}
    for name, d in (specs or {}).items():
        if isinstance(d, Mapping) and "bits" in d and "scale" in d:
            try:
                out[name] = QuantSpec.from_dict(d)
            except (ValueError, TypeError) as exc:
                raise ValueError(f"the spec of {name!r}: {exc}") from None
    return out


def mark_model(model, specs: Mapping[str, Union[QuantSpec, Mapping[str, object]]]) -> None:
    """Record ``specs`` (weight -> QuantSpec or its dict) in ``model``'s metadata (in place,
    replacing an earlier record; nothing is written for no specs)."""
    keep = [p for p in model.metadata_props if p.key != METADATA_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    if specs:
        data = {n: (s.to_dict() if isinstance(s, QuantSpec) else dict(s)) for n, s in specs.items()}
        entry = model.metadata_props.add()
        entry.key, entry.value = METADATA_KEY, json.dumps(data, sort_keys=True)


def model_quantization(model) -> Dict[str, QuantSpec]:
    """The specs recorded in ``model`` whose weights are exactly on their levels (a weight
    changed since, e.g. by another tool, is left out)."""
    from onnx import numpy_helper

    specs = read_quantization(model)
    out = {}
    for t in model.graph.initializer:
        if t.name in specs:
            try:
                to_integers(numpy_helper.to_array(t), specs[t.name])
            except ValueError:
                continue
            out[t.name] = specs[t.name]
    return out
