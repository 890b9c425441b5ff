"""Bring the training copy to an opset and IR version ORT training 1.19.2 can differentiate.

Contract:
- Limits: ORT 1.19.2 (and onnx 1.17) load IR <= 10 and default-domain opset <= 21. A model
  above either limit is refused with a one-line ModelError naming the limit and the fix
  (:func:`check_versions`). Converting down is not done: the pruned model is the user's own
  graph with new weights, and it would still be unloadable by ORT 1.19.
- Old opsets: the training graph needs opset >= 12 (``SoftmaxCrossEntropyLoss``, Dropout's
  ``training_mode`` input) and ORT's gradient builders are best exercised at the opsets
  current exporters write. A training copy below :data:`MIN_OPSET` is converted with
  ``onnx.version_converter`` to :data:`TARGET_OPSET` (the conversion is forward-identical:
  attributes become inputs, Softmax gets its opset-13 axis semantics through an explicit
  Flatten/Reshape). The conversion is only accepted when the result passes the checker and
  keeps every initializer name (the trained weights are written back by name); otherwise a
  ModelError says the model must be upgraded by hand.
- IR < 4 lists every initializer as a graph input; the copy's IR is raised to the lowest IR
  its opsets require (at least 4), which makes those listings optional, and
  :mod:`.initializer_inputs` then drops them.
The user's graph is not touched: the original is written back with its own opset and IR.
"""
from __future__ import annotations

import onnx
from onnx import helper, version_converter

from ..errors import ModelError
from ._util import checked, opset_version
from .shapes import light_copy

#: Highest IR version ORT training 1.19.2 (and the onnx 1.17 checker) accept.
MAX_IR_VERSION = 10
#: Highest default-domain opset ONNX Runtime 1.19 implements.
MAX_OPSET = 21
#: Training copies below this opset are upgraded.
MIN_OPSET = 13
#: What they are upgraded to.
TARGET_OPSET = 17


def check_versions(model: onnx.ModelProto) -> None:
    """Raise a one-line ModelError if ``model``'s IR or opset is above what ORT 1.19 loads."""
    if model.ir_version > MAX_IR_VERSION:
        raise ModelError(
            f"the model has IR version {model.ir_version}; ONNX Runtime 1.19 loads IR <= {MAX_IR_VERSION}",
            hint=f"re-export it with onnx<1.18 or set model.ir_version = {MAX_IR_VERSION} if it uses no IR-11 feature",
        )
    opset = opset_version(model)
    if opset > MAX_OPSET:
        raise ModelError(
            f"the model uses opset {opset}; ONNX Runtime 1.19 supports opset <= {MAX_OPSET}",
            hint=f"re-export it with opset {MAX_OPSET} or convert it: onnx.version_converter.convert_version(model, {MAX_OPSET})",
        )


def _init_names(model: onnx.ModelProto) -> set:
    return {t.name for t in model.graph.initializer}


def _has_default_opset(model: onnx.ModelProto) -> bool:
    return any(op.domain in ("", "ai.onnx") for op in model.opset_import)


def _restore_types(converted: onnx.ModelProto, original: onnx.ModelProto) -> None:
    """The converter (onnx 1.17) drops the type of non-tensor values it passes through (the
    ``seq(map)`` output of scikit-learn's ZipMap): give graph inputs/outputs back their original
    type and drop value_info entries it left untyped."""
    before = {v.name: v for v in list(original.graph.input) + list(original.graph.output)}
    for value in list(converted.graph.input) + list(converted.graph.output):
        if not value.type.WhichOneof("value") and value.name in before:
            value.type.CopyFrom(before[value.name].type)
    typed = [v for v in converted.graph.value_info if v.type.WhichOneof("value")]
    if len(typed) != len(converted.graph.value_info):
        del converted.graph.value_info[:]
        converted.graph.value_info.extend(typed)


def upgrade_opset(model: onnx.ModelProto) -> int:
    """Check limits, upgrade an old opset and IR in place; returns 1 if the copy changed, else 0."""
    check_versions(model)
    changed = 0
    opset = opset_version(model)
    if _has_default_opset(model) and opset < MIN_OPSET:
        # Convert a copy without the weight data (large initializers as typed inputs: the
        # adapters only read attributes and small constants), then put the weights back.
        light = light_copy(model)
        big = {i.name for i in light.graph.input} - {i.name for i in model.graph.input if i.name not in _init_names(model)}
        try:
            converted = version_converter.convert_version(light, TARGET_OPSET)
        except Exception as exc:  # the converter raises assorted errors
            raise ModelError(
                f"cannot upgrade the model from opset {opset} to {TARGET_OPSET} for training: {str(exc).splitlines()[0]}",
                hint=f"upgrade it yourself to opset >= {MIN_OPSET}",
            ) from exc
        _restore_types(converted, model)
        inputs = [i for i in converted.graph.input if i.name not in big]
        del converted.graph.input[:]
        converted.graph.input.extend(inputs)
        converted.graph.initializer.extend(t for t in model.graph.initializer if t.name in big)
        lost = _init_names(model) - _init_names(converted)
        if lost:
            raise ModelError(
                f"upgrading opset {opset} to {TARGET_OPSET} renamed initializers ({', '.join(sorted(lost)[:3])})",
                hint=f"upgrade the model yourself to opset >= {MIN_OPSET}",
            )
        ir = model.ir_version
        model.CopyFrom(converted)
        model.ir_version = max(ir, helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True))
        changed = 1
    if model.ir_version < 4:
        model.ir_version = max(4, helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True))
        changed = 1
    if changed:
        checked(model, "upgrade_opset")
    return changed
