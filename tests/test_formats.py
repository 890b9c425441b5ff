"""The export format registry (admm_onnx.formats) and the packed low-bit format.

Runs in the training environment (onnxruntime-training 1.19); tests/test_deploy.py checks the
same files in the newest plain onnxruntime.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from admm_onnx import formats
from admm_onnx.cli.sparse_commands import export_cmd, inspect_cmd
from admm_onnx.errors import ConfigError, ModelError
from admm_onnx.formats import packed
from admm_onnx.quantization import QuantSpec, read_quantization
from test_deploy import mlp, quantized


def run(model, x):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(
        None, {"input": x})


def inits(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.fixture(scope="module")
def small():
    return mlp(sizes=(32, 64, 48, 5), keep=0.2)


@pytest.fixture(scope="module")
def small_q(small):
    return quantized(small)


X = np.random.default_rng(3).standard_normal((3, 32)).astype(np.float32)


def test_registry_lists_every_format_with_docs():
    assert list(formats.names())[:4] == ["dense", "csr", "coo", "packed"]
    for fmt in formats.REGISTRY.values():
        assert fmt.summary and fmt.limits, fmt.name
    with pytest.raises(ConfigError, match="choose one of"):
        formats.get("nope")
    with pytest.raises(ValueError):
        formats.register(type(formats.get("csr"))())  # a second object under a taken name


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_bits_round_trip(bits):
    rng = np.random.default_rng(bits)
    v = rng.integers(0, 1 << bits, 1001)
    data = packed.pack_bits(v, bits)
    assert data.dtype == np.uint8 and data.size == -(-1001 * bits // 8)
    assert np.array_equal(packed.unpack_bits(data, bits, 1001), v)
    with pytest.raises(ValueError):
        packed.pack_bits([1 << bits], bits)


def test_version_1_gaps_decode_to_positions():
    # version 1 stored gaps g with pos[i] = pos[i-1] + 1 + g[i] (pos[-1] = -1); fillers (value 0) bridged long gaps
    assert np.array_equal(packed.positions_of(np.array([0, 0, 38, 0, 15, 242])), [0, 1, 40, 41, 57, 300])


@pytest.mark.parametrize("kind,names", [("raw", "short"), ("levels", "short"), ("levels", "keep")])
def test_packed_is_exact_and_folded_in_ort(small, small_q, kind, names, tmp_path):
    model = small if kind == "raw" else small_q
    out, report = formats.export(model, "packed", names=names)
    onnx.checker.check_model(out, full_check=True)
    dec = formats.densify(out)
    if names == "keep":
        assert inits(dec).keys() == inits(model).keys()
        assert [n.output[0] for n in dec.graph.node] == [n.output[0] for n in model.graph.node]
    else:  # the encoded weights keep their names, the others get short ones, in the same order
        enc = set(report.encoded)
        assert [n for n in inits(dec) if n in enc] == [n for n in inits(model) if n in enc]
        assert all(len(n) == 1 for n in inits(dec) if n not in enc)
        assert all(len(n.output[0]) == 1 for n in dec.graph.node[:-1])  # internal activations
        assert dec.graph.output[0].name == model.graph.output[0].name
    for (name, arr), (dname, darr) in zip(inits(model).items(), inits(dec).items()):
        assert np.array_equal(darr, arr), name
    for a, b in zip(run(out, X), run(model, X)):
        assert a.tobytes() == b.tobytes()
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(out.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    ops = {n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node}
    assert ops <= {"Gemm", "FusedGemm", "Relu"}, ops
    if kind == "levels":
        assert read_quantization(dec) == read_quantization(model)  # specs restored on densify
        bits = {r.name: r.bits for r in report.rows}
        assert bits == {n: s.bits for n, s in read_quantization(model).items()}
        assert report.total_stored_bytes * 8 < report.total_dense_bytes  # < 4 bits per entry


def test_packed_levels_much_smaller_than_csr(small_q):
    _, csr = formats.export(small_q, "csr", min_sparsity=0.5)
    _, pk = formats.export(small_q, "packed")
    weight_rows = lambda rep: sum(r.stored_bytes for r in rep.rows if r.name.endswith("weight"))  # noqa: E731
    assert weight_rows(pk) * 3 < weight_rows(csr)  # 2-4 bit values + ~3 bit gaps vs fp32 + uint8/16 indices


def test_packed_errors(small, small_q):
    bad = {"fc0.weight": QuantSpec(4, (0.123,), None)}
    with pytest.raises(ModelError, match="not on the 4-bit levels"):
        formats.export(small, "packed", quantization=bad)
    with pytest.raises(ConfigError, match="does not have"):
        formats.export(small, "packed", quantization={"nope": QuantSpec(4, (1.0,), None)})
    with pytest.raises(ConfigError, match="no option"):
        formats.export(small, "packed", bits=4)
    with pytest.raises(ConfigError, match="values must be one of"):
        formats.export(small, "packed", values="fp8")
    with pytest.raises(ConfigError, match="names must be one of"):
        formats.export(small, "packed", names="tiny")
    old = onnx.ModelProto()
    old.CopyFrom(small)
    old.opset_import[0].version = 10
    with pytest.raises(ModelError, match="opset >= 11"):
        formats.export(old, "packed")
    out, _ = formats.export(small_q, "packed")
    with pytest.raises(ModelError, match="already"):
        formats.export(out, "csr")


def test_packed_all_zero_weight_and_opset_11(small):
    model = onnx.ModelProto()
    model.CopyFrom(small)
    model.opset_import[0].version = 11
    t = model.graph.initializer[2]
    t.CopyFrom(numpy_helper.from_array(np.zeros(tuple(t.dims), np.float32), t.name))
    out, _ = formats.export(model, "packed")
    for a, b in zip(run(out, X), run(model, X)):
        assert a.tobytes() == b.tobytes()


def test_inspect_and_export_cli_show_bits(small_q, tmp_path):
    src = tmp_path / "q.onnx"
    onnx.save(small_q, src)
    res = CliRunner().invoke(export_cmd, [str(src), "-o", str(tmp_path / "q.packed.onnx"), "--format", "packed"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(inspect_cmd, [str(tmp_path / "q.packed.onnx"), "--json"])
    import json

    doc = json.loads(res.output)
    rows = {r["name"]: r for r in doc["layers"]}
    specs = read_quantization(small_q)
    for name, spec in specs.items():
        assert rows[name]["bits"] == spec.bits and rows[name]["storage"].startswith(f"packed-{spec.bits}bit")
        assert rows[name]["nonzero"] == int(np.count_nonzero(inits(small_q)[name]))
    assert doc["total"]["stored_bytes"] == sum(r["stored_bytes"] for r in doc["layers"])
    res = CliRunner().invoke(export_cmd, [str(src), "-o", str(tmp_path / "x.onnx"), "--quantization", str(src)])
    assert res.exit_code != 0 and "packed option" in str(res.exception)
