"""The ADMM penalty Block: its gradient is rho * (W - Z + U), and the engine feeds it."""
import numpy as np
import onnx

from admm_onnx._ort import onnxblock
from admm_onnx.admm import AdmmState
from admm_onnx.config import PruneConfig
from admm_onnx.data import LABELS
from admm_onnx.graph.analysis import analyse
from admm_onnx.graph.penalty import AdmmPenalty, rho_name, target_name
from admm_onnx.losses import ClassifierLoss
from admm_onnx.training import Trainer, build_artifacts


def _trainer(model_path, tmp_path, loss=None):
    model = onnx.load(model_path)
    info = analyse(model)
    penalty = AdmmPenalty(loss or ClassifierLoss(), list(info.prunable))
    build_artifacts(model, tmp_path / "art", info.trainable, penalty, "logits", penalty.frozen_params)
    return Trainer(tmp_path / "art"), info


def _grads(trainer, names, feed):
    trainer.module.train()
    trainer.module.lazy_reset_grad()
    trainer.module(*trainer._inputs(feed))
    return {n: np.array(trainer.state.parameters[n].grad) for n in names}


def test_penalty_gradient_is_rho_times_w_minus_z_plus_u(mlp_small, tmp_path, data):
    trainer, info = _trainer(mlp_small, tmp_path)
    names = list(info.prunable)
    feed = {"input": data.x_train[:16], LABELS: data.y_train[:16]}
    base = _grads(trainer, names, feed)  # rho = 0: the base loss only
    rng = np.random.default_rng(1)
    rhos = {n: 0.1 * (i + 1) for i, n in enumerate(names)}
    targets = {}
    for n in names:
        w = trainer.get(n)
        targets[n] = rng.standard_normal(w.shape).astype(np.float32)
        trainer.set(target_name(n), targets[n])
        trainer.set(rho_name(n), np.float32(rhos[n]))
    with_penalty = _grads(trainer, names, feed)
    for n in names:
        expected = rhos[n] * (trainer.get(n) - targets[n])
        np.testing.assert_allclose(with_penalty[n] - base[n], expected, rtol=1e-4, atol=1e-5)


def test_penalty_wraps_a_users_own_loss_block(mlp_small, tmp_path, data):
    class HalfCrossEntropy(onnxblock.Block):
        """A user's custom loss: half the cross-entropy."""

        def __init__(self):
            super().__init__()
            self.ce = onnxblock.loss.CrossEntropyLoss()
            self.half = onnxblock.blocks.Constant(0.5)
            self.mul = onnxblock.blocks.Mul()

        def build(self, logits):
            return self.mul(self.ce(logits, LABELS), self.half())

    trainer, info = _trainer(mlp_small, tmp_path, HalfCrossEntropy())
    ce_trainer, _ = _trainer(mlp_small, tmp_path / "ce")
    feed = {"input": data.x_train[:16], LABELS: data.y_train[:16]}
    names = list(info.prunable)
    half, full = _grads(trainer, names, feed), _grads(ce_trainer, names, feed)
    for n in names:
        np.testing.assert_allclose(half[n], 0.5 * full[n], rtol=1e-4, atol=1e-6)


def test_frozen_targets_change_only_at_update(mlp_small, tmp_path, data):
    from admm_onnx.data import ArrayReader

    trainer, info = _trainer(mlp_small, tmp_path)
    plan = PruneConfig(rho=0.01, rho_growth=2.0).with_sparsity(0.8).plan(info)
    state = AdmmState(plan, rho_growth=2.0)
    state.initialize(state.read_weights(trainer))
    state.write(trainer)
    before = {n: trainer.get(target_name(n)) for n in plan}
    trainer.train_epoch(ArrayReader(data.x_train, data.y_train, 32, shuffle=True, drop_last=True))
    for n in plan:
        np.testing.assert_array_equal(trainer.get(target_name(n)), before[n])  # training never writes them
    state.update(trainer)
    for n in plan:
        assert not np.array_equal(trainer.get(target_name(n)), before[n])
        np.testing.assert_allclose(trainer.get(target_name(n)), state.Z[n] - state.U[n], rtol=1e-6)
        assert np.isclose(float(trainer.get(rho_name(n))), 0.02)


def test_state_save_load_round_trip(mlp_small, tmp_path, data):
    trainer, info = _trainer(mlp_small, tmp_path)
    plan = PruneConfig().with_sparsity(0.7).plan(info)
    state = AdmmState(plan, rho_growth=1.5)
    state.initialize(state.read_weights(trainer))
    state.update(trainer)
    state.save(tmp_path / "state.npz")
    loaded = AdmmState(plan, rho_growth=1.5).load(tmp_path / "state.npz")
    assert loaded.iteration == 1
    for n in plan:
        np.testing.assert_array_equal(loaded.Z[n], state.Z[n])
        np.testing.assert_array_equal(loaded.U[n], state.U[n])
        assert loaded.rho[n] == state.rho[n]
        assert loaded.history[0][n] == state.history[0][n]
