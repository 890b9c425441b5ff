"""The ADMM constraint of channel pruning: in every group g, at most k_g channels are nonzero.

A :class:`~admm_onnx.constraints.Constraint` of the engine: one ADMM variable spanning every
trainable member tensor of the pruned groups (a conv's weight belongs to its output group and
to its input group, so the groups cannot be separate variables); ``project(values)`` over
tensor name -> array (W + U in the Z-update), ``mask(values)``: the support the hard step keeps.

Math: a channel's score is the summed squared norm of all its member slices (producer rows,
biases, BatchNorm scale and shift, consumers' input columns, SE/residual partners) in the
given values. For one group whose members are disjoint from every other group's, keeping the k
highest-scoring channels and zeroing the other channels' slices is the exact Euclidean
projection onto "at most k nonzero channels" (the distance removed is the sum of the dropped
scores, which top-k minimises). Ties go to the lowest channel index. A tensor shared by two
groups (a conv's rows belong to its output group, its columns to its input group) gets both
masks: each group's choice is exact for its own scores; the joint set (a product of
constraints on the same entries) has no closed-form projection, and this is the standard
alternating approximation, computed from the unmasked values so the result does not depend on
group order.
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence

import numpy as np

from ..constraints import Constraint
from ..projection import _top_mask
from .analysis import ChannelAnalysis


class ChannelGroups(Constraint):
    """At most ``keep[g]`` nonzero channels in each group ``g`` (group id -> count)."""

    def __init__(self, analysis: ChannelAnalysis, keep: Mapping[int, int], tensors: Optional[Sequence[str]] = None):
        by_id = {g.id: g for g in analysis.groups}
        self.analysis = analysis
        self.keep = {int(g): int(k) for g, k in keep.items()}
        for gid, k in self.keep.items():
            g = by_id[gid]
            if not g.prunable:
                raise ValueError(f"group {g.name!r} is not prunable")
            if not 1 <= k <= g.size:
                raise ValueError(f"group {g.name!r}: keep {k} of {g.size} channels")
        self.groups = [by_id[g] for g in self.keep]
        allowed = None if tensors is None else set(tensors)
        self.name = "channels"
        self.freeze = False
        #: the tensors this constraint reads and writes (trainable member tensors)
        self.tensors = tuple(sorted({m.init for g in self.groups for m in g.members if not m.stat
                                     and (allowed is None or m.init in allowed)}))

    def scores(self, values: Mapping[str, np.ndarray]) -> Dict[int, np.ndarray]:
        """Group id -> per-channel summed squared norm of the member slices in ``values``."""
        out = {}
        for g in self.groups:
            s = np.zeros(g.size, np.float64)
            for m in g.members:
                if m.stat or m.init not in values:
                    continue
                arr = np.moveaxis(np.asarray(values[m.init], np.float64), m.axis, 0)
                sq = np.einsum("ij,ij->i", arr.reshape(arr.shape[0], -1), arr.reshape(arr.shape[0], -1))
                np.add.at(s, m.channels, sq[m.positions])
            out[g.id] = s
        return out

    def kept(self, values: Mapping[str, np.ndarray]) -> Dict[int, np.ndarray]:
        """Group id -> sorted indices of the channels the projection keeps."""
        return {gid: np.flatnonzero(_top_mask(s, self.keep[gid])) for gid, s in self.scores(values).items()}

    def mask(self, values: Mapping[str, np.ndarray], kept: Optional[Mapping[int, np.ndarray]] = None) -> Dict[str, np.ndarray]:
        """Tensor name -> boolean mask (broadcastable to the tensor) of the entries kept."""
        kept = self.kept(values) if kept is None else kept
        pos = self.analysis.position_keep(kept)
        out: Dict[str, np.ndarray] = {}
        for name in self.tensors:
            if name not in values:
                continue
            shape = np.shape(values[name])
            m = np.ones(shape, bool)
            for (init, axis), keep_pos in pos.items():
                if init == name and not keep_pos.all():
                    view = [1] * len(shape)
                    view[axis] = len(keep_pos)
                    m &= keep_pos.reshape(view)
            out[name] = m
        return out

    def project(self, values: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """Euclidean projection (see the module docstring) of ``values``: dropped slices zeroed."""
        masks = self.mask(values)
        return {n: np.where(masks[n], values[n], np.zeros((), np.asarray(values[n]).dtype)) for n in masks}

    def describe(self, values: Mapping[str, np.ndarray]) -> Dict[str, Dict[str, object]]:
        kept = self.kept(values)
        return {g.name: {"channels": g.size, "kept": int(len(kept[g.id]))} for g in self.groups}
