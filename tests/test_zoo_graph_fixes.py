"""Graph-side fixes found by running the zoo of real exports (bench/zoo_export.py,
bench/zoo_run.py): each with a tiny model built here, checked for the same function and for a
CPU training step."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from admm_onnx._ort import api, onnxblock
from admm_onnx.errors import TrainingError
from admm_onnx.graph.analysis import analyse
from admm_onnx.graph.differentiable import check_differentiable
from admm_onnx.graph.prepare import prepare_for_training
from admm_onnx.training import build_artifacts


class MSEToTarget(onnxblock.Block):
    def __init__(self):
        super().__init__()
        self._mse = onnxblock.loss.MSELoss()

    def build(self, output_name):
        return self._mse(output_name, "target")


def run(model, feed, outputs=None):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(outputs, feed)


def train_step(model, feed, output, tmp_path):
    """Build artifacts on ``output`` and take one CPU training step; returns the moved params."""
    info = analyse(model, output)
    build_artifacts(model, tmp_path / "art", info.trainable, MSEToTarget(), output)
    state = api.CheckpointState.load_checkpoint(str(tmp_path / "art" / "checkpoint"))
    module = api.Module(str(tmp_path / "art" / "training_model.onnx"), state, str(tmp_path / "art" / "eval_model.onnx"))
    opt = api.Optimizer(str(tmp_path / "art" / "optimizer_model.onnx"), module)
    (y,) = run(model, feed, [output])
    probe = {**feed, "target": np.zeros_like(y)}
    before = {n: np.array(state.parameters[n].data) for n in info.trainable}
    module.train()
    loss, _ = module(*[probe[n] for n in module.input_names()])
    opt.step()
    assert np.isfinite(float(loss))
    return info, [n for n in info.trainable if not np.array_equal(np.array(state.parameters[n].data), before[n])]


def rewritten_agrees(model, x, op, rtol=None, atol=None):
    """prepare_for_training rewrites every ``op`` node of ``model`` away, in place, and the model
    computes on input ``x`` what it did before (exactly, unless tolerances are given)."""
    (want,) = run(model, {"x": x})
    prepare_for_training(model)
    assert op not in {n.op_type for n in model.graph.node}
    (got,) = run(model, {"x": x})
    if rtol is None and atol is None:
        np.testing.assert_array_equal(got, want)
    else:
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)


def w(name, *shape, seed=0):
    return numpy_helper.from_array(np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * 0.3, name)


# -- opset < 13 with a ZipMap output (scikit-learn pipelines at opset 9) -----------------------
def test_opset_upgrade_keeps_zipmap_output_type(tmp_path):
    labels = [0, 1, 2]
    nodes = [
        helper.make_node("MatMul", ["X", "W"], ["scores"]),
        helper.make_node("Softmax", ["scores"], ["probabilities"], axis=1),
        helper.make_node("ArgMax", ["probabilities"], ["label"], axis=1, keepdims=0),
        helper.make_node("ZipMap", ["probabilities"], ["output_probability"], domain="ai.onnx.ml",
                         classlabels_int64s=labels),
    ]
    zipmap_type = helper.make_sequence_type_proto(
        helper.make_map_type_proto(TensorProto.INT64, helper.make_tensor_type_proto(TensorProto.FLOAT, None)))
    graph = helper.make_graph(
        nodes, "skl", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("label", TensorProto.INT64, [None]),
         helper.make_value_info("output_probability", zipmap_type)], [w("W", 4, 3)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9), helper.make_opsetid("ai.onnx.ml", 1)])
    model.ir_version = 5
    onnx.checker.check_model(model)
    prepare_for_training(model)  # used to fail: the converter dropped the seq(map) output type
    assert model.opset_import[0].version >= 13 or model.opset_import[1].version >= 13
    info, moved = train_step(model, {"X": np.ones((2, 4), np.float32)}, "output_probability", tmp_path)
    assert moved == ["W"] and list(info.prunable) == ["W"]


# -- Resize -> MatMul ------------------------------------------------------------------------------
def resize_model(mode, coord, scales=None, sizes=None, dynamic_hw=False):
    """x (N, 2, 6, 5) -> Conv 3x3 -> Resize -> Conv 1x1 -> y."""
    inits = [w("c1", 4, 2, 3, 3), w("c2", 3, 4, 1, 1, seed=1)]
    inputs = ["h", ""]
    if scales is not None:
        inits.append(numpy_helper.from_array(np.array(scales, np.float32), "scales"))
        inputs.append("scales")
    else:
        inputs.append("")
    if sizes is not None:
        nodes_sizes = helper.make_node("Constant", [], ["sizes"],
                                       value=numpy_helper.from_array(np.array(sizes, np.int64), "sizes"))
        inputs.append("sizes")
    nodes = [helper.make_node("Conv", ["x", "c1"], ["h"], pads=[1, 1, 1, 1])]
    if sizes is not None:
        nodes.append(nodes_sizes)
    nodes += [
        helper.make_node("Resize", inputs, ["r"], mode=mode, coordinate_transformation_mode=coord),
        helper.make_node("Conv", ["r", "c2"], ["y"]),
    ]
    hw = ["h", "w"] if dynamic_hw else [6, 5]
    graph = helper.make_graph(nodes, "resize", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2, *hw])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3, "ho", "wo"])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize("mode, coord, scales, sizes", [
    ("linear", "half_pixel", [1, 1, 2, 2], None),             # torch bilinear, align_corners=False
    ("linear", "pytorch_half_pixel", [1, 1, 2, 2], None),
    ("nearest", "asymmetric", [1, 1, 2, 3], None),            # torch nearest upsampling
    ("cubic", "align_corners", None, [3, 4, 9, 7]),           # sizes given, batch 3 in the export
    ("linear", "half_pixel", [1, 1, 0.5, 1], None),           # downsampling one axis
])
def test_resize_becomes_matmul_and_trains(mode, coord, scales, sizes, tmp_path):
    model = resize_model(mode, coord, scales, sizes)
    x = np.random.default_rng(2).standard_normal((2, 2, 6, 5)).astype(np.float32)
    if sizes is not None:
        x = np.random.default_rng(2).standard_normal((3, 2, 6, 5)).astype(np.float32)
    rewritten_agrees(model, x, "Resize", rtol=1e-5, atol=1e-5)
    info, moved = train_step(model, {"x": x}, "y", tmp_path)  # the Resize form: no CPU ResizeGrad
    assert sorted(info.prunable) == ["c1", "c2"] and sorted(moved) == ["c1", "c2"]


def test_resize_with_dynamic_spatial_size_is_named(tmp_path):
    model = resize_model("linear", "half_pixel", [1, 1, 2, 2], dynamic_hw=True)
    prepare_for_training(model)
    assert "Resize" in {n.op_type for n in model.graph.node}
    with pytest.raises(TrainingError, match="Resize"):
        check_differentiable(model, analyse(model, "y").trainable, "y")


# -- ConvTranspose -> Conv ---------------------------------------------------------------------
def convt_model(kernel, strides, pads=None, output_padding=None, dilations=None, group=1, bias=True, spatial=(5, 4),
                dynamic=False):
    """x (N, 2, *spatial) -> ConvTranspose (2 -> 3 channels) -> Relu -> y."""
    nsp = len(spatial)
    kw = {"strides": strides}
    if pads:
        kw["pads"] = pads
    if output_padding:
        kw["output_padding"] = output_padding
    if dilations:
        kw["dilations"] = dilations
    if group != 1:
        kw["group"] = group
    inits = [w("wt", 2, 3 // group if group == 1 else 1, *kernel)]
    if group != 1:
        inits = [w("wt", 2, 1, *kernel)]
    inputs = ["x", "wt"]
    if bias:
        inits.append(w("bt", 3 if group == 1 else 2, seed=3))
        inputs.append("bt")
    nodes = [helper.make_node("ConvTranspose", inputs, ["t"], **kw), helper.make_node("Relu", ["t"], ["y"])]
    dims = ["d%d" % i for i in range(nsp)] if dynamic else list(spatial)
    graph = helper.make_graph(nodes, "convt", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2, *dims])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", None] + [None] * nsp)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize("kernel, strides, pads, output_padding, dilations, bias, spatial", [
    ([2, 2], [2, 2], None, None, None, True, (5, 4)),                 # U-Net up-convolution
    ([3, 3], [2, 2], [1, 1, 1, 1], [1, 1], None, False, (5, 4)),     # "same"-style x2 upsampling
    ([4, 3], [2, 1], [1, 0, 2, 1], None, [1, 2], True, (5, 4)),      # uneven pads, dilation
    ([3], [3], [0, 1], None, None, True, (6,)),                       # 1-D
])
def test_convtranspose_becomes_conv_and_trains(kernel, strides, pads, output_padding, dilations, bias, spatial,
                                               tmp_path):
    model = convt_model(kernel, strides, pads, output_padding, dilations, bias=bias, spatial=spatial)
    x = np.random.default_rng(4).standard_normal((2, 2, *spatial)).astype(np.float32)
    rewritten_agrees(model, x, "ConvTranspose", rtol=1e-5, atol=1e-5)
    info, moved = train_step(model, {"x": x}, "y", tmp_path)  # the ConvTranspose form: no CPU kernel
    assert list(info.prunable) == ["wt"] and "wt" in moved
    # The weight keeps ConvTranspose's layout: output channels on stored axis 1.
    assert (info.prunable["wt"].out_axis, info.prunable["wt"].in_axis) == (1, 0)


@pytest.mark.parametrize("case", ["group", "dynamic"])
def test_convtranspose_left_alone_is_named(case):
    model = convt_model([2, 2], [2, 2], group=2) if case == "group" else convt_model([2, 2], [2, 2], dynamic=True)
    prepare_for_training(model)
    assert "ConvTranspose" in {n.op_type for n in model.graph.node}
    with pytest.raises(TrainingError, match="ConvTranspose"):
        check_differentiable(model, analyse(model, "y").trainable, "y")


# -- opset 22 / IR 11 that use nothing newer (skl2onnx and onnx >= 1.18 defaults) -------------
def conv_mlp(opset, ir, bf16=False):
    inits = [w("conv", 3, 2, 3, 3), w("fc", 12, 4, seed=1)]
    nodes = [helper.make_node("Conv", ["x", "conv"], ["c"]),  # Conv: bumped at opset 22 (bfloat16 added)
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Flatten", ["r"], ["f"]),
             helper.make_node("MatMul", ["f", "fc"], ["y"])]
    if bf16:  # computes in bfloat16 on the way (Cast to bfloat16 and back)
        nodes[1:2] = [helper.make_node("Cast", ["c"], ["c16"], to=TensorProto.BFLOAT16),
                      helper.make_node("Relu", ["c16"], ["r16"]),
                      helper.make_node("Cast", ["r16"], ["r"], to=TensorProto.FLOAT)]
    graph = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir
    return model


@pytest.mark.parametrize("opset, ir", [(22, 10), (21, 11), (22, 11)])
def test_newer_declared_versions_are_lowered(opset, ir, tmp_path):
    from admm_onnx.graph._util import opset_version
    from admm_onnx.pipeline import output_model, prepare_model

    user = conv_mlp(opset, ir)
    before = user.SerializeToString()
    prepared = prepare_model(user)
    assert user.SerializeToString() == before  # the caller's model is not modified
    assert sorted(prepared.info.prunable) == ["conv", "fc"]
    written = output_model(prepared, {"conv": np.zeros((3, 2, 3, 3), np.float32)})
    assert opset_version(written) == min(opset, 21) and written.ir_version == min(ir, 10)
    onnx.checker.check_model(written)
    x = np.ones((2, 2, 4, 4), np.float32)
    assert run(written, {"x": x})[0].shape == (2, 4)


def test_opset_22_with_bfloat16_is_refused():
    from admm_onnx.errors import ModelError
    from admm_onnx.pipeline import prepare_model

    with pytest.raises(ModelError, match="opset 22"):
        prepare_model(conv_mlp(22, 10, bf16=True))


# -- AveragePool -> depthwise Conv ------------------------------------------------------------------
def avgpool_model(**kw):
    """x (N, 2, 8, 7) -> Conv 1x1 (3 channels) -> AveragePool -> Flatten -> y."""
    nodes = [helper.make_node("Conv", ["x", "conv"], ["c"]), helper.make_node("AveragePool", ["c"], ["p"], **kw),
             helper.make_node("Flatten", ["p"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2, 8, 7])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", None])], [w("conv", 3, 2, 1, 1)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("kw", [
    dict(kernel_shape=[2, 2], strides=[2, 2]),                                    # DenseNet transition
    dict(kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1], count_include_pad=0),  # Inception branch
    dict(kernel_shape=[3, 2], strides=[2, 1], pads=[1, 0, 0, 1], count_include_pad=1),
])
def test_avgpool_becomes_conv_and_trains(kw, tmp_path):
    """ORT 1.19.2's CPU AveragePoolGrad kills the process (SIGFPE) at the first step."""
    model = avgpool_model(**kw)
    x = np.random.default_rng(5).standard_normal((2, 2, 8, 7)).astype(np.float32)
    rewritten_agrees(model, x, "AveragePool", rtol=1e-5, atol=1e-6)
    info, moved = train_step(model, {"x": x}, "y", tmp_path)
    assert list(info.prunable) == ["conv"] and moved == ["conv"]  # the constant kernel is not a parameter


