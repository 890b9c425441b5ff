"""Reference models built directly as ONNX graphs (no framework needed).

Installed as ``admm_onnx.models``. Every builder returns an ``onnx.ModelProto`` with a dynamic
batch dimension, one float input ``input`` (N, C, H, W) and one output ``logits`` (N, classes),
weights initialised from a seeded NumPy generator.
"""
from __future__ import annotations

from typing import Callable, Dict

import onnx

from .lenet import lenet5, lenet300_100
from .resnet_cifar import resnet20

MODELS: Dict[str, Callable[..., onnx.ModelProto]] = {
    "lenet5": lenet5,
    "lenet300-100": lenet300_100,
    "resnet20": resnet20,
}


def build(name: str, **kwargs) -> onnx.ModelProto:
    """Build the reference model ``name`` (one of :data:`MODELS`)."""
    from admm_onnx.errors import ConfigError

    try:
        builder = MODELS[name]
    except KeyError:
        raise ConfigError(f"unknown model {name!r}; choose one of {', '.join(sorted(MODELS))}") from None
    return builder(**kwargs)


__all__ = ["MODELS", "build", "lenet5", "lenet300_100", "resnet20"]
