"""The written model gets BatchNorm running statistics of its new weights (pipeline.refresh_batchnorm).

ORT training normalises with batch statistics and never writes the running ones back, so a
model trained or pruned with BatchNorm kept the statistics it came with: a model trained from
scratch evaluated near chance. Built in code: Conv -> BatchNorm (statistics far from the truth)
-> Relu -> GlobalAveragePool -> Flatten -> Gemm on the 8x8 digits."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from admm_onnx.config import PruneConfig
from admm_onnx.data import load_dataset
from admm_onnx.pipeline import evaluate, make_readers, prepare_model, prune, train


def _bn_net(path):
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array((rng.standard_normal((16, 1, 3, 3)) * 0.3).astype(np.float32), "conv.weight"),
        numpy_helper.from_array(np.ones(16, np.float32), "bn.scale"),
        numpy_helper.from_array(np.zeros(16, np.float32), "bn.bias"),
        numpy_helper.from_array(np.full(16, 3.0, np.float32), "bn.mean"),  # stale on purpose
        numpy_helper.from_array(np.full(16, 50.0, np.float32), "bn.var"),
        numpy_helper.from_array((rng.standard_normal((10, 16)) * 0.3).astype(np.float32), "fc.weight"),
        numpy_helper.from_array(np.zeros(10, np.float32), "fc.bias"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "conv.weight"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "bn.scale", "bn.bias", "bn.mean", "bn.var"], ["b"]),
        helper.make_node("Relu", ["b"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "fc.weight", "fc.bias"], ["logits"], transB=1),
    ]
    g = helper.make_graph(nodes, "bn", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 15)])
    m.ir_version = 8
    onnx.save(m, path)
    return path


def _bn_stats(path):
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    return inits["bn.mean"], inits["bn.var"]


def test_trained_and_pruned_models_get_the_statistics_of_their_weights(tmp_path):
    data = load_dataset("digits")
    src = _bn_net(tmp_path / "bn.onnx")
    prepared = prepare_model(src)
    tr, ev, _ = make_readers(prepared, data, 64)
    dense = train(prepared, tmp_path / "dense.onnx", tr, 3, ev, PruneConfig(lr=1e-2, batch_size=64))
    bn = dense.batchnorm
    assert bn["nodes"] == 1 and bn["kept"] and bn["batches"] == len(tr)
    # Trained in batch-statistics mode, the stale statistics lose most of what was learnt.
    assert bn["accuracy_recalibrated"] > bn["accuracy_stale"] + 0.2
    mean, var = _bn_stats(tmp_path / "dense.onnx")
    assert np.all(np.abs(mean - 3.0) > 1e-3) and np.all(np.abs(var - 50.0) > 1e-3)
    # The report's figure is the written file's own.
    assert abs(evaluate(tmp_path / "dense.onnx", ev).accuracy - dense.accuracy_after) < 1e-9

    config = PruneConfig(admm_iters=2, epochs_per_iter=1, retrain_epochs=1, batch_size=64, lr=3e-3).with_sparsity(0.5)
    rep = prune(tmp_path / "dense.onnx", tmp_path / "pruned.onnx", tr, config, ev)
    assert rep.batchnorm is not None and rep.batchnorm["nodes"] == 1
    written = evaluate(tmp_path / "pruned.onnx", ev).accuracy
    assert abs(written - rep.accuracy_after) < 1e-9
    # Kept only when not worse on the evaluation data than the statistics the model came with.
    assert written >= min(rep.batchnorm["accuracy_stale"], rep.batchnorm["accuracy_recalibrated"])
    assert written == max(rep.batchnorm["accuracy_stale"], rep.batchnorm["accuracy_recalibrated"])


def test_evaluator_reestimates_batchnorm_on_the_training_batches_it_is_given(tmp_path):
    """In-run evaluations use BatchNorm statistics of the current weights: the Trainer keeps its
    last training batches and the Evaluator re-estimates the statistics on them (before, the
    channel path's retraining showed ResNet-20 at 21-37% while the written model scored 74%)."""
    from admm_onnx.graph.bn_recalibrate import recalibrate_batchnorm
    from admm_onnx.metrics import Evaluator
    from admm_onnx.pipeline import output_kinds

    data = load_dataset("digits")
    prepared = prepare_model(_bn_net(tmp_path / "bn.onnx"))
    tr, ev, _ = make_readers(prepared, data, 64)
    tr.rewind()
    batches = [tr.get_next() for _ in range(5)]
    evaluator = Evaluator(prepared.training, prepared.output_names, output_kinds(prepared, PruneConfig()))
    stale = evaluator.evaluate(ev)
    fresh = evaluator.evaluate(ev, bn_feeds=batches)
    reference = onnx.ModelProto()
    reference.CopyFrom(prepared.training)
    recalibrate_batchnorm(reference, iter(batches))
    expected = evaluate(reference, ev, prepared.output_name)
    assert fresh.accuracy == expected.accuracy and fresh.accuracy != stale.accuracy
    assert _bn_stats_of(prepared.training) == (3.0, 50.0)  # the evaluator's model is not modified


def _bn_stats_of(model):
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return float(inits["bn.mean"][0]), float(inits["bn.var"][0])


def test_trainer_keeps_a_bounded_window_of_its_last_training_batches():
    from types import SimpleNamespace

    from admm_onnx.training import RECENT_BATCHES, RECENT_BYTES, Trainer

    holder = SimpleNamespace(recent_feeds=[])
    feeds = [{"input": np.full((2, 3), i, np.float32)} for i in range(RECENT_BATCHES + 10)]
    for f in feeds:
        Trainer._remember(holder, f)
    assert holder.recent_feeds == feeds[-RECENT_BATCHES:]
    big = {"input": np.broadcast_to(np.float32(0), (RECENT_BYTES // 8 + 1,))}  # over half the byte budget, not allocated
    Trainer._remember(holder, big)
    Trainer._remember(holder, big)
    assert len(holder.recent_feeds) == 1 and holder.recent_feeds[0] is big
