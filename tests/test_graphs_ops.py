"""Graph rewrites for ops ORT training cannot differentiate, opset/IR handling, and the
differentiability check (admm_onnx/graph: lrn, sum_to_add, opset, differentiable)."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from admm_onnx.errors import ModelError, TrainingError
from admm_onnx.graph.analysis import analyse
from admm_onnx.graph.differentiable import check_differentiable, explain_gradient_error, undifferentiable_nodes
from admm_onnx.graph.lrn import lrn_to_pool
from admm_onnx.graph.opset import MAX_IR_VERSION, MAX_OPSET, TARGET_OPSET, check_versions, upgrade_opset
from admm_onnx.graph.prepare import prepare_for_training
from admm_onnx.graph.sum_to_add import sum_to_add
from admm_onnx.losses import ClassifierLoss
from admm_onnx.training import build_artifacts


def run(model: onnx.ModelProto, feed) -> list:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feed)


def copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def lrn_model(shape, size, alpha=1e-4, beta=0.75, bias=1.0, opset=17) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))
    node = helper.make_node("LRN", ["x"], ["y"], name="lrn", size=size, alpha=alpha, beta=beta, bias=bias)
    model = helper.make_model(helper.make_graph([node], "g", [x], [y]), opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def lrn_numpy(x, size, alpha, beta, bias):
    """The ONNX spec's formula, literally."""
    c = x.shape[1]
    sq = np.zeros_like(x, dtype=np.float64)
    for ch in range(c):
        lo, hi = max(0, ch - (size - 1) // 2), min(c - 1, ch + int(np.ceil((size - 1) / 2)))
        sq[:, ch] = (x[:, lo : hi + 1].astype(np.float64) ** 2).sum(axis=1)
    return x / (bias + alpha / size * sq) ** beta


def classifier(body, inits, in_shape=("N", 3, 6, 6), feat=None, classes=3, opset=17, extra_out=()):
    """x -> body -> Flatten -> Gemm(classes): a trainable wrapper around ``body`` nodes (x -> h)."""
    rng = np.random.default_rng(0)
    feat = feat or int(np.prod(in_shape[1:]))
    inits = list(inits) + [numpy_helper.from_array(rng.standard_normal((classes, feat)).astype(np.float32) * 0.1, "fc.w")]
    nodes = list(body) + [
        helper.make_node("Flatten", ["h"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc.w"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(in_shape))],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])] + list(extra_out), inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def conv_init(name, shape, seed=1):
    return numpy_helper.from_array(np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * 0.3, name)


# -- LRN -----------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [1, 3, 5, 7])
@pytest.mark.parametrize("shape", [(2, 7, 5, 6), (1, 96, 13, 13)])
def test_lrn_rewrite_matches_ort_lrn(size, shape):
    model = lrn_model(shape, size, alpha=0.3, beta=0.75, bias=2.0)
    rewritten = copy(model)
    assert lrn_to_pool(rewritten) == 1
    assert "LRN" not in {n.op_type for n in rewritten.graph.node}
    x = (np.random.default_rng(size).standard_normal(shape) * 3).astype(np.float32)
    (want,) = run(model, {"x": x})
    (got,) = run(rewritten, {"x": x})
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("size,shape", [(2, (2, 6, 4, 4)), (4, (2, 9, 3, 3)), (3, (2, 5, 7)), (5, (1, 6, 2, 3, 4))])
def test_lrn_rewrite_matches_spec_even_sizes_and_other_ranks(size, shape):
    """ORT's kernel only takes odd sizes and 4-D input; the spec (and the rewrite) take any."""
    model = lrn_model(shape, size, alpha=0.2, beta=0.6, bias=1.5)
    assert lrn_to_pool(model) == 1
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    (got,) = run(model, {"x": x})
    np.testing.assert_allclose(got, lrn_numpy(x, size, 0.2, 0.6, 1.5), atol=1e-5, rtol=0)


def test_lrn_model_trains_after_rewrite(tmp_path):
    body = [
        helper.make_node("Conv", ["x", "conv.w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("LRN", ["c"], ["h"], name="norm1", size=3, alpha=1e-3, beta=0.75, bias=1.0),
    ]
    model = classifier(body, [conv_init("conv.w", (4, 3, 3, 3))], feat=4 * 36)
    info = analyse(model)
    with pytest.raises(TrainingError, match="no gradient for op LRN \\(node 'norm1'\\)"):
        check_differentiable(model, info.trainable, "logits")
    prepare_for_training(model)
    check_differentiable(model, info.trainable, "logits")
    build_artifacts(model, tmp_path / "art", info.trainable, ClassifierLoss(), "logits")


# -- Sum -----------------------------------------------------------------------------------
def test_variadic_sum_rewrite_is_forward_identical():
    body = [
        helper.make_node("Conv", ["x", "a.w"], ["a"], name="a"),
        helper.make_node("Conv", ["x", "b.w"], ["b"], name="b"),
        helper.make_node("Sum", ["a", "b", "x"], ["h"], name="sum3"),
    ]
    model = classifier(body, [conv_init("a.w", (3, 3, 1, 1), 1), conv_init("b.w", (3, 3, 1, 1), 2)])
    x = np.random.default_rng(0).standard_normal((2, 3, 6, 6)).astype(np.float32)
    (want,) = run(model, {"x": x})
    rewritten = copy(model)
    assert sum_to_add(rewritten) == 1
    (got,) = run(rewritten, {"x": x})
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)  # ORT fuses Conv + Add: float order
    assert undifferentiable_nodes(rewritten, analyse(rewritten).trainable, "logits") == []


# -- the differentiability check -------------------------------------------------------------
def prelu_model(slope_shape=(3, 1, 1)):
    slope = numpy_helper.from_array(np.linspace(-0.5, 0.5, int(np.prod(slope_shape)), dtype=np.float32).reshape(slope_shape), "prelu.slope")
    body = [
        helper.make_node("Conv", ["x", "conv.w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("PRelu", ["c", "prelu.slope"], ["h"], name="act1"),
    ]
    return classifier(body, [conv_init("conv.w", (3, 3, 3, 3)), slope])


@pytest.mark.parametrize("slope_shape", [(3, 1, 1), (1,)])
def test_prelu_rewrite_is_exact_and_trains(slope_shape, tmp_path):
    model = prelu_model(slope_shape)
    info = analyse(model)
    rewritten = copy(model)
    prepare_for_training(rewritten)
    assert "PRelu" not in {n.op_type for n in rewritten.graph.node}
    x = np.random.default_rng(0).standard_normal((2, 3, 6, 6)).astype(np.float32)
    np.testing.assert_array_equal(run(rewritten, {"x": x})[0], run(model, {"x": x})[0])
    trainable = analyse(rewritten).trainable
    assert ("prelu.slope" in trainable) is (slope_shape != (1,))  # a shared scalar slope stays frozen
    assert set(trainable) - {"prelu.slope"} == set(info.trainable) - {"prelu.slope"}
    check_differentiable(rewritten, trainable, "logits")
    build_artifacts(rewritten, tmp_path / "art", trainable, ClassifierLoss(), "logits")


def test_op_without_gradient_is_named_before_the_build(tmp_path):
    body = [
        helper.make_node("Conv", ["x", "conv.w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("ThresholdedRelu", ["c"], ["h"], name="act1", alpha=0.1),
    ]
    model = classifier(body, [conv_init("conv.w", (3, 3, 3, 3))])
    prepare_for_training(model)  # no rewrite for ThresholdedRelu
    info = analyse(model)
    assert [n.name for n in undifferentiable_nodes(model, info.trainable, "logits")] == ["act1"]
    with pytest.raises(TrainingError) as err:
        check_differentiable(model, info.trainable, "logits")
    assert "op ThresholdedRelu (node 'act1')" in err.value.one_line() and "\n" not in err.value.one_line()
    # build_artifacts checks first, so the user sees the same line instead of ORT's stack.
    with pytest.raises(TrainingError) as built:
        build_artifacts(model, tmp_path / "art", info.trainable, ClassifierLoss(), "logits")
    assert "op ThresholdedRelu (node 'act1')" in built.value.one_line()
    # What ORT itself says, made one line by explain_gradient_error.
    from admm_onnx._ort import artifacts

    (tmp_path / "raw").mkdir()
    try:
        artifacts.generate_artifacts(model, requires_grad=info.trainable, loss=ClassifierLoss(),
                                     artifact_directory=str(tmp_path / "raw"), loss_input_names=["logits"])
    except RuntimeError as exc:
        explained = explain_gradient_error(exc, model)
    else:  # pragma: no cover - ORT grew a ThresholdedRelu gradient
        pytest.skip("ORT can differentiate ThresholdedRelu now")
    assert explained is not None and explained.one_line().startswith("ONNX Runtime training has no gradient for op ThresholdedRelu (node 'act1')")


def test_ops_off_the_differentiable_path_are_not_reported():
    """Shape/ArgMax on activations, and undifferentiable ops before the first parameter."""
    body = [
        helper.make_node("Floor", ["x"], ["xf"], name="floor_input"),  # no gradient, but no parameter before it
        helper.make_node("Conv", ["xf", "conv.w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Shape", ["c"], ["shape"], name="shape"),
        helper.make_node("Reshape", ["c", "shape"], ["h"], name="reshape"),
    ]
    model = classifier(body, [conv_init("conv.w", (3, 3, 3, 3))])
    assert undifferentiable_nodes(model, analyse(model).trainable, "logits") == []


def test_unreachable_parameter_error_is_explained():
    exc = RuntimeError("... INVALID_ARGUMENT : Cannot compute the partial derivative for 'head.w' as it's unreachable from the output node(s).")
    err = explain_gradient_error(exc)
    assert isinstance(err, TrainingError) and "'head.w' does not affect" in err.one_line()
    assert explain_gradient_error(RuntimeError("something else")) is None


# -- opset and IR --------------------------------------------------------------------------
def test_ir_above_10_is_refused_in_one_line():
    model = classifier([helper.make_node("Relu", ["x"], ["h"])], [])
    model.ir_version = MAX_IR_VERSION + 1
    with pytest.raises(ModelError) as err:
        check_versions(model)
    line = err.value.one_line()
    assert f"IR version {MAX_IR_VERSION + 1}" in line and f"IR <= {MAX_IR_VERSION}" in line and "\n" not in line


def test_opset_above_21_is_refused_with_the_fix():
    model = classifier([helper.make_node("Relu", ["x"], ["h"])], [])
    model.opset_import[0].version = MAX_OPSET + 1
    with pytest.raises(ModelError) as err:
        prepare_for_training(model)
    line = err.value.one_line()
    assert f"opset {MAX_OPSET + 1}" in line and f"opset <= {MAX_OPSET}" in line and "convert_version" in line


def test_old_opset_is_upgraded_forward_identically():
    """An IR-3 / opset-9 model (initializers listed as inputs, Dropout ratio attribute,
    Softmax with opset-9 axis semantics) becomes opset 17 with the same outputs."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    fc = numpy_helper.from_array(rng.standard_normal((5, 4)).astype(np.float32), "fc")
    fcb = numpy_helper.from_array(rng.standard_normal(5).astype(np.float32), "fcb")
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["g"]),
        helper.make_node("Unsqueeze", ["g"], ["u"], axes=[0]),
        helper.make_node("Squeeze", ["u"], ["s"], axes=[0]),
        helper.make_node("Flatten", ["s"], ["f"]),
        helper.make_node("Dropout", ["f"], ["d", "mask"], ratio=0.5),
        helper.make_node("Gemm", ["d", "fc", "fcb"], ["z"], transB=1),
        helper.make_node("Softmax", ["z"], ["prob"]),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 5, 5])]
    inputs += [helper.make_tensor_value_info(t.name, TensorProto.FLOAT, list(t.dims)) for t in (w, fc, fcb)]
    graph = helper.make_graph(nodes, "old", inputs, [helper.make_tensor_value_info("prob", TensorProto.FLOAT, [1, 5])], [w, fc, fcb])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])
    model.ir_version = 3
    onnx.checker.check_model(model)
    upgraded = copy(model)
    assert upgrade_opset(upgraded) == 1
    assert upgraded.opset_import[0].version == TARGET_OPSET and upgraded.ir_version >= 8
    assert {t.name for t in upgraded.graph.initializer} >= {"w", "fc", "fcb"}
    x = rng.standard_normal((1, 3, 5, 5)).astype(np.float32)
    np.testing.assert_allclose(run(upgraded, {"x": x})[0], run(model, {"x": x})[0], atol=1e-6)
    assert upgrade_opset(upgraded) == 0  # idempotent
