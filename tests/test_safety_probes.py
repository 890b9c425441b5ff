"""Safety probes (issue 11): every command fed the inputs a user produces by accident or an
attacker by intent. Each probe builds its inputs in a fresh tmp dir and asserts:

- a user error is exit 2 with exactly one stderr line, starting ``error:``, and no traceback,
  C++ source path or ORT error-code prefix;
- every file present before is byte-identical after, and nothing new is left behind (no
  ``OUT.admm-work``, no ``OUT.data``, no temporary file, nothing in ``TMPDIR``);
- (slow, subprocess) under ``strace -f`` a run writes nowhere but its output, its work dir
  and ``TMPDIR``.

The probes run in-process (``admm_onnx.cli.main.main``) so the default suite stays quick.
"""
from __future__ import annotations

import gzip
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from admm_onnx.cli.main import main
from admm_onnx.models import build
from fs_snapshot import snapshot

QUICK = ["--admm-iters", "1", "--retrain-epochs", "1", "--epochs-per-iter", "1", "--batch-size", "32", "-q"]


# -- harness ----------------------------------------------------------------------------------
BAD_TEXT = re.compile(r"Traceback|\.cc:\d|\.h:\d|onnxruntime/core|onnxruntime_src|\[ONNXRuntimeError\]|pybind11")


def check_error(code: int, err: str, label: str, expect: str = "") -> None:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2, f"{label}: exit {code}, stderr {err!r}"
    assert len(lines) == 1 and lines[0].startswith("error:"), f"{label}: not one error line: {err!r}"
    assert not BAD_TEXT.search(err), f"{label}: internals leak: {err!r}"
    assert expect.lower() in err.lower(), f"{label}: expected {expect!r} in {err!r}"


