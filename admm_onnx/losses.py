"""Base losses for classifiers, as onnxblock Blocks taking the logits tensor name.

- ``cross_entropy``: softmax cross-entropy on logits against int64 class indices.
- ``mse``: mean squared error of the output against one-hot targets (float, fed by the
  trainer from the same class indices).

Both read the labels from the graph input :data:`admm_onnx.data.LABELS`.
"""
from __future__ import annotations

from ._ort import onnxblock
from .data import LABELS
from .errors import ConfigError

LOSSES = ("cross_entropy", "mse")


class ClassifierLoss(onnxblock.Block):
    """``cross_entropy`` or ``mse`` on the model output named at build time."""

    def __init__(self, kind: str = "cross_entropy"):
        super().__init__()
        if kind not in LOSSES:
            raise ConfigError(f"unknown loss {kind!r}; choose one of {', '.join(LOSSES)}")
        self.kind = kind
        self._block = onnxblock.loss.CrossEntropyLoss() if kind == "cross_entropy" else onnxblock.loss.MSELoss()

    def build(self, output_name: str):
        return self._block(output_name, LABELS)
