"""Fake quantization for retraining quantized weights: every consumer of W reads Q(W).

Used by the retraining phase after the hard step of a k-bit levels constraint. Math, per
weight with integer range ``[-L, L]`` and scale ``s`` (one per output channel or one per
tensor, a frozen parameter the pipeline refits between epochs)::

    a     = W / s
    Q(W)  = s * clip(round(a), -L, L)                  (the levels)
    W_eff = W + s * (clip(round(a), -L, L) - a~)      (a~: a truncated to 2**-20)

The correction term goes through integer ``Cast`` nodes, where ORT's gradient builder stops:
its gradient is zero, so ``dL/dW = dL/dW_eff`` (the straight-through estimator, Bengio et al.
2013) while the forward pass computes with the quantized weights (to within ``s * 2**-20``,
the truncation of ``a~``; the weights written at the end are computed exactly by
:func:`quantize_like_graph`). Zero is a level, so a masked weight (``W * M``, graph/masks.py)
stays exactly zero. The latent weights W accumulate updates smaller than one level, which
projecting after every step would throw away.

Contract: the graph's inputs, outputs and other nodes are unchanged; every node that read the
weight (or its masked product) reads ``<W>/quant``; one frozen parameter per weight,
:func:`scale_name`, of shape ``[1, ..., C, ..., 1]`` (C scales along ``axis``) or all ones.
Training graph only (opset >= 13, ensured by graph/opset.py): never written to the user.
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Tuple

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ._util import NameScope, checked
from .masks import mask_name

#: a~ keeps this many fractional bits of a (a * 2**20 fits int64 for any |a| < 2**43).
FRACTION_BITS = 20


def scale_name(weight: str) -> str:
    """Name of the frozen scale parameter of ``weight``."""
    return f"admm/qscale/{weight}"


def scale_shape(shape: Tuple[int, ...], axis: Optional[int]) -> Tuple[int, ...]:
    """Shape of the scale parameter of a weight of ``shape`` (broadcasts against it)."""
    out = [1] * len(shape)
    if axis is not None:
        out[axis % len(shape)] = shape[axis % len(shape)]
    return tuple(out)


def scale_array(scale, shape: Tuple[int, ...], axis: Optional[int]) -> np.ndarray:
    """The float32 scales of a QuantSpec-style tuple shaped for the parameter."""
    return np.asarray(scale, dtype=np.float32).reshape(scale_shape(shape, axis))


def quantize_like_graph(w: np.ndarray, scale: np.ndarray, bits_max: int) -> Tuple[np.ndarray, np.ndarray]:
    """(integers q, weights ``float32(q) * scale``) as the graph's Q(W) computes them, in float32:
    ``q = clip(rint(float32(w) / scale), -L, L)`` (round half to even, like ONNX ``Round``)."""
    s = np.asarray(scale, dtype=np.float32)
    a = np.asarray(w, dtype=np.float32) / s
    q = np.clip(np.rint(a), -bits_max, bits_max) + np.float32(0.0)  # + 0: rint(-0.3) is -0.0, a level is +0.0
    return q.astype(np.int32), (q.astype(np.float32) * s).astype(np.float32)


def _source(graph: onnx.GraphProto, weight: str) -> str:
    """The tensor the consumers of ``weight`` read: its masked product if masks were inserted."""
    m = mask_name(weight)
    for node in graph.node:
        if node.op_type == "Mul" and list(node.input) == [weight, m]:
            return node.output[0]
    return weight


def insert_fake_quant(model: onnx.ModelProto, weights: Mapping[str, Tuple[int, np.ndarray]]) -> Dict[str, str]:
    """Insert Q(W) with a straight-through gradient (in place) for ``weights``: name ->
    (L, scale array shaped by :func:`scale_shape`). Returns weight -> scale parameter name."""
    graph = model.graph
    names = NameScope(graph)
    created: Dict[str, str] = {}
    new_nodes = []
    consts = {}

    def const(value: np.ndarray, base: str) -> str:
        key = (base, value.dtype.str, value.tobytes())
        if key not in consts:
            name = names(f"admm/fq/{base}")
            new_nodes.append(helper.make_node("Constant", [], [name], name=names(name + "/node"),
                                              value=numpy_helper.from_array(value, name)))
            consts[key] = name
        return consts[key]

    k = const(np.array(2.0 ** FRACTION_BITS, np.float32), "k")
    for weight, (L, scale) in weights.items():
        src = _source(graph, weight)
        s_name = scale_name(weight)
        names.used.add(s_name)
        graph.initializer.append(numpy_helper.from_array(np.asarray(scale, np.float32), s_name))
        lo = const(np.array(-L, np.float32), f"lo{L}")
        hi = const(np.array(L, np.float32), f"hi{L}")
        t = {x: names(f"{weight}/fq/{x}") for x in ("a", "r", "c", "ci", "cf", "ak", "aki", "akf", "at", "d", "ds")}
        out = names(f"{weight}/quant")
        nodes = [
            helper.make_node("Div", [src, s_name], [t["a"]]),
            helper.make_node("Round", [t["a"]], [t["r"]]),
            helper.make_node("Clip", [t["r"], lo, hi], [t["c"]]),
            helper.make_node("Cast", [t["c"]], [t["ci"]], to=TensorProto.INT32),   # gradient stops here
            helper.make_node("Cast", [t["ci"]], [t["cf"]], to=TensorProto.FLOAT),
            helper.make_node("Mul", [t["a"], k], [t["ak"]]),
            helper.make_node("Cast", [t["ak"]], [t["aki"]], to=TensorProto.INT64),  # and here
            helper.make_node("Cast", [t["aki"]], [t["akf"]], to=TensorProto.FLOAT),
            helper.make_node("Div", [t["akf"], k], [t["at"]]),
            helper.make_node("Sub", [t["cf"], t["at"]], [t["d"]]),
            helper.make_node("Mul", [t["d"], s_name], [t["ds"]]),
            helper.make_node("Add", [src, t["ds"]], [out]),
        ]
        for n in nodes:
            n.name = names(f"{weight}/fq/{n.op_type}")
        for node in graph.node:
            for i, inp in enumerate(node.input):
                if inp == src:
                    node.input[i] = out
        new_nodes.append(nodes)
        created[weight] = s_name
    # Insert every chain right after the node producing its source (or first, for an initializer).
    flat_consts = [n for n in new_nodes if isinstance(n, onnx.NodeProto)]
    chains = [n for n in new_nodes if isinstance(n, list)]
    existing = list(graph.node)
    by_src = {}
    for chain in chains:
        by_src.setdefault(chain[0].input[0], []).append(chain)
    ordered = list(flat_consts)
    for chain_list in (by_src.pop(w, []) for w in [t.name for t in graph.initializer]):
        for chain in chain_list:
            ordered.extend(chain)
    for node in existing:
        ordered.append(node)
        for out_name in node.output:
            for chain in by_src.pop(out_name, []):
                ordered.extend(chain)
    del graph.node[:]
    graph.node.extend(ordered)
    checked(model, "insert_fake_quant")
    return created
