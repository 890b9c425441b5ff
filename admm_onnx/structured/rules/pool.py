"""Pooling, Resize and Pad: per-channel ops that keep the channel axis.

Max/Average/Lp pools and their Global forms work on each channel of axis 1 alone. Resize with
scales of 1 on the channel axis, and Pad with no padding on the channel axis (constant
``pads``), pass the channels through. Resize by ``sizes``, padding on the channel axis,
or non-constant pads/scales, block.
"""
from __future__ import annotations

from ..graph import get_attr
from ..maps import Blocked, Mapping, Origin
from . import register


@register("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool", "MaxRoiPool")
def pool(node, ins, ctx):
    x = ins[0]
    if x.axis != 1:
        return Blocked(f"{node.op_type} {node.name!r} pools the axis of the pruned channels")
    if len(node.output) > 1 and node.output[1]:
        return Blocked(f"{node.op_type} {node.name!r} returns indices")
    return Mapping(outputs={node.output[0]: Origin(1, x.atoms)})


@register("Resize", "Upsample")
def resize(node, ins, ctx):
    x = ins[0]
    if any(o is not None and o.tracked for o in ins[1:]):
        return Blocked(f"{node.op_type} {node.name!r} reads pruned channels as scales")
    if node.op_type == "Upsample":
        scales = ctx.view.const(node.input[1]) if len(node.input) > 1 else get_attr(node, "scales")
    else:
        scales = ctx.view.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if len(node.input) > 3 and node.input[3]:
            return Blocked(f"Resize {node.name!r} resizes to fixed sizes")
    if scales is None or len(scales) <= x.axis or float(scales[x.axis]) != 1.0:
        return Blocked(f"{node.op_type} {node.name!r}: scales not constant or not 1 on the channel axis")
    return Mapping(outputs={node.output[0]: Origin(x.axis, x.atoms)})


@register("Pad")
def pad(node, ins, ctx):
    x = ins[0]
    if any(o is not None and o.tracked for o in ins[1:]):
        return Blocked(f"Pad {node.name!r} reads pruned channels as pads")
    pads = ctx.view.const(node.input[1]) if len(node.input) > 1 and node.input[1] else get_attr(node, "pads")
    rank = ctx.view.rank(node.input[0])
    if pads is None or rank is None:
        return Blocked(f"Pad {node.name!r}: pads not constant (dynamic shape)")
    pads = [int(p) for p in pads]
    axes = list(range(rank))
    if len(node.input) > 3 and node.input[3]:
        ax = ctx.view.const(node.input[3])
        if ax is None:
            return Blocked(f"Pad {node.name!r}: axes not constant")
        axes = [int(a) % rank for a in ax]
    n = len(axes)
    if x.axis in axes:
        i = axes.index(x.axis)
        if pads[i] != 0 or pads[i + n] != 0:
            return Blocked(f"Pad {node.name!r} pads the channel axis")
    return Mapping(outputs={node.output[0]: Origin(x.axis, x.atoms)})
