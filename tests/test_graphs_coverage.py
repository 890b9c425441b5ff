"""Graph coverage for real exports: activation rewrites (hard_activations, smooth_activations),
parameters read through Expand/Concat (ViT cls token), the default output rule and ZipMap."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from admm_onnx.graph.analysis import analyse
from admm_onnx.graph.differentiable import undifferentiable_nodes
from admm_onnx.graph.hard_activations import hard_activations
from admm_onnx.graph.outputs import default_output, output_view
from admm_onnx.graph.prepare import prepare_for_training
from admm_onnx.graph.smooth_activations import smooth_activations
from admm_onnx.graph.zipmap import zipmap_to_identity
from admm_onnx.losses import ClassifierLoss
from admm_onnx._ort import api
from admm_onnx.data import LABELS
from admm_onnx.training import build_artifacts

ACTIVATIONS = [
    ("HardSwish", {}, 14),
    ("HardSigmoid", {}, 17),
    ("HardSigmoid", {"alpha": 0.3, "beta": 0.4}, 17),
    ("Elu", {"alpha": 0.5}, 17),
    ("Selu", {}, 17),
    ("Celu", {"alpha": 2.0}, 17),
    ("Softplus", {}, 17),
    ("Softsign", {}, 17),
    ("Mish", {}, 18),
]


class Step:
    """The ORT training API on built artifacts, directly (not through Trainer): parameters by
    name, one optimizer step on a feed dict (model inputs + class labels)."""

    def __init__(self, directory, lr=1e-2):
        self.state = api.CheckpointState.load_checkpoint(str(directory / "checkpoint"))
        self.module = api.Module(str(directory / "training_model.onnx"), self.state, str(directory / "eval_model.onnx"))
        self.optimizer = api.Optimizer(str(directory / "optimizer_model.onnx"), self.module)
        self.optimizer.set_learning_rate(lr)

    def get(self, name):
        return np.array(self.state.parameters[name].data)

    def __call__(self, feed, labels):
        self.module.train()
        feed = {**feed, LABELS: np.asarray(labels, np.int64)}
        loss, out = self.module(*[feed[n] for n in self.module.input_names()])
        self.optimizer.step()
        self.module.lazy_reset_grad()
        return float(loss), out


def run(model, feed, names=None):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(names, feed)


def copy(model):
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def one_op(op, attrs, opset, shape=(4, 50)):
    node = helper.make_node(op, ["x"], ["y"], name="act", **attrs)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("op,attrs,opset", ACTIVATIONS)
def test_activation_rewrite_matches_ort_kernel(op, attrs, opset):
    model = one_op(op, attrs, opset)
    rewritten = copy(model)
    assert hard_activations(rewritten) + smooth_activations(rewritten) == 1
    assert op not in {n.op_type for n in rewritten.graph.node}
    # Large magnitudes included: no overflow in the rewritten forms (exp only sees x <= 0).
    x = np.concatenate([np.linspace(-120, 120, 100), np.linspace(-6, 6, 100)]).astype(np.float32).reshape(4, 50)
    (want,) = run(model, {"x": x})
    (got,) = run(rewritten, {"x": x})
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5)


def mlp_with(activations, opset=18):
    """x (N, 6) -> [MatMul -> act] for each activation -> Gemm (3 classes)."""
    rng = np.random.default_rng(0)
    nodes, inits, cur = [], [], "x"
    for i, (op, attrs) in enumerate(activations):
        inits.append(numpy_helper.from_array(rng.standard_normal((6, 6)).astype(np.float32) * 0.5, f"w{i}"))
        nodes += [
            helper.make_node("MatMul", [cur, f"w{i}"], [f"m{i}"], name=f"fc{i}"),
            helper.make_node(op, [f"m{i}"], [f"a{i}"], name=f"act{i}", **attrs),
        ]
        cur = f"a{i}"
    inits.append(numpy_helper.from_array(rng.standard_normal((3, 6)).astype(np.float32), "head.w"))
    nodes.append(helper.make_node("Gemm", [cur, "head.w"], ["logits"], name="head", transB=1))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def test_rewritten_activations_train(tmp_path):
    """Every rewritten activation in one model: artifacts build, a step runs, every weight moves."""
    model = mlp_with([(op, attrs) for op, attrs, _ in ACTIVATIONS])
    info = analyse(model)
    assert {n.op_type for n in undifferentiable_nodes(model, info.trainable, "logits")} == {op for op, _, _ in ACTIVATIONS}
    prepare_for_training(model)
    info = analyse(model)
    assert undifferentiable_nodes(model, info.trainable, "logits") == []
    build_artifacts(model, tmp_path / "art", info.trainable, ClassifierLoss(), "logits")
    step = Step(tmp_path / "art")
    before = {n: step.get(n) for n in info.trainable}
    rng = np.random.default_rng(1)
    loss, _ = step({"x": rng.standard_normal((8, 6)).astype(np.float32)}, rng.integers(0, 3, 8))
    assert np.isfinite(loss)
    for name in info.trainable:
        assert not np.array_equal(step.get(name), before[name]), name


# -- parameters read through Expand / Concat / Tile / Slice -----------------------------------
def vit_like():
    """Patches (N, 4, 8) -> MatMul -> Concat(Expand(cls), .) -> + pos -> mean -> Gemm.

    Also a Tile'd register token and a position table cut with Slice, as exporters write them."""
    rng = np.random.default_rng(0)
    f = lambda *s: rng.standard_normal(s).astype(np.float32) * 0.2  # noqa: E731
    inits = [
        numpy_helper.from_array(f(8, 8), "embed.w"),
        numpy_helper.from_array(f(1, 1, 8), "cls_token"),
        numpy_helper.from_array(f(1, 1, 8), "reg_token"),
        numpy_helper.from_array(f(1, 9, 8), "pos_table"),
        numpy_helper.from_array(f(3, 8), "head.w"),
        numpy_helper.from_array(np.array([1, 1, 8], np.int64), "cls_shape"),
        numpy_helper.from_array(np.array([1, 1, 1], np.int64), "reps"),
        numpy_helper.from_array(np.array([0], np.int64), "start"),
        numpy_helper.from_array(np.array([6], np.int64), "stop"),
        numpy_helper.from_array(np.array([1], np.int64), "axis1"),
        numpy_helper.from_array(np.array([1], np.int64), "one"),
        numpy_helper.from_array(np.array([0], np.int64), "zero"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "embed.w"], ["tokens"], name="embed"),
        helper.make_node("Shape", ["x"], ["xshape"], name="shape"),
        helper.make_node("Slice", ["xshape", "zero", "one"], ["batch"], name="batch"),
        helper.make_node("Concat", ["batch", "one", "one"], ["bshape"], name="bshape", axis=0),
        helper.make_node("Expand", ["cls_token", "bshape"], ["cls"], name="cls_expand"),
        helper.make_node("Tile", ["reg_token", "reps"], ["reg1"], name="reg_tile"),
        helper.make_node("Expand", ["reg1", "bshape"], ["reg"], name="reg_expand"),
        helper.make_node("Concat", ["cls", "reg", "tokens"], ["seq"], name="cat", axis=1),
        helper.make_node("Slice", ["pos_table", "start", "stop", "axis1"], ["pos"], name="pos_slice"),
        helper.make_node("Add", ["seq", "pos"], ["h"], name="add_pos"),
        helper.make_node("ReduceMean", ["h"], ["pooled"], name="pool", axes=[1], keepdims=0),
        helper.make_node("Gemm", ["pooled", "head.w"], ["logits"], name="head", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "vit", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def test_tensors_read_through_expand_tile_slice_are_trained(tmp_path):
    model = vit_like()
    info = analyse(model)
    assert {"cls_token", "reg_token", "pos_table", "embed.w", "head.w"} <= set(info.trainable)
    assert not set(info.trainable) & {"cls_shape", "reps", "start", "stop", "axis1", "one", "zero"}
    prepare_for_training(model)
    build_artifacts(model, tmp_path / "art", info.trainable, ClassifierLoss(), "logits")
    step = Step(tmp_path / "art")
    before = {n: step.get(n) for n in ("cls_token", "reg_token", "pos_table")}
    rng = np.random.default_rng(0)
    step({"x": rng.standard_normal((4, 4, 8)).astype(np.float32)}, rng.integers(0, 3, 4))
    for name, value in before.items():
        assert not np.array_equal(step.get(name), value), name
    # the 3 rows of the position table the Slice drops get no gradient
    np.testing.assert_array_equal(step.get("pos_table")[:, 6:], before["pos_table"][:, 6:])


# -- default output and ZipMap ----------------------------------------------------------------
def sklearn_like(classes=(0, 1, 2), features=5, string_labels=False):
    """What skl2onnx writes for an MLPClassifier: int64 ``label`` first, ZipMap probabilities."""
    rng = np.random.default_rng(0)
    c = len(classes)
    inits = [
        numpy_helper.from_array(rng.standard_normal((features, 7)).astype(np.float32), "coefficient"),
        numpy_helper.from_array(rng.standard_normal(7).astype(np.float32), "intercepts"),
        numpy_helper.from_array(rng.standard_normal((7, c)).astype(np.float32), "coefficient1"),
        numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), "intercepts1"),
        numpy_helper.from_array(np.array(classes, np.int64), "classes"),
        numpy_helper.from_array(np.array([-1], np.int64), "shape_tensor"),
    ]
    labels_attr = {"classlabels_strings": [str(k) for k in classes]} if string_labels else {"classlabels_int64s": list(classes)}
    nodes = [
        helper.make_node("MatMul", ["float_input", "coefficient"], ["mul_result"]),
        helper.make_node("Add", ["mul_result", "intercepts"], ["add_result"]),
        helper.make_node("Relu", ["add_result"], ["next_activations"]),
        helper.make_node("MatMul", ["next_activations", "coefficient1"], ["mul_result1"]),
        helper.make_node("Add", ["mul_result1", "intercepts1"], ["add_result1"]),
        helper.make_node("Softmax", ["add_result1"], ["out_activations_result"], axis=1),
        helper.make_node("ArgMax", ["out_activations_result"], ["argmax_output"], axis=1),
        helper.make_node("ArrayFeatureExtractor", ["classes", "argmax_output"], ["array_feature_extractor_result"],
                         domain="ai.onnx.ml"),
        helper.make_node("Reshape", ["array_feature_extractor_result", "shape_tensor"], ["label"]),
        helper.make_node("ZipMap", ["out_activations_result"], ["output_probability"], domain="ai.onnx.ml",
                         **labels_attr),
    ]
    zip_type = helper.make_sequence_type_proto(
        helper.make_map_type_proto(TensorProto.STRING if string_labels else TensorProto.INT64,
                                   helper.make_tensor_type_proto(TensorProto.FLOAT, []))
    )
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("float_input", TensorProto.FLOAT, [None, features])],
        [helper.make_tensor_value_info("label", TensorProto.INT64, [None]),
         helper.make_value_info("output_probability", zip_type)], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("ai.onnx.ml", 1)])
    model.ir_version = 7
    onnx.checker.check_model(model)
    return model


