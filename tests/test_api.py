"""The Python API: same result as the CLI, readers, and the user-owned ORT loop example."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

import admm_onnx
from admm_onnx.cli.main import main

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ort_training_loop.py"


def _weights(path):
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def test_api_and_cli_give_the_same_model(lenet5_small, data_npz, tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text("sparsity = 0.75\nadmm_iters = 2\nretrain_epochs = 1\nbatch_size = 32\nseed = 5\nrho = 0.01\n")
    assert main(["prune", str(lenet5_small), "-d", str(data_npz), "-o", str(tmp_path / "cli.onnx"),
                 "--config", str(toml), "--quiet"]) == 0

    prepared = admm_onnx.prepare_model(str(lenet5_small))
    train_reader, eval_reader, _ = admm_onnx.make_readers(prepared, admm_onnx.load_dataset(str(data_npz)), 32, seed=5)
    report = admm_onnx.prune(str(lenet5_small), tmp_path / "api.onnx", train_reader, str(toml), eval_reader)
    assert isinstance(report, admm_onnx.PruneReport) and report.output == str(tmp_path / "api.onnx")
    a, b = _weights(tmp_path / "cli.onnx"), _weights(tmp_path / "api.onnx")
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])


def test_api_accepts_model_proto_dict_config_and_iterable_reader(mlp_small, data, tmp_path):
    model = onnx.load(str(mlp_small))
    pairs = [(data.x_train[i : i + 32], data.y_train[i : i + 32]) for i in range(0, 448, 32)]
    reader = admm_onnx.IterableReader(pairs)
    report = admm_onnx.prune(model, tmp_path / "o.onnx", reader, {"sparsity": 0.6, "admm_iters": 1, "retrain_epochs": 1, "threads": 1})
    assert report.accuracy_after is None  # no eval reader
    assert all(r.nonzero <= 0.4 * r.weights for r in report.layers)


def test_array_readers_batch_shuffle_and_pad(data, tmp_path):
    r = admm_onnx.ArrayReader(data.x_test, data.y_test, batch_size=50, pad_last=True)
    feeds = list(r)
    assert [len(f["input"]) for f in feeds] == [50, 50, 50]
    assert int(feeds[-1]["__valid__"]) == 20
    npz = tmp_path / "d.npz"
    np.savez(npz, x=data.x_train, y=data.y_train)
    n = admm_onnx.NpzReader(npz, "test", batch_size=8, shuffle=True, seed=1)
    first = [f["input"].copy() for f in n]
    n.set_epoch(0)
    again = [f["input"].copy() for f in n]
    n.set_epoch(0)
    assert all(np.array_equal(a, b) for a, b in zip(again, [f["input"] for f in n]))
    assert sum(len(f) for f in first) == len(n.x) == round(0.1 * len(data.x_train))


def test_example_ort_training_loop_runs(lenet5_small, data_npz, tmp_path):
    out = tmp_path / "pruned.onnx"
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE), "--model", str(lenet5_small), "--data", str(data_npz), "--output", str(out),
         "--sparsity", "0.8", "--admm-iters", "2", "--retrain-epochs", "2"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "pruned top-1" in proc.stdout
    w = _weights(out)
    for name in ("conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"):
        assert (w[name] == 0).mean() >= 0.8


def test_api_arguments_of_the_wrong_kind_are_errors_of_the_tool(mlp_small, data, tmp_path):
    """Misused entry points raise the tool's own errors with a sentence, not AttributeError or
    KeyError from deep inside (third safety sweep, 2026-12-05); nothing is written."""
    import pytest

    from admm_onnx.errors import AdmmOnnxError

    reader = admm_onnx.ArrayReader(data.x_train[:64], data.y_train[:64], 32)
    calls = {
        "prepare_model(None)": lambda: admm_onnx.prepare_model(None),
        "prepare_model(int)": lambda: admm_onnx.prepare_model(3),
        "prepare_model(output=5)": lambda: admm_onnx.prepare_model(str(mlp_small), 5),
        "load_dataset(None)": lambda: admm_onnx.load_dataset(None),
        "make_readers(data=dict)": lambda: admm_onnx.make_readers(admm_onnx.prepare_model(str(mlp_small)), {}, 32),
        "make_readers(batch='8')": lambda: admm_onnx.make_readers(admm_onnx.prepare_model(str(mlp_small)), data, "8"),
        "evaluate(reader=None)": lambda: admm_onnx.evaluate(str(mlp_small), None),
        "evaluate(reader=list)": lambda: admm_onnx.evaluate(str(mlp_small), [1, 2]),
        "evaluate(output='nope')": lambda: admm_onnx.evaluate(str(mlp_small), reader, "nope"),
        "prune(output=None)": lambda: admm_onnx.prune(str(mlp_small), None, reader, {"sparsity": 0.5}),
        "prune(loss='x')": lambda: admm_onnx.prune(str(mlp_small), tmp_path / "o.onnx", reader, {"sparsity": 0.5},
                                                   loss="x"),
        "train(epochs=None)": lambda: admm_onnx.train(str(mlp_small), tmp_path / "o.onnx", reader, None),
        "export_pruned(weights=None)": lambda: admm_onnx.export_pruned(str(mlp_small), tmp_path / "o.onnx", None),
        "export_pruned(mask unknown)": lambda: admm_onnx.export_pruned(str(mlp_small), tmp_path / "o.onnx", {},
                                                                       {"nope": np.ones(3)}),
        "insert_masks(unknown)": lambda: admm_onnx.insert_masks(onnx.load(str(mlp_small)), {"nope": np.ones(3)}),
        "analyse(path)": lambda: admm_onnx.analyse(str(mlp_small)),
        "load_config(None)": lambda: admm_onnx.load_config(None),
        "config_from_dict({1: 2})": lambda: admm_onnx.config_from_dict({1: 2}),
        "TopK(sparsity=2)": lambda: admm_onnx.TopK("w", 2.0),
        "Levels(bits=1)": lambda: admm_onnx.Levels("w", 1),
    }
    for label, call in calls.items():
        with pytest.raises(AdmmOnnxError):
            call()
            pytest.fail(label)
    assert [p.name for p in tmp_path.iterdir()] == [mlp_small.name]


def test_a_model_proto_still_pointing_at_external_data_is_refused(mlp_small, data, tmp_path):
    """onnxruntime would read the file the tensor names, from anywhere; a file model has its
    external data checked against its folder, a ModelProto has no folder."""
    import pytest

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    onnx.save(onnx.load(str(mlp_small)), str(outside / "m.onnx"), save_as_external_data=True,
              location="w.data", size_threshold=0)
    model = onnx.load(str(outside / "m.onnx"), load_external_data=False)
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = str(outside / "w.data")  # absolute: outside any model folder
    reader = admm_onnx.ArrayReader(data.x_train[:64], data.y_train[:64], 32)
    for call in (lambda: admm_onnx.prepare_model(model), lambda: admm_onnx.evaluate(model, reader)):
        with pytest.raises(admm_onnx.ModelError, match="external file"):
            call()
