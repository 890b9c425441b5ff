"""Read-only analysis of an ONNX graph: which initializers are prunable weights and which are
trainable parameters.

Contract:
- Uses are resolved through view-only ops: an initializer that reaches a node through
  Identity, Cast, Transpose, Reshape/Flatten/Squeeze/Unsqueeze with constant shapes (a Caffe2
  ``Reshape(W, [1000, 1024]) -> Gemm``, a ``Transpose(E) -> MatMul`` tied head) is *used* by
  that node, with its axes mapped back to the stored tensor's axes.
- A *prunable weight* is a float initializer used as the weight operand of Conv,
  ConvTranspose, Gemm (B, either transB) or MatMul (the constant operand, on either side).
  A weight consumed by several nodes (tied weights) is one entry listing every consumer.
  Each entry records its output axis (the filter axis) and input axis, in the stored tensor's
  layout, used by structured projections. A weight also read by ``Gather`` as a table (an
  embedding tied to an output head) is prunable; the Gather readers are listed in
  ``WeightInfo.shared_with`` (pruning the head prunes those embedding entries too).
- A *trainable parameter* is a float initializer with at least one use that is a
  differentiable parameter slot (weights, biases, normalisation scale/shift, embeddings,
  elementwise tensors with more than one element, tensors of more than one element read
  through Expand/Tile/Slice/Split/Pad/Concat such as ViT's cls token) and that affects the training output
  (``output``, default the first graph output): parameters that only feed other outputs get
  no gradient, and ORT refuses to build a graph for them. Never trainable: BatchNormalization
  running statistics, shape or index tensors, scalar constants (Clip bounds, exponents...).
- ``not_prunable`` says, for every other initializer, why it is not prunable (one line, for
  ``admm-onnx inspect`` and error messages).
- ``derived`` lists initializers of the user's graph that the training copy computes from
  another one (``graph/retie.py``): name -> (source, permutation). The pipeline writes
  ``source.transpose(permutation)`` for them (:meth:`GraphInfo.expand_weights`).
- Nothing here mutates the model.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Set, Tuple

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}

#: Ops whose weight operand is prunable -> input slots that may hold it.
PRUNABLE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")

#: Parameter slots of ops: an initializer consumed here is trainable (if float).
_PARAM_SLOTS: Dict[str, Tuple[int, ...]] = {
    "Conv": (1, 2),
    "ConvTranspose": (1, 2),
    "Gemm": (0, 1, 2),
    "MatMul": (0, 1),
    "BatchNormalization": (1, 2),
    "InstanceNormalization": (1, 2),
    "LayerNormalization": (1, 2),
    "GroupNormalization": (1, 2),
    "SkipLayerNormalization": (2, 3, 4),
    "PRelu": (1,),
    "Gather": (0,),
}
#: Elementwise ops whose constant operands are parameters when they have more than one element
#: (MatMul + Add biases, layer-scale multipliers, positional embeddings).
_ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Einsum"}
#: Ops that carry a constant operand into the computation unchanged in value (broadcast,
#: repeated, concatenated, cut): a float operand of more than one element in these slots is a
#: parameter (ViT's cls token read through ``Expand`` then ``Concat``, a position table cut with
#: ``Slice``, a learned token repeated with ``Tile``). ``None``: every input slot.
_CARRIERS: Dict[str, Optional[Tuple[int, ...]]] = {
    "Expand": (0,), "Tile": (0,), "Slice": (0,), "Split": (0,), "Pad": (0,), "Concat": None,
}

#: View-only ops followed from an initializer to its real use.
_VIEW_OPS = {"Identity", "Cast", "Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze"}

#: Metadata key prefix under which graph/retie.py records derived initializers.
DERIVED_KEY = "admm_onnx.derived:"

from ._util import attr


@dataclass(frozen=True)
class WeightInfo:
    """One prunable weight."""

    name: str
    shape: Tuple[int, ...]
    consumers: Tuple[Tuple[str, str], ...]  # (op_type, node name)
    out_axis: int
    in_axis: int
    #: Nodes that read the same tensor as a table (Gather), not as a weight: (op_type, node name).
    shared_with: Tuple[Tuple[str, str], ...] = ()

    @property
    def size(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1

    @property
    def op_types(self) -> Tuple[str, ...]:
        return tuple(sorted({op for op, _ in self.consumers}))


@dataclass
class GraphInfo:
    """What the analysis found."""

    prunable: Dict[str, WeightInfo] = field(default_factory=dict)
    trainable: List[str] = field(default_factory=list)
    #: initializer name -> why it is not prunable (for inspect and error messages)
    not_prunable: Dict[str, str] = field(default_factory=dict)
    inputs: List[onnx.ValueInfoProto] = field(default_factory=list)
    outputs: List[onnx.ValueInfoProto] = field(default_factory=list)
    #: The output whose loss trains the parameters.
    output: Optional[str] = None
    #: initializer of the user's graph -> (trainable source, permutation): its value is the
    #: source transposed (tied weights the exporter had folded apart; see graph/retie.py).
    derived: Dict[str, Tuple[str, Tuple[int, ...]]] = field(default_factory=dict)

    def expand_weights(self, weights: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """``weights`` plus every derived initializer computed from its source."""
        out = dict(weights)
        for name, (source, perm) in self.derived.items():
            if source in out:
                out[name] = np.ascontiguousarray(np.transpose(np.asarray(out[source]), perm))
        return out


@dataclass(frozen=True, eq=False)
class _Use:
    node: onnx.NodeProto
    slot: int
    shape: Optional[Tuple[int, ...]]  # the shape the node sees (None if unknown)
    axes: Optional[Tuple[Optional[int], ...]]  # node-view axis -> stored axis (None: mixed)



def _weight_axes(node: onnx.NodeProto, slot: int, ndim: int) -> Optional[Tuple[int, int]]:
    """(out_axis, in_axis) of the weight at input ``slot`` of ``node``, or None if not a weight."""
    op = node.op_type
    if op == "Conv" and slot == 1 and ndim >= 3:
        return 0, 1
    if op == "ConvTranspose" and slot == 1 and ndim >= 3:
        return 1, 0
    if op == "Gemm" and slot == 1 and ndim == 2:
        return (0, 1) if attr(node, "transB", 0) else (1, 0)
    if op == "MatMul" and ndim >= 2:
        if slot == 1:  # X @ W, W is (..., in, out)
            return ndim - 1, ndim - 2
        if slot == 0:  # W @ X, W is (..., out, in)
            return ndim - 2, ndim - 1
    return None


def graph_inputs(model: onnx.ModelProto) -> List[onnx.ValueInfoProto]:
    """Real inputs: graph inputs that are not initializers (IR < 4 lists both)."""
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def _constants(graph: onnx.GraphProto) -> Dict[str, np.ndarray]:
    """Small int64 constants (initializers and Constant nodes): shapes, axes, perms."""
    out = {}
    for t in graph.initializer:
        if t.data_type in (TensorProto.INT64, TensorProto.INT32) and int(np.prod(t.dims)) <= 16:
            out[t.name] = numpy_helper.to_array(t)
    for n in graph.node:
        if n.op_type == "Constant" and n.output:
            v = attr(n, "value")
            if isinstance(v, onnx.TensorProto) and v.data_type in (TensorProto.INT64, TensorProto.INT32):
                out[n.output[0]] = numpy_helper.to_array(v)
    return out


def _prefix_map(src: Tuple[int, ...], dst: Tuple[int, ...], axes) -> Tuple[Optional[int], ...]:
    """Axis map through a reshape: a dst axis keeps its stored axis if it is the same slice."""
    pre = np.concatenate([[1], np.cumprod(src)]).astype(np.int64)
    out = []
    p = 1
    for d in dst:
        match = None
        for i, s in enumerate(src):
            if s == d and pre[i] == p and s != 1:
                match = axes[i] if axes is not None else None
                break
        out.append(match)
        p *= d
    return tuple(out)


def _view(node: onnx.NodeProto, shape, axes, consts) -> Optional[Tuple[Tuple[int, ...], Tuple[Optional[int], ...]]]:
    """(shape, axis map) after a view-only ``node``, or None if it cannot be followed."""
    op = node.op_type
    if op in ("Identity", "Cast"):
        if op == "Cast" and attr(node, "to") not in FLOAT_TYPES:
            return None
        return shape, axes
    if op == "Transpose":
        perm = attr(node, "perm") or list(range(len(shape)))[::-1]
        return tuple(shape[p] for p in perm), tuple(axes[p] for p in perm)
    if op == "Flatten":
        axis = attr(node, "axis", 1) % (len(shape) + 1) if shape else 1
        new = (int(np.prod(shape[:axis])), int(np.prod(shape[axis:])))
    elif op == "Reshape":
        if len(node.input) < 2 or node.input[1] not in consts:
            return None
        target = [int(v) for v in consts[node.input[1]].ravel()]
        if not attr(node, "allowzero", 0):
            target = [shape[i] if v == 0 and i < len(shape) else v for i, v in enumerate(target)]
        if target.count(-1) == 1:
            known = int(np.prod([v for v in target if v != -1]))
            target[target.index(-1)] = int(np.prod(shape)) // max(known, 1)
        new = tuple(target)
    elif op in ("Squeeze", "Unsqueeze"):
        ax = attr(node, "axes")
        if ax is None and len(node.input) > 1:
            ax = consts.get(node.input[1])
            ax = None if ax is None else [int(v) for v in np.ravel(ax)]
        if op == "Squeeze":
            ax = [a % len(shape) for a in ax] if ax is not None else [i for i, d in enumerate(shape) if d == 1]
            new = tuple(d for i, d in enumerate(shape) if i not in ax)
        else:
            if ax is None:
                return None
            rank = len(shape) + len(ax)
            ax = sorted(a % rank for a in ax)
            it = iter(shape)
            new = tuple(1 if i in ax else next(it) for i in range(rank))
    else:
        return None
    if int(np.prod(new)) != int(np.prod(shape)) or any(d < 0 for d in new):
        return None
    return new, _prefix_map(tuple(shape), new, axes)


def _uses(name: str, shape, consumers, consts) -> List[_Use]:
    """Final uses of initializer ``name``, looking through view-only ops."""
    out: List[_Use] = []
    todo = [(name, tuple(shape), tuple(range(len(shape))))]
    seen: Set[str] = set()
    while todo:
        cur, shp, axes = todo.pop()
        if cur in seen:
            continue
        seen.add(cur)
        for node, slot in consumers.get(cur, []):
            nxt = _view(node, shp, axes, consts) if node.op_type in _VIEW_OPS and slot == 0 else None
            if nxt is None:
                out.append(_Use(node, slot, shp, axes))
            else:
                todo.extend((o, nxt[0], nxt[1]) for o in node.output if o)
    return out


def consumer_map(graph: onnx.GraphProto) -> Dict[str, List[Tuple[onnx.NodeProto, int]]]:
    """Tensor name -> [(node, input slot)] of the main graph."""
    consumers: Dict[str, List[Tuple[onnx.NodeProto, int]]] = defaultdict(list)
    for node in graph.node:
        for slot, name in enumerate(node.input):
            consumers[name].append((node, slot))
    return consumers


def final_uses(graph: onnx.GraphProto, name: str, shape: Sequence[int], consumers=None, consts=None):
    """[(node, slot, shape seen by node, stored axis per node axis)] for tensor ``name`` of
    ``shape``, looking through view-only ops (see the module docstring)."""
    consumers = consumers if consumers is not None else consumer_map(graph)
    consts = consts if consts is not None else _constants(graph)
    return [(u.node, u.slot, u.shape, u.axes) for u in _uses(name, shape, consumers, consts)]


def _reaching(graph: onnx.GraphProto, output: str) -> Set[str]:
    """Every tensor name the value of ``output`` depends on (itself included)."""
    producers = {o: n for n in graph.node for o in n.output if o}
    need, todo = {output}, [output]
    while todo:
        node = producers.get(todo.pop())
        if node is None:
            continue
        deps = list(node.input)
        for a in node.attribute:  # tensors read by subgraphs (If/Loop bodies) count too
            for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                deps += [i for n in g.node for i in n.input]
        for i in deps:
            if i and i not in need:
                need.add(i)
                todo.append(i)
    return need


def _derived(model: onnx.ModelProto) -> Dict[str, Tuple[str, Tuple[int, ...]]]:
    out = {}
    for p in model.metadata_props:
        if p.key.startswith(DERIVED_KEY):
            source, _, perm = p.value.partition(";")
            out[p.key[len(DERIVED_KEY):]] = (source, tuple(int(v) for v in perm.split(",") if v))
    return out


def _label(node: onnx.NodeProto) -> Tuple[str, str]:
    return node.op_type, node.name or node.output[0]


def subgraph_reads(node: onnx.NodeProto) -> set:
    """The values ``node``'s subgraphs (recursively) read from the enclosing graph: its
    implicit inputs (differentiable.outer_reads, as a set)."""
    from .differentiable import outer_reads

    return set(outer_reads(node))


def _subgraph_reads(graph: onnx.GraphProto) -> set:
    """Names the subgraphs of ``graph``'s nodes read (outer-scope values included)."""
    return set().union(*(subgraph_reads(n) for n in graph.node))


