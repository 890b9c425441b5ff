"""Bring the training copy to an opset and IR version ORT training 1.19.2 can differentiate.

Contract:
- Limits: ORT 1.19.2 (and onnx 1.17) load IR <= 10 and default-domain opset <= 21. A model
  above either limit that uses nothing newer is lowered, the user's graph included
  (:func:`lower_versions`, called by the pipeline when it loads the model): the same graph,
  declared at opset 21 and/or IR 10, computes the same and loads in every ONNX Runtime since
  1.19. "Nothing newer" is decided from the schemas of the onnx package: every default-domain
  op of the graph (subgraphs and functions included) has, at the model's opset, the same
  attributes, inputs and outputs as at opset 21 (the opset-22 bumps only add bfloat16 to the
  type constraints), and no tensor is bfloat16 (which those bumps allowed) or of a type newer
  than IR 10. Anything else (an opset this onnx does not know, a changed op) is refused with a
  one-line ModelError naming the limit and the fix (:func:`check_versions`); converting ops
  down is not done.
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

import logging
from typing import List

import onnx
from onnx import helper, version_converter

from ..errors import ModelError
from ._util import checked, opset_version
from .shapes import light_copy

log = logging.getLogger(__name__)

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


def _all_nodes(model: onnx.ModelProto):
    """Every node: functions, the main graph and its subgraphs."""
    for f in model.functions:
        yield from f.node
    graphs = [model.graph]
    while graphs:
        g = graphs.pop()
        for node in g.node:
            yield node
            for a in node.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    graphs.append(a.g)
                elif a.type == onnx.AttributeProto.GRAPHS:
                    graphs.extend(a.graphs)


def _elem_types(model: onnx.ModelProto) -> set:
    g = model.graph
    types = {t.data_type for t in g.initializer}
    for v in list(g.input) + list(g.output) + list(g.value_info):
        if v.type.HasField("tensor_type"):
            types.add(v.type.tensor_type.elem_type)
    for node in _all_nodes(model):
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                types.add(a.t.data_type)
            elif node.op_type == "Cast" and a.name == "to":
                types.add(a.i)
    return types


def _signature(schema) -> tuple:
    return (sorted(schema.attributes), [(i.name, i.option) for i in schema.inputs],
            [(o.name, o.option) for o in schema.outputs])


def _newer_ops(model: onnx.ModelProto, opset: int) -> List[str]:
    """Default-domain ops whose definition at ``opset`` differs from opset 21 (besides types)."""
    from onnx import defs

    bad = set()
    for node in _all_nodes(model):
        if node.domain not in ("", "ai.onnx"):
            continue
        try:
            new, old = defs.get_schema(node.op_type, opset, ""), defs.get_schema(node.op_type, MAX_OPSET, "")
        except Exception:  # noqa: BLE001  (not defined at one of the two)
            bad.add(node.op_type)
            continue
        if new.since_version > MAX_OPSET and _signature(new) != _signature(old):
            bad.add(node.op_type)
    return sorted(bad)


def lower_versions(model: onnx.ModelProto) -> List[str]:
    """Lower ``model``'s IR to 10 and default opset to 21 in place when it uses nothing newer
    (module docstring); returns what was lowered (empty: nothing to do or not possible, then
    :func:`check_versions` says why)."""
    from onnx import defs

    changed = []
    types = _elem_types(model)
    opset = opset_version(model)
    if _has_default_opset(model) and MAX_OPSET < opset <= defs.onnx_opset_version():
        if onnx.TensorProto.BFLOAT16 not in types and not _newer_ops(model, opset):
            for op in model.opset_import:
                if op.domain in ("", "ai.onnx"):
                    op.version = MAX_OPSET
            changed.append(f"opset {opset} -> {MAX_OPSET}")
    if model.ir_version > MAX_IR_VERSION and max(types, default=0) <= onnx.TensorProto.INT4:
        changed.append(f"IR {model.ir_version} -> {MAX_IR_VERSION}")
        model.ir_version = MAX_IR_VERSION
    return changed


def within_runtime_versions(model: onnx.ModelProto, quiet: bool = False) -> onnx.ModelProto:
    """``model``, or a copy lowered to IR / opset the training runtime (and onnx's checker)
    reads when it is newer but uses nothing newer (:func:`lower_versions`; logged unless
    ``quiet``). A model that does use newer ops is returned as it is (the caller's checks
    refuse it)."""
    if model.ir_version <= MAX_IR_VERSION and opset_version(model) <= MAX_OPSET:
        return model
    lowered = onnx.ModelProto()
    lowered.CopyFrom(model)
    changes = lower_versions(lowered)
    if not changes:
        return model
    if not quiet:
        log.warning(
            "the model uses nothing newer than opset %d / IR %d: read and written as such (%s)",
            MAX_OPSET, MAX_IR_VERSION, ", ".join(changes))
    return lowered


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
