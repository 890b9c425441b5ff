"""ONNX Runtime's training API without torch: ``from admm_onnx.ort import artifacts, onnxblock, api``.

The same modules as ``onnxruntime.training.artifacts`` / ``.onnxblock`` / ``.api``, loaded
without running ``onnxruntime/training/__init__.py`` (which imports torch; see _ort.py).
"""
from ._ort import api, artifacts, onnxblock

__all__ = ["api", "artifacts", "onnxblock"]
