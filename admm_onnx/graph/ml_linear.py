"""Lift scikit-learn's linear ``ai.onnx.ml`` operators into standard ops with initializer
weights, so that their weights can be pruned (skl2onnx exports of LogisticRegression,
LinearSVC, LinearRegression, Ridge, SGD... keep their weights in node attributes, where no
optimizer or pruner can reach them, and ORT has no gradient for ML-domain ops).

Unlike the other rewrites this one changes the user's graph, deliberately: the pipeline
applies it when it loads the model, so the written model holds the pruned weights as
initializers (where the sparse export formats find them) and computes the same outputs
(names, types and shapes unchanged) with standard ops:

- ``LinearClassifier(X)`` (C classes, coefficients (C, F)): ``S = X @ W + b`` with
  ``W = coefficients.T`` (F, C) and ``b = intercepts``; scores ``Z = S`` (post_transform
  NONE), ``Softmax(S)`` (SOFTMAX) or ``Sigmoid(S)`` (LOGISTIC); labels
  ``Gather(classlabels, ArgMax(Z))``. The weights are named ``<node>.coefficients`` and
  ``<node>.intercepts``.
- ``LinearRegressor(X)`` (post_transform NONE): ``Y = X @ W + b``.
- ``Normalizer`` L1 / L2 (after a classifier in skl2onnx pipelines): ``X / sum|X|``,
  ``X / sqrt(sum X^2)`` over axis 1.

Every lifted node is checked against the original on random inputs in ONNX Runtime (1e-5
relative, labels equal) and kept only if they agree; otherwise (one coefficient row for two
classes, SOFTMAX_ZERO or PROBIT, a MAX normalizer, a non-float input) it is left alone and the
model may have no prunable weight, which the pipeline reports.
"""
from __future__ import annotations

import logging
from typing import List, Optional

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ._util import attr, opset_version, probe_session, replace_nodes
from .shapes import tensor_info

log = logging.getLogger(__name__)

ML = "ai.onnx.ml"
#: The ML-domain op types lifted here.
ML_LINEAR_OPS = ("LinearClassifier", "LinearRegressor", "Normalizer")
_TOLERANCE = 1e-5


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else (value or "")


