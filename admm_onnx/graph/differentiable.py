"""Find ops ORT training cannot differentiate, before (and after) it tries.

Contract: ORT training 1.19.2 builds the backward graph from per-op gradient builders. A node
needs one when a float tensor flows from a trainable parameter through it to the trained
output. :data:`GRADIENT_OPS` lists the op types that have a builder in 1.19.2 (read from the
library and confirmed by building artifacts for one-op graphs; Sum, Mean, LRN, PRelu, Elu,
Selu, Celu, Softplus, Softsign, HardSigmoid, HardSwish, Mish, ThresholdedRelu, Shrink,
InstanceNormalization, GroupNormalization, LpNormalization, Einsum, GlobalMaxPool, LpPool,
ReduceMax/Min/Prod/SumSquare/LogSum, DepthToSpace, SpaceToDepth, CumSum, Upsample, Mod,
Atan/Tan/Asin/Acos/Sinh/Cosh/Atanh have none; the graph rewrites in prepare.py cover the common
ones). Resize and ConvTranspose have builders but their ResizeGrad/ConvTransposeGrad kernels are
CUDA-only: a CPU training session refuses to start; AveragePool's CPU AveragePoolGrad kills
the process with SIGFPE at the first step. None of the three is listed (resize_matmul.py,
convtranspose_conv.py and avgpool_conv.py rewrite the usual forms).

- :func:`undifferentiable_nodes` lists the nodes on a differentiable path that have no builder.
- :func:`check_differentiable` raises a one-line :class:`~admm_onnx.errors.TrainingError`
  naming the first such op and node (and how many there are), instead of ORT's C++ trace.
  Call it on the prepared training copy right before ``generate_artifacts``.
- :func:`explain_gradient_error` turns the RuntimeError ORT raises anyway (an op this list
  believes differentiable but ORT does not, an unreachable parameter) into the same kind of
  one-line TrainingError; call it from the ``except`` around ``generate_artifacts``.
Nothing here mutates the model.
"""
from __future__ import annotations

import re
from collections import defaultdict
from typing import Dict, List, Optional, Sequence, Set

import onnx

from ..errors import TrainingError
from .analysis import FLOAT_TYPES
from .shapes import tensor_info

#: Default-domain op types with an ORT training 1.19.2 gradient builder.
GRADIENT_OPS = frozenset(
    """Abs Add BatchNormalization Cast Clip Concat Conv Cos Div Dropout
    Erf Exp Expand Flatten Gather GatherElements GatherND Gelu Gemm GlobalAveragePool Identity
    LayerNormalization LeakyRelu Log LogSoftmax MatMul Max MaxPool Min Mul Neg Pad Pow Reciprocal
    ReduceL2 ReduceLogSumExp ReduceMean ReduceSum Relu Reshape ScatterElements ScatterND
    Sigmoid Sin Slice Softmax SoftmaxCrossEntropyLoss Split Sqrt Squeeze Sub Tanh Tile TopK
    Transpose Trilu Unsqueeze Where""".split()
)
#: com.microsoft op types with a builder.
MS_GRADIENT_OPS = frozenset(
    """BiasGelu FastGelu QuickGelu SimplifiedLayerNormalization SoftmaxCrossEntropy
    SparseSoftmaxCrossEntropy ConcatTraining BatchNormInternal GatherND""".split()
)
#: What to do about the usual suspects.
_HINTS = {
    "Sum": "admm_onnx rewrites Sum itself; is this Sum in a subgraph?",
    "LRN": "admm_onnx rewrites LRN itself; is this LRN in a subgraph?",
    "PRelu": "admm_onnx rewrites PRelu itself; is this PRelu in a subgraph?",
    "Elu": "admm_onnx rewrites Elu itself; is this Elu in a subgraph?",
    "HardSwish": "admm_onnx rewrites HardSwish itself; is this HardSwish in a subgraph?",
    "HardSigmoid": "admm_onnx rewrites HardSigmoid itself; is this HardSigmoid in a subgraph?",
    "InstanceNormalization": "admm_onnx rewrites InstanceNormalization of a known input rank itself; "
                             "export it as ReduceMean/Sub/Mul/Div otherwise",
    "Einsum": "export the contraction as MatMul/Transpose",
    "DepthToSpace": "admm_onnx rewrites a DepthToSpace of a static (C, H, W) input itself; export with a fixed size",
    "SpaceToDepth": "admm_onnx rewrites a SpaceToDepth of a static (C, H, W) input itself; export with a fixed size",
    "AveragePool": "admm_onnx rewrites an AveragePool with ceil_mode 0, explicit pads, no dilation and a known "
                   "channel count; export with those (ORT's AveragePool gradient crashes on the CPU)",
    "ConvTranspose": "admm_onnx rewrites a ConvTranspose with group 1, explicit pads, a static input shape (but the "
                     "batch) and an initializer weight; export the model with a fixed input size",
    "Resize": "admm_onnx rewrites a Resize whose input shape (but the batch) is static and whose scales/sizes "
              "are constants; export the model with a fixed input size",
}