def test_default_output_skips_labels_maps_and_weightless_outputs():
    model = sklearn_like()
    with pytest.raises(Exception, match="no float tensor output"):
        default_output(model)  # before the ZipMap rewrite: int64 label and a map, nothing else
    training = copy(model)
    prepare_for_training(training)
    assert default_output(training) == "output_probability"
    # An output computed from the input alone comes after one computed from weights.
    g = training.graph
    g.node.append(helper.make_node("Neg", ["float_input"], ["negated"]))
    g.output.insert(0, helper.make_tensor_value_info("negated", TensorProto.FLOAT, [None, 5]))
    assert default_output(training) == "output_probability"


@pytest.mark.parametrize("string_labels", [False, True])
def test_zipmap_is_trained_as_its_tensor_and_read_back_in_label_order(string_labels, tmp_path):
    model = sklearn_like(classes=(3, 7, 11), string_labels=string_labels)
    training = copy(model)
    assert zipmap_to_identity(training) == 1
    x = np.random.default_rng(0).standard_normal((4, 5)).astype(np.float32)
    label, maps = run(model, {"float_input": x})
    (probs,) = run(training, {"float_input": x}, ["output_probability"])
    view = output_view(model, "output_probability")
    np.testing.assert_array_equal(view.as_tensor(maps), probs)
    assert view.softmax  # read back through ZipMap to its Softmax
    np.testing.assert_allclose(np.exp(view.to_logits(maps)), probs, rtol=1e-6)
    # The whole preparation: trained on the logits behind the Softmax; artifacts build; a step runs.
    prepared = copy(model)
    prepare_for_training(prepared)
    out = default_output(prepared)
    info = analyse(prepared, out)
    assert set(info.prunable) == {"coefficient", "coefficient1"}
    build_artifacts(prepared, tmp_path / "art", info.trainable, ClassifierLoss(), out)
    loss, logits = Step(tmp_path / "art")({"float_input": x}, [0, 1, 2, 1])
    assert np.isfinite(loss) and logits.shape == (4, 3)
