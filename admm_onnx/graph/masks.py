"""Insert weight masks for masked retraining: every consumer of W reads W * M instead of W.

Math: with a 0/1 mask M, the effective weight W_eff = W * M has exact zeros wherever M = 0,
whatever the optimizer does to the raw W (its gradient there is dL/dW_eff * M = 0, and decay
moves only the raw W). M is an initializer listed as a frozen parameter, so it lives in the
checkpoint and can be changed between steps. The exported inference weight is W * M.

Contract: the graph's inputs, outputs and all other nodes are unchanged; every node that read
W reads ``<W>/masked``. Mask names come from :func:`mask_name`.
"""
from __future__ import annotations

from typing import Dict

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ._util import NameScope, checked


def mask_name(weight: str) -> str:
    """Name of the mask initializer of ``weight``."""
    return f"admm/mask/{weight}"


def insert_masks(model: onnx.ModelProto, masks: Dict[str, np.ndarray]) -> Dict[str, str]:
    """Insert ``W * M`` for each weight name in ``masks`` (in place); returns weight -> mask name."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    names = NameScope(graph)
    created: Dict[str, str] = {}
    new_nodes = []
    for weight, mask in masks.items():
        if weight not in inits:
            from ..errors import ConfigError

            raise ConfigError(f"a mask names {weight!r}, which is no initializer of the model")
        tensor = inits[weight]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
        mask = np.asarray(mask)
        if tuple(mask.shape) != tuple(tensor.dims):
            from ..errors import ConfigError

            raise ConfigError(f"the mask for {weight} has shape {mask.shape}, the weight {tuple(tensor.dims)}")
        m_name = mask_name(weight)
        names.used.add(m_name)
        graph.initializer.append(numpy_helper.from_array(np.asarray(mask, dtype=dtype), m_name))
        masked = names(f"{weight}/masked")
        new_nodes.append(helper.make_node("Mul", [weight, m_name], [masked], name=names(f"{weight}/mask_mul")))
        for node in graph.node:
            for i, inp in enumerate(node.input):
                if inp == weight:
                    node.input[i] = masked
        created[weight] = m_name
    # Mask products first: they depend only on initializers, and nodes must stay topologically sorted.
    existing = list(graph.node)
    del graph.node[:]
    graph.node.extend(new_nodes + existing)
    checked(model, "insert_masks")
    return created
