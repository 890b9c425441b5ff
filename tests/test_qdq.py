"""The int8 QDQ export: trained levels kept bit for bit, integer kernels in the newest onnxruntime."""
import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from admm_onnx import formats
from admm_onnx.errors import ConfigError, ModelError
from admm_onnx.formats.qdq import activation_params
from admm_onnx.models import build
from admm_onnx.quantization import QuantSpec, dequantize, fit_levels, mark_model

#: Float compute ops that must not remain in the graph onnxruntime runs for a QDQ LeNet-5.
FLOAT_COMPUTE = {"Conv", "Gemm", "FusedGemm", "MatMul", "FusedConv"}


def _quantized_lenet(seed=0):
    """LeNet-5 (28x28) whose conv and fc1 weights sit on trained-style levels (recorded in the
    model as prune records them) and whose fc2 stays float (quantized post-training by qdq)."""
    model = build("lenet5", input_shape=(1, 28, 28), num_classes=10, seed=seed)
    specs = {}
    for t in model.graph.initializer:
        if t.name in ("conv1.weight", "conv2.weight", "fc1.weight"):
            w = numpy_helper.to_array(t)
            bits, axis = (4, 0) if t.name != "fc1.weight" else (3, None)
            q, s = fit_levels(w, bits, axis)
            t.CopyFrom(numpy_helper.from_array(dequantize(q, s, axis), t.name))
            specs[t.name] = QuantSpec(bits, tuple(float(v) for v in s), axis)
    mark_model(model, specs)
    return model, specs


def _inputs(n=96, seed=1):
    rng = np.random.default_rng(seed)
    x = np.zeros((n, 1, 28, 28), np.float32)
    x[:, :, 4:24, 4:24] = rng.random((n, 1, 20, 20)).astype(np.float32)  # MNIST-like: [0, 1], dark border
    return x


def test_weights_are_the_trained_levels_bit_for_bit(deploy_env):
    model, specs = _quantized_lenet()
    trained = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    x = _inputs()
    q, report = formats.export(model, "qdq", calibration=x[:64])
    assert formats.detect(q).name == "qdq"
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    dq = {n.output[0]: n for n in q.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits}
    # Every trained weight is stored as int8 whose DequantizeLinear is the weight, computed by
    # the deployment runtime itself: expose the weights' DQ outputs as model outputs.
    probe = onnx.ModelProto()
    probe.CopyFrom(q)
    names = {}
    for out, node in dq.items():  # a weight's DequantizeLinear writes the weight's own name
        if out in specs:
            assert inits[node.input[0]].dtype == np.int8
            names[out] = out
            probe.graph.output.append(helper.make_empty_tensor_value_info(out))
    assert set(names) == set(specs)
    res = deploy_env.run({"qdq": probe}, {"input": x[:2]})
    got = dict(zip([o.name for o in probe.graph.output], res.outputs["qdq"]))
    for name, out in names.items():
        assert got[out].dtype == np.float32
        np.testing.assert_array_equal(got[out], trained[name])  # bitwise: float32 equality, zeros included
        assert np.array_equal(got[out].view(np.uint32), trained[name].view(np.uint32))
    decoded = formats.decode(q)
    back = {t.name: numpy_helper.to_array(t) for t in decoded.graph.initializer}
    for name in specs:
        assert np.array_equal(back[name].view(np.uint32), trained[name].view(np.uint32))
    rows = {r.name: r for r in report.rows}
    assert rows["conv1.weight"].storage == "int8" and rows["fc2.weight"].storage == "int8 (post-training)"
    # inspect: the QDQ file's int8 weights with the bits of their trained levels, ops as in the model
    shown = {r.name: r for r in formats.inspect_model(q)}
    assert shown["conv1.weight"].storage == "qdq-int8 (4-bit levels)" and shown["conv1.weight"].bits == 8
    assert shown["fc1.weight"].storage == "qdq-int8 (3-bit levels)" and shown["fc1.weight"].op == "Gemm"
    assert shown["fc2.weight"].storage == "qdq-int8"
    assert shown["conv2.weight"].stored_bytes < shown["conv2.weight"].dense_bytes / 3
    # and the float model it came from: dense storage, the levels' bits named
    plain = {r.name: r for r in formats.inspect_model(model)}
    assert plain["conv1.weight"].storage == "dense (4-bit levels)" and plain["fc2.weight"].storage == "dense"


