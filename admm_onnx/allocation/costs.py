"""Weights and multiply-accumulates (MACs) per prunable weight, from the graph's shapes.

Every element of a weight takes part in ``positions`` MACs per sample: 1 for Gemm, the
output's spatial size for Conv (groups included: the weight tensor already holds
Cout x Cin/groups x k...), the input's spatial size for ConvTranspose, and the rows it
multiplies for MatMul (every output axis but the batch axis and the weight's output axis).
A weight used by several nodes sums its uses. Unknown or symbolic dims count as 1 (logged).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import numpy as np
import onnx

from ..graph.analysis import GraphInfo, consumer_map, final_uses
from ..graph.shapes import tensor_shapes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerCost:
    name: str
    params: int
    #: MACs per sample each element of the weight takes part in.
    positions: int

    @property
    def macs(self) -> int:
        return self.params * self.positions


def _prod(dims: Optional[Sequence[object]]) -> Optional[int]:
    if dims is None or any(not isinstance(d, int) or d < 1 for d in dims):
        return None
    return int(np.prod(dims)) if len(dims) else 1


def _positions(node: onnx.NodeProto, slot: int, shapes) -> Optional[int]:
    op = node.op_type
    if op == "Gemm":
        return 1
    if op == "Conv":
        out = shapes.get(node.output[0])
        return _prod(out[2:]) if out else None
    if op == "ConvTranspose":
        x = shapes.get(node.input[0])
        return _prod(x[2:]) if x else None
    if op == "MatMul":
        out = shapes.get(node.output[0])
        if not out:
            return None
        if len(out) == 1:
            return 1
        # X @ W: rows are every axis but the last (the batch axis 0 excluded when rank > 2 or
        # when the other operand is 2-D with a batch of rows); W @ X: columns are the last axis.
        if slot == 1:
            rows = out[1:-1] if len(out) > 2 else []
        else:
            rows = list(out[1:-2]) + [out[-1]] if len(out) > 2 else [out[-1]]
        return _prod(rows)
    return None


def layer_costs(model: onnx.ModelProto, info: GraphInfo) -> Dict[str, LayerCost]:
    """name -> :class:`LayerCost` for every prunable weight of ``info`` (in its order)."""
    shapes = tensor_shapes(model)
    consumers = consumer_map(model.graph)
    out: Dict[str, LayerCost] = {}
    for name, w in info.prunable.items():
        total = 0
        for node, slot, _, _ in final_uses(model.graph, name, w.shape, consumers):
            if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
                continue
            p = _positions(node, slot, shapes)
            if p is None:
                log.info("MACs of %s in %s %s: output shape unknown, counted as 1 position per sample",
                         name, node.op_type, node.name or node.output[0])
                p = 1
            total += p
        out[name] = LayerCost(name, w.size, max(1, total))
    return out
