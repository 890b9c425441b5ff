"""The engine end to end: quantization as an ADMM constraint, stopping rule, hard-prune gap."""
import json

import numpy as np
import onnx
from onnx import numpy_helper

from admm_onnx.config import PruneConfig, Rule
from admm_onnx.pipeline import make_readers, prepare_model, prune
from admm_onnx.quantization import max_level, read_quantization

FAST = dict(admm_iters=2, epochs_per_iter=1, retrain_epochs=1, batch_size=32)


def _run(model_path, data, out, config, **kw):
    prepared = prepare_model(model_path, config.output)
    train_reader, eval_reader, _ = make_readers(prepared, data, config.batch_size, config.seed)
    return prune(prepared, out, train_reader, config, eval_reader, **kw)


def _weights(path):
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def test_quantized_and_sparse_weights_take_only_their_levels(lenet5_small, data, tmp_path):
    rules = (Rule(sparsity=0.7, bits=4, op_types=("Conv",)), Rule(bits=2, names=("fc*",), quant_scale="tensor"))
    config = PruneConfig(rules=rules, **FAST)
    out = tmp_path / "q.onnx"
    report = _run(lenet5_small, data, out, config)
    specs = read_quantization(report.to_dict())
    assert set(specs) == set(report.rho) and {"conv1.weight", "conv2.weight", "fc1.weight"} <= set(specs)
    written = _weights(out)
    for name, spec in specs.items():
        w = written[name]
        q = spec.integers(w)  # raises unless every value is float32(q) * scale exactly
        assert np.abs(q).max() <= max_level(spec.bits)
        if name.startswith("conv"):
            assert spec.bits == 4 and spec.axis == 0 and len(spec.scale) == w.shape[0]
            assert (w == 0).mean() >= 0.7
        else:
            assert spec.bits == 2 and spec.axis is None
            assert set(np.unique(w)) <= {-spec.scale[0], 0.0, spec.scale[0]}
    # Biases were retrained (not frozen); the quantized weights were not (still on levels above).
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report.to_dict(), default=float))
    assert read_quantization(path) == specs
    assert report.accuracy_after is not None and report.admm_stop


def test_stopping_rule_ends_admm_early_and_reports_it(mlp_small, data, tmp_path):
    config = PruneConfig(admm_iters=6, epochs_per_iter=1, retrain_epochs=0, batch_size=32, admm_tol=0.5,
                         admm_update_steps=0).with_sparsity(0.5)
    report = _run(mlp_small, data, tmp_path / "p.onnx", config)
    assert len(report.residuals) < 6
    assert report.admm_stop.startswith("converged")
    assert all(r["primal"] <= 0.5 for r in report.residuals[-1].values())
    assert report.hard_prune_gap == report.accuracy_after_admm - report.accuracy_hard_pruned


def test_updates_inside_epochs_and_a_mid_epoch_stop(mlp_small, data, tmp_path):
    """admm_update_steps=K: a Z/U update every K optimizer steps; the stopping rule is checked
    after each, so ADMM can end inside an epoch (fewer samples than whole epochs)."""
    config = PruneConfig(admm_iters=8, epochs_per_iter=1, retrain_epochs=0, batch_size=32, admm_tol=0.2,
                         admm_update_steps=3).with_sparsity(0.5)
    prepared = prepare_model(mlp_small)
    train_reader, eval_reader, _ = make_readers(prepared, data, 32, 0)
    steps = len(train_reader)
    report = prune(prepared, tmp_path / "p.onnx", train_reader, config, eval_reader)
    assert report.admm_stop.startswith("converged")
    admm_epochs = [e for e in report.epochs if e["phase"].startswith("ADMM")]
    assert len(report.residuals) >= 2 and len(report.residuals) <= 8 * (steps // 3 + 1)
    assert report.samples_seen % 32 == 0 and report.samples_seen < 32 * steps * len(admm_epochs)  # stopped mid-epoch
    assert all(r["primal"] <= 0.2 for r in report.residuals[-1].values())


def test_cap_without_convergence_warns_with_the_residuals(mlp_small, data, tmp_path, caplog):
    config = PruneConfig(admm_iters=1, epochs_per_iter=1, retrain_epochs=0, batch_size=32, admm_tol=1e-6).with_sparsity(0.9)
    with caplog.at_level("WARNING", logger="admm_onnx"):
        report = _run(mlp_small, data, tmp_path / "p.onnx", config)
    assert report.admm_stop.startswith("iteration cap")
    assert any("did not converge" in r.message and "--admm-iters" in r.message for r in caplog.records)


def test_defaults_make_admm_reach_the_sparse_set_on_a_short_run(tmp_path):
    """A small version of issue 16's run (digits instead of MNIST): 2 dense epochs, then 90%
    sparsity in every layer with the default ADMM settings, capped at 14 epochs of 45 steps (the
    issue's run: 3 of 156). ADMM must converge (every
    primal residual under the tolerance, so it stops early), the hard prune must cost under 2
    points (measured: -0.8; the old default rho 1e-3 x1.3 per epoch lost 70 points here, and 6 on
    the issue's run), and retraining must keep a usable model (measured 95%, dense 97%)."""
    from admm_onnx.data import load_dataset
    from admm_onnx.models import build
    from admm_onnx.pipeline import train

    data = load_dataset("digits")
    src = tmp_path / "l5.onnx"
    onnx.save(build("lenet5", input_shape=(1, 8, 8), num_classes=10), src)
    prepared = prepare_model(src)
    tr, ev, _ = make_readers(prepared, data, 32)
    dense = train(prepared, tmp_path / "dense.onnx", tr, 2, ev, PruneConfig(lr=3e-3, batch_size=32))
    config = PruneConfig(admm_iters=14, epochs_per_iter=1, retrain_epochs=1, batch_size=32, lr=3e-3).with_sparsity(0.9)
    report = _run(tmp_path / "dense.onnx", data, tmp_path / "auto.onnx", config)
    assert dense.accuracy_after > 0.9
    assert report.admm_stop.startswith("converged")
    assert sum(e["phase"].startswith("ADMM") for e in report.epochs) < 14  # stopped before the cap (measured: 10)
    assert max(r["primal"] for r in report.residuals[-1].values()) <= config.admm_tol
    assert report.hard_prune_gap < 0.02
    assert report.accuracy_hard_pruned >= dense.accuracy_after - 0.1
    assert report.accuracy_after >= dense.accuracy_after - 0.06


def test_residual_balancing_never_raises_rho_past_its_bound():
    """Once Z has settled the dual residual is 0 and balancing doubles rho at every update: it
    used to reach 1e22 and overflow the loss (--admm-tol 0); it stops at RHO_MAX."""
    from types import SimpleNamespace

    from admm_onnx.admm import RHO_MAX, AdmmState, RhoPolicy
    from admm_onnx.constraints import TopK
    from admm_onnx.graph.penalty import rho_name, target_name

    w = np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32)
    param = lambda a: SimpleNamespace(data=np.array(a, np.float32))  # noqa: E731
    params = {"w": param(w), target_name("w"): param(np.zeros_like(w)), rho_name("w"): param(np.zeros(1))}
    state = AdmmState([TopK("w", 0.5)], policy=RhoPolicy(), rho=RHO_MAX / 3)
    state.initialize({"w": w})
    ckpt = SimpleNamespace(parameters=params)
    for _ in range(6):
        state.update(ckpt)  # the weights never move: primal > 0, dual 0 after the first update
    assert state.rho["w"] <= RHO_MAX and np.isfinite(params[rho_name("w")].data).all()
