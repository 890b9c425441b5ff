"""From a budget in the config to per-layer rules: what ``prune`` calls before it plans.

1. Rules in the config still decide: a weight a rule excludes stays dense, a weight a rule
   gives a sparsity is *pinned* at it; every other prunable weight is *free*.
2. The free weights get a sensitivity sweep (sensitivity.py; cached, parallel) on up to
   ``sensitivity_samples`` training samples (never the evaluation split).
3. The allocator (allocator.py) splits what the budget leaves after the pinned and excluded
   weights among the free ones.
4. One rule per free weight is appended (``names = [w], sparsity = 1 - kept / size``), and the
   budget fields are cleared, so the returned config is an ordinary per-layer config (and
   applying it again changes nothing).

The allocation record (budget, chosen ratios, the predicted one-shot metric and the measured
one with every chosen ratio applied at once) goes into the run's report.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Dict, Optional, Tuple, Union

import numpy as np

from ..errors import ConfigError, DataError
from ..projection import keep_count
from .allocator import LayerCurve, allocate, bound_counts
from .budget import make_budget
from .costs import layer_costs

log = logging.getLogger(__name__)


def has_budget(config) -> bool:
    return any(getattr(config, f, None) is not None for f in ("compression", "target_params", "target_macs"))


def reader_samples(reader, n: int, seed: int = 0) -> Tuple[Union[np.ndarray, Dict[str, np.ndarray]],
                                                            Optional[np.ndarray]]:
    """Up to ``n`` samples (a seeded subset) of the data behind ``reader`` (one array, or arrays
    keyed by input name for a model with several inputs): read from the
    arrays of an ``ArrayReader`` (also inside wrappers that keep it as ``.reader``) without
    touching its position; any other reader is read batch by batch and rewound."""
    r = reader
    for _ in range(8):
        if r is None:
            break
        x = getattr(r, "x", None)
        if isinstance(x, dict) and len(x) == 1:  # ArrayReader keeps its inputs by name
            x = next(iter(x.values()))
        if isinstance(x, dict) and x and all(isinstance(a, np.ndarray) for a in x.values()):  # several inputs
            idx = np.sort(np.random.default_rng(seed).permutation(len(next(iter(x.values()))))[:n])
            y = getattr(r, "y", None)
            return {k: a[idx] for k, a in x.items()}, (None if y is None else np.asarray(y)[idx])
        if isinstance(x, np.ndarray):
            idx = np.sort(np.random.default_rng(seed).permutation(len(x))[:n])
            y = getattr(r, "y", None)
            return x[idx], (None if y is None else np.asarray(y)[idx])
        r = getattr(r, "reader", None)
    from ..data import LABELS

    xs, ys = [], []
    if hasattr(reader, "set_epoch"):
        reader.set_epoch(0)  # the same order (and so the same samples) on every call
    reader.rewind()
    got = 0
    while got < n:
        feed = reader.get_next()
        if feed is None:
            break
        names = [k for k in feed if k not in (LABELS, "__valid__")]
        valid = int(feed.get("__valid__", len(feed[names[0]])))
        xs.append({k: np.asarray(feed[k])[:valid] for k in names})
        if LABELS in feed:
            ys.append(np.asarray(feed[LABELS])[:valid])
        got += valid
    reader.rewind()
    if not xs:
        raise DataError("the training reader yielded no samples for the sensitivity sweep")
    ys = np.concatenate(ys)[:n] if ys else None
    if len(xs[0]) == 1:
        return np.concatenate([next(iter(b.values())) for b in xs])[:n], ys
    return {k: np.concatenate([b[k] for b in xs])[:n] for k in xs[0]}, ys


def sweep_samples(prepared, x, y, metric: str):
    """(samples fitted to the model, metric) of a budget's sweep: the configured metric, or KL
    from the dense model's outputs when the default ``loss`` has no class per sample to use
    (no labels, as in distillation; token labels; regression targets)."""
    if not isinstance(x, dict):  # several inputs come fitted from their reader
        from ..data import fit_to_input

        x = fit_to_input(x, prepared.input_shape, prepared.input_name)
    if metric == "loss" and (y is None or np.ndim(y) != 1 or np.asarray(y).dtype.kind not in "iu"):
        metric = "kl"
        log.info("the sensitivity sweep measures KL divergence from the dense model's outputs (%s)",
                 "no labels" if y is None else "labels are not one class per sample")
    return x, metric


def _classify(config, info) -> Tuple[Dict[str, float], set, list]:
    """(pinned name -> sparsity, excluded names, free names) under the config's rules."""
    from ..config import Rule, resolve_rules

    names = list(info.prunable)
    if not config.rules:
        return {}, set(), names
    a = resolve_rules(dataclasses.replace(config, rules=(Rule(sparsity=0.0),) + config.rules), info)
    b = resolve_rules(dataclasses.replace(config, rules=(Rule(sparsity=0.5),) + config.rules), info)
    excluded = {n for n in names if n not in a}
    pinned = {n: a[n].sparsity for n in names if n in a and a[n].sparsity == b[n].sparsity}
    free = [n for n in names if n in a and n not in pinned]
    return pinned, excluded, free