def _label(node: onnx.NodeProto) -> str:
    return node.name or (node.output[0] if node.output else "?")


def _has_gradient(node: onnx.NodeProto) -> bool:
    if node.domain in ("", "ai.onnx"):
        return node.op_type in GRADIENT_OPS
    if node.domain == "com.microsoft":
        return node.op_type in MS_GRADIENT_OPS
    return False


#: Ops that build or read tensor sequences: values pass through them, gradients do not (1.19.2).
SEQUENCE_OPS = frozenset({"SequenceConstruct", "SequenceInsert", "SequenceAt", "SequenceErase", "SplitToSequence",
                          "ConcatFromSequence", "SequenceEmpty", "SequenceLength"})


def undifferentiable_nodes(model: onnx.ModelProto, trainable: Sequence[str], output: str) -> List[onnx.NodeProto]:
    """Nodes between a ``trainable`` parameter and ``output`` (through float tensors) that ORT
    training 1.19.2 cannot differentiate, in graph order."""
    graph = model.graph
    _, types = tensor_info(model)
    is_float = lambda name: types.get(name) in FLOAT_TYPES  # noqa: E731  (unknown type: not float)
    consumers: Dict[str, List[onnx.NodeProto]] = defaultdict(list)
    producers = {}
    for node in graph.node:
        for i in node.input:
            consumers[i].append(node)
        for o in node.output:
            producers[o] = node
    # Forward from the parameters through float tensors.
    forward: Set[int] = set()
    live, todo = set(trainable), list(trainable)
    while todo:
        for node in consumers.get(todo.pop(), []):
            if id(node) in forward:
                continue
            forward.add(id(node))
            for o in node.output:  # a sequence made of live tensors carries them on (no gradient through it)
                if o and (is_float(o) or node.op_type in SEQUENCE_OPS) and o not in live:
                    live.add(o)
                    todo.append(o)
    # Backward from the output through float tensors.
    backward: Set[int] = set()
    need, todo = {output}, [output]
    while todo:
        node = producers.get(todo.pop())
        if node is None or id(node) in backward:
            continue
        backward.add(id(node))
        for i in node.input:
            if i and i in live and i not in need:
                need.add(i)
                todo.append(i)
    return [n for n in graph.node if id(n) in forward and id(n) in backward and not _has_gradient(n)]


def check_differentiable(model: onnx.ModelProto, trainable: Sequence[str], output: str) -> None:
    """Raise a one-line TrainingError if ORT training cannot differentiate ``model`` to ``output``."""
    bad = undifferentiable_nodes(model, trainable, output)
    if not bad:
        return
    first = bad[0]
    ops = sorted({n.op_type for n in bad})
    more = f" ({len(bad)} such nodes: {', '.join(ops)})" if len(bad) > 1 else ""
    raise TrainingError(
        f"ONNX Runtime training has no gradient for op {first.op_type} (node {_label(first)!r}){more}",
        hint=_HINTS.get(first.op_type, "re-export the model without this op, or freeze the layers before it"),
    )


_NOT_REGISTERED = re.compile(r"gradient builder has not been registered:\s*(\S+) for node\s*(\S*)")
_UNREACHABLE = re.compile(r"partial derivative for '([^']+)' as it's unreachable")


def explain_gradient_error(exc: BaseException, model: Optional[onnx.ModelProto] = None) -> Optional[TrainingError]:
    """A one-line TrainingError for ORT's gradient-build RuntimeError, or None if not recognised."""
    text = str(exc)
    m = _NOT_REGISTERED.search(text)
    if m:
        op, node = m.group(1), m.group(2)
        if not node and model is not None:  # ORT prints the node name, which may be empty
            names = [_label(n) for n in model.graph.node if n.op_type == op]
            node = names[0] if names else ""
        where = f" (node {node!r})" if node else ""
        return TrainingError(
            f"ONNX Runtime training has no gradient for op {op}{where}",
            hint=_HINTS.get(op, "re-export the model without this op, or freeze the layers before it"),
        )
    m = _UNREACHABLE.search(text)
    if m:
        return TrainingError(
            f"parameter {m.group(1)!r} does not affect the trained output",
            hint="choose the output it feeds with --model-output, or exclude it",
        )
    return None
