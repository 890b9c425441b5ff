"""Automatic per-layer prune ratios: sensitivity sweeps, budgets and the allocator.

One room of its own (see shared architecture): the pipeline calls :func:`apply_budget`, the
CLI's ``sensitivity`` command calls :func:`sensitivity.run_sensitivity`. Modules:

- ``costs``: weights and MACs per prunable weight, from shapes;
- ``budget``: what a budget is (``71x``, N weights kept, a fraction of MACs kept);
- ``sensitivity``: one-shot magnitude pruning of one weight at a time, every other layer dense,
  evaluated in ONNX Runtime inference sessions; cached per model + data fingerprint;
- ``allocator``: the Lagrangian / knapsack over the sensitivity curves;
- ``runners``: where independent trials run (this process, local worker processes, a Ray
  cluster), with identical results.

Nothing here imports the CLI; heavy modules are imported lazily.
"""
from __future__ import annotations

__all__ = ["apply_budget"]


def apply_budget(prepared, config, train_reader, cache_dir=None):
    """See :func:`admm_onnx.allocation.plan.apply_budget`."""
    from .plan import apply_budget as _apply

    return _apply(prepared, config, train_reader, cache_dir=cache_dir)
