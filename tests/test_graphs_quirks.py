"""Model quirks the graph side handles, one test each, on tiny models built in code and the
committed fixtures: Dropout, a final Softmax, several outputs, integer inputs, dynamic and
fixed batch, tied weights (shared and folded-apart), Keras/TF-style exports, attention
MatMul weights on either side, Gather embeddings, grouped/depthwise convs, view-op weights.

End-to-end tests run ``pipeline.prune`` (one ADMM iteration, one retraining epoch, sparsity
0.5) on a few random batches and check the written model with :func:`check_written`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from admm_onnx import pipeline
from admm_onnx.config import PruneConfig
from admm_onnx.data import LABELS, Dataset
from admm_onnx.graph.analysis import analyse, graph_inputs
from admm_onnx.graph.dropout import enable_dropout
from admm_onnx.graph.outputs import output_view, train_on_logits
from admm_onnx.graph.prepare import prepare_for_training
from admm_onnx.graph.retie import retie_embeddings
from admm_onnx.losses import ClassifierLoss
from admm_onnx.training import Trainer, build_artifacts

FIXTURES = Path(__file__).parent / "fixtures"
RNG = np.random.default_rng(0)


# -- helpers ---------------------------------------------------------------------------------
def init(name, shape, scale=0.3, seed=None):
    rng = np.random.default_rng(seed if seed is not None else abs(hash(name)) % 2**32)
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def const(name, values, dtype=np.int64):
    return numpy_helper.from_array(np.asarray(values, dtype=dtype), name)


def make(nodes, inputs, outputs, inits, opset=17) -> onnx.ModelProto:
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, inits), opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def fvi(name, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def copy(model):
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def session(model):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def concrete(shape, batch=2):
    return [d if isinstance(d, int) else batch for d in shape]


def eval_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """The training copy as ORT's eval model sees it (Dropout's training_mode emptied)."""
    out = copy(model)
    prepare_for_training(out)
    for node in out.graph.node:
        if node.op_type == "Dropout" and len(node.input) > 2:
            node.input[2] = ""
    return out


def check_written(original: onnx.ModelProto, written: onnx.ModelProto, prepared, sparsity, feed):
    """The written model: loads in ORT, same inputs/outputs, sparse where planned, and its
    output is what the training copy computes (through the output view) for its weights."""
    assert [(i.name, i.type) for i in graph_inputs(written)] == [(i.name, i.type) for i in graph_inputs(original)]
    assert [(o.name, o.type) for o in written.graph.output] == [(o.name, o.type) for o in original.graph.output]
    sess = session(written)
    assert [i.name for i in sess.get_inputs()] == [i.name for i in graph_inputs(original)]
    weights = {t.name: numpy_helper.to_array(t) for t in written.graph.initializer}
    assert prepared.info.prunable
    for name in prepared.info.prunable:
        assert np.mean(weights[name] == 0) >= sparsity - 1e-9, name
    name = prepared.output_name
    (out,) = sess.run([name], feed)
    (logits,) = session(eval_copy(written)).run([name], feed)
    assert logits.ndim == 2
    view = output_view(written, name)
    scale = max(1.0, float(np.abs(out).max()))
    np.testing.assert_allclose(view.from_logits(logits, like=out), out, rtol=1e-4, atol=1e-5 * scale)
    np.testing.assert_array_equal(np.argmax(view.to_logits(out), -1), np.argmax(logits, -1))


def prune_e2e(model, tmp_path, x, classes, sparsity=0.5, batch=2, output=None):
    """pipeline.prune with a few random batches; returns (prepared, written model, report)."""
    y = np.random.default_rng(1).integers(0, classes, len(x))
    data = Dataset(x, y, x[: max(2, len(x) // 2)], y[: max(2, len(x) // 2)])
    config = PruneConfig(admm_iters=1, epochs_per_iter=1, retrain_epochs=1, output=output).with_sparsity(sparsity)
    prepared = pipeline.prepare_model(model, output)
    train, evaluate, used = pipeline.make_readers(prepared, data, batch)
    out = tmp_path / "pruned.onnx"
    report = pipeline.prune(prepared, out, train, config, evaluate)
    written = onnx.load(str(out))
    feed = {prepared.input_name: x[:used]}
    check_written(prepared.original, written, prepared, sparsity, feed)
    return prepared, written, report


def images(n, shape):
    return np.random.default_rng(2).standard_normal((n, *shape)).astype(np.float32)


# -- Dropout ---------------------------------------------------------------------------------
def dropout_model(ratio=0.5):
    nodes = [
        helper.make_node("Gemm", ["x", "fc1.w", "fc1.b"], ["h"], name="fc1", transB=1),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Dropout", ["r", "ratio"], ["d"], name="drop"),
        helper.make_node("Gemm", ["d", "fc2.w"], ["logits"], name="fc2", transB=1),
    ]
    inits = [init("fc1.w", (32, 8)), init("fc1.b", (32,)), init("fc2.w", (3, 32)), const("ratio", ratio, np.float32)]
    return make(nodes, [fvi("x", ["N", 8])], [fvi("logits", ["N", 3])], inits)


def test_dropout_is_active_in_training_and_off_in_eval(tmp_path):
    model = dropout_model()
    assert enable_dropout(model) == 1
    drop = next(n for n in model.graph.node if n.op_type == "Dropout")
    assert drop.input[1] == "ratio" and drop.input[2]
    info = analyse(model)
    assert "ratio" not in info.trainable
    build_artifacts(model, tmp_path, info.trainable, ClassifierLoss(), "logits")
    eval_model = onnx.load(str(tmp_path / "eval_model.onnx"))
    assert all(len(n.input) < 3 or not n.input[2] for n in eval_model.graph.node if n.op_type == "Dropout")
    trainer = Trainer(tmp_path)
    feed = {"x": images(16, (8,)), LABELS: np.zeros(16, np.int64)}
    args = [feed[n] if n in feed else feed[LABELS] for n in trainer.input_names]
    trainer.module.train()
    losses = {float(trainer.module(*args)[0]) for _ in range(3)}
    assert len(losses) > 1  # masks sampled per step
    trainer.module.eval()
    evals = {float(trainer.module(*args)[0]) for _ in range(3)}
    assert len(evals) == 1


def test_dropout_model_prunes(tmp_path):
    prune_e2e(dropout_model(), tmp_path, images(8, (8,)), classes=3)


# -- final Softmax -----------------------------------------------------------------------------
def softmax_head(opset, shape, axis=None, after=(), after_inits=(), out_shape=None):
    """x (N, 6) -> Gemm -> [Reshape to shape] -> Softmax(axis) -> [after nodes] -> prob."""
    nodes = [helper.make_node("Gemm", ["x", "w"], ["z"], name="fc", transB=1)]
    cur = "z"
    inits = [init("w", (4, 6))] + list(after_inits)
    if len(shape) > 2:
        inits.append(const("shape", [0, *shape[1:]]))
        nodes.append(helper.make_node("Reshape", [cur, "shape"], ["z4"], name="to4d"))
        cur = "z4"
    attrs = {} if axis is None else {"axis": axis}
    nodes.append(helper.make_node("Softmax", [cur], ["p" if after else "prob"], name="softmax", **attrs))
    nodes += list(after)
    out_shape = out_shape or ["N", *shape[1:]]
    return make(nodes, [fvi("x", ["N", 6])], [fvi("prob", out_shape)], inits, opset=opset)


@pytest.mark.parametrize(
    "opset,shape,axis,expected",
    [
        (17, ["N", 4], None, True),  # axis -1
        (17, ["N", 4], 1, True),
        (11, ["N", 4, 1, 1], None, True),  # opset < 13: axis 1 flattens the rest (Caffe2 zoo heads)
        (17, ["N", 4, 1, 1], 1, True),
        (17, ["N", 2, 2, 1], 1, False),  # not over all classes
        (17, ["N", 2, 2], -1, False),  # per-position softmax (sequence output)
    ],
)
def test_softmax_output_detection(opset, shape, axis, expected):
    model = softmax_head(opset, shape, axis)
    view = output_view(model, "prob")
    assert view.softmax is expected
    if expected:
        assert view.logits in ("z", "z4")


def test_softmax_behind_a_reshape_is_found_and_logsoftmax_is_left_alone():
    reshape_after = [helper.make_node("Reshape", ["p", "back"], ["prob"], name="back")]
    model = softmax_head(17, ["N", 4], after=reshape_after, after_inits=[const("back", [0, 4, 1, 1])], out_shape=["N", 4, 1, 1])
    assert output_view(model, "prob").softmax
    log = make(
        [helper.make_node("Gemm", ["x", "w"], ["z"], transB=1), helper.make_node("LogSoftmax", ["z"], ["prob"])],
        [fvi("x", ["N", 6])], [fvi("prob", ["N", 4])], [init("w", (4, 6))],
    )
    assert not output_view(log, "prob").softmax
    assert train_on_logits(log) == 0


def test_training_copy_outputs_logits_written_model_keeps_softmax(tmp_path):
    model = softmax_head(11, ["N", 4, 1, 1])
    training = copy(model)
    prepare_for_training(training)
    out = training.graph.output[0]
    assert out.name == "prob" and len(out.type.tensor_type.shape.dim) == 2
    x = images(3, (6,))
    (probs,) = session(model).run(None, {"x": x})
    (logits,) = session(training).run(None, {"x": x})
    view = output_view(model, "prob")
    np.testing.assert_allclose(view.from_logits(logits, like=probs), probs, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.exp(view.to_logits(probs)).sum(-1), 1, rtol=1e-5)
    _, written, _ = prune_e2e(model, tmp_path, images(8, (6,)), classes=4)
    assert [n.op_type for n in written.graph.node][-1] == "Softmax"


# -- several outputs, integer inputs, Gather embeddings, tied weights ------------------------------
def test_parameters_that_only_feed_another_output_are_not_trained():
    model = onnx.load(str(FIXTURES / "torch_mlp_tied.onnx"))
    info = analyse(model)  # trains on the first output, "logits"
    assert "onnx::MatMul_17" not in info.trainable and "onnx::MatMul_17" not in info.prunable
    assert "does not affect the training output 'logits'" in info.not_prunable["onnx::MatMul_17"]
    lm = analyse(model, "lm_logits")
    assert "onnx::MatMul_17" in lm.prunable and "cls.weight" not in lm.trainable


def test_shared_linear_is_one_weight_with_two_consumers():
    info = analyse(onnx.load(str(FIXTURES / "torch_mlp_tied.onnx")))
    shared = info.prunable["shared.weight"]
    assert [c[1] for c in shared.consumers] == ["/shared/Gemm", "/shared_1/Gemm"]
    assert (shared.out_axis, shared.in_axis) == (0, 1)
    assert info.trainable.count("shared.weight") == 1


def test_folded_tied_head_is_retied_in_the_training_copy():
    model = onnx.load(str(FIXTURES / "torch_mlp_tied.onnx"))
    training = copy(model)
    assert retie_embeddings(training) == 1
    assert "onnx::MatMul_17" not in {t.name for t in training.graph.initializer}
    info = analyse(training, "lm_logits")
    assert info.derived == {"onnx::MatMul_17": ("emb.weight", (1, 0))}
    emb = info.prunable["emb.weight"]  # the head weight, read through Transpose
    assert emb.op_types == ("MatMul",) and emb.shared_with[0][0] == "Gather"
    assert (emb.out_axis, emb.in_axis) == (0, 1)  # vocab rows are the head's outputs
    ids = np.random.default_rng(0).integers(0, 50, (3, 8))
    for name in ("logits", "lm_logits"):
        np.testing.assert_allclose(
            session(training).run([name], {"input_ids": ids})[0], session(model).run([name], {"input_ids": ids})[0], atol=1e-6
        )
    weights = {"emb.weight": np.arange(800, dtype=np.float32).reshape(50, 16)}
    assert np.array_equal(info.expand_weights(weights)["onnx::MatMul_17"], weights["emb.weight"].T)


def test_unfolded_tie_one_initializer_gather_and_transposed_matmul():
    """do_constant_folding=False: emb.weight read by Gather and by Transpose -> MatMul."""
    nodes = [
        helper.make_node("Gather", ["emb", "ids"], ["e"], name="embed"),
        helper.make_node("Transpose", ["emb"], ["embT"], name="tie", perm=[1, 0]),
        helper.make_node("MatMul", ["e", "embT"], ["lm"], name="head"),
        helper.make_node("ReduceMean", ["lm"], ["logits"], name="pool", axes=[1], keepdims=0),
    ]
    model = make(nodes, [fvi("ids", ["N", 5], TensorProto.INT64)], [fvi("logits", ["N", 20])], [init("emb", (20, 8))])
    info = analyse(model)
    assert info.prunable["emb"].shared_with == (("Gather", "embed"),)
    assert (info.prunable["emb"].out_axis, info.prunable["emb"].in_axis) == (0, 1)


def test_standalone_embedding_is_trained_not_pruned():
    nodes = [
        helper.make_node("Gather", ["emb", "ids"], ["e"], name="embed"),
        helper.make_node("ReduceMean", ["e"], ["m"], name="pool", axes=[1], keepdims=0),
        helper.make_node("Gemm", ["m", "fc"], ["logits"], name="fc", transB=1),
    ]
    model = make(nodes, [fvi("ids", ["N", 5], TensorProto.INT64)], [fvi("logits", ["N", 3])], [init("emb", (20, 8)), init("fc", (3, 8))])
    info = analyse(model)
    assert "emb" in info.trainable and "emb" not in info.prunable
    assert info.not_prunable["emb"].startswith("an embedding table")


def test_token_id_model_with_two_outputs_prunes(tmp_path):
    model = onnx.load(str(FIXTURES / "torch_mlp_tied.onnx"))
    ids = np.random.default_rng(3).integers(0, 50, (8, 8)).astype(np.int64)
    prepared, written, _ = prune_e2e(model, tmp_path, ids, classes=10, batch=4)
    assert prepared.output_name == "logits" and "emb.weight" in prepared.info.trainable


# -- batch dimensions --------------------------------------------------------------------------------
def test_dynamic_batch_fixture_prunes(tmp_path):
    model = onnx.load(str(FIXTURES / "torch_legacy_eval.onnx"))
    prepared, _, _ = prune_e2e(model, tmp_path, images(8, (1, 16, 16)), classes=10, batch=4)
    assert prepared.fixed_batch is None
    assert prepared.info.prunable["dw_conv.weight"].shape == (8, 1, 3, 3)  # depthwise, group 8


def test_fixed_batch_with_batch_baked_into_a_reshape(tmp_path):
    nodes = [
        helper.make_node("Conv", ["x", "conv.w", "conv.b"], ["c"], name="conv", pads=[1, 1, 1, 1], group=1),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Reshape", ["r", "flat"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["logits"], name="fc", transB=1),
    ]
    inits = [init("conv.w", (4, 2, 3, 3)), init("conv.b", (4,)), const("flat", [3, 64]), init("fc.w", (5, 64), 0.1), init("fc.b", (5,))]
    model = make(nodes, [fvi("x", [3, 2, 4, 4])], [fvi("logits", [3, 5])], inits)
    prepared, _, _ = prune_e2e(model, tmp_path, images(9, (2, 4, 4)), classes=5, batch=8)
    assert prepared.fixed_batch == 3


# -- Keras/TF-style exports, attention -------------------------------------------------------------
def keras_cnn():
    """tf2onnx-style: NHWC input transposed to NCHW and back, depthwise conv, Keras Flatten as
    Reshape(-1, n), Dense as MatMul + Add, a Dense as Gemm with transB=0, Softmax head."""
    nodes = [
        helper.make_node("Transpose", ["input_1"], ["nchw"], name="conv2d/transpose", perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["nchw", "conv2d/kernel", "conv2d/bias"], ["c1"], name="conv2d", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="conv2d/Relu"),
        helper.make_node("Conv", ["r1", "dw/depthwise_kernel"], ["c2"], name="dw", pads=[1, 1, 1, 1], group=6),
        helper.make_node("Relu", ["c2"], ["r2"], name="dw/Relu"),
        helper.make_node("Transpose", ["r2"], ["nhwc"], name="dw/transpose", perm=[0, 2, 3, 1]),
        helper.make_node("Reshape", ["nhwc", "flatten/shape"], ["flat"], name="flatten/Reshape"),
        helper.make_node("MatMul", ["flat", "dense/kernel"], ["mm"], name="dense/MatMul"),
        helper.make_node("Add", ["mm", "dense/bias"], ["d1"], name="dense/BiasAdd"),
        helper.make_node("Relu", ["d1"], ["r3"], name="dense/Relu"),
        helper.make_node("Gemm", ["r3", "dense_1/kernel", "dense_1/bias"], ["z"], name="dense_1/Gemm"),
        helper.make_node("Softmax", ["z"], ["dense_1"], name="dense_1/Softmax", axis=-1),
    ]
    inits = [
        init("conv2d/kernel", (6, 3, 3, 3)), init("conv2d/bias", (6,)), init("dw/depthwise_kernel", (6, 1, 3, 3)),
        const("flatten/shape", [-1, 96]), init("dense/kernel", (96, 16), 0.1), init("dense/bias", (16,)),
        init("dense_1/kernel", (16, 4)), init("dense_1/bias", (4,)),
    ]
    return make(nodes, [fvi("input_1", ["unk__0", 4, 4, 3])], [fvi("dense_1", ["unk__0", 4])], inits, opset=13)


def test_keras_style_analysis():
    info = analyse(keras_cnn())
    p = info.prunable
    assert set(p) == {"conv2d/kernel", "dw/depthwise_kernel", "dense/kernel", "dense_1/kernel"}
    assert (p["dense/kernel"].out_axis, p["dense/kernel"].in_axis) == (1, 0)  # MatMul X @ W
    assert (p["dense_1/kernel"].out_axis, p["dense_1/kernel"].in_axis) == (1, 0)  # Gemm transB=0
    assert (p["dw/depthwise_kernel"].out_axis, p["dw/depthwise_kernel"].in_axis) == (0, 1)
    assert {"dense/bias", "conv2d/bias", "dense_1/bias"} <= set(info.trainable)
    assert "flatten/shape" not in info.trainable


def test_keras_style_model_prunes(tmp_path):
    prune_e2e(keras_cnn(), tmp_path, images(8, (4, 4, 3)), classes=4)


def attention():
    """Single-head self-attention: X @ Wq/Wk/Wv (weight on the right), Q @ K^T (no weight),
    a Softmax inside, and a classifier written as Wc @ X^T (weight on the left)."""
    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["q"], name="q_proj"),
        helper.make_node("MatMul", ["x", "wk"], ["k"], name="k_proj"),
        helper.make_node("MatMul", ["x", "wv"], ["v"], name="v_proj"),
        helper.make_node("Transpose", ["k"], ["kt"], name="kT", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["s"], name="scores"),
        helper.make_node("Mul", ["s", "scale"], ["ss"], name="scale"),
        helper.make_node("Softmax", ["ss"], ["a"], name="attn", axis=-1),
        helper.make_node("MatMul", ["a", "v"], ["o"], name="context"),
        helper.make_node("ReduceMean", ["o"], ["pooled"], name="pool", axes=[1], keepdims=0),
        helper.make_node("Transpose", ["pooled"], ["pt"], name="pT", perm=[1, 0]),
        helper.make_node("MatMul", ["wc", "pt"], ["ct"], name="cls"),
        helper.make_node("Transpose", ["ct"], ["logits"], name="cT", perm=[1, 0]),
    ]
    inits = [init("wq", (8, 8)), init("wk", (8, 8)), init("wv", (8, 8)), init("wc", (3, 8)),
             const("scale", 8 ** -0.5, np.float32)]
    return make(nodes, [fvi("x", ["N", 4, 8])], [fvi("logits", ["N", 3])], inits)


def test_attention_weights_on_either_side():
    info = analyse(attention())
    p = info.prunable
    assert set(p) == {"wq", "wk", "wv", "wc"}
    assert (p["wq"].out_axis, p["wq"].in_axis) == (1, 0)
    assert (p["wc"].out_axis, p["wc"].in_axis) == (0, 1)
    assert "scale" not in info.trainable


def test_attention_model_prunes(tmp_path):
    prune_e2e(attention(), tmp_path, images(8, (4, 8)), classes=3)


# -- weights read through view ops -------------------------------------------------------------------
def test_weight_reshaped_before_gemm_is_prunable_with_mapped_axes():
    """Caffe2 zoo: the classifier weight (1, 1, C, K) goes through Reshape -> (C, K) -> Gemm."""
    nodes = [
        helper.make_node("Reshape", ["w4", "shape"], ["w"], name="w_reshape"),
        helper.make_node("Gemm", ["x", "w"], ["logits"], name="fc", transB=1),
    ]
    model = make(nodes, [fvi("x", [1, 6])], [fvi("logits", [1, 3])], [init("w4", (1, 1, 3, 6)), const("shape", [3, 6])])
    info = analyse(model)
    assert "w4" in info.trainable
    assert (info.prunable["w4"].out_axis, info.prunable["w4"].in_axis) == (2, 3)


def test_not_prunable_reasons():
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv"),
        helper.make_node("Mul", ["c", "gamma"], ["g"], name="layer_scale"),
        helper.make_node("Clip", ["g", "lo", "hi"], ["h"], name="clip"),
        helper.make_node("Flatten", ["h"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "fc"], ["logits"], name="fc", transB=1),
    ]
    inits = [init("w", (2, 3, 1, 1)), init("b", (2,)), init("gamma", (1, 2, 1, 1)), const("lo", 0, np.float32),
             const("hi", 6, np.float32), init("fc", (3, 8)), init("unused", (4,))]
    info = analyse(make(nodes, [fvi("x", ["N", 3, 2, 2])], [fvi("logits", ["N", 3])], inits))
    assert set(info.prunable) == {"w", "fc"}
    assert set(info.trainable) == {"w", "b", "gamma", "fc"}
    assert info.not_prunable["b"] == "a bias or data operand of Conv, not its weight"
    assert "Mul" in info.not_prunable["gamma"] and "Clip" in info.not_prunable["lo"]
    assert info.not_prunable["unused"] == "unused"


# -- Transpose without perm (the ONNX default: reverse the axes) ------------------------------------
def perm_less_transposes():
    """A weight on the left of its MatMul, read through perm-less Transposes (3-D and 2-D)."""
    nodes = [
        helper.make_node("Transpose", ["x"], ["xt"], name="t_in"),           # (8, 5, N)
        helper.make_node("Transpose", ["xt"], ["xb"], name="t_back"),        # (N, 5, 8)
        helper.make_node("ReduceMean", ["xb"], ["xm"], axes=[1], keepdims=0),  # (N, 8)
        helper.make_node("Transpose", ["xm"], ["xc"], name="t_cols"),        # (8, N)
        helper.make_node("MatMul", ["w1", "xc"], ["hc"], name="fc1"),        # (16, N)
        helper.make_node("Relu", ["hc"], ["rc"]),
        helper.make_node("Transpose", ["rc"], ["r"], name="t_rows"),         # (N, 16)
        helper.make_node("MatMul", ["r", "w2"], ["logits"], name="fc2"),
    ]
    return make(nodes, [fvi("x", ["N", 5, 8])], [fvi("logits", ["N", 3])], [init("w1", (16, 8)), init("w2", (16, 3))],
                opset=13)


def test_transpose_without_perm_gets_it_explicitly_in_the_training_copy():
    """Sweep 6 #7: ORT training's generate_artifacts failed with 'IndexError: unordered_map::at'
    on any Transpose without perm; the training copy writes the reversing perm out."""
    from admm_onnx.graph.transpose_perm import explicit_transpose_perm

    model = perm_less_transposes()
    rewritten = copy(model)
    assert explicit_transpose_perm(rewritten) == 4
    perms = {n.name: list(helper.get_attribute_value(a)) for n in rewritten.graph.node for a in n.attribute
             if n.op_type == "Transpose"}
    assert perms == {"t_in": [2, 1, 0], "t_back": [2, 1, 0], "t_cols": [1, 0], "t_rows": [1, 0]}
    feed = {"x": images(4, (5, 8))}
    np.testing.assert_array_equal(session(model).run(None, feed)[0], session(rewritten).run(None, feed)[0])
    assert explicit_transpose_perm(rewritten) == 0


def test_transpose_without_perm_of_unknown_rank_is_left_to_onnx_runtime(monkeypatch, tmp_path):
    """Left alone by the rewrite and not refused up front (a sweep found ORT training builds such
    a graph when a Reshape to a run-time shape hides the rank); where ORT's optimiser does fail on
    a missing attribute ('unordered_map::at', an IndexError), build_artifacts says so in one line."""
    from admm_onnx import training
    from admm_onnx.errors import TrainingError
    from admm_onnx.graph.differentiable import check_differentiable
    from admm_onnx.graph.transpose_perm import explicit_transpose_perm
    from admm_onnx.losses import make_loss

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, None)  # no shape: rank unknown
    graph = helper.make_graph([helper.make_node("Transpose", ["x"], ["xt"], name="t"),
                               helper.make_node("MatMul", ["xt", "w"], ["y"])], "g", [x], [fvi("y", None)], [init("w", (8, 3))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    assert explicit_transpose_perm(model) == 0
    check_differentiable(model, ["w"], "y")  # not refused

    def fails(*a, **k):
        raise IndexError("unordered_map::at")

    monkeypatch.setattr(training.artifacts, "generate_artifacts", fails)
    with pytest.raises(TrainingError, match=r"unordered_map::at\): a node lacks an attribute"):
        training.build_artifacts(model, tmp_path, ["w"], make_loss("mse", True, float_labels=True)[1], "y")


def test_model_with_perm_less_transposes_prunes_and_is_written_as_given(tmp_path):
    model = perm_less_transposes()
    prepared, written, _ = prune_e2e(model, tmp_path, images(8, (5, 8)), classes=3)
    for node in written.graph.node:
        if node.op_type == "Transpose":
            assert not node.attribute, "the user's graph is written as it was"
