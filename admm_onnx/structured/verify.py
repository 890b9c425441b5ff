"""Every shrink is checked: the shrunk model must compute what the masked model computes.

Both run in ONNX Runtime (CPU) on seeded random inputs (normal floats; batch 1 and 3 where
the batch is dynamic; other symbolic dims 4). Tolerance: for every output,
|shrunk - masked| <= RTOL * |masked| + ATOL * max(1, max |masked|), RTOL = 1e-4, ATOL = 1e-5 - float32
rounding of sums that lost zero terms. Sequence and map outputs (ZipMap) are compared as their
numbers in order. A mismatch raises :class:`ShrinkMismatch`: an internal
error (a bug in a rule), never a silent output.
"""
from __future__ import annotations

from typing import Dict, List

import numpy as np
import onnx

from ..errors import AdmmOnnxError

RTOL = 1e-4
ATOL = 1e-5


class ShrinkMismatch(AdmmOnnxError):
    """Internal error: the shrunk model does not compute what the masked model computed."""


def _feeds(model: onnx.ModelProto, seed: int) -> List[Dict[str, np.ndarray]]:
    inits = {t.name for t in model.graph.initializer}
    rng = np.random.default_rng(seed)
    feeds = []
    for batch in (1, 3):
        feed, dynamic = {}, False
        for vi in model.graph.input:
            if vi.name in inits:
                continue
            tt = vi.type.tensor_type
            shape = []
            for i, d in enumerate(tt.shape.dim):
                if d.HasField("dim_value"):
                    shape.append(d.dim_value)
                else:
                    dynamic |= i == 0
                    shape.append(batch if i == 0 else 4)
            dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
            if np.issubdtype(dtype, np.floating):
                feed[vi.name] = rng.standard_normal(shape).astype(dtype)
            else:
                feed[vi.name] = np.zeros(shape, dtype)
        feeds.append(feed)
        if not dynamic:
            break
    return feeds


def _session(model: onnx.ModelProto):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _numbers(x) -> np.ndarray:
    """An output as float64 numbers: tensors as they are, sequences and maps (a ZipMap's list
    of {label: probability}) flattened in order, keys sorted."""
    if isinstance(x, dict):
        return np.concatenate([_numbers(x[k]).ravel() for k in sorted(x)]) if x else np.zeros(0)
    if isinstance(x, (list, tuple)):
        parts = [_numbers(v).ravel() for v in x]
        return np.concatenate(parts) if parts else np.zeros(0)
    return np.asarray(x, np.float64)


def verify(masked_model: onnx.ModelProto, shrunk_model: onnx.ModelProto, seed: int = 0) -> float:
    """Raise :class:`ShrinkMismatch` unless the two agree; returns the worst difference seen."""
    a, b = _session(masked_model), _session(shrunk_model)
    names = [o.name for o in a.get_outputs()]
    worst = 0.0
    for feed in _feeds(masked_model, seed):
        for name, x, y in zip(names, a.run(names, feed), b.run(names, feed)):
            x, y = _numbers(x), _numbers(y)
            if x.shape != y.shape:
                raise ShrinkMismatch(f"internal error: shrunk output {name!r} has shape {y.shape}, masked {x.shape}")
            scale = max(1.0, float(np.max(np.abs(x))) if x.size else 1.0)
            diff = np.abs(x - y)
            bad = diff > RTOL * np.abs(x) + ATOL * scale
            worst = max(worst, float(diff.max()) if diff.size else 0.0)
            if bad.any():
                raise ShrinkMismatch(
                    f"internal error: the shrunk model differs from the masked model on output {name!r} "
                    f"(max |diff| {diff.max():.3g}, scale {scale:.3g})", hint="please report this model",
                )
    return worst
