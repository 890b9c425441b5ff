"""Channel analysis, shrink and verify on small models built in code (one per rule)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from admm_onnx.structured import analyse, masked, shrink, verify
from admm_onnx.structured.verify import ShrinkMismatch


class Net:
    """Tiny ONNX builder with random weights (BatchNorm statistics random too)."""

    def __init__(self, seed=0, opset=17):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits, self.opset, self.counts = [], [], opset, {}

    def _name(self, p):
        self.counts[p] = self.counts.get(p, 0) + 1
        return f"{p}{self.counts[p]}"

    def param(self, arr, p="w"):
        name = self._name(p)
        self.inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def op(self, op, inputs, n_out=1, **attrs):
        outs = [self._name(op.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=outs[0], **attrs))
        return outs[0] if n_out == 1 else outs

    def randn(self, *shape, scale=0.5):
        return (self.rng.standard_normal(shape) * scale).astype(np.float32)

    def conv(self, x, cin, cout, k=3, group=1, bias=True, stride=1):
        w = self.param(self.randn(cout, cin // group, k, k))
        ins = [x, w] + ([self.param(self.randn(cout), "b")] if bias else [])
        return self.op("Conv", ins, kernel_shape=[k, k], pads=[k // 2] * 4, group=group, strides=[stride] * 2)

    def bn(self, x, c):
        ps = [self.param(self.randn(c) + 1, "s"), self.param(self.randn(c), "b"), self.param(self.randn(c), "m"),
              self.param(np.abs(self.randn(c)) + 0.5, "v")]
        return self.op("BatchNormalization", [x] + ps)

    def gemm(self, x, fin, fout, trans_b=1):
        w = self.randn(fout, fin) if trans_b else self.randn(fin, fout)
        return self.op("Gemm", [x, self.param(w), self.param(self.randn(fout), "b")], transB=trans_b)

    def head(self, x, c, classes=3):
        return self.gemm(self.op("Flatten", [self.op("GlobalAveragePool", [x])], axis=1), c, classes)

    def model(self, out, input_shape=("N", 3, 6, 6), outputs=None):
        graph = helper.make_graph(
            self.nodes, "t", [helper.make_tensor_value_info("input", TensorProto.FLOAT, list(input_shape))],
            [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in (outputs or [out])], self.inits)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        m.ir_version = 8
        _typed_outputs(m)
        onnx.checker.check_model(m)
        return m


def _typed_outputs(m):
    """Output value infos with the inferred shapes (the checker wants a shape)."""
    g = onnx.shape_inference.infer_shapes(m).graph
    inferred = {v.name: v for v in list(g.value_info) + list(g.output)}
    for o in m.graph.output:
        if o.name in inferred:
            o.CopyFrom(inferred[o.name])


def by_producer(analysis, node_name):
    return next(g for g in analysis.groups if node_name in g.producers)


def check_shrinks(model, analysis=None, seeds=4):
    """Random keep sets: shrunk == masked in ORT, checker + strict shape inference, bytes as counted."""
    analysis = analysis or analyse(model)
    groups = analysis.prunable
    assert groups
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        keep = {g.id: np.sort(rng.choice(g.size, rng.integers(1, g.size), replace=False)) for g in groups}
        small = shrink(model, analysis, keep)
        onnx.checker.check_model(small, full_check=True)
        onnx.shape_inference.infer_shapes(small, strict_mode=True)
        verify(masked(model, analysis, keep), small, seed=seed)
        original = {t.name for t in model.graph.initializer}
        nbytes = sum(numpy_helper.to_array(t).nbytes for t in small.graph.initializer if t.name in original)
        assert nbytes == analysis.counts(keep)["bytes"] < analysis.counts()["bytes"]
        assert [i.name for i in small.graph.input] == [i.name for i in model.graph.input]
        assert [o.name for o in small.graph.output] == [o.name for o in model.graph.output]
        assert [n.name for n in small.graph.node] == [n.name for n in model.graph.node]
    return analysis


def test_residual_stage_and_downsample_couple_the_stage():
    from admm_onnx.models.resnet_cifar import resnet_cifar

    m = resnet_cifar((3, 8, 8), 3, blocks=2, width=4)
    for t in m.graph.initializer:  # random BN parameters so that zeroing matters
        if "bn" in t.name and t.name.endswith(("bias", "running_mean")):
            t.CopyFrom(numpy_helper.from_array(np.random.default_rng(1).standard_normal(t.dims[0]).astype(np.float32), t.name))
    a = analyse(m)
    stem = by_producer(a, "conv1")
    assert set(stem.producers) == {"conv1", "layer1.0.conv2", "layer1.1.conv2"}
    s2 = by_producer(a, "layer2.0.downsample")
    assert set(s2.producers) == {"layer2.0.conv2", "layer2.0.downsample", "layer2.1.conv2"} and s2.size == 8
    assert by_producer(a, "layer1.0.conv1").producers == ["layer1.0.conv1"]
    fc = by_producer(a, "fc")
    assert not fc.prunable and "graph output" in fc.blocked[0]
    assert len(a.prunable) == 3 + 2 * 3
    check_shrinks(m, a)


def _macs_conv(cin, cout, k, hw):
    return cin * cout * k * k * hw


def test_counts_follow_the_keep_set():
    net = Net()
    x = net.op("Relu", [net.conv("input", 3, 8)])
    y = net.conv(x, 8, 5, k=1)
    m = net.model(y)
    a = analyse(m)
    g = by_producer(a, "conv1") if any("conv1" in gg.producers for gg in a.groups) else a.groups[0]
    assert g.size == 8 and g.prunable
    assert a.counts()["macs"] == _macs_conv(3, 8, 3, 36) + _macs_conv(8, 5, 1, 36)
    assert a.counts({g.id: [0, 1, 2]})["macs"] == _macs_conv(3, 3, 3, 36) + _macs_conv(3, 5, 1, 36)
    assert a.counts({g.id: [0, 1, 2]})["params"] == 3 * 27 + 3 + 5 * 3 + 5
    check_shrinks(m, a)


@pytest.mark.parametrize("mult", [1, 2])
def test_depthwise_follows_its_input_and_rewrites_group(mult):
    net = Net()
    x = net.op("Relu", [net.bn(net.conv("input", 3, 8), 8)])
    d = net.conv(x, 8, 8 * mult, group=8)
    d = net.op("Clip", [net.bn(d, 8 * mult), net.param(np.float32(0), "lo"), net.param(np.float32(6), "hi")])
    y = net.head(net.conv(d, 8 * mult, 4, k=1), 4)
    m = net.model(y)
    a = analyse(m)
    g = by_producer(a, "conv1")
    assert g.prunable and g.size == 8 and g.producers == ["conv1"]
    dw = next(n for n in m.graph.node if any(at.name == "group" and at.i == 8 for at in n.attribute))
    assert any(mb.init == dw.input[1] and len(mb.positions) == 8 * mult for mb in g.members)
    check_shrinks(m, a)
    small = shrink(m, a, {g.id: [1, 4, 6]})
    node = next(n for n in small.graph.node if n.name == dw.name)
    assert helper.get_attribute_value(next(at for at in node.attribute if at.name == "group")) == 3


def test_grouped_conv_blocks_its_input():
    net = Net()
    x = net.op("Relu", [net.conv("input", 3, 8)])
    y = net.head(net.conv(x, 8, 6, group=2), 6)
    a = analyse(net.model(y))
    g = by_producer(a, "conv1")
    assert not g.prunable and "grouped Conv" in g.blocked[0]


def test_concat_of_branches_keeps_offsets():
    net = Net()
    b1 = net.op("Relu", [net.conv("input", 3, 4)])
    b2 = net.op("Sigmoid", [net.conv("input", 3, 6, k=1)])
    c = net.op("Concat", [b1, b2, "input"], axis=1)  # the graph input's 3 channels stay
    y = net.head(net.conv(c, 13, 5), 5)
    m = net.model(y)
    a = analyse(m)
    g1, g2 = by_producer(a, "conv1"), by_producer(a, "conv2")
    assert g1.id != g2.id and g1.prunable and g2.prunable
    consumer_w = next(n for n in m.graph.node if n.name == "conv3").input[1]
    m1 = next(mb for mb in g1.members if mb.init == consumer_w)
    m2 = next(mb for mb in g2.members if mb.init == consumer_w)
    assert m1.positions.tolist() == [0, 1, 2, 3] and m2.positions.tolist() == list(range(4, 10))
    check_shrinks(m, a)


def test_concat_of_a_tensor_with_itself():
    net = Net()
    x = net.op("Relu", [net.conv("input", 3, 4)])
    c = net.op("Concat", [x, x], axis=1)
    y = net.head(net.conv(c, 8, 5), 5)
    m = net.model(y)
    a = analyse(m)
    g = by_producer(a, "conv1")
    mb = next(mb for mb in g.members if mb.init == m.graph.node[3].input[1])
    assert mb.positions.tolist() == list(range(8)) and mb.channels.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    check_shrinks(m, a)


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("view", ["flatten", "reshape0", "reshape_explicit"])
def test_flatten_or_reshape_into_gemm_block_map(trans_b, view):
    net = Net()
    x = net.op("Relu", [net.conv("input", 3, 4, stride=2)])  # 4 x 3 x 3
    if view == "flatten":
        f = net.op("Flatten", [x], axis=1)
    else:
        shape = [0, -1] if view == "reshape0" else [-1, 36]
        f = net.op("Reshape", [x, net.param(np.array(shape, np.int64), "shape")])
    y = net.gemm(f, 36, 5, trans_b)
    m = net.model(y)
    a = analyse(m)
    g = by_producer(a, "conv1")
    gemm_w = m.graph.node[-1].input[1]
    mb = next(mb for mb in g.members if mb.init == gemm_w)
    assert mb.axis == (1 if trans_b else 0)
    assert mb.channels.tolist() == np.repeat(np.arange(4), 9).tolist()
    check_shrinks(m, a)


@pytest.mark.parametrize("opset", [13, 18])
def test_split_on_channels_gives_separate_groups(opset):
    net = Net(opset=opset)
    x = net.op("Relu", [net.conv("input", 3, 8)])
    if opset >= 18:
        p, q = net.op("Split", [x], n_out=2, axis=1, num_outputs=2)
        sizes = (4, 4)
    else:
        p, q = net.op("Split", [x, net.param(np.array([3, 5], np.int64), "split")], n_out=2, axis=1)
        sizes = (3, 5)
    y = net.op("Add", [net.conv(p, sizes[0], 4), net.conv(q, sizes[1], 4)])
    m = net.model(net.head(y, 4))
    a = analyse(m)
    parts = [g for g in a.groups if g.producers == [m.graph.node[0].name]]
    assert sorted(g.size for g in parts) == sorted(sizes) and all(g.prunable for g in parts)
    check_shrinks(m, a)


def test_se_gate_couples_the_gate_with_its_input():
    net = Net()
    x = net.op("Relu", [net.bn(net.conv("input", 3, 8), 8)])
    s = net.op("Relu", [net.conv(net.op("GlobalAveragePool", [x]), 8, 3, k=1)])
    gate = net.op("Sigmoid", [net.conv(s, 3, 8, k=1)])
    y = net.op("Mul", [x, gate])
    m = net.model(net.head(net.conv(y, 8, 4), 4))
    a = analyse(m)
    g = by_producer(a, "conv1")
    assert len(g.producers) == 2 and g.size == 8 and g.prunable
    assert by_producer(a, m.graph.node[4].name).size == 3
    check_shrinks(m, a)


def test_sigmoid_and_bn_shift_between_producer_and_consumer_stay_exact():
    """A removed channel outputs sigmoid(beta) != 0 in the masked model; its consumer columns are
    zero, so shrunk == masked (the NNI #2130 mismatch cannot happen)."""
    net = Net()
    x = net.op("Sigmoid", [net.bn(net.conv("input", 3, 6), 6)])
    m = net.model(net.head(net.conv(x, 6, 4), 4))
    check_shrinks(m)


def test_transformer_mlp_hidden_is_prunable_residual_is_blocked():
    net = Net()
    d, h = 6, 12
    xn = net.op("LayerNormalization", ["input", net.param(np.ones(d, np.float32), "g"), net.param(np.zeros(d, np.float32), "b")], axis=-1)
    hid = net.op("Add", [net.op("MatMul", [xn, net.param(net.randn(d, h))]), net.param(net.randn(h), "b")])
    hid = net.op("Relu", [hid])
    out = net.op("Add", [net.op("MatMul", [hid, net.param(net.randn(h, d))]), net.param(net.randn(d), "b")])
    y = net.op("Add", [out, "input"])
    m = net.model(y, input_shape=("B", 5, d))
    a = analyse(m)
    hidden = by_producer(a, m.graph.node[1].name)
    assert hidden.prunable and hidden.size == h and len(hidden.members) == 3
    res = by_producer(a, m.graph.node[4].name)
    assert not res.prunable and "cannot be removed" in " ".join(res.blocked)
    check_shrinks(m, a)


@pytest.mark.parametrize("case,reason", [
    ("output", "graph output"),
    ("softmax", "channel-mixing"),
    ("reduce", "channel-mixing"),
    ("slice", "selects channels"),
    ("unknown", "no rule for op"),
    ("shape", "dynamic shape"),
])
def test_blockers_say_why(case, reason):
    net = Net()
    x = net.op("Relu", [net.conv("input", 3, 4)])
    outputs = None
    if case == "output":
        y = net.conv(x, 4, 2)
        outputs = [y, x]
    elif case == "softmax":
        y = net.op("Softmax", [x], axis=1)
    elif case == "reduce":
        y = net.op("ReduceMean", [x], axes=[1])
    elif case == "slice":
        y = net.op("Slice", [x, net.param(np.array([0], np.int64), "s"), net.param(np.array([2], np.int64), "e"),
                             net.param(np.array([1], np.int64), "a")])
    elif case == "unknown":
        y = net.op("DepthToSpace", [net.op("Relu", [x])], blocksize=2)
        net.nodes[-1].op_type = "SpaceToDepthX"
    else:
        y = net.op("Shape", [x])
    m = net.model(y, outputs=outputs) if case not in ("unknown", "shape") else _unchecked(net, y)
    g = by_producer(analyse(m), "conv1")
    assert not g.prunable and reason in " ".join(g.blocked)


def _unchecked(net, y):
    graph = helper.make_graph(net.nodes, "t", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 6, 6])],
                              [helper.make_tensor_value_info(y, TensorProto.FLOAT, None)], net.inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])  # not checked: unknown op


