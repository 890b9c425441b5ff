"""Helpers shared by the graph rewrites."""
from __future__ import annotations

import onnx

from ..errors import ModelError


def checked(model: onnx.ModelProto, what: str) -> onnx.ModelProto:
    """Run the ONNX checker after a rewrite; a failure is a bug in that rewrite, named."""
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise ModelError(f"internal rewrite '{what}' produced an invalid graph: {exc}") from exc
    except ValueError as exc:
        if "2GB" not in str(exc):  # too large to check in memory: the file save checks it
            raise
    return model


class NameScope:
    """Hands out tensor/node names that do not collide with any name already in the graph."""

    def __init__(self, graph: onnx.GraphProto):
        self.used = {t.name for t in graph.initializer}
        self.used.update(v.name for v in graph.input)
        self.used.update(v.name for v in graph.output)
        for node in graph.node:
            self.used.update(node.input)
            self.used.update(node.output)
            self.used.add(node.name)

    def __call__(self, base: str) -> str:
        name, i = base, 1
        while name in self.used:
            i += 1
            name = f"{base}_{i}"
        self.used.add(name)
        return name


def opset_version(model: onnx.ModelProto) -> int:
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx"):
            return op.version
    return 1