def test_runs_with_integer_kernels_and_tracks_the_float_model(deploy_env, tmp_path):
    model, _ = _quantized_lenet()
    x = _inputs(160)
    q, _ = formats.export(model, "qdq", calibration=x[:96])
    reference = formats.decode(q)  # the float model with the same weights
    res = deploy_env.run({"float": reference, "qdq": q}, {"input": x[96:]}, optimized=True, workdir=tmp_path)
    ops = {n.op_type for n in onnx.load(str(res.optimized["qdq"])).graph.node}
    assert {"QLinearConv", "QGemm"} <= ops, ops
    assert not ops & FLOAT_COMPUTE, ops
    f, i8 = res.outputs["float"][0], res.outputs["qdq"][0]
    assert np.abs(f - i8).max() <= 0.05 * np.abs(f).max()
    assert (f.argmax(1) == i8.argmax(1)).mean() >= 0.9


def test_activation_ranges_and_errors():
    scale, zp = activation_params(0.0, 2.55, "int8")
    assert zp == -128 and scale == pytest.approx(0.01)
    scale, zp = activation_params(-1.0, 1.0, "uint8")
    assert zp == 128 and scale == pytest.approx(2 / 255)
    model, _ = _quantized_lenet()
    with pytest.raises(ConfigError, match="calibration"):
        formats.export(model, "qdq")
    with pytest.raises(ConfigError, match="activations"):
        formats.export(model, "qdq", calibration=_inputs(4), activations="int4")
    old = onnx.ModelProto()
    old.CopyFrom(model)
    old.opset_import[0].version = 12
    with pytest.raises(ModelError, match="opset"):
        formats.export(old, "qdq", calibration=_inputs(4))
    before = model.SerializeToString()
    formats.export(model, "qdq", calibration=_inputs(8))
    assert model.SerializeToString() == before  # the input is never modified
    assert not formats.get("qdq").exact and formats.get("dense").exact


def test_cli_export_qdq_needs_data_and_inspect_shows_it(tmp_path, capsys):
    from admm_onnx.cli.main import main

    model, _ = _quantized_lenet()
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    out = tmp_path / "m.qdq.onnx"
    assert main(["export", str(src), "-o", str(out), "--format", "qdq"]) == 2
    assert "needs calibration data" in capsys.readouterr().err and not out.exists()
    assert main(["export", str(src), "-o", str(out), "--format", "csr", "-d", "digits"]) == 2
    data = tmp_path / "calib.npz"  # x/y arrays like prune's -d FILE.npz
    np.savez(data, x_train=_inputs(80), y_train=np.zeros(80, np.int64), x_test=_inputs(8), y_test=np.zeros(8, np.int64))
    assert main(["export", str(src), "-o", str(out), "--format", "qdq", "-d", str(data),
                 "--calibration-samples", "64"]) == 0
    assert formats.detect(onnx.load(str(out))).name == "qdq"
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "qdq-int8 (4-bit levels)" in text and "qdq-int8 (3-bit levels)" in text



