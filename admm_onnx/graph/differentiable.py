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
- Nodes holding subgraphs (If, Loop, Scan) read outer-scope tensors implicitly; ORT 1.19.2's
  gradient-graph builder indexes those reads as explicit inputs and aborts the process (a C++
  assertion, SIGABRT) when such a node is an ancestor of the trained output and one of its
  implicit reads is computed by a node of the graph (graph inputs, initializers and Constant
  nodes are fine; measured with If and Loop). :func:`check_differentiable` refuses both that
  and a subgraph node whose implicit reads carry a gradient (none of them has a builder).
- :func:`explain_gradient_error` turns the RuntimeError ORT raises anyway (an op this list
  believes differentiable but ORT does not, an unreachable parameter) into the same kind of
  one-line TrainingError; call it from the ``except`` around ``generate_artifacts``.
Nothing here mutates the model.
"""
from __future__ import annotations

import re
from collections import defaultdict
from typing import Dict, List, Optional, Sequence, Set, Tuple

import onnx

from ..errors import TrainingError
from ._util import attr
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


def _subgraphs(node: onnx.NodeProto) -> List[onnx.GraphProto]:
    out: List[onnx.GraphProto] = []
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            out.append(a.g)
        elif a.type == onnx.AttributeProto.GRAPHS:
            out.extend(a.graphs)
    return out


def outer_reads(node: onnx.NodeProto) -> List[str]:
    """The tensors ``node``'s subgraphs (If branches, Loop/Scan bodies, nested ones included)
    read from the enclosing graph: its implicit inputs, in order of first read."""
    reads: List[str] = []

    def walk(graph: onnx.GraphProto, outer_defined: Set[str]) -> None:
        defined = set(outer_defined)
        defined.update(v.name for v in graph.input)
        defined.update(t.name for t in graph.initializer)
        defined.update(t.values.name for t in graph.sparse_initializer)
        defined.update(o for n in graph.node for o in n.output if o)
        for n in graph.node:
            for i in n.input:
                if i and i not in defined and i not in reads:
                    reads.append(i)
            for sub in _subgraphs(n):
                walk(sub, defined)

    for g in _subgraphs(node):
        walk(g, set())
    return reads


def _all_inputs(node: onnx.NodeProto) -> List[str]:
    """Explicit inputs, then implicit (outer-scope) reads of the node's subgraphs."""
    inputs = [i for i in node.input if i]
    return inputs + [i for i in outer_reads(node) if i not in inputs] if _subgraphs(node) else inputs


def undifferentiable_nodes(model: onnx.ModelProto, trainable: Sequence[str], output: str) -> List[onnx.NodeProto]:
    """Nodes between a ``trainable`` parameter and ``output`` (through float tensors) that ORT
    training 1.19.2 cannot differentiate, in graph order. A subgraph's outer-scope reads count
    as inputs of the node holding it."""
    return _undifferentiable(model, trainable, output)[0]


def _undifferentiable(model: onnx.ModelProto, trainable: Sequence[str], output: str) -> Tuple[List[onnx.NodeProto], Set[str]]:
    """The nodes of :func:`undifferentiable_nodes`, and the tensors the parameters reach."""
    graph = model.graph
    _, types = tensor_info(model)
    is_float = lambda name: types.get(name) in FLOAT_TYPES  # noqa: E731  (unknown type: not float)
    consumers: Dict[str, List[onnx.NodeProto]] = defaultdict(list)
    producers = {}
    nodes = list(graph.node)  # kept alive: protobuf wrappers (and their ids) are stable only while referenced
    inputs = {id(node): _all_inputs(node) for node in nodes}
    for node in nodes:
        for i in inputs[id(node)]:
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
        for i in inputs[id(node)]:
            if i in live and i not in need:
                need.add(i)
                todo.append(i)
    folded = _static_ifs(model, trainable)
    return [n for k, n in enumerate(nodes) if id(n) in forward and id(n) in backward and not _has_gradient(n)
            and k not in folded], live


_RANDOM_OPS = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli"}


def _static_ifs(model: onnx.ModelProto, trainable: Sequence[str] = ()) -> Set[int]:
    """Positions (in graph order) of the main graph's If nodes whose condition is known before
    any data: computed only from frozen initializers, Constant nodes and shapes that are static
    as a whole (``Shape(x, start=1)`` of an ``[N, 8]`` input; ``Size`` of a fully static one).
    ORT folds such an If to its branch before building the gradient graph, so it neither lacks
    a gradient nor aborts the build. Not followed: one static element of a partly dynamic shape
    (``Gather(Shape(x), 1)``, how exporters write a scripted ``x.shape[1]``): such an If is
    still refused."""
    nodes = list(model.graph.node)
    ifs = [k for k, n in enumerate(nodes) if n.op_type == "If" and n.domain in ("", "ai.onnx")]
    if not ifs:
        return set()
    shapes, _ = tensor_info(model)
    static = {t.name for t in model.graph.initializer} - set(trainable)  # trained ones are inputs to ORT
    for node in nodes:  # graph order is topological
        known = False
        if node.op_type == "Constant":
            known = True
        elif node.op_type == "Shape" and node.input:
            dims = shapes.get(node.input[0])
            if dims is not None:
                start, end = attr(node, "start", 0), attr(node, "end", None)
                part = dims[start:end] if end is not None else dims[start:]
                known = all(isinstance(d, int) and d >= 0 for d in part)
        elif node.op_type == "Size" and node.input:
            dims = shapes.get(node.input[0])
            known = dims is not None and all(isinstance(d, int) and d >= 0 for d in dims)
        elif node.op_type not in _RANDOM_OPS and not _subgraphs(node):
            known = all(i in static for i in node.input if i)
        if known:
            static.update(o for o in node.output if o)
    return {k for k in ifs if nodes[k].input and nodes[k].input[0] in static}


