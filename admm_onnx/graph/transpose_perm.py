"""Write out the default ``perm`` of ``Transpose`` nodes that leave it implicit.

Math: ONNX's Transpose without ``perm`` reverses the axes, ``perm = [r-1, ..., 1, 0]`` for an
input of rank r, so writing that list computes the same thing. ORT training 1.19.2's graph
optimisation (``generate_artifacts`` -> ``get_optimized_model``) looks the attribute up
unconditionally and fails with "IndexError: unordered_map::at" on any perm-less Transpose of
the main graph, on the gradient path or not. The rank comes from shape inference; a perm-less
Transpose whose input rank is unknown is left alone (evaluation runs it fine) and
:func:`check_explicit_perms`, called before artifacts are built, refuses it in one line. Only
the training copy is rewritten: the user's graph is written as it was.
"""
from __future__ import annotations

import onnx
from onnx import helper

from ..errors import TrainingError
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
            continue  # check_explicit_perms refuses it for training
        node.attribute.append(helper.make_attribute("perm", list(range(len(shape)))[::-1], attr_type=onnx.AttributeProto.INTS))
        done += 1
    if done:
        checked(model, "explicit_transpose_perm")
    return done


def check_explicit_perms(model: onnx.ModelProto) -> None:
    """Raise a one-line TrainingError if a Transpose of the main graph still has no ``perm``
    (its input rank was unknown to :func:`explicit_transpose_perm`)."""
    left = [n for n in model.graph.node if _perm_less(n)]
    if left:
        node = left[0]
        more = f" ({len(left)} such nodes)" if len(left) > 1 else ""
        raise TrainingError(
            f"Transpose node {_label(node)!r} has no perm attribute and the rank of its input "
            f"{node.input[0] if node.input else ''!r} is unknown; ONNX Runtime training needs the permutation "
            f"written out{more}",
            hint="re-export the model with perm given explicitly, or with input shapes that fix the ranks",
        )
