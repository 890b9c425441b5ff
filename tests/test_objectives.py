"""Objectives (admm_onnx/losses.py) and metrics (admm_onnx/metrics.py): label-free pruning by
self-distillation from the dense model, on models that are not (N, C) classifiers, with
fidelity to the dense model reported."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import admm_onnx
from admm_onnx._ort import api
from admm_onnx.cli.main import main
from admm_onnx.losses import CrossEntropy, Distillation, make_loss, teacher_name
from admm_onnx.metrics import Fidelity, Top1
from admm_onnx.training import build_artifacts

from test_zoo_fixtures import feed_for

ZOO = Path(__file__).parent / "fixtures" / "zoo"
QUICK = ["--admm-iters", "2", "--retrain-epochs", "1", "--batch-size", "16", "-q"]


def _model(nodes, inits, inp, out, opset=17):
    graph = helper.make_graph(nodes, "m", [inp], [out], [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def embedding_model(seed=0):
    """x (N, 12) -> Relu(x W1 + b1) W2 -> "embedding" (N, 8): an encoder, not a classifier."""
    rng = np.random.default_rng(seed)
    inits = {"w1": rng.standard_normal((12, 32)).astype(np.float32) * 0.3, "b1": np.zeros(32, np.float32),
             "w2": rng.standard_normal((32, 8)).astype(np.float32) * 0.2}
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h0"]), helper.make_node("Add", ["h0", "b1"], ["h1"]),
             helper.make_node("Relu", ["h1"], ["h"]), helper.make_node("MatMul", ["h", "w2"], ["embedding"])]
    return _model(nodes, inits, helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 12]),
                  helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", 8]))


def segmentation_model(seed=0, classes=3):
    """image (N, 2, 8, 8) -> conv 3x3 -> Relu -> conv 1x1 -> "logits" (N, C, 8, 8): per-pixel scores."""
    rng = np.random.default_rng(seed)
    inits = {"c1.weight": rng.standard_normal((8, 2, 3, 3)).astype(np.float32) * 0.3,
             "c1.bias": np.zeros(8, np.float32),
             "c2.weight": rng.standard_normal((classes, 8, 1, 1)).astype(np.float32) * 0.3}
    nodes = [helper.make_node("Conv", ["image", "c1.weight", "c1.bias"], ["a"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["r"]), helper.make_node("Conv", ["r", "c2.weight"], ["logits"])]
    return _model(nodes, inits, helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 2, 8, 8]),
                  helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes, 8, 8]))


def _weights(path):
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def _prune(tmp_path, model, arrays, *extra):
    onnx.save(model, str(tmp_path / "m.onnx"))
    np.savez(tmp_path / "d.npz", **arrays)
    code = main(["prune", str(tmp_path / "m.onnx"), "-d", str(tmp_path / "d.npz"), "-o", str(tmp_path / "p.onnx"),
                 "--sparsity", "0.5", "--report", str(tmp_path / "r.json"), *QUICK, *extra])
    assert code == 0
    return json.loads((tmp_path / "r.json").read_text())


def test_embedding_model_prunes_by_distillation(tmp_path):
    x = np.random.default_rng(1).standard_normal((160, 12)).astype(np.float32)
    report = _prune(tmp_path, embedding_model(), {"x": x})
    assert report["objective"] == "distill" and report["outputs"] == ["embedding"]
    fid = report["fidelity_after"]
    assert set(fid) >= {"rel_mse", "cosine"} and "agreement" not in fid  # an embedding: no classes
    assert fid["cosine"] > 0.8 and fid["rel_mse"] < 0.5
    assert report["fidelity_before"]["rel_mse"] == pytest.approx(0.0, abs=1e-9)  # the dense model is the teacher
    assert report["phases"][-1]["fidelity"] == fid and report["accuracy_after"] is None
    assert np.mean(_weights(tmp_path / "p.onnx")["w1"] == 0) == 0.5


def test_segmentation_model_prunes_by_distillation_and_with_pixel_labels(tmp_path):
    rng = np.random.default_rng(2)
    image = rng.standard_normal((96, 2, 8, 8)).astype(np.float32)
    report = _prune(tmp_path, segmentation_model(), {"image": image})
    assert report["objective"] == "distill"
    fid = report["fidelity_after"]
    assert 0.5 < fid["agreement"] <= 1.0 and fid["kl"] >= 0 and "Fidelity to the dense model" in \
        admm_onnx.PruneReport.from_dict(report).summary()
    # per-pixel labels (N, H, W): cross-entropy over the class axis 1, top-1 per pixel
    labels = rng.integers(0, 3, (96, 8, 8))
    report = _prune(tmp_path, segmentation_model(), {"image": image, "labels": labels})
    assert report["objective"] == "cross_entropy" and 0 <= report["accuracy_after"] <= 1
    assert report["fidelity_after"]["agreement"] > 0
    report = _prune(tmp_path, segmentation_model(), {"image": image, "labels": labels}, "--loss", "ce+distill")
    assert report["objective"] == "ce+distill"


def test_distillation_loss_is_the_scaled_kl_and_mse(tmp_path):
    """The Block's value equals T^2 KL(softmax(t/T) || softmax(s/T)) averaged over positions
    (class axis 1 of an NCHW output), computed in NumPy."""
    model = segmentation_model()
    build_artifacts(model, tmp_path, ["c1.weight", "c1.bias", "c2.weight"], Distillation(temperature=3.0), "logits",
                    outputs=False)
    state = api.CheckpointState.load_checkpoint(str(tmp_path / "checkpoint"))
    module = api.Module(str(tmp_path / "training_model.onnx"), state, str(tmp_path / "eval_model.onnx"))
    rng = np.random.default_rng(0)
    image = rng.standard_normal((4, 2, 8, 8)).astype(np.float32)
    import onnxruntime as ort

    (s,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"image": image})
    t = s + rng.standard_normal(s.shape).astype(np.float32)
    feeds = {"image": image, teacher_name("logits"): t}
    module.eval()
    loss = float(module(*[feeds[n] for n in module.input_names()]))

    def log_softmax(z):
        z = z - z.max(1, keepdims=True)
        return z - np.log(np.exp(z).sum(1, keepdims=True))

    lt, ls = log_softmax(t.astype(np.float64) / 3), log_softmax(s.astype(np.float64) / 3)
    expected = 9 * (np.exp(lt) * (lt - ls)).sum(1).mean()
    assert loss == pytest.approx(expected, rel=1e-4)
    assert Distillation(kinds={"logits": "mse"}).kinds == {"logits": "mse"}


def test_make_loss_resolves_names():
    assert make_loss("auto", True)[0] == "cross_entropy"
    assert make_loss("auto", True, float_labels=True)[0] == "mse"
    assert make_loss("auto", False)[0] == "distill"
    assert isinstance(make_loss("cross_entropy", True)[1], CrossEntropy)
    with pytest.raises(admm_onnx.ConfigError, match="needs labels"):
        make_loss("cross_entropy", False)
    with pytest.raises(admm_onnx.ConfigError):
        admm_onnx.PruneConfig(loss="kl")


def test_metrics_plugins_by_hand():
    s = np.array([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    t = np.array([[1.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    top1 = Top1(["o"], {"o": "kl"})
    top1.update({"o": s}, None, np.array([0, 1, 1]))
    assert top1.result()["accuracy"] == pytest.approx(2 / 3)
    fid = Fidelity(["o"], {"o": "kl"})
    fid.update({"o": s}, {"o": t}, None)
    r = fid.result()["fidelity"]
    assert r["agreement"] == pytest.approx(2 / 3)
    assert r["rel_mse"] == pytest.approx(((s - t) ** 2).sum() / (t ** 2).sum())
    assert 0 < r["cosine"] < 1 and r["kl"] > 0


def test_bert_tokens_prune_without_labels(tmp_path):
    """The issue's command on the 3-input Hugging Face BERT, no labels: distillation."""
    feed = feed_for(onnx.load(str(ZOO / "bert_seqcls.onnx")), batch=64, seq=8, seed=0)
    np.savez(tmp_path / "tokens.npz", **feed)
    out = tmp_path / "bert.pruned.onnx"
    assert main(["prune", str(ZOO / "bert_seqcls.onnx"), "-d", str(tmp_path / "tokens.npz"), "-o", str(out),
                 "--sparsity", "0.5", "--report", str(tmp_path / "r.json"), *QUICK]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["objective"] == "distill" and report["fidelity_after"]["agreement"] > 0.5
    assert np.mean(_weights(out)["model.classifier.weight"] == 0) == 0.5


def test_token_classifier_with_token_labels(tmp_path):
    """(N, T, C) logits with (N, T) labels, padding tokens labelled -100 (ignored)."""
    model = onnx.load(str(ZOO / "bert_tokcls.onnx"))
    feed = feed_for(model, batch=64, seq=8, seed=0)
    labels = np.random.default_rng(0).integers(0, 5, (64, 8))
    labels[feed["attention_mask"] == 0] = -100
    np.savez(tmp_path / "t.npz", **feed, labels=labels)
    assert main(["prune", str(ZOO / "bert_tokcls.onnx"), "-d", str(tmp_path / "t.npz"), "-o", str(tmp_path / "p.onnx"),
                 "--sparsity", "0.5", "--report", str(tmp_path / "r.json"), *QUICK]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["objective"] == "cross_entropy" and 0 <= report["accuracy_after"] <= 1
    assert "agreement" in report["fidelity_after"]


def test_two_outputs_selected(tmp_path):
    """Two heads, both distilled: a KL term on the class scores, MSE on the boxes."""
    feed = feed_for(onnx.load(str(ZOO / "cnn_two_heads.onnx")), batch=64, seed=0)
    np.savez(tmp_path / "i.npz", **feed)
    assert main(["prune", str(ZOO / "cnn_two_heads.onnx"), "-d", str(tmp_path / "i.npz"), "-o", str(tmp_path / "p.onnx"),
                 "--sparsity", "0.5", "--model-output", "class_logits", "--model-output", "boxes",
                 "--report", str(tmp_path / "r.json"), *QUICK]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["outputs"] == ["class_logits", "boxes"]
    per = report["fidelity_after"]["outputs"]
    assert "agreement" in per["class_logits"] and "agreement" not in per["boxes"] and per["boxes"]["cosine"] > 0


def test_api_takes_any_block_as_loss(tmp_path):
    model = embedding_model()
    x = np.random.default_rng(1).standard_normal((64, 12)).astype(np.float32)
    config = admm_onnx.PruneConfig(admm_iters=1, retrain_epochs=1, batch_size=16).with_sparsity(0.5)
    reader = admm_onnx.ArrayReader({"x": x}, None, 16)
    report = admm_onnx.prune(model, tmp_path / "p.onnx", reader, config, reader, loss=Distillation(kinds={"embedding": "mse"}))
    assert report.objective == "Distillation" and report.fidelity_after["cosine"] > 0


def test_sklearn_mlp_default_export_prunes_with_no_extra_flags(tmp_path):
    """skl2onnx's MLPClassifier export (int64 label output first, ZipMap probabilities): only
    --sparsity given; the written model keeps both outputs and runs."""
    from sklearn.datasets import load_digits

    import onnxruntime as ort

    digits = load_digits()
    np.savez(tmp_path / "digits.npz", x=digits.data.astype(np.float32), y=digits.target)
    out = tmp_path / "mlp.pruned.onnx"
    assert main(["prune", str(ZOO / "sklearn_mlp.onnx"), "-d", str(tmp_path / "digits.npz"), "-o", str(out),
                 "--sparsity", "0.5", "--report", str(tmp_path / "r.json"), "-q"]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["outputs"] == ["output_probability"] and report["accuracy_after"] > 0.5
    written = onnx.load(str(out))
    assert [o.name for o in written.graph.output] == [o.name for o in onnx.load(str(ZOO / "sklearn_mlp.onnx")).graph.output]
    label, probs = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(
        None, {"X": digits.data[:5].astype(np.float32)})
    assert label.shape == (5,) and len(probs) == 5
