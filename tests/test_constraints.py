"""Constraint sets (the engine's extension point), k-bit levels, and the engine over variables."""
import types

import numpy as np
import pytest

from admm_onnx.admm import AdmmState, Residual, RhoPolicy
from admm_onnx.constraints import Constraint, Levels, Slices, TopK, constraint_for
from admm_onnx.graph.penalty import rho_name, target_name
from admm_onnx.projection import project
from admm_onnx.quantization import QuantSpec, fit_levels, max_level, read_quantization, to_integers


def _fake_state(arrays):
    """Anything with ``.parameters[name].data`` works as a checkpoint for AdmmState."""
    return types.SimpleNamespace(parameters={n: types.SimpleNamespace(data=np.array(v)) for n, v in arrays.items()})


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("axis", [None, 0])
def test_levels_take_at_most_2L_plus_1_values_per_scale_and_are_idempotent(bits, axis):
    rng = np.random.default_rng(bits)
    x = (rng.standard_normal((6, 5, 3)) * np.arange(1, 7)[:, None, None]).astype(np.float32)
    c = Levels("w", bits, axis)
    z = c.project({"w": x})["w"]
    assert z.dtype == np.float32 and z.shape == x.shape
    slices = [z] if axis is None else list(z)
    for s in slices:
        assert len(np.unique(s)) <= 2 * max_level(bits) + 1
    np.testing.assert_array_equal(c.project({"w": z})["w"], z)
    # Never worse than the common max|x|/L scale.
    L = max_level(bits)
    naive = [np.clip(np.rint(v / (np.abs(v).max() / L)), -L, L) * (np.abs(v).max() / L) for v in ([x] if axis is None else x)]
    err = np.sum((x - z) ** 2)
    assert err <= sum(np.sum((v - n) ** 2) for v, n in zip([x] if axis is None else x, naive)) * (1 + 1e-6)


def test_written_levels_read_back_as_integers_exactly():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 9)).astype(np.float32)
    c = Levels("w", 4, axis=0)
    z = c.project({"w": x})["w"]
    spec = QuantSpec.from_dict(c.describe({"w": x})["w"])
    q = to_integers(z, spec)
    assert q.dtype == np.int8 and np.abs(q).max() <= 7
    np.testing.assert_array_equal(q.astype(np.float32) * np.asarray(spec.scale, np.float32)[:, None], z)
    assert read_quantization({"quantization": {"w": spec.to_dict()}})["w"] == spec
    # facts of other constraints (e.g. a global top-k's) are not quantization specs
    assert read_quantization({"quantization": {"w": spec.to_dict(), "g": {"kept": 3, "floor": 1}}}) == {"w": spec}
    with pytest.raises(ValueError):
        to_integers(x, spec)  # not on the levels


def test_sparsity_plus_levels_keeps_at_most_k_on_levels():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((8, 16)).astype(np.float32)
    c = Levels("w", 3, axis=None, support=TopK("w", 0.75))
    z = c.project({"w": x})["w"]
    assert np.count_nonzero(z) <= 32
    assert len(np.unique(z)) <= 7
    mask = c.mask({"w": x})["w"]
    assert mask.sum() == 32 and not z[~mask].any()
    assert c.freeze


def test_single_tensor_constraints_match_the_old_projections():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((6, 4, 3, 3)).astype(np.float32)
    np.testing.assert_array_equal(TopK("w", 0.9).project({"w": w})["w"], project(w, 0.9))
    np.testing.assert_array_equal(Slices("w", 0.5, 0).project({"w": w})["w"], project(w, 0.5, "filter"))
    plan = types.SimpleNamespace(name="w", sparsity=0.5, structure="channel", out_axis=0, in_axis=1, bits=None)
    np.testing.assert_array_equal(constraint_for(plan).project({"w": w})["w"], project(w, 0.5, "channel"))


class PairTopK(Constraint):
    """Test-only constraint over two tensors: keep the k largest magnitudes across both."""

    def __init__(self, a, b, k):
        self.name, self.tensors, self.k = "pair", (a, b), k

    def project(self, values):
        flat = np.concatenate([np.ravel(values[t]) for t in self.tensors])
        keep = np.zeros(flat.size, bool)
        keep[np.argsort(-np.abs(flat), kind="stable")[: self.k]] = True
        out, i = {}, 0
        for t in self.tensors:
            v = np.asarray(values[t])
            out[t] = np.where(keep[i : i + v.size].reshape(v.shape), v, 0)
            i += v.size
        return out


