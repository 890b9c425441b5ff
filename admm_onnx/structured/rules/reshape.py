"""Views that move the channel axis: Transpose, Flatten, Reshape, Squeeze, Unsqueeze.

Transpose: the channel axis a becomes perm.index(a).
Flatten(axis f <= a) of [d0..dn]: output column j*S + s belongs to the channel at position j,
S = prod(d[a+1:]) (a block map, static trailing dims needed); with f < a the leading
dims repeat the block (np.tile). f > a merges the channels into the rows: blocked.
Reshape with a constant shape: either the channel axis survives as an axis of the output
(same leading dims, same size), or it is merged with the static dims after it into one output
axis (block map as Flatten); an explicit size for that output axis in the shape constant is
rewritten on shrink. Any other reshape (splitting the channel axis, channel shuffles) blocks.
"""
from __future__ import annotations

import numpy as np
from onnx import numpy_helper

from ..graph import get_attr
from ..maps import Blocked, Mapping, Origin
from . import register


def _static(dims):
    return all(isinstance(d, int) and d >= 0 for d in dims)


@register("Transpose")
def transpose(node, ins, ctx):
    x = ins[0]
    rank = ctx.view.rank(node.input[0])
    perm = get_attr(node, "perm")
    if perm is None:
        if rank is None:
            return Blocked(f"Transpose {node.name!r}: rank unknown")
        perm = list(range(rank))[::-1]
    return Mapping(outputs={node.output[0]: Origin(list(perm).index(x.axis), x.atoms)})


def _block_atoms(atoms, outer, inner):
    return np.tile(np.repeat(atoms, inner), outer)


@register("Flatten")
def flatten(node, ins, ctx):
    x = ins[0]
    shape = ctx.view.shape(node.input[0])
    if shape is None:
        return Blocked(f"Flatten {node.name!r}: input shape unknown (dynamic shape)")
    f = int(get_attr(node, "axis", 1)) % (len(shape) + 1)
    if f > x.axis:
        return Blocked(f"Flatten {node.name!r} merges the channels into the rows")
    if not _static(shape[x.axis + 1:]) or not _static(shape[f:x.axis]):
        return Blocked(f"Flatten {node.name!r}: spatial size unknown (dynamic shape)")
    inner = int(np.prod(shape[x.axis + 1:], dtype=np.int64))
    outer = int(np.prod(shape[f:x.axis], dtype=np.int64))
    return Mapping(outputs={node.output[0]: Origin(1, _block_atoms(x.atoms, outer, inner))})


def _same(a, b):
    return len(a) == len(b) and all(isinstance(u, int) and u == v or isinstance(u, str) and u == v for u, v in zip(a, b))


def _prod(dims):
    return int(np.prod(dims, dtype=np.int64)) if dims else 1


def _match(src, dst, a, b, n):
    """``inner`` if output axis b holds input channel axis a (n channels) merged with the next
    input axes of total size inner (1: the axis survives as it is), else None."""
    if not isinstance(dst[b], int):
        return None
    suffix_static = _static(src[a + 1:]) and _static(dst[b + 1:])
    if not suffix_static:
        return None
    inner, m = 1, a + 1
    while True:
        if dst[b] == n * inner and _prod(src[m:]) == _prod(dst[b + 1:]):
            prefix_ok = _same(src[:a], dst[:b]) or (_static(src[:a]) and _static(dst[:b]) and _prod(src[:a]) == _prod(dst[:b])) \
                or not (_static(src[:a]) and _static(dst[:b]))  # same element count: prefixes agree
            return inner if prefix_ok else None
        if m == len(src) or n * inner > dst[b]:
            return None
        inner *= src[m]
        m += 1


@register("Reshape")
def reshape(node, ins, ctx):
    x = ins[0]
    if len(ins) > 1 and ins[1] is not None:
        return Blocked(f"Reshape {node.name!r} reads pruned channels as a shape")
    target = ctx.view.const(node.input[1])
    src = ctx.view.shape(node.input[0])
    dst = ctx.view.shape(node.output[0])
    if target is None:
        return Blocked(f"Reshape {node.name!r} to a computed shape (dynamic shape)")
    if src is None or dst is None:
        return Blocked(f"Reshape {node.name!r}: shapes unknown (dynamic shape)")
    a = x.axis
    n = len(x.atoms)
    target = [int(v) for v in np.asarray(target).ravel()]
    for b in range(len(dst)):
        inner = _match(src, dst, a, b, n)
        if inner is None:
            continue
        atoms = np.repeat(x.atoms, inner)
        res = Mapping(outputs={node.output[0]: Origin(b, atoms)})
        if b < len(target) and target[b] not in (0, -1):
            def fix_shape(model, nd, kept, b=b, target=target, atoms=atoms):
                new = list(target)
                new[b] = int(kept(atoms).sum())
                name = f"{nd.name or nd.output[0]}_shape_shrunk"
                model.graph.initializer.append(numpy_helper.from_array(np.array(new, np.int64), name))
                nd.input[1] = name

            res.fixes.append(fix_shape)
        elif b < len(target) and target[b] == 0 and b != a:
            return Blocked(f"Reshape {node.name!r} copies a dimension onto the channel axis")
        return res
    return Blocked(f"Reshape {node.name!r} splits or moves the channel axis")


@register("Squeeze", "Unsqueeze")
def squeeze(node, ins, ctx):
    x = ins[0]
    axes = get_attr(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        axes = ctx.view.const(node.input[1])
    rank_in, rank_out = ctx.view.rank(node.input[0]), ctx.view.rank(node.output[0])
    if axes is None or rank_in is None or rank_out is None:
        return Blocked(f"{node.op_type} {node.name!r}: axes or shape unknown")
    if node.op_type == "Squeeze":
        axes = sorted(int(v) % rank_in for v in axes)
        if x.axis in axes:
            return Blocked(f"Squeeze {node.name!r} removes the channel axis")
        new = x.axis - sum(v < x.axis for v in axes)
    else:
        axes = sorted(int(v) % rank_out for v in axes)
        new = x.axis
        for v in axes:
            if v <= new:
                new += 1
    return Mapping(outputs={node.output[0]: Origin(new, x.atoms)})
