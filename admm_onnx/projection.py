"""Euclidean projections onto sparsity sets: the ADMM Z-update.

Pure NumPy, array in, array out; nothing here knows about ONNX or training.

For a tensor ``x`` and a sparsity ``s`` (the fraction of entries to zero), the set
S = {z : at most k nonzeros}, k = keep_count(x.size, s), is non-convex but its Euclidean
projection is exact and simple: keep the k entries of largest magnitude, zero the rest.
Structured variants project onto "at most k nonzero slices" along an axis (whole filters or
whole input channels); the projection keeps the k slices of largest L2 norm.
Ties are broken deterministically (lowest flat index wins), so every function zeroes exactly
the requested count.
"""
from __future__ import annotations

import math

import numpy as np

#: Structures a rule may ask for. "element": unstructured; "filter": whole slices along the
#: weight's output axis; "channel": whole slices along its input axis.
STRUCTURES = ("element", "filter", "channel")


def zero_count(size: int, sparsity: float) -> int:
    """Number of entries to zero so that at least ``sparsity`` of ``size`` are zero."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    # The epsilon absorbs float error (0.7 * 10 = 7.000000000000001 must give 7).
    return min(size, max(0, math.ceil(sparsity * size - 1e-9)))


def keep_count(size: int, sparsity: float) -> int:
    """Number of entries kept by a projection at ``sparsity``."""
    return size - zero_count(size, sparsity)


def _top_mask(scores: np.ndarray, k: int) -> np.ndarray:
    """Flat boolean mask of the k largest scores; ties at the threshold go to the lowest index.

    One ``np.partition`` finds the k-th largest value (the threshold); everything above it is
    kept, and the first ``k - #above`` entries equal to it fill up to exactly k.
    """
    flat = scores.ravel()
    n = flat.size
    if k >= n:
        return np.ones(n, dtype=bool)
    if k <= 0:
        return np.zeros(n, dtype=bool)
    threshold = np.partition(flat, n - k)[n - k]
    mask = flat > threshold
    need = k - int(np.count_nonzero(mask))
    if need:
        mask[np.flatnonzero(flat == threshold)[:need]] = True
    return mask


def topk_mask(x: np.ndarray, sparsity: float) -> np.ndarray:
    """Boolean mask of the ``keep_count`` entries of largest magnitude."""
    x = np.asarray(x)
    return _top_mask(np.abs(x), keep_count(x.size, sparsity)).reshape(x.shape)


def slice_mask(x: np.ndarray, sparsity: float, axis: int) -> np.ndarray:
    """Boolean mask keeping the slices along ``axis`` of largest L2 norm, broadcast to x."""
    x = np.asarray(x)
    axis = axis % x.ndim
    moved = np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)
    norms = np.sqrt(np.einsum("ij,ij->i", moved, moved, dtype=np.float64))
    keep = _top_mask(norms, keep_count(x.shape[axis], sparsity))
    shape = [1] * x.ndim
    shape[axis] = x.shape[axis]
    return np.broadcast_to(keep.reshape(shape), x.shape).copy()


def projection_mask(
    x: np.ndarray, sparsity: float, structure: str = "element", out_axis: int = 0, in_axis: int = 1
) -> np.ndarray:
    """Mask of the projection of ``x`` onto the sparsity set of the given structure."""
    if structure == "element":
        return topk_mask(x, sparsity)
    if structure == "filter":
        return slice_mask(x, sparsity, out_axis)
    if structure == "channel":
        return slice_mask(x, sparsity, in_axis)
    raise ValueError(f"unknown structure {structure!r}; expected one of {STRUCTURES}")


def project(
    x: np.ndarray, sparsity: float, structure: str = "element", out_axis: int = 0, in_axis: int = 1
) -> np.ndarray:
    """Euclidean projection of ``x`` onto the sparsity set: x with the pruned entries zeroed."""
    out = np.array(x, copy=True)
    out[~projection_mask(out, sparsity, structure, out_axis, in_axis)] = 0
    return out
