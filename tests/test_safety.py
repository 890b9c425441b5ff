"""Safety (issue 11): inputs are only read, outputs only ever regular files the run may write,
the work directory is the tool's own, and every bad input is one ``error:`` line (exit 2).

Each probe builds its inputs in a tmp dir and checks, besides the exit code and the single
line: every file present before is byte-identical after, and nothing new is left behind.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

from admm_onnx.cli.main import main
from admm_onnx.models import build
from fs_snapshot import snapshot

QUICK = ["--admm-iters", "1", "--retrain-epochs", "1", "--batch-size", "32", "--quiet"]


# -- helpers ----------------------------------------------------------------------------------
def run_probe(argv, root: Path, capsys, expect: str = "", code: int = 2) -> str:
    """Run the CLI in-process; assert exit ``code``, one ``error:`` line containing ``expect``,
    inputs byte-identical and no file or folder left behind under ``root``."""
    before = snapshot(root)
    got = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert got == code, f"{argv}: exit {got}, stderr {err!r}"
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), f"{argv}: {err!r}"
    assert "Traceback" not in err and ".cc:" not in err, err
    assert expect.lower() in err.lower(), f"{argv}: expected {expect!r} in {err!r}"
    assert snapshot(root) == before, f"{argv}: files changed or left behind"
    return err


def tiny_model(path: Path, external: bool = False) -> Path:
    model = build("lenet300-100", input_shape=(1, 8, 8), num_classes=4)
    if external:
        onnx.save(model, path, save_as_external_data=True, location=path.name + ".data", size_threshold=0)
    else:
        onnx.save(model, path)
    return path


@pytest.fixture
def room(tmp_path, data):
    """A folder with a model, a model with external data, data and a config."""
    tiny_model(tmp_path / "m.onnx")
    tiny_model(tmp_path / "ext.onnx", external=True)
    np.savez(tmp_path / "d.npz", x_train=data.x_train, y_train=data.y_train, x_test=data.x_test, y_test=data.y_test)
    (tmp_path / "c.toml").write_text("sparsity = 0.5\n")
    return tmp_path


def prune_args(room, *extra, model="m.onnx", out="out.onnx"):
    return ["prune", room / model, "-d", room / "d.npz", "-o", room / out, "--sparsity", "0.5", *QUICK, *extra]


# -- external data containment ------------------------------------------------------------------
def _escaping_model(room: Path) -> Path:
    sub = room / "sub"
    sub.mkdir()
    shutil.copy(room / "ext.onnx", sub / "ext.onnx")
    secret = room / "secret.bin"
    secret.write_bytes(os.urandom((room / "ext.onnx.data").stat().st_size))
    os.symlink(secret, sub / "ext.onnx.data")
    return sub / "ext.onnx"


COMMANDS = {
    "inspect": lambda m, r: ["inspect", m],
    "export": lambda m, r: ["export", m, "-o", r / "o.onnx"],
    "densify": lambda m, r: ["densify", m, "-o", r / "o.onnx"],
    "eval": lambda m, r: ["eval", m, "-d", r / "d.npz"],
    "train": lambda m, r: ["train", m, "-d", r / "d.npz", "-o", r / "o.onnx", "--epochs", "1", "-q"],
    "prune": lambda m, r: ["prune", m, "-d", r / "d.npz", "-o", r / "o.onnx", "--sparsity", "0.5", *QUICK],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_symlinked_external_data_is_refused_on_every_command(room, capsys, command):
    model = _escaping_model(room)
    run_probe(COMMANDS[command](model, room), room, capsys, "outside the model's folder")


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_external_data_shorter_than_declared_is_refused(room, capsys, command):
    data = room / "ext.onnx.data"
    data.write_bytes(data.read_bytes()[:-100])
    run_probe(COMMANDS[command](room / "ext.onnx", room), room, capsys, "bytes")


def test_external_data_bad_references_refused(room, capsys):
    model = onnx.load(str(room / "ext.onnx"), load_external_data=False)
    cases = {
        "absolute": ("location", str(room / "ext.onnx.data"), "relative path"),
        "dotdot": ("location", "../x.data", "outside"),
        "offset": ("offset", str(10**9), "bytes"),
        "negative": ("offset", "-5", "negative"),
        "missing": ("location", "nope.data", "does not exist"),
    }
    for label, (key, value, expect) in cases.items():
        bad = onnx.ModelProto()
        bad.CopyFrom(model)
        for entry in bad.graph.initializer[0].external_data:
            if entry.key == key:
                entry.value = value
        if key == "offset" and not any(e.key == "offset" for e in bad.graph.initializer[0].external_data):
            bad.graph.initializer[0].external_data.add(key="offset", value=value)
        path = room / f"bad_{label}.onnx"
        onnx.save(bad, path)
        run_probe(["inspect", path], room, capsys, expect)


def test_external_data_that_is_a_fifo_is_refused_without_hanging(room, capsys):
    sub = room / "f"
    sub.mkdir()
    shutil.copy(room / "ext.onnx", sub / "ext.onnx")
    os.mkfifo(sub / "ext.onnx.data")
    run_probe(["inspect", sub / "ext.onnx"], room, capsys, "FIFO")


def test_model_path_that_is_a_fifo_or_device_is_refused(room, capsys):
    os.mkfifo(room / "pipe.onnx")
    run_probe(["inspect", room / "pipe.onnx"], room, capsys, "FIFO")
    run_probe(["inspect", "/dev/zero"], room, capsys, "device")


def test_over_2gb_tensor_is_refused_before_reading(room, capsys):
    big = onnx.TensorProto(name="w", data_type=onnx.TensorProto.FLOAT, dims=[600_000_000])
    big.data_location = onnx.TensorProto.EXTERNAL
    big.external_data.add(key="location", value="big.data")
    with open(room / "big.data", "wb") as f:  # sparse file: no real disk use
        f.truncate(2_400_000_000)
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 600_000_000])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N"])
    graph = onnx.helper.make_graph([onnx.helper.make_node("ReduceSum", ["x"], ["y"])], "g", [x], [y], [big])
    onnx.save(onnx.helper.make_model(graph), room / "big.onnx")
    run_probe(["inspect", room / "big.onnx"], room, capsys, "2 GiB")


# -- outputs ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["device", "fifo", "folder", "model", "data", "config", "ext data", "report=out",
                                  "report=sparse", "report=data", "sparse=model", "out in missing dir"])
def test_outputs_that_are_inputs_or_not_files_are_refused(room, capsys, case):
    os.mkfifo(room / "fifo")
    (room / "folder").mkdir()
    args = {
        "device": prune_args(room, out="/dev/null"),
        "fifo": prune_args(room, out="fifo"),
        "folder": prune_args(room, out="folder"),
        "model": prune_args(room, out="m.onnx"),
        "data": prune_args(room, out="d.npz"),
        "config": prune_args(room, "--config", room / "c.toml", out="c.toml"),
        "ext data": prune_args(room, model="ext.onnx", out="ext.onnx.data"),
        "report=out": prune_args(room, "--report", room / "out.onnx"),
        "report=sparse": prune_args(room, "--report", room / "s.onnx", "--sparse-output", room / "s.onnx"),
        "report=data": prune_args(room, "--report", room / "d.npz"),
        "sparse=model": prune_args(room, "--sparse-output", room / "m.onnx"),
        "out in missing dir": prune_args(room, out="no/such/out.onnx"),
    }[case]
    if case == "device":
        args[args.index(room / "/dev/null")] = "/dev/null"
    run_probe(args, room, capsys)
    assert Path("/dev/null").is_char_device()


def test_user_stale_out_data_is_never_deleted(room, capsys):
    (room / "o.onnx.data").write_bytes(b"the user's file")
    assert main(["export", str(room / "m.onnx"), "-o", str(room / "o.onnx"), "--min-sparsity", "0"]) == 0
    assert (room / "o.onnx.data").read_bytes() == b"the user's file"
    capsys.readouterr()
    # a model written with external data would overwrite it: refused
    run_probe(["export", room / "ext.onnx", "-o", room / "o.onnx", "--min-sparsity", "0"], room, capsys, "refusing to overwrite")


# -- the work directory --------------------------------------------------------------------------
def test_workdir_with_foreign_files_is_refused_and_left_intact(room, capsys):
    work = room / "mine"
    work.mkdir()
    (work / "notes.txt").write_text("keep me")
    run_probe(prune_args(room, "--workdir", work), room, capsys, "did not write")
    run_probe(prune_args(room, "--workdir", room), room, capsys)  # --workdir . with the inputs in it


@pytest.mark.parametrize("plant", ["lock-link", "artifact-link", "progress-folder", "fifo", "no-marker", "stray-artifact"])
def test_a_tampered_workdir_is_refused_and_nothing_is_written_through_it(room, capsys, plant):
    """A link planted in the work directory would let a write (the lock's pid, onnxruntime's
    artifacts) land in a user's file; a folder under a file's name would be deleted with what
    it holds. All are refused at claim time, before anything is written, with or without
    --resume, and the folder stays as it was."""
    work = room / "w"
    assert main([str(a) for a in prune_args(room, "--workdir", work, "--keep-workdir")]) == 0
    (room / "out.onnx").unlink()
    capsys.readouterr()
    if plant == "lock-link":
        (work / "run.lock").unlink()
        os.symlink(room / "m.onnx", work / "run.lock")
    elif plant == "artifact-link":
        (work / "retrain" / "training_model.onnx").unlink()
        os.symlink(room / "m.onnx", work / "retrain" / "training_model.onnx")
    elif plant == "progress-folder":
        (work / "progress.json").unlink()
        (work / "progress.json").mkdir()
        (work / "progress.json" / "notes.txt").write_text("mine")
    elif plant == "fifo":
        os.mkfifo(work / "admm" / "checkpoint.tmp")
    elif plant == "no-marker":
        (work / ".admm-onnx-workdir").unlink()
    else:
        (work / "admm" / "notes.txt").write_text("mine")
    for extra in ((), ("--resume",)):
        run_probe(prune_args(room, "--workdir", work, *extra), room, capsys, "refusing to use it")


def test_workdir_is_created_marked_and_removed_after_success(room, capsys):
    work = room / "w"
    assert main([str(a) for a in prune_args(room, "--workdir", work, "--keep-workdir")]) == 0
    assert (work / ".admm-onnx-workdir").is_file() and (work / "progress.json").is_file()
    assert main([str(a) for a in prune_args(room, "--workdir", work, "--resume", out="out2.onnx")]) == 0
    assert not work.exists()
    # an empty folder of the user's is used, emptied, and kept
    work.mkdir()
    assert main([str(a) for a in prune_args(room, "--workdir", work)]) == 0
    assert work.is_dir() and not list(work.iterdir())
    capsys.readouterr()


def test_early_failure_leaves_no_work_directory(room, capsys, data):
    np.savez(room / "bad.npz", x=data.x_train[:10], y=data.y_train[:10])  # fewer samples than one batch
    run_probe(["prune", room / "m.onnx", "-d", room / "bad.npz", "-o", room / "out.onnx", "--sparsity", "0.5",
               "--batch-size", "64", "-q"], room, capsys)


def test_second_run_on_a_locked_workdir_names_the_first_pid(room, capsys):
    from admm_onnx.workdir import WorkDir

    first = WorkDir(room / "out.onnx.admm-work")
    first.claim()
    try:
        before = snapshot(room)
        assert main([str(a) for a in prune_args(room)]) == 2
        err = capsys.readouterr().err.strip()
        assert f"pid {os.getpid()}" in err and len(err.splitlines()) == 1
        assert snapshot(room) == before
    finally:
        first.release()
        first.remove()
    assert not (room / "out.onnx.admm-work").exists()


def test_resume_names_every_changed_setting(room, capsys):
    work = room / "w"
    assert main([str(a) for a in prune_args(room, "--workdir", work, "--keep-workdir")]) == 0
    (room / "out.onnx").unlink()
    capsys.readouterr()
    for option, value in (("--seed", "3"), ("--rho", "0.2"), ("--batch-size", "16")):
        err = run_probe(prune_args(room, "--workdir", work, "--resume", option, value), room, capsys)
        assert option in err  # named as the option typed
    # workers/threads may change, and the learning rate (how a diverged run goes on)
    assert main([str(a) for a in prune_args(room, "--workdir", work, "--resume", "--threads", "1", "--lr", "1e-4")]) == 0


def test_truncated_progress_json_is_a_clean_error(room, capsys):
    work = room / "w"
    assert main([str(a) for a in prune_args(room, "--workdir", work, "--keep-workdir")]) == 0
    (room / "out.onnx").unlink()
    progress = work / "progress.json"
    progress.write_text(progress.read_text()[:20])
    capsys.readouterr()
    run_probe(prune_args(room, "--workdir", work, "--resume"), room, capsys, "damaged")


# -- the command line -----------------------------------------------------------------------------
def test_usage_errors_are_one_line(room, capsys):
    run_probe(["prune"], room, capsys, "missing argument")
    run_probe(["prune", room / "m.onnx", "--bogus"], room, capsys, "no such option")
    run_probe(["frobnicate"], room, capsys, "no such command")


def test_debug_is_accepted_after_the_subcommand(room, capsys):
    with pytest.raises(Exception):
        main(["inspect", str(room / "nope.onnx"), "--debug"])
    capsys.readouterr()
