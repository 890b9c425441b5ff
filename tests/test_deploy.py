"""Every registered export format in the deployment runtime (plain onnxruntime, newest release).

For each format: the exported file loads in onnxruntime, its outputs equal bit for bit those of
the same weights stored dense (``fmt.decode`` of the file), the decode subgraph is gone from the
graph onnxruntime runs (folded at session creation) and batch-1 latency is within 5% of dense
(interleaved in one process, median of paired ratios, repeated when the machine is loaded).
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from admm_onnx import formats

#: Op types of the graph a dense MLP runs after onnxruntime's optimizations (with fusions).
MODEL_OPS = {"Gemm", "FusedGemm", "MatMul", "FusedMatMul", "Relu", "Add", "Flatten"}
#: Allowed batch-1 slowdown against dense.
TOLERANCE = 1.05


def mlp(sizes=(256, 768, 768, 10), keep=0.1, seed=0, opset=17) -> onnx.ModelProto:
    """An MLP of Gemm + Relu with magnitude-pruned weights (``keep`` of each kept nonzero), big
    enough that batch 1 takes a few hundred microseconds."""
    rng = np.random.default_rng(seed)
    inits, nodes = [], []
    x = "input"
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        w = (rng.standard_normal((b, a)) / np.sqrt(a)).astype(np.float32)
        cut = np.quantile(np.abs(w), 1 - keep)
        w[np.abs(w) < cut] = 0
        bias = (0.1 * rng.standard_normal(b)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"fc{i}.weight"), numpy_helper.from_array(bias, f"fc{i}.bias")]
        y = f"h{i}" if i < len(sizes) - 2 else "output"
        nodes.append(helper.make_node("Gemm", [x, f"fc{i}.weight", f"fc{i}.bias"], [f"g{i}" if y != "output" else y],
                                      transB=1))
        if y != "output":
            nodes.append(helper.make_node("Relu", [f"g{i}"], [y]))
        x = y
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", sizes[0]])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", sizes[-1]])], initializer=inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def quantized(model: onnx.ModelProto, bits=(2, 3, 4, 8)) -> onnx.ModelProto:
    """``model`` with every initializer moved onto k-bit levels (pruned zeros kept), bit widths
    and per-channel / per-tensor scales cycling, the specs recorded as ``prune --bits`` does."""
    from admm_onnx.quantization import QuantSpec, dequantize, fit_levels, mark_model

    out = onnx.ModelProto()
    out.CopyFrom(model)
    specs = {}
    for i, t in enumerate(out.graph.initializer):
        a = numpy_helper.to_array(t)
        k, axis = bits[i % len(bits)], (0 if i % 2 == 0 else None)
        q, scale = fit_levels(a, k, axis, (a != 0) if a.ndim >= 2 else None)
        t.CopyFrom(numpy_helper.from_array(dequantize(q, scale, axis), t.name))
        specs[t.name] = QuantSpec(k, tuple(float(x) for x in scale), axis)
    mark_model(out, specs)
    return out


MODELS = {"pruned": lambda: mlp(), "quantized": lambda: quantized(mlp()), "opset13": lambda: mlp(opset=13)}
_cache: dict = {}


def get_model(kind: str) -> onnx.ModelProto:
    if kind not in _cache:
        _cache[kind] = MODELS[kind]()
    return _cache[kind]


@pytest.fixture(scope="module")
def feeds():
    return {"input": np.random.default_rng(1).standard_normal((8, 256)).astype(np.float32)}


def _exported(model, name):
    fmt = formats.get(name)
    out, _ = fmt.encode(model)
    return fmt, out


def _ops(path) -> set:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


#: Formats known not to meet the bar yet, with the reason (strict: an unexpected pass fails).
KNOWN_BAD: dict = {}
#: (format, model) pairs: every format on a pruned fp32 model; packed also with k-bit levels;
#: csr also below opset 16 (another decode: empty rows padded).
CASES = [(n, "pruned") for n in formats.names() if formats.get(n).exact] + [("packed", "quantized"), ("csr", "opset13")]  # lossy qdq: tests/test_qdq.py
FORMATS = [pytest.param(n, k, id=f"{n}-{k}",
                        marks=[pytest.mark.xfail(reason=KNOWN_BAD[n], strict=True)] if n in KNOWN_BAD else [])
           for n, k in CASES]


@pytest.mark.parametrize("name,kind", FORMATS)
def test_bit_exact_and_folded(deploy_env, feeds, name, kind, tmp_path):
    model = get_model(kind)
    fmt, out = _exported(model, name)
    decoded = fmt.decode(out)
    res = deploy_env.run({"file": out, "decoded": decoded, "dense": model}, feeds, optimized=True, workdir=tmp_path)
    for a, b in zip(res.outputs["file"], res.outputs["decoded"]):
        assert a.dtype == b.dtype and np.array_equal(a, b), f"{name}: outputs differ from the decoded dense model"
    # lossless formats: the decoded model is the input model
    for a, b in zip(res.outputs["decoded"], res.outputs["dense"]):
        assert np.array_equal(a, b)
    left = _ops(res.optimized["file"]) - _ops(res.optimized["dense"])
    assert not left, f"{name}: decode ops left in the graph onnxruntime {res.onnxruntime} runs: {sorted(left)}"


@pytest.mark.parametrize("name,kind", [p for p in FORMATS if p.values[1] != "opset13"])
def test_batch1_latency_as_dense(deploy_env, feeds, name, kind):
    model = get_model(kind)
    fmt, out = _exported(model, name)
    ratios = []
    for attempt in range(4):  # the machine is shared: retry before calling a slowdown real
        res = deploy_env.run({"file": out, "dense": model}, feeds, runs=300, warmup=30)
        ratios.append(res.ratio("file", "dense"))
        if ratios[-1] <= TOLERANCE:
            break
    assert min(ratios) <= TOLERANCE, (
        f"{name}: batch-1 time / dense = {', '.join(f'{r:.3f}' for r in ratios)} in onnxruntime {res.onnxruntime} "
        f"(dense median {res.median('dense') * 1e6:.0f} us)"
    )


def test_harness_reports_a_model_the_runtime_refuses(deploy_env, tmp_path):
    from deploy_env import DeployEnvError

    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx file")
    with pytest.raises(DeployEnvError, match="failed"):
        deploy_env.run({"bad": bad}, {"input": np.zeros((1, 256), np.float32)})
    major, minor = (int(x) for x in deploy_env.version.split(".")[:2])
    assert (major, minor) >= (1, 27), f"the deployment runtime should be a recent onnxruntime, got {deploy_env.version}"
