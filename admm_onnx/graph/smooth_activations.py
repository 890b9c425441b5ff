"""Rewrite ``Elu``, ``Selu``, ``Celu``, ``Softplus``, ``Softsign`` and ``Mish`` into ops ORT
training can differentiate (1.19.2 has no gradient builder for any of them).

Math (the ONNX spec), with r(x) = Relu(x) and m(x) = -Relu(-x) = min(x, 0):

    Elu(x; a)      = x if x > 0 else a (e^x - 1)        = r(x) + a (e^m(x) - 1)
    Selu(x; a, g)  = g x if x > 0 else g a (e^x - 1)    = g (r(x) + a (e^m(x) - 1))
    Celu(x; a)     = max(0, x) + min(0, a (e^(x/a) - 1)) = r(x) + a (e^(m(x) / a) - 1)
    Softplus(x)    = ln(e^x + 1)                         = r(x) + ln(1 + e^-|x|)
    Softsign(x)    = x / (1 + |x|)
    Mish(x)        = x tanh(Softplus(x))

For x > 0, m(x) = 0 and e^0 - 1 = 0 exactly, so the first three are exact piecewise; the
exponential only ever sees m(x) <= 0, so it cannot overflow and no gradient is 0 * inf. The
Softplus form is the overflow-free one (ln(e^x + 1) is inf in float32 from x ~ 89). Results
match ORT's kernels to float rounding (tested within 1e-5). Every op used (Relu, Neg, Exp,
Log, Abs, Tanh, Add, Sub, Mul, Div) has a gradient builder; constants are 0-d initializers of
the input's type, which analysis never trains.
"""
from __future__ import annotations

from typing import Callable, Dict, List

import onnx
from onnx import helper

from ._util import NameScope, attr, float_type, replace_nodes, scalar
from .shapes import tensor_info

Expand = Callable[[onnx.NodeProto, NameScope, onnx.GraphProto], List[onnx.NodeProto]]


class _Builder:
    """Emits nodes for one replaced node: ``b.op("Relu", x)`` returns the new tensor's name."""

    def __init__(self, node: onnx.NodeProto, names: NameScope, graph: onnx.GraphProto, elem_type: int):
        self.base = node.name or node.output[0]
        self.names, self.graph, self.type = names, graph, elem_type
        self.nodes: List[onnx.NodeProto] = []

    def const(self, value: float) -> str:
        return scalar(self.graph, self.names, f"{self.base}/c", value, self.type)

    def op(self, op_type: str, *inputs: str, out: str = "") -> str:
        out = out or self.names(f"{self.base}/{op_type.lower()}")
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=self.names(f"{self.base}/{op_type}")))
        return out


def _elu_core(b: _Builder, x: str, alpha: float, divide: float = 1.0, out: str = "") -> str:
    """r(x) + alpha * (exp(m(x) / divide) - 1)."""
    m = b.op("Neg", b.op("Relu", b.op("Neg", x)))
    if divide != 1.0:
        m = b.op("Div", m, b.const(divide))
    tail = b.op("Mul", b.op("Sub", b.op("Exp", m), b.const(1.0)), b.const(alpha))
    return b.op("Add", b.op("Relu", x), tail, out=out)


def _softplus(b: _Builder, x: str, out: str = "") -> str:
    log1p = b.op("Log", b.op("Add", b.op("Exp", b.op("Neg", b.op("Abs", x))), b.const(1.0)))
    return b.op("Add", b.op("Relu", x), log1p, out=out)


def _rules() -> Dict[str, Callable[[_Builder, onnx.NodeProto], None]]:
    def elu(b, n):
        _elu_core(b, n.input[0], float(attr(n, "alpha", 1.0)), out=n.output[0])

    def selu(b, n):
        alpha = float(attr(n, "alpha", 1.67326319217681884765625))
        gamma = float(attr(n, "gamma", 1.05070102214813232421875))
        b.op("Mul", _elu_core(b, n.input[0], alpha), b.const(gamma), out=n.output[0])

    def celu(b, n):
        alpha = float(attr(n, "alpha", 1.0))
        _elu_core(b, n.input[0], alpha, divide=alpha, out=n.output[0])

    def softplus(b, n):
        _softplus(b, n.input[0], out=n.output[0])

    def softsign(b, n):
        x = n.input[0]
        b.op("Div", x, b.op("Add", b.op("Abs", x), b.const(1.0)), out=n.output[0])

    def mish(b, n):
        x = n.input[0]
        b.op("Mul", x, b.op("Tanh", _softplus(b, x)), out=n.output[0])

    return {"Elu": elu, "Selu": selu, "Celu": celu, "Softplus": softplus, "Softsign": softsign, "Mish": mish}


def smooth_activations(model: onnx.ModelProto) -> int:
    """Rewrite every default-domain op of the list above in place; returns how many."""
    rules = _rules()
    present = {n.op_type for n in model.graph.node if n.domain in ("", "ai.onnx")} & set(rules)
    if not present:
        return 0
    _, types = tensor_info(model)
    count = 0
    for op_type in sorted(present):
        rule = rules[op_type]

        def expand(node, names, graph, rule=rule):
            b = _Builder(node, names, graph, float_type(types, node.input[0]))
            rule(b, node)
            return b.nodes

        count += replace_nodes(model, op_type, expand, "smooth_activations")
    return count
