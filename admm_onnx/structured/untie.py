"""Constant sharing that exporters introduce, undone before the channel analysis.

The TorchScript exporter de-duplicates equal initializers: in a randomly initialised timm
ResNet-18 every BatchNorm folded into its Conv leaves a zero bias, and all those biases become
*one* initializer read through ``Identity`` nodes by convolutions of different channel groups.
No channel of such a conv could be removed (its bias is not its own). :func:`untie_constants`
returns a copy in which
- a node input that reads an initializer through a chain of ``Identity`` nodes reads it directly
  (Identity nodes left without readers are dropped, unless they give a graph output);
- an initializer of at most one dimension (biases, per-channel scales: exporter de-duplication,
  not a weight tie) read by several nodes is copied, one copy per reader (``NAME``, ``NAME.1``,
  ...), so each goes with its own channels;
  so is an all-zero weight of any rank (a zero-initialised last BatchNorm of a residual block,
  folded into its conv, gives equal all-zero conv weights that the exporter merged);
- other weights of two or more dimensions read by several nodes stay shared (real ties: the
  analysis blocks their groups and says why).
The computed function is unchanged (the copies are equal); the model's inputs, outputs and
the names of every node that computes something stay as they were.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from typing import Tuple

import onnx
from onnx import numpy_helper

log = logging.getLogger(__name__)


def untie_constants(model: onnx.ModelProto) -> Tuple[onnx.ModelProto, int]:
    """(the model with Identity-read and de-duplicated constants untied, number of inputs
    rewired); the input model is not modified and is returned as is when nothing changes."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output if o}
    outputs = {o.name for o in graph.output}

    def source(name):
        seen = 0
        while name and name not in inits and seen < 16:
            n = producer.get(name)
            if n is None or n.op_type != "Identity" or n.domain not in ("", "ai.onnx"):
                return None
            name = n.input[0]
            seen += 1
        return name if name in inits else None

    readers = defaultdict(list)  # init -> [(node index, input slot, via identity)]
    for i, n in enumerate(graph.node):
        if n.op_type == "Identity" and n.output and n.output[0] not in outputs:
            continue
        for j, name in enumerate(n.input):
            src = source(name)
            if src is not None:
                readers[src].append((i, j, name != src))
    def untie(src):
        if len(readers[src]) < 2:
            return False
        if len(inits[src].dims) <= 1:
            return True
        return not numpy_helper.to_array(inits[src]).any()

    changes = [(src, r) for src, rs in readers.items() for r in rs if r[2] or untie(src)]
    if not changes:
        return model, 0
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    names = {t.name for t in g.initializer} | {o for n in g.node for o in n.output} | {i.name for i in g.input}
    new_inits = []
    copied_from = {}
    rewired = 0
    for src, rs in readers.items():
        copy = untie(src)
        for k, (i, j, via) in enumerate(rs):
            target = src
            if copy and k > 0:
                target = f"{src}.{k}"
                while target in names:
                    target += "_"
                names.add(target)
                t = onnx.TensorProto()
                t.CopyFrom(inits[src])
                t.name = target
                new_inits.append(t)
                copied_from[target] = src
            if via or target != src:
                g.node[i].input[j] = target
                rewired += 1
    g.initializer.extend(new_inits)
    # drop Identity nodes nobody reads any more, then initializers nobody reads
    while True:
        used = {x for n in g.node for x in n.input} | outputs
        dead = [i for i, n in enumerate(g.node) if n.op_type == "Identity" and n.output and n.output[0] not in used]
        if not dead:
            break
        for i in reversed(dead):
            del g.node[i]
    used = {x for n in g.node for x in n.input} | outputs
    keep = [t for t in g.initializer if t.name in used]
    if len(keep) != len(g.initializer):
        del g.initializer[:]
        g.initializer.extend(keep)
    graph_inputs = [i for i in g.input if i.name not in inits or i.name in used]
    if len(graph_inputs) != len(g.input):  # IR < 4: initializers listed as inputs too
        del g.input[:]
        g.input.extend(graph_inputs)
    known = {i.name for i in g.input}
    for t in new_inits:  # IR < 4 models list every initializer as a graph input
        if model.ir_version < 4 and t.name not in known:
            vi = next((i for i in model.graph.input if i.name == copied_from[t.name]), None)
            if vi is not None:
                nv = g.input.add()
                nv.CopyFrom(vi)
                nv.name = t.name
    log.info("untied %d constant input(s) (Identity-read or de-duplicated by the exporter)", rewired)
    return out, rewired
