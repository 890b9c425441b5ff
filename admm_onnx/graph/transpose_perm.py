"""Write out the default ``perm`` of ``Transpose`` nodes that leave it implicit.

Math: ONNX's Transpose without ``perm`` reverses the axes, ``perm = [r-1, ..., 1, 0]`` for an
input of rank r, so writing that list computes the same thing. ORT training 1.19.2's graph
optimisation (``generate_artifacts`` -> ``get_optimized_model``) looks the attribute up
unconditionally and fails with "IndexError: unordered_map::at" on any perm-less Transpose of
the main graph, on the gradient path or not. The rank comes from shape inference; a perm-less
Transpose whose input rank is unknown is left alone (ORT's optimiser does not always fail on
one: a Reshape to a shape computed at run time trains; when it fails, training.build_artifacts
says so in one line). Only the training copy is rewritten: the user's graph is written as it was.
"""
from __future__ import annotations

import onnx
from onnx import helper

from ._util import checked
from .shapes import tensor_info


def _perm_less(node: onnx.NodeProto) -> bool:
    return (node.op_type == "Transpose" and node.domain in ("", "ai.onnx")
            and not any(a.name == "perm" for a in node.attribute))


def _label(node: onnx.NodeProto) -> str:
    return node.name or (node.output[0] if node.output else "?")


def explicit_transpose_perm(model: onnx.ModelProto) -> int:
    """Give every perm-less Transpose of the main graph whose input rank is known its explicit
    (reversing) ``perm``, in place; returns how many."""
    nodes = [n for n in model.graph.node if _perm_less(n)]
    if not nodes:
        return 0
    shapes, _ = tensor_info(model)
    done = 0
    for node in nodes:
        shape = shapes.get(node.input[0]) if node.input else None
        if shape is None:
            continue  # left as it is (see the module's docstring)
        node.attribute.append(helper.make_attribute("perm", list(range(len(shape)))[::-1], attr_type=onnx.AttributeProto.INTS))
        done += 1
    if done:
        checked(model, "explicit_transpose_perm")
    return done
