"""Channel budgets: how many channels each prunable group keeps.

:class:`ChannelTargets` (validated at construction) asks for one of
- ``sparsity`` S: every prunable group loses the fraction S of its channels (``per_group``:
  group-name glob -> S overrides it for some groups);
- ``target_macs`` F: keep at most F of the dense model's MACs (batch 1): one uniform channel
  fraction for all prunable groups, the largest whose model fits (bisection; MACs are exact
  for any keep set, see ChannelAnalysis.counts).
``allocation`` (with ``target_macs`` only): "sensitivity" (the default) splits the budget among
the groups from their measured sensitivity curves (structured/allocate.py); "uniform" is the
one fraction above.
``round_to`` m rounds kept counts up to a multiple of m (never above the group's size); the
default 8 is the channel block of ONNX Runtime's fast CPU convolution layout (NCHWc, 8 floats
on AVX2): measured on ResNet-20 (bench/channel_layout.py, onnxruntime 1.32), kept counts of
11/21/41 ran mostly *slower* than the dense 16/32/64 model, 8/16/40 1.5-2.4x faster.
Every group keeps at least ``min_keep`` channels.
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from typing import Dict, Optional

from ..errors import ConfigError
from .analysis import ChannelAnalysis


@dataclass(frozen=True)
class ChannelTargets:
    sparsity: Optional[float] = None
    target_macs: Optional[float] = None
    per_group: Dict[str, float] = field(default_factory=dict)
    round_to: int = 8
    min_keep: int = 1
    allocation: Optional[str] = None
    #: A Z/U update every ``update_steps`` optimizer steps of channel ADMM, and at the end of every
    #: iteration; 0 (default): only at the end of every iteration. Not PruneConfig's
    #: admm_update_steps (20): on ResNet-20/CIFAR-10 (2026-12-05) updates every 20 steps let the
    #: balance policy raise rho from 0.019 to 94 in 4 iterations (a channel set's primal residual
    #: does not fall 10% per 20 steps), and the hard-pruned top-1 fell from 54% to 23%.
    update_steps: int = 0

    @property
    def method(self) -> str:
        """How a MACs budget is split: "sensitivity" (default) or "uniform"; always "uniform" for a sparsity."""
        if self.target_macs is None:
            return "uniform"
        return self.allocation or "sensitivity"

    def __post_init__(self):
        if (self.sparsity is None) == (self.target_macs is None):
            raise ConfigError("channel pruning needs exactly one of --sparsity S and --target-macs F")
        if self.sparsity is not None and not 0.0 <= self.sparsity < 1.0:
            raise ConfigError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if self.target_macs is not None and not 0.0 < self.target_macs <= 1.0:
            raise ConfigError(f"--target-macs must be in (0, 1] (the fraction of MACs kept), got {self.target_macs}")
        if self.allocation is not None and self.allocation not in ("sensitivity", "uniform"):
            raise ConfigError(f"channel allocation must be 'sensitivity' or 'uniform', got {self.allocation!r}")
        if self.allocation is not None and self.target_macs is None:
            raise ConfigError("a channel allocation needs --target-macs (with --sparsity every group loses the same fraction)")
        for k, v in self.per_group.items():
            if not isinstance(k, str) or not 0.0 <= v < 1.0:
                raise ConfigError(f"per-group sparsity for {k!r} must be in [0, 1), got {v}")
        if isinstance(self.round_to, bool) or not isinstance(self.round_to, int) or self.round_to < 1:
            raise ConfigError(f"--round-to must be a whole number >= 1, got {self.round_to!r}")
        if isinstance(self.update_steps, bool) or not isinstance(self.update_steps, int) or self.update_steps < 0:
            raise ConfigError(f"--admm-update-steps must be a whole number >= 0, got {self.update_steps!r}")
        if isinstance(self.min_keep, bool) or not isinstance(self.min_keep, int) or self.min_keep < 1:
            raise ConfigError(f"min_keep must be a whole number >= 1, got {self.min_keep!r}")

    def _count(self, size: int, keep_fraction: float) -> int:
        k = max(self.min_keep, math.ceil(size * keep_fraction - 1e-9))
        k = self.round_to * math.ceil(k / self.round_to)
        return max(1, min(size, k))

    def keep_counts(self, analysis: ChannelAnalysis) -> Dict[int, int]:
        """Group id -> kept channel count, for every prunable group (a MACs budget: one uniform
        fraction; the sensitivity allocation is structured/allocate.py)."""
        groups = analysis.prunable
        if not groups:
            raise ConfigError("the model has no prunable channel group", hint="run 'admm-onnx groups MODEL' to see why")
        if self.sparsity is not None:
            out = {}
            for g in groups:
                s = next((v for p, v in self.per_group.items() if fnmatch.fnmatchcase(g.name, p)), self.sparsity)
                out[g.id] = self._count(g.size, 1.0 - s)
            return out
        total = analysis.counts()["macs"]
        budget = self.target_macs * total

        def macs(fraction):
            counts = {g.id: self._count(g.size, fraction) for g in groups}
            return analysis.counts({gid: range(k) for gid, k in counts.items()})["macs"], counts

        low_macs, low = macs(0.0)
        if low_macs > budget:
            raise ConfigError(
                f"--target-macs {self.target_macs} cannot be reached: with every prunable group at its minimum "
                f"the model keeps {low_macs / total:.3f} of its MACs")
        lo, hi = 0.0, 1.0
        best = low
        for _ in range(40):
            mid = (lo + hi) / 2
            m, counts = macs(mid)
            if m <= budget:
                lo, best = mid, counts
            else:
                hi = mid
        return best
