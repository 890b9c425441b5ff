"""Channel budgets, the group projection (ADMM Z-update) and the --structure channel pipeline."""
from __future__ import annotations

import itertools
import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from admm_onnx.errors import ConfigError
from admm_onnx.models.resnet_cifar import resnet_cifar
from admm_onnx.structured import analyse
from admm_onnx.structured.constraint import ChannelGroups
from admm_onnx.structured.targets import ChannelTargets


@pytest.fixture(scope="module")
def resnet():
    m = resnet_cifar((3, 8, 8), 10, blocks=1, width=8)
    return m, analyse(m)


def _values(model, names, seed=0):
    rng = np.random.default_rng(seed)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return {n: rng.standard_normal(inits[n].shape).astype(np.float32) for n in names}


def test_projection_is_the_exact_top_k_for_a_group(resnet):
    m, a = resnet
    g = next(g for g in a.prunable if g.producers == ["layer1.0.conv1"])  # members in no other group's rows
    c = ChannelGroups(a, {g.id: 3})
    assert c.name == "channels" and not c.freeze
    vals = _values(m, c.tensors)
    own = {(mb.init, mb.axis) for mb in g.members}
    best = None
    for subset in itertools.combinations(range(g.size), 3):  # brute force over all keep sets
        dist = 0.0
        for mb in g.members:
            if mb.stat:
                continue
            arr = np.moveaxis(vals[mb.init], mb.axis, 0)
            drop = ~np.isin(mb.channels, subset)
            dist += float((arr[mb.positions[drop]].astype(np.float64) ** 2).sum())
        if best is None or dist < best[0] - 1e-9:
            best = (dist, subset)
    assert tuple(c.kept(vals)[g.id]) == best[1]
    z = c.project(vals)
    removed = sum(float(((vals[n] - z[n]).astype(np.float64) ** 2).sum()) for n in z)
    assert removed == pytest.approx(best[0], rel=1e-6)
    assert own  # the group has member slices


def test_projection_zeroes_every_member_of_dropped_channels(resnet):
    m, a = resnet
    counts = ChannelTargets(sparsity=0.5, round_to=1).keep_counts(a)
    c = ChannelGroups(a, counts)
    z = c.project(_values(m, c.tensors, seed=1))
    kept = c.kept(z)
    assert all(len(kept[g]) <= counts[g] for g in counts)
    for g in a.prunable:
        for mb in g.members:
            if mb.stat:
                continue
            arr = np.moveaxis(z[mb.init], mb.axis, 0)
            dropped = ~np.isin(mb.channels, kept[g.id])
            assert not arr[mb.positions[dropped]].any()


def test_targets_uniform_rounding_and_mac_budget(resnet):
    _, a = resnet
    k = ChannelTargets(sparsity=0.6, round_to=4).keep_counts(a)
    assert all(v % 4 == 0 or v == g.size for g in a.prunable for v in [k[g.id]])
    total = a.counts()["macs"]
    for f in (0.3, 0.5):
        k = ChannelTargets(target_macs=f, round_to=1).keep_counts(a)
        assert a.counts({g: range(n) for g, n in k.items()})["macs"] <= f * total
    with pytest.raises(ConfigError):
        ChannelTargets(target_macs=1e-4, round_to=1).keep_counts(a)
    with pytest.raises(ConfigError):
        ChannelTargets(sparsity=0.5, target_macs=0.5)
    with pytest.raises(ConfigError):
        ChannelTargets()


