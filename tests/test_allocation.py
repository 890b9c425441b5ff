"""Automatic per-layer ratios: the allocator, the sensitivity sweep, budgets in prune, the CLI."""
import json

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from admm_onnx.allocation.allocator import LayerCurve, allocate, interpolate, monotone
from admm_onnx.allocation.budget import make_budget, parse_compression
from admm_onnx.allocation.costs import layer_costs
from admm_onnx.allocation.runners import ProcessRunner, SerialRunner, make_runner
from admm_onnx.allocation.sensitivity import evaluation_model, joint_metric, run_sensitivity
from admm_onnx.cli.main import main
from admm_onnx.config import PruneConfig, Rule
from admm_onnx.data import fit_to_input
from admm_onnx.errors import ConfigError
from admm_onnx.models import build
from admm_onnx.pipeline import make_readers, prepare_model, prune, train
from admm_onnx.projection import keep_count

LEVELS = (0.5, 0.2, 0.05, 0.01)


# -- allocator -----------------------------------------------------------------------------------
def _curve(scale, levels=LEVELS):
    return LayerCurve(tuple(levels), tuple(scale * (1 - k) ** 2 / k for k in levels))


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(10, 50_000), min_size=1, max_size=5),
    scales=st.lists(st.floats(0.0, 10.0, allow_subnormal=False), min_size=5, max_size=5),
    frac=st.floats(0.02, 0.9, allow_subnormal=False),
)
def test_allocator_meets_a_weights_budget_exactly_within_bounds(sizes, scales, frac):
    names = [f"w{i}" for i in range(len(sizes))]
    size = dict(zip(names, sizes))
    curves = {n: _curve(s) for n, s in zip(names, scales)}
    lo = {n: 0.01 for n in names}
    hi = {n: 0.95 for n in names}
    floor = sum(max(1, int(np.ceil(0.01 * s - 1e-9))) for s in sizes)
    ceil = sum(int(np.floor(0.95 * s + 1e-9)) for s in sizes)
    budget = int(round(floor + frac * (ceil - floor)))
    a = allocate(curves, size, budget, min_keep=lo, max_keep=hi)
    assert sum(a.keep.values()) == budget
    for n in names:
        assert max(1, np.ceil(0.01 * size[n] - 1e-9)) <= a.keep[n] <= np.floor(0.95 * size[n] + 1e-9)


def test_allocator_meets_a_macs_budget_to_one_weight_and_never_over():
    size = {"conv": 25_000, "fc": 400_000, "head": 5_000}
    unit = {"conv": 64.0, "fc": 1.0, "head": 1.0}
    curves = {n: _curve(1.0) for n in size}
    total = sum(size[n] * unit[n] for n in size)
    a = allocate(curves, size, 0.3 * total, unit)
    assert 0.3 * total - max(unit.values()) < a.cost <= 0.3 * total


def test_allocator_gives_more_to_the_sensitive_layer_and_pins_nothing_else():
    size = {"robust": 10_000, "touchy": 10_000}
    curves = {"robust": _curve(0.01), "touchy": _curve(5.0)}
    a = allocate(curves, size, 4_000)
    assert a.keep["touchy"] > a.keep["robust"] and sum(a.keep.values()) == 4_000
    assert a.predicted_total == pytest.approx(sum(a.predicted_delta.values()))


def test_allocator_rejects_unreachable_budgets():
    curves = {"a": _curve(1.0), "b": _curve(1.0)}
    with pytest.raises(ConfigError, match="below"):
        allocate(curves, {"a": 100, "b": 100}, 10, min_keep={"a": 0.1, "b": 0.1})
    with pytest.raises(ConfigError, match="above"):
        allocate(curves, {"a": 100, "b": 100}, 190, max_keep={"a": 0.9, "b": 0.9})


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-1.0, 5.0, allow_subnormal=False), min_size=2, max_size=8))
def test_curves_are_made_monotone_and_interpolated_between_levels(values):
    levels = sorted(np.geomspace(0.001, 0.9, len(values)))
    k, d = monotone(levels, values)
    assert k[-1] == 1.0 and d[-1] == 0.0 and np.all(d >= 0)
    assert np.all(np.diff(d) <= 1e-12)  # less kept: never less damage
    at = np.geomspace(0.0005, 1.0, 50)
    f = interpolate(k, d, at)
    assert np.all(np.diff(f) <= 1e-9) and np.all(f >= 0)
    assert np.allclose(interpolate(k, d, k), d)


