"""Slow: ``admm-onnx prune`` with default settings (only --sparsity given) on each tiny real
export in tests/fixtures/zoo; the written model loads in ONNX Runtime with the signature of
the input model. Models with several inputs get a .npz keyed by input names; the sentence
embedding model (no classes) prunes without labels, by distillation from the dense model."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from test_zoo_fixtures import feed_for

ZOO = Path(__file__).parent / "fixtures" / "zoo"

CASES = {
    "cnn_two_heads.onnx": 4,
    "sklearn_mlp.onnx": 10,
    "timm_mobilenetv3.onnx": 10,
    "timm_mobilenetv3_dynamo.onnx": 10,
    "timm_vit.onnx": 10,
    "timm_vit_dynamo_ext.onnx": 10,
    "bert_seqcls.onnx": 3,
    "distilbert_seqcls.onnx": 2,
    "bert_tokcls.onnx": 5,
    "sentence_embedding.onnx": None,
}


def signature(model):
    return [(v.name, v.type.SerializeToString()) for v in model.graph.input], [
        (v.name, v.type.SerializeToString()) for v in model.graph.output]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_zoo_model_prunes_with_defaults(name, tmp_path):
    model = onnx.load(str(ZOO / name), load_external_data=False)
    inputs = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    for f in ZOO.glob(name + "*"):
        shutil.copy(f, tmp_path / f.name)
    feed = feed_for(model, batch=96, seed=0)
    rows = len(next(iter(feed.values())))
    per_token = name == "bert_tokcls.onnx"  # (N, T, C) logits: one label per token
    shape = (rows, next(iter(feed.values())).shape[1]) if per_token else (rows,)
    labels = {} if CASES[name] is None else {"labels": np.random.default_rng(0).integers(0, CASES[name], shape)}
    if len(inputs) > 1 or not labels:
        np.savez(tmp_path / "data.npz", **feed, **labels)
    else:
        (x,) = feed.values()
        y = labels["labels"]
        np.savez(tmp_path / "data.npz", x_train=x[:64], y_train=y[:64], x_test=x[64:], y_test=y[64:])
    out = tmp_path / "pruned.onnx"
    proc = subprocess.run(
        [sys.executable, "-m", "admm_onnx.cli.main", "prune", str(tmp_path / name), "-d", str(tmp_path / "data.npz"),
         "-o", str(out), "--sparsity", "0.5", "-q"], capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    written = onnx.load(str(out))
    assert signature(written) == signature(onnx.load(str(tmp_path / name)))
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    sess.run(None, {k: v[:3] for k, v in feed.items()})
