"""Budgets: how much of the model a pruning run keeps.

- ``compression`` c: keep round(total / c) of all prunable weights (``71x``);
- ``target_params`` N: keep N weights in total;
- ``target_macs`` f: keep the weights whose multiply-accumulates add up to a fraction f of the
  dense model's (every prunable weight costs the MACs it takes part in per sample: 1 for a
  dense layer, the output positions for a convolution; see ``costs``).

The totals are over every prunable weight, excluded and pinned ones included (they keep what
their rules say). Pure data and validation; imports nothing heavy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

from ..errors import ConfigError

ALLOCATIONS = ("sensitivity", "global")


@dataclass(frozen=True)
class Budget:
    """``kind`` is ``params`` (value: weights kept) or ``macs`` (value: fraction of MACs kept)."""

    kind: str
    value: float
    label: str

    def describe(self) -> str:
        return self.label


def parse_compression(value: Union[str, float, int, None]) -> Optional[float]:
    """``71x``, ``71`` or 71.0 -> 71.0 (must be > 1)."""
    if value is None:
        return None
    text = str(value).strip().lower()
    if text.endswith("x"):
        text = text[:-1]
    try:
        c = float(text)
    except ValueError:
        raise ConfigError(f"compression must look like 71x, got {value!r}") from None
    if not math.isfinite(c) or c <= 1.0:
        raise ConfigError(f"compression must be more than 1x, got {value!r}")
    return c


def check_budget_fields(compression, target_params, target_macs, allocation, min_keep, max_keep) -> None:
    """Validation used by ``PruneConfig``: at most one budget, sane bounds."""
    given = [n for n, v in (("compression", compression), ("target_params", target_params),
                            ("target_macs", target_macs)) if v is not None]
    if len(given) > 1:
        raise ConfigError(f"give one budget, not {' and '.join(given)}")
    if compression is not None:
        parse_compression(compression)
    if target_params is not None and (isinstance(target_params, bool) or not isinstance(target_params, int)
                                      or target_params < 1):
        raise ConfigError(f"target_params must be a whole number of weights >= 1, got {target_params!r}")
    if target_macs is not None:
        if isinstance(target_macs, bool) or not isinstance(target_macs, (int, float)) or not 0.0 < target_macs < 1.0:
            raise ConfigError(f"target_macs must be a fraction of MACs kept in (0, 1), got {target_macs!r}",
                              hint="0.5 keeps half of the multiply-accumulates")
    if allocation not in ALLOCATIONS:
        raise ConfigError(f"allocation must be one of {', '.join(ALLOCATIONS)}, got {allocation!r}")
    for name, v in (("min_keep", min_keep), ("max_keep", max_keep)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < v <= 1.0):
            raise ConfigError(f"{name} must be a fraction in (0, 1], got {v!r}")
    if min_keep is not None and max_keep is not None and min_keep > max_keep:
        raise ConfigError(f"min_keep ({min_keep}) is above max_keep ({max_keep})")


def make_budget(total_params: int, compression=None, target_params=None, target_macs=None) -> Optional[Budget]:
    """The budget a config asks for, or None."""
    if compression is not None:
        c = parse_compression(compression)
        kept = max(1, int(round(total_params / c)))
        return Budget("params", float(kept), f"{c:g}x compression ({kept:,} of {total_params:,} weights kept)")
    if target_params is not None:
        if target_params > total_params:
            raise ConfigError(f"target_params {target_params:,} is more than the model's {total_params:,} prunable weights")
        return Budget("params", float(target_params), f"{target_params:,} of {total_params:,} weights kept")
    if target_macs is not None:
        return Budget("macs", float(target_macs), f"{100 * target_macs:g}% of MACs kept")
    return None