def test_budgets():
    assert parse_compression("71x") == 71.0 and parse_compression(12) == 12.0
    assert make_budget(430_500, compression="71x").value == round(430_500 / 71)
    assert make_budget(1000, target_params=10).value == 10
    assert make_budget(1000, target_macs=0.5).kind == "macs"
    for bad in ("0.5x", "fast", "1x"):
        with pytest.raises(ConfigError):
            parse_compression(bad)
    with pytest.raises(ConfigError, match="one budget"):
        PruneConfig(compression=10, target_macs=0.5)
    with pytest.raises(ConfigError):
        PruneConfig(target_macs=1.5)
    with pytest.raises(ConfigError):
        PruneConfig(min_keep=0.5, max_keep=0.1)
    assert PruneConfig(compression="20x").compression == 20.0


def test_macs_from_shapes():
    prepared = prepare_model(build("lenet5"))
    costs = layer_costs(prepared.original, prepared.info)
    # Caffe LeNet-5 on 28x28: conv1 24x24 outputs, conv2 8x8, fully connected 1.
    assert {n: c.positions for n, c in costs.items()} == {
        "conv1.weight": 576, "conv2.weight": 64, "fc1.weight": 1, "fc2.weight": 1}
    assert costs["conv2.weight"].macs == 25_000 * 64


# -- sensitivity ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A LeNet-5 for 8x8 inputs trained two epochs on the blobs (module-scoped: a few seconds)."""
    from conftest import blobs

    data = blobs(n=800)
    path = tmp_path_factory.mktemp("sens") / "dense.onnx"
    prepared = prepare_model(build("lenet5", input_shape=(1, 8, 8), num_classes=4))
    tr, ev, _ = make_readers(prepared, data, 32)
    train(prepared, path, tr, 2, None, PruneConfig(lr=3e-3, batch_size=32))
    prepared = prepare_model(path)
    x = fit_to_input(data.x_train[:300], prepared.input_shape, prepared.input_name)
    return path, prepared, x, data.y_train[:300], data


def test_sensitivity_matches_evaluating_the_pruned_model(trained, tmp_path):
    path, prepared, x, y, _ = trained
    result = run_sensitivity(prepared, x, y, LEVELS, "loss", cache_dir=None, batch_size=128)
    assert list(result.curves) == ["conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"]
    c = result.curves["fc1.weight"]
    assert c.keep == sorted(LEVELS) + [1.0] and c.value[-1] == result.baseline
    assert c.nonzero[0] == keep_count(c.params, 1 - 0.01)
    # Independent check: write the model with fc1 pruned to 5% and evaluate it from scratch.
    from admm_onnx.pipeline import with_weights
    from admm_onnx.projection import project
    from admm_onnx.training import cross_entropy
    import onnxruntime as ort
    from onnx import numpy_helper

    w = {t.name: numpy_helper.to_array(t) for t in prepared.original.graph.initializer}["fc1.weight"]
    model = with_weights(prepared.original, {"fc1.weight": project(w, 0.95)})
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (logits,) = sess.run(None, {prepared.input_name: x})
    expected = cross_entropy(logits, y)
    assert c.value[c.keep.index(0.05)] == pytest.approx(expected, rel=1e-4)
    # The damage grows as less is kept (trained model: the extreme level hurts).
    assert c.value[0] > result.baseline
    assert joint_metric(prepared, x, y, {"fc1.weight": 0.05}) == pytest.approx(expected, rel=1e-4)
    assert "| fc1.weight" in result.table()


