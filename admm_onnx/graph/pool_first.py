"""Training speed: move a ReLU-like activation after the MaxPool that follows it.

Math: for a non-decreasing f applied elementwise, max over a window commutes with f:
max_i f(x_i) = f(max_i x_i). So ``MaxPool(f(x)) = f(MaxPool(x))`` exactly, in floating point
too (the same element is selected and f is applied to it), for f = Relu and LeakyRelu with
alpha >= 0. The right side applies f, and in training its gradient, to 1/(kernel area) as
many elements (4x fewer for a 2x2 pool): on LeNet-5 ReluGrad over the conv1 output was 13% of
an ORT training step. Gradients agree too, except at exact ties inside a window, where the
two forms route the gradient to different (equal-valued) elements; where every element of a
window is <= 0 both give zero.

Contract: only windows that hold at least one real element are allowed (pads smaller than the
kernel, which ONNX MaxPool needs anyway), so no window is all padding. The activation's
output must feed only the MaxPool, which must have a single output (no Indices). The pair is
rewired in place (same node protos, the pool takes the activation's position in the node
list, so the order stays topological); graph inputs, outputs and every other node are
unchanged. Applied to the training copy only: the exported model keeps the user's graph.
"""
from __future__ import annotations

import onnx

from ._util import NameScope, attr, auto_pad, checked, is_default_domain
from .analysis import consumer_map

def _monotone(node: onnx.NodeProto) -> bool:
    """Relu, or LeakyRelu with a non-negative slope: elementwise and non-decreasing."""
    if is_default_domain(node, "Relu"):
        return True
    return is_default_domain(node, "LeakyRelu") and attr(node, "alpha", 0.01) >= 0


def _pads_ok(pool: onnx.NodeProto) -> bool:
    kernel = attr(pool, "kernel_shape", [])
    pads = attr(pool, "pads", [0] * (2 * len(kernel)))
    if auto_pad(pool) != "NOTSET":
        return True  # VALID: no padding; SAME_*: at most kernel - 1 in all, split over both sides
    return len(pads) == 2 * len(kernel) and all(p < kernel[i % len(kernel)] for i, p in enumerate(pads))


def pool_before_activation(model: onnx.ModelProto) -> int:
    """Rewrite ``MaxPool(f(x))`` as ``f(MaxPool(x))`` in place; returns how many pairs."""
    graph = model.graph
    nodes = list(graph.node)
    producer = {out: i for i, n in enumerate(nodes) for out in n.output}
    readers = consumer_map(graph)
    outputs = {o.name for o in graph.output}
    names = NameScope(graph)
    count = 0
    for j, pool in enumerate(nodes):
        if not is_default_domain(pool, "MaxPool") or len([o for o in pool.output if o]) != 1 or not _pads_ok(pool):
            continue
        i = producer.get(pool.input[0])
        if i is None or not _monotone(nodes[i]):
            continue
        act = nodes[i]
        if len(readers.get(act.output[0], ())) != 1 or act.output[0] in outputs:
            continue
        pooled = names(f"{pool.output[0]}/pooled")
        result = pool.output[0]
        pool.input[0], pool.output[0] = act.input[0], pooled
        del pool.output[1:]
        act.input[0], act.output[0] = pooled, result
        nodes[i], nodes[j] = pool, act
        count += 1
    if count:
        del graph.node[:]
        graph.node.extend(nodes)
        checked(model, "pool_before_activation")
    return count
