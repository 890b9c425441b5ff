"""Training speed: a first-layer ``Conv -> MaxPool(k = s)`` as the max of s*s strided convs.

Math: with a stride-1 Conv y = conv(x, W) + b and a non-overlapping max-pool of kernel =
stride = s (no pool padding, dilation 1, floor mode), output pixel (i, j) is

    max over (a, c) in [0, s)^2 of y[s*i + a, s*j + c]
  = max over (a, c) of conv_stride_s(x[a:, c:], W)[i, j] + b,

so ``MaxPool(Conv(x))`` equals ``Max(Conv_s(x_00), Conv_s(x_01), ..., Conv_s(x_{s-1,s-1}))``
where x_ac = x[..., a : a + s*(P-1) + K, c : c + s*(Q-1) + L] (P x Q the pool output, K x L
the kernel; the end crops any row or column the pool would drop). The conv's own zero padding
becomes an explicit ``Pad`` before the slices. Each phase conv computes only the pixels the
pool keeps, with the same filter, so the forward work is unchanged, but training no longer
runs MaxPool-with-indices and MaxPoolGrad on the full conv output (slow per-element code in
ORT 1.19.2: 5.3 ms of a 25 ms LeNet-5 step), and the phase ConvGrads only form dW.

The values agree up to float summation order inside the convolutions; gradients agree except
at exact ties between phases (Max's gradient goes to every tied input, MaxPoolGrad to one).

Contract: applied only where the conv's input carries no gradient (it does not depend on any
trainable parameter, e.g. the image input), since Slice and Pad on a gradient path would add
their own backward work; the conv is 2-D, stride 1, dilation 1, explicit or no padding, and
its output feeds only the pool; the pool has one output; spatial input sizes are static.
The weight and bias keep their names (read by s*s convs, like a tied weight). Applied to the
training copy only.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Set

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ._util import NameScope, attr, auto_pad, checked, is_default_domain
from .analysis import consumer_map
from .shapes import tensor_shapes


def _pool_stride(pool: onnx.NodeProto) -> Optional[int]:
    """s if ``pool`` is a plain non-overlapping 2-D s x s MaxPool (s >= 2), else None."""
    kernel = list(attr(pool, "kernel_shape", []))
    if len(kernel) != 2 or kernel[0] != kernel[1] or kernel[0] < 2:
        return None
    if list(attr(pool, "strides", [1, 1])) != kernel or any(attr(pool, "pads", [0] * 4)):
        return None
    if any(d != 1 for d in attr(pool, "dilations", [1, 1])) or attr(pool, "ceil_mode", 0) or auto_pad(pool) not in ("NOTSET", "VALID"):
        return None
    if len([o for o in pool.output if o]) != 1:
        return None
    return kernel[0]


def _conv_ok(conv: onnx.NodeProto, kernel) -> bool:
    return (
        len(kernel) == 2
        and all(v == 1 for v in attr(conv, "strides", [1, 1]))
        and all(v == 1 for v in attr(conv, "dilations", [1, 1]))
        and auto_pad(conv) == "NOTSET"
    )


def _gradient_tensors(graph: onnx.GraphProto, trainable: Iterable[str]) -> Set[str]:
    """Tensors that depend on a trainable parameter (so carry a gradient)."""
    reached = set(trainable)
    for node in graph.node:  # topological order
        if any(name in reached for name in node.input):
            reached.update(node.output)
    return reached


def _int64(graph: onnx.GraphProto, names: NameScope, base: str, values: List[int]) -> str:
    name = names(base)
    graph.initializer.append(numpy_helper.from_array(np.array(values, np.int64), name))
    return name


def _phases(conv, pool, s, in_shape, kshape, names, graph) -> List[onnx.NodeProto]:
    _, _, height, width = in_shape
    kh, kw = kshape
    top, left, bottom, right = attr(conv, "pads", [0, 0, 0, 0])
    ph, pw = height + top + bottom, width + left + right           # padded input
    rows, cols = (ph - kh + 1) // s, (pw - kw + 1) // s            # pool output
    base = conv.name or conv.output[0]
    nodes: List[onnx.NodeProto] = []
    x = conv.input[0]
    if any((top, left, bottom, right)):
        padded = names(f"{base}/padded")
        pads = _int64(graph, names, f"{base}/pads", [0, 0, top, left, 0, 0, bottom, right])
        nodes.append(helper.make_node("Pad", [x, pads], [padded], name=names(f"{base}/Pad")))
        x = padded
    axes = _int64(graph, names, f"{base}/phase_axes", [2, 3])
    outs = []
    keep = [a for a in conv.attribute if a.name in ("group",)]
    for a in range(s):
        for c in range(s):
            tag = f"{base}/phase{a}{c}"
            starts = _int64(graph, names, f"{tag}/starts", [a, c])
            ends = _int64(graph, names, f"{tag}/ends", [a + s * (rows - 1) + kh, c + s * (cols - 1) + kw])
            sliced, out = names(f"{tag}/input"), names(tag)
            nodes.append(helper.make_node("Slice", [x, starts, ends, axes], [sliced], name=names(f"{tag}/Slice")))
            phase = helper.make_node("Conv", [sliced, *conv.input[1:]], [out], name=names(f"{tag}/Conv"),
                                     kernel_shape=[kh, kw], strides=[s, s])
            phase.attribute.extend(keep)
            nodes.append(phase)
            outs.append(out)
    nodes.append(helper.make_node("Max", outs, [pool.output[0]], name=names(f"{pool.name or pool.output[0]}/phase_max")))
    return nodes


def split_pool_phases(model: onnx.ModelProto, trainable: Iterable[str]) -> int:
    """Rewrite each eligible ``MaxPool(Conv(x))`` (see the module docstring) in place;
    ``trainable`` names the parameters that get gradients. Returns how many pairs."""
    graph = model.graph
    nodes = list(graph.node)
    carries_grad = _gradient_tensors(graph, trainable)
    consumers = consumer_map(graph)
    outputs = {o.name for o in graph.output}
    inits = {t.name: t for t in graph.initializer}
    producer = {out: i for i, n in enumerate(nodes) for out in n.output}
    shapes = None
    replace: Dict[int, List[onnx.NodeProto]] = {}   # conv index -> its nodes; the pool is dropped
    drop: Set[int] = set()
    names = NameScope(graph)
    for j, pool in enumerate(nodes):
        if not is_default_domain(pool, "MaxPool"):
            continue
        s = _pool_stride(pool)
        i = producer.get(pool.input[0])
        if s is None or i is None or not is_default_domain(nodes[i], "Conv"):
            continue
        conv = nodes[i]
        if conv.input[0] in carries_grad or len(consumers.get(conv.output[0], ())) != 1 or conv.output[0] in outputs:
            continue
        weight = inits.get(conv.input[1])
        kshape = list(weight.dims[2:]) if weight is not None else list(attr(conv, "kernel_shape", []))
        if not _conv_ok(conv, kshape):
            continue
        if shapes is None:
            shapes = tensor_shapes(model)
        in_shape = shapes.get(conv.input[0])
        if not in_shape or len(in_shape) != 4 or not all(isinstance(d, int) for d in in_shape[2:]):
            continue
        replace[i] = _phases(conv, pool, s, in_shape, kshape, names, graph)
        drop.add(j)
    if not replace:
        return 0
    new_nodes: List[onnx.NodeProto] = []
    for i, node in enumerate(nodes):
        if i not in drop:
            new_nodes.extend(replace.get(i, [node]))
    del graph.node[:]
    graph.node.extend(new_nodes)
    checked(model, "split_pool_phases")
    return len(replace)