def test_prune_structure_channel_writes_a_smaller_dense_model(tmp_path, capsys):
    from admm_onnx.cli.main import main

    src, out, rep = tmp_path / "r.onnx", tmp_path / "p.onnx", tmp_path / "rep.json"
    onnx.save(resnet_cifar((1, 8, 8), 10, blocks=1, width=16), str(src))  # 16/32/64: room for --round-to 8
    before = src.read_bytes()
    code = main(["prune", str(src), "-o", str(out), "-d", "digits", "--structure", "channel", "--target-macs", "0.5",
                 "--admm-iters", "1", "--admm-update-steps", "3", "--retrain-epochs", "1", "--report", str(rep), "-q",
                 "--threads", "1"])
    assert code == 0
    assert src.read_bytes() == before
    text = capsys.readouterr().out
    assert "MACs after" in text and "Model" in text
    small = onnx.load(str(out))
    onnx.checker.check_model(small)
    report = json.loads(rep.read_text())
    assert report["totals_after"]["macs"] <= 0.5 * report["totals_before"]["macs"]
    # --admm-update-steps 3: Z/U updates every 3 optimizer steps (default: once per iteration)
    assert len(report["residuals"]) >= 2 and report["admm_stop"]  # one per iteration before
    assert report["groups"] and all(r["channels_after"] < r["channels"] for r in report["groups"])
    assert all(r["channels_after"] % 8 == 0 for r in report["groups"])
    assert not any(n.op_type == "Mul" and "mask" in n.name for n in small.graph.node)
    assert sum(numpy_helper.to_array(t).size for t in small.graph.initializer) == report["totals_after"]["params"]
    import onnxruntime as ort

    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {"input": np.zeros((2, 1, 8, 8), np.float32)})
    assert y.shape == (2, 10)


def test_channel_allocation_meets_the_mac_budget_and_follows_sensitivity():
    """--target-macs split by sensitivity: exact MACs never above the budget, counts multiples
    of 8; a group whose curve says it barely matters is cut harder than the uniform split cuts
    it, a group that matters a lot keeps more."""
    from admm_onnx.allocation.allocator import LayerCurve
    from admm_onnx.structured.allocate import CHANNEL_LEVELS, counts_from_curves, marginal_macs

    m = resnet_cifar((3, 8, 8), 10, blocks=1, width=16)
    a = analyse(m)
    quiet = next(g for g in a.prunable if g.producers == ["layer3.0.conv1"])
    loud = next(g for g in a.prunable if g.producers == ["layer2.0.conv1"])
    levels = tuple(sorted(CHANNEL_LEVELS))

    def curve(scale):
        return LayerCurve(levels, tuple(scale * (1 - k) ** 2 for k in levels))

    curves = {g.name: curve(1.0) for g in a.prunable}
    curves[quiet.name], curves[loud.name] = curve(1e-4), curve(100.0)
    total = a.counts()["macs"]
    for f in (0.6, 0.4):
        counts, alloc = counts_from_curves(a, ChannelTargets(target_macs=f), curves)
        kept = a.counts({gid: range(k) for gid, k in counts.items()})["macs"]
        assert kept <= f * total
        assert set(counts) == {g.id for g in a.prunable} and all(k % 8 == 0 for k in counts.values())
        uniform = ChannelTargets(target_macs=f, allocation="uniform").keep_counts(a)
        assert counts[quiet.id] < uniform[quiet.id] and counts[loud.id] > uniform[loud.id]
        assert alloc.predicted_total >= 0
    marg = marginal_macs(a, {g.id: g.size for g in a.prunable})
    assert all(v >= 1 for v in marg.values())
    with pytest.raises(ConfigError, match="allocation"):
        ChannelTargets(sparsity=0.5, allocation="uniform")
    with pytest.raises(ConfigError, match="allocation"):
        ChannelTargets(target_macs=0.5, allocation="global")
    assert ChannelTargets(sparsity=0.5).update_steps == 0  # once per ADMM iteration unless asked
    with pytest.raises(ConfigError, match="admm-update-steps"):
        ChannelTargets(sparsity=0.5, update_steps=-1)


@pytest.mark.parametrize("args", [["--round-to", "4"], ["--structure", "channel"],
                                  ["--structure", "channel", "--target-macs", "0.5", "--allocation", "global"],
                                  ["--target-macs", "0.5", "--allocation", "uniform"],
                                  ["--structure", "channel", "--sparsity", "0.5", "--target-macs", "0.5"],
                                  ["--structure", "channel", "--sparsity", "0.5", "--resume"]])
def test_prune_structure_channel_bad_options(tmp_path, capsys, args):
    from admm_onnx.cli.main import main

    src = tmp_path / "r.onnx"
    onnx.save(resnet_cifar((1, 8, 8), 10, blocks=1, width=4), str(src))
    assert main(["prune", str(src), "-o", str(tmp_path / "p.onnx"), "-d", "digits"] + args) == 2
    assert capsys.readouterr().err.startswith("error:")
    assert not (tmp_path / "p.onnx").exists()