class Room:
    """A tmp folder with a tiny model (m.onnx), one with external data (ext.onnx + .data),
    data (d.npz) and a config (c.toml); ``probe`` runs the CLI and checks the aftermath."""

    def __init__(self, root: Path, capsys, monkeypatch):
        self.root = root / "room"
        self.root.mkdir()
        self.tmp = root / "tmpdir"
        self.tmp.mkdir()
        self.capsys = capsys
        monkeypatch.setattr(tempfile, "tempdir", str(self.tmp))
        monkeypatch.setenv("TMPDIR", str(self.tmp))
        monkeypatch.chdir(self.root)
        model = build("lenet300-100", input_shape=(1, 8, 8), num_classes=4)
        onnx.save(model, self.root / "m.onnx")
        onnx.save(model, self.root / "ext.onnx", save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
        rng = np.random.default_rng(0)
        x = rng.standard_normal((200, 1, 8, 8)).astype(np.float32)
        y = rng.integers(0, 4, 200)
        np.savez(self.root / "d.npz", x_train=x[:160], y_train=y[:160], x_test=x[160:], y_test=y[160:])
        (self.root / "c.toml").write_text("sparsity = 0.5\n")

    def __truediv__(self, name):
        return self.root / name

    def argv(self, argv):
        return [str(a).replace("@", str(self.root)) for a in argv]

    def probe(self, argv, expect: str = "", label: str = "") -> str:
        argv = self.argv(argv)
        before = snapshot(self.root)
        self.capsys.readouterr()
        code = main(argv)
        err = self.capsys.readouterr().err
        check_error(code, err, label or " ".join(argv), expect)
        after = snapshot(self.root)
        assert after == before, (
            f"{label}: files changed: new {sorted(set(after) - set(before))}, gone {sorted(set(before) - set(after))}, "
            f"changed {[k for k in before if k in after and before[k] != after[k]]}"
        )
        assert not os.listdir(self.tmp), f"{label}: left in TMPDIR: {os.listdir(self.tmp)}"
        return err


@pytest.fixture
def room(tmp_path, capsys, monkeypatch):
    return Room(tmp_path, capsys, monkeypatch)


# -- inputs: data -------------------------------------------------------------------------------
rng = np.random.default_rng(1)
X = rng.standard_normal((100, 1, 8, 8)).astype(np.float32)
Y = rng.integers(0, 4, 100)


def _npz(**arrays):
    return lambda r: np.savez(r / "bad.npz", **arrays)


def _truncated_npz(r):
    raw = (r / "d.npz").read_bytes()
    (r / "bad.npz").write_bytes(raw[: len(raw) // 2])


def _npy_named_npz(r):
    with open(r / "bad.npz", "wb") as f:
        np.save(f, X)


def _zip_bomb(r):
    """A member declaring 8 GB of float32 (a real bomb inflates to that; the header is enough)."""
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (2000000000,), }"
    header = header + " " * (118 - len(header)) + "\n"
    npy = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode()
    with zipfile.ZipFile(r / "bad.npz", "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("x_train.npy", npy + bytes(1 << 20))
        z.writestr("y_train.npy", npy)


def _object_npz(r):
    np.savez(r / "bad.npz", x_train=np.array([{"a": 1}] * 10, dtype=object), y_train=np.zeros(10, np.int64))


def _zip_with_other_member(r):
    with zipfile.ZipFile(r / "bad.npz", "w") as z:
        z.writestr("evil.pkl", b"\x80\x04K\x01.")


def _mnist(kind):
    def setup(r):
        m = r / "mn"
        m.mkdir()
        for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                     "t10k-labels-idx1-ubyte"):
            images = "images" in stem
            raw = (struct.pack(">HBB", 0, 8, 3) + struct.pack(">III", 10, 8, 8) + bytes(640) if images
                   else struct.pack(">HBB", 0, 8, 1) + struct.pack(">I", 10) + bytes(10))
            first = stem.startswith("train-images")
            if kind == "truncated_gz" and first:
                packed = gzip.compress(raw)
                (m / f"{stem}.gz").write_bytes(packed[: len(packed) // 2])
                continue
            if kind == "not_gzip" and first:
                (m / f"{stem}.gz").write_bytes(b"not gzip at all")
                continue
            if kind == "magic" and first:
                raw = b"\xff\xff" + raw[2:]
            if kind == "huge_dims" and first:
                raw = struct.pack(">HBB", 0, 8, 3) + struct.pack(">III", 2**31, 2**31, 8) + bytes(64)
            if kind == "short_body" and first:
                raw = raw[:100]
            if kind == "short_header":
                raw = raw[:5]
            if kind == "labels_range" and not images:
                raw = raw[:8] + bytes([200] * 10)
            (m / f"{stem}.gz").write_bytes(gzip.compress(raw))

    return setup


def _prune(data):
    return ["prune", "@/m.onnx", "-o", "@/out.onnx", "-d", data, "--sparsity", "0.5", *QUICK]


DATA_PROBES = [
    ("npz truncated", _truncated_npz, "@/bad.npz", "truncated or damaged"),
    ("npy named npz", _npy_named_npz, "@/bad.npz", "single .npy array"),
    ("npz zip bomb", _zip_bomb, "@/bad.npz", "declares shape"),
    ("npz object arrays", _object_npz, "@/bad.npz", "python objects"),
    ("npz non-npy member", _zip_with_other_member, "@/bad.npz", "not a .npy array"),
    ("npz wrong keys", _npz(a=X, b=Y), "@/bad.npz", "expected x_train"),
    ("npz empty arrays", _npz(x_train=X[:0], y_train=Y[:0]), "@/bad.npz", "empty"),
    ("npz x/y length mismatch", _npz(x_train=X, y_train=Y[:50]), "@/bad.npz", "labels"),
    ("npz x/y mismatch (x, y)", _npz(x=X, y=Y[:50]), "@/bad.npz", "labels"),
    ("npz NaN", _npz(x_train=X * np.nan, y_train=Y), "@/bad.npz", "nan"),
    ("npz inf", _npz(x=np.full_like(X, np.inf), y=Y), "@/bad.npz", "inf"),
    ("npz labels out of range", _npz(x_train=X, y_train=Y + 100), "@/bad.npz", "classes"),
    ("npz negative labels", _npz(x_train=X, y_train=Y - 10), "@/bad.npz", "negative"),
    ("npz fractional labels", _npz(x_train=X, y_train=Y + 0.5), "@/bad.npz", "integer"),
    ("npz 2-D labels", _npz(x_train=X, y_train=np.zeros((100, 4))), "@/bad.npz", "1-d"),
    ("npz wrong sample shape", _npz(x_train=X[:, :, :4], y_train=Y), "@/bad.npz", "shape"),
    ("npz strings", _npz(x_train=np.array(["a"] * 100), y_train=Y), "@/bad.npz", "numeric"),
    ("npz complex", _npz(x_train=X.astype(np.complex64), y_train=Y), "@/bad.npz", "real"),
    ("npz scalars", _npz(x_train=np.float32(1), y_train=np.int64(1)), "@/bad.npz", "single value"),
    ("npz empty file", lambda r: (r / "bad.npz").write_bytes(b""), "@/bad.npz", "not a numpy .npz"),
    ("npz is a folder", lambda r: (r / "bad.npz").mkdir(), "@/bad.npz", "directory"),
    ("npz is a FIFO", lambda r: os.mkfifo(r / "bad.npz"), "@/bad.npz", "fifo"),
    ("npz missing", None, "@/nope.npz", "not found"),
    ("unknown data spec", None, "foo", "unknown data spec"),
    ("csv data", lambda r: (r / "x.csv").write_text("1,2\n"), "@/x.csv", "unknown data spec"),
    ("mnist dir missing", None, "mnist:@/nope", "not found"),
    ("mnist dir empty", lambda r: (r / "mn").mkdir(), "mnist:@/mn", "missing"),
    ("mnist truncated gz", _mnist("truncated_gz"), "mnist:@/mn", "truncated"),
    ("mnist not gzip", _mnist("not_gzip"), "mnist:@/mn", "not a gzipped file"),
    ("mnist bad magic", _mnist("magic"), "mnist:@/mn", "not an unsigned-byte idx"),
    ("mnist huge declared dims", _mnist("huge_dims"), "mnist:@/mn", "more than the memory"),
    ("mnist short body", _mnist("short_body"), "mnist:@/mn", "truncated"),
    ("mnist short header", _mnist("short_header"), "mnist:@/mn", "too short"),
    ("mnist labels out of range", _mnist("labels_range"), "mnist:@/mn", "classes"),
]


@pytest.mark.parametrize("label,setup,data,expect", DATA_PROBES, ids=[p[0] for p in DATA_PROBES])
def test_bad_data_is_one_clean_error(room, label, setup, data, expect):
    if setup:
        setup(room.root)
    room.probe(_prune(data), expect, label)


@pytest.mark.parametrize("command", ["train", "eval", "sensitivity"])
def test_bad_data_on_other_commands(room, command):
    _truncated_npz(room.root)
    argv = {
        "train": ["train", "@/m.onnx", "-d", "@/bad.npz", "-o", "@/t.onnx", "--epochs", "1", "-q"],
        "eval": ["eval", "@/m.onnx", "-d", "@/bad.npz"],
        "sensitivity": ["sensitivity", "@/m.onnx", "-d", "@/bad.npz", "--no-cache", "--workers", "1", "-q"],
    }[command]
    room.probe(argv, "truncated or damaged", command)


# -- inputs: models -----------------------------------------------------------------------------
def _base():
    return build("lenet300-100", input_shape=(1, 8, 8), num_classes=4)


def _save(fn):
    def setup(r):
        model = _base()
        fn(model)
        onnx.save(model, r / "x.onnx")
    return setup


def _fp16(model):
    for i, t in enumerate(model.graph.initializer):
        model.graph.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
    for v in list(model.graph.input) + list(model.graph.output):
        v.type.tensor_type.elem_type = TensorProto.FLOAT16


def _no_initializers(r):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 1, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 1, 8, 8])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), r / "x.onnx")