def apply_budget(prepared, config, train_reader, cache_dir="default", runner=None):
    """(config with per-layer rules, allocation record) for a config with a budget; a config
    without one is returned as is, with None."""
    if not has_budget(config):
        return config, None
    from ..config import Rule
    from .runners import make_runner
    from .sensitivity import DEFAULT_LEVELS, joint_metric, run_sensitivity, sample_count

    info = prepared.info
    costs = layer_costs(prepared.original, info)
    sizes = {n: w.size for n, w in info.prunable.items()}
    total_params = sum(sizes.values())
    total_macs = sum(c.macs for c in costs.values())
    budget = make_budget(total_params, config.compression, config.target_params, config.target_macs)
    pinned, excluded, free = _classify(config, info)
    if not free:
        raise ConfigError("a budget needs at least one weight that no rule pins or excludes")

    unit = {n: float(costs[n].positions) if budget.kind == "macs" else 1.0 for n in sizes}
    fixed = sum(keep_count(sizes[n], s) * unit[n] for n, s in pinned.items()) + sum(sizes[n] * unit[n] for n in excluded)
    total = budget.value if budget.kind == "params" else budget.value * total_macs
    left = total - fixed
    if left <= 0:
        raise ConfigError(f"the pinned and excluded weights alone use more than the budget ({budget.label})")

    if config.allocation == "global":
        return _global(config, info, budget, sizes, costs, pinned, excluded, free, int(round(left)))

    levels = DEFAULT_LEVELS
    if config.min_keep is not None and config.min_keep < min(levels):
        levels = tuple(sorted(set(levels) | {config.min_keep}, reverse=True))
    min_keep = {n: (config.min_keep if config.min_keep is not None else min(levels)) for n in free}
    max_keep = {n: config.max_keep for n in free} if config.max_keep is not None else None
    bound_counts(free, sizes, left, unit, min_keep, max_keep)  # an unreachable budget fails before the sweep

    x, y = reader_samples(train_reader, config.sensitivity_samples, seed=config.seed)
    x, metric = sweep_samples(prepared, x, y, config.sensitivity_metric)
    runner = runner or make_runner(config.workers)
    result = run_sensitivity(prepared, x, y, levels, metric, "element", free, runner, cache_dir)
    curves = {n: LayerCurve(tuple(result.curves[n].keep), tuple(result.curves[n].deltas(result.baseline))) for n in free}
    alloc = allocate(curves, {n: sizes[n] for n in free}, left, {n: unit[n] for n in free}, min_keep, max_keep)

    rules = tuple(Rule(names=(n,), sparsity=_sparsity(sizes[n], alloc.keep[n])) for n in free)
    new = dataclasses.replace(config, rules=tuple(config.rules) + rules, compression=None, target_params=None,
                              target_macs=None)
    keep_all = {n: alloc.fraction[n] for n in free}
    keep_all.update({n: keep_count(sizes[n], s) / sizes[n] for n, s in pinned.items()})
    measured = joint_metric(prepared, x, y, keep_all, metric)
    kept = {n: alloc.keep.get(n, keep_count(sizes[n], pinned.get(n, 0.0))) for n in sizes}
    kept_params = sum(kept.values())
    kept_macs = sum(kept[n] * costs[n].positions for n in sizes)
    record = {
        "budget": budget.label, "kind": budget.kind, "metric": metric, "samples": sample_count(x),
        "dense_metric": result.baseline,
        "predicted_one_shot_metric": result.baseline + alloc.predicted_total,
        "measured_one_shot_metric": measured,
        "kept_weights": int(kept_params), "total_weights": int(total_params),
        "compression": total_params / max(1, kept_params),
        "kept_macs_fraction": kept_macs / max(1, total_macs),
        "sensitivity_seconds": result.seconds, "sensitivity_evaluations": result.computed,
        "sensitivity_cached": result.cached, "runner": result.runner,
        "layers": {n: {"weights": sizes[n], "kept": int(kept[n]), "fraction_kept": kept[n] / sizes[n],
                       "macs_per_weight": costs[n].positions,
                       "how": "excluded" if n in excluded else ("pinned" if n in pinned else "allocated"),
                       "predicted_delta": alloc.predicted_delta.get(n)} for n in sizes},
    }
    log.info("allocation for %s (%s): %s; predicted one-shot %s %.4f, measured %.4f (dense %.4f)",
             budget.label, metric, ", ".join(f"{n} {100 * kept[n] / sizes[n]:.3g}%" for n in sizes), metric,
             record["predicted_one_shot_metric"], measured, result.baseline)
    return new, record