def test_verify_catches_a_wrong_shrink():
    net = Net()
    x = net.op("Relu", [net.conv("input", 3, 4)])
    m = net.model(net.head(net.conv(x, 4, 4), 4))
    a = analyse(m)
    g = by_producer(a, "conv1")
    wrong = masked(m, a, {g.id: [0, 1]})
    with pytest.raises(ShrinkMismatch):
        verify(wrong, shrink(m, a, {g.id: [2, 3]}))


def test_groups_cli(tmp_path, capsys):
    import json

    from admm_onnx.cli.main import main
    from admm_onnx.models.resnet_cifar import resnet_cifar

    path = tmp_path / "r.onnx"
    onnx.save(resnet_cifar((3, 8, 8), 3, blocks=1, width=4), str(path))
    assert main(["groups", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert sum(g["prunable"] for g in data["groups"]) == 6
    assert any("graph output" in r for g in data["groups"] for r in g["blocked"])
    assert main(["groups", str(path)]) == 0
    assert "layer2.0.conv2+1" in capsys.readouterr().out
    assert main(["groups", str(tmp_path / "missing.onnx")]) == 2


def test_per_channel_scale_stored_as_a_vector_and_unsqueezed():
    """Caffe2 exports keep a BN scale as [C] and Unsqueeze it to [C, 1, 1] before Mul."""
    net = Net()
    x = net.conv("input", 3, 6)
    scale = net.op("Unsqueeze", [net.param(net.randn(6), "scale"), net.param(np.array([1, 2], np.int64), "axes")])
    y = net.op("Relu", [net.op("Mul", [x, scale])])
    m = net.model(net.head(net.conv(y, 6, 4), 4))
    a = analyse(m)
    g = by_producer(a, "conv1")
    assert g.prunable and any(mb.init.startswith("scale") for mb in g.members)
    check_shrinks(m, a)


FAST_ZOO = ("squeezenet", "inception_v1", "shufflenet")


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n in FAST_ZOO else pytest.mark.slow) for n in
                                  ("bvlc_alexnet", "densenet121", "inception_v1", "inception_v2", "resnet50",
                                   "shufflenet", "squeezenet", "vgg19", "zfnet512")])
