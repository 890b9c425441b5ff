"""One error hierarchy for the whole library.

Every error a user can cause derives from :class:`AdmmOnnxError`; the CLI turns these into a
one-line message and exit code 2. Anything else escaping the library is a bug.
"""


import errno
import re
from typing import Optional

# ONNX Runtime's messages carry C++ source locations ("/onnxruntime_src/.../graph.cc:1234
# onnxruntime::Graph::Resolve(...)", "::<lambda(...)> endian_utils.cc:56 CopyLittleEndian"):
# users get the sentence, not the paths, lambdas and signatures.
_CPP_LAMBDA = re.compile(r"[\w:]*<lambda\((?:[^()]|\([^()]*\))*\)>")
_CPP_SIGNATURE = re.compile(r"(?:[\w~]+::)+[\w~<>]+\((?:[^()]|\([^()]*\))*\)(?:\s*const)?")
_CPP_LOCATION = re.compile(r"(?:[\w.~-]*/)*[\w.~-]+\.(?:cc|cpp|cxx|c|h|hpp|cu|inl):\d+")
_ORT_PREFIX = re.compile(r"\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*\w+\s*:\s*|onnxruntime:common:Status\s*")
# What is left of a failed C++ check ("virtual OrtValue* ... status.IsOK() was false."): the
# return type of a stripped signature and the check's expression.
_CPP_RETURN_TYPE = re.compile(r"\b(?:virtual|static|inline)\s+(?:const\s+)?[\w:<>]+\s*[*&]*\s*(?=[\w~]+::)")
_CPP_CHECK = re.compile(r"\b\w+(?:(?:\.|->)\w+)*\([^()]*\)\s+was false\.?|\bvoid\s+(?=\w)")


def clean_message(text: str) -> str:
    """One line of ``text`` without C++ source paths, signatures and ORT's error-code prefix."""
    text = _ORT_PREFIX.sub("", str(text))
    text = _CPP_RETURN_TYPE.sub("", text)
    text = _CPP_LAMBDA.sub(" ", text)
    text = _CPP_SIGNATURE.sub(" ", text)
    text = _CPP_LOCATION.sub(" ", text)
    text = _CPP_CHECK.sub(" ", text)
    text = " ".join(text.split())
    text = re.sub(r"\s+([:;,])", r"\1", text)
    text = re.sub(r"([:;])(?:\s*[:;])+", r"\1", text)
    return text.strip(" :;")


def error_text(exc: BaseException, limit: int = 300) -> str:
    """One line saying what ``exc`` says (see :func:`clean_message`), or its type's name."""
    return clean_message(str(exc))[:limit] or type(exc).__name__


class AdmmOnnxError(Exception):
    """Base class of every error admm-onnx raises on purpose."""

    #: Short hint appended to the one-line message ("how to fix it").
    hint = ""
    #: False when a rerun with ``--resume`` cannot help (e.g. the work directory was refused).
    resumable = True

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


# ONNX Runtime's pybind exception types raised for a model it cannot load or run.
_ORT_MODEL_ERRORS = frozenset(
    {"Fail", "InvalidArgument", "NoSuchFile", "NoModel", "InvalidProtobuf", "InvalidGraph", "NotImplemented",
     "ModelLoaded", "EPFail", "RuntimeException"}
)


def as_user_error(exc: BaseException) -> "Optional[AdmmOnnxError]":
    """The user-facing error for an exception that escaped the library, if its cause is the
    user's input or environment rather than a bug (disk full, out of memory, permission
    denied, a file that vanished, a model ONNX itself rejects, a truncated archive)."""
    if isinstance(exc, AdmmOnnxError):
        return exc
    if isinstance(exc, MemoryError):
        return AdmmOnnxError("out of memory", hint="use a smaller --batch-size or model, or free memory")
    if isinstance(exc, RecursionError):
        return AdmmOnnxError("input nested too deeply to process")
    if isinstance(exc, OSError):
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return OutputError("no space left on the device", hint="free some disk space and retry")
        if exc.errno == errno.EMFILE or exc.errno == errno.ENFILE:
            return AdmmOnnxError("too many open files", hint="raise the limit (ulimit -n) or use fewer --workers")
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            where = f": {exc.filename}" if exc.filename else ""
            return OutputError(f"permission denied{where}")
        if exc.filename and exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.ELOOP, errno.ENAMETOOLONG,
                                          errno.EEXIST, errno.ENXIO, errno.ETXTBSY, errno.EBUSY):
            return OutputError(f"cannot use {exc.filename}: {exc.strerror}")
        if exc.errno == errno.EIO:
            return AdmmOnnxError(f"input/output error{': ' + str(exc.filename) if exc.filename else ''}",
                                 hint="the disk or file system reported a hardware or network error")
    try:
        import onnx.checker
        import onnx.shape_inference

        onnx_errors = (onnx.checker.ValidationError, onnx.shape_inference.InferenceError)
    except Exception:  # pragma: no cover - onnx always present
        onnx_errors = ()
    if onnx_errors and isinstance(exc, onnx_errors):
        return ModelError(f"the model is not valid ONNX: {clean_message(str(exc))[:300]}",
                          hint="check it with onnx.checker.check_model(model, full_check=True)")
    if type(exc).__module__.startswith("onnxruntime.capi") and type(exc).__name__ in _ORT_MODEL_ERRORS:
        return ModelError(f"ONNX Runtime cannot run the model: {clean_message(str(exc))[:300]}")
    if isinstance(exc, RuntimeError) and "Unexpected input data type" in str(exc):
        return DataError(f"the data does not have the type the model or loss takes: {clean_message(str(exc))[:200]}",
                         hint="class labels must be integers for cross_entropy; float targets need --loss mse")
    if isinstance(exc, RuntimeError) and ("Failed to save checkpoint" in str(exc) or "Failed to load checkpoint" in
                                          str(exc)):
        return OutputError(f"ONNX Runtime cannot write or read the training checkpoint: {clean_message(str(exc))[:200]}",
                           hint="the work directory must stay in place (and have room) while the run goes on")
    if isinstance(exc, RuntimeError) and "Non-zero status code returned while running" in str(exc):
        # the training API's own RuntimeError (a failed kernel during a step): the model or data's
        if "SoftmaxCrossEntropyLoss" in str(exc) or "admm/ce" in str(exc):
            return DataError(f"the loss cannot take these labels: {clean_message(str(exc))[:250]}",
                             hint="labels need the model output's shape without its class axis")
        return ModelError(f"ONNX Runtime cannot run the model: {clean_message(str(exc))[:300]}")
    import zipfile
    import zlib

    if isinstance(exc, (EOFError, zipfile.BadZipFile, zlib.error)):
        return DataError(f"an input file is truncated or corrupt: {clean_message(str(exc))[:200]}")
    text = str(exc)
    if "No space left on device" in text:
        return OutputError("no space left on the device", hint="free some disk space and retry")
    return None