def test_residual_network_batchnorm_folded_levels_kept_all_convs_fused(deploy_env, tmp_path):
    """ResNet-20: BatchNormalization folded into its Conv (a quantized weight keeps its integers,
    the scale absorbs the BN factor), residual Adds and the pooling run as int8 kernels."""
    model = build("resnet20", input_shape=(3, 32, 32), num_classes=10, seed=0)
    rng = np.random.default_rng(0)
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "BatchNormalization":  # trained-looking statistics
            for name, lo, hi in zip(node.input[1:5], (0.5, -0.2, -0.3, 0.5), (1.5, 0.2, 0.3, 2.0)):
                shape = tuple(inits[name].dims)
                inits[name].CopyFrom(numpy_helper.from_array(rng.uniform(lo, hi, shape).astype(np.float32), name))
    name = "layer1.0.conv1.weight"
    w = numpy_helper.to_array(inits[name])
    q, s = fit_levels(w, 4, 0)
    inits[name].CopyFrom(numpy_helper.from_array(dequantize(q, s, 0), name))
    mark_model(model, {name: QuantSpec(4, tuple(map(float, s)), 0)})
    x = np.random.default_rng(1).random((40, 3, 32, 32)).astype(np.float32)
    out, _ = formats.export(model, "qdq", calibration=x[:32])
    stored = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    np.testing.assert_array_equal(stored[name + "/bn_folded/int8"], q.astype(np.int8))  # the trained integers
    assert not any(n.op_type == "BatchNormalization" for n in out.graph.node)
    res = deploy_env.run({"float": model, "qdq": out}, {"input": x[32:]}, optimized=True, workdir=tmp_path)
    ops = [n.op_type for n in onnx.load(str(res.optimized["qdq"])).graph.node]
    assert {"QLinearConv", "QLinearAdd", "QLinearGlobalAveragePool", "QGemm"} <= set(ops)
    assert not set(ops) & (FLOAT_COMPUTE | {"Add", "BatchNormalization"}), sorted(set(ops))
    f, i8 = res.outputs["float"][0], res.outputs["qdq"][0]
    assert np.abs(f - i8).max() <= 0.1 * np.abs(f).max()


def _conv_bn_pairs(names, shared: bool, gamma_sign: float = 1.0, bits: bool = False):
    """x -> Conv(w_i) -> BatchNorm_i -> y_i for each name (one weight for all when ``shared``)."""
    from onnx import TensorProto

    rng = np.random.default_rng(0)
    inits, nodes, outputs, specs = [], [], [], {}
    for k, name in enumerate(names):
        w_name = names[0] if shared else name
        if not shared or k == 0:
            w = rng.standard_normal((4, 2, 3, 3)).astype(np.float32)
            if bits:
                q, s = fit_levels(w, 4, 0)
                w = dequantize(q, s, 0)
                specs[w_name] = QuantSpec(4, tuple(map(float, s)), 0)
            inits.append(numpy_helper.from_array(w, w_name))
        g = (gamma_sign * rng.uniform(0.5, 1.5, 4)).astype(np.float32)
        bn = [numpy_helper.from_array(v.astype(np.float32), f"{name}.bn.{p}") for p, v in
              zip(("g", "b", "m", "v"), (g, rng.uniform(-1, 1, 4), rng.uniform(-1, 1, 4), rng.uniform(0.5, 2, 4)))]
        inits += bn
        nodes += [helper.make_node("Conv", ["x", w_name], [f"c{k}"], pads=[1, 1, 1, 1]),
                  helper.make_node("BatchNormalization", [f"c{k}"] + [t.name for t in bn], [f"y{k}"])]
        outputs.append(helper.make_tensor_value_info(f"y{k}", TensorProto.FLOAT, ["N", 4, 6, 6]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 6, 6])],
                              outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    if specs:
        mark_model(model, specs)
    return model


@pytest.mark.parametrize("names, shared, sign, bits", [
    (("w", "w"), True, 1.0, False),  # one weight, two Conv+BN pairs: each Conv keeps its own BN's values
    (("enc.w1", "enc.w2"), False, 1.0, False),  # names alike up to the last dot: biases used to collide
    (("w",), False, -1.0, True),  # negative gamma on trained levels: integers flip, scales stay positive
])
def test_batchnorm_folding_keeps_every_conv_its_own_values(names, shared, sign, bits):
    import onnxruntime as ort

    from admm_onnx import training

    training.flush_denormals()  # as admm-onnx does before its first session (else a later test sees its warning)

    model = _conv_bn_pairs(names, shared, sign, bits)
    x = np.random.default_rng(1).random((40, 2, 6, 6)).astype(np.float32)
    out, _ = formats.export(model, "qdq", calibration=x[:32])
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(  # noqa: E731
        None, {"x": x[32:]})
    for f, q in zip(run(model), run(out)):
        assert np.abs(f - q).max() <= 0.05 * np.abs(f).max()


