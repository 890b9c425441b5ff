"""Rewrite ``DepthToSpace`` (``nn.PixelShuffle`` in super-resolution models) and
``SpaceToDepth`` (``nn.PixelUnshuffle``) into Reshape -> Transpose -> Reshape, which ORT
training 1.19.2 can differentiate (neither op has a gradient builder).

Math (the ONNX spec), block size b, input (N, C, H, W):
- DepthToSpace DCR: reshape (N, b, b, C/b^2, H, W), transpose (0, 3, 4, 1, 5, 2), reshape
  (N, C/b^2, H b, W b); CRD: reshape (N, C/b^2, b, b, H, W), transpose (0, 1, 4, 2, 5, 3).
- SpaceToDepth: reshape (N, C, H/b, b, W/b, b), transpose (0, 3, 5, 1, 2, 4), reshape
  (N, C b^2, H/b, W/b).
The batch dimension is copied (0 in the Reshape shape); C, H and W must be static. Checked
against the node on a random input; left alone otherwise. The user's graph is never rewritten.
"""
from __future__ import annotations

import logging
from typing import List, Optional

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ._util import attr, is_default_domain, opset_version, probe_agrees, probe_passes, replace_nodes
from .shapes import tensor_info

log = logging.getLogger(__name__)


def _plan(node: onnx.NodeProto, shape):
    if not shape or len(shape) != 4 or any(not isinstance(d, int) or d <= 0 for d in shape[1:]):
        return None
    b = int(attr(node, "blocksize", 0))
    _, c, h, w = shape
    if b < 1:
        return None
    if node.op_type == "DepthToSpace":
        if c % (b * b):
            return None
        mode = attr(node, "mode", b"DCR")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        if mode == "DCR":
            return [0, b, b, c // (b * b), h, w], [0, 3, 4, 1, 5, 2], [0, c // (b * b), h * b, w * b]
        return [0, c // (b * b), b, b, h, w], [0, 1, 4, 2, 5, 3], [0, c // (b * b), h * b, w * b]
    if h % b or w % b:
        return None
    return [0, c, h // b, b, w // b, b], [0, 3, 5, 1, 2, 4], [0, c * b * b, h // b, w // b]


def _nodes(node, plan, names) -> List[onnx.NodeProto]:
    first, perm, last = plan
    base = node.name or node.output[0]
    s1, s2 = names(f"{base}/shape_in"), names(f"{base}/shape_out")
    r1, t = names(f"{base}/blocks"), names(f"{base}/moved")
    return [
        helper.make_node("Constant", [], [s1], name=names(f"{base}/ShapeIn"),
                         value=numpy_helper.from_array(np.array(first, np.int64), s1)),
        helper.make_node("Constant", [], [s2], name=names(f"{base}/ShapeOut"),
                         value=numpy_helper.from_array(np.array(last, np.int64), s2)),
        helper.make_node("Reshape", [node.input[0], s1], [r1], name=names(f"{base}/Reshape")),
        helper.make_node("Transpose", [r1], [t], name=names(f"{base}/Transpose"), perm=perm),
        helper.make_node("Reshape", [t, s2], [node.output[0]], name=names(f"{base}/ReshapeBack")),
    ]


def _agrees(node, nodes, shape, elem, opset) -> bool:
    x = np.random.default_rng(0).standard_normal([2] + list(shape[1:])).astype(helper.tensor_dtype_to_np_dtype(elem))
    return probe_agrees(node, nodes, x, elem, opset)  # exact: only moves values


def depth_space_to_reshapes(model: onnx.ModelProto) -> int:
    """Rewrite every applicable DepthToSpace / SpaceToDepth of the main graph in place."""
    graph = model.graph
    ops = ("DepthToSpace", "SpaceToDepth")
    if not any(is_default_domain(n, op) for n in graph.node for op in ops):
        return 0
    shapes, types = tensor_info(model)
    opset = opset_version(model)

    def expand(node, names, _graph) -> Optional[List[onnx.NodeProto]]:
        plan = _plan(node, shapes.get(node.input[0]))
        made: Optional[List[onnx.NodeProto]] = _nodes(node, plan, names) if plan else None
        if made is None:
            return None
        elem = types.get(node.input[0]) or onnx.TensorProto.FLOAT
        ok = probe_passes(lambda: _agrees(node, made, shapes[node.input[0]], elem, opset), node, log)
        return made if ok else None

    return replace_nodes(model, ops, expand, "depth_space_to_reshapes")
