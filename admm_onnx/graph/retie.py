"""Re-tie an embedding table and an output head that an exporter folded apart.

Contract: PyTorch ties ``head.weight = emb.weight``; constant folding at export writes the
embedding E (V, D), read by ``Gather``, and a separate head initializer H = E^T (D, V) read
by MatMul (or Gemm with transB = 0), or H = E read by Gemm with transB = 1. Trained as two
tensors, the tie would silently break. In the training copy this rewrite replaces each such H
by ``Transpose(E)`` (or E itself), so one parameter is trained and pruned, and records
``metadata_props["admm_onnx.derived:<H>"] = "<E>;<perm>"``; :mod:`.analysis` exposes it as
``GraphInfo.derived`` and ``GraphInfo.expand_weights`` computes H from the trained E for the
written model (the user's graph keeps both initializers).

A pair is only re-tied when all of these hold: E is a 2-D float initializer read by a Gather
as its table; H is a 2-D float initializer whose every use is a weight slot of
MatMul/Gemm; H equals E transposed (or E) exactly, element for element; E is not constant.
Forward: identical (the values are equal).
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ._util import NameScope, checked
from .analysis import DERIVED_KEY, FLOAT_TYPES, _weight_axes, consumer_map


def _pairs(model: onnx.ModelProto) -> List[Tuple[str, str, Tuple[int, ...]]]:
    graph = model.graph
    consumers = consumer_map(graph)
    inits = {t.name: t for t in graph.initializer}
    outputs = {o.name for o in graph.output}

    def float2d(t):
        return t.data_type in FLOAT_TYPES and len(t.dims) == 2 and t.name not in outputs

    tables = [
        t for t in inits.values()
        if float2d(t) and any(n.op_type == "Gather" and s == 0 for n, s in consumers.get(t.name, []))
    ]
    heads = [
        t for t in inits.values()
        if float2d(t) and consumers.get(t.name)
        and all(n.op_type in ("MatMul", "Gemm") and _weight_axes(n, s, 2) for n, s in consumers[t.name])
    ]
    found, used = [], set()
    for e in tables:
        e_val = None
        for h in heads:
            if h.name in used or h.name == e.name or sorted(h.dims) != sorted(e.dims):
                continue
            e_val = numpy_helper.to_array(e) if e_val is None else e_val
            if e_val.size < 2 or np.all(e_val == e_val.flat[0]):
                break
            h_val = numpy_helper.to_array(h)
            for perm in ((1, 0), (0, 1)):
                if h_val.shape == e_val.transpose(perm).shape and np.array_equal(h_val, e_val.transpose(perm)):
                    found.append((e.name, h.name, perm))
                    used.add(h.name)
                    break
    return found


def retie_embeddings(model: onnx.ModelProto) -> int:
    """Re-tie folded embedding/head pairs in place (see the module docstring); returns how many."""
    pairs = _pairs(model)
    if not pairs:
        return 0
    graph = model.graph
    names = NameScope(graph)
    new_nodes: List[onnx.NodeProto] = []
    replace: Dict[str, str] = {}
    for table, head, perm in pairs:
        if perm == (0, 1):
            replace[head] = table
        else:
            t = names(f"{table}/tied_transpose")
            new_nodes.append(helper.make_node("Transpose", [table], [t], name=names(f"{table}/Transpose"), perm=list(perm)))
            replace[head] = t
        model.metadata_props.append(onnx.StringStringEntryProto(key=f"{DERIVED_KEY}{head}", value=f"{table};{','.join(map(str, perm))}"))
    for node in graph.node:
        for i, x in enumerate(node.input):
            if x in replace:
                node.input[i] = replace[x]
    keep = [t for t in graph.initializer if t.name not in replace]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    inputs = [i for i in graph.input if i.name not in replace]
    del graph.input[:]
    graph.input.extend(inputs)
    existing = list(graph.node)
    del graph.node[:]
    graph.node.extend(new_nodes + existing)  # they read initializers only: keep topological order
    checked(model, "retie_embeddings")
    return len(pairs)
