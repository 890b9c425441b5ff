"""Concat and Split.

Concat on the channel axis: the output's atoms are the inputs' atoms one after the other
(operands that carry no removable channel contribute -1 for their size), so offsets, and
``concat(x, x)`` (x's channel c at c and at C + c), come out right. Concat on another axis
couples the operands position by position, like Add.
Split on the channel axis: output j carries the input's atoms in [off_j, off_j + len_j); the
rewrite sets the new sizes (``split`` input from opset 13, attribute before; opset-18
``num_outputs`` becomes an explicit ``split`` input). Its outputs may form separate groups.
"""
from __future__ import annotations

import numpy as np
from onnx import numpy_helper

from ..graph import get_attr
from ..maps import Blocked, Mapping, Origin
from . import register
from .eltwise import broadcast


@register("Concat")
def concat(node, ins, ctx):
    rank = ctx.view.rank(node.output[0])
    if rank is None:
        return Blocked(f"Concat {node.name!r}: output shape unknown (dynamic shape)")
    axis = int(get_attr(node, "axis")) % rank
    axes = {o.axis for o in ins if o is not None and o.tracked}
    if axes != {axis}:
        return broadcast(node, ins, ctx, list(node.input))
    parts = []
    for name, o in zip(node.input, ins):
        if o is not None and o.tracked:
            parts.append(o.atoms)
            continue
        d = ctx.view.static_dim(name, axis)
        if d is None:
            return Blocked(f"Concat {node.name!r}: size of {name!r} on the channel axis unknown (dynamic shape)")
        parts.append(np.full(d, -1, np.int64))
    return Mapping(outputs={node.output[0]: Origin(axis, np.concatenate(parts))})


@register("Split")
def split(node, ins, ctx):
    x = ins[0]
    rank = ctx.view.rank(node.input[0])
    if rank is None:
        return Blocked(f"Split {node.name!r}: input shape unknown (dynamic shape)")
    if len(ins) > 1 and ins[1] is not None:
        return Blocked(f"Split {node.name!r} reads pruned channels as sizes")
    axis = int(get_attr(node, "axis", 0)) % rank
    outs = [o for o in node.output]
    if axis != x.axis:
        return Mapping(outputs={o: Origin(x.axis, x.atoms) for o in outs if o})
    n = len(x.atoms)
    sizes = None
    if len(node.input) > 1 and node.input[1]:
        sizes = ctx.view.const(node.input[1])
        if sizes is None:
            return Blocked(f"Split {node.name!r}: sizes not constant")
    elif get_attr(node, "split") is not None:
        sizes = get_attr(node, "split")
    else:
        k = len(outs)
        step = -(-n // k)
        sizes = [min(step, n - i * step) for i in range(k)]
    sizes = [int(s) for s in sizes]
    if sum(sizes) != n:
        return Blocked(f"Split {node.name!r}: sizes do not add up to the channels")
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    parts = [x.atoms[offsets[i]:offsets[i + 1]] for i in range(len(sizes))]
    res = Mapping(outputs={o: Origin(axis, p) for o, p in zip(outs, parts) if o})
    res.cuts.append(parts)

    def fix_sizes(model, n, kept, parts=parts):
        new = np.array([int(kept(p).sum()) for p in parts], np.int64)
        if (new == 0).any():
            raise RuntimeError(f"Split {n.name!r} would get an empty output")
        for a in list(n.attribute):
            if a.name in ("split", "num_outputs"):
                n.attribute.remove(a)
        if ctx_opset >= 13:
            name = f"{n.name or n.output[0]}_split_shrunk"
            model.graph.initializer.append(numpy_helper.from_array(new, name))
            while len(n.input) < 2:
                n.input.append("")
            n.input[1] = name
        else:
            from onnx import helper

            n.attribute.append(helper.make_attribute("split", [int(v) for v in new]))

    ctx_opset = ctx.view.opset
    res.fixes.append(fix_sizes)
    return res
