"""Turn weights computed by ``ConstantOfShape`` nodes into random initializers.

Contract: the ONNX model zoo's "light" models (``onnx/backend/test/data/light/``) replace every
float initializer by ``ConstantOfShape(shape)`` with one constant value, so they carry the
architecture without the weights. :func:`materialize_weights` returns a copy in which each
such node whose shape is a constant int64 initializer becomes an initializer of that shape
and the node's output name, holding seeded random values (uses are found through view-only
ops as in :mod:`.analysis`: a Caffe2 ``Reshape(W) -> Gemm`` is a Gemm weight):

- the weight operand of Conv, ConvTranspose, Gemm or MatMul: He-normal,
  N(0, 2 / fan_in), fan_in being the number of inputs one output sums over
  (Conv: C_in/group * prod(kernel); Gemm: the contracted dimension);
- a BatchNormalization scale or variance, or a Mul/Div operand: 1;
- anything else (biases, BN shift and mean, Add operands): 0.

The shape initializers become unused and are removed. IR < 4 requires every initializer to be
listed in ``graph.input``: the new ones are listed there as well, so the copy keeps the
original IR and opset (upgrading is :mod:`admm_onnx.graph.opset`'s job). With ``calibrate``
(the default) the BatchNormalization running statistics are then set to the per-channel mean
and variance of their inputs on one seeded N(0, 1) batch (:func:`calibrate_batchnorm`), so
deep residual nets keep unit-scale activations instead of logits in the thousands.
Everything else is unchanged; the copy is checked.

:func:`light_model` loads one of :data:`LIGHT_MODELS` and materialises it.
:func:`resize_input` changes the spatial size of a model's image input where the architecture
allows it (all shapes still infer and the outputs keep their shapes), to make tests cheaper.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import ModelError
from ._util import attr, checked
from .analysis import _constants, consumer_map, final_uses
from .shapes import light_copy

#: The ONNX model zoo's classic CNNs shipped as light models in the onnx wheel (IR 3, opset 9,
#: batch 1, 224 x 224 inputs, softmax outputs).
LIGHT_MODELS = (
    "bvlc_alexnet", "densenet121", "inception_v1", "inception_v2", "resnet50",
    "shufflenet", "squeezenet", "vgg19", "zfnet512",
)


def light_model_path(name: str) -> Path:
    """Path of ``light_<name>.onnx`` in the installed onnx package."""
    path = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light" / f"light_{name}.onnx"
    if not path.is_file():
        raise ModelError(f"no light model {name!r} in this onnx install ({path})", hint=f"one of: {', '.join(LIGHT_MODELS)}")
    return path


def light_model(name: str, seed: int = 0, size: Optional[Sequence[int]] = None) -> onnx.ModelProto:
    """A light zoo model with random weights (see :func:`materialize_weights`), optionally with
    a smaller spatial input ``size`` where the architecture allows it (:func:`resize_input`)."""
    model = onnx.load(str(light_model_path(name)))
    if size is not None:
        model = resize_input(model, size)
    return materialize_weights(model, seed)



def _fan_in(node: onnx.NodeProto, slot: int, shape: Tuple[int, ...]) -> Optional[int]:
    """Fan-in if ``shape`` is the weight operand of ``node`` at ``slot``, else None."""
    op = node.op_type
    if op == "Conv" and slot == 1 and len(shape) >= 3:
        return int(np.prod(shape[1:]))
    if op == "ConvTranspose" and slot == 1 and len(shape) >= 3:
        return int(shape[0] // max(1, attr(node, "group", 1)) * np.prod(shape[2:]))
    if op == "Gemm" and slot == 1 and len(shape) == 2:
        return int(shape[1] if attr(node, "transB", 0) else shape[0])
    if op == "Gemm" and slot == 0 and len(shape) == 2:
        return int(shape[0] if attr(node, "transA", 0) else shape[1])
    if op == "MatMul" and len(shape) >= 2:
        return int(shape[-2] if slot == 1 else shape[-1])
    return None


def _values(graph, name: str, shape: Tuple[int, ...], dtype, rng: np.random.Generator, maps) -> np.ndarray:
    uses = final_uses(graph, name, shape, *maps)
    for node, slot, seen, _ in uses:
        fan_in = _fan_in(node, slot, seen or shape)
        if fan_in:
            return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(dtype)
    for node, slot, _, _ in uses:
        if (node.op_type == "BatchNormalization" and slot in (1, 4)) or node.op_type in ("Mul", "Div"):
            return np.ones(shape, dtype)
    return np.zeros(shape, dtype)


def materialize_weights(model: onnx.ModelProto, seed: int = 0, calibrate: bool = True) -> onnx.ModelProto:
    """A copy of ``model`` with ``ConstantOfShape`` weights replaced by random initializers.

    Only nodes whose shape input is a constant initializer and whose value is a float tensor
    are replaced; returns the copy (``model`` is not modified).
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    inits = {t.name: t for t in graph.initializer}
    rng = np.random.default_rng(seed)
    maps = (consumer_map(graph), _constants(graph))
    replaced, new_inits = [], []
    for node in graph.node:
        if node.op_type != "ConstantOfShape" or node.domain not in ("", "ai.onnx"):
            continue
        if not node.input or node.input[0] not in inits:
            continue
        value = attr(node, "value")
        elem = value.data_type if value is not None else TensorProto.FLOAT
        if elem not in (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16):
            continue
        shape = tuple(int(d) for d in numpy_helper.to_array(inits[node.input[0]]).ravel())
        dtype = helper.tensor_dtype_to_np_dtype(elem)
        new_inits.append(numpy_helper.from_array(_values(graph, node.output[0], shape, dtype, rng, maps), node.output[0]))
        replaced.append(node)
    if not replaced:
        return out
    for node in replaced:
        graph.node.remove(node)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    dead = {n.input[0] for n in replaced if n.input[0] not in used}
    keep = [t for t in graph.initializer if t.name not in dead]
    del graph.initializer[:]
    graph.initializer.extend(keep + new_inits)
    listed = [i for i in graph.input if i.name not in dead]
    if out.ir_version < 4:
        listed += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in new_inits]
    del graph.input[:]
    graph.input.extend(listed)
    new_names = {t.name for t in new_inits}
    keep_vi = [v for v in graph.value_info if v.name not in new_names]
    del graph.value_info[:]
    graph.value_info.extend(keep_vi)
    checked(out, "materialize_weights")
    if calibrate:
        calibrate_batchnorm(out, seed)
    return out


