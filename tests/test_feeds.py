"""Feeds for any model (admm_onnx/feeds.py): several inputs, each in its own dtype; .npz keyed by
input names with optional labels; any reader with get_next() (an ORT CalibrationDataReader)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

import admm_onnx
from admm_onnx.cli.main import main
from admm_onnx.data import LABELS, load_dataset
from admm_onnx.errors import DataError
from admm_onnx.feeds import FeedDataset, fit_array, input_specs, reader_for

from test_zoo_fixtures import feed_for

BERT = Path(__file__).parent / "fixtures" / "zoo" / "bert_seqcls.onnx"
QUICK = ["--admm-iters", "1", "--retrain-epochs", "1", "--batch-size", "16", "-q"]


@pytest.fixture()
def tokens(tmp_path):
    feed = feed_for(onnx.load(str(BERT)), batch=64, seq=8, seed=0)
    labels = np.random.default_rng(0).integers(0, 3, 64)
    return feed, labels


def test_input_specs_and_int_inputs_stay_int(tokens):
    specs = input_specs(onnx.load(str(BERT)))
    assert [(s.name, s.dtype) for s in specs] == [
        ("input_ids", np.int64), ("attention_mask", np.int64), ("token_type_ids", np.int64)]
    ids = next(s for s in specs if s.name == "input_ids")
    assert fit_array(tokens[0]["input_ids"].astype(np.int32), ids).dtype == np.int64
    assert fit_array(tokens[0]["input_ids"].astype(np.float32), ids).dtype == np.int64  # integral floats accepted
    with pytest.raises(DataError, match="non-integer"):
        fit_array(np.full((2, 8), 0.5, np.float32), ids)
    float_spec = admm_onnx.feeds.InputSpec("x", np.dtype(np.float32), ("N", 4))
    assert fit_array(np.full((2, 4), 255, np.uint8), float_spec).max() == 1.0


def test_npz_keyed_by_input_names(tmp_path, tokens):
    feed, labels = tokens
    np.savez(tmp_path / "a.npz", **feed, target=labels)
    data = load_dataset(str(tmp_path / "a.npz"), labels_key="target")
    assert isinstance(data, FeedDataset) and data.has_labels
    assert len(data.y_train) + len(data.y_test) == 64 and len(data.y_test) == 6  # 10% held out
    assert set(data.train) == set(feed) and data.train["input_ids"].dtype == np.int64
    # explicit evaluation arrays under test/NAME
    np.savez(tmp_path / "b.npz", **feed, labels=labels, **{f"test/{k}": v[:5] for k, v in feed.items()},
             **{"test/labels": labels[:5]})
    data = load_dataset(str(tmp_path / "b.npz"))
    assert len(data.y_train) == 64 and len(data.y_test) == 5
    # no labels: fine here (distillation needs none)
    np.savez(tmp_path / "c.npz", **feed)
    assert not load_dataset(str(tmp_path / "c.npz")).has_labels
    with pytest.raises(DataError, match="no labels under 'y2'"):
        load_dataset(str(tmp_path / "a.npz"), labels_key="y2")


def test_missing_input_is_one_line_error(tmp_path, tokens, capsys):
    feed, labels = tokens
    np.savez(tmp_path / "d.npz", input_ids=feed["input_ids"], labels=labels)
    code = main(["prune", str(BERT), "-d", str(tmp_path / "d.npz"), "-o", str(tmp_path / "o.onnx"), "--sparsity", "0.5",
                 *QUICK])
    err = capsys.readouterr().err
    assert code == 2 and "attention_mask" in err and "Traceback" not in err
    assert not (tmp_path / "o.onnx").exists()


def test_bert_three_inputs_prunes_with_labels(tmp_path, tokens, capsys):
    feed, labels = tokens
    np.savez(tmp_path / "tokens.npz", **feed, labels=labels)
    out = tmp_path / "bert.pruned.onnx"
    assert main(["prune", str(BERT), "-d", str(tmp_path / "tokens.npz"), "-o", str(out), "--sparsity", "0.5",
                 "--workers", "2", *QUICK]) == 0
    import onnxruntime as ort

    written = onnx.load(str(out))
    assert [i.name for i in written.graph.input] == ["input_ids", "attention_mask", "token_type_ids"]
    w = {t.name: onnx.numpy_helper.to_array(t) for t in written.graph.initializer}
    assert np.mean(w["model.classifier.weight"] == 0) == 0.5
    (logits,) = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, feed)
    assert logits.shape == (64, 3) and np.isfinite(logits).all()


class CalibrationLikeReader:
    """The shape of onnxruntime.quantization.CalibrationDataReader: get_next() only, one
    sample per feed, then None; no rewind, no len. Labels under 'label'."""

    def __init__(self, feed, labels):
        self.items = [{**{k: v[i : i + 1] for k, v in feed.items()}, "label": labels[i : i + 1]}
                      for i in range(len(labels))]
        self.it = iter(self.items)

    def get_next(self):
        return next(self.it, None)


def test_calibration_reader_is_read_once_and_batched(tokens):
    feed, labels = tokens
    specs = input_specs(onnx.load(str(BERT)))
    reader = reader_for(CalibrationLikeReader(feed, labels), specs, batch_size=16, seed=0)
    batches = list(reader)
    assert len(batches) == 4 and all(b["input_ids"].shape == (16, 8) for b in batches)
    assert sorted(np.concatenate([b[LABELS] for b in batches]).tolist()) == sorted(labels.tolist())
    again = list(reader)  # a second epoch, reshuffled, from memory
    assert len(again) == 4 and not np.array_equal(again[0]["input_ids"], batches[0]["input_ids"])


def test_api_prune_takes_a_calibration_reader(tmp_path, tokens):
    feed, labels = tokens
    config = admm_onnx.PruneConfig(admm_iters=1, retrain_epochs=1, batch_size=16).with_sparsity(0.5)
    report = admm_onnx.prune(str(BERT), tmp_path / "p.onnx", CalibrationLikeReader(feed, labels), config,
                             eval_reader=CalibrationLikeReader(feed, labels))
    assert report.accuracy_after is not None and (tmp_path / "p.onnx").is_file()


@pytest.mark.parametrize("with_labels", [True, False])
def test_bert_budget_and_sensitivity_take_several_inputs(tmp_path, tokens, capsys, with_labels):
    """A budget's sensitivity sweep feeds every input (it used to feed the first only: an internal
    error); without labels it measures KL from the dense model, as distillation does."""
    feed, labels = tokens
    np.savez(tmp_path / "t.npz", **feed, **({"labels": labels} if with_labels else {}))
    out = tmp_path / "bert.budget.onnx"
    assert main(["prune", str(BERT), "-d", str(tmp_path / "t.npz"), "-o", str(out), "--compression", "2x",
                 *QUICK]) == 0
    assert "Allocation for 2x compression" in capsys.readouterr().out
    assert main(["sensitivity", str(BERT), "-d", str(tmp_path / "t.npz"), "--no-cache", "--workers", "1",
                 "--samples", "16", "--levels", "50%", "--metric", "loss" if with_labels else "kl", "-q"]) == 0
    assert "evaluation(s)" in capsys.readouterr().out


def test_uint8_in_the_x_y_forms_is_scaled_for_float_inputs_only(tmp_path):
    """x_train in uint8 used to be scaled to [0, 1] when read, so uint8 token ids for an int64
    input were refused as non-integer; it is kept, and scaled only when fitted to a float input."""
    ids = np.random.default_rng(0).integers(0, 50, (40, 6)).astype(np.uint8)
    np.savez(tmp_path / "t.npz", x_train=ids, y_train=np.zeros(40, np.int64))
    data = load_dataset(str(tmp_path / "t.npz"))
    int_spec = admm_onnx.feeds.InputSpec("ids", np.dtype(np.int64), ("N", 6))
    float_spec = admm_onnx.feeds.InputSpec("x", np.dtype(np.float32), ("N", 6))
    fitted = fit_array(data.x_train, int_spec)
    assert fitted.dtype == np.int64 and fitted.max() > 1  # the ids themselves, not ids / 255
    assert {tuple(row) for row in fitted} <= {tuple(row) for row in ids.astype(np.int64)}
    assert np.array_equal(fit_array(data.x_train, float_spec), data.x_train.astype(np.float32) / 255)