def _part(node: onnx.NodeProto) -> str:
    return "branches read" if node.op_type == "If" else "body reads" if node.op_type in ("Loop", "Scan") else "subgraphs read"


def outer_read_crashes(model: onnx.ModelProto, output: str,
                       trainable: Sequence[str] = ()) -> List[Tuple[onnx.NodeProto, str, onnx.NodeProto]]:
    """(node, tensor, producer) for each node holding subgraphs that ``output`` depends on and
    whose subgraphs read ``tensor`` from the main graph, computed there by ``producer`` (not a
    Constant node): ORT 1.19.2 aborts the process building the gradient graph of such a model,
    whatever is trained (see the module docstring). Graph order, one entry per node."""
    nodes = list(model.graph.node)
    producers = {o: n for n in nodes for o in n.output if o}
    seen: Set[int] = set()
    found = []
    todo = [output]
    need = {output}
    while todo:
        node = producers.get(todo.pop())
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        for i in _all_inputs(node):
            if i not in need:
                need.add(i)
                todo.append(i)
    folded = _static_ifs(model, trainable)
    for k, node in enumerate(nodes):
        if id(node) not in seen or not _subgraphs(node) or k in folded:
            continue
        for name in outer_reads(node):
            src = producers.get(name)
            if src is not None and not (src.op_type == "Constant" and src.domain in ("", "ai.onnx")):
                found.append((node, name, src))
                break
    return found


def check_float64(model: onnx.ModelProto, trainable: Sequence[str]) -> None:
    """Raise a one-line TrainingError if a trainable parameter is float64: ORT training 1.19.2
    has no double kernel for the gradient accumulator it puts on every trained parameter
    (InPlaceAccumulatorV2), nor for several gradients (ReluGrad), so such a model never loads
    for training. Float32 weights computing some activations in double pass (the common
    gradients, Add/Mul/Sigmoid/Tanh..., have double kernels; a missing one fails when the
    session loads, in one line too)."""
    wanted = set(trainable)
    double = [t.name for t in model.graph.initializer if t.name in wanted and t.data_type == onnx.TensorProto.DOUBLE]
    if double:
        names = ", ".join(repr(n) for n in double[:3]) + (f" and {len(double) - 3} more" if len(double) > 3 else "")
        raise TrainingError(
            f"ONNX Runtime training needs float32 weights and activations; this model's "
            f"{'weights' if len(double) > 1 else 'weight'} {names} {'are' if len(double) > 1 else 'is'} "
            "float64 (double), which ONNX Runtime 1.19.2 cannot train",
            hint="convert the model to float32 (initializers, inputs, Casts) before pruning or training",
        )


def check_differentiable(model: onnx.ModelProto, trainable: Sequence[str], output: str) -> None:
    """Raise a one-line TrainingError if ORT training cannot differentiate ``model`` to
    ``output``, or would abort trying (a subgraph node reading computed outer-scope values)."""
    check_float64(model, trainable)
    bad, live = _undifferentiable(model, trainable, output)
    if not bad:
        crashes = outer_read_crashes(model, output, trainable)
        if crashes:
            node, name, src = crashes[0]
            more = f" (and {len(crashes) - 1} more such node(s))" if len(crashes) > 1 else ""
            where = "branches" if node.op_type == "If" else "body" if node.op_type in ("Loop", "Scan") else "subgraphs"
            raise TrainingError(
                f"ONNX Runtime training cannot build a training graph through {node.op_type} (node {_label(node)!r}): "
                f"its {_part(node)} {name!r} (computed by node {_label(src)!r}) from the main graph, and ONNX "
                f"Runtime 1.19.2 aborts on that{more}",
                hint=f"re-export the model without the {node.op_type}, or with that value computed inside its {where}",
            )
        return
    first = bad[0]
    ops = sorted({n.op_type for n in bad})
    more = f" ({len(bad)} such nodes: {', '.join(ops)})" if len(bad) > 1 else ""
    implicit = [i for i in outer_reads(first) if i in live] if _subgraphs(first) else []
    if implicit and not any(i in live for i in first.input):  # reached only through its subgraphs
        raise TrainingError(
            f"ONNX Runtime training cannot differentiate through {first.op_type} (node {_label(first)!r}): "
            f"its {_part(first)} {implicit[0]!r}, which depends on the trained weights{more}",
            hint=f"ONNX Runtime 1.19.2 has no gradient for {first.op_type}; re-export the model without it, "
                 "e.g. with the branch you train inlined",
        )
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