def calibrate_batchnorm(model: onnx.ModelProto, seed: int = 0) -> int:
    """Set BN running mean/var (initializers) to their input statistics, in place; returns count.

    One ORT run of an opset-upgraded copy in which every BN uses batch statistics
    (``training_mode = 1``, momentum 0) and returns them: as each BN then normalises with
    exactly the statistics it reports, one pass calibrates the whole net. The input is a seeded
    N(0, 1) batch of the first graph input's shape (symbolic dims -> 2). Skipped (returns 0)
    when there is no BN with initializer statistics or the first input is not float.
    """
    import onnxruntime as ort

    from .opset import upgrade_opset

    inits = {t.name: i for i, t in enumerate(model.graph.initializer)}
    bns = [
        n for n in model.graph.node
        if n.op_type == "BatchNormalization" and n.domain in ("", "ai.onnx") and len(n.input) == 5
        and n.input[3] in inits and n.input[4] in inits
    ]
    real = [i for i in model.graph.input if i.name not in inits]
    if not bns or not real or real[0].type.tensor_type.elem_type != TensorProto.FLOAT:
        return 0
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    upgrade_opset(probe)
    del probe.graph.input[:]
    probe.graph.input.extend(real)
    stats = []
    for node in probe.graph.node:
        if node.op_type != "BatchNormalization" or node.input[3] not in inits:
            continue
        for a in list(node.attribute):
            if a.name in ("training_mode", "momentum", "spatial"):
                node.attribute.remove(a)
        node.attribute.extend([helper.make_attribute("training_mode", 1), helper.make_attribute("momentum", 0.0)])
        mean, var = f"{node.input[3]}/calibrated", f"{node.input[4]}/calibrated"
        del node.output[1:]
        node.output.extend([mean, var])
        probe.graph.output.extend([helper.make_empty_tensor_value_info(mean), helper.make_empty_tensor_value_info(var)])
        stats.append((node.input[3], node.input[4], mean, var))
    dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 2 for d in real[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(seed).standard_normal(dims).astype(np.float32)
    sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [n for s in stats for n in s[2:]]
    values = dict(zip(names, sess.run(names, {real[0].name: x})))
    for mean, var, m_out, v_out in stats:
        for name, out in ((mean, m_out), (var, v_out)):
            t = model.graph.initializer[inits[name]]
            dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
            t.CopyFrom(numpy_helper.from_array(np.asarray(values[out], dtype).reshape(tuple(t.dims)), name))
    checked(model, "calibrate_batchnorm")
    return len(stats)


def resize_input(model: onnx.ModelProto, size: Sequence[int], input_name: Optional[str] = None) -> onnx.ModelProto:
    """A copy of ``model`` whose image input takes spatial size ``size`` (e.g. ``(64, 64)``).

    Allowed only where the architecture allows it: strict shape inference must succeed at the
    new size and every graph output must keep its shape (a baked-in Reshape constant or a
    fixed-size pooling window that no longer fits makes this raise a ModelError).
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    inits = {t.name for t in graph.initializer}
    real = [i for i in graph.input if i.name not in inits]
    target = next((i for i in real if i.name == input_name), None) if input_name else (real[0] if real else None)
    if target is None:
        raise ModelError(f"no input {input_name!r} to resize")
    dims = target.type.tensor_type.shape.dim
    if len(dims) != 2 + len(size):
        raise ModelError(f"input {target.name!r} has {len(dims)} dims; cannot give it spatial size {tuple(size)}")
    for d, s in zip(dims[2:], size):
        d.Clear()
        d.dim_value = int(s)
    before = {o.name: [d.dim_value or d.dim_param for d in o.type.tensor_type.shape.dim] for o in graph.output}
    del graph.value_info[:]
    light = light_copy(out)  # initializers as constants (not overridable inputs), no weight data
    for o in light.graph.output:
        o.type.tensor_type.ClearField("shape")
    try:
        inferred = onnx.shape_inference.infer_shapes(light, check_type=True, strict_mode=True, data_prop=True)
    except Exception as exc:  # onnx raises InferenceError and friends
        raise ModelError(f"the architecture does not allow input size {tuple(size)}: {str(exc).splitlines()[0]}") from exc
    shapes = {}
    for v in list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input):
        t = v.type.tensor_type
        if t.HasField("shape"):
            shapes[v.name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    for name, dims in shapes.items():  # inference lets too-small maps through as dims <= 0
        if any(d is not None and d <= 0 for d in dims):
            raise ModelError(f"the architecture does not allow input size {tuple(size)}: {name!r} would be {dims}")
    for node in inferred.graph.node:  # and does not compare a Reshape's element counts
        if node.op_type == "Reshape" and node.input[0] in shapes and node.output[0] in shapes:
            a, b = shapes[node.input[0]], shapes[node.output[0]]
            if None not in a and None not in b and int(np.prod(a)) != int(np.prod(b)):
                raise ModelError(
                    f"the architecture does not allow input size {tuple(size)}: Reshape {node.name or node.output[0]!r} "
                    f"has a fixed target {b} for a {a} tensor"
                )
    for o in inferred.graph.output:
        after = [d.dim_value or d.dim_param for d in o.type.tensor_type.shape.dim]
        if after != before[o.name]:
            raise ModelError(f"input size {tuple(size)} changes output {o.name!r} from {before[o.name]} to {after}")
    return checked(out, "resize_input")
