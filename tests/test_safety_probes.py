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
import hashlib
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

QUICK = ["--admm-iters", "1", "--retrain-epochs", "1", "--epochs-per-iter", "1", "--batch-size", "32", "-q"]


# -- harness ----------------------------------------------------------------------------------
def snapshot(root: Path) -> dict:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            elif p.is_file():
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                out[rel] = "special"
    return out


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
