"""Dead channels of a pruned model: channels nothing downstream reads, removed exactly.

After element pruning, a channel (a Conv filter, a Gemm unit) whose every *reading* slice is
zero - the input-channel slices of all the weights that consume it - contributes nothing to
the output, whatever it computes: its output is multiplied by zeros. Such channels can be
removed with :func:`~admm_onnx.structured.shrink.shrink` without changing the model's function
(only the order of float additions inside the kernels can differ: outputs agree to float
rounding; :func:`remove_dead_channels` checks them in onnxruntime). Pruned LeNet-5 at 71x
has most of its 500 fc1 units dead this way: removing them shrinks fc1's rows, biases and
(per-channel) scales, which is what a compact deployment file pays for.

Channels whose *own* weights are all zero but whose readers are not (a constant output, the
bias through the activation) are not removed: that would need folding the constant into the
next layer's bias, which changes float values.

Quantized weights keep their levels: the recorded specs (quantization.mark_model) lose the
scales of removed channels along their axis.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np
import onnx
from onnx import numpy_helper

from .analysis import analyse
from .shrink import shrink

#: op type -> input-channel axis of its weight (input 1), given the node
_IN_AXIS = {
    "Conv": lambda node: 1,
    "Gemm": lambda node: 1 if any(a.name == "transB" and a.i for a in node.attribute) else 0,
    "MatMul": lambda node: 0,
}


def dead_channels(model: onnx.ModelProto, analysis=None) -> Tuple[Dict[int, np.ndarray], Dict[str, int]]:
    """(group id -> kept channel indices for the groups that lose some, group name -> channels
    removed) for the channels no weight reads (see the module docstring). ``analysis``: the
    model's :func:`analyse`, when the caller has it already."""
    analysis = analysis or analyse(model)
    inits = {t.name: t for t in model.graph.initializer}
    readers = set()
    for node in model.graph.node:
        if node.op_type in _IN_AXIS and len(node.input) > 1 and node.input[1] in inits:
            readers.add((node.input[1], _IN_AXIS[node.op_type](node)))
    arrays: Dict[str, np.ndarray] = {}
    keep: Dict[int, np.ndarray] = {}
    removed: Dict[str, int] = {}
    for g in analysis.groups:
        if g.blocked or g.size < 2:
            continue
        reading = [m for m in g.members if (m.init, m.axis) in readers]
        if not reading:
            continue
        alive = np.zeros(g.size, bool)
        for m in reading:
            arr = arrays.setdefault(m.init, numpy_helper.to_array(inits[m.init]))
            moved = np.moveaxis(arr, m.axis, 0)
            nonzero = np.abs(moved.reshape(moved.shape[0], -1)).sum(axis=1) > 0
            alive[np.asarray(m.channels)[nonzero[np.asarray(m.positions)]]] = True
        if alive.all():
            continue
        if not alive.any():
            alive[0] = True  # a group keeps one channel (shapes must stay non-empty)
        keep[g.id] = np.flatnonzero(alive)
        removed[g.name] = int(g.size - alive.sum())
    return keep, removed


def remove_dead_channels(model: onnx.ModelProto, check: bool = True, seed: int = 0):
    """``(model without its dead channels, group name -> channels removed)``; the input is not
    modified. Removal repeats until no channel is dead (a fixed point): removing a layer's dead
    units can leave the channels only they read dead in turn (fc1's dead rows were the last
    readers of some conv2 filters, which were the last readers of some conv1 filters). With
    ``check``, the result and the input run in onnxruntime on random inputs and a difference
    beyond float rounding raises ``ValueError``."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    removed: Dict[str, int] = {}
    while True:
        analysis = analyse(out)
        keep, dead = dead_channels(out, analysis)
        if not keep:
            break
        out = _shrink_keeping_levels(out, analysis, keep)
        for name, n in dead.items():
            removed[name] = removed.get(name, 0) + n
    if check and removed:
        from .verify import verify

        diff = verify(model, out, seed=seed)
        if not np.isfinite(diff) or diff > 1e-4:
            raise ValueError(f"removing dead channels changed the outputs by {diff:.3g}")
    return out, removed


def _shrink_keeping_levels(model: onnx.ModelProto, analysis, keep: Dict[int, np.ndarray]) -> onnx.ModelProto:
    """:func:`shrink` to ``keep`` (``analysis``: the model's), with the recorded quantization
    specs losing the scales of removed channels along their axis."""
    from ..quantization import QuantSpec, mark_model, read_quantization

    out = shrink(model, analysis, keep)
    specs = read_quantization(model)
    if specs:
        pos = analysis.position_keep(keep)
        new = {}
        for name, spec in specs.items():
            scale = np.asarray(spec.scale)
            if spec.axis is not None:
                ndim = len(next(t.dims for t in model.graph.initializer if t.name == name))
                m = pos.get((name, spec.axis % ndim))
                if m is not None:
                    scale = scale[m]
            new[name] = QuantSpec(spec.bits, tuple(float(s) for s in scale), spec.axis)
        mark_model(out, new)
    return out


__all__: List[str] = ["dead_channels", "remove_dead_channels"]
