"""Normalisations and PRelu.

BatchNormalization (inference form, one output): scale, B, mean, var [C] follow the channel
(mean/var are running statistics, not trained). InstanceNormalization: scale, B [C] follow.
PRelu: a per-channel slope follows. LayerNormalization over the channel axis, GroupNormalization
and LRN mix channels (their statistics change when one goes): blocked.
"""
from __future__ import annotations

from ..graph import get_attr
from ..maps import Blocked, Mapping, Origin, Slice
from . import register
from .conv import _own
from .eltwise import broadcast


@register("BatchNormalization", "InstanceNormalization")
def batchnorm(node, ins, ctx):
    x = ins[0]
    if any(o is not None and o.tracked for o in ins[1:]):
        return Blocked(f"{node.op_type} {node.name!r} reads pruned channels as a parameter")
    if x.axis != 1:
        return Blocked(f"{node.op_type} {node.name!r} normalises axis 1, the pruned channels are on axis {x.axis}")
    if node.op_type == "BatchNormalization" and (len([o for o in node.output if o]) > 1 or get_attr(node, "training_mode", 0)):
        return Blocked(f"BatchNormalization {node.name!r} is in training mode (batch statistics)")
    res = Mapping(outputs={node.output[0]: Origin(1, x.atoms)})
    for slot, name in enumerate(node.input[1:], 1):
        if _own(ctx, name) is None:
            return Blocked(f"{node.op_type} {node.name!r}: parameter {name!r} is not an initializer of its own")
        res.members.append(Slice(name, 0, x.atoms, stat=slot >= 3))
    return res


@register("PRelu")
def prelu(node, ins, ctx):
    return broadcast(node, ins, ctx, list(node.input))


@register("LayerNormalization")
def layernorm(node, ins, ctx):
    x = ins[0]
    rank = ctx.view.rank(node.input[0])
    if rank is None:
        return Blocked(f"LayerNormalization {node.name!r}: input shape unknown (dynamic shape)")
    axis = int(get_attr(node, "axis", -1)) % rank
    if x.axis >= axis or any(o is not None and o.tracked for o in ins[1:]):
        return Blocked(f"LayerNormalization {node.name!r} normalises over the channel axis (channel-mixing op)")
    return Mapping(outputs={node.output[0]: Origin(x.axis, x.atoms)})


@register("GroupNormalization", "LRN", "MeanVarianceNormalization", "LpNormalization")
def mixing(node, ins, ctx):
    return Blocked(f"{node.op_type} {node.name!r} mixes channels")
