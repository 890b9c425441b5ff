"""Conv and ConvTranspose.

Conv, W [M, C/g, k...], group g:
- g = 1: output channel m owns W[m] and B[m] (a new channel space); an input channel c that
  goes is the column W[:, c]. MACs = M * C * k * spatial_out.
- depthwise (g = C, W [k*C, 1, ...]): output channels c*k ... c*k+k-1 follow input channel c,
  so the output carries the input's atoms repeated k times; W rows and B follow; the rewrite
  sets ``group`` to the kept input channels. Detected by g > 1 and W.shape[1] == 1, never by
  out_channels == 1.
- 1 < g < C: the same local positions would have to go in every group: not done (blocked).
ConvTranspose, W [C, M/g, k...]: as Conv with the weight's axes swapped; g > 1 blocked.
A weight or bias that is not an initializer, or is read by another node, blocks.
"""
from __future__ import annotations

import numpy as np

from ..graph import get_attr
from ..maps import Blocked, Macs, Mapping, Origin, Slice
from . import register


def _spatial(ctx, name):
    s = ctx.view.shape(name)
    if s is None or len(s) < 3:
        return None
    out = 1
    for d in s[2:]:
        if not isinstance(d, int):
            return None
        out *= d
    return out


def _own(ctx, name):
    """The initializer's value if it is one read by this node only."""
    if not name or not ctx.view.is_init(name) or ctx.view.uses[name] != 1:
        return None
    return ctx.view.init(name)


@register("Conv", "ConvTranspose")
def conv(node, ins, ctx):
    transpose = node.op_type == "ConvTranspose"
    x = ins[0]
    if len(ins) > 1 and ins[1] is not None or len(ins) > 2 and ins[2] is not None:
        return Blocked(f"{node.op_type} {node.name!r} takes pruned channels as its weight")
    w = _own(ctx, node.input[1])
    bias_name = node.input[2] if len(node.input) > 2 else ""
    b = _own(ctx, bias_name) if bias_name else None
    if w is None or (bias_name and b is None):
        why = "weight or bias is not an initializer of its own"
        return Blocked(f"{node.op_type} {node.name!r}: {why}") if x is not None and x.tracked else Mapping()
    if x is not None and x.tracked and x.axis != 1:
        return Blocked(f"{node.op_type} {node.name!r} reads pruned channels on axis {x.axis}, not 1")
    g = int(get_attr(node, "group", 1))
    out_name = node.output[0]
    spatial = _spatial(ctx, out_name)
    kernel = int(np.prod(w.shape[2:]))
    m = w.shape[1] * g if transpose else w.shape[0]
    cin = w.shape[0] if transpose else w.shape[1] * g
    full = None if spatial is None else int(m * (cin // g) * kernel * spatial)
    res = Mapping()
    if g == 1:
        atoms = ctx.new_space(node, m)
        res.outputs[out_name] = Origin(1, atoms)
        res.members.append(Slice(node.input[1], 1 if transpose else 0, atoms))
        if bias_name:
            res.members.append(Slice(bias_name, 0, atoms))
        inp = None
        if x is not None and x.tracked:
            res.members.append(Slice(node.input[1], 0 if transpose else 1, x.atoms))
            inp = x.atoms
        if full is not None:
            res.macs.append(Macs(node.name, full, atoms, inp))
        return res
    depthwise = not transpose and w.shape[1] == 1 and m % g == 0 and cin == g
    if not depthwise:
        if x is not None and x.tracked:
            return Blocked(f"grouped {node.op_type} {node.name!r} (group={g}) would need the same channels cut in every group")
        return Mapping()
    if x is None or not x.tracked:
        return Mapping()  # a depthwise conv on unprunable channels stays as it is
    k = m // g
    atoms = np.repeat(x.atoms, k)
    res.outputs[out_name] = Origin(1, atoms)
    res.members.append(Slice(node.input[1], 0, atoms))
    if bias_name:
        res.members.append(Slice(bias_name, 0, atoms))
    xin = x.atoms

    def fix_group(model, n, kept, xin=xin):
        new = int(kept(xin).sum())
        for a in n.attribute:
            if a.name == "group":
                a.i = new

    res.fixes.append(fix_group)
    if full is not None:
        res.macs.append(Macs(node.name, full, atoms, None))
    return res