def _set(attr, value):
    def fn(model):
        setattr(model, attr, value) if attr != "opset" else setattr(model.opset_import[0], "version", value)
    return fn


def _first_tensor(fn):
    def outer(model):
        fn(model.graph.initializer[0])
    return outer


def _dims(*dims):
    def fn(t):
        del t.dims[:]
        t.dims.extend(dims)
    return fn


def _external(fn):
    """x.onnx with its weights in x.onnx.data, then ``fn(root, model)`` tampers, then saved."""
    def setup(r):
        onnx.save(_base(), r / "x.onnx", save_as_external_data=True, location="x.onnx.data", size_threshold=0)
        model = onnx.load(str(r / "x.onnx"), load_external_data=False)
        fn(r, model)
        onnx.save(model, r / "x.onnx")
    return setup


def _kv(tensor, key, value):
    for entry in tensor.external_data:
        if entry.key == key:
            entry.value = value
            return
    tensor.external_data.add(key=key, value=value)


def _ext_symlink_outside(r, model):
    secret = r.parent / "secret.bin"
    secret.write_bytes((r / "x.onnx.data").read_bytes())
    os.replace(r / "x.onnx.data", r / "orig.data")
    os.symlink(secret, r / "x.onnx.data")


def _ext_location(location):
    def fn(r, model):
        for t in model.graph.initializer:
            _kv(t, "location", location.replace("@", str(r)))
    return fn


def _ext_first(key, value):
    return lambda r, model: _kv(model.graph.initializer[0], key, value)


def _ext_replace_data(make):
    def fn(r, model):
        os.unlink(r / "x.onnx.data")
        make(r / "x.onnx.data")
    return fn


def _ext_dev_zero(r, model):
    os.symlink("/dev/zero", r / "zero")
    _ext_location("zero")(r, model)


def _ext_2gb(r, model):
    _dims(2**20, 2**10)(model.graph.initializer[0])


def _symlink_loop(r):
    os.symlink("x.onnx.b", r / "x.onnx")
    os.symlink("x.onnx", r / "x.onnx.b")


