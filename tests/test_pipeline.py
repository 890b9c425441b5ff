"""End to end: prune() on tiny models built in code and on PyTorch-exported fixtures."""
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from admm_onnx.config import PruneConfig, Rule
from admm_onnx.data import Dataset
from admm_onnx.pipeline import make_readers, prepare_model, prune

FIXTURES = Path(__file__).parent / "fixtures"
FAST = dict(admm_iters=2, epochs_per_iter=1, retrain_epochs=2, batch_size=32, rho=1e-2)


def _run(model_path, data, out, config):
    prepared = prepare_model(model_path, config.output)
    train_reader, eval_reader, _ = make_readers(prepared, data, config.batch_size, config.seed)
    return prune(prepared, out, train_reader, config, eval_reader)


def _weights(path):
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def test_prune_reaches_sparsity_and_keeps_the_graph(lenet5_small, data, tmp_path):
    out = tmp_path / "pruned.onnx"
    config = PruneConfig(**FAST).with_sparsity(0.8)
    report = _run(lenet5_small, data, out, config)
    weights = _weights(out)
    for name in ("conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"):
        w = weights[name]
        assert (w == 0).sum() >= np.ceil(0.8 * w.size), name
    assert report.compression >= 5.0 - 1e-9
    # same graph: nodes, inputs, outputs, opset; only initializer values changed
    before, after = onnx.load(lenet5_small), onnx.load(out)
    assert [n.op_type for n in before.graph.node] == [n.op_type for n in after.graph.node]
    assert [i.name for i in before.graph.input] == [i.name for i in after.graph.input]
    assert [o.name for o in before.graph.output] == [o.name for o in after.graph.output]
    assert before.opset_import == after.opset_import
    onnx.checker.check_model(after, full_check=True)
    # the written model computes what the trained model computed
    assert report.max_output_diff is not None and report.max_output_diff <= 1e-5
    assert report.accuracy_after > 0.5  # 4 learnable classes
    # the input was not modified
    assert before == onnx.load(lenet5_small)


def test_rules_per_layer_exclude_and_no_retraining(lenet5_small, data, tmp_path):
    out = tmp_path / "pruned.onnx"
    config = PruneConfig(
        rules=(Rule(sparsity=0.5), Rule(sparsity=0.95, names=("fc1.weight",)), Rule(op_types=("Conv",), exclude=True)),
        **{**FAST, "retrain_epochs": 0},
    )
    report = _run(lenet5_small, data, out, config)
    weights, original = _weights(out), _weights(lenet5_small)
    assert [r.name for r in report.layers] == ["conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"]
    assert [r.name for r in report.layers if r.pruned] == ["fc1.weight", "fc2.weight"]
    assert {r.name: r.reason for r in report.layers if not r.pruned} == dict.fromkeys(
        ["conv1.weight", "conv2.weight"], "excluded by the config")
    # whole-model totals: the excluded weights count
    assert report.total_weights == sum(w.size for n, w in weights.items() if w.ndim >= 2)
    assert report.total_nonzero == sum(np.count_nonzero(w) for n, w in weights.items() if w.ndim >= 2)
    assert "conv1.weight (not pruned)" in report.table()
    assert (weights["fc1.weight"] == 0).mean() >= 0.95
    assert (weights["fc2.weight"] == 0).mean() >= 0.5
    assert np.count_nonzero(weights["conv1.weight"]) == weights["conv1.weight"].size
    assert not np.array_equal(weights["conv1.weight"], original["conv1.weight"])  # trained, not pruned


def test_same_seed_same_pruned_weights(mlp_small, data, tmp_path):
    config = PruneConfig(**FAST, seed=3).with_sparsity(0.7)
    _run(mlp_small, data, tmp_path / "a.onnx", config)
    _run(mlp_small, data, tmp_path / "b.onnx", config)
    a, b = _weights(tmp_path / "a.onnx"), _weights(tmp_path / "b.onnx")
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])


def test_mse_loss_and_structured_filters(mlp_small, data, tmp_path):
    out = tmp_path / "pruned.onnx"
    config = PruneConfig(rules=(Rule(sparsity=0.5, structure="filter"),), loss="mse", **FAST)
    _run(mlp_small, data, out, config)
    w = _weights(out)["fc1.weight"]  # Gemm transB=1: rows are output neurons
    rows_alive = np.abs(w).sum(axis=1) > 0
    assert rows_alive.sum() <= 150


def test_external_data_in_external_data_out(mlp_small, data, tmp_path):
    src = tmp_path / "ext" / "model.onnx"
    src.parent.mkdir()
    onnx.save(onnx.load(mlp_small), src, save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    out = tmp_path / "out" / "pruned.onnx"
    out.parent.mkdir()
    _run(src, data, out, PruneConfig(**FAST).with_sparsity(0.6))
    assert (out.parent / "pruned.onnx.data").exists()
    m = onnx.load(str(out))
    w = numpy_helper.to_array([t for t in m.graph.initializer if t.name == "fc1.weight"][0])
    assert (w == 0).mean() >= 0.6
    ort.InferenceSession(str(out))


def _random_images(shape, n=160, classes=10, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, *shape)).astype(np.float32)
    y = rng.integers(0, classes, n)
    return Dataset(x[:128], y[:128], x[128:], y[128:])


@pytest.mark.parametrize(
    "fixture", ["torch_legacy_train.onnx", "torch_legacy_eval.onnx", "torch_dynamo_ext/model.onnx"]
)
def test_pytorch_exports_prune_end_to_end(fixture, tmp_path):
    """BatchNorm (training-mode export), residual Add, depthwise conv, dynamo + external data."""
    src = FIXTURES / fixture
    out = tmp_path / "pruned.onnx"
    report = _run(src, _random_images((1, 16, 16)), out, PruneConfig(**{**FAST, "batch_size": 16}).with_sparsity(0.5))
    assert len(report.layers) >= 6  # every conv incl. depthwise and the fc
    m = onnx.load(str(out))
    weights = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    for row in report.layers:
        assert (weights[row.name] == 0).mean() >= 0.5, row.name
    sess = ort.InferenceSession(str(out))
    assert [o.name for o in sess.get_outputs()] == [o.name for o in onnx.load(str(src), load_external_data=False).graph.output]
    assert report.max_output_diff <= 1e-4
    if "dynamo" in fixture:
        assert (tmp_path / "pruned.onnx.data").exists()
