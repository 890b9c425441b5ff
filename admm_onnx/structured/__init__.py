"""Structured (channel) pruning: analysis + rules registry + shrink + verify.

- :func:`analyse` (analysis.py, rules/): channel groups and their member slices, blockers with reasons;
- :func:`shrink` / :func:`masked` (shrink.py): physical removal / zeroing for a keep set;
- :func:`verify` (verify.py): the shrunk model computes what the masked one computed;
- :class:`ChannelGroups` (constraint.py): the ADMM constraint (exact top-k channel projection);
- :func:`keep_counts` (targets.py): channel budgets from a sparsity or a MAC budget.
"""
from .analysis import ChannelAnalysis, Group, Member, analyse
from .shrink import masked, shrink
from .verify import ShrinkMismatch, verify

__all__ = ["ChannelAnalysis", "Group", "Member", "ShrinkMismatch", "analyse", "masked", "shrink", "verify"]