def test_zoo_models_shrink_and_verify_or_say_why_not(name):
    from admm_onnx.graph.materialize import light_model
    from admm_onnx.structured.targets import ChannelTargets

    m = light_model(name)
    a = analyse(m)
    assert all(g.blocked or g.prunable or not g.members or g.size == 1 for g in a.groups)
    if not a.prunable:  # ShuffleNet: grouped convs and their channel shuffles
        assert all(g.blocked for g in a.groups if g.members)
        return
    counts = ChannelTargets(sparsity=0.5).keep_counts(a)
    rng = np.random.default_rng(0)
    sizes = {g.id: g.size for g in a.groups}
    keep = {gid: np.sort(rng.choice(sizes[gid], k, replace=False)) for gid, k in counts.items()}
    small = shrink(m, a, keep)
    verify(masked(m, a, keep), small)
    assert a.counts(keep)["macs"] < a.counts()["macs"]


def test_pytorch_exports():
    from pathlib import Path

    from admm_onnx.io import load_model

    here = Path(__file__).parent / "fixtures"
    train = analyse(load_model(here / "torch_legacy_train.onnx"))
    assert any("training mode" in r for g in train.groups for r in g.blocked)
    for path in (here / "torch_legacy_eval.onnx", here / "torch_dynamo_ext" / "model.onnx"):
        m = load_model(path)
        a = check_shrinks(m, seeds=2)
        assert len(a.prunable) == 3