def analyse(model: onnx.ModelProto, output: "Optional[str] | Sequence[str]" = None) -> GraphInfo:
    """Find prunable weights and trainable parameters of ``model``'s main graph.

    ``output``: the output trained on, or several (default: the first graph output); a
    parameter is trainable if it reaches any of them.
    """
    if not isinstance(model, onnx.ModelProto):
        from ..errors import ConfigError

        raise ConfigError(f"analyse takes an onnx.ModelProto (onnx.load it first), got {type(model).__name__}")
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    trained = [output] if isinstance(output, str) else [o for o in (output or ()) if o]
    if not trained and graph.output:
        trained = [graph.output[0].name]
    output = trained[0] if trained else None
    info = GraphInfo(inputs=graph_inputs(model), outputs=list(graph.output), output=output, derived=_derived(model))
    consumers = consumer_map(graph)
    consts = _constants(graph)
    graph_outputs = {o.name for o in graph.output}
    reaching = set().union(*(_reaching(graph, o) for o in trained)) if trained else set()
    sub_reads = None

    for name, tensor in inits.items():
        is_float = tensor.data_type in FLOAT_TYPES
        shape = tuple(int(d) for d in tensor.dims)
        size = int(np.prod(shape)) if shape else 1
        if not consumers.get(name):
            if sub_reads is None:
                sub_reads = _subgraph_reads(graph)
            info.not_prunable[name] = "read only inside a subgraph (If/Loop/Scan body)" if name in sub_reads else "unused"
            continue
        uses = _uses(name, shape, consumers, consts)
        trainable = False
        if is_float and name not in graph_outputs and name in reaching:
            for u in uses:
                if u.slot in _PARAM_SLOTS.get(u.node.op_type, ()):
                    trainable = trainable or size > 1 or u.node.op_type == "PRelu"
                elif u.node.op_type in _ELEMENTWISE and size > 1:
                    trainable = True
                elif u.node.op_type in _CARRIERS and size > 1:
                    slots = _CARRIERS[u.node.op_type]
                    trainable = trainable or slots is None or u.slot in slots
        if trainable:
            info.trainable.append(name)

        weight_uses, other = [], []
        for u in uses:
            axes = _weight_axes(u.node, u.slot, len(u.shape)) if u.shape is not None else None
            if axes is not None:
                stored = (u.axes[axes[0]], u.axes[axes[1]])
                weight_uses.append((stored, u))
            else:
                other.append(u)
        tables = [u for u in other if u.node.op_type == "Gather" and u.slot == 0]
        ops = sorted({u.node.op_type for u in uses})
        if not is_float:
            info.not_prunable[name] = f"{helper.tensor_dtype_to_np_dtype(tensor.data_type)} tensor"
        elif not weight_uses:
            if tables and len(tables) == len(other):
                info.not_prunable[name] = "an embedding table (Gather), not a Conv/Gemm/MatMul weight"
            elif set(ops) <= set(PRUNABLE_OPS):
                info.not_prunable[name] = f"a bias or data operand of {', '.join(ops)}, not its weight"
            else:
                info.not_prunable[name] = f"not a Conv/Gemm/MatMul weight (used by {', '.join(ops)})"
        elif len(tables) != len(other):
            table_ids = {id(u) for u in tables}
            rest = sorted({u.node.op_type for u in other if id(u) not in table_ids})
            info.not_prunable[name] = f"also used outside a weight slot (by {', '.join(rest)})"
        elif any(None in a for a, _ in weight_uses):
            info.not_prunable[name] = "reshaped before its Conv/Gemm/MatMul in a way that mixes its filter axes"
        elif len({a for a, _ in weight_uses}) != 1:
            info.not_prunable[name] = "consumers disagree on its layout"
        elif not trainable:
            info.not_prunable[name] = (
                f"does not affect the training output {output!r}" if name not in reaching else "not trainable"
            )
        else:
            (out_axis, in_axis), _ = weight_uses[0]
            info.prunable[name] = WeightInfo(
                name=name,
                shape=shape,
                consumers=tuple(_label(u.node) for _, u in weight_uses),
                out_axis=int(out_axis),
                in_axis=int(in_axis),
                shared_with=tuple(_label(u.node) for u in tables),
            )
    return info


def value_shape(value: onnx.ValueInfoProto) -> List[object]:
    """Shape of a value info: ints for fixed dims, the symbol (or None) for dynamic ones."""
    dims = []
    for d in value.type.tensor_type.shape.dim:
        if d.HasField("dim_value") and d.dim_value > 0:
            dims.append(int(d.dim_value))
        else:
            dims.append(d.dim_param or None)
    return dims
