"""The command line: the happy path, and every bad input ends in one line and exit code 2."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from admm_onnx.cli.main import main

QUICK = ["--admm-iters", "1", "--retrain-epochs", "1", "--batch-size", "32", "--quiet"]


def _digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_rho_growth_without_growth_mode_is_a_usage_error(lenet5_small, data_npz, tmp_path, capsys):
    out = tmp_path / "pruned.onnx"
    code = main(["prune", str(lenet5_small), "-d", str(data_npz), "-o", str(out), "--sparsity", "0.75",
                 "--rho-growth", "1.5", *QUICK])
    err = capsys.readouterr().err
    assert code == 2 and "--rho-growth applies to --rho-mode growth only" in err
    assert "Traceback" not in err and not out.exists()


def test_prune_writes_model_report_and_table(lenet5_small, data_npz, tmp_path, capsys):
    out, report, csr = tmp_path / "pruned.onnx", tmp_path / "report.json", tmp_path / "pruned.csr.onnx"
    code = main(["prune", str(lenet5_small), "-d", str(data_npz), "-o", str(out), "--sparsity", "0.75",
                 "--report", str(report), "--sparse-output", str(csr), "--rho", "0.01", "--rho-mode", "growth", "--rho-growth", "1.5", "--lr", "0.002",
                 "--epochs-per-iter", "1", "--seed", "1", *QUICK])
    printed = capsys.readouterr().out
    assert code == 0
    assert "| Layer" in printed and "| Total" in printed and "Compression: 4.0x" in printed
    data = json.loads(report.read_text())
    assert data["total"]["compression"] == pytest.approx(4.0, rel=1e-3)
    assert [r["name"] for r in data["layers"]] == ["conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"]
    assert data["config"]["rho"] == 0.01 and data["config"]["seed"] == 1
    assert len(data["residuals"]) == 1 and set(data["residuals"][0]["fc1.weight"]) == {"primal", "dual", "rho"}
    assert 0.0 <= data["accuracy_after"] <= 1.0
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    assert csr.stat().st_size < out.stat().st_size / 2
    assert not (tmp_path / "pruned.onnx.admm-work").exists()


def test_config_file_rules(lenet5_small, data_npz, tmp_path, capsys):
    cfg = tmp_path / "prune.toml"
    cfg.write_text(
        'admm_iters = 1\nretrain_epochs = 1\nbatch_size = 32\n'
        '[[rules]]\nop_types = ["Gemm"]\nsparsity = 0.9\n'
        '[[rules]]\nnames = ["conv*"]\nsparsity = 0.5\nrho = 0.005\n'
    )
    out = tmp_path / "pruned.onnx"
    assert main(["prune", str(lenet5_small), "-d", str(data_npz), "-o", str(out), "--config", str(cfg), "--quiet"]) == 0
    w = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(out).graph.initializer}
    assert (w["fc1.weight"] == 0).mean() >= 0.9 and (w["conv2.weight"] == 0).mean() >= 0.5


def test_train_eval_and_models_build(tmp_path, data_npz, capsys):
    model = tmp_path / "m.onnx"
    assert main(["models", "build", "lenet300-100", "-o", str(model), "--input-shape", "1x8x8", "--classes", "4"]) == 0
    trained = tmp_path / "t.onnx"
    assert main(["train", str(model), "-d", str(data_npz), "-o", str(trained), "--epochs", "2", "--quiet"]) == 0
    assert main(["eval", str(trained), "-d", str(data_npz), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["accuracy"] > 0.5 and result["samples"] == 120


def test_console_script_reports_errors_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "admm_onnx.cli.main", "prune", str(tmp_path / "nope.onnx"), "-d", "x.npz",
         "-o", str(tmp_path / "o.onnx"), "--sparsity", "0.5"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "model file not found" in proc.stderr


# -- bad input: exit 2, one line, no traceback, input unchanged, no output left -------------
def _no_prunable_model(path):
    g = helper.make_graph(
        [helper.make_node("Relu", ["input"], ["logits"])], "g",
        [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["N", 4])],
    )
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def _bad_cases(tmp, model, good_npz, data):
    x, y = data.x_train, data.y_train
    text = tmp / "notes.txt"
    text.write_text("hello, not a model\n")
    truncated = tmp / "truncated.onnx"
    truncated.write_bytes(Path(model).read_bytes()[:300])
    noprune = tmp / "relu.onnx"
    _no_prunable_model(noprune)
    bad_toml = tmp / "bad.toml"
    bad_toml.write_text("sparsity = 0.5\nlearning_rate = 3\n")
    unknown_layer = tmp / "unknown.toml"
    unknown_layer.write_text('[[rules]]\nnames = ["fc9.weight"]\nsparsity = 0.5\n')
    contradict = tmp / "contra.toml"
    contradict.write_text('[[rules]]\nnames = ["fc1.weight"]\nsparsity = 0.5\n[[rules]]\nnames = ["fc1.weight"]\nsparsity = 0.9\n')
    nan_x = x.copy()
    nan_x[3, 0, 0, 0] = np.nan
    return {
        "missing model": ([str(tmp / "missing.onnx")], "not found"),
        "not onnx": ([str(text)], "not an ONNX model"),
        "truncated": ([str(truncated)], "ONNX"),
        "no prunable weights": ([str(noprune)], "no prunable weights"),
        "sparsity 1": (["--sparsity", "1.0"], "sparsity must be in [0, 1)"),
        "sparsity negative": (["--sparsity", "-0.1"], "sparsity must be in [0, 1)"),
        "threads negative": (["--threads", "-1"], "threads"),
        "no workers": (["--workers", "0"], "workers must be > 0"),
        "no sparsity": (["--no-sparsity"], "nothing to prune"),
        "config unknown key": (["--config", str(bad_toml)], "unknown config key"),
        "config unknown layer": (["--config", str(unknown_layer)], "no prunable weight named 'fc9.weight'"),
        "config contradiction": (["--config", str(contradict)], "both name 'fc1.weight'"),
        "missing config": (["--config", str(tmp / "nope.toml")], "config file not found"),
        "data missing keys": (["-d", str(_npz(tmp / "k.npz", a=x, b=y))], "expected x_train"),
        "data shape": (["-d", str(_npz(tmp / "s.npz", x=np.zeros((50, 7), np.float32), y=np.zeros(50, np.int64)))], "shape"),
        "labels out of range": (["-d", str(_npz(tmp / "l.npz", x=x, y=y + 10))], "classes"),
        "empty data": (["-d", str(_npz(tmp / "e.npz", x=x[:0], y=y[:0]))], "empty"),
        "nan data": (["-d", str(_npz(tmp / "n.npz", x=nan_x, y=y))], "NaN"),
        "string data": (["-d", str(_npz(tmp / "t.npz", x=np.array(["a"] * 20), y=np.zeros(20, np.int64)))], "numeric"),
        "missing data": (["-d", str(tmp / "nodata.npz")], "not found"),
        "unknown data spec": (["-d", "imagenet"], "unknown data spec"),
        "output is input": (["-o", str(model)], "is the input model"),
        "output dir missing": (["-o", str(tmp / "no" / "dir" / "out.onnx")], "does not exist"),
    }


def test_bad_inputs_fail_cleanly(lenet5_small, data_npz, data, tmp_path, capsys):
    cases = _bad_cases(tmp_path, lenet5_small, data_npz, data)
    before = _digest(lenet5_small)
    for label, (override, expected) in cases.items():
        args = {"model": str(lenet5_small), "-d": str(data_npz), "-o": str(tmp_path / "out.onnx"), "--sparsity": "0.5"}
        extra = []
        i = 0
        while i < len(override):
            if override[i] == "--no-sparsity":
                args.pop("--sparsity")
                i += 1
            elif override[i].startswith("-"):
                args[override[i]] = override[i + 1]
                i += 2
            else:
                args["model"] = override[i]
                i += 1
        argv = ["prune", args.pop("model")] + [v for kv in args.items() for v in kv] + extra + QUICK
        code = main(argv)
        err = capsys.readouterr().err.strip()
        assert code == 2, f"{label}: exit {code}, stderr {err!r}"
        assert "\n" not in err and "Traceback" not in err, f"{label}: {err!r}"
        assert err.startswith("error:") and expected in err, f"{label}: {err!r}"
        assert not (tmp_path / "out.onnx").exists(), label
        assert not list(tmp_path.glob(".out.onnx*")), label
    assert _digest(lenet5_small) == before
