"""``qdq``: int8 weights and activations in QDQ form, the format onnxruntime runs with integer kernels.

What the file holds (ONNX's QDQ convention, as ``onnxruntime.quantization.quantize_static``
writes it: QDQ, 8-bit activations, int8 weights symmetric per channel):

- every weight of a Conv, Gemm or MatMul as an int8 initializer read through
  ``DequantizeLinear(q, scale, 0)``. A weight that a pruning run quantized (its
  :class:`~admm_onnx.quantization.QuantSpec` recorded in the model, or passed in ``specs``)
  keeps its trained levels exactly: ``q = spec.integers(w)`` and the trained scales, so
  ``DequantizeLinear`` gives back the trained float32 weights bit for bit (2- to 8-bit levels
  are all int8 values). Any other such weight is quantized here to 8 bits, symmetric per
  output channel, ``scale = max|w| / 127`` (post-training, like ORT's tool);
- biases as int32 with scale ``x_scale * w_scale`` (per channel), as onnxruntime's fused
  kernels want them;
- activations: a ``QuantizeLinear -> DequantizeLinear`` pair on every float tensor entering or
  leaving a quantized node, and on the outputs of the ops that only move or clip values
  between them (Relu, MaxPool, Reshape, Flatten, ...). Scales and zero points come from the
  user's calibration data: the float model runs in an onnxruntime ``InferenceSession``, the
  range of each tensor is its min/max over the data (always including 0), asymmetric uint8 (or
  int8), like ORT's ``MinMax`` calibrator. Tensors joined by a value-moving op share one range,
  so onnxruntime can drop the pair around it; a tensor read only by a Relu takes the range of
  the Relu's output (quantizing with zero point at the bottom of the range is the Relu).

Activations are uint8 by default (U8S8). ORT's tool recommends S8S8, but on x86-64 onnxruntime
(1.32) converts int8 activation pairs to uint8 itself and does so only for a quantized tensor
with one reader: in a ResNet the block inputs (read by the next conv and the residual Add)
then stayed float, and the int8 file ran 1.9x slower than fp32 (uint8: every conv fused,
0.72x). ``activations="int8"`` writes S8S8 all the same.

BatchNormalization after a Conv is folded into it first (as ORT's tool does): a weight on
trained levels keeps its integers, its scale absorbs ``gamma / sqrt(var + eps)``; the folded
weights are named ``<weight>/bn_folded`` (and ``<weight>/bn_folded_2``... when one weight feeds
several Conv+BatchNorm pairs), their biases ``<weight>/bias_bn_folded``.

Graph outputs stay float. onnxruntime (1.32 checked by tests/test_qdq.py) fuses the pairs
into QLinearConv, QGemm/QLinearMatMul/MatMulIntegerToFloat and int8 MaxPool at session
creation (``session.optimized_model_filepath`` shows it).

Limits: lossy by design (activations are rounded to 8 bits), so not bit-exact to a dense model:
``decode`` gives the float model with the same weights (the weights' DequantizeLinear folded,
activation pairs removed), the reference for accuracy. Opset >= 13 (per-channel
DequantizeLinear). Conv/Gemm (transA = 0, alpha = beta = 1)/MatMul with constant weights are
quantized; other ops run in float between DQ and Q nodes. ``onnxslim`` / ``onnxsim`` keep QDQ
pairs; a tool that constant-folds ``DequantizeLinear`` of the weights turns them back to float.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from . import register
from .base import Format
from ..errors import ConfigError, DataError, ModelError, error_text
from ..graph.analysis import subgraph_reads
from ..graph._util import NameScope

#: metadata_props key marking a file this format wrote (JSON facts).
METADATA_KEY = "admm_onnx.qdq"
#: Ops whose output values are some of their input values (max, copy, reshape): one range.
MOVING_OPS = {"MaxPool", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Identity", "Relu",
              "GlobalMaxPool", "Gather", "Slice", "Split"}
#: Ops quantized on their first N inputs and their output (QLinearAdd, QLinearGlobalAveragePool, ...).
INT8_OPS = {"Add": 2, "GlobalAveragePool": 1, "AveragePool": 1}
_ACT = {"int8": (TensorProto.INT8, np.int8, -128, 127), "uint8": (TensorProto.UINT8, np.uint8, 0, 255)}


@dataclass
class _Site:
    """One quantized node: its activation input, weight, bias and the axis of its output channels."""

    node: onnx.NodeProto
    x: str
    w: str
    b: Optional[str]
    axis: int


def _attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _sites(model: onnx.ModelProto) -> List[_Site]:
    inits = {t.name: t for t in model.graph.initializer}
    out = []
    for node in model.graph.node:
        if node.op_type == "Conv" and len(node.input) >= 2 and node.input[1] in inits:
            b = node.input[2] if len(node.input) > 2 and node.input[2] in inits else None
            out.append(_Site(node, node.input[0], node.input[1], b, 0))
        elif node.op_type == "Gemm" and len(node.input) >= 2 and node.input[1] in inits:
            if _attr(node, "transA", 0) or _attr(node, "alpha", 1.0) != 1.0 or _attr(node, "beta", 1.0) != 1.0:
                continue
            c = node.input[2] if len(node.input) > 2 and node.input[2] in inits else None
            if c is not None and len(inits[c].dims) > 1:
                c = None
            out.append(_Site(node, node.input[0], node.input[1], c, 0 if _attr(node, "transB", 0) else 1))
        elif node.op_type == "MatMul" and node.input[1] in inits and len(inits[node.input[1]].dims) == 2:
            out.append(_Site(node, node.input[0], node.input[1], None, 1))
    return out


def _feeds(calibration, input_names: Sequence[str], max_samples: int) -> Iterable[Dict[str, np.ndarray]]:
    """Feed dicts from a DataReader (get_next/rewind), an iterable of dicts, or one array."""
    if isinstance(calibration, np.ndarray):
        if len(input_names) != 1:
            raise ConfigError("calibration as one array needs a single-input model; pass feed dicts")
        for i in range(0, min(len(calibration), max_samples), 64):
            yield {input_names[0]: calibration[i:min(i + 64, max_samples)]}
        return
    if hasattr(calibration, "get_next"):
        if hasattr(calibration, "rewind"):
            calibration.rewind()
        batches = iter(calibration.get_next, None)
    else:
        batches = iter(calibration)
    seen = 0
    for feed in batches:
        feed = {k: np.asarray(v) for k, v in feed.items() if k in input_names}
        if set(feed) != set(input_names):
            raise DataError(f"a calibration batch lacks model input(s) {', '.join(sorted(set(input_names) - set(feed)))}")
        yield feed
        seen += len(next(iter(feed.values())))
        if seen >= max_samples:
            break
    if hasattr(calibration, "rewind"):
        calibration.rewind()


def _run_in_batches(sess, names: Sequence[str], feed: Dict[str, np.ndarray], fixed: Optional[int]) -> Dict[str, np.ndarray]:
    """``names`` computed for ``feed``; with a fixed batch size, in pieces of it (the last padded
    with copies of its first row, which leave every min and max as they are)."""
    rows = len(next(iter(feed.values())))
    if not fixed or rows == fixed:
        return dict(zip(names, sess.run(list(names), feed)))
    parts: Dict[str, List[np.ndarray]] = {t: [] for t in names}
    for start in range(0, rows, fixed):
        piece = {k: v[start:start + fixed] for k, v in feed.items()}
        got = len(next(iter(piece.values())))
        if got < fixed:
            piece = {k: np.concatenate([v, np.repeat(v[:1], fixed - got, axis=0)]) for k, v in piece.items()}
        for t, v in zip(names, sess.run(list(names), piece)):
            parts[t].append(np.asarray(v))
    return {t: np.concatenate([np.ravel(v) for v in vs]) for t, vs in parts.items()}


def calibrate(model: onnx.ModelProto, tensors: Sequence[str], calibration, max_samples: int = 1000) -> Dict[str, Tuple[float, float]]:
    """Min and max of each of ``tensors`` over the calibration data, the float model run in an
    onnxruntime InferenceSession (the training package's: any onnxruntime computes the same)."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    present = {o.name for o in probe.graph.output}
    graph_inputs = {i.name for i in probe.graph.input}
    for t in tensors:
        if t not in present and t not in graph_inputs:
            probe.graph.output.append(helper.make_empty_tensor_value_info(t))
    from .. import training

    training.flush_denormals()  # before the process's first session (training.flush_denormals)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        sess = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ModelError(f"ONNX Runtime cannot run the model for calibration: {error_text(exc)}") from exc
    inputs = [i.name for i in sess.get_inputs()]
    fixed = {i.shape[0] for i in sess.get_inputs() if i.shape and isinstance(i.shape[0], int)}
    fixed = fixed.pop() if len(fixed) == 1 else None  # a batch size the model fixes (zoo models: 1)
    lo = {t: np.inf for t in tensors}
    hi = {t: -np.inf for t in tensors}
    n = 0
    computed = [t for t in tensors if t not in graph_inputs]
    for feed in _feeds(calibration, inputs, max_samples):
        feed = {k: v.astype(np.float32) if v.dtype == np.float64 else v for k, v in feed.items()}
        values = _run_in_batches(sess, computed, feed, fixed)
        values.update({t: feed[t] for t in tensors if t in graph_inputs})
        for t, v in values.items():
            if v.size:
                lo[t] = min(lo[t], float(np.min(v)))
                hi[t] = max(hi[t], float(np.max(v)))
        n += 1
    if n == 0:
        raise DataError("no calibration data: the reader yielded no batch")
    return {t: (lo[t], hi[t]) for t in tensors}


def activation_params(lo: float, hi: float, activations: str = "int8") -> Tuple[np.float32, int]:
    """(scale, zero point) of an asymmetric 8-bit range covering [min(lo, 0), max(hi, 0)]."""
    _, _, qmin, qmax = _ACT[activations]
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = (hi - lo) / (qmax - qmin)
    if not np.isfinite(scale) or scale <= 0:
        return np.float32(1.0), 0 if activations == "int8" else 0
    zp = int(np.clip(np.rint(qmin - lo / scale), qmin, qmax))
    return np.float32(scale), zp


def _fold_batchnorm(model: onnx.ModelProto, specs) -> Tuple[Dict[str, object], int]:
    """Fold every inference BatchNormalization that alone reads a Conv's output into that Conv (in
    place), as onnxruntime's quantization tool does before quantizing: ``w' = w * f``,
    ``b' = (b - mean) * f + beta`` per output channel, ``f = gamma / sqrt(var + eps)``. A weight on
    trained levels keeps its integers: its scale becomes ``float32(scale * f)`` (per channel), so
    ``DequantizeLinear(q, scale')`` is the folded weight. Returns (specs, BatchNorms folded)."""
    from ..quantization import QuantSpec, dequantize

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    readers: Dict[str, int] = {}
    for n in graph.node:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1
    producer = {o: n for n in graph.node for o in n.output}
    graph_outputs = {o.name for o in graph.output}
    given = dict(specs)  # a weight shared by two Convs folds twice, from its own spec each time
    specs = dict(specs)
    fresh = NameScope(graph)

    drop, folded = set(), 0
    for k, bn in enumerate(graph.node):
        if bn.op_type != "BatchNormalization" or len(bn.output) > 1 and any(bn.output[1:]):
            continue
        conv = producer.get(bn.input[0])
        if (conv is None or conv.op_type != "Conv" or readers.get(bn.input[0], 0) != 1 or bn.input[0] in graph_outputs
                or conv.input[1] not in inits or not all(i in inits for i in bn.input[1:5])
                or _attr(bn, "training_mode", 0)):
            continue
        gamma, beta, mean, var = (numpy_helper.to_array(inits[i]).astype(np.float64) for i in bn.input[1:5])
        f = gamma / np.sqrt(var + float(_attr(bn, "epsilon", 1e-5)))
        weight = conv.input[1]
        w = numpy_helper.to_array(inits[weight]).astype(np.float32)
        spec = given.get(weight)
        new_spec = None
        if spec is not None and (spec.axis in (0, None)):
            # q * s * f: a negative factor flips the integers (the levels are symmetric), a zero
            # one zeroes the channel; the scale stays positive
            s = np.broadcast_to(np.asarray(spec.scale, np.float64), (w.shape[0],))
            sign = np.where(f < 0, -1, 1).reshape((-1,) + (1,) * (w.ndim - 1))
            scale = np.where(f != 0, s * np.abs(f), s).astype(np.float32)
            q = spec.integers(w).astype(np.int32) * sign * (f != 0).reshape(sign.shape)
            new_spec = QuantSpec(spec.bits, tuple(float(x) for x in scale), 0)
            w_new = dequantize(q, scale, 0)
        else:
            w_new = (w.astype(np.float64) * f.reshape((-1,) + (1,) * (w.ndim - 1))).astype(np.float32)
        b = (numpy_helper.to_array(inits[conv.input[2]]).astype(np.float64) if len(conv.input) > 2 and conv.input[2]
             else np.zeros(w.shape[0]))
        b_new = ((b - mean) * f + beta).astype(np.float32)
        w_name, b_name = fresh(weight + "/bn_folded"), fresh(weight + "/bias_bn_folded")  # one pair per Conv
        graph.initializer.extend([numpy_helper.from_array(w_new, w_name), numpy_helper.from_array(b_new, b_name)])
        if new_spec is not None:
            specs[w_name] = new_spec
        conv.input[1] = w_name
        if len(conv.input) > 2:
            conv.input[2] = b_name
        else:
            conv.input.append(b_name)
        conv.output[0] = bn.output[0]
        drop.add(k)
        folded += 1
    if drop:
        kept = [n for k, n in enumerate(graph.node) if k not in drop]
        del graph.node[:]
        graph.node.extend(kept)
        read = {i for n in graph.node for i in n.input}
        keep = [t for t in graph.initializer if t.name in read]
        del graph.initializer[:]
        graph.initializer.extend(keep)
        specs = {n: sp for n, sp in specs.items() if n in read}  # a weight no longer read has no spec
    return specs, folded


def _weight_integers(w: np.ndarray, spec, axis: int, name: str = "") -> Tuple[np.ndarray, np.ndarray, Optional[int], bool]:
    """(int8 q, float32 scales, axis or None, exact) for one weight."""
    if not np.isfinite(w).all():
        raise ModelError(f"weight {name!r} holds NaN or Inf values: int8 cannot represent them",
                         hint="fix or retrain the model first")
    if spec is not None:
        q = spec.integers(w)  # raises unless w is exactly on the spec's levels
        return q, np.asarray(spec.scale, np.float32), spec.axis, True
    rows = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    peak = np.abs(rows).max(axis=1)
    scale = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(np.rint(w / scale.reshape(shape)), -127, 127).astype(np.int8)
    return q, scale, axis, False


def quantize_qdq(model: onnx.ModelProto, calibration, specs=None, activations: str = "uint8",
                 max_samples: int = 1000):
    """The QDQ model of ``model`` (see the module docstring) and an ExportReport.

    ``calibration``: the user's data (a DataReader such as ``ArrayReader``, an iterable of feed
    dicts, or one array for a single-input model), at most ``max_samples`` samples used.
    ``specs``: weight -> QuantSpec of the trained levels (default: those recorded in the model
    that its weights satisfy). ``activations``: "uint8" (U8S8, the default) or "int8" (S8S8,
    see the module docstring). The input is never modified.
    """
    from ..quantization import model_quantization
    from .base import ExportReport, WeightRow, _check_model_arg

    _check_model_arg(model)
    if activations not in _ACT:
        raise ConfigError(f"activations must be one of {', '.join(_ACT)}, got {activations!r}")
    if calibration is None:
        raise ConfigError("the qdq format needs calibration data (the user's inputs) for the activation ranges")
    half_types = {TensorProto.FLOAT16: "float16", TensorProto.BFLOAT16: "bfloat16"}
    half: Dict[str, List[str]] = {}  # type name -> tensors of that type, in graph order
    for name, elem in ([(v.name, v.type.tensor_type.elem_type) for v in model.graph.input]
                       + [(t.name, t.data_type) for t in model.graph.initializer]):
        if elem in half_types:
            half.setdefault(half_types[elem], []).append(name)
    if half:
        held = " and ".join(f"{kind} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
                            for kind, names in half.items())
        raise ConfigError(f"the qdq format quantizes float32 models; this one holds {held}",
                          hint="export it as csr, coo or packed, or convert it to float32 first")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    if opset < 13:
        raise ModelError(f"the qdq format needs opset >= 13 (per-channel DequantizeLinear); the model has {opset}")
    specs = dict(model_quantization(model) if specs is None else specs)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    specs, folded = _fold_batchnorm(out, specs)
    graph = out.graph
    float_model = onnx.ModelProto()
    float_model.CopyFrom(out)  # the function to calibrate: BatchNormalization folded, no QDQ yet
    sites = _sites(out)
    if not sites:
        raise ModelError("no Conv, Gemm or MatMul with a constant weight to quantize")
    graph_outputs = {o.name for o in graph.output}
    producer = {o: n for n in graph.node for o in n.output}
    consumers: Dict[str, List[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    inits = {t.name: t for t in graph.initializer}

    # Tensors to quantize: activation inputs and outputs of the sites, and what value-moving
    # ops carry from them; joined into groups that share one range.
    parent: Dict[str, str] = {}

    def find(t):
        while parent[t] != t:
            parent[t] = parent[parent[t]]
            t = parent[t]
        return t

    def add(t):
        parent.setdefault(t, t)

    for s in sites:
        add(s.x)
        if s.node.output[0] not in graph_outputs:
            add(s.node.output[0])
    for n in graph.node:  # ops onnxruntime runs on int8 when every input and the output are quantized
        if n.op_type in INT8_OPS and n.output[0] not in graph_outputs and all(
                i and i not in inits for i in n.input[: INT8_OPS[n.op_type]]):
            for t in list(n.input[: INT8_OPS[n.op_type]]) + [n.output[0]]:
                add(t)
    changed = True
    while changed:  # spread through value-moving ops, both directions
        changed = False
        for n in graph.node:
            if n.op_type not in MOVING_OPS or not n.input or n.input[0] in inits:
                continue
            a, b = n.input[0], n.output[0]
            if b in graph_outputs:
                continue
            if a in parent and b not in parent:
                add(b)
                changed = True
            elif b in parent and a not in parent and a not in inits:
                add(a)
                changed = True
            if a in parent and b in parent and find(a) != find(b):
                parent[find(a)] = find(b)
                changed = True
    tensors = sorted(parent)
    ranges = calibrate(float_model, tensors, calibration, max_samples)
    # A tensor read only by Relu nodes is quantized with the Relu's output range.
    for t in tensors:
        readers = consumers.get(t, [])
        if readers and all(r.op_type == "Relu" for r in readers) and t not in graph_outputs:
            lo, hi = ranges[t]
            ranges[t] = (max(lo, 0.0), max(hi, 0.0))
    group_range: Dict[str, Tuple[float, float]] = {}
    for t in tensors:
        g = find(t)
        lo, hi = ranges[t]
        glo, ghi = group_range.get(g, (np.inf, -np.inf))
        group_range[g] = (min(glo, lo), max(ghi, hi))
    elem, np_type, _, _ = _ACT[activations]
    params: Dict[str, Tuple[np.float32, int]] = {t: activation_params(*group_range[find(t)], activations) for t in tensors}

    fresh = NameScope(graph)

    new_inits: List[onnx.TensorProto] = []
    pairs: Dict[str, str] = {}  # tensor -> its DequantizeLinear output
    after: Dict[str, List[onnx.NodeProto]] = {}  # tensor -> nodes to place right after its producer
    for t in tensors:
        scale, zp = params[t]
        s_name, z_name = fresh(f"{t}/act_scale"), fresh(f"{t}/act_zero_point")
        new_inits += [numpy_helper.from_array(np.asarray(scale, np.float32), s_name),
                      numpy_helper.from_array(np.asarray(zp, np_type), z_name)]
        q, dq = fresh(f"{t}/quantized"), fresh(f"{t}/dequantized")
        after[t] = [helper.make_node("QuantizeLinear", [t, s_name, z_name], [q], name=fresh(f"{t}/QuantizeLinear")),
                    helper.make_node("DequantizeLinear", [q, s_name, z_name], [dq], name=fresh(f"{t}/DequantizeLinear"))]
        pairs[t] = dq
    for n in graph.node:
        for i, name in enumerate(n.input):
            if name in pairs:
                n.input[i] = pairs[name]

    rows, exact, post = [], [], []
    levels: Dict[str, int] = {}
    weight_nodes: List[onnx.NodeProto] = []
    replaced: Dict[str, str] = {}
    for s in sites:
        if s.w in replaced:
            continue
        w = numpy_helper.to_array(inits[s.w]).astype(np.float32)
        if w.size == 0:
            continue  # nothing to quantize: the (empty) weight stays float
        q, w_scale, axis, is_exact = _weight_integers(w, specs.get(s.w), s.axis, s.w)
        (exact if is_exact else post).append(s.w)
        # The DequantizeLinear output takes the weight's own name (the float initializer goes).
        q_name, ws_name, wz_name, dq_name = fresh(f"{s.w}/int8"), fresh(f"{s.w}/scale"), fresh(f"{s.w}/zero_point"), s.w
        new_inits += [numpy_helper.from_array(q.astype(np.int8), q_name), numpy_helper.from_array(w_scale.reshape(-1) if axis is not None else w_scale.reshape(()), ws_name),
                      numpy_helper.from_array(np.zeros(w_scale.size if axis is not None else (), np.int8), wz_name)]
        kw = {"axis": int(axis)} if axis is not None else {}
        weight_nodes.append(helper.make_node("DequantizeLinear", [q_name, ws_name, wz_name], [dq_name], name=fresh(f"{s.w}/DequantizeLinear"), **kw))
        replaced[s.w] = dq_name
        if specs.get(s.w) is not None:
            levels[s.w] = int(specs[s.w].bits)
        rows.append(WeightRow(s.w, s.node.op_type, tuple(w.shape), int(w.size), int(np.count_nonzero(w)),
                              "int8" + ("" if is_exact else " (post-training)"), int(q.size + 4 * w_scale.size), int(w.nbytes),
                              bits=8))
        if s.b is not None and s.x in params:
            b = numpy_helper.to_array(inits[s.b]).astype(np.float32)
            x_scale = params[s.x][0]
            per = np.broadcast_to(w_scale.reshape(-1), (b.size,)) if axis is not None and w_scale.size > 1 else np.full(b.size, w_scale.reshape(-1)[0], np.float32)
            b_scale = (np.float32(x_scale) * per.astype(np.float32)).astype(np.float32)
            bq = np.clip(np.rint(b.astype(np.float64) / b_scale), -2**31, 2**31 - 1).astype(np.int32)
            if s.b in replaced:
                continue
            bq_name, bs_name, bz_name, bdq = fresh(f"{s.b}/int32"), fresh(f"{s.b}/scale"), fresh(f"{s.b}/zero_point"), s.b
            new_inits += [numpy_helper.from_array(bq, bq_name), numpy_helper.from_array(b_scale, bs_name),
                          numpy_helper.from_array(np.zeros(b.size, np.int32), bz_name)]
            weight_nodes.append(helper.make_node("DequantizeLinear", [bq_name, bs_name, bz_name], [bdq], name=fresh(f"{s.b}/DequantizeLinear"), axis=0))
            replaced[s.b] = bdq
    # The float weights and biases are replaced by their DequantizeLinear outputs.
    keep = [t for t in graph.initializer if t.name not in replaced]
    del graph.initializer[:]
    graph.initializer.extend(keep + new_inits)
    # Order: weight DQs first, each activation pair right after its producer (graph inputs first).
    nodes = list(weight_nodes)
    for i in graph.input:
        nodes += after.pop(i.name, [])
    for n in list(graph.node):
        nodes.append(n)
        for o in n.output:
            nodes += after.pop(o, [])
    del graph.node[:]
    graph.node.extend(nodes)
    facts = {"batchnorm_folded": folded, "activations": activations, "calibration": "minmax", "max_samples": max_samples,
             "exact_weights": sorted(exact), "post_training_weights": sorted(post), "levels": levels}
    entry = out.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(facts, sort_keys=True)
    try:
        onnx.checker.check_model(out)
    except onnx.checker.ValidationError as exc:  # pragma: no cover - a bug here
        raise ModelError(f"internal: the QDQ model does not pass the ONNX checker: {exc}") from exc
    report = ExportReport(format="qdq", values="int8", min_sparsity=0.0, model_bytes_before=model.ByteSize())
    for r in rows:
        report.rows.append(r)
    report.model_bytes_after = out.ByteSize()
    return out, report


def _weight_dqs(model: onnx.ModelProto):
    """(node index, node) of the DequantizeLinear nodes that read an initializer (weights, biases)."""
    inits = {t.name for t in model.graph.initializer}
    return [(k, n) for k, n in enumerate(model.graph.node) if n.op_type == "DequantizeLinear" and n.input[0] in inits]


def _dequantize(model: onnx.ModelProto, node: onnx.NodeProto) -> np.ndarray:
    inits = {t.name: t for t in model.graph.initializer}
    q = numpy_helper.to_array(inits[node.input[0]])
    s = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
    z = numpy_helper.to_array(inits[node.input[2]]) if len(node.input) > 2 else np.zeros(s.shape, q.dtype)
    if s.ndim == 1 and q.ndim > 1:
        shape = [1] * q.ndim
        shape[_attr(node, "axis", 1) % q.ndim] = s.size
        s, z = s.reshape(shape), z.reshape(shape)
    return ((q.astype(np.int64) - z.astype(np.int64)).astype(np.float32) * s).astype(np.float32)


def decode_qdq(model: onnx.ModelProto) -> onnx.ModelProto:
    """The float model with the QDQ file's weights: weight DequantizeLinear folded to float32
    initializers under the weights' names (exactly what DequantizeLinear computes), activation
    Q/DQ pairs removed."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    inits = {t.name for t in graph.initializer}
    nodes = list(graph.node)
    rename: Dict[str, str] = {}
    new_inits = []
    drop = set()
    for k, n in _weight_dqs(out):
        new_inits.append(numpy_helper.from_array(_dequantize(out, n), n.output[0]))
        drop.add(k)
    for k, n in enumerate(nodes):
        if n.op_type == "QuantizeLinear" and n.input[0] not in inits:
            for m, d in enumerate(nodes):
                if d.op_type == "DequantizeLinear" and d.input[0] == n.output[0]:
                    rename[d.output[0]] = n.input[0]
                    drop.add(m)
            drop.add(k)
    kept = [n for k, n in enumerate(nodes) if k not in drop]
    for n in kept:
        for i, name in enumerate(n.input):
            while name in rename:
                name = rename[name]
            n.input[i] = name
    for o in graph.output:
        while o.name in rename:
            o.name = rename[o.name]
    del graph.node[:]
    graph.node.extend(kept)
    read = {i for n in kept for i in n.input} | {o.name for o in graph.output}
    read |= set().union(*(subgraph_reads(n) for n in kept))  # If/Loop bodies read outer weights by name
    keep = [t for t in graph.initializer if t.name in read]
    del graph.initializer[:]
    graph.initializer.extend(keep + [t for t in new_inits if t.name in read])
    props = [p for p in out.metadata_props if p.key != METADATA_KEY]
    del out.metadata_props[:]
    out.metadata_props.extend(props)
    return out


class Qdq(Format):
    name = "qdq"
    summary = "int8 weights (trained levels kept exactly) and calibrated int8 activations, QDQ form"
    limits = __doc__.split("Limits: ", 1)[1].strip()
    options = ("calibration", "specs", "activations", "max_samples")
    #: Lossy: outputs are compared with the float model by accuracy, not bit for bit.
    exact = False

    def encode(self, model: onnx.ModelProto, calibration=None, specs=None, activations: str = "uint8",
               max_samples: int = 1000, **options):
        return quantize_qdq(model, calibration, specs, activations, max_samples)

    def detect(self, model: onnx.ModelProto) -> bool:
        return any(p.key == METADATA_KEY for p in model.metadata_props)

    def decode(self, model: onnx.ModelProto) -> onnx.ModelProto:
        return decode_qdq(model)

    def stored(self, model: onnx.ModelProto):
        """The int8 weights (ndim >= 2) with the bits of their trained levels, for ``inspect``."""
        from .base import StoredWeight

        facts = next((json.loads(p.value) for p in model.metadata_props if p.key == METADATA_KEY), {})
        levels = facts.get("levels", {})
        inits = {t.name: t for t in model.graph.initializer}
        out = {}
        for _, n in _weight_dqs(model):
            q = inits[n.input[0]]
            if len(q.dims) < 2:
                continue
            name = n.output[0]
            owned = {i for i in n.input if i in inits}
            size = sum(numpy_helper.to_array(inits[i]).nbytes for i in owned)
            storage = f"qdq-int8 ({levels[name]}-bit levels)" if name in levels else "qdq-int8"
            out[name] = StoredWeight(name, _dequantize(model, n), storage, int(size), 8, anchor=n.input[0],
                                     tensors=owned)
        return out

    def decode_nodes(self, model: onnx.ModelProto):
        return {k for k, _ in _weight_dqs(model)}


QDQ = register(Qdq())
