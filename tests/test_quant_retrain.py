"""Quantized retraining: fake quantization with a straight-through gradient, exact levels at the end."""
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from admm_onnx.config import PruneConfig, Rule
from admm_onnx.graph.fake_quant import FRACTION_BITS, insert_fake_quant, quantize_like_graph, scale_array, scale_name
from admm_onnx.graph.masks import insert_masks
from admm_onnx.pipeline import make_readers, prepare_model, prune
from admm_onnx.quantization import QuantSpec, fit_levels, max_level, model_quantization, read_quantization, to_integers
from admm_onnx.report import LayerRow, layer_table


def _matmul_model(w):
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", w.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", w.shape[1]])],
        [numpy_helper.from_array(w, "W")],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("masked", [False, True])
def test_fake_quant_forward_is_quantized_and_gradient_straight_through(tmp_path, masked):
    from admm_onnx._ort import api, artifacts, onnxblock

    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 3)).astype(np.float32)
    mask = rng.random((6, 3)) > 0.4 if masked else None
    model = _matmul_model(w)
    frozen = []
    if masked:
        frozen += list(insert_masks(model, {"W": mask.astype(np.float32)}).values())
    bits, axis = 3, 1  # a scale per output column
    q, s = fit_levels(w, bits, axis, mask)
    frozen += list(insert_fake_quant(model, {"W": (max_level(bits), scale_array(s, w.shape, axis))}).values())
    assert frozen[-1] == scale_name("W")

    class Loss(onnxblock.Block):
        def __init__(self):
            super().__init__()
            self.l = onnxblock.loss.MSELoss()

        def build(self, out):
            return self.l(out, "target")

    artifacts.generate_artifacts(model, requires_grad=["W"], frozen_params=frozen, loss=Loss(),
                                 optimizer=artifacts.OptimType.SGD, artifact_directory=str(tmp_path))
    state = api.CheckpointState.load_checkpoint(str(tmp_path / "checkpoint"))
    module = api.Module(str(tmp_path / "training_model.onnx"), state, str(tmp_path / "eval_model.onnx"))
    module.train()
    x = rng.standard_normal((5, 6)).astype(np.float32)
    t = rng.standard_normal((5, 3)).astype(np.float32)
    loss = module(x, t)
    wm = w if mask is None else np.where(mask, w, 0).astype(np.float32)
    _, wq = quantize_like_graph(wm, scale_array(s, w.shape, axis), max_level(bits))
    np.testing.assert_array_equal(wq, (q * s[None, :]).astype(np.float32))  # the fitted levels, exactly
    y = x.astype(np.float64) @ wq
    assert loss == pytest.approx(np.mean((y - t) ** 2), rel=1e-5)
    grad_eff = 2 * x.T.astype(np.float64) @ (y - t) / y.size
    expected = grad_eff if mask is None else grad_eff * mask  # d(W*M)/dW = M, then straight through
    np.testing.assert_allclose(state.parameters["W"].grad, expected, rtol=1e-4, atol=1e-6)


def test_quantize_like_graph_is_idempotent_and_reads_back():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((8, 5, 3, 3)).astype(np.float32)
    for bits in (2, 3, 4, 8):
        q, s = fit_levels(w, bits, 0)
        sa = scale_array(s, w.shape, 0)
        q1, w1 = quantize_like_graph(w * 1.3, sa, max_level(bits))
        q2, w2 = quantize_like_graph(w1, sa, max_level(bits))
        np.testing.assert_array_equal(q1, q2)
        np.testing.assert_array_equal(w1, w2)
        np.testing.assert_array_equal(to_integers(w1, QuantSpec(bits, tuple(map(float, s)), 0)), q1)
    assert FRACTION_BITS >= 16


def test_layer_table_shows_bits_only_when_quantized():
    rows = [LayerRow("a", 10, 5, 0.5, bits=3), LayerRow("b", 10, 10, reason="excluded by the config")]
    table = layer_table(rows)
    lines = table.splitlines()
    assert lines[0].split("|")[-2].strip() == "Bits"
    assert lines[2].split("|")[-2].strip() == "3" and lines[3].split("|")[-2].strip() == "32"
    assert "Bits" not in layer_table([LayerRow("a", 10, 5, 0.5)])
    assert LayerRow.from_dict(rows[0].to_dict()).bits == 3


def test_pruned_and_quantized_weights_are_retrained_on_their_levels(lenet5_small, data, tmp_path):
    """A tiny LeNet-5 pruned + quantized end to end: every written quantized weight takes only
    the levels of its reported scale (to_integers round trip), the pruned entries are zero, and
    the quantized weights were retrained (their integers moved since the hard step)."""
    rules = (Rule(sparsity=0.6, bits=3, op_types=("Conv",)), Rule(sparsity=0.8, bits=4, names=("fc*",), quant_scale="tensor"))
    config = PruneConfig(rules=rules, admm_iters=2, epochs_per_iter=1, retrain_epochs=3, batch_size=32, lr=3e-3)
    prepared = prepare_model(lenet5_small)
    tr, ev, _ = make_readers(prepared, data, config.batch_size, config.seed)
    work = tmp_path / "work"
    out = tmp_path / "pq.onnx"
    report = prune(prepared, out, tr, config, ev, workdir=work, keep_workdir=True)
    written = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}
    specs = read_quantization(json.loads(json.dumps(report.to_dict(), default=float)))
    assert set(specs) == {"conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"}
    with np.load(work / "pruned.npz") as z:
        hard = {k[2:]: z[k] for k in z.files if k.startswith("w/")}
        support = {k[2:]: z[k].astype(bool) for k in z.files if k.startswith("m/")}
    for name, spec in specs.items():
        w = written[name]
        q = to_integers(w, spec)  # raises unless exactly float32(q) * scale
        assert np.abs(q).max() <= max_level(spec.bits)
        assert (spec.axis == 0) == name.startswith("conv")
        assert not np.any(w[~support[name]])  # pruned entries stay exactly zero
        assert (w == 0).mean() >= (0.6 if name.startswith("conv") else 0.8) - 1e-9
    # Retrained, not frozen: the hard step's weights were on levels too, and training moved them.
    assert sum(not np.array_equal(written[n], hard[n]) for n in specs) >= 3
    rows = {r.name: r for r in report.layers}
    assert rows["conv1.weight"].bits == 3 and rows["fc1.weight"].bits == 4
    assert "Bits" in report.table()
    assert report.max_output_diff < 1e-3
    # The written file carries the specs itself (exports and inspect read them from there).
    model = onnx.load(str(out))
    assert read_quantization(model) == specs and model_quantization(model) == specs
    i = [t.name for t in model.graph.initializer].index("conv1.weight")  # moved off its levels: not reported
    moved_off = numpy_helper.to_array(model.graph.initializer[i]) * np.float32(1.1) + np.float32(1e-3)
    model.graph.initializer[i].CopyFrom(numpy_helper.from_array(moved_off, "conv1.weight"))
    assert set(model_quantization(model)) == set(specs) - {"conv1.weight"}


def test_quantized_weights_hold_no_negative_zero():
    """rint(-0.3) is -0.0: the level 0 must be +0.0, as float32(0) * scale is (sparse formats
    store zeros by position and give +0.0 back)."""
    from admm_onnx.graph.fake_quant import quantize_like_graph

    q, w = quantize_like_graph(np.array([-0.3, 0.3, -2.0], np.float32), np.float32(1.0), 7)
    assert q.tolist() == [0, 0, -2] and not np.signbit(w[0])
