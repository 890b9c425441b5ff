"""The ONNX model zoo's classic CNNs (the light models in the onnx wheel: weights replaced by
ConstantOfShape) materialised with random weights, prepared for ORT training, and pruned end
to end (one ADMM iteration, one retraining epoch, a few random batches).

The default suite checks the rewrites on all nine architectures (fast: no weights) and prunes
SqueezeNet at a reduced input size; the full-size runs are marked slow.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from admm_onnx import pipeline
from admm_onnx.config import PruneConfig
from admm_onnx.data import Dataset
from admm_onnx.errors import ModelError
from admm_onnx.graph.analysis import analyse, graph_inputs
from admm_onnx.graph.differentiable import undifferentiable_nodes
from admm_onnx.graph.materialize import LIGHT_MODELS, light_model, light_model_path, materialize_weights, resize_input
from admm_onnx.graph.outputs import output_view
from admm_onnx.graph.prepare import prepare_for_training

#: Ops of each light model that ORT training 1.19.2 cannot differentiate as exported.
NEEDS_REWRITE = {
    "bvlc_alexnet": {"LRN"}, "zfnet512": {"LRN"}, "inception_v1": {"LRN", "AveragePool"},
    "resnet50": {"Sum", "AveragePool"}, "shufflenet": {"Sum", "AveragePool"},
    "densenet121": {"AveragePool"}, "inception_v2": {"AveragePool"}, "squeezenet": set(), "vgg19": set(),
}
#: Spatial input sizes the architecture allows besides 224 (global pooling, no baked Reshape).
RESIZABLE = {"densenet121", "squeezenet"}


def weight_names(model):
    return [n.output[0] for n in model.graph.node if n.op_type == "ConstantOfShape"]


def test_the_nine_light_models_ship_with_onnx():
    assert set(NEEDS_REWRITE) == set(LIGHT_MODELS)
    for name in LIGHT_MODELS:
        model = onnx.load(str(light_model_path(name)))
        assert model.ir_version == 3 and model.opset_import[0].version == 9
    with pytest.raises(ModelError, match="no light model"):
        light_model_path("lenet")


@pytest.mark.parametrize("name", LIGHT_MODELS)
def test_rewrites_make_the_architecture_differentiable(name):
    """On the weightless light model: the ConstantOfShape outputs stand in for parameters."""
    model = onnx.load(str(light_model_path(name)))
    params, out = weight_names(model), model.graph.output[0].name
    assert {n.op_type for n in undifferentiable_nodes(model, params, out)} == NEEDS_REWRITE[name]
    training = onnx.ModelProto()
    training.CopyFrom(model)
    counts = prepare_for_training(training)
    assert undifferentiable_nodes(training, params, out) == []
    assert training.opset_import[0].version == 17 and training.ir_version >= 8
    assert not {i.name for i in training.graph.input} & {t.name for t in training.graph.initializer}
    assert counts["class outputs trained as (N, C) logits"] == 1  # every zoo head is a softmax or (N, C, 1, 1)
    assert [o.name for o in training.graph.output] == [o.name for o in model.graph.output]
    assert len(training.graph.output[0].type.tensor_type.shape.dim) == 2
    assert model.opset_import[0].version == 9  # the user's graph is untouched


@pytest.mark.parametrize("name", sorted(RESIZABLE) + ["bvlc_alexnet", "resnet50"])
def test_reduced_input_size_only_where_the_architecture_allows(name):
    model = onnx.load(str(light_model_path(name)))
    if name in RESIZABLE:
        small = resize_input(model, (64, 64))
        assert [d.dim_value for d in graph_inputs(small)[0].type.tensor_type.shape.dim] == [1, 3, 64, 64]
    else:
        with pytest.raises(ModelError, match="does not allow input size"):
            resize_input(model, (64, 64))


def test_materialised_weights_are_seeded_and_he_scaled():
    model = light_model("squeezenet", seed=3, size=(32, 32))
    assert model.ir_version == 3 and not any(n.op_type == "ConstantOfShape" for n in model.graph.node)
    onnx.checker.check_model(model, full_check=True)
    w = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    conv1 = w["conv1_w_0"]  # (64, 3, 3, 3): fan-in 27
    assert abs(conv1.std() - np.sqrt(2 / 27)) < 0.1 * np.sqrt(2 / 27)
    again = light_model("squeezenet", seed=3, size=(32, 32))
    assert all(np.array_equal(w[t.name], numpy_helper.to_array(t)) for t in again.graph.initializer)
    assert {t.name for t in model.graph.initializer} <= {i.name for i in model.graph.input}  # IR 3 lists them


def test_reshaped_classifier_weight_is_materialised_and_prunable():
    """Inception v1 feeds its classifier weight (1000, 1024, 1, 1)-style through a Reshape."""
    model = materialize_weights(onnx.load(str(light_model_path("inception_v1"))), calibrate=False)
    w = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}["loss3/classifier_w_0"]
    assert abs(w.std() - np.sqrt(2 / 1024)) < 0.05 * np.sqrt(2 / 1024)
    info = analyse(model)
    assert (info.prunable["loss3/classifier_w_0"].out_axis, info.prunable["loss3/classifier_w_0"].in_axis) == (
        w.shape.index(1000), w.shape.index(1024),
    )


def test_batchnorm_calibration_keeps_deep_nets_unsaturated():
    model = light_model("shufflenet")
    x = np.random.default_rng(5).standard_normal((1, 3, 224, 224)).astype(np.float32)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (probs,) = sess.run(None, {graph_inputs(model)[0].name: x})
    assert 1e-4 < probs.max() < 0.99  # softmax not saturated: logits of unit scale


# -- end to end ---------------------------------------------------------------------------------------
def prune_zoo(model, tmp_path, batches=2, sparsity=0.5):
    """Prune ``model`` on ``batches`` random batches of its fixed batch size; check the output."""
    prepared = pipeline.prepare_model(model)
    shape = [d if isinstance(d, int) else 1 for d in prepared.input_shape]
    n = shape[0] * batches
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, *shape[1:])).astype(np.float32)
    y = rng.integers(0, 1000, n)
    data = Dataset(x, y, x[: shape[0]], y[: shape[0]], name="random")
    train, evaluate, _ = pipeline.make_readers(prepared, data, shape[0])
    out = tmp_path / "pruned.onnx"
    config = PruneConfig(admm_iters=1, epochs_per_iter=1, retrain_epochs=1).with_sparsity(sparsity)
    pipeline.prune(prepared, out, train, config, evaluate)

    written = onnx.load(str(out))
    assert [i.name for i in graph_inputs(written)] == [i.name for i in graph_inputs(model)]
    assert [o.name for o in written.graph.output] == [o.name for o in model.graph.output]
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    feed = {prepared.input_name: x[: shape[0]]}
    (probs,) = sess.run([prepared.output_name], feed)
    assert np.isfinite(probs).all()
    weights = {t.name: numpy_helper.to_array(t) for t in written.graph.initializer}
    assert len(prepared.info.prunable) > 0
    for name in prepared.info.prunable:
        assert np.mean(weights[name] == 0) >= sparsity, name
    # The written model computes what the training copy computes (softmax of its logits).
    training = onnx.ModelProto()
    training.CopyFrom(written)
    prepare_for_training(training)
    for node in training.graph.node:  # as in ORT's eval model
        if node.op_type == "Dropout":
            node.input[2] = ""
    (logits,) = ort.InferenceSession(training.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        [prepared.output_name], feed
    )
    view = output_view(written, prepared.output_name)
    scale = max(1.0, float(np.abs(probs).max()))
    np.testing.assert_allclose(view.from_logits(logits, like=probs), probs, rtol=1e-3, atol=1e-5 * scale)
    return prepared


def test_squeezenet_small_prunes_end_to_end(tmp_path):
    prepared = prune_zoo(light_model("squeezenet", size=(64, 64)), tmp_path)
    assert len(prepared.info.prunable) == 26 and prepared.fixed_batch == 1


#: (name, input size for the run): the full 224 unless the architecture allows smaller.
FULL = [(n, (64, 64) if n in RESIZABLE else None) for n in LIGHT_MODELS if n != "vgg19"]


@pytest.mark.slow
@pytest.mark.parametrize("name,size", FULL)
def test_zoo_model_prunes_end_to_end(name, size, tmp_path):
    prepared = prune_zoo(light_model(name, size=size), tmp_path)
    assert prepared.info.prunable


@pytest.mark.slow
def test_vgg19_prunes_end_to_end(tmp_path, caplog):
    """143.7M parameters: checkpoints with AdamW moments would pass ORT's 2 GB file limit, so the
    work directory keeps them without the optimizer state (and says so)."""
    import logging

    logging.getLogger("admm_onnx").propagate = True  # a CLI test earlier in the run may have cut it
    prune_zoo(light_model("vgg19"), tmp_path)
    assert "leave out the optimizer state" in caplog.text