def test_batchnorm_recalibration_uses_the_batch_statistics():
    from admm_onnx.graph.bn_recalibrate import recalibrate_batchnorm

    net = Net()
    x = net.conv("input", 3, 4, bias=False)
    y = net.bn(x, 4)
    m = net.model(y)
    rng = np.random.default_rng(0)
    batches = [{"input": rng.standard_normal((8, 3, 6, 6)).astype(np.float32)} for _ in range(3)]
    assert recalibrate_batchnorm(m, iter(batches)) == 1
    w = numpy_helper.to_array(m.graph.initializer[0])
    import onnxruntime as ort  # the conv output's statistics, computed by ORT from the first node alone

    g = helper.make_graph([m.graph.node[0]], "c", [m.graph.input[0]], [helper.make_tensor_value_info(x, TensorProto.FLOAT, None)],
                          [m.graph.initializer[0]])
    cm = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    sess = ort.InferenceSession(cm.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = [sess.run(None, b)[0] for b in batches]
    mean = np.mean([o.mean(axis=(0, 2, 3)) for o in outs], axis=0)
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    assert w.shape == (4, 3, 3, 3)
    np.testing.assert_allclose(inits[m.graph.node[1].input[3]], mean, rtol=1e-4, atol=1e-5)


def test_exporter_shared_constants_are_untied():
    """TorchScript de-duplicates equal initializers: two convs reading one zero bias (and one
    all-zero weight) through Identity nodes. Untied, both convs' channels are prunable and the
    shrink is exact; a real weight tie (non-zero, 2-D+) stays shared and blocks with a reason."""
    from admm_onnx.structured.untie import untie_constants

    net = Net()
    zero_b = net.param(np.zeros(8, np.float32), "zb")
    zero_w = net.param(np.zeros((8, 8, 3, 3), np.float32), "zw")
    ids = [net.op("Identity", [zero_b]) for _ in range(2)]
    x = net.op("Relu", [net.op("Conv", ["input", net.param(net.randn(8, 3, 3, 3)), ids[0]], kernel_shape=[3, 3], pads=[1] * 4)])
    wid = net.op("Identity", [zero_w])
    y = net.op("Conv", [x, wid, ids[1]], kernel_shape=[3, 3], pads=[1] * 4)
    z = net.op("Relu", [net.op("Add", [y, net.conv(x, 8, 8, k=1)])])
    m = net.model(net.head(net.conv(z, 8, 4), 4))
    before = m.SerializeToString()
    assert not any("conv1" in g.producers and g.prunable for g in analyse(m).groups)  # its bias is not its own
    untied, n = untie_constants(m)
    assert n >= 3 and m.SerializeToString() == before  # the input is not modified
    assert not any(nd.op_type == "Identity" for nd in untied.graph.node)
    onnx.checker.check_model(untied)
    import onnxruntime as ort

    feed = {"input": np.random.default_rng(0).standard_normal((2, 3, 6, 6)).astype(np.float32)}
    run = lambda mm: ort.InferenceSession(mm.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]  # noqa: E731
    np.testing.assert_array_equal(run(m), run(untied))
    a = check_shrinks(untied)
    assert len(a.prunable) >= 2
    assert untie_constants(untied) == (untied, 0)

    tied = Net()
    w = tied.param(tied.randn(4, 4, 1, 1))
    x = tied.op("Relu", [tied.conv("input", 3, 4)])
    y = tied.op("Conv", [tied.op("Conv", [x, w]), w])
    m2 = tied.model(tied.head(y, 4))
    a2 = analyse(untie_constants(m2)[0])
    g = by_producer(a2, "conv1")
    assert not g.prunable and "not an initializer of its own" in " ".join(g.blocked)