def test_sensitivity_cache_and_workers_give_identical_results(trained, tmp_path):
    _, prepared, x, y, _ = trained
    serial = run_sensitivity(prepared, x, y, (0.3, 0.05), "kl", cache_dir=tmp_path, batch_size=128)
    assert serial.computed == 9 and serial.cached == 0 and serial.baseline == 0.0
    again = run_sensitivity(prepared, x, y, (0.3, 0.05, 0.01), "kl", cache_dir=tmp_path, batch_size=128)
    assert again.computed == 4 and again.cached == 9  # only the new level
    parallel = run_sensitivity(prepared, x, y, (0.3, 0.05, 0.01), "kl", runner=ProcessRunner(2), cache_dir=None,
                               batch_size=128)
    assert parallel.to_dict()["layers"] == again.to_dict()["layers"]


def test_runner_choice(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert isinstance(make_runner(1), SerialRunner) and isinstance(make_runner(3), ProcessRunner)
    with pytest.raises(ConfigError):
        make_runner(0)


def test_evaluation_model_keeps_weights_overridable(trained):
    _, prepared, _, _, _ = trained
    model = evaluation_model(prepared)
    inputs = {i.name for i in model.graph.input}
    assert set(prepared.info.prunable) <= inputs
    onnx.checker.check_model(model)


# -- budgets in prune ----------------------------------------------------------------------------
def test_prune_with_a_budget_pins_excludes_and_meets_it(trained, tmp_path):
    path, prepared, _, _, data = trained
    tr, ev, _ = make_readers(prepared, data, 32)
    config = PruneConfig(compression="8x", admm_iters=1, retrain_epochs=0, batch_size=32, sensitivity_samples=200,
                         rules=(Rule(names=("conv1.weight",), exclude=True), Rule(names=("fc2.weight",), sparsity=0.5)))
    report = prune(path, tmp_path / "p.onnx", tr, config, None)
    rows = {r.layer: r for r in report.layers}
    total = sum(w.size for w in prepared.info.prunable.values())
    kept = {n: r.nonzero for n, r in rows.items()}
    kept["conv1.weight"] = prepared.info.prunable["conv1.weight"].size  # excluded: dense, not in the table
    assert sum(kept.values()) <= round(total / 8)  # magnitude ties may zero a kept entry; never more
    a = report.allocation
    assert a["kept_weights"] == round(total / 8)
    assert a["layers"]["conv1.weight"]["how"] == "excluded" and a["layers"]["fc2.weight"]["how"] == "pinned"
    assert a["layers"]["fc2.weight"]["kept"] == 1000
    assert {"predicted_one_shot_metric", "measured_one_shot_metric"} <= set(a)
    assert report.to_dict()["allocation"]["budget"].startswith("8x")


def test_prune_with_a_macs_budget(trained, tmp_path):
    path, prepared, _, _, data = trained
    tr, _, _ = make_readers(prepared, data, 32)
    config = PruneConfig(target_macs=0.25, admm_iters=1, retrain_epochs=0, batch_size=32, sensitivity_samples=200)
    report = prune(path, tmp_path / "p.onnx", tr, config, None)
    costs = layer_costs(prepared.original, prepared.info)
    total = sum(c.macs for c in costs.values())
    kept = sum(report.allocation["layers"][n]["kept"] * costs[n].positions for n in costs)
    assert total * 0.25 - max(c.positions for c in costs.values()) < kept <= total * 0.25


def test_sweep_samples_are_the_same_on_every_call(trained):
    """The sweep's samples come from the reader's arrays (a seeded subset), not from its
    current shuffle: two budgets on one reader (local vs Ray, a rerun) sweep the same images."""
    from admm_onnx.allocation.plan import reader_samples

    _, prepared, _, _, data = trained
    tr, _, _ = make_readers(prepared, data, 32, seed=3)
    a, b = reader_samples(tr, 100, seed=0), reader_samples(tr, 100, seed=0)
    assert a[0].shape[0] == 100 and np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


# -- CLI -----------------------------------------------------------------------------------------
def _cli_inputs(trained, tmp_path, monkeypatch):
    """The trained model's path and its data as an .npz; the sweep cache in tmp_path."""
    path, _, _, _, data = trained
    npz = tmp_path / "d.npz"
    np.savez(npz, x_train=data.x_train, y_train=data.y_train, x_test=data.x_test, y_test=data.y_test)
    monkeypatch.setenv("ADMM_ONNX_CACHE", str(tmp_path / "cache"))
    return path, npz


def test_cli_sensitivity_table_json_and_errors(trained, tmp_path, capsys, monkeypatch):
    path, npz = _cli_inputs(trained, tmp_path, monkeypatch)
    out = tmp_path / "s.json"
    code = main(["sensitivity", str(path), "-d", str(npz), "--levels", "20%,0.05", "--samples", "100",
                 "--metric", "top1", "--workers", "1", "--json", str(out), "-q"])
    printed = capsys.readouterr().out
    assert code == 0 and "| conv2.weight" in printed and "20%" in printed
    saved = json.loads(out.read_text())
    assert saved["metric"] == "top1" and saved["samples"] == 100 and saved["layers"]["fc1.weight"]["keep"] == [0.05, 0.2, 1.0]
    assert main(["sensitivity", str(path), "-d", str(npz), "--levels", "20%,0.05", "--samples", "100", "--metric",
                 "top1", "--workers", "1", "-q"]) == 0
    assert "0 evaluation(s)" in capsys.readouterr().out  # all cached
    assert main(["sensitivity", str(path), "-d", str(npz), "--levels", "2"]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert main(["prune", str(path), "-d", str(npz), "-o", str(tmp_path / "o.onnx"), "--sparsity", "0.5",
                 "--compression", "4x"]) == 2
    assert "exclude each other" in capsys.readouterr().err
    assert main(["prune", str(path), "-d", str(npz), "-o", str(tmp_path / "o.onnx"), "--compression", "0.5x"]) == 2
    assert not (tmp_path / "o.onnx").exists()


def test_cli_prune_with_compression(trained, tmp_path, capsys, monkeypatch):
    path, npz = _cli_inputs(trained, tmp_path, monkeypatch)
    report = tmp_path / "r.json"
    code = main(["prune", str(path), "-d", str(npz), "-o", str(tmp_path / "o.onnx"), "--compression", "10x",
                 "--min-keep", "0.01", "--admm-iters", "1", "--retrain-epochs", "1", "--batch-size", "32",
                 "--report", str(report), "-q"])
    printed = capsys.readouterr().out
    assert code == 0 and "Compression: 10.0x" in printed and "Allocation for 10x" in printed
    assert json.loads(report.read_text())["allocation"]["compression"] == pytest.approx(10.0, rel=1e-3)


@pytest.mark.slow
def test_ray_cluster_gives_the_same_curves_and_ratios_as_local_processes(trained, tmp_path):
    """Starts a local Ray cluster (needs the [ray] extra)."""
    pytest.importorskip("ray")
    from admm_onnx.allocation.runners import RayRunner
    from admm_onnx.allocation.plan import apply_budget

    _, prepared, x, y, data = trained
    local = run_sensitivity(prepared, x, y, LEVELS, "loss", runner=ProcessRunner(2), cache_dir=None, batch_size=128)
    ray_result = run_sensitivity(prepared, x, y, LEVELS, "loss", runner=RayRunner("local", 2), cache_dir=None,
                                 batch_size=128)
    assert ray_result.to_dict()["layers"] == local.to_dict()["layers"]
    tr, _, _ = make_readers(prepared, data, 32)
    config = PruneConfig(compression="12x", sensitivity_samples=300)
    a, rec_a = apply_budget(prepared, config, tr, cache_dir=None, runner=ProcessRunner(2))
    b, rec_b = apply_budget(prepared, config, tr, cache_dir=None, runner=RayRunner("local", 2))
    assert a.rules == b.rules and rec_a["layers"] == rec_b["layers"]


# -- global top-k in the ADMM Z-step -------------------------------------------------------------
def test_global_topk_projection_keeps_the_budget_floors_and_is_idempotent():
    from admm_onnx.allocation.global_topk import GlobalTopK

    rng = np.random.default_rng(0)
    values = {"big": rng.standard_normal((40, 50)) * 10, "small": rng.standard_normal((30,)) * 0.01}
    c = GlobalTopK("global", ["big", "small"], keep=100, floors={"big": 1, "small": 5})
    z = c.project(values)
    assert sum(int(np.count_nonzero(v)) for v in z.values()) == 100
    assert np.count_nonzero(z["small"]) == 5  # only its floor: its magnitudes lose globally
    kept = np.abs(values["big"])[z["big"] != 0]
    assert kept.min() >= np.abs(values["big"])[z["big"] == 0].max()  # the largest ones
    again = c.project(z)
    assert all(np.array_equal(again[t], z[t]) for t in z)
    assert {t: m.sum() for t, m in c.mask(values).items()} == {"big": 95, "small": 5}


def test_prune_with_global_allocation_meets_the_budget(trained, tmp_path):
    path, prepared, _, _, data = trained
    tr, _, _ = make_readers(prepared, data, 32)
    config = PruneConfig(compression="10x", allocation="global", admm_iters=2, retrain_epochs=1, batch_size=32,
                         rules=(Rule(names=("fc2.weight",), sparsity=0.5),))
    report = prune(path, tmp_path / "p.onnx", tr, config, None)
    total = sum(w.size for w in prepared.info.prunable.values())
    rows = {r.layer: r.nonzero for r in report.layers}
    assert sum(rows.values()) <= round(total / 10) and sum(rows.values()) >= round(total / 10) - 5
    assert rows["fc2.weight"] <= 1000
    assert min(rows.values()) >= 1 and report.allocation["global"]["keep"] == round(total / 10) - 1000
    assert "global" in report.residuals[-1]
    with pytest.raises(ConfigError, match="weights budget"):
        prune(path, tmp_path / "q.onnx", tr, PruneConfig(target_macs=0.5, allocation="global"), None)


def test_sensitivity_of_channel_groups(trained):
    """--structure groups: one curve per prunable channel group of admm_onnx/structured."""
    from admm_onnx.structured.analysis import analyse as channel_analysis

    _, prepared, x, y, _ = trained
    result = run_sensitivity(prepared, x, y, (0.5, 0.1), "loss", structure="groups", cache_dir=None, batch_size=128)
    expected = [g.name for g in channel_analysis(prepared.original).groups if g.prunable]
    assert list(result.curves) == expected and expected
    c = result.curves[expected[0]]
    assert c.nonzero == [max(1, round(0.1 * c.params)), c.params // 2, c.params]
    assert c.value[0] > result.baseline  # keeping 10% of the channels hurts a trained model
    assert "| Group" in result.table()


def test_cli_budget_options_without_a_budget_and_unreachable_budgets_stop_at_once(trained, tmp_path, capsys,
                                                                                   monkeypatch):
    path, npz = _cli_inputs(trained, tmp_path, monkeypatch)
    out = tmp_path / "o.onnx"
    assert main(["prune", str(path), "-d", str(npz), "-o", str(out), "--sparsity", "0.5", "--allocation", "global"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--allocation only apply with a budget" in err
    # min keep 90% of every layer cannot fit 1/10 of the weights: said before any sweep runs
    assert main(["prune", str(path), "-d", str(npz), "-o", str(out), "--compression", "10x", "--min-keep", "0.9"]) == 2
    err = capsys.readouterr().err
    assert "below what the per-layer minimum keep needs" in err and "sensitivity" not in err
    assert not list((tmp_path / "cache").glob("**/*.json")) and not out.exists()