def test_engine_runs_one_variable_over_several_tensors(tmp_path):
    a = np.array([[3.0, -0.1], [0.2, 5.0]], np.float32)
    b = np.array([0.3, -4.0, 0.05], np.float32)
    arrays = {"a": a, "b": b}
    for t in ("a", "b"):
        arrays[target_name(t)] = np.zeros_like(arrays[t])
        arrays[rho_name(t)] = np.zeros((), np.float32)
    state = _fake_state(arrays)
    admm = AdmmState([PairTopK("a", "b", 3)], rho=0.5, policy=RhoPolicy("growth", growth=2.0))
    admm.initialize(admm.read_weights(state))
    assert np.count_nonzero(admm.Z["a"]) + np.count_nonzero(admm.Z["b"]) == 3
    admm.write(state)
    assert float(state.parameters[rho_name("b")].data) == 0.5
    res = admm.update(state)
    assert list(res) == ["pair"] and admm.rho["pair"] == 1.0
    assert float(state.parameters[rho_name("a")].data) == 1.0
    expected = np.sqrt(0.1**2 + 0.2**2 + 0.3**2 + 0.05**2) / np.sqrt(np.sum(a.astype(np.float64) ** 2) + np.sum(b.astype(np.float64) ** 2))
    assert res["pair"].primal == pytest.approx(expected, rel=1e-5)
    np.testing.assert_allclose(state.parameters[target_name("b")].data, admm.Z["b"] - admm.U["b"])
    admm.save(tmp_path / "s.npz")
    loaded = AdmmState([PairTopK("a", "b", 3)]).load(tmp_path / "s.npz")
    assert loaded.rho == admm.rho and loaded.history == admm.history
    hard = admm.harden(state)
    assert int(state.parameters["a"].data.astype(bool).sum() + state.parameters["b"].data.astype(bool).sum()) == 3
    assert set(hard.masks) == {"a", "b"} and hard.frozen == []
    with pytest.raises(ValueError, match="two constraints"):
        AdmmState([TopK("a", 0.5), Slices("a", 0.5, 0)])


def test_residual_balancing_and_dual_rescaling():
    p = RhoPolicy("balance", mu=10, tau=2, tol=0.01)
    assert p.factor(Residual(0.5, 0.01)) == 2.0  # weights lag a settled target: raise rho
    assert p.factor(Residual(0.02, 0.5)) == 0.5  # target moves much more: lower rho
    assert p.factor(Residual(0.1, 0.05)) == 1.0
    assert p.factor(Residual(0.005, 0.0)) == 1.0  # converged: held
    w = np.array([1.0, 0.5, -0.2, 0.1], np.float32)
    arrays = {"w": w, target_name("w"): np.zeros(4, np.float32), rho_name("w"): np.zeros((), np.float32)}
    state = _fake_state(arrays)
    admm = AdmmState([TopK("w", 0.5)], rho=1.0, policy=RhoPolicy("balance", tol=0.0))
    admm.initialize({"w": w})
    admm.update(state)  # primal ||(-0.2, 0.1)|| >> dual 0: rho doubles, U halves
    assert admm.rho["w"] == 2.0
    np.testing.assert_allclose(2.0 * admm.U["w"], w - admm.Z["w"])  # rho * U is what it was (1 * (W - Z))


def test_stalled_primal_residual_raises_rho():
    p = RhoPolicy("balance", mu=10, tau=1.5, tol=0.02, stall=0.9)
    assert p.factor(Residual(0.3, 0.2), Residual(0.31, 0.2)) == 1.5  # primal did not drop 10%: raise
    assert p.factor(Residual(0.2, 0.2), Residual(0.3, 0.2)) == 1.0  # dropping fast enough: hold
    assert p.factor(Residual(0.3, 0.2)) == 1.0  # no previous update
    assert p.factor(Residual(0.01, 0.2), Residual(0.01, 0.2)) == 1.0  # converged: held
    assert RhoPolicy("balance", tau=1.5).factor(Residual(0.3, 0.2), Residual(0.3, 0.2)) == 1.0  # stall 0: off


def test_calibration_scales_rho_to_the_loss_gradient():
    w = np.array([1.0, 0.5, -0.2, 0.1], np.float32)
    admm = AdmmState([TopK("w", 0.5)])
    admm.initialize({"w": w})
    rho = admm.calibrate({"w": 0.3}, {"w": w}, ratio=2.0)["w"]
    assert rho == pytest.approx(2.0 * 0.3 / np.sqrt(0.2**2 + 0.1**2))
    assert admm.calibrate({"w": 1.0}, {"w": w}) == {}  # already set: kept


def test_fit_levels_all_zero_and_masked_out_slices():
    q, s = fit_levels(np.zeros((2, 3), np.float32), 4, axis=0)
    assert not q.any() and np.all(s > 0)


@pytest.mark.parametrize("axis", [None, 0])
def test_fit_levels_scales_are_float16_numbers_at_almost_no_cost(axis):
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((16, 40)) * rng.uniform(0.01, 2.0, (16, 1))).astype(np.float32)
    q, s = fit_levels(x, 3, axis)
    assert np.array_equal(s.astype(np.float16).astype(np.float32), s)  # stored in two bytes, losslessly
    q32, s32 = fit_levels(x, 3, axis, half_scales=False)
    assert not np.array_equal(s32.astype(np.float16).astype(np.float32), s32)
    err = lambda q, s: float(((x - q * (s if axis is None else s[:, None])) ** 2).sum())  # noqa: E731
    assert err(q32, s32) <= err(q, s) <= 1.001 * err(q32, s32)
    # outside float16's normal range the scale stays float32
    _, tiny = fit_levels(x * 1e-7, 3, axis)
    assert np.array_equal(tiny, fit_levels(x * 1e-7, 3, axis, half_scales=False)[1])
