"""Loading and saving ONNX models safely.

Contract:
- :func:`load_model` turns every way a model file can be wrong into a one-line
  :class:`~admm_onnx.errors.ModelError`, and loads external data (``.onnx.data``) eagerly.
- :func:`save_model` writes atomically: everything goes to temporary names in the target
  directory and is renamed into place only when complete, so a failure never leaves a
  half-written model behind. Large models (or ``external_data=True``) are written with their
  tensors in ``<name>.data`` beside the model.
- Neither function ever modifies its input file.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator, Optional, Union

import onnx
from google.protobuf.message import DecodeError

from .errors import ModelError, OutputError

PathLike = Union[str, os.PathLike]

def _umask_file_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_FILE_MODE = _umask_file_mode()

#: protobuf refuses to serialise a message of 2 GiB or more.
PROTOBUF_LIMIT = 2**31 - 1


def uses_external_data(model: onnx.ModelProto) -> bool:
    """True if any initializer of the main graph is stored outside the model file."""
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def load_model(path: PathLike, load_external_data: bool = True) -> onnx.ModelProto:
    """Load an ONNX model from ``path`` or raise a :class:`ModelError` saying what is wrong."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"model file not found: {path}")
    if path.is_dir():
        raise ModelError(f"model path is a directory, not an ONNX file: {path}")
    if not os.access(path, os.R_OK):
        raise ModelError(f"model file is not readable: {path}")
    if path.stat().st_size == 0:
        raise ModelError(f"model file is empty: {path}")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except DecodeError as exc:
        raise ModelError(f"not an ONNX model (protobuf decode failed): {path}") from exc
    except Exception as exc:  # onnx raises assorted errors on garbage input
        raise ModelError(f"cannot read ONNX model {path}: {exc}") from exc
    if not model.HasField("graph") or (not model.graph.node and not model.graph.output):
        raise ModelError(f"not an ONNX model (no graph found): {path}")
    if load_external_data and uses_external_data(model):
        try:
            onnx.external_data_helper.load_external_data_for_model(model, str(path.parent))
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot load the external data of {path}: {exc}") from exc
    return model


def check_output_path(output: PathLike, *inputs: PathLike) -> Path:
    """Validate an output path: its directory exists and it is none of the inputs."""
    out = Path(output)
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"output directory does not exist: {parent}")
    if out.is_dir():
        raise OutputError(f"output path is a directory: {out}")
    for inp in inputs:
        if inp is not None and Path(inp).exists() and out.exists() and os.path.samefile(out, inp):
            raise OutputError(f"output path is the input file: {out}", hint="choose another -o")
        if inp is not None and out.resolve() == Path(inp).resolve():
            raise OutputError(f"output path is the input file: {out}", hint="choose another -o")
    return out


@contextlib.contextmanager
def atomic_path(target: PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` on success only."""
    target = Path(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp" + suffix, dir=target.parent or ".")
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, _FILE_MODE)  # mkstemp makes 0600; outputs get the usual umask-based mode
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def save_model(
    model: onnx.ModelProto, path: PathLike, external_data: Optional[bool] = None, check: bool = True
) -> Path:
    """Atomically save ``model`` to ``path`` (external data in ``<name>.data`` if needed).

    ``external_data=None`` chooses: external data when the model would not fit in one protobuf.
    """
    path = Path(path)
    if external_data is None:
        external_data = model.ByteSize() >= PROTOBUF_LIMIT
    data_name = path.name + ".data"
    data_target = path.parent / data_name
    try:
        if not external_data:
            with atomic_path(path) as tmp:
                onnx.save_model(model, str(tmp))
                if check:
                    onnx.checker.check_model(str(tmp))
            if data_target.exists():  # stale data file from an earlier external save
                data_target.unlink()
            return path
        # External data: onnx writes the data file under the name given in `location`,
        # relative to the model's directory. Write both under temporary names, then rename the
        # data file first so the model never points at a missing file.
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent or "."))
        try:
            model = _copy_for_external_save(model)
            tmp_model = tmp_dir / path.name
            onnx.save_model(
                model,
                str(tmp_model),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=data_name,
                size_threshold=1024,
            )
            if check:
                onnx.checker.check_model(str(tmp_model))
            if (tmp_dir / data_name).exists():
                os.replace(tmp_dir / data_name, data_target)
            os.replace(tmp_model, path)
        finally:
            for leftover in tmp_dir.iterdir():
                leftover.unlink()
            tmp_dir.rmdir()
        return path
    except onnx.checker.ValidationError as exc:
        raise OutputError(f"refusing to write an invalid model to {path}: {exc}") from exc
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc}") from exc


def _copy_for_external_save(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnx's external-data save mutates the proto it is given; work on a copy."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy
