"""A read-only view of an ONNX graph for the channel analysis.

What the rules need and nothing more: initializer values, small constants (Constant nodes and
int initializers: shapes, axes, pads), inferred shapes (``onnx.shape_inference``, non-strict),
how often each initializer is read, the opset, and the nodes in topological order.
Nothing here mutates the model.
"""
from __future__ import annotations

from collections import Counter
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import onnx
from onnx import helper, numpy_helper

Dim = Union[int, str, None]


def get_attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _dims(vi: onnx.ValueInfoProto) -> Optional[List[Dim]]:
    t = vi.type
    if not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
        return None
    out: List[Dim] = []
    for d in t.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            out.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            out.append(d.dim_param)
        else:
            out.append(None)
    return out


class GraphView:
    """Initializers, constants, shapes and use counts of ``model``'s main graph."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        graph = model.graph
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
        self._init_protos = {t.name: t for t in graph.initializer}
        self._values: Dict[str, np.ndarray] = {}
        self.constants: Dict[str, np.ndarray] = {}
        for n in graph.node:
            if n.op_type == "Constant" and n.output:
                v = get_attr(n, "value")
                if isinstance(v, onnx.TensorProto):
                    self.constants[n.output[0]] = numpy_helper.to_array(v)
        try:
            inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
        except Exception:  # shape inference is a help, not a requirement
            inferred = model
        self.shapes: Dict[str, List[Dim]] = {}
        g = inferred.graph
        for vi in list(g.input) + list(g.value_info) + list(g.output):
            dims = _dims(vi)
            if dims is not None:
                self.shapes[vi.name] = dims
        for t in graph.initializer:
            self.shapes[t.name] = [int(d) for d in t.dims]
        self.uses: Counter = Counter(i for n in graph.node for i in n.input if i)
        self.graph_outputs = {o.name for o in graph.output}
        self.graph_inputs = {i.name for i in graph.input if i.name not in self._init_protos}
        self.producer = {o: n for n in graph.node for o in n.output if o}
        self.nodes = self._toposort(list(graph.node))

    @staticmethod
    def _toposort(nodes: Sequence[onnx.NodeProto]) -> List[onnx.NodeProto]:
        produced = {o: i for i, n in enumerate(nodes) for o in n.output}
        done, order, state = set(), [], {}
        for start in range(len(nodes)):
            stack = [(start, False)]
            while stack:
                i, expanded = stack.pop()
                if i in done:
                    continue
                if expanded:
                    done.add(i)
                    order.append(nodes[i])
                    continue
                if state.get(i):
                    continue
                state[i] = True
                stack.append((i, True))
                for name in nodes[i].input:
                    j = produced.get(name)
                    if j is not None and j not in done:
                        stack.append((j, False))
        return order

    # -- values ----------------------------------------------------------------------
    def is_init(self, name: str) -> bool:
        return name in self._init_protos

    def init(self, name: str) -> Optional[np.ndarray]:
        """Value of initializer ``name`` (None if it is not one)."""
        if name not in self._init_protos:
            return None
        if name not in self._values:
            self._values[name] = numpy_helper.to_array(self._init_protos[name])
        return self._values[name]

    def const(self, name: str) -> Optional[np.ndarray]:
        """Value of a constant tensor: an initializer or a Constant node's output."""
        if not name:
            return None
        if name in self.constants:
            return self.constants[name]
        return self.init(name)

    def const_source(self, name: str):
        """(initializer name, value) if ``name`` is an initializer read only here, or a view
        of one (Identity/Unsqueeze/Squeeze/Reshape/Flatten chains, each read once: a Caffe2
        per-channel scale [C] unsqueezed to [C, 1, 1]); None otherwise."""
        seen = 0
        while name and seen < 8:
            if self.is_init(name):
                return (name, self.init(name)) if self.uses[name] == 1 else None
            node = self.producer.get(name)
            if node is None or node.op_type not in ("Identity", "Unsqueeze", "Squeeze", "Reshape", "Flatten") \
                    or self.uses[name] != 1:
                return None
            name = node.input[0]
            seen += 1
        return None

    def shape(self, name: str) -> Optional[List[Dim]]:
        return self.shapes.get(name)

    def rank(self, name: str) -> Optional[int]:
        s = self.shapes.get(name)
        return None if s is None else len(s)

    def static_dim(self, name: str, axis: int) -> Optional[int]:
        s = self.shapes.get(name)
        if s is None or not -len(s) <= axis < len(s):
            return None
        d = s[axis]
        return d if isinstance(d, int) and d > 0 else None
