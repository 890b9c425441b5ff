"""Torch-free access to the ONNX Runtime training API.

``import onnxruntime.training`` runs ``onnxruntime/training/__init__.py``, which imports
``amp`` and ``optim`` and through them PyTorch (microsoft/onnxruntime issue 22070). The parts we
use -- ``artifacts``, ``onnxblock`` and ``api`` -- need no torch. This module registers a bare
package object for ``onnxruntime.training`` (its ``__path__`` set, its ``__init__`` not run)
and imports just those three submodules.

If ``onnxruntime.training`` is already imported (for example by a user who has torch), that
module is used as it is.
"""
from __future__ import annotations

import importlib
import os
import sys
import tempfile
import types

from .errors import AdmmOnnxError

_PKG = "onnxruntime.training"


def _training_package() -> types.ModuleType:
    if _PKG in sys.modules:
        return sys.modules[_PKG]
    try:
        import onnxruntime
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise AdmmOnnxError(
            f"onnxruntime is not importable: {exc}",
            hint="pip install onnxruntime-training-cpu==1.19.2",
        ) from exc
    path = os.path.join(os.path.dirname(onnxruntime.__file__), "training")
    if not os.path.isfile(os.path.join(path, "artifacts.py")):
        raise AdmmOnnxError(
            "the installed onnxruntime has no training API (plain onnxruntime is installed)",
            hint="pip uninstall onnxruntime && pip install onnxruntime-training-cpu==1.19.2",
        )
    pkg = types.ModuleType(_PKG)
    pkg.__path__ = [path]
    pkg.__package__ = _PKG
    pkg.__file__ = os.path.join(path, "__init__.py")
    sys.modules[_PKG] = pkg
    onnxruntime.training = pkg
    return pkg


def _load(name: str):
    _training_package()
    return importlib.import_module(f"{_PKG}.{name}")


#: ORT log level of every session: 4 (fatal only; errors reach Python as exceptions).
LOG_SEVERITY = 4


def _quiet_ort() -> None:
    """ORT logs every graph transformer at INFO during gradient builds, and each failing node at
    ERROR with C++ source paths before raising the same error to Python (which the library turns
    into a user's error): log fatal errors only."""
    import onnxruntime

    onnxruntime.set_default_logger_severity(LOG_SEVERITY)


_quiet_ort()


artifacts = _load("artifacts")
onnxblock = _load("onnxblock")
api = _load("api")


def _quiet_gradient_builder() -> None:
    """The gradient build makes its own SessionOptions, whose logger prints every graph
    transformer at INFO on stderr. Give it options that log fatal errors only."""
    utils = importlib.import_module(f"{_PKG}.onnxblock._training_graph_utils")
    make_options = utils.SessionOptions
    if getattr(make_options, "_admm_quiet", False):
        return

    def quiet_options():
        options = make_options()
        options.log_severity_level = LOG_SEVERITY
        return options

    quiet_options._admm_quiet = True
    utils.SessionOptions = quiet_options


_quiet_gradient_builder()


def _private_block_files() -> None:
    """onnxblock's ``Block`` keeps a scratch file at ``<cwd>/temp.onnx`` (written only for models
    over 2 GB) and its ``__del__`` deletes ``<cwd>/temp.onnx`` and ``temp.onnx.data`` whenever
    they exist: a user's file of that name, even the input model or the output just written.
    Every Block gets a scratch name of its own in the temp folder instead, which nothing else
    uses (so ``__del__`` removes only what the Block itself wrote)."""
    block = onnxblock.Block
    init = block.__init__
    if getattr(init, "_admm_private", False):
        return

    def private_init(self, *args, **kwargs):
        # What Block.__init__ (onnxruntime-training 1.19, the last release) sets, without its
        # os.getcwd(): that fails in a deleted working folder, and names the folder we avoid.
        self.base = None
        name = f".admm-onnx-block-{os.getpid()}-{id(self):x}.onnx"
        self.temp_onnx_file_path = os.path.join(tempfile.gettempdir(), name)
        self.temp_external_data_file_name = name + ".data"

    private_init._admm_private = True
    block.__init__ = private_init


_private_block_files()

__all__ = ["artifacts", "onnxblock", "api"]
