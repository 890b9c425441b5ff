"""Sparse deployment export (admm_onnx.sparse) and its CLI commands."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from admm_onnx import io, sparse
from admm_onnx.cli.sparse_commands import densify_cmd, export_cmd, inspect_cmd
from admm_onnx.errors import AdmmOnnxError, ConfigError, ModelError, OutputError
from admm_onnx.models import build
from admm_onnx.projection import project

#: Sparsity per weight: the paper's LeNet-5 keep ratios (20%, 8%, 0.9%, 7%).
PAPER = {"conv1.weight": 0.80, "conv2.weight": 0.92, "fc1.weight": 0.991, "fc2.weight": 0.93}
#: Op types only the decode uses; none may survive ORT's constant folding.
DECODE_OPS = {"CsrDecode", "ScatterElements", "CumSum", "Compress", "Range", "ConstantOfShape",
              "ReduceProd", "Greater", "Cast", "Slice", "Concat", "Shape", "Div", "Sub", "Add", "Reshape"}


def pruned_lenet(sparsities=PAPER, opset=None, ir=None) -> onnx.ModelProto:
    """LeNet-5 with weights magnitude-pruned; fc1 also gets empty first/middle/last rows."""
    model = build("lenet5")
    for tensor in model.graph.initializer:
        if tensor.name in sparsities:
            w = project(numpy_helper.to_array(tensor), sparsities[tensor.name])
            if tensor.name == "fc1.weight":
                w[[0, 1, 250, 499]] = 0
            tensor.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(w), tensor.name))
    if opset is not None:
        model.opset_import[0].version = opset
    if ir is not None:
        model.ir_version = ir
    return model


@pytest.fixture(scope="module")
def dense():
    return pruned_lenet()


@pytest.fixture(scope="module")
def feeds():
    return {"input": np.random.default_rng(0).standard_normal((4, 1, 28, 28)).astype(np.float32)}


def run_ort(model, feeds, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL, dump=None, prepack=True):
    opts = ort.SessionOptions()
    opts.graph_optimization_level = level
    opts.log_severity_level = 3
    if not prepack:
        opts.add_session_config_entry("session.disable_prepacking", "1")
    if dump is not None:
        opts.optimized_model_filepath = str(dump)
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"]).run(None, feeds)


def weights(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


# ------------------------------------------------------------------------------------------
# Export: validity and exact outputs
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["csr", "coo"])
def test_export_is_valid_and_bit_exact_in_ort(dense, feeds, fmt):
    before = dense.SerializeToString()
    out, report = sparse.export_sparse(dense, fmt)
    assert dense.SerializeToString() == before  # input untouched
    # onnx shape inference types sparse initializers as sparse tensors, which Conv rejects:
    # the full check applies to csr only.
    onnx.checker.check_model(out, full_check=(fmt == "csr"))
    assert sorted(report.encoded) == sorted(PAPER)
    for level in (ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        for a, b in zip(run_ort(dense, feeds, level), run_ort(out, feeds, level)):
            assert a.tobytes() == b.tobytes()
    # No optimisation at all: the decode runs per call; with pre-packing off, still exact.
    level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    for a, b in zip(run_ort(dense, feeds, level, prepack=False), run_ort(out, feeds, level, prepack=False)):
        assert a.tobytes() == b.tobytes()


def test_csr_runs_in_reference_evaluator(dense, feeds):
    out, _ = sparse.export_sparse(dense, "csr")
    got = ReferenceEvaluator(out).run(None, feeds)
    want = ReferenceEvaluator(dense).run(None, feeds)
    for a, b in zip(got, want):
        assert a.tobytes() == b.tobytes()
    np.testing.assert_allclose(got[0], run_ort(dense, feeds)[0], rtol=1e-4, atol=1e-5)


def test_csr_layout(dense):
    out, report = sparse.export_sparse(dense, "csr")
    inits = weights(out)
    assert "fc1.weight" not in inits
    assert inits["fc1.weight.csr_indices"].dtype == np.uint16  # 800 columns
    assert inits["conv1.weight.csr_indices"].dtype == np.uint8  # 25 columns
    assert inits["conv1.weight.csr_indptr"].dtype == np.uint8  # 100 nonzeros
    assert inits["fc1.weight.csr_indptr"].dtype == np.uint16  # ~3,500 nonzeros
    assert inits["fc1.weight.csr_values"].dtype == np.float32
    # Nothing dense-sized is stored: zeros come from ConstantOfShape.
    nnz = np.count_nonzero(weights(dense)["fc1.weight"])
    assert max(a.size for n, a in inits.items() if n.endswith(".weight.csr_values")) == nnz
    assert out.opset_import[0].version == dense.opset_import[0].version
    assert any(o.domain == sparse.DOMAIN for o in out.opset_import)
    assert json.loads(dict((p.key, p.value) for p in out.metadata_props)[sparse.METADATA_KEY])["format"] == "csr"
    # Untouched graph: the original nodes follow the decode calls unchanged.
    n = len(PAPER)
    assert [x.SerializeToString() for x in out.graph.node[n:]] == [x.SerializeToString() for x in dense.graph.node]
    assert report.ratio > 40
    assert report.model_bytes_after * 35 < report.model_bytes_before


def test_ort_constant_folds_the_decode(dense, feeds, tmp_path):
    out, _ = sparse.export_sparse(dense, "csr")
    dump = tmp_path / "optimized.onnx"
    run_ort(out, feeds, ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, dump=dump)
    optimized = onnx.load(str(dump))
    ops = {n.op_type for n in optimized.graph.node}
    assert not ops & DECODE_OPS, ops
    assert not any(n.domain == sparse.DOMAIN for n in optimized.graph.node)
    folded = {t.name: numpy_helper.to_array(t) for t in optimized.graph.initializer}
    for name in PAPER:
        assert name in folded or any(k.startswith(name) for k in folded)


@pytest.mark.parametrize("opset,ir", [(11, 6), (13, 7), (18, 8), (21, 10)])
def test_csr_across_opsets(feeds, opset, ir):
    model = pruned_lenet(opset=opset, ir=ir)
    onnx.checker.check_model(model)
    out, _ = sparse.export_sparse(model, "csr")
    onnx.checker.check_model(out, full_check=True)
    assert out.opset_import[0].version == opset
    assert out.ir_version == max(ir, 8)
    assert run_ort(out, feeds)[0].tobytes() == run_ort(model, feeds)[0].tobytes()
    back = sparse.densify(out)
    assert back.SerializeToString() == model.SerializeToString()


def test_fp16_values_close(dense, feeds):
    out32, rep32 = sparse.export_sparse(dense, "csr")
    out16, rep16 = sparse.export_sparse(dense, "csr", values="fp16")
    onnx.checker.check_model(out16, full_check=True)
    assert weights(out16)["fc1.weight.csr_values"].dtype == np.float16
    assert {r.storage for r in rep16.rows} == {"csr-fp16"}
    assert rep16.total_stored_bytes < rep32.total_stored_bytes
    change = sparse.max_output_change(dense, out16, feeds)
    scale = float(np.abs(run_ort(dense, feeds)[0]).max())
    assert 0 < change < 1e-3 * max(scale, 1.0)
    assert sparse.max_output_change(dense, out32, feeds) == 0.0
    # densify gives the fp16-rounded weights the decode computes, in the original dtype
    back = weights(sparse.densify(out16))
    orig = weights(dense)
    assert back["fc1.weight"].dtype == np.float32
    np.testing.assert_array_equal(back["fc1.weight"], orig["fc1.weight"].astype(np.float16).astype(np.float32))
    assert ReferenceEvaluator(out16).run(None, feeds)[0].shape == (4, 10)


# ------------------------------------------------------------------------------------------
# densify, inspect, csr_weights
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["csr", "coo"])
def test_densify_round_trip(dense, fmt):
    out, _ = sparse.export_sparse(dense, fmt)
    back = sparse.densify(out)
    onnx.checker.check_model(back, full_check=True)
    assert [t.name for t in back.graph.initializer] == [t.name for t in dense.graph.initializer]
    for a, b in zip(back.graph.initializer, dense.graph.initializer):
        assert a.data_type == b.data_type and list(a.dims) == list(b.dims)
        assert numpy_helper.to_array(a).tobytes() == numpy_helper.to_array(b).tobytes()
    assert back.SerializeToString() == dense.SerializeToString()


def test_inspect_dense_csr_coo_agree(dense):
    csr, _ = sparse.export_sparse(dense, "csr")
    coo, _ = sparse.export_sparse(dense, "coo")
    tables = {k: sparse.inspect_model(m) for k, m in (("dense", dense), ("csr", csr), ("coo", coo))}
    for kind, table in tables.items():
        assert [r.name for r in table] == list(PAPER)
        assert [r.op for r in table] == ["Conv", "Conv", "Gemm", "Gemm"]
        assert table.totals.weights == 430_500
        assert table.totals.nonzero == tables["dense"].totals.nonzero
    assert {r.storage for r in tables["dense"]} == {"dense"}
    assert {r.storage for r in tables["csr"]} == {"csr-fp32"}
    assert {r.storage for r in tables["coo"]} == {"coo"}
    assert tables["dense"].totals.stored_bytes == 430_500 * 4
    assert tables["csr"].totals.stored_bytes < tables["coo"].totals.stored_bytes < 430_500 * 4
    rows = tables["dense"]
    assert [round(r.kept_percent, 1) for r in rows] == [20.0, 8.0, 0.9, 7.0]
    json.dumps(tables["csr"].to_dict())


@pytest.mark.parametrize("fmt", ["csr", "coo"])
def test_csr_weights(dense, fmt):
    out, _ = sparse.export_sparse(dense, fmt)
    mats = sparse.csr_weights(out)
    orig = weights(dense)
    assert sorted(mats) == sorted(PAPER)
    for name, mat in mats.items():
        w = orig[name]
        assert mat.shape == (w.shape[0], w.size // w.shape[0])
        assert mat.nnz == np.count_nonzero(w)
        np.testing.assert_array_equal(mat.toarray().reshape(w.shape), w)
    assert sparse.csr_weights(dense) == {}


def test_min_sparsity_leaves_denser_weights_dense(dense, feeds):
    out, report = sparse.export_sparse(dense, "csr", min_sparsity=0.95)
    assert sorted(report.encoded) == ["fc1.weight"]
    assert set(report.skipped) == {"conv1.weight", "conv2.weight", "fc2.weight"}
    assert "conv1.weight" in weights(out)
    assert run_ort(out, feeds)[0].tobytes() == run_ort(dense, feeds)[0].tobytes()
    assert sparse.densify(out).SerializeToString() == dense.SerializeToString()


def identity_model(w: np.ndarray, opset=17) -> onnx.ModelProto:
    """Y = Identity(W): exposes the decoded weight as the model output."""
    etype = helper.np_dtype_to_tensor_dtype(w.dtype)
    graph = helper.make_graph(
        [helper.make_node("Identity", ["W"], ["Y"])], "g", [],
        [helper.make_tensor_value_info("Y", etype, list(w.shape))], [numpy_helper.from_array(w, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
def test_decode_exact_for_float_types_and_odd_shapes(dtype):
    rng = np.random.default_rng(3)
    w = rng.standard_normal((7, 3, 1, 300)).astype(dtype)  # 900 columns: uint16 indices
    w[np.abs(w) < 1.2] = 0
    w[[0, 3, 6]] = 0  # empty first, middle, last rows
    w[1, 0, 0, 5] = np.inf
    w[2, 1, 0, 7] = np.nan
    model = identity_model(w)
    for fmt in ("csr", "coo"):
        out, _ = sparse.export_sparse(model, fmt)
        onnx.checker.check_model(out)
        for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
            assert run_ort(out, {}, level)[0].tobytes() == w.tobytes()
        if fmt == "csr":
            assert ReferenceEvaluator(out).run(None, {})[0].tobytes() == w.tobytes()
        assert sparse.densify(out).SerializeToString() == model.SerializeToString()


def test_all_zero_weight_and_negative_zero():
    w = np.zeros((4, 5), np.float32)
    w[1, 2] = -0.0
    out, report = sparse.export_sparse(identity_model(w), "csr")
    assert report.rows[0].nonzero == 0
    got = run_ort(out, {})[0]
    assert got.tobytes() == np.zeros_like(w).tobytes()  # -0.0 counts as zero, decodes as +0.0
    assert ReferenceEvaluator(out).run(None, {})[0].tobytes() == got.tobytes()


def test_external_data_round_trip(dense, feeds, tmp_path):
    out, _ = sparse.export_sparse(dense, "csr")
    path = tmp_path / "sparse.onnx"
    io.save_model(out, path, external_data=True)
    assert (tmp_path / "sparse.onnx.data").exists()
    assert io.uses_external_data(io.load_model(path, load_external_data=False))
    assert run_ort(path, feeds)[0].tobytes() == run_ort(dense, feeds)[0].tobytes()
    back = sparse.densify(io.load_model(path))
    for a, b in zip(back.graph.initializer, dense.graph.initializer):
        assert a.name == b.name and numpy_helper.to_array(a).tobytes() == numpy_helper.to_array(b).tobytes()


# ------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------


def test_bad_arguments(dense):
    with pytest.raises(ConfigError, match="unknown sparse format"):
        sparse.export_sparse(dense, "bsr")
    with pytest.raises(ConfigError, match="unknown value type"):
        sparse.export_sparse(dense, values="int8")
    with pytest.raises(ConfigError, match="fp16 needs --format csr"):
        sparse.export_sparse(dense, "coo", values="fp16")
    for bad in (1.5, -0.1, "x"):
        with pytest.raises(ConfigError, match="min_sparsity"):
            sparse.export_sparse(dense, min_sparsity=bad)
    with pytest.raises(ModelError, match="ModelProto"):
        sparse.export_sparse(b"not a model")


def test_bad_models(dense):
    with pytest.raises(ModelError, match="no sparse weights") as info:
        sparse.export_sparse(build("lenet5"))
    assert "\n" not in info.value.one_line()
    with pytest.raises(ModelError, match="opset >= 11"):
        sparse.export_sparse(pruned_lenet(opset=10, ir=5))
    out, _ = sparse.export_sparse(dense, "csr")
    with pytest.raises(ModelError, match="already has sparse weights"):
        sparse.export_sparse(out)
    with pytest.raises(ModelError, match="no sparse weights to densify"):
        sparse.densify(dense)
    huge = np.zeros((2, 2), np.float32)
    huge[0, 0] = 1e6
    with pytest.raises(ConfigError, match="fp16 range"):
        sparse.export_sparse(identity_model(huge), values="fp16")


def test_a_weight_listed_as_graph_input_is_exported_as_a_constant(dense):
    """Exporters' "keep initializers as inputs": the deployment file makes the weight a constant
    (onnxruntime folds and quantizes only constants) and the input list loses it."""
    model = onnx.ModelProto()
    model.CopyFrom(dense)
    model.graph.input.append(helper.make_tensor_value_info("fc1.weight", TensorProto.FLOAT, [500, 800]))
    out, report = sparse.export_sparse(model, "csr")
    assert "fc1.weight" not in report.skipped and "fc1.weight" not in {i.name for i in out.graph.input}
    assert [i.name for i in model.graph.input][-1] == "fc1.weight"  # the input model is unchanged


# ------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pruned_file(tmp_path_factory, dense):
    path = tmp_path_factory.mktemp("cli") / "pruned.onnx"
    io.save_model(dense, path)
    return path


def invoke(cmd, *args):
    return CliRunner().invoke(cmd, [str(a) for a in args], catch_exceptions=True)


def test_cli_export_inspect_densify(pruned_file, tmp_path, feeds):
    csr = tmp_path / "model.csr.onnx"
    res = invoke(export_cmd, pruned_file, "-o", csr)
    assert res.exit_code == 0, res.output
    assert "csr-fp32" in res.output and "TOTAL" in res.output
    assert csr.stat().st_size * 35 < pruned_file.stat().st_size

    res = invoke(inspect_cmd, csr)
    assert res.exit_code == 0 and "fc1.weight" in res.output and "csr-fp32" in res.output
    res = invoke(inspect_cmd, csr, "--json")
    doc = json.loads(res.output)
    assert doc["total"]["weights"] == 430_500 and doc["file_bytes"] == csr.stat().st_size

    back = tmp_path / "back.onnx"
    res = invoke(densify_cmd, csr, "-o", back)
    assert res.exit_code == 0, res.output
    assert io.load_model(back).SerializeToString() == io.load_model(pruned_file).SerializeToString()

    for extra in (["--format", "coo"], ["--values", "fp16", "--min-sparsity", "0.9"]):
        out = tmp_path / "other.onnx"
        res = invoke(export_cmd, pruned_file, "-o", out, *extra)
        assert res.exit_code == 0, res.output
        np.testing.assert_allclose(run_ort(out, feeds)[0], run_ort(pruned_file, feeds)[0], atol=1e-3)
        if "fp16" in extra:
            reported = float(res.output.split("max |output change| ")[1].split()[0])
            assert 0 < reported < 1e-2  # lossy, and said so


def test_cli_keeps_external_data(dense, tmp_path, feeds):
    src = tmp_path / "ext.onnx"
    io.save_model(dense, src, external_data=True)
    out = tmp_path / "ext.csr.onnx"
    res = invoke(export_cmd, src, "-o", out)
    assert res.exit_code == 0, res.output
    assert (tmp_path / "ext.csr.onnx.data").exists()
    assert run_ort(out, feeds)[0].tobytes() == run_ort(dense, feeds)[0].tobytes()


def test_cli_errors(pruned_file, tmp_path):
    cases = [
        ((export_cmd, pruned_file, "-o", pruned_file), OutputError),
        ((export_cmd, tmp_path / "missing.onnx", "-o", tmp_path / "x.onnx"), ModelError),
        ((export_cmd, pruned_file, "-o", tmp_path / "no" / "x.onnx"), OutputError),
        ((export_cmd, pruned_file, "-o", tmp_path / "x.onnx", "--min-sparsity", "0.999"), ModelError),
        ((export_cmd, pruned_file, "-o", tmp_path / "x.onnx", "--format", "coo", "--values", "fp16"), ConfigError),
        ((densify_cmd, pruned_file, "-o", tmp_path / "x.onnx"), ModelError),
        ((inspect_cmd, tmp_path), ModelError),
    ]
    for args, error in cases:
        res = invoke(*args)
        assert isinstance(res.exception, error), (args, res.exception, res.output)
        assert isinstance(res.exception, AdmmOnnxError)
    assert not (tmp_path / "x.onnx").exists()
    res = invoke(export_cmd, pruned_file, "-o", tmp_path / "x.onnx", "--format", "bsr")
    assert res.exit_code == 2  # click rejects the choice itself
