"""Running statistics of inference-form BatchNormalization, re-estimated from data.

Why: ORT training turns every BatchNormalization of the training graph into
``BatchNormInternal`` with ``training_mode = 1`` (batch statistics), but the updated running
mean and variance never reach the checkpoint; the eval graph and the written model normalise
with the statistics the model came with. A model trained from scratch (or whose channels
changed) then evaluates at chance while it trains well. :func:`recalibrate_batchnorm` sets
each BN's running mean and variance to the average over ``batches`` of the statistics that BN
sees in training mode (as training normalised them): one ORT run per batch of a copy in which
every BN uses batch statistics (momentum 0) and returns them.
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional

import numpy as np
import onnx
from onnx import helper, numpy_helper


def recalibrate_batchnorm(model: onnx.ModelProto, batches: Iterable[Dict[str, np.ndarray]],
                          input_name: Optional[str] = None, max_batches: int = 50) -> int:
    """Rewrite BN running mean/var initializers of ``model`` in place; returns the BN count."""
    import onnxruntime as ort

    from .opset import upgrade_opset

    inits = {t.name: i for i, t in enumerate(model.graph.initializer)}
    bns = [n for n in model.graph.node if n.op_type == "BatchNormalization" and n.domain in ("", "ai.onnx")
           and len(n.input) == 5 and n.input[3] in inits and n.input[4] in inits and len([o for o in n.output if o]) == 1]
    real = [i for i in model.graph.input if i.name not in inits]
    if not bns or not real:
        return 0
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    upgrade_opset(probe)
    wanted = {n.name or n.output[0] for n in bns}
    stats = []
    for node in probe.graph.node:
        if node.op_type != "BatchNormalization" or (node.name or node.output[0]) not in wanted:
            continue
        for a in list(node.attribute):
            if a.name in ("training_mode", "momentum", "spatial"):
                node.attribute.remove(a)
        node.attribute.extend([helper.make_attribute("training_mode", 1), helper.make_attribute("momentum", 0.0)])
        mean, var = f"{node.input[3]}/recalibrated", f"{node.input[4]}/recalibrated"
        node.output.extend([mean, var])
        probe.graph.output.extend([helper.make_empty_tensor_value_info(mean), helper.make_empty_tensor_value_info(var)])
        stats.append((node.input[3], node.input[4], mean, var))
    del probe.graph.value_info[:]
    sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [n for s in stats for n in s[2:]]
    # Every model input the feed holds (several-input models); labels and teacher outputs are left out.
    feeds = [input_name] if input_name else [i.name for i in sess.get_inputs()]
    sums: Dict[str, np.ndarray] = {}
    count = 0
    for feed in batches:
        values = sess.run(names, {n: feed[n] for n in feeds if n in feed})
        for n, v in zip(names, values):
            sums[n] = sums.get(n, 0.0) + np.asarray(v, np.float64)
        count += 1
        if count >= max_batches:
            break
    if not count:
        return 0
    for mean, var, m_out, v_out in stats:
        for name, out in ((mean, m_out), (var, v_out)):
            t = model.graph.initializer[inits[name]]
            dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
            t.CopyFrom(numpy_helper.from_array((sums[out] / count).astype(dtype).reshape(tuple(t.dims)), name))
    return len(stats)
