"""The allocator: per-layer keep counts that meet a budget exactly and minimise the predicted
increase of the metric, from sensitivity curves.

Model: predicted metric = dense + sum_i delta_i(d_i), d_i the fraction of weight i kept, each
delta_i the one-layer sensitivity curve made monotone (pruning more never predicts less
damage: a running maximum from the dense end) and interpolated linearly in log(d) between the
measured levels (linearly extrapolated below the lowest, never decreasing). Cost: cost_i(d) =
d * size_i * unit_i (unit 1 for a weights budget, MACs per weight for a MACs budget).

Solver (Lagrangian relaxation, as in OBC/SPDY): on a fine grid of d per layer, take the lower
convex hull of (cost, delta); minimising sum delta_i + lambda * sum cost_i over all lambda is
then the same as walking every layer's hull segments in order of steepest damage decrease per
unit of cost, starting from every layer at its minimum keep. The walk stops where the budget
is used up, inside the last segment (interpolation), so the continuous budget is met exactly;
the fractions are then rounded to whole weights, the leftovers handed out by largest
remainder, so a weights budget is met to the weight and a MACs budget to within one weight's
MACs (never over).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..errors import ConfigError

GRID = 400


@dataclass(frozen=True)
class LayerCurve:
    """Sensitivity of one weight: ``deltas[j]`` at fraction kept ``keeps[j]``."""

    keeps: Tuple[float, ...]
    deltas: Tuple[float, ...]

    def __post_init__(self):
        if len(self.keeps) != len(self.deltas) or not self.keeps:
            raise ValueError("keeps and deltas must be non-empty and of the same length")


def monotone(keeps: Sequence[float], deltas: Sequence[float]) -> Tuple[np.ndarray, np.ndarray]:
    """Sorted by keep (ascending) with the dense point (1.0, 0) added if missing; deltas made
    non-increasing in keep and >= 0 (a running maximum from the dense end)."""
    k = np.asarray(keeps, dtype=np.float64)
    d = np.asarray(deltas, dtype=np.float64)
    order = np.argsort(k)
    k, d = k[order], d[order]
    if k[-1] < 1.0:
        k, d = np.append(k, 1.0), np.append(d, 0.0)
    d = np.where(np.isfinite(d), d, np.nanmax(np.where(np.isfinite(d), d, -np.inf)) if np.isfinite(d).any() else 0.0)
    d = np.maximum.accumulate(np.maximum(d, 0.0)[::-1])[::-1]
    return k, d


def interpolate(k: np.ndarray, d: np.ndarray, at: np.ndarray) -> np.ndarray:
    """Monotone curve (``monotone``'s output) at fractions ``at``: linear in log(keep),
    extrapolated below the lowest level with the slope of the first segment (never negative)."""
    lk, la = np.log(k), np.log(np.asarray(at, dtype=np.float64))
    out = np.interp(la, lk, d)
    below = la < lk[0]
    if below.any():
        slope = (d[0] - d[1]) / (lk[1] - lk[0]) if len(k) > 1 and lk[1] > lk[0] else 0.0
        out[below] = d[0] + max(slope, 0.0) * (lk[0] - la[below])
    return out


def _hull(cost: np.ndarray, delta: np.ndarray) -> List[int]:
    """Indices of the lower convex hull of points sorted by ascending cost."""
    hull: List[int] = []
    for i in range(len(cost)):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b is above the segment a-i: drop it
            if (delta[b] - delta[a]) * (cost[i] - cost[a]) >= (delta[i] - delta[a]) * (cost[b] - cost[a]):
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


@dataclass
class AllocationResult:
    keep: Dict[str, int]
    fraction: Dict[str, float]
    predicted_delta: Dict[str, float]
    cost: float
    budget: float
    lam: float = 0.0

    @property
    def predicted_total(self) -> float:
        return float(sum(self.predicted_delta.values()))


def bound_counts(
    names: Sequence[str],
    sizes: Mapping[str, int],
    budget: float,
    unit: Optional[Mapping[str, float]] = None,
    min_keep: Optional[Mapping[str, float]] = None,
    max_keep: Optional[Mapping[str, float]] = None,
) -> Tuple[Dict[str, int], Dict[str, int]]:
    """(least, most) kept count per layer under ``min_keep`` / ``max_keep``; ConfigError when
    they make ``budget`` unreachable (checked before any sweep is run)."""
    if not names:
        raise ConfigError("no layer left for the allocator (every prunable weight is pinned or excluded)")
    unit = {n: float((unit or {}).get(n, 1.0)) for n in names}
    lo_cnt, hi_cnt = {}, {}
    for n in names:
        size = int(sizes[n])
        lo = (min_keep or {}).get(n)
        hi = (max_keep or {}).get(n)
        lo_cnt[n] = max(1, int(math.ceil((lo or 0.0) * size - 1e-9)))
        hi_cnt[n] = size if hi is None else max(lo_cnt[n], int(math.floor(hi * size + 1e-9)))
        lo_cnt[n] = min(lo_cnt[n], hi_cnt[n])
    floor_cost = sum(lo_cnt[n] * unit[n] for n in names)
    ceil_cost = sum(hi_cnt[n] * unit[n] for n in names)
    if budget < floor_cost - 1e-9:
        raise ConfigError(f"the budget ({budget:,.0f}) is below what the per-layer minimum keep needs ({floor_cost:,.0f})",
                          hint="lower min_keep, or ask for less compression")
    if budget > ceil_cost + 1e-9:
        raise ConfigError(f"the budget ({budget:,.0f}) is above what the per-layer maximum keep allows ({ceil_cost:,.0f})",
                          hint="raise max_keep, or ask for more compression")
    return lo_cnt, hi_cnt


def allocate(
    curves: Mapping[str, LayerCurve],
    sizes: Mapping[str, int],
    budget: float,
    unit: Optional[Mapping[str, float]] = None,
    min_keep: Optional[Mapping[str, float]] = None,
    max_keep: Optional[Mapping[str, float]] = None,
    integer_budget: bool = True,
) -> AllocationResult:
    """Keep counts per layer with sum(keep_i * unit_i) == ``budget`` (a weights budget, unit 1:
    exactly; otherwise <= budget within one weight's unit) minimising the predicted damage.

    ``min_keep`` / ``max_keep``: fractions per layer (default: at least one weight, at most
    all). Raises ConfigError when the bounds make the budget unreachable.
    """
    names = list(curves)
    unit = {n: float((unit or {}).get(n, 1.0)) for n in names}
    lo_cnt, hi_cnt = bound_counts(names, sizes, budget, unit, min_keep, max_keep)

    # Per layer: a grid of counts from lo to hi, its monotone interpolated curve, its hull.
    segments = []  # (slope, layer, cost_from, cost_to, delta_from, delta_to)
    grids = {}
    for n in names:
        size, lo, hi = int(sizes[n]), lo_cnt[n], hi_cnt[n]
        k, d = monotone(curves[n].keeps, curves[n].deltas)
        measured = [int(round(f * size)) for f in k]
        counts = np.unique(np.concatenate([
            np.round(np.geomspace(lo, hi, GRID)).astype(np.int64) if hi > lo else np.array([lo]),
            np.array([c for c in measured if lo <= c <= hi], dtype=np.int64), np.array([lo, hi])]))
        delta = interpolate(k, d, counts / size)
        cost = counts * unit[n]
        h = _hull(cost.astype(np.float64), delta)
        grids[n] = (counts, delta)
        for a, b in zip(h[:-1], h[1:]):
            slope = (delta[b] - delta[a]) / (cost[b] - cost[a])
            segments.append((slope, names.index(n), cost[a], cost[b], delta[a], delta[b]))
    # Walk: steepest decrease first; ties by layer order (deterministic).
    segments.sort(key=lambda s: (s[0], s[1], s[2]))
    spent = {n: lo_cnt[n] * unit[n] for n in names}
    remaining = budget - sum(spent.values())
    lam = 0.0
    for slope, li, c0, c1, _, _ in segments:
        if remaining <= 1e-12:
            break
        n = names[li]
        take = min(c1 - c0, remaining)
        spent[n] += take
        remaining -= take
        lam = -slope
    # Fractions of weights; then whole weights.
    cont = {n: min(hi_cnt[n], max(lo_cnt[n], spent[n] / unit[n])) for n in names}
    counts = {n: int(math.floor(cont[n] + 1e-9)) for n in names}
    left = budget - sum(counts[n] * unit[n] for n in names)
    order = sorted(names, key=lambda n: (-(cont[n] - counts[n]), names.index(n)))
    # Hand out whole weights by largest remainder while they fit (for a weights budget this
    # lands exactly on it: the continuous solution sums to an integer).
    progress = True
    while left > 1e-9 and progress:
        progress = False
        for n in order:
            if counts[n] < hi_cnt[n] and unit[n] <= left + 1e-9:
                counts[n] += 1
                left -= unit[n]
                progress = True
                if left <= 1e-9:
                    break
    fraction = {n: counts[n] / int(sizes[n]) for n in names}
    predicted = {}
    for n in names:
        k, d = monotone(curves[n].keeps, curves[n].deltas)
        predicted[n] = float(interpolate(k, d, np.array([fraction[n]]))[0])
    return AllocationResult(counts, fraction, predicted, float(sum(counts[n] * unit[n] for n in names)), float(budget), lam)