GLOBAL_FLOOR = 0.002  # the lowest sensitivity level: every layer keeps at least this much


def _global(config, info, budget, sizes, costs, pinned, excluded, free, left):
    """The global top-k variant: nominal per-layer rules (the uniform split of ``left``), and a
    record that :func:`admm_variables` turns into one :class:`GlobalTopK` variable."""
    from ..config import Rule

    if budget.kind != "params":
        raise ConfigError("allocation 'global' takes a weights budget (compression or target_params), not target_macs")
    if config.max_keep is not None:
        raise ConfigError("max_keep is not supported with allocation 'global'")
    floor_frac = config.min_keep if config.min_keep is not None else GLOBAL_FLOOR
    floors = {n: max(1, int(np.ceil(floor_frac * sizes[n] - 1e-9))) for n in free}
    if sum(floors.values()) > left:
        raise ConfigError(f"the per-layer floors ({sum(floors.values()):,} weights) exceed the budget left ({left:,})",
                          hint="lower min_keep")
    free_total = sum(sizes[n] for n in free)
    uniform = 1.0 - left / free_total
    rules = tuple(Rule(names=(n,), sparsity=min(max(uniform, 0.0), 1.0 - 1.0 / sizes[n])) for n in free)
    new = dataclasses.replace(config, rules=tuple(config.rules) + rules, compression=None, target_params=None,
                              target_macs=None)
    record = {
        "budget": budget.label, "kind": budget.kind, "allocation": "global",
        "global": {"tensors": list(free), "keep": int(left), "floors": floors},
        "kept_weights": int(left + sum(keep_count(sizes[n], s) for n, s in pinned.items())
                            + sum(sizes[n] for n in excluded)),
        "total_weights": int(sum(sizes.values())),
        "layers": {n: {"weights": sizes[n], "how": "excluded" if n in excluded else (
            "pinned" if n in pinned else "global"), "floor": floors.get(n)} for n in sizes},
    }
    log.info("allocation for %s: global top-%d across %s (floor %g of each); the split emerges during ADMM",
             budget.label, left, ", ".join(free), floor_frac)
    return new, record


def admm_variables(plan, allocation):
    """(what ``AdmmState`` takes, initial rho per variable or None): the plan itself, or with
    ``allocation = "global"`` one :class:`GlobalTopK` over the allocated weights plus one
    variable per other weight."""
    g = (allocation or {}).get("global")
    if not g:
        return plan, None
    from ..constraints import constraint_for
    from .global_topk import GlobalTopK

    tensors = [n for n in g["tensors"] if n in plan]
    variables = [GlobalTopK("global", tensors, g["keep"], g["floors"])]
    variables += [constraint_for(p) for n, p in plan.items() if n not in tensors]
    rho = {"global": plan[tensors[0]].rho} if plan[tensors[0]].rho is not None else {}
    rho.update({n: p.rho for n, p in plan.items() if n not in tensors and p.rho is not None})
    return variables, rho


def _sparsity(size: int, kept: int) -> float:
    """A sparsity whose keep_count is exactly ``kept``."""
    s = (size - kept) / size
    for _ in range(4):
        got = keep_count(size, s)
        if got == kept:
            return s
        s = np.nextafter(s, 1.0 if got > kept else 0.0)
    if keep_count(size, s) != kept:
        raise RuntimeError(f"no sparsity keeps exactly {kept} of {size}")
    return float(s)
