"""Train through scikit-learn's ``ZipMap``: in the training copy it becomes ``Identity``.

Contract: skl2onnx classifiers end their probability output in ``ai.onnx.ml.ZipMap``, which
turns the (N, C) probability tensor into a sequence of {class label: probability} maps. ORT
training has no gradient for it, and a loss cannot read a map. In the training copy (never the
written model, which keeps its signature), a ZipMap whose output is a graph output is replaced
by ``Identity`` and that graph output becomes the float tensor (N, C) under the same name. The
values are the same numbers in the order of the ZipMap's ``classlabels_*`` attribute, which is
the order :meth:`admm_onnx.graph.outputs.OutputView.as_tensor` uses to read a written model's
maps back as an array.
"""
from __future__ import annotations

import onnx
from onnx import helper

from ._util import checked
from .shapes import tensor_info

ML_DOMAIN = "ai.onnx.ml"


def is_zipmap(node: onnx.NodeProto) -> bool:
    return node.op_type == "ZipMap" and node.domain == ML_DOMAIN


def zipmap_to_identity(model: onnx.ModelProto) -> int:
    """Replace output ZipMaps by Identity in place; returns how many."""
    graph = model.graph
    outputs = {o.name: o for o in graph.output}
    nodes = [n for n in graph.node if is_zipmap(n) and n.output[0] in outputs]
    if not nodes:
        return 0
    shapes, types = tensor_info(model)
    for node in nodes:
        x, y = node.input[0], node.output[0]
        labels = [a for a in node.attribute if a.name.startswith("classlabels")]
        classes = len(helper.get_attribute_value(labels[0])) if labels else None
        shape = shapes.get(x) or [None, classes]
        if len(shape) == 2 and not isinstance(shape[1], int):
            shape = [shape[0], classes]
        node.CopyFrom(helper.make_node("Identity", [x], [y], name=node.name or f"{y}/zipmap_bypass"))
        outputs[y].CopyFrom(helper.make_tensor_value_info(y, types.get(x) or onnx.TensorProto.FLOAT, shape))
    checked(model, "zipmap_to_identity")
    return len(nodes)