def _truncated_model(r):
    raw = (r / "m.onnx").read_bytes()
    (r / "x.onnx").write_bytes(raw[: len(raw) // 2])


MODEL_PROBES = [
    ("empty", lambda r: (r / "x.onnx").write_bytes(b""), "empty"),
    ("random bytes", lambda r: (r / "x.onnx").write_bytes(np.random.default_rng(0).bytes(5000)), "not an onnx model"),
    ("truncated protobuf", _truncated_model, "not an onnx model"),
    ("a FIFO", lambda r: os.mkfifo(r / "x.onnx"), "fifo"),
    ("symlink loop", _symlink_loop, "symbolic links"),
    ("nonexistent", None, "not found"),
    ("IR 2", _save(_set("ir_version", 2)), "ir version 2"),
    ("negative dims", _save(_first_tensor(_dims(-1, 64))), "negative dimension"),
    ("overflowing dims", _save(_first_tensor(_dims(2**40, 2**30))), "damaged"),
    ("raw data shorter than shape", _save(_first_tensor(lambda t: setattr(t, "raw_data", t.raw_data[:10]))), "damaged"),
    ("ext data symlinked outside", _external(_ext_symlink_outside), "outside the model's folder"),
    ("ext data ..", _external(_ext_location("../x.onnx.data")), "outside the model's folder"),
    ("ext data absolute", _external(_ext_location("@/x.onnx.data")), "relative path"),
    ("ext data missing", _external(_ext_replace_data(lambda p: None)), "does not exist"),
    ("ext data length beyond file", _external(_ext_first("length", str(10**9))), "truncated"),
    ("ext data negative offset", _external(_ext_first("offset", "-10")), "negative"),
    ("ext data non-numeric offset", _external(_ext_first("offset", "abc")), "non-numeric"),
    ("ext data over 2 GB declared", _external(_ext_2gb), "over 2 gib"),
    ("ext data a folder", _external(_ext_replace_data(lambda p: p.mkdir())), "directory"),
    ("ext data a FIFO", _external(_ext_replace_data(os.mkfifo)), "fifo"),
    ("ext data /dev/zero link", _external(_ext_dev_zero), "outside the model's folder"),
    ("ext data the model itself", _external(_ext_location("x.onnx")), "truncated"),
]
TRAINING_MODEL_PROBES = [
    ("opset 30", _save(_set("opset", 30)), "opset 30"),
    ("fp16", _save(_fp16), "float16"),
    ("no initializers", _no_initializers, ""),
]

COMMANDS = {
    "prune": ["prune", "@/x.onnx", "-o", "@/out.onnx", "-d", "@/d.npz", "--sparsity", "0.5", *QUICK],
    "train": ["train", "@/x.onnx", "-o", "@/out.onnx", "-d", "@/d.npz", "--epochs", "1", "-q"],
    "eval": ["eval", "@/x.onnx", "-d", "@/d.npz"],
    "export": ["export", "@/x.onnx", "-o", "@/out.onnx"],
    "densify": ["densify", "@/x.onnx", "-o", "@/out.onnx"],
    "inspect": ["inspect", "@/x.onnx"],
    "groups": ["groups", "@/x.onnx"],
    "sensitivity": ["sensitivity", "@/x.onnx", "-d", "@/d.npz", "--no-cache", "--workers", "1", "--samples", "20",
                    "--levels", "0.5", "-q"],
}


@pytest.mark.parametrize("label,setup,expect", MODEL_PROBES, ids=[p[0] for p in MODEL_PROBES])
@pytest.mark.parametrize("command", list(COMMANDS))
def test_bad_model_is_one_clean_error_on_every_command(room, command, label, setup, expect):
    if setup:
        setup(room.root)
    room.probe(COMMANDS[command], expect, f"{command}: {label}")


@pytest.mark.parametrize("label,setup,expect", TRAINING_MODEL_PROBES, ids=[p[0] for p in TRAINING_MODEL_PROBES])
@pytest.mark.parametrize("command", ["prune", "train", "eval", "sensitivity"])
def test_models_that_cannot_train_are_refused(room, command, label, setup, expect):
    setup(room.root)
    room.probe(COMMANDS[command], expect, f"{command}: {label}")


def test_model_path_that_is_a_folder(room):
    (room / "x.onnx").mkdir()
    for command in COMMANDS:
        room.probe(COMMANDS[command], "directory", command)


# -- outputs and options ------------------------------------------------------------------------
def _mkdir(name):
    return lambda r: (r / name).mkdir()


def _file_txt(r):
    (r / "file.txt").write_text("x")


def _foreign_workdir(r):
    (r / "wd").mkdir()
    (r / "wd" / "keep.txt").write_text("mine")


def _prune_o(*extra):
    return ["prune", "@/m.onnx", "-d", "@/d.npz", "--sparsity", "0.5", *QUICK, *extra]


HOME = os.path.expanduser("~")
OUTPUT_PROBES = [
    ("-o /dev/null", None, _prune_o("-o", "/dev/null"), "device"),
    ("-o FIFO", lambda r: os.mkfifo(r / "o.onnx"), _prune_o("-o", "@/o.onnx"), "fifo"),
    ("-o folder", _mkdir("o.onnx"), _prune_o("-o", "@/o.onnx"), "directory"),
    ("-o the model", None, _prune_o("-o", "@/m.onnx"), "input model"),
    ("-o the data", None, _prune_o("-o", "@/d.npz"), "data"),
    ("-o the config", None, ["prune", "@/m.onnx", "-d", "@/d.npz", "--config", "@/c.toml", "-o", "@/c.toml", *QUICK],
     "config"),
    ("-o the input's external data", None,
     ["prune", "@/ext.onnx", "-d", "@/d.npz", "--sparsity", "0.5", "-o", "@/ext.onnx.data", *QUICK], "external data"),
    ("-o whose .data is the input's", lambda r: shutil.copy(r / "m.onnx", r / "o.onnx.data"),
     ["prune", "@/ext.onnx", "-d", "@/d.npz", "--sparsity", "0.5", "-o", "@/o.onnx", *QUICK], "refusing to overwrite"),
    ("--report the data", None, _prune_o("-o", "@/o.onnx", "--report", "@/d.npz"), "data"),
    ("--report = -o", None, _prune_o("-o", "@/o.onnx", "--report", "@/o.onnx"), "also the -o output"),
    ("--report = --sparse-output", None,
     _prune_o("-o", "@/o.onnx", "--report", "@/s.onnx", "--sparse-output", "@/s.onnx"), "also the"),
    ("-o in a missing folder", None, _prune_o("-o", "@/nope/o.onnx"), "does not exist"),
    ("-o under a regular file", _file_txt, _prune_o("-o", "@/file.txt/o.onnx"), "does not exist"),
    ("--report under a regular file", _file_txt, _prune_o("-o", "@/o.onnx", "--report", "@/file.txt/r.json"),
     "does not exist"),
    ("--report /dev/null", None, _prune_o("-o", "@/o.onnx", "--report", "/dev/null"), "device"),
    ("--plot bad suffix", None, _prune_o("-o", "@/o.onnx", "--plot", "@/p.txt"), "picture format"),
    ("--sparse-output under a file", _file_txt, _prune_o("-o", "@/o.onnx", "--sparse-output", "@/file.txt/s.onnx"),
     "does not exist"),
    ("--workdir with foreign files", _foreign_workdir, _prune_o("-o", "@/o.onnx", "--workdir", "@/wd"),
     "did not write"),
    ("--workdir .", None, _prune_o("-o", "@/o.onnx", "--workdir", "."), "--workdir"),
    ("--workdir /", None, _prune_o("-o", "@/o.onnx", "--workdir", "/"), "--workdir"),
    ("--workdir $HOME", None, _prune_o("-o", "@/o.onnx", "--workdir", HOME), ""),
    ("--workdir the input's folder", None, _prune_o("-o", "@/o.onnx", "--workdir", "@"), "--workdir"),
    ("--workdir a file", None, _prune_o("-o", "@/o.onnx", "--workdir", "@/c.toml"), ""),
    ("--workdir under a file", _file_txt, _prune_o("-o", "@/o.onnx", "--workdir", "@/file.txt/wd"), "does not exist"),
    ("--workdir /dev/shm", None, _prune_o("-o", "@/o.onnx", "--workdir", "/dev/shm"), ""),
    ("--log-file the model", None, ["--log-file", "@/m.onnx", *_prune_o("-o", "@/o.onnx")], "named on the command line"),
    ("--log-file a folder", _mkdir("lg"), ["--log-file", "@/lg", *_prune_o("-o", "@/o.onnx")], ""),
    ("--workers 0", None, _prune_o("-o", "@/o.onnx", "--workers", "0"), "workers"),
    ("--workers -1", None, _prune_o("-o", "@/o.onnx", "--workers", "-1"), "workers"),
    ("--threads -1", None, _prune_o("-o", "@/o.onnx", "--threads", "-1"), "threads"),
    ("--threads 100000", None, _prune_o("-o", "@/o.onnx", "--threads", "100000"), "threads"),
    ("config threads 100000", lambda r: (r / "k.toml").write_text("sparsity = 0.5\nthreads = 100000\n"),
     ["prune", "@/m.onnx", "-d", "@/d.npz", "-o", "@/o.onnx", "--config", "@/k.toml", *QUICK], "threads"),
    ("--batch-size 0", None, _prune_o("-o", "@/o.onnx", "--batch-size", "0"), "batch"),
    ("--batch-size huge", None, _prune_o("-o", "@/o.onnx", "--batch-size", "100000000"), "batch"),
    ("--lr 0", None, _prune_o("-o", "@/o.onnx", "--lr", "0"), "lr"),
    ("--lr nan", None, _prune_o("-o", "@/o.onnx", "--lr", "nan"), "lr"),
    ("--lr inf", None, _prune_o("-o", "@/o.onnx", "--lr", "inf"), "lr"),
    ("--rho nan", None, _prune_o("-o", "@/o.onnx", "--rho", "nan"), "rho"),
    ("--seed -1", None, _prune_o("-o", "@/o.onnx", "--seed", "-1"), "seed"),
    ("--admm-iters -1", None, _prune_o("-o", "@/o.onnx", "--admm-iters", "-1"), "admm_iters"),
    ("--batch-size x", None, _prune_o("-o", "@/o.onnx", "--batch-size", "x"), "batch-size"),
    ("--epochs -1", None, ["train", "@/m.onnx", "-d", "@/d.npz", "-o", "@/o.onnx", "--epochs", "-1", "-q"], "epochs"),
    ("train -o the model", None, ["train", "@/m.onnx", "-d", "@/d.npz", "-o", "@/m.onnx", "--epochs", "1", "-q"],
     "input model"),
    ("train -o /dev/null", None, ["train", "@/m.onnx", "-d", "@/d.npz", "-o", "/dev/null", "--epochs", "1", "-q"],
     "device"),
    ("eval --batch-size 0", None, ["eval", "@/m.onnx", "-d", "@/d.npz", "--batch-size", "0"], "batch"),
    ("export -o the model", None, ["export", "@/m.onnx", "-o", "@/m.onnx"], "input model"),
    ("export -o /dev/null", None, ["export", "@/m.onnx", "-o", "/dev/null"], "device"),
    ("export -o the input's .data", None, ["export", "@/ext.onnx", "-o", "@/ext.onnx.data"], "external data"),
    ("export -o the calibration data", None,
     ["export", "@/m.onnx", "-o", "@/d.npz", "--format", "qdq", "-d", "@/d.npz"], "input"),
    ("densify -o the model", None, ["densify", "@/m.onnx", "-o", "@/m.onnx"], "input model"),
    ("densify -o a folder", _mkdir("od"), ["densify", "@/m.onnx", "-o", "@/od"], "directory"),
    ("inspect --plot the model", None, ["inspect", "@/m.onnx", "--plot", "@/m.onnx"], ""),
    ("inspect --plot /dev/null", None, ["inspect", "@/m.onnx", "--plot", "/dev/null"], ""),
    ("sensitivity --json the model", None, ["sensitivity", "@/m.onnx", "-d", "@/d.npz", "--json", "@/m.onnx"],
     "input model"),
    ("sensitivity --json the data", None, ["sensitivity", "@/m.onnx", "-d", "@/d.npz", "--json", "@/d.npz"], "data"),
    ("sensitivity --plot /dev/null", None, ["sensitivity", "@/m.onnx", "-d", "@/d.npz", "--plot", "/dev/null"], ""),
    ("sensitivity --workers 0", None, ["sensitivity", "@/m.onnx", "-d", "@/d.npz", "--workers", "0"], "workers"),
    ("sensitivity --samples 0", None, ["sensitivity", "@/m.onnx", "-d", "@/d.npz", "--samples", "0"], "samples"),
    ("sensitivity --levels abc", None, ["sensitivity", "@/m.onnx", "-d", "@/d.npz", "--levels", "abc"], "levels"),
    ("sensitivity --cache a file", None, ["sensitivity", "@/m.onnx", "-d", "@/d.npz", "--cache", "@/c.toml"], ""),
    ("sensitivity --cache under a file", _file_txt,
     ["sensitivity", "@/m.onnx", "-d", "@/d.npz", "--cache", "@/file.txt/cc"], "does not exist"),
    ("plot a FIFO report", lambda r: os.mkfifo(r / "r.json"), ["plot", "@/r.json", "-o", "@/p.svg"], "fifo"),
    ("plot a deep report", lambda r: (r / "r.json").write_text("[" * 100000 + "]" * 100000),
     ["plot", "@/r.json", "-o", "@/p.svg"], "not a json report"),
    ("plot -o the report", lambda r: (r / "r.json").write_text("{}"), ["plot", "@/r.json", "-o", "@/r.json"], "report"),
    ("plot -o /dev/null", lambda r: (r / "r.json").write_text("{}"), ["plot", "@/r.json", "-o", "/dev/null"], ""),
    ("models build -o /dev/null", None, ["models", "build", "lenet5", "-o", "/dev/null"], "device"),
    ("models build tiny shape", None, ["models", "build", "lenet5", "-o", "@/o.onnx", "--input-shape", "1x2x2"],
     "input-shape"),
    ("models build 0 classes", None, ["models", "build", "lenet5", "-o", "@/o.onnx", "--classes", "0"], "classes"),
    ("demo -o a file", None, ["demo", "-o", "@/c.toml"], ""),
    ("demo -o under a file", _file_txt, ["demo", "-o", "@/file.txt/dd"], ""),
    ("demo -o a folder with other files", lambda r: None, ["demo", "-o", "@"], "other files"),
    ("export -o a non-UTF-8 name", None, ["export", "@/m.onnx", "-o", "@/\udcfe.onnx", "--min-sparsity", "0"], "utf-8"),
    ("-o a symlink to the data", lambda r: os.symlink(r / "d.npz", r / "o.onnx"), _prune_o("-o", "@/o.onnx"), "data"),
    ("-o whose .data links to the model", lambda r: os.symlink(r / "m.onnx", r / "o.onnx.data"),
     _prune_o("-o", "@/o.onnx"), "input model"),
    ("--workdir a symlink", lambda r: os.symlink(r.parent, r / "wd"), _prune_o("-o", "@/o.onnx", "--workdir", "@/wd"),
     "symbolic link"),
    ("unknown command", None, ["frobnicate"], "no such command"),
    ("unknown option", None, ["prune", "--frob"], "no such option"),
    ("missing argument", None, ["prune"], "missing argument"),
]


@pytest.mark.parametrize("label,setup,argv,expect", OUTPUT_PROBES, ids=[p[0] for p in OUTPUT_PROBES])
def test_bad_outputs_and_options_are_one_clean_error(room, label, setup, argv, expect):
    if setup:
        setup(room.root)
    room.probe(argv, expect, label)


# -- configuration files ------------------------------------------------------------------------
CONFIG_PROBES = [
    ("deep JSON", "k.json", "[" * 100000 + "]" * 100000, "recursion"),
    ("deep JSON object", "k.json", '{"a":' * 50000 + "1" + "}" * 50000, "recursion"),
    ("deep TOML", "k.toml", "a = " + "[" * 100000 + "]" * 100000, "recursion"),
    ("invalid TOML", "k.toml", "sparsity = = 0.5", "invalid toml"),
    ("invalid JSON", "k.json", "{sparsity: 0.5", "invalid json"),
    ("JSON list", "k.json", "[1, 2]", "top level"),
    ("unknown key", "k.toml", "sparsty = 0.5", "unknown config key"),
    ("wrong type", "k.toml", "sparsity = 'half'", "sparsity"),
    ("NaN sparsity", "k.json", '{"sparsity": NaN}', "sparsity"),
    ("infinite lr", "k.json", '{"sparsity": 0.5, "lr": Infinity}', "lr"),
    ("negative sparsity", "k.toml", "sparsity = -0.5", "sparsity"),
    ("sparsity above 1", "k.toml", "sparsity = 1.5", "sparsity"),
    ("rules not a list", "k.toml", "rules = 3", "rules"),
    ("rule selects nothing", "k.json", '{"rules": [{"names": ["nope.*"], "sparsity": 0.5}]}', "selects no"),
    ("5000-digit integer", "k.json", '{"sparsity": 0.5, "admm_iters": 1' + "0" * 5000 + "}", "invalid json"),
    ("binary", "k.toml", bytes(range(256)), "cannot read"),
    ("empty", "k.toml", "", "nothing to prune"),
    ("yaml", "k.yaml", "sparsity: 0.5", "invalid toml"),
    ("a FIFO", "k.toml", None, "fifo"),
    ("huge", "k.json", '{"sparsity": 0.5, "x": "' + "a" * (17 * 2**20) + '"}', "mib"),
]


@pytest.mark.parametrize("label,name,text,expect", CONFIG_PROBES, ids=[p[0] for p in CONFIG_PROBES])
def test_bad_config_is_one_clean_error(room, label, name, text, expect):
    path = room / name
    if text is None:
        os.mkfifo(path)
    else:
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
    room.probe(["prune", "@/m.onnx", "-d", "@/d.npz", "-o", "@/o.onnx", "--config", str(path), *QUICK], expect, label)


def test_workers_above_the_cores_are_capped_with_a_warning(room, capsys):
    argv = room.argv(["prune", "@/m.onnx", "-d", "@/d.npz", "-o", "@/o.onnx", "--sparsity", "0.5", *QUICK,
                      "--workers", "1000"])
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "warning: --workers 1000 is more than the" in err
    assert (room / "o.onnx").is_file() and not (room / "o.onnx.admm-work").exists()


# -- resume from a damaged work directory ---------------------------------------------------------
@pytest.fixture(scope="module")
def finished_workdir(tmp_path_factory):
    """The work directory of a finished quick run (--keep-workdir), built once."""
    root = tmp_path_factory.mktemp("resume-template")
    onnx.save(build("lenet300-100", input_shape=(1, 8, 8), num_classes=4), root / "m.onnx")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, 4, 200)
    np.savez(root / "d.npz", x_train=x[:160], y_train=y[:160], x_test=x[160:], y_test=y[160:])
    argv = ["prune", str(root / "m.onnx"), "-d", str(root / "d.npz"), "-o", str(root / "o.onnx"), "--sparsity", "0.5",
            *QUICK, "--keep-workdir"]
    assert main(argv) == 0
    return root / "o.onnx.admm-work"


def _truncate(name, keep=None):
    def fn(w):
        raw = (w / name).read_bytes()
        (w / name).write_bytes(raw[: len(raw) // 2 if keep is None else keep])
    return fn


def _json_set(name, **changes):
    def fn(w):
        import json

        data = json.loads((w / name).read_text())
        data.update(changes)
        (w / name).write_text(json.dumps(data))
    return fn


def _each_checkpoint(fn):
    return lambda w: [fn(p) for p in w.rglob("state.ckpt")]


def _symlink_to_passwd(p):
    p.unlink()
    os.symlink("/etc/passwd", p)


RESUME_PROBES = [
    ("progress.json truncated", _truncate("progress.json"), [], "damaged"),
    ("progress.json empty", _truncate("progress.json", 0), [], "damaged"),
    ("progress.json deep", lambda w: (w / "progress.json").write_text("[" * 100000 + "]" * 100000), [], "damaged"),
    ("progress.json unknown phase", _json_set("progress.json", phase="evil"), [], "damaged"),
    ("progress.json negative step", _json_set("progress.json", step=-5), [], "damaged"),
    ("progress.json report a list", _json_set("progress.json", report=[1, 2]), [], "damaged"),
    ("run.json truncated", _truncate("run.json"), [], "damaged"),
    ("run.json a list", lambda w: (w / "run.json").write_text("[]"), [], "damaged"),
    ("pruned.npz truncated", _truncate("pruned.npz"), [], "damaged"),
    ("checkpoint garbage", _each_checkpoint(lambda p: p.write_bytes(b"garbage")), [], "damaged"),
    ("checkpoint symlinked outside", _each_checkpoint(_symlink_to_passwd), [], "symbolic link"),
    ("another --batch-size", lambda w: None, ["--batch-size", "16"], "--batch-size 32 -> 16"),
    ("another --seed", lambda w: None, ["--seed", "7"], "seed 0 -> 7"),
    ("a foreign file inside", lambda w: (w / "notes.txt").write_text("mine"), [], "did not write"),
]


@pytest.mark.parametrize("label,tamper,extra,expect", RESUME_PROBES, ids=[p[0] for p in RESUME_PROBES])
def test_resume_from_a_damaged_or_different_run_is_one_clean_error(room, finished_workdir, label, tamper, extra, expect):
    work = room / "o.onnx.admm-work"
    shutil.copytree(finished_workdir, work, symlinks=True)
    tamper(work)
    argv = ["prune", "@/m.onnx", "-d", "@/d.npz", "-o", "@/o.onnx", "--sparsity", "0.5", *QUICK, "--resume", *extra]
    room.probe(argv, expect, label)


# -- full disk ------------------------------------------------------------------------------------
def test_full_disk_while_writing_the_model_is_one_line_and_leaves_nothing(room, monkeypatch):
    import errno

    import admm_onnx.io as io

    def full(*args, **kwargs):
        path = Path(args[1])
        path.write_bytes(b"partial")  # a half-written temporary file, as a real ENOSPC leaves
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(io.onnx, "save_model", full)
    room.probe(["export", "@/m.onnx", "-o", "@/o.onnx", "--min-sparsity", "0"], "no space left", "export ENOSPC")
    room.probe(["models", "build", "lenet5", "-o", "@/o.onnx"], "no space left", "models build ENOSPC")


def test_full_disk_during_training_is_one_line_and_resumable(room, monkeypatch, capsys):
    """ENOSPC while committing ADMM state: one line naming the cause, no output or temporary
    file, and the work directory kept (with the hint) only because it holds progress."""
    import errno

    import admm_onnx.workdir as workdir

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(workdir.WorkDir, "save_arrays", full)
    monkeypatch.setattr(workdir.WorkDir, "save_state", full)
    argv = room.argv(["prune", "@/m.onnx", "-d", "@/d.npz", "-o", "@/o.onnx", "--sparsity", "0.5", *QUICK])
    capsys.readouterr()
    code = main(argv)
    # (in-process, an earlier test's ORT session may make the trainer warn about denormals)
    err = "".join(line for line in capsys.readouterr().err.splitlines(True) if "denormals" not in line)
    check_error(code, err, "prune ENOSPC", "no space left")
    assert not (room / "o.onnx").exists() and not (room / "o.onnx.data").exists()
    assert not [n for n in os.listdir(room.root) if n.endswith(".tmp")]
    work = room / "o.onnx.admm-work"
    assert not work.exists() or ((work / "progress.json").is_file() and "--resume" in err)
    assert not os.listdir(room.tmp)


# -- signals and strace (subprocess) ----------------------------------------------------------------
def _cli(*args):
    return [sys.executable, "-c", "import sys; from admm_onnx.cli.main import main; sys.exit(main())", *args]


def _wait_for(path: Path, timeout: float = 120) -> None:
    import time

    end = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < end, f"{path} never appeared"
        time.sleep(0.05)


@pytest.mark.parametrize("command,signame,code", [
    ("prune", "SIGTERM", 143),
    pytest.param("prune", "SIGHUP", 129, marks=pytest.mark.slow),
    pytest.param("train", "SIGTERM", 143, marks=pytest.mark.slow),
    ("train", "SIGHUP", 129),
])
def test_sigterm_and_sighup_commit_state_and_say_how_to_resume(room, command, signame, code):
    import signal

    slow = ["--batch-size", "8", "-q"]
    if command == "prune":
        argv = ["prune", "@/m.onnx", "-d", "@/d.npz", "-o", "@/o.onnx", "--sparsity", "0.5", "--admm-iters", "50",
                "--retrain-epochs", "50", *slow]
        marker = room / "o.onnx.admm-work" / "progress.json"
    else:
        argv = ["train", "@/m.onnx", "-d", "@/d.npz", "-o", "@/o.onnx", "--epochs", "500", *slow]
        marker = room / "o.onnx.admm-work" / "dense" / "training_model.onnx"
    before = snapshot(room.root)
    env = dict(os.environ, TMPDIR=str(room.tmp), PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.Popen(_cli(*room.argv(argv)), cwd=room.root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(marker)
        import time

        time.sleep(0.5)
        proc.send_signal(getattr(signal, signame))
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Interrupted by signal" in lines[0], err
    assert "Traceback" not in err
    after = snapshot(room.root)
    assert all(after.get(k) == v for k, v in before.items()), "an input changed"
    assert not (room / "o.onnx").exists() and not (room / "o.onnx.data").exists()
    assert not os.listdir(room.tmp), f"left in TMPDIR: {os.listdir(room.tmp)}"
    if command == "prune":
        assert "--resume" in err and (room / "o.onnx.admm-work" / "progress.json").is_file()
        resumed = main(room.argv(argv + ["--resume", "--admm-iters", "50"]))  # the same command goes on
        assert resumed == 0 and (room / "o.onnx").is_file() and not (room / "o.onnx.admm-work").exists()
    else:
        assert not (room / "o.onnx.admm-work").exists(), "train left its work directory"


@pytest.mark.slow  # (in-process: tests/test_safety.py::test_second_run_on_a_locked_workdir_names_the_first_pid)
def test_two_runs_on_one_output_the_second_names_the_first_pid(room):
    argv = ["prune", "@/m.onnx", "-d", "@/d.npz", "-o", "@/o.onnx", "--sparsity", "0.5", "--admm-iters", "5000",
            "--admm-tol", "0", "--batch-size", "8", "-q"]
    env = dict(os.environ, TMPDIR=str(room.tmp))
    first = subprocess.Popen(_cli(*room.argv(argv)), cwd=room.root, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        _wait_for(room / "o.onnx.admm-work" / "progress.json")
        second = subprocess.run(_cli(*room.argv(argv)), cwd=room.root, env=env, capture_output=True, text=True,
                                timeout=120)
    finally:
        first.kill()
        first.wait()
    check_error(second.returncode, second.stderr, "second run", f"pid {first.pid}")
    assert not (room / "o.onnx").exists()


WRITE_CALL = re.compile(r"^\d+\s+(openat|open|creat|mkdir|mkdirat|unlink|unlinkat|rename|renameat2?|rmdir|symlink|"
                        r"symlinkat|link|linkat|chmod|fchmodat|truncate|mknod|mknodat)\((.*)$")


def _writes_outside(trace: Path, allowed) -> list:
    bad = []
    for line in trace.read_text(errors="replace").splitlines():
        m = WRITE_CALL.match(line)
        if not m or ("= -1" in line and m.group(1) != "rename"):
            continue
        if m.group(1) in ("openat", "open") and not re.search(r"O_WRONLY|O_RDWR|O_CREAT|O_TRUNC", m.group(2)):
            continue
        for path in re.findall(r'"([^"]*)"', m.group(2))[:2]:
            path = os.path.normpath(path)
            if not path.startswith("/") or path in ("/dev/null", "/dev/tty") or path.startswith(("/proc/", "/sys/")):
                continue
            if path.startswith("/dev/shm/admm-onnx-exchange-") or path.startswith("/dev/shm/sem."):
                continue
            if not any(path == a or path.startswith(a + "/") for a in allowed):
                bad.append(line)
    return bad


STRACE_RUNS = [
    ("prune ok", ["prune", "@/m.onnx", "-d", "@/d.npz", "-o", "@/out/o.onnx", "--sparsity", "0.5", *QUICK,
                  "--report", "@/out/r.json", "--workers", "2"], 0),
    ("prune ext ok", ["prune", "@/ext.onnx", "-d", "@/d.npz", "-o", "@/out/o.onnx", "--sparsity", "0.5", *QUICK], 0),
    ("train ok", ["train", "@/m.onnx", "-d", "@/d.npz", "-o", "@/out/o.onnx", "--epochs", "1", "-q"], 0),
    ("export ok", ["export", "@/m.onnx", "-o", "@/out/o.onnx", "--min-sparsity", "0"], 0),
    ("sensitivity ok", ["sensitivity", "@/m.onnx", "-d", "@/d.npz", "--json", "@/out/s.json", "--no-cache",
                        "--samples", "50", "--levels", "0.5", "-q"], 0),
    ("symlinked external data", ["prune", "@/evil.onnx", "-d", "@/d.npz", "-o", "@/out/o.onnx", "--sparsity", "0.5",
                                 *QUICK], 2),
    ("-o the data", ["prune", "@/m.onnx", "-d", "@/d.npz", "-o", "@/d.npz", "--sparsity", "0.5", *QUICK], 2),
]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
@pytest.mark.parametrize("label,argv,code", STRACE_RUNS, ids=[r[0] for r in STRACE_RUNS])
def test_strace_no_write_outside_the_output_folder_work_dir_and_tmpdir(room, label, argv, code):
    out = room / "out"
    out.mkdir()
    onnx.save(_base(), room / "evil.onnx", save_as_external_data=True, location="evil.onnx.data", size_threshold=0)
    secret = room.root.parent / "secret.bin"
    os.replace(room / "evil.onnx.data", secret)
    os.symlink(secret, room / "evil.onnx.data")
    before = snapshot(room.root)
    trace = room.root.parent / "trace.txt"
    env = dict(os.environ, TMPDIR=str(room.tmp), PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run(["strace", "-f", "-qq", "-e", "trace=%file", "-o", str(trace), *_cli(*room.argv(argv))],
                          cwd=room.root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == code, proc.stderr
    if code == 2:
        check_error(proc.returncode, proc.stderr, label)
        assert snapshot(room.root) == before
        allowed = [str(room.tmp)]
    else:
        allowed = [str(out), str(room.tmp)]
        after = snapshot(room.root)
        assert all(after.get(k) == v for k, v in before.items() if not k.startswith("out")), "an input changed"
    assert not os.listdir(room.tmp)
    bad = _writes_outside(trace, allowed)
    assert not bad, "\n".join(bad[:10])


def test_an_existing_log_file_is_appended_but_an_input_never_is(room, capsys):
    (room / "run.log").write_text("earlier\n")
    assert main(room.argv(["--log-file", "@/run.log", "inspect", "@/m.onnx"])) == 0
    assert (room / "run.log").read_text().startswith("earlier\n")
    room.probe(["inspect", "@/m.onnx", "--log-file=@/m.onnx"], "named on the command line", "--log-file= the model")
    room.probe(["--log-file", "@/ext.onnx.data", "inspect", "@/ext.onnx"], "external data", "--log-file the .data")


FEED_PROBES = [
    ("0-d array", dict(input=np.float32(1), labels=np.int64(1)), "single value"),
    ("float labels with cross-entropy", dict(input=X, labels=Y + 0.5), "labels"),
]


@pytest.mark.parametrize("label,arrays,expect", FEED_PROBES, ids=[p[0] for p in FEED_PROBES])
def test_npz_keyed_by_input_names_bad_data_is_one_clean_error(room, label, arrays, expect):
    np.savez(room / "f.npz", **arrays)
    room.probe(["prune", "@/m.onnx", "-d", "@/f.npz", "-o", "@/o.onnx", "--sparsity", "0.5", *QUICK], expect, label)
