"""Rewrite ``Resize`` (upsampling in segmentation decoders, FPNs, U-Nets) into MatMuls with
constant interpolation matrices, which ORT training 1.19.2 can differentiate on the CPU.

Why: ORT 1.19.2 has a gradient builder for Resize but its ``ResizeGrad`` kernel exists only for
CUDA: a CPU training session refuses to start ("Could not find an implementation for
ResizeGrad(1)").

Math: every Resize mode ONNX defines but ``tf_crop_and_resize`` (nearest, linear, cubic, with
any ``coordinate_transformation_mode``) is a separable linear map. For an input of static
non-batch shape it is ``Y = X x_1 A_1 x_2 A_2 ...``: one (out_a, in_a) matrix per resized axis
``a``, applied along that axis. The matrices are read off the Resize itself: the node (same
attributes, same constant scales/sizes) is run in ONNX Runtime on a probe whose k-th batch item
is the k-th unit vector along axis ``a`` and constant along every other axis (each mode maps a
constant to itself, so the other axes do not interfere), and column k of ``A_a`` is read from
the k-th output. The rewrite is then checked against the Resize on a random input and kept only
if they agree to 1e-4 (relative); otherwise the node is left alone. Each axis becomes one
MatMul: the last axis ``MatMul(X, A^T)``, the others ``MatMul(A, X)`` (broadcast over the
leading axes), with a Transpose pair for axes before the last two. The matrices are Constant
nodes (never initializers), so analysis never trains or prunes them.

Left alone (the differentiability check then names the node): a Resize whose non-batch input
shape is not static, whose roi/scales/sizes are not constants, that resizes the batch axis,
``tf_crop_and_resize``, and ``keep_aspect_ratio_policy`` other than ``stretch`` with sizes.
The user's graph is never rewritten: the written model keeps its Resize.
"""
from __future__ import annotations

import logging
from typing import Dict, List, Optional

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ._util import NameScope, attr, constant_values, is_default_domain, opset_version, probe_session, replace_nodes
from .shapes import tensor_info

log = logging.getLogger(__name__)

_TOLERANCE = 1e-4


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else (value or "")


