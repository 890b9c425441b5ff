"""Physical channel removal, and the masked model it must agree with.

:func:`shrink` is a pure function (model, kept channels per group) -> model: it deletes the
removed positions of every member slice, applies the rules' node fixes (depthwise ``group``,
Split sizes, Reshape shape constants), keeps the graph's inputs, outputs and node names, drops
stale ``value_info`` and re-runs shape inference; the result passes ``onnx.checker``.
:func:`masked` zeroes the same slices (BatchNorm running statistics excepted: a zero scale and
shift already zero the channel) - the model ADMM's hard step produces. Because the consumers'
input slices are zeroed as well, a removed channel contributes nothing downstream whatever its
value, so the two compute the same function up to float rounding (verify.py checks it).
"""
from __future__ import annotations

from typing import Dict, Mapping, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from .analysis import ChannelAnalysis


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _normalise(analysis: ChannelAnalysis, keep: Mapping[int, Sequence[int]]) -> Dict[int, np.ndarray]:
    out = {}
    by_id = {g.id: g for g in analysis.groups}
    for gid, idx in keep.items():
        g = by_id[int(gid)]
        idx = np.unique(np.asarray(idx, dtype=np.int64))
        if len(idx) == g.size:
            continue
        if g.blocked:
            raise ValueError(f"group {g.name!r} is blocked ({g.blocked[0]}) and cannot lose channels")
        if len(idx) == 0 or idx.min() < 0 or idx.max() >= g.size:
            raise ValueError(f"group {g.name!r}: kept channels must be 1..{g.size} indices in [0, {g.size})")
        out[g.id] = idx
    return out


def masked(model: onnx.ModelProto, analysis: ChannelAnalysis, keep: Mapping[int, Sequence[int]]) -> onnx.ModelProto:
    """``model`` with every member slice of the removed channels set to zero."""
    keep = _normalise(analysis, keep)
    pos = analysis.position_keep(keep)
    stat = {(m.init, m.axis) for g in analysis.groups for m in g.members if m.stat}
    out = _copy(model)
    inits = {t.name: t for t in out.graph.initializer}
    changed: Dict[str, np.ndarray] = {}
    for (name, axis), m in pos.items():
        if m.all() or (name, axis) in stat:
            continue
        arr = changed.get(name)
        if arr is None:
            arr = numpy_helper.to_array(inits[name]).copy()
        shape = [1] * arr.ndim
        shape[axis] = len(m)
        arr = np.where(m.reshape(shape), arr, np.zeros((), arr.dtype))
        changed[name] = arr
    for name, arr in changed.items():
        inits[name].CopyFrom(numpy_helper.from_array(arr.astype(numpy_helper.to_array(inits[name]).dtype), name))
    return out


def shrink(model: onnx.ModelProto, analysis: ChannelAnalysis, keep: Mapping[int, Sequence[int]]) -> onnx.ModelProto:
    """``model`` with the channels not in ``keep`` (group id -> kept indices) removed."""
    keep = _normalise(analysis, keep)
    pos = analysis.position_keep(keep)
    out = _copy(model)
    inits = {t.name: t for t in out.graph.initializer}
    arrays: Dict[str, np.ndarray] = {}
    for (name, axis), m in pos.items():
        if m.all():
            continue
        arr = arrays.get(name)
        if arr is None:
            arr = numpy_helper.to_array(inits[name])
        arrays[name] = np.take(arr, np.flatnonzero(m), axis=axis)
    for name, arr in arrays.items():
        inits[name].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(arr), name))
    for vi in out.graph.input:  # IR < 4 lists initializers as inputs too: their shapes follow
        if vi.name in arrays and vi.type.tensor_type.HasField("shape"):
            for d, n in zip(vi.type.tensor_type.shape.dim, arrays[vi.name].shape):
                d.dim_value = n
    kept = analysis.kept_atoms(keep)
    nodes = out.graph.node
    for index, fix in analysis.fixes:
        fix(out, nodes[index], kept)
    if out.ir_version < 4:  # IR < 4: every initializer must also be a graph input
        listed = {i.name for i in out.graph.input}
        for t in out.graph.initializer:
            if t.name not in listed:
                out.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    del out.graph.value_info[:]
    inferred = onnx.shape_inference.infer_shapes(out, strict_mode=False)
    out.graph.value_info.extend(inferred.graph.value_info)
    onnx.checker.check_model(out)
    return out
