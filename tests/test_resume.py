"""Interrupted runs resume from the work directory and end with the same kind of result."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from admm_onnx.config import PruneConfig
from admm_onnx.errors import ConfigError
from admm_onnx.pipeline import make_readers, prepare_model, prune

CONFIG = PruneConfig(admm_iters=3, epochs_per_iter=1, retrain_epochs=2, batch_size=32, rho=1e-2).with_sparsity(0.7)


class Boom(Exception):
    pass


class FailingReader:
    """Wraps a reader and raises on its n-th batch overall (a crash mid-epoch)."""

    def __init__(self, reader, fail_at):
        self.reader, self.fail_at, self.count = reader, fail_at, 0

    def __len__(self):
        return len(self.reader)

    def set_epoch(self, epoch):
        self.reader.set_epoch(epoch)

    def rewind(self):
        self.reader.rewind()

    def get_next(self):
        self.count += 1
        if self.count == self.fail_at:
            raise Boom("simulated crash")
        return self.reader.get_next()


def _weights(path):
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


@pytest.mark.parametrize("crash_epoch", [1.5, 4.5])  # mid-ADMM, mid-retraining
def test_crash_then_resume_gives_the_uninterrupted_result(mlp_small, data, tmp_path, crash_epoch):
    prepared = prepare_model(mlp_small)
    train_reader, eval_reader, _ = make_readers(prepared, data, 32)
    prune(prepared, tmp_path / "straight.onnx", train_reader, CONFIG, eval_reader)

    work = tmp_path / "work"
    train_reader, eval_reader, _ = make_readers(prepared, data, 32)
    crashing = FailingReader(train_reader, fail_at=int(crash_epoch * len(train_reader)) + 1)
    with pytest.raises(Boom):
        prune(prepared, tmp_path / "resumed.onnx", crashing, CONFIG, eval_reader, workdir=work)
    assert not (tmp_path / "resumed.onnx").exists()
    progress = json.loads((work / "progress.json").read_text())
    assert progress["phase"] == ("admm" if crash_epoch < 3 else "retrain")

    with pytest.raises(ConfigError, match="earlier run.s state"):
        prune(prepared, tmp_path / "resumed.onnx", train_reader, CONFIG, eval_reader, workdir=work)
    report = prune(prepared, tmp_path / "resumed.onnx", train_reader, CONFIG, eval_reader, workdir=work, resume=True)
    assert len(report.residuals) == 3
    a, b = _weights(tmp_path / "straight.onnx"), _weights(tmp_path / "resumed.onnx")
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=0, atol=1e-6, err_msg=name)
        if name.endswith("weight"):
            assert (b[name] == 0).mean() >= 0.7


def test_resume_refuses_another_model_or_plan(mlp_small, lenet5_small, data, tmp_path):
    prepared = prepare_model(mlp_small)
    train_reader, eval_reader, _ = make_readers(prepared, data, 32)
    work = tmp_path / "work"
    with pytest.raises(Boom):
        prune(prepared, tmp_path / "o.onnx", FailingReader(train_reader, 3), CONFIG, None, workdir=work)
    other = PruneConfig(admm_iters=3, retrain_epochs=2, batch_size=32).with_sparsity(0.5)
    with pytest.raises(ConfigError, match="different pruning plan"):
        prune(prepared, tmp_path / "o.onnx", train_reader, other, None, workdir=work, resume=True)
    with pytest.raises(ConfigError, match="nothing to resume"):
        prune(prepared, tmp_path / "o.onnx", train_reader, CONFIG, None, workdir=tmp_path / "empty", resume=True)
    # Threads and worker processes are not part of the run: resuming with others is allowed.
    report = prune(prepared, tmp_path / "o.onnx", train_reader, CONFIG.replace(threads=1, workers=2), None, workdir=work,
                   resume=True)
    assert report.compression > 1.5 and (tmp_path / "o.onnx").exists()


def _start(args, tmp_path):
    return subprocess.Popen(
        [sys.executable, "-m", "admm_onnx.cli.main", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
    )


def _wait_for_progress(work, proc, timeout=120):
    """Until the run has committed at least one ADMM iteration."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if json.loads((work / "progress.json").read_text())["step"] >= 1:
                return
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        if proc.poll() is not None:
            raise AssertionError(f"run ended before any progress: {proc.communicate()}")
        time.sleep(0.05)
    raise AssertionError("no progress.json")


@pytest.fixture
def long_run(tmp_path, lenet5_small, data):
    x = np.concatenate([data.x_train] * 4)
    y = np.concatenate([data.y_train] * 4)
    npz = tmp_path / "d.npz"
    np.savez(npz, x_train=x, y_train=y, x_test=data.x_test, y_test=data.y_test)
    out = tmp_path / "pruned.onnx"
    args = ["prune", str(lenet5_small), "-d", str(npz), "-o", str(out), "--sparsity", "0.8",
            "--admm-iters", "6", "--epochs-per-iter", "2", "--retrain-epochs", "2", "--batch-size", "16", "--quiet"]
    return args, out, tmp_path / "pruned.onnx.admm-work"


def _check_result(out):
    w = _weights(out)
    for name in ("conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"):
        assert (w[name] == 0).mean() >= 0.8
    import onnxruntime as ort

    ort.InferenceSession(str(out))


def test_sigkill_then_resume(long_run, tmp_path):
    args, out, work = long_run
    proc = _start(args, tmp_path)
    _wait_for_progress(work, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not out.exists()
    step = json.loads((work / "progress.json").read_text())
    assert step["phase"] == "admm" and step["step"] >= 1
    done = subprocess.run([sys.executable, "-m", "admm_onnx.cli.main", *args, "--resume"],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    _check_result(out)
    assert not work.exists()  # cleaned up after success


def test_sigint_exits_cleanly_and_says_how_to_resume(long_run, tmp_path):
    args, out, work = long_run
    proc = _start(args, tmp_path)
    _wait_for_progress(work, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "--resume" in err and "Traceback" not in err and err.strip().count("\n") == 0
    assert not out.exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".pruned.onnx")]
    done = subprocess.run([sys.executable, "-m", "admm_onnx.cli.main", *args, "--resume"],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    _check_result(out)
