"""``allocation = "global"``: one ADMM variable over every allocated weight, whose Z-step keeps
the ``keep`` largest magnitudes across all of them at once, with a floor per weight.

The per-layer split then emerges during ADMM (Carreira-Perpinan & Idelbayev's LC algorithm
with a global l0 budget) and is frozen by the hard step; no sensitivity sweep is run.

Projection onto {Z : ||Z||_0 <= keep, ||Z_t||_0 >= floor_t is allowed for every t}: first the
``floor_t`` largest magnitudes of each tensor, then the ``keep - sum(floor)`` largest of all the
other entries, ties to the lowest (tensor order, flat index). It is exact for the set "at most
``keep`` nonzeros of which the floors are guaranteed", deterministic and idempotent, and plugs
into the engine through the constraint protocol (admm_onnx/constraints.py).
"""
from __future__ import annotations

from typing import Dict, Mapping, Sequence

import numpy as np

from ..constraints import Constraint
from ..projection import _top_mask


class GlobalTopK(Constraint):
    freeze = False

    def __init__(self, name: str, tensors: Sequence[str], keep: int, floors: Mapping[str, int]):
        self.name = name
        self.tensors = tuple(tensors)
        self.keep = int(keep)
        self.floors = {t: int(floors.get(t, 0)) for t in self.tensors}
        if sum(self.floors.values()) > self.keep:
            raise ValueError("the floors add up to more than the budget")

    def mask(self, values: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
        scores, firsts = [], []
        for t in self.tensors:
            a = np.abs(np.asarray(values[t], dtype=np.float64)).ravel()
            first = _top_mask(a, min(self.floors[t], a.size))
            firsts.append(first)
            scores.append(np.where(first, -1.0, a))  # already kept: never chosen again
        rest = _top_mask(np.concatenate(scores), self.keep - int(sum(f.sum() for f in firsts)))
        out, at = {}, 0
        for t, first in zip(self.tensors, firsts):
            n = first.size
            out[t] = (first | rest[at:at + n]).reshape(np.shape(values[t]))
            at += n
        return out

    def project(self, values: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
        masks = self.mask(values)
        return {t: np.where(masks[t], values[t], np.zeros_like(values[t])) for t in self.tensors}

    def describe(self, values: Mapping[str, np.ndarray]) -> Dict[str, Dict[str, object]]:
        # describe() facts become the report's quantization specs (read back for retraining);
        # a sparsity pattern has none: the kept counts are in the report's layers.
        return {}
