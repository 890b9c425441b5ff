"""Gemm and MatMul with a constant weight.

Gemm Y = A' B' + C (transA, transB): the output column n owns B'[:, n] (B row n when transB=1,
column n otherwise) and C[..., n] when C is per column ([N] or [1, N]); an input channel k of
A is B' row k. transA = 1 on pruned input channels, a C with a row dimension > 1 (per-sample),
or a weight that is not an initializer of its own, blocks.
MatMul X @ W, W [K, N] an initializer: the same with the channel axis last; the pruned input
channels must be on X's last axis. Two computed operands (attention) block.
"""
from __future__ import annotations

import numpy as np

from ..graph import get_attr
from ..maps import Blocked, Macs, Mapping, Origin, Slice
from . import register
from .conv import _own


def _rows(ctx, name):
    s = ctx.view.shape(name)
    if s is None:
        return None
    out = 1
    for d in s[:-1]:
        out *= d if isinstance(d, int) else 1  # symbolic batch / sequence counted as 1
    return out


@register("Gemm")
def gemm(node, ins, ctx):
    a = ins[0]
    if ins[1] is not None or (len(ins) > 2 and ins[2] is not None):
        return Blocked(f"Gemm {node.name!r} takes pruned channels as B or C")
    w = _own(ctx, node.input[1])
    c_name = node.input[2] if len(node.input) > 2 else ""
    tracked = a is not None and a.tracked
    if w is None or w.ndim != 2:
        return Blocked(f"Gemm {node.name!r}: B is not an initializer of its own") if tracked else Mapping()
    if tracked and (get_attr(node, "transA", 0) or a.axis != 1):
        return Blocked(f"Gemm {node.name!r} reads pruned channels through transA")
    trans_b = bool(get_attr(node, "transB", 0))
    k, n = (w.shape[1], w.shape[0]) if trans_b else w.shape
    res = Mapping()
    atoms = ctx.new_space(node, n)
    out_axis_w = 0 if trans_b else 1
    res.members.append(Slice(node.input[1], out_axis_w, atoms))
    own_output = True
    if c_name:
        c = _own(ctx, c_name)
        if c is None:
            own_output = False
        elif c.ndim >= 1 and c.shape[-1] == n and n > 1:
            if c.ndim == 2 and c.shape[0] != 1:
                own_output = False
            else:
                res.members.append(Slice(c_name, c.ndim - 1, atoms))
    if own_output:
        res.outputs[node.output[0]] = Origin(1, atoms)
    else:
        res.members = []
    inp = None
    if tracked:
        res.members.append(Slice(node.input[1], 1 if trans_b else 0, a.atoms))
        inp = a.atoms
    rows = _rows(ctx, node.output[0]) or 1
    res.macs.append(Macs(node.name, int(rows * k * n), atoms if own_output else None, inp))
    return res


@register("MatMul")
def matmul(node, ins, ctx):
    a, b = ins[0], ins[1]
    if b is not None and b.tracked:
        return Blocked(f"MatMul {node.name!r} multiplies two computed tensors" if a is not None or not ctx.view.is_init(node.input[0])
                       else f"MatMul {node.name!r} has its constant on the left")
    w = _own(ctx, node.input[1])
    tracked = a is not None and a.tracked
    if w is None or w.ndim != 2:
        if tracked:
            return Blocked(f"MatMul {node.name!r} multiplies two computed tensors" if w is None and not ctx.view.is_init(node.input[1])
                           else f"MatMul {node.name!r}: weight is not a 2-D initializer of its own")
        return Mapping()
    rank_a = ctx.view.rank(node.input[0])
    if tracked and (rank_a is None or a.axis != rank_a - 1):
        return Blocked(f"MatMul {node.name!r} reads pruned channels on a non-contracted axis")
    k, n = w.shape
    atoms = ctx.new_space(node, n)
    rank_out = ctx.view.rank(node.output[0])
    res = Mapping()
    if rank_out is not None:
        res.outputs[node.output[0]] = Origin(rank_out - 1, atoms)
        res.members.append(Slice(node.input[1], 1, atoms))
    inp = None
    if tracked:
        res.members.append(Slice(node.input[1], 0, a.atoms))
        inp = a.atoms
    rows = _rows(ctx, node.output[0]) or 1
    res.macs.append(Macs(node.name, int(rows * k * n), atoms if rank_out is not None else None, inp))
    return res
