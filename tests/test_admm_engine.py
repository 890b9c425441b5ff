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
    config = PruneConfig(admm_iters=6, epochs_per_iter=1, retrain_epochs=0, batch_size=32, admm_tol=0.5).with_sparsity(0.5)
    report = _run(mlp_small, data, tmp_path / "p.onnx", config)
    assert len(report.residuals) < 6
    assert report.admm_stop.startswith("converged")
    assert all(r["primal"] <= 0.5 for r in report.residuals[-1].values())
    assert report.hard_prune_gap == report.accuracy_after_admm - report.accuracy_hard_pruned


def test_cap_without_convergence_warns_with_the_residuals(mlp_small, data, tmp_path, caplog):
    config = PruneConfig(admm_iters=1, epochs_per_iter=1, retrain_epochs=0, batch_size=32, admm_tol=1e-6).with_sparsity(0.9)
    with caplog.at_level("WARNING", logger="admm_onnx"):
        report = _run(mlp_small, data, tmp_path / "p.onnx", config)
    assert report.admm_stop.startswith("iteration cap")
    assert any("did not converge" in r.message and "--admm-iters" in r.message for r in caplog.records)


def test_default_rho_makes_admm_reach_the_sparse_set_better_than_the_old_default(tmp_path):
    """A small version of issue 16's run (digits instead of MNIST): 2 dense epochs, then 90%
    sparsity with 3 ADMM iterations of 1 epoch and 1 retraining epoch. The old default (rho 1e-3
    growing x1.3) left the weights where they were; the automatic rho must move them: smaller
    primal residual, a smaller hard-prune gap and a better model after retraining.

    (The first version also asked for a final top-1 within 5 points of the dense model; on
    digits both runs end 5-11 points below it (92.20% and 85.79% vs 97.21%): 3 ADMM epochs of
    45 steps leave the weights far from the sparse set whatever rho does, so that bound was a
    coin toss, and it failed from the commit that added it. What auto rho does claim is
    measured against the old default, with margin.)"""
    from admm_onnx.data import load_dataset
    from admm_onnx.models import build
    from admm_onnx.pipeline import train

    data = load_dataset("digits")
    src = tmp_path / "l5.onnx"
    onnx.save(build("lenet5", input_shape=(1, 8, 8), num_classes=10), src)
    prepared = prepare_model(src)
    tr, ev, _ = make_readers(prepared, data, 32)
    dense = train(prepared, tmp_path / "dense.onnx", tr, 2, ev, PruneConfig(lr=3e-3, batch_size=32))
    runs = {}
    for label, extra in (("auto", {}), ("old", dict(rho=1e-3, rho_mode="growth", admm_tol=0.0))):
        config = PruneConfig(admm_iters=3, epochs_per_iter=1, retrain_epochs=1, batch_size=32, lr=3e-3, **extra).with_sparsity(0.9)
        runs[label] = _run(tmp_path / "dense.onnx", data, tmp_path / f"{label}.onnx", config)
    primal = {k: max(r["primal"] for r in rep.residuals[-1].values()) for k, rep in runs.items()}
    assert primal["auto"] < 0.5 * primal["old"]
    assert runs["auto"].hard_prune_gap < runs["old"].hard_prune_gap
    assert runs["auto"].accuracy_after >= runs["old"].accuracy_after + 0.03
    assert dense.accuracy_after > 0.9
