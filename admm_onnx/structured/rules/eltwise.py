"""Elementwise ops.

Unary ops (activations, Cast, Dropout, Clip with scalar bounds...) pass the channels through:
a removed channel's values do not matter, because every consumer's input slice for it is
removed too (and zeroed in the masked model), so f(0) != 0 (Sigmoid, HardSwish) is exact.

Broadcasting ops (Add, Sub, Mul, Div, Pow, Max, Min, Sum, Mean, Where): operands are aligned
from the right. Channel position p of two pruned operands is the same channel (residual
branches, SE gates: their atoms are coupled). A constant operand with the channel size on the
channel axis is a member (a per-channel bias or scale); size 1 broadcasts and stays. A
computed operand whose channels cannot be removed, a pruned operand of size 1 on a longer
axis, or an unknown operand shape, blocks.
"""
from __future__ import annotations

import numpy as np

from ..maps import Blocked, Mapping, Origin, Slice
from . import register
from .conv import _own

UNARY = (
    "Relu", "LeakyRelu", "PRelu_", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu", "Celu", "Gelu",
    "Erf", "Softplus", "Softsign", "Mish", "Abs", "Neg", "Exp", "Log", "Sqrt", "Reciprocal", "Floor", "Ceil",
    "Round", "Sin", "Cos", "Identity", "Cast", "Dropout", "Clip", "Sign", "ThresholdedRelu", "Shrink", "Swish",
)


@register(*UNARY)
def unary(node, ins, ctx):
    x = ins[0]
    if any(o is not None and o.tracked for o in ins[1:]):
        return Blocked(f"{node.op_type} {node.name!r} reads pruned channels as a parameter")
    out = Mapping()
    if x is not None:
        for name in node.output:
            if name:
                out.outputs[name] = Origin(x.axis, x.atoms)
    return out


def broadcast(node, ins, ctx, names):
    """Couple the operands ``names`` (with origins ``ins``) of a broadcasting op."""
    rank_out = ctx.view.rank(node.output[0])
    if rank_out is None:
        return Blocked(f"{node.op_type} {node.name!r}: output shape unknown (dynamic shape)")
    axis = None
    for name, o in zip(names, ins):
        if o is not None and o.tracked:
            a = rank_out - ctx.view.rank(name) + o.axis
            if axis is not None and a != axis:
                return Blocked(f"{node.op_type} {node.name!r} combines pruned channels on different axes")
            axis = a
    res = Mapping()
    ref = None
    length = None
    for name, o in zip(names, ins):
        if o is not None and o.tracked and len(o.atoms) > 1:
            length = len(o.atoms)
    for name, o in zip(names, ins):
        if o is not None and o.tracked:
            if length is not None and len(o.atoms) != length:
                return Blocked(f"{node.op_type} {node.name!r} broadcasts a pruned channel over {length} channels")
            if ref is None:
                ref = o.atoms.copy()
                continue
            both = (ref >= 0) & (o.atoms >= 0)
            res.couple.append((ref[both], o.atoms[both]))
            one = (ref >= 0) ^ (o.atoms >= 0)
            if one.any():
                res.blocks.append((np.concatenate([ref[one & (ref >= 0)], o.atoms[one & (o.atoms >= 0)]]),
                                   f"{node.op_type} {node.name!r} adds them to channels that stay"))
                ref = np.where(ref >= 0, ref, o.atoms)
    for name, o in zip(names, ins):
        if o is not None and o.tracked or not name:
            continue
        r = ctx.view.rank(name)
        j = None if r is None else axis - (rank_out - r)
        shape = ctx.view.shape(name)
        dim = 1 if (r is not None and j < 0) else (shape[j] if shape is not None else None)
        if dim == 1:
            continue
        value = _own(ctx, name)
        if dim == length and value is not None:
            res.members.append(Slice(name, j, ref))
            continue
        source = ctx.view.const_source(name) if dim == length else None
        if source is not None:  # a view of a per-channel constant: slice the stored tensor
            big = [i for i, d in enumerate(source[1].shape) if d > 1]
            if len(big) == 1 and source[1].shape[big[0]] == length:
                res.members.append(Slice(source[0], big[0], ref))
                continue
        if dim == length and ctx.view.is_init(name):
            return Blocked(f"{node.op_type} {node.name!r}: per-channel constant {name!r} is read by other nodes too")
        if dim is None or not isinstance(dim, int):
            return Blocked(f"{node.op_type} {node.name!r}: shape of {name!r} unknown on the channel axis (dynamic shape)")
        return Blocked(f"{node.op_type} {node.name!r} combines them with {name!r}, whose channels cannot be removed")
    for out in node.output:
        res.outputs[out] = Origin(axis, ref)
    return res


@register("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean")
def binary(node, ins, ctx):
    return broadcast(node, ins, ctx, list(node.input))


@register("Where")
def where(node, ins, ctx):
    return broadcast(node, ins, ctx, list(node.input))
