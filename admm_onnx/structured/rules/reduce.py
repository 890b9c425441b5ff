"""Reductions, softmax and explicit blockers.

Reduce* over axes that leave the channel axis alone, and Softmax/LogSoftmax/Hardmax over
another axis, pass the channels (re-indexed when keepdims=0). Reducing or normalising over the
channel axis mixes channels: blocked. Ops that read a pruned tensor's shape (Shape, Size), or
pick channels by index (Slice, Gather...), block with their reason.
"""
from __future__ import annotations

from ..graph import get_attr
from ..maps import Blocked, Mapping, Origin
from . import register

REDUCE = ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
          "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare")


@register(*REDUCE)
def reduce(node, ins, ctx):
    x = ins[0]
    rank = ctx.view.rank(node.input[0])
    if rank is None:
        return Blocked(f"{node.op_type} {node.name!r}: input shape unknown (dynamic shape)")
    axes = get_attr(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        axes = ctx.view.const(node.input[1])
        if axes is None:
            return Blocked(f"{node.op_type} {node.name!r}: axes not constant")
    if axes is None or len(axes) == 0:
        if get_attr(node, "noop_with_empty_axes", 0):
            return Mapping(outputs={node.output[0]: Origin(x.axis, x.atoms)})
        axes = list(range(rank))
    axes = sorted(int(a) % rank for a in axes)
    if x.axis in axes:
        return Blocked(f"{node.op_type} {node.name!r} reduces over the channel axis (channel-mixing op)")
    axis = x.axis if get_attr(node, "keepdims", 1) else x.axis - sum(a < x.axis for a in axes)
    return Mapping(outputs={node.output[0]: Origin(axis, x.atoms)})


@register("Softmax", "LogSoftmax", "Hardmax")
def softmax(node, ins, ctx):
    x = ins[0]
    rank = ctx.view.rank(node.input[0])
    if rank is None:
        return Blocked(f"{node.op_type} {node.name!r}: input shape unknown (dynamic shape)")
    default = -1 if ctx.view.opset >= 13 else 1
    axis = int(get_attr(node, "axis", default)) % rank
    mixes = x.axis == axis if ctx.view.opset >= 13 else x.axis >= axis
    if mixes:
        return Blocked(f"{node.op_type} {node.name!r} normalises over the channel axis (channel-mixing op)")
    return Mapping(outputs={node.output[0]: Origin(x.axis, x.atoms)})


@register("Shape", "Size")
def shape(node, ins, ctx):
    return Blocked(f"{node.op_type} {node.name!r} reads the shape of a pruned tensor (dynamic shape)")


@register("Slice")
def slice_(node, ins, ctx):
    x = ins[0]
    rank = ctx.view.rank(node.input[0])
    axes = ctx.view.const(node.input[3]) if len(node.input) > 3 and node.input[3] else None
    if rank is None or (axes is None and len(node.input) > 3 and node.input[3]) or any(o is not None for o in ins[1:]):
        return Blocked(f"Slice {node.name!r}: axes not constant")
    axes = list(range(rank)) if axes is None else [int(a) % rank for a in axes]
    if x.axis in axes:
        return Blocked(f"Slice {node.name!r} selects channels by index")
    return Mapping(outputs={node.output[0]: Origin(x.axis, x.atoms)})


@register("Gather")
def gather(node, ins, ctx):
    x = ins[0]
    rank = ctx.view.rank(node.input[0])
    rank_i = ctx.view.rank(node.input[1])
    if ins[1] is not None or rank is None or rank_i is None:
        return Blocked(f"Gather {node.name!r} selects channels by index")
    axis = int(get_attr(node, "axis", 0)) % rank
    if axis == x.axis:
        return Blocked(f"Gather {node.name!r} selects channels by index")
    new = x.axis if x.axis < axis else x.axis - 1 + rank_i
    return Mapping(outputs={node.output[0]: Origin(new, x.atoms)})


@register("GatherElements", "GatherND", "ScatterND", "ScatterElements", "Expand", "Tile",
          "Einsum", "ArgMax", "ArgMin", "TopK", "CumSum", "DepthToSpace", "SpaceToDepth")
def selects(node, ins, ctx):
    return Blocked(f"{node.op_type} {node.name!r} selects or moves channels by index")