def test_avgpool_with_ceil_mode_is_named():
    model = avgpool_model(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1)
    prepare_for_training(model)
    with pytest.raises(TrainingError, match="AveragePool"):
        check_differentiable(model, analyse(model, "y").trainable, "y")


# -- scikit-learn linear ML ops lifted into standard ops ------------------------------------------
def ml_model(kind, post=b"SOFTMAX", labels="ints", normalizer=None, opset=9):
    """X (N, 4) -> [Scaler] -> LinearClassifier/LinearRegressor [-> Normalizer] (skl2onnx's shapes)."""
    rng = np.random.default_rng(6)
    coef = [float(v) for v in rng.standard_normal(3 * 4)]
    nodes = [helper.make_node("Scaler", ["X"], ["scaled"], domain="ai.onnx.ml", offset=[0.5] * 4, scale=[2.0] * 4)]
    if kind == "classifier":
        kw = {"classlabels_ints": [3, 5, 7]} if labels == "ints" else {"classlabels_strings": [b"a", b"b", b"c"]}
        nodes.append(helper.make_node("LinearClassifier", ["scaled"], ["label", "scores"], domain="ai.onnx.ml",
                                      coefficients=coef, intercepts=[0.1, -0.2, 0.3], post_transform=post, **kw))
        out = "scores"
        if normalizer:
            nodes.append(helper.make_node("Normalizer", ["scores"], ["probabilities"], domain="ai.onnx.ml",
                                          norm=normalizer))
            out = "probabilities"
        outputs = [helper.make_tensor_value_info("label", TensorProto.INT64 if labels == "ints" else TensorProto.STRING,
                                                 [None]),
                   helper.make_tensor_value_info(out, TensorProto.FLOAT, [None, 3])]
    else:
        nodes.append(helper.make_node("LinearRegressor", ["scaled"], ["variable"], domain="ai.onnx.ml",
                                      coefficients=coef, intercepts=[0.1, -0.2, 0.3], targets=3))
        outputs = [helper.make_tensor_value_info("variable", TensorProto.FLOAT, [None, 3])]
    graph = helper.make_graph(nodes, "skl", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, 4])], outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("ai.onnx.ml", 1)])
    model.ir_version = 7
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize("kind, post, labels, normalizer, opset", [
    ("classifier", b"SOFTMAX", "ints", "L1", 9),     # LogisticRegression in a pipeline (skl2onnx, opset 9)
    ("classifier", b"LOGISTIC", "strings", None, 17),
    ("classifier", b"NONE", "ints", "L2", 15),       # LinearSVC-style raw scores
    ("regressor", b"NONE", None, None, 21),          # LinearRegression / Ridge
])
def test_sklearn_linear_nodes_are_lifted_with_the_same_outputs(kind, post, labels, normalizer, opset):
    from admm_onnx.graph.ml_linear import lift_ml_linear
    from admm_onnx.pipeline import output_model, prepare_model

    model = ml_model(kind, post, labels, normalizer, opset)
    x = np.random.default_rng(7).standard_normal((6, 4)).astype(np.float32)
    want = run(model, {"X": x})
    lifted = onnx.ModelProto()
    lifted.CopyFrom(model)
    assert lift_ml_linear(lifted) == 1 + (normalizer is not None)
    got = run(lifted, {"X": x})
    for a, b in zip(want, got):
        if a.dtype.kind == "f":
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
        else:
            assert np.array_equal(a, b)
    prepared = prepare_model(model)  # the pipeline lifts a copy: the weights become prunable
    name = ("LinearClassifier" if kind == "classifier" else "LinearRegressor") + ".coefficients"
    assert list(prepared.info.prunable) == [name] and prepared.info.prunable[name].shape == (4, 3)
    written = output_model(prepared, {name: np.zeros((4, 3), np.float32)})
    assert [o.name for o in written.graph.output] == [o.name for o in model.graph.output]
    assert [o.type for o in written.graph.output] == [o.type for o in model.graph.output]


