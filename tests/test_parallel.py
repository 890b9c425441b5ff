"""Data-parallel training over worker processes (admm_onnx.parallel, Trainer(workers=...))."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import admm_onnx
from admm_onnx.errors import TrainingError
from admm_onnx.graph.penalty import AdmmPenalty
from admm_onnx.losses import ClassifierLoss
from admm_onnx.models import build
from admm_onnx.pipeline import make_readers, prepare_model
from admm_onnx.training import Trainer, build_artifacts


def worker_processes():
    """PIDs of this process's children running admm_onnx.parallel."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == os.getpid() and b"admm_onnx.parallel" in cmd:
            found.append(int(pid))
    return found


@pytest.fixture
def admm_artifacts(tmp_path):
    prepared = prepare_model(build("lenet5", input_shape=(1, 8, 8), num_classes=4))
    penalty = AdmmPenalty(ClassifierLoss(), list(prepared.info.prunable))
    build_artifacts(prepared.training, tmp_path / "a", prepared.info.trainable, penalty, prepared.output_name,
                    penalty.frozen_params)
    return tmp_path / "a", penalty


@pytest.mark.parametrize("workers,n", [(2, 64), (3, 50)])  # odd split: 17/16/17 rows
def test_split_batch_gives_the_full_batch_gradient(admm_artifacts, workers, n):
    """Loss and every gradient equal the one-process ones, the ADMM penalty included once."""
    directory, penalty = admm_artifacts
    rng = np.random.default_rng(0)
    feed = {"input": rng.random((n, 1, 8, 8), dtype=np.float32), "admm_labels": rng.integers(0, 4, n)}
    one, many = Trainer(directory, num_classes=4, threads=1), Trainer(directory, num_classes=4, workers=workers)
    try:
        assert len(worker_processes()) == workers - 1
        for t in (one, many):  # a nonzero penalty: targets 0, rho 0.5
            for name in penalty.frozen_params:
                value = t.get(name)
                t.set(name, np.full_like(value, 0.5) if "rho" in name else np.zeros_like(value))
        reader = admm_onnx.ArrayReader(feed["input"], feed["admm_labels"], batch_size=n)
        one.optimizer.set_learning_rate(0.0)
        many.optimizer.set_learning_rate(0.0)
        a, b = one.train_epoch(reader), many.train_epoch(reader)  # syncs frozen params to the workers
        np.testing.assert_allclose(b.loss, a.loss, rtol=1e-5)
        assert b.accuracy == a.accuracy and b.samples == a.samples == n
        for name in one.trainable:
            ga, gb = one.state.parameters[name].grad, many.state.parameters[name].grad
            np.testing.assert_allclose(gb, ga, rtol=1e-4, atol=1e-6 * np.abs(ga).max(), err_msg=name)
    finally:
        many.close()
    assert worker_processes() == []


def test_a_dead_worker_is_a_clean_error(admm_artifacts):
    directory, _ = admm_artifacts
    trainer = Trainer(directory, num_classes=4, workers=2)
    try:
        trainer.pool.procs[0].kill()
        trainer.pool.procs[0].wait()
        x = np.zeros((8, 1, 8, 8), np.float32)
        reader = admm_onnx.ArrayReader(x, np.zeros(8, np.int64), batch_size=8)
        with pytest.raises(TrainingError, match="worker 1 exited unexpectedly"):
            trainer.train_epoch(reader)
    finally:
        trainer.close()
    assert worker_processes() == []


def test_prune_with_workers_matches_one_process_closely_and_leaves_no_process(data, tmp_path):
    model = build("lenet5", input_shape=(1, 8, 8), num_classes=4)
    prepared = prepare_model(model)
    config = admm_onnx.PruneConfig(admm_iters=2, retrain_epochs=1, batch_size=32, rho=1e-2).with_sparsity(0.8)
    reports = {}
    for workers in (1, 2):
        train_reader, eval_reader, _ = make_readers(prepared, data, 32)
        reports[workers] = admm_onnx.prune(prepared, tmp_path / f"w{workers}.onnx", train_reader,
                                           config.replace(workers=workers), eval_reader)
        assert worker_processes() == []
    one, two = reports[1], reports[2]
    assert two.total_nonzero == one.total_nonzero
    # Same algorithm, float sums in another order: a small run lands within a few test images.
    assert abs(two.accuracy_after - one.accuracy_after) <= 0.05
    assert two.accuracy_after > 0.8


def test_killed_main_process_leaves_no_worker_and_no_shared_file(admm_artifacts, tmp_path):
    """SIGKILL of the process that owns the pool: its workers see end of file, remove the
    shared mapping and exit."""
    import subprocess
    import sys
    import time

    directory, _ = admm_artifacts
    script = (
        "import sys, time\n"
        "from admm_onnx.training import Trainer\n"
        f"t = Trainer({str(directory)!r}, num_classes=4, workers=2)\n"
        "print(t.pool.exchange.path, t.pool.procs[0].pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    shared, worker = proc.stdout.readline().split()
    assert Path(shared).exists()
    proc.kill()
    proc.wait()
    deadline = time.time() + 20
    while time.time() < deadline and (Path(f"/proc/{worker}").exists() or Path(shared).exists()):
        time.sleep(0.1)
    assert not Path(shared).exists()
    status = Path(f"/proc/{worker}/status")
    assert not status.exists() or "zombie" in status.read_text()
