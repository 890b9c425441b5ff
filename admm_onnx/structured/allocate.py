"""Channel counts per group under a MACs budget, from per-group sensitivity curves.

``--structure channel --target-macs F`` (ChannelTargets with ``allocation="sensitivity"``, the
default for a MACs budget) runs:
1. a sensitivity sweep over the prunable channel groups (admm_onnx/allocation/sensitivity.py,
   ``structure="groups"``: every member tensor of a group pruned to its top channels at once,
   all other groups dense; ORT inference on ``config.sensitivity_samples`` training samples,
   cached like every sweep);
2. the allocator of admm_onnx/allocation (Lagrangian over the curves' convex hulls) with a
   *linear* cost per channel. MACs are not linear in the keep counts (a convolution between
   two pruned groups costs in proportion to the product of their kept fractions), so the cost
   of one channel of a group is its marginal MACs at the current allocation (the other groups
   at their current counts), recomputed a few times (a fixed point, starting from dense);
3. the linear budget handed to the allocator is then bisected so that the *exact* MACs of the
   kept counts (ChannelAnalysis.counts, after rounding to ``round_to``) meet F: never over.

``allocation="uniform"`` (ChannelTargets.keep_counts) is one kept fraction for all groups: the
baseline the allocator is measured against (bench/resnet20_cifar10.py).
"""
from __future__ import annotations

import logging
import math
from typing import Dict, Optional, Tuple

from ..errors import ConfigError

log = logging.getLogger(__name__)

#: Fractions of a group's channels kept at which its sensitivity is measured.
CHANNEL_LEVELS = (0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125)
FIXED_POINT_ROUNDS = 3


def _macs(analysis, counts: Dict[int, int]) -> int:
    return analysis.counts({gid: range(k) for gid, k in counts.items()})["macs"]


def marginal_macs(analysis, counts: Dict[int, int]) -> Dict[int, float]:
    """MACs one channel of each group costs with every group at ``counts`` (>= 1 MAC)."""
    base = _macs(analysis, counts)
    out = {}
    for gid, k in counts.items():
        less = dict(counts)
        less[gid] = k - 1
        out[gid] = max(1.0, float(base - _macs(analysis, less)))
    return out


def allocate_channels(prepared, analysis, targets, train_reader, config, cache_dir="default",
                      runner=None) -> Tuple[Dict[int, int], dict]:
    """(group id -> kept channels, allocation record) for ``targets.target_macs``."""
    from ..allocation.allocator import LayerCurve
    from ..allocation.plan import reader_samples, sweep_samples
    from ..allocation.runners import make_runner
    from ..allocation.sensitivity import run_sensitivity

    if targets.target_macs is None:
        raise ConfigError("a channel allocation needs a MACs budget (--target-macs)")
    groups = {g.name: g for g in analysis.prunable}
    if not groups:
        raise ConfigError("the model has no prunable channel group", hint="run 'admm-onnx groups MODEL' to see why")
    x, y = reader_samples(train_reader, config.sensitivity_samples, seed=config.seed)
    x, metric = sweep_samples(prepared, x, y, config.sensitivity_metric)
    runner = runner or make_runner(config.workers)
    result = run_sensitivity(prepared, x, y, CHANNEL_LEVELS, metric, "groups", list(groups), runner, cache_dir)
    curves = {n: LayerCurve(tuple(result.curves[n].keep), tuple(result.curves[n].deltas(result.baseline)))
              for n in groups}
    counts, alloc = counts_from_curves(analysis, targets, curves)
    total = analysis.counts()["macs"]
    kept = _macs(analysis, counts)
    record = {
        "budget": f"{100 * targets.target_macs:g}% of MACs kept (channels)",
        "method": "sensitivity",
        "metric": result.metric,
        "samples": result.samples,
        "levels": list(CHANNEL_LEVELS),
        "dense_metric": result.baseline,
        "predicted_one_shot_metric": result.baseline + alloc.predicted_total,
        "predicted_delta": dict(alloc.predicted_delta),
        "kept_macs_fraction": kept / total,
        "groups": {n: {"size": g.size, "keep": counts[g.id],
                       "curve": {"keep": list(curves[n].keeps), "delta": list(curves[n].deltas)}} for n, g in groups.items()},
        "sweep_seconds": result.seconds,
    }
    log.info("channel allocation for %s: MACs kept %.3f, predicted one-shot %s %.4f (dense %.4f)",
             record["budget"], kept / total, result.metric, record["predicted_one_shot_metric"], result.baseline)
    return counts, record


def counts_from_curves(analysis, targets, curves):
    """(group id -> kept channels, AllocationResult) for ``targets.target_macs`` from curves
    (group name -> allocation.allocator.LayerCurve of the metric's increase per kept fraction)."""
    from ..allocation.allocator import allocate

    groups = {g.name: g for g in analysis.prunable if g.name in curves}
    sizes = {n: g.size for n, g in groups.items()}
    ids = {n: g.id for n, g in groups.items()}
    total = analysis.counts()["macs"]
    budget = targets.target_macs * total
    least = {g.id: targets._count(g.size, 0.0) for g in groups.values()}
    if _macs(analysis, least) > budget:
        raise ConfigError(
            f"--target-macs {targets.target_macs} cannot be reached: with every prunable group at its minimum "
            f"the model keeps {_macs(analysis, least) / total:.3f} of its MACs")
    min_keep = {n: min(1.0, max(min(CHANNEL_LEVELS) / 2, targets.min_keep / sizes[n])) for n in groups}

    def rounded(alloc) -> Dict[int, int]:
        return {ids[n]: targets._count(sizes[n], alloc.keep[n] / sizes[n]) for n in groups}

    def solve(unit: Dict[str, float]):
        """Largest linear budget whose rounded counts fit the exact MACs budget."""
        floor = sum(max(1, math.ceil(min_keep[n] * sizes[n] - 1e-9)) * unit[n] for n in groups)
        ceil = sum(sizes[n] * unit[n] for n in groups)
        lo, hi, best = floor, ceil, None
        for _ in range(40):
            mid = (lo + hi) / 2
            alloc = allocate(curves, sizes, mid, unit, min_keep, integer_budget=False)
            counts = rounded(alloc)
            if _macs(analysis, counts) <= budget:
                lo, best = mid, (alloc, counts)
            else:
                hi = mid
            if hi - lo < 0.5 * min(unit.values()):
                break
        if best is None:  # even the floor rounds above the budget: take the uniform minimum
            alloc = allocate(curves, sizes, floor, unit, min_keep, integer_budget=False)
            best = (alloc, least)
        return best

    counts = {g.id: g.size for g in groups.values()}
    alloc = None
    for _ in range(FIXED_POINT_ROUNDS):
        marg = marginal_macs(analysis, counts)
        alloc, counts = solve({n: marg[ids[n]] for n in groups})
    return counts, alloc


def uniform_record(analysis, targets, counts: Dict[int, int]) -> Optional[dict]:
    """The allocation record of a uniform MACs budget (for the report)."""
    if targets.target_macs is None:
        return None
    total = analysis.counts()["macs"]
    names = {g.id: g for g in analysis.prunable}
    return {"budget": f"{100 * targets.target_macs:g}% of MACs kept (channels)", "method": "uniform",
            "kept_macs_fraction": _macs(analysis, counts) / total,
            "groups": {names[gid].name: {"size": names[gid].size, "keep": k} for gid, k in counts.items()}}
