"""Tiny real-library exports (tests/fixtures/zoo, made by make_zoo_fixtures.py): each is prepared
for training, gets its training artifacts built on the default output and takes a training step
in which every trainable parameter moves; the written-model side keeps its signature."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from admm_onnx._ort import api, onnxblock
from admm_onnx.graph.analysis import analyse, graph_inputs, value_shape
from admm_onnx.graph.differentiable import undifferentiable_nodes
from admm_onnx.graph.outputs import default_output
from admm_onnx.graph.prepare import prepare_for_training
from admm_onnx.training import build_artifacts

ZOO = Path(__file__).parent / "fixtures" / "zoo"

#: fixture -> (default output, parameters that must be trainable)
FIXTURES = {
    "bert_seqcls.onnx": ("logits", ["model.bert.embeddings.word_embeddings.weight", "model.classifier.weight"]),
    "bert_tokcls.onnx": ("logits", ["model.bert.embeddings.token_type_embeddings.weight"]),
    "distilbert_seqcls.onnx": ("logits", ["model.distilbert.embeddings.position_embeddings.weight"]),
    "sentence_embedding.onnx": ("sentence_embedding", ["encoder.embeddings.word_embeddings.weight"]),
    "cnn_two_heads.onnx": ("class_logits", []),
    "sklearn_mlp.onnx": ("output_probability", ["coefficient", "coefficient1"]),
    "timm_mobilenetv3.onnx": ("logits", []),
    "timm_mobilenetv3_dynamo.onnx": ("logits", []),
    "timm_vit.onnx": ("logits", ["cls_token", "pos_embed"]),
    "timm_vit_dynamo_ext.onnx": ("logits", ["cls_token", "pos_embed"]),
}


class MSEToTarget(onnxblock.Block):
    """Mean squared error of the output against a fed ``target`` of its shape (any output rank)."""

    def __init__(self):
        super().__init__()
        self._mse = onnxblock.loss.MSELoss()

    def build(self, output_name):
        return self._mse(output_name, "target")


def feed_for(model: onnx.ModelProto, batch=2, seq=6, seed=0):
    rng = np.random.default_rng(seed)
    feed = {}
    for value in graph_inputs(model):
        shape = [d if isinstance(d, int) else (batch if i == 0 else seq) for i, d in enumerate(value_shape(value))]
        dtype = helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
        if np.issubdtype(dtype, np.integer):
            if "mask" in value.name:
                arr = np.ones(shape, dtype)
                arr[0, seq // 2 :] = 0
            elif "type" in value.name:
                arr = np.zeros(shape, dtype)
            else:
                arr = rng.integers(0, 90, shape).astype(dtype)
        else:
            arr = rng.standard_normal(shape).astype(dtype)
        feed[value.name] = arr
    return feed


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_fixture_prepares_builds_and_trains(name, tmp_path):
    path = ZOO / name
    original = onnx.load(str(path))
    feed = feed_for(original)
    model = onnx.load(str(path))
    prepare_for_training(model)
    output, must_train = FIXTURES[name]
    assert default_output(model) == output
    info = analyse(model, output)
    assert info.prunable and set(must_train) <= set(info.trainable)
    assert undifferentiable_nodes(model, info.trainable, output) == []
    build_artifacts(model, tmp_path / "art", info.trainable, MSEToTarget(), output)
    state = api.CheckpointState.load_checkpoint(str(tmp_path / "art" / "checkpoint"))
    module = api.Module(str(tmp_path / "art" / "training_model.onnx"), state, str(tmp_path / "art" / "eval_model.onnx"))
    optimizer = api.Optimizer(str(tmp_path / "art" / "optimizer_model.onnx"), module)
    optimizer.set_learning_rate(1e-2)
    # The training copy runs as an inference model too: its output gives the target's shape.
    (trained_out,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run([output], feed)
    probe = {**feed, "target": np.random.default_rng(1).standard_normal(trained_out.shape).astype(np.float32)}
    before = {n: np.array(state.parameters[n].data) for n in info.trainable}
    module.train()
    loss, _ = module(*[probe[n] for n in module.input_names()])
    optimizer.step()
    module.lazy_reset_grad()
    assert np.isfinite(float(loss))
    moved = [n for n in info.trainable if not np.array_equal(np.array(state.parameters[n].data), before[n])]
    assert set(must_train) <= set(moved)
    assert set(info.prunable) <= set(moved)
