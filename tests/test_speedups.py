"""Exact speed rewrites of the training graph (graph/pool_first.py, graph/pool_phases.py):
same outputs, same gradients, applied only where their contract holds."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from admm_onnx.graph.pool_first import pool_before_activation
from admm_onnx.graph.pool_phases import split_pool_phases
from admm_onnx.losses import ClassifierLoss
from admm_onnx.models import build
from admm_onnx.pipeline import prepare_model
from admm_onnx.training import Trainer, build_artifacts


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def ops(model: onnx.ModelProto):
    return [n.op_type for n in model.graph.node]


def net(hw=(9, 11), conv_pads=(0, 0, 0, 0), pool=2, act="Relu", act_attrs=None, pool_attrs=None, extra_reader=False):
    """x -> Conv(3x3, 2->4) -> act -> MaxPool -> Flatten -> Gemm(3); shapes static."""
    rng = np.random.default_rng(0)
    h, w = hw
    oh, ow = h + conv_pads[0] + conv_pads[2] - 2, w + conv_pads[1] + conv_pads[3] - 2
    ph, pw = oh // pool, ow // pool
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 2, 3, 3)).astype(np.float32), "conv.w"),
        numpy_helper.from_array(rng.standard_normal(4).astype(np.float32) * 0.1, "conv.b"),
        numpy_helper.from_array(rng.standard_normal((3, 4 * ph * pw)).astype(np.float32) * 0.1, "fc.w"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "conv.w", "conv.b"], ["c"], name="conv", kernel_shape=[3, 3], pads=list(conv_pads)),
        helper.make_node(act, ["c"], ["a"], name="act", **(act_attrs or {})),
        helper.make_node("MaxPool", ["a"], ["p"], name="pool", kernel_shape=[pool, pool], strides=[pool, pool], **(pool_attrs or {})),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc.w"], ["logits"], name="fc", transB=1),
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])]
    if extra_reader:  # the activation output is also a graph output
        outputs.append(helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 4, None, None]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, h, w])], outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def images(hw=(9, 11), n=5, seed=1):
    return np.random.default_rng(seed).standard_normal((n, 2, *hw)).astype(np.float32)


# -- MaxPool(Relu(x)) -> Relu(MaxPool(x)) ------------------------------------------------------
@pytest.mark.parametrize("act,attrs", [("Relu", {}), ("LeakyRelu", {"alpha": 0.1})])
def test_pool_first_is_bit_exact(act, attrs):
    model = net(act=act, act_attrs=attrs)
    fast = copy(model)
    assert pool_before_activation(fast) == 1
    assert ops(fast) == ["Conv", "MaxPool", act, "Flatten", "Gemm"]
    x = images()
    np.testing.assert_array_equal(run(fast, x), run(model, x))


@pytest.mark.parametrize("case", ["negative slope", "activation read twice", "pool with indices", "pads as large as the kernel"])
def test_pool_first_leaves_other_graphs_alone(case):
    if case == "negative slope":  # not monotone: max does not commute
        model = net(act="LeakyRelu", act_attrs={"alpha": -0.5})
    elif case == "activation read twice":
        model = net(extra_reader=True)
    elif case == "pool with indices":
        model = net()
        model.graph.node[2].output.append("idx")
    else:
        model = net(pool_attrs={"pads": [2, 0, 0, 0]})
    before = model.SerializeToString()
    assert pool_before_activation(model) == 0
    assert model.SerializeToString() == before


# -- first-layer Conv -> MaxPool as phase convs ------------------------------------------------------
@pytest.mark.parametrize("hw,pads,pool", [((9, 11), (0, 0, 0, 0), 2), ((8, 8), (1, 1, 1, 1), 2), ((10, 7), (2, 0, 1, 1), 2), ((12, 13), (0, 0, 0, 0), 3)])
def test_pool_phases_match_conv_then_pool(hw, pads, pool):
    """Odd sizes (the pool drops a row/column), padding, and a 3x3 pool."""
    model = net(hw=hw, conv_pads=pads, pool=pool)
    pool_before_activation(model)  # Conv -> MaxPool -> Relu, as prepare_model leaves it
    fast = copy(model)
    assert split_pool_phases(fast, ["conv.w", "conv.b", "fc.w"]) == 1
    kinds = ops(fast)
    assert "MaxPool" not in kinds and kinds.count("Conv") == pool * pool and "Max" in kinds
    assert ("Pad" in kinds) == any(pads)
    x = images(hw)
    np.testing.assert_allclose(run(fast, x), run(model, x), rtol=1e-5, atol=1e-5)


def test_pool_phases_only_where_the_conv_input_carries_no_gradient():
    model = net()
    pool_before_activation(model)
    before = model.SerializeToString()
    # Pretend the input depended on a trainable tensor: the rewrite must not touch it.
    assert split_pool_phases(model, ["x"]) == 0
    assert model.SerializeToString() == before


def test_pool_phases_skip_overlapping_pools():
    model = net(pool_attrs={})
    model.graph.node[2].attribute[1].ints[:] = [1, 1]  # strides 1 with a 2x2 kernel: overlapping windows
    pool_before_activation(model)
    assert split_pool_phases(model, ["conv.w"]) == 0


# -- the prepared LeNet-5: same logits and same gradients with and without the rewrites ---------
def gradients(prepared, tmp_path, x, y):
    build_artifacts(prepared.training, tmp_path, prepared.info.trainable, ClassifierLoss(), prepared.output_name)
    trainer = Trainer(tmp_path, lr=1e-3, num_classes=10)
    trainer.module.train()
    trainer.module(x, y)
    return {name: trainer.state.parameters[name].grad.copy() for name in prepared.info.trainable}


def test_lenet5_rewrites_keep_logits_and_gradients(tmp_path):
    model = build("lenet5", seed=3)
    fast, plain = prepare_model(model), prepare_model(model, speedups=False)
    assert ops(plain.training) == ops(model)
    assert "MaxPool" in ops(fast.training) and ops(fast.training).count("Conv") == 5  # conv1 in 4 phases, conv2
    assert fast.info.trainable == plain.info.trainable and list(fast.info.prunable) == list(plain.info.prunable)
    rng = np.random.default_rng(0)
    x = rng.random((16, 1, 28, 28), dtype=np.float32)
    y = rng.integers(0, 10, 16).astype(np.int64)
    np.testing.assert_allclose(run(fast.training, x), run(model, x), rtol=1e-5, atol=1e-5)
    got = gradients(fast, tmp_path / "fast", x, y)
    want = gradients(plain, tmp_path / "plain", x, y)
    for name in want:
        scale = np.abs(want[name]).max()
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-4 * scale, err_msg=name)