def test_sklearn_linear_node_left_alone_when_unsupported():
    from admm_onnx.graph.ml_linear import lift_ml_linear

    model = ml_model("classifier", b"PROBIT")
    assert lift_ml_linear(model) == 0 and "LinearClassifier" in {n.op_type for n in model.graph.node}


def test_ort_average_pool_gradient_still_crashes_without_the_rewrite(tmp_path):
    """The reason for avgpool_conv.py, kept honest: ORT 1.19.2's own AveragePool gradient kills
    the training process with SIGFPE (run in a child process)."""
    import subprocess
    import sys
    import textwrap

    model = avgpool_model(kernel_shape=[2, 2], strides=[2, 2])
    onnx.save(model, tmp_path / "m.onnx")
    script = textwrap.dedent(f"""
        import numpy as np, onnx
        from admm_onnx._ort import api, artifacts
        model = onnx.load({str(tmp_path / "m.onnx")!r})
        artifacts.generate_artifacts(model, requires_grad=["conv"], loss=artifacts.LossType.MSELoss,
                                     optimizer=artifacts.OptimType.AdamW, artifact_directory={str(tmp_path)!r})
        state = api.CheckpointState.load_checkpoint({str(tmp_path / "checkpoint")!r})
        module = api.Module({str(tmp_path / "training_model.onnx")!r}, state, {str(tmp_path / "eval_model.onnx")!r})
        module.train()
        module(np.ones((2, 2, 8, 7), np.float32), np.zeros((2, 36), np.float32))
        print("survived")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -8 and "survived" not in proc.stdout, (proc.returncode, proc.stderr[-500:])


# -- InstanceNormalization (GroupNorm and InstanceNorm exports) -----------------------------------
@pytest.mark.parametrize("opset, group_norm", [(17, True), (18, False), (20, True)])
def test_instancenorm_becomes_reductions_and_trains(opset, group_norm, tmp_path):
    """Both torch exporters write nn.GroupNorm(2, 4) as Reshape -> InstanceNormalization ->
    Reshape -> Mul -> Add; ORT 1.19.2 has no gradient for InstanceNormalization."""
    inits = [w("conv", 4, 2, 3, 3), w("head", 3, 4, 1, 1, seed=1), w("gn_w", 4, seed=2), w("gn_b", 4, seed=3)]
    if group_norm:
        inits += [numpy_helper.from_array(np.ones(2, np.float32), "in_scale"),
                  numpy_helper.from_array(np.zeros(2, np.float32), "in_bias"),
                  numpy_helper.from_array(np.array([0, 2, -1], np.int64), "groups_shape"),
                  numpy_helper.from_array(np.array([0, 4, 6, 6], np.int64), "back_shape"),
                  numpy_helper.from_array(np.ones((4, 1, 1), np.float32) * 0.5, "affine_w")]
        norm = [helper.make_node("Reshape", ["c", "groups_shape"], ["grouped"]),
                helper.make_node("InstanceNormalization", ["grouped", "in_scale", "in_bias"], ["gn"], epsilon=1e-5),
                helper.make_node("Reshape", ["gn", "back_shape"], ["back"]),
                helper.make_node("Mul", ["back", "affine_w"], ["n"])]
    else:
        norm = [helper.make_node("InstanceNormalization", ["c", "gn_w", "gn_b"], ["n"], epsilon=1e-3)]
    nodes = [helper.make_node("Conv", ["x", "conv"], ["c"], pads=[1, 1, 1, 1]), *norm,
             helper.make_node("Relu", ["n"], ["r"]), helper.make_node("Conv", ["r", "head"], ["y"])]
    graph = helper.make_graph(nodes, "gn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3, 6, 6])],
                              [t for t in inits if any(t.name in nd.input for nd in nodes)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    x = np.random.default_rng(8).standard_normal((2, 2, 6, 6)).astype(np.float32)
    rewritten_agrees(model, x, "InstanceNormalization", rtol=1e-4, atol=1e-5)
    info, moved = train_step(model, {"x": x}, "y", tmp_path)
    assert sorted(info.prunable) == ["conv", "head"] and {"conv", "head"} <= set(moved)
    if not group_norm:
        assert {"gn_w", "gn_b"} <= set(moved)  # scale and bias still trained


# -- Pad reflect / edge / wrap -> Gather ---------------------------------------------------------
@pytest.mark.parametrize("mode, pads, opset", [
    ("reflect", [0, 0, 2, 1, 0, 0, 1, 2], 17),   # nn.ReflectionPad2d
    ("edge", [0, 0, 1, 3, 0, 0, 3, 0], 17),      # nn.ReplicationPad2d
    ("wrap", [0, 0, 1, 1, 0, 0, 2, 2], 19),      # circular
    ("reflect", [0, 0, 1, 1, 0, 0, -1, 1], 13),  # a cropped side
])
def test_pad_modes_become_gathers_and_train(mode, pads, opset, tmp_path):
    nodes = [helper.make_node("Conv", ["x", "conv"], ["c"]),
             helper.make_node("Pad", ["c", "pads"], ["p"], mode=mode),
             helper.make_node("Conv", ["p", "head"], ["y"])]
    inits = [w("conv", 4, 2, 1, 1), w("head", 3, 4, 3, 3, seed=1),
             numpy_helper.from_array(np.array(pads, np.int64), "pads")]
    graph = helper.make_graph(nodes, "pad", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2, 5, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3, None, None])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8 if opset < 19 else 9
    onnx.checker.check_model(model)
    x = np.random.default_rng(9).standard_normal((2, 2, 5, 6)).astype(np.float32)
    rewritten_agrees(model, x, "Pad", rtol=1e-6, atol=1e-6)
    info, moved = train_step(model, {"x": x}, "y", tmp_path)  # Pad's own gradient: constant mode only
    assert sorted(moved) == ["conv", "head"]


# -- DepthToSpace / SpaceToDepth -> Reshape/Transpose/Reshape ----------------------------------------
@pytest.mark.parametrize("op, kw, channels", [
    ("DepthToSpace", dict(blocksize=2, mode="CRD"), 8),   # nn.PixelShuffle(2)
    ("DepthToSpace", dict(blocksize=2), 8),               # DCR (TensorFlow's depth_to_space)
    ("SpaceToDepth", dict(blocksize=2), 2),               # nn.PixelUnshuffle(2)
])
def test_depth_space_become_reshapes_and_train(op, kw, channels, tmp_path):
    nodes = [helper.make_node("Conv", ["x", "conv"], ["c"]), helper.make_node(op, ["c"], ["s"], **kw),
             helper.make_node("Conv", ["s", "head"], ["y"])]
    out_ch = channels // 4 if op == "DepthToSpace" else channels * 4
    graph = helper.make_graph(nodes, "ps", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 4, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3, None, None])],
                              [w("conv", channels, 3, 1, 1), w("head", 3, out_ch, 1, 1, seed=1)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    x = np.random.default_rng(10).standard_normal((2, 3, 4, 6)).astype(np.float32)
    rewritten_agrees(model, x, op)
    info, moved = train_step(model, {"x": x}, "y", tmp_path)  # no gradient builder for either op
    assert sorted(moved) == ["conv", "head"]
