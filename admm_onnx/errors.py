"""One error hierarchy for the whole library.

Every error a user can cause derives from :class:`AdmmOnnxError`; the CLI turns these into a
one-line message and exit code 2. Anything else escaping the library is a bug.
"""


import errno
import re
from typing import Optional

# ONNX Runtime's messages carry C++ source locations ("/onnxruntime_src/.../graph.cc:1234
# onnxruntime::Graph::Resolve(...)"): users get the sentence, not the paths.
_CPP_LOCATION = re.compile(r"/[\w./-]+\.(?:cc|cpp|cxx|c|h|hpp):\d+(?:\s+[\w:~<>,*& ]+\([^)]*\)(?:\s*const)?)?")
_ORT_PREFIX = re.compile(r"\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*\w+\s*:\s*")


def clean_message(text: str) -> str:
    """One line of ``text`` without C++ source paths and ORT's error-code prefix."""
    text = _ORT_PREFIX.sub("", str(text))
    text = _CPP_LOCATION.sub("", text)
    text = " ".join(text.split())
    return text.strip(" :")


class AdmmOnnxError(Exception):
    """Base class of every error admm-onnx raises on purpose."""

    #: Short hint appended to the one-line message ("how to fix it").
    hint = ""

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        if hint:
            self.hint = hint

    def one_line(self) -> str:
        text = clean_message(str(self))
        if self.hint:
            text += f" ({clean_message(self.hint)})"
        return text


class ModelError(AdmmOnnxError):
    """The model file is missing, unreadable, invalid, or unsupported."""


class ConfigError(AdmmOnnxError):
    """The pruning configuration is invalid or does not match the model."""


class DataError(AdmmOnnxError):
    """The data set is missing, malformed, or does not match the model."""


class TrainingError(AdmmOnnxError):
    """Training could not proceed (divergence, graph that cannot be differentiated...)."""


class OutputError(AdmmOnnxError):
    """The output cannot be written where asked."""


class InstallError(AdmmOnnxError, ImportError):
    """The installed ONNX Runtime is not the training build admm-onnx needs (see ``_install``)."""


def as_user_error(exc: BaseException) -> "Optional[AdmmOnnxError]":
    """The user-facing error for an exception that escaped the library, if its cause is the
    user's environment rather than a bug (disk full, out of memory, permission denied)."""
    if isinstance(exc, MemoryError):
        return AdmmOnnxError("out of memory", hint="use a smaller --batch-size or model, or free memory")
    if isinstance(exc, RecursionError):
        return AdmmOnnxError("input nested too deeply to process")
    if isinstance(exc, OSError):
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return OutputError("no space left on the device", hint="free some disk space and retry")
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            where = f": {exc.filename}" if exc.filename else ""
            return OutputError(f"permission denied{where}")
    text = str(exc)
    if "No space left on device" in text:
        return OutputError("no space left on the device", hint="free some disk space and retry")
    return None