def _linear(node, names, inits, f, what) -> Optional[List[onnx.NodeProto]]:
    coef = np.asarray(attr(node, "coefficients", []), np.float32)
    rows = len(attr(node, "intercepts", []) or []) or (coef.size // f if f else 0)
    if not f or not rows or coef.size != rows * f:
        return None
    base = node.name or what
    w, b = names(f"{base}.coefficients"), names(f"{base}.intercepts")
    intercepts = np.asarray(attr(node, "intercepts", None) or np.zeros(rows), np.float32)
    inits += [numpy_helper.from_array(np.ascontiguousarray(coef.reshape(rows, f).T), w),
              numpy_helper.from_array(intercepts, b)]
    mm = names(f"{base}/matmul")
    return [helper.make_node("MatMul", [node.input[0], w], [mm], name=names(f"{base}/MatMul")),
            helper.make_node("Add", [mm, b], [names(f"{base}/scores")], name=names(f"{base}/Add"))], rows


def _classifier(node, names, inits, f, opset) -> Optional[List[onnx.NodeProto]]:
    ints, strings = attr(node, "classlabels_ints"), attr(node, "classlabels_strings")
    labels = list(ints) if ints else [s.decode() if isinstance(s, bytes) else s for s in (strings or [])]
    made = _linear(node, names, inits, f, "LinearClassifier")
    if made is None or not labels:
        return None
    nodes, rows = made
    post = _text(attr(node, "post_transform", b"NONE"))
    if rows != len(labels) or post not in ("NONE", "SOFTMAX", "LOGISTIC"):
        return None
    base = node.name or "LinearClassifier"
    scores = nodes[-1].output[0]
    z = node.output[1] if len(node.output) > 1 and node.output[1] else names(f"{base}/probabilities")
    if post == "NONE":
        nodes.append(helper.make_node("Identity", [scores], [z], name=names(f"{base}/Identity")))
    elif post == "SOFTMAX":
        nodes.append(helper.make_node("Softmax", [scores], [z], name=names(f"{base}/Softmax"), axis=1))
    else:
        nodes.append(helper.make_node("Sigmoid", [scores], [z], name=names(f"{base}/Sigmoid")))
    if node.output[0]:
        table = names(f"{base}.classlabels")
        value = np.array(labels, dtype=np.int64 if ints else object)
        inits.append(numpy_helper.from_array(value, table))
        index = names(f"{base}/argmax")
        nodes += [helper.make_node("ArgMax", [z], [index], name=names(f"{base}/ArgMax"), axis=1, keepdims=0),
                  helper.make_node("Gather", [table, index], [node.output[0]], name=names(f"{base}/Gather"), axis=0)]
    return nodes


def _regressor(node, names, inits, f) -> Optional[List[onnx.NodeProto]]:
    if _text(attr(node, "post_transform", b"NONE")) != "NONE":
        return None
    made = _linear(node, names, inits, f, "LinearRegressor")
    if made is None:
        return None
    nodes, rows = made
    if attr(node, "targets", rows) != rows:
        return None
    nodes[-1].output[0] = node.output[0]
    return nodes


def _normalizer(node, names, inits, opset) -> Optional[List[onnx.NodeProto]]:
    norm = _text(attr(node, "norm", b"MAX"))
    if norm not in ("L1", "L2"):
        return None
    base = node.name or "Normalizer"
    x, y = node.input[0], node.output[0]
    part, total = names(f"{base}/{'abs' if norm == 'L1' else 'square'}"), names(f"{base}/sum")
    nodes = [helper.make_node("Abs", [x], [part], name=names(f"{base}/Abs")) if norm == "L1"
             else helper.make_node("Mul", [x, x], [part], name=names(f"{base}/Mul"))]
    if opset >= 13:
        axes = names(f"{base}.axes")
        inits.append(numpy_helper.from_array(np.array([1], np.int64), axes))
        nodes.append(helper.make_node("ReduceSum", [part, axes], [total], name=names(f"{base}/ReduceSum"), keepdims=1))
    else:
        nodes.append(helper.make_node("ReduceSum", [part], [total], name=names(f"{base}/ReduceSum"), axes=[1],
                                      keepdims=1))
    if norm == "L2":
        root = names(f"{base}/norm")
        nodes.append(helper.make_node("Sqrt", [total], [root], name=names(f"{base}/Sqrt")))
        total = root
    nodes.append(helper.make_node("Div", [x, total], [y], name=names(f"{base}/Div")))
    return nodes


def _agrees(model: onnx.ModelProto, node, nodes, inits, x_name: str, f: int) -> bool:
    """Run the node and its replacement on random (N, F) inputs; same outputs?"""
    x = np.random.default_rng(0).standard_normal((5, f)).astype(np.float32)
    outs = [o for o in node.output if o]
    results = []
    for body, extra in (([node], []), (nodes, inits)):
        graph = helper.make_graph(
            list(body), "probe", [helper.make_tensor_value_info(x_name, TensorProto.FLOAT, [5, f])],
            [helper.make_value_info(o, onnx.TypeProto()) for o in outs], list(extra),
        )
        probe = helper.make_model(graph, opset_imports=list(model.opset_import))
        probe.ir_version = min(model.ir_version, 8) if model.ir_version >= 7 else 7
        for v in probe.graph.output:
            v.ClearField("type")
        sess = probe_session(probe)
        results.append(sess.run(None, {x_name: x}))
    for a, b in zip(*results):
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape:
            return False
        if a.dtype.kind == "f":
            if np.max(np.abs(a.astype(np.float64) - b)) > _TOLERANCE * (1 + np.max(np.abs(a))):
                return False
        elif not np.array_equal(a, b):
            return False
    return True


def _features(node: onnx.NodeProto) -> Optional[int]:
    """Input width of a linear node from its attributes (coefficients / intercepts)."""
    coef = attr(node, "coefficients")
    rows = len(attr(node, "intercepts", []) or []) or attr(node, "targets", None)
    if coef and rows and len(coef) % rows == 0:
        return len(coef) // rows
    return None


def lift_ml_linear(model: onnx.ModelProto) -> int:
    """Replace the applicable LinearClassifier / LinearRegressor / Normalizer nodes of the main
    graph in place; returns how many."""
    kinds = ML_LINEAR_OPS
    if not any(n.domain == ML and n.op_type in kinds for n in model.graph.node):
        return 0
    if not any(op.domain in ("", "ai.onnx") for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid("", 13))
    shapes, types = tensor_info(model)
    opset = opset_version(model)

    def expand(node, names, graph) -> Optional[List[onnx.NodeProto]]:
        # ML ops' outputs (a Scaler before the classifier) are often untyped for shape inference:
        # an unknown type is taken as float, which the probe on float inputs then confirms.
        if types.get(node.input[0], TensorProto.FLOAT) != TensorProto.FLOAT:
            return None
        shape = shapes.get(node.input[0]) or []
        f = shape[1] if len(shape) == 2 and isinstance(shape[1], int) else _features(node)
        if not f:
            return None
        inits: List[onnx.TensorProto] = []
        if node.op_type == "LinearClassifier":
            made = _classifier(node, names, inits, f, opset)
        elif node.op_type == "LinearRegressor":
            made = _regressor(node, names, inits, f)
        else:
            made = _normalizer(node, names, inits, opset)
        if made is None:
            return None
        try:
            ok = _agrees(model, node, made, inits, node.input[0], f)
        except Exception as exc:  # ORT refuses the probe: leave the node alone
            log.debug("%s %s: probe failed (%s)", node.op_type, node.name, exc)
            ok = False
        if not ok:
            return None
        graph.initializer.extend(inits)
        return made

    return replace_nodes(model, kinds, expand, "lift_ml_linear", domain=ML)