class _Probe:
    """The Resize node alone, runnable on inputs of any batch size."""

    def __init__(self, node: onnx.NodeProto, opset: int, consts: Dict[str, np.ndarray], elem_type: int, rank: int):
        self.node, self.opset, self.consts, self.elem_type, self.rank = node, opset, consts, elem_type, rank
        axes = attr(node, "axes")
        #: The axis each entry of ``sizes`` sets.
        self.size_axes = [a % rank for a in axes] if axes else list(range(rank))
        # Resize-10 has (X, scales); from 11 on (X, roi, scales, sizes).
        self.sizes_slot = 3 if opset >= 11 else None
        #: Axes the node does not resize (filled in by the caller): their sizes follow the input.
        self.kept = {0}

    def run(self, x: np.ndarray) -> np.ndarray:
        inputs, inits = ["x"], []
        for slot, name in enumerate(self.node.input[1:], start=1):
            if not name:
                inputs.append("")
                continue
            value = np.array(self.consts[name])
            if slot == self.sizes_slot and value.size == len(self.size_axes):
                value = value.copy()
                for j, a in enumerate(self.size_axes):
                    if a in self.kept:
                        value[j] = x.shape[a]
            inits.append(numpy_helper.from_array(value, f"c{slot}"))
            inputs.append(f"c{slot}")
        node = helper.make_node("Resize", inputs, ["y"])
        node.attribute.extend(a for a in self.node.attribute)
        graph = helper.make_graph(
            [node], "probe", [helper.make_tensor_value_info("x", self.elem_type, list(x.shape))],
            [helper.make_tensor_value_info("y", self.elem_type, None)], inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        model.ir_version = min(model.ir_version, 8)
        sess = probe_session(model)
        return sess.run(None, {"x": x})[0]


def _matrices(node: onnx.NodeProto, shape, opset: int, consts, elem_type: int) -> Optional[Dict[int, np.ndarray]]:
    """axis -> (out, in) interpolation matrix for each resized axis, or None if not applicable."""
    rank = len(shape)
    if rank < 1 or any(not isinstance(d, int) or d <= 0 for d in shape[1:]):
        return None
    if any(name and name not in consts for name in node.input[1:]):
        return None
    if _text(attr(node, "mode", b"nearest")) not in ("nearest", "linear", "cubic"):
        return None
    if _text(attr(node, "coordinate_transformation_mode", b"half_pixel")) == "tf_crop_and_resize":
        return None
    axes = attr(node, "axes")
    if axes is not None and 0 in [a % rank for a in axes]:
        return None
    sizes_given = opset >= 11 and len(node.input) > 3 and bool(node.input[3])
    if sizes_given and _text(attr(node, "keep_aspect_ratio_policy", b"stretch")) != "stretch":
        return None
    if not sizes_given and axes is None:
        scales = consts.get(node.input[2] if opset >= 11 else node.input[1]) if len(node.input) > 1 else None
        if scales is None or scales.size != rank or float(scales.reshape(-1)[0]) != 1.0:
            return None
    dtype = helper.tensor_dtype_to_np_dtype(elem_type)
    probe = _Probe(node, opset, consts, elem_type, rank)
    try:
        out_shape = probe.run(np.zeros([1] + list(shape[1:]), dtype)).shape
        if out_shape[0] != 1:
            return None
        resized = [a for a in range(1, rank) if out_shape[a] != shape[a]]
        probe.kept = {a for a in range(rank) if a not in resized}
        mats = {}
        for a in resized:
            # Unit vectors along a; size 1 on every axis the node does not resize.
            n = shape[a]
            dims = [n] + [shape[i] if i in resized else 1 for i in range(1, rank)]
            basis = np.zeros(dims, dtype)
            for k in range(n):
                index = [k] + [slice(None)] * (rank - 1)
                index[a] = k
                basis[tuple(index)] = 1
            y = probe.run(basis)
            pick = [0] * rank
            pick[a] = slice(None)
            mats[a] = np.stack([y[(k,) + tuple(pick[1:])] for k in range(n)], axis=1).astype(dtype)
        # Check: the matrices reproduce the Resize on a random input.
        x = np.random.default_rng(0).standard_normal([2] + list(shape[1:])).astype(dtype)
        ref = probe.run(x).astype(np.float64)
        got = x.astype(np.float64)
        for a, m in mats.items():
            got = np.moveaxis(np.tensordot(got, m.astype(np.float64), axes=([a], [1])), -1, a)
        if got.shape != ref.shape or np.max(np.abs(got - ref)) > _TOLERANCE * (1 + np.max(np.abs(ref))):
            log.debug("Resize %s: interpolation matrices do not reproduce it; left alone", node.name)
            return None
    except Exception as exc:  # ORT refuses the probe: leave the node to the differentiability check
        log.debug("Resize %s: probe failed (%s); left alone", node.name, exc)
        return None
    return mats


def along_axis(cur: str, m: np.ndarray, axis: int, rank: int, out: str, names: NameScope, base: str) -> List[onnx.NodeProto]:
    """Nodes computing ``out`` = ``cur`` with the (out, in) matrix ``m`` applied along ``axis``
    (of ``rank`` >= 2): one MatMul, with a Transpose pair for an axis before the last two. The
    matrix is a Constant node (never an initializer: analysis must not train it)."""
    const = names(f"{base}/matrix{axis}")
    last = axis == rank - 1
    value = np.ascontiguousarray(m.T if last else m)
    nodes = [helper.make_node("Constant", [], [const], name=names(f"{base}/Constant{axis}"),
                              value=numpy_helper.from_array(value, const))]
    if last:
        nodes.append(helper.make_node("MatMul", [cur, const], [out], name=names(f"{base}/MatMul{axis}")))
    elif axis == rank - 2:
        nodes.append(helper.make_node("MatMul", [const, cur], [out], name=names(f"{base}/MatMul{axis}")))
    else:
        perm = list(range(rank))
        perm[axis], perm[rank - 2] = perm[rank - 2], perm[axis]
        t_in, t_mm = names(f"{base}/axis{axis}_in"), names(f"{base}/axis{axis}_mm")
        nodes += [
            helper.make_node("Transpose", [cur], [t_in], name=names(f"{base}/Transpose{axis}"), perm=perm),
            helper.make_node("MatMul", [const, t_in], [t_mm], name=names(f"{base}/MatMul{axis}")),
            helper.make_node("Transpose", [t_mm], [out], name=names(f"{base}/TransposeBack{axis}"), perm=perm),
        ]
    return nodes


def _expand(node: onnx.NodeProto, mats: Dict[int, np.ndarray], rank: int, names: NameScope) -> List[onnx.NodeProto]:
    base = node.name or node.output[0]
    if not mats:
        return [helper.make_node("Identity", [node.input[0]], [node.output[0]], name=names(f"{base}/Identity"))]
    nodes, cur = [], node.input[0]
    axes = sorted(mats)
    for i, a in enumerate(axes):
        out = node.output[0] if i == len(axes) - 1 else names(f"{base}/axis{a}")
        nodes += along_axis(cur, mats[a], a, rank, out, names, base)
        cur = out
    return nodes


def resize_to_matmul(model: onnx.ModelProto) -> int:
    """Rewrite every applicable default-domain Resize of the main graph in place; returns how many."""
    graph = model.graph
    if not any(is_default_domain(n, "Resize") for n in graph.node):
        return 0
    shapes, types = tensor_info(model)
    consts = constant_values(graph, max_size=64)
    opset = opset_version(model)

    def expand(node, names, _graph) -> Optional[List[onnx.NodeProto]]:
        shape = shapes.get(node.input[0])
        elem = types.get(node.input[0]) or onnx.TensorProto.FLOAT
        mats = _matrices(node, shape, opset, consts, elem) if shape and elem in (
            onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE) else None
        return _expand(node, mats, len(shape), names) if mats is not None else None

    return replace_nodes(model, "Resize", expand, "resize_to_matmul")
