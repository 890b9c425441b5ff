"""One error hierarchy for the whole library.

Every error a user can cause derives from :class:`AdmmOnnxError`; the CLI turns these into a
one-line message and exit code 2. Anything else escaping the library is a bug.
"""


class AdmmOnnxError(Exception):
    """Base class of every error admm-onnx raises on purpose."""

    #: Short hint appended to the one-line message ("how to fix it").
    hint = ""

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        if hint:
            self.hint = hint

    def one_line(self) -> str:
        text = " ".join(str(self).split())
        if self.hint:
            text += f" ({' '.join(self.hint.split())})"
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
