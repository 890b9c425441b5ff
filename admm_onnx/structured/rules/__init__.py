"""Op type -> channel rule: the table is also the documented list of supported ops.

A rule is ``rule(node, ins, ctx) -> Mapping | Blocked``: ``ins`` holds the :class:`Origin` of
each input (None for inputs that carry no removable channel), ``ctx`` is the analysis
(``ctx.view``: :class:`~admm_onnx.structured.graph.GraphView`; ``ctx.new_space(node, n)``:
fresh atoms for a producer's output channels). Rules are called for every node that reads a
tensor with removable channels, and for every op in :data:`PRODUCERS`. An op without a rule
blocks the channels that reach it ("no rule for op X").
"""
from __future__ import annotations

from typing import Callable, Dict

from ..maps import Blocked, Mapping

Rule = Callable[..., "Mapping | Blocked"]

REGISTRY: Dict[str, Rule] = {}

#: Ops that can create channel spaces (their rule runs even if no input carries channels).
PRODUCERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def register(*op_types: str):
    def deco(fn: Rule) -> Rule:
        for op in op_types:
            REGISTRY[op] = fn
        return fn

    return deco


def rule_for(op_type: str, domain: str = "") -> Rule:
    if domain not in ("", "ai.onnx"):
        return lambda node, ins, ctx: Blocked(f"no rule for op {domain}.{op_type}")
    return REGISTRY.get(op_type) or (lambda node, ins, ctx: Blocked(f"no rule for op {op_type}"))


def supported_ops():
    return sorted(REGISTRY)


from . import concat_split, conv, eltwise, gemm, norm, pool, reduce, reshape  # noqa: E402,F401
