"""Helpers shared by the graph rewrites."""
from __future__ import annotations

import logging
from typing import Callable, List, Optional, Sequence, Union

import onnx
from onnx import helper

from ..errors import ModelError


def checked(model: onnx.ModelProto, what: str) -> onnx.ModelProto:
    """Run the ONNX checker after a rewrite; a failure is a bug in that rewrite, named."""
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise ModelError(f"internal rewrite '{what}' produced an invalid graph: {exc}") from exc
    except ValueError as exc:
        if "2GB" not in str(exc):  # too large to check in memory: the file save checks it
            raise
    return model


class NameScope:
    """Hands out tensor/node names that do not collide with any name already in the graph."""

    def __init__(self, graph: onnx.GraphProto):
        self.used = {t.name for t in graph.initializer}
        self.used.update(v.name for v in graph.input)
        self.used.update(v.name for v in graph.output)
        for node in graph.node:
            self.used.update(node.input)
            self.used.update(node.output)
            self.used.add(node.name)

    def __call__(self, base: str) -> str:
        name, i = base, 1
        while name in self.used:
            i += 1
            name = f"{base}_{i}"
        self.used.add(name)
        return name


def opset_version(model: onnx.ModelProto) -> int:
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx"):
            return op.version
    return 1


def attr(node: onnx.NodeProto, name: str, default=None):
    """Value of attribute ``name`` of ``node``, or ``default``."""
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def auto_pad(node: onnx.NodeProto) -> str:
    """The node's ``auto_pad`` attribute as a str (``NOTSET`` when absent)."""
    value = attr(node, "auto_pad", b"NOTSET")
    return value.decode() if isinstance(value, bytes) else value


def is_default_domain(node: onnx.NodeProto, op_type: str) -> bool:
    return node.op_type == op_type and node.domain in ("", "ai.onnx")


def replace_nodes(
    model: onnx.ModelProto,
    op_type: Union[str, Sequence[str]],
    expand: Callable[[onnx.NodeProto, NameScope, onnx.GraphProto], Optional[List[onnx.NodeProto]]],
    what: str,
    domain: str = "",
) -> int:
    """Replace every ``op_type`` node (or one of several op types) of ``domain`` (default: the
    default domain) of the main graph, in place, by the nodes ``expand(node, names, graph)``
    returns (which write the node's outputs), keeping the order; ``None`` leaves the node as it
    is. When any node was replaced, run the checker. ``expand`` may append initializers to
    ``graph``. Returns how many."""
    graph = model.graph
    op_types = (op_type,) if isinstance(op_type, str) else tuple(op_type)

    def matches(node: onnx.NodeProto) -> bool:
        if domain:
            return node.domain == domain and node.op_type in op_types
        return any(is_default_domain(node, op) for op in op_types)

    if not any(matches(n) for n in graph.node):
        return 0
    names = NameScope(graph)
    new_nodes: List[onnx.NodeProto] = []
    count = 0
    for node in graph.node:
        made = expand(node, names, graph) if matches(node) else None
        if made is None:
            new_nodes.append(node)
        else:
            new_nodes.extend(made)
            count += 1
    if count:
        del graph.node[:]
        graph.node.extend(new_nodes)
        checked(model, what)
    return count


def scalar(graph: onnx.GraphProto, names: "NameScope", base: str, value: float, elem_type: int) -> str:
    """Append a 0-d initializer ``value`` of ONNX element type ``elem_type``; returns its name."""
    import numpy as np
    from onnx import numpy_helper

    name = names(base)
    dtype = helper.tensor_dtype_to_np_dtype(elem_type)
    graph.initializer.append(numpy_helper.from_array(np.array(value, dtype=dtype), name))
    return name


def float_type(types: dict, name: str) -> int:
    """The element type of tensor ``name`` from ``types`` (float32 when unknown)."""
    return types.get(name) or onnx.TensorProto.FLOAT


def probe_session(model: onnx.ModelProto):
    """An ORT InferenceSession on ``model`` for the rewrites' numeric probes.

    The process's first ORT session decides whether the calling thread flushes denormals
    (training.flush_denormals): a rewrite probing before the Trainer opens its sessions would
    leave ADMM training several times slower, so the flushing session is opened first."""
    import onnxruntime as ort

    from ..training import flush_denormals

    flush_denormals()
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def constant_values(graph: onnx.GraphProto, max_size: Optional[int] = None) -> dict:
    """Tensor name -> value of the graph's initializers (only those of at most ``max_size``
    elements, when given) and of its ``Constant`` nodes with a tensor ``value``."""
    import numpy as np
    from onnx import numpy_helper

    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer
              if max_size is None or int(np.prod(t.dims)) <= max_size}
    for n in graph.node:
        if n.op_type == "Constant" and n.output and isinstance(attr(n, "value"), onnx.TensorProto):
            values[n.output[0]] = numpy_helper.to_array(attr(n, "value"))
    return values


def probe_agrees(node: onnx.NodeProto, replacement: List[onnx.NodeProto], x, elem: int, opset: int,
                 initializers: Sequence[onnx.TensorProto] = (), tolerance: Optional[float] = None) -> bool:
    """Run ``node`` alone and then its ``replacement`` nodes, each as a small model (input
    ``node.input[0]`` fed ``x``, output ``node.output[0]`` of element type ``elem``, the given
    initializers, default-domain ``opset``, IR 8) in a :func:`probe_session`; do the two outputs
    agree? With ``tolerance``: same shape and max |want - got| <= tolerance * (1 + max |want|);
    without: the same shape and values exactly."""
    import numpy as np

    results = []
    for body in ([node], replacement):
        graph = helper.make_graph(
            list(body), "probe", [helper.make_tensor_value_info(node.input[0], elem, list(x.shape))],
            [helper.make_tensor_value_info(node.output[0], elem, None)], list(initializers),
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        model.ir_version = 8
        results.append(probe_session(model).run(None, {node.input[0]: x})[0])
    want, got = results
    if want.shape != got.shape:
        return False
    if tolerance is None:
        return bool(np.array_equal(want, got))
    want, got = want.astype(np.float64), got.astype(np.float64)
    return float(np.max(np.abs(want - got))) <= tolerance * (1 + float(np.max(np.abs(want))))


def probe_passes(check: Callable[[], bool], node: onnx.NodeProto, log: logging.Logger) -> bool:
    """``check()``, or False (logged at debug level on ``log``) when it raises: ORT refused the
    probe, so the node is left alone."""
    try:
        return bool(check())
    except Exception as exc:
        log.debug("%s %s: probe failed (%s)", node.op_type, node.name, exc)
        return False