def test_densify_keeps_the_weights_an_if_branch_reads(tmp_path):
    """decode_qdq dropped initializers only a subgraph read (an If branch's outer-scope weight),
    writing an invalid model."""
    from onnx import TensorProto, helper, numpy_helper

    from admm_onnx.formats.qdq import decode_qdq, quantize_qdq

    rng = np.random.default_rng(0)
    v = helper.make_tensor_value_info
    then_g = helper.make_graph([helper.make_node("MatMul", ["h", "wt"], ["o_t"])], "then", [], [v("o_t", TensorProto.FLOAT, None)])
    else_g = helper.make_graph([helper.make_node("MatMul", ["h", "we"], ["o_e"])], "else", [], [v("o_e", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("ReduceSum", ["x"], ["sx"], keepdims=0),
             helper.make_node("Greater", ["sx", "zero"], ["cond"]),
             helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)]
    inits = [numpy_helper.from_array((rng.standard_normal(s) * .3).astype(np.float32), n)
             for n, s in [("w1", (8, 16)), ("wt", (16, 4)), ("we", (16, 4))]]
    inits.append(numpy_helper.from_array(np.array(-1e9, np.float32), "zero"))
    model = helper.make_model(helper.make_graph(nodes, "g", [v("x", TensorProto.FLOAT, ["N", 8])],
                                                [v("y", TensorProto.FLOAT, ["N", 4])], inits),
                              opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    qdq, _ = quantize_qdq(model, rng.standard_normal((32, 8)).astype(np.float32))
    dense = decode_qdq(qdq)
    onnx.checker.check_model(dense, full_check=True)
    assert {"wt", "we"} <= {t.name for t in dense.graph.initializer}


def test_half_precision_refusal_names_the_real_type(tmp_path, capsys):
    """Sweep 6 #11b: a bfloat16 weight was reported as 'float16'."""
    from onnx import TensorProto

    from admm_onnx.cli.main import main

    rng = np.random.default_rng(0)
    vi = helper.make_tensor_value_info
    w1 = helper.make_tensor("w1", TensorProto.BFLOAT16, [8, 16], (rng.standard_normal(128) * 0.3).astype(np.float32).tolist())
    w3 = helper.make_tensor("w3", TensorProto.FLOAT16, [4, 4], np.ones(16, np.float16).view(np.uint16).tolist())
    nodes = [helper.make_node("Cast", ["x"], ["xb"], to=TensorProto.BFLOAT16), helper.make_node("MatMul", ["xb", "w1"], ["h"]),
             helper.make_node("Cast", ["h"], ["hf"], to=TensorProto.FLOAT), helper.make_node("MatMul", ["hf", "w2"], ["l"]),
             helper.make_node("Cast", ["l"], ["lh"], to=TensorProto.FLOAT16), helper.make_node("MatMul", ["lh", "w3"], ["lo"]),
             helper.make_node("Cast", ["lo"], ["logits"], to=TensorProto.FLOAT)]
    graph = helper.make_graph(nodes, "g", [vi("x", TensorProto.FLOAT, ["N", 8])], [vi("logits", TensorProto.FLOAT, ["N", 4])],
                              [w1, numpy_helper.from_array(np.ones((16, 4), np.float32), "w2"), w3])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    calib = {"x": rng.standard_normal((8, 8)).astype(np.float32)}
    with pytest.raises(ConfigError, match=r"holds bfloat16 \(w1\) and float16 \(w3\)$"):
        formats.export(model, "qdq", calibration=calib)
    bf16 = helper.make_model(helper.make_graph(nodes[:4], "g", [vi("x", TensorProto.FLOAT, ["N", 8])],
                                               [vi("l", TensorProto.FLOAT, ["N", 4])], list(graph.initializer)[:2]),
                             opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(bf16, tmp_path / "bf16.onnx")
    np.savez(tmp_path / "d.npz", x=calib["x"], labels=np.zeros(8, np.int64))
    capsys.readouterr()
    assert main(["export", str(tmp_path / "bf16.onnx"), "-o", str(tmp_path / "q.onnx"), "--format", "qdq",
                 "-d", str(tmp_path / "d.npz")]) == 2
    err = capsys.readouterr().err
    assert "holds bfloat16 (w1)" in err and "float16 (" not in err.replace("bfloat16 (", "") and not (tmp_path / "q.onnx").exists()
