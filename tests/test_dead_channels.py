"""Dead channels (nothing reads them) removed exactly, quantization specs trimmed with them."""
import numpy as np
import onnx
from onnx import numpy_helper

from admm_onnx.models import build
from admm_onnx.quantization import QuantSpec, dequantize, fit_levels, mark_model, model_quantization
from admm_onnx.structured.dead import dead_channels, remove_dead_channels


def _lenet_with_dead_units():
    model = build("lenet5", input_shape=(1, 28, 28), num_classes=10, seed=0)
    rng = np.random.default_rng(0)
    specs = {}
    for t in model.graph.initializer:
        w = numpy_helper.to_array(t).copy()
        if t.name == "fc2.weight":
            w[:, rng.permutation(500)[:380]] = 0  # 380 fc1 units read by nothing
        if t.name == "conv2.weight":
            w[:, :, :, :] *= rng.random(w.shape) > 0.5
        if t.name == "fc1.weight":
            w[:, :16 * 7] = 0  # conv2 channels 0..6 (16 positions each after Flatten) read by nothing
        if w.ndim > 1:
            axis = 0 if t.name != "fc2.weight" else None
            q, s = fit_levels(w, 4, axis, keep=w != 0)
            w = dequantize(q, s, axis)
            specs[t.name] = QuantSpec(4, tuple(map(float, s)), axis)
        t.CopyFrom(numpy_helper.from_array(w.astype(np.float32), t.name))
    mark_model(model, specs)
    return model


def test_dead_units_and_channels_removed_with_the_same_outputs():
    import onnxruntime as ort

    model = _lenet_with_dead_units()
    before = model.SerializeToString()
    keep, removed = dead_channels(model)
    assert sorted(removed.values()) == [7, 380]
    out, removed2 = remove_dead_channels(model)
    assert removed2 == removed and model.SerializeToString() == before
    dims = {t.name: tuple(t.dims) for t in out.graph.initializer}
    assert dims["fc1.weight"] == (120, 16 * 43) and dims["fc1.bias"] == (120,) and dims["fc2.weight"] == (10, 120)
    assert dims["conv2.weight"][0] == 43 and dims["conv2.bias"] == (43,)
    x = np.random.default_rng(1).random((5, 1, 28, 28)).astype(np.float32)
    a = ort.InferenceSession(before, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    b = ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * np.abs(a).max())
    specs = model_quantization(out)  # still exactly on their levels, scales of removed channels gone
    assert set(specs) == {"conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"}
    assert len(specs["fc1.weight"].scale) == 120 and len(specs["conv2.weight"].scale) == 43
    assert len(specs["fc2.weight"].scale) == 1


def test_nothing_dead_nothing_changed():
    model = build("lenet5", input_shape=(1, 28, 28), num_classes=10, seed=0)
    assert dead_channels(model) == ({}, {})
    out, removed = remove_dead_channels(model)
    assert removed == {} and out.SerializeToString() == model.SerializeToString()


def test_removal_reaches_a_fixed_point_through_a_chain():
    """fc1's dead units are the only readers of conv2 filters 0-2, which are the only readers of
    conv1 filter 0: one pass frees the units, the next the filters, the last conv1's filter."""
    import onnxruntime as ort

    model = build("lenet5", input_shape=(1, 28, 28), num_classes=10, seed=0)
    dead_units = np.arange(400)
    w = {t.name: numpy_helper.to_array(t).copy() for t in model.graph.initializer}
    w["fc2.weight"][:, dead_units] = 0
    live = np.setdiff1d(np.arange(500), dead_units)
    w["fc1.weight"][np.ix_(live, np.arange(3 * 16))] = 0  # conv2 filters 0-2 read only by dead units
    w["conv2.weight"][3:, 0] = 0  # conv1 filter 0 read only by conv2 filters 0-2
    for t in model.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(w[t.name], t.name))
    assert sorted(dead_channels(model)[1].values()) == [400]  # one pass sees only the units
    out, removed = remove_dead_channels(model)
    assert sorted(removed.values()) == [1, 3, 400]
    assert dead_channels(out) == ({}, {})
    dims = {t.name: tuple(t.dims) for t in out.graph.initializer}
    assert dims["conv1.weight"][0] == 19 and dims["conv2.weight"][:2] == (47, 19)
    assert dims["fc1.weight"] == (100, 16 * 47)
    x = np.random.default_rng(2).random((4, 1, 28, 28)).astype(np.float32)
    a = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    b = ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * np.abs(a).max())


def test_cli_export_removes_dead_channels_on_request(tmp_path, capsys):
    """Without the flag, export only says how many channels are dead; with it the packed file is
    smaller and computes what the pruned model does (to float rounding); with --quantization
    (specs that still have the removed channels' scales) it refuses."""
    import onnxruntime as ort

    from admm_onnx.cli.main import main

    model = _lenet_with_dead_units()
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    before = src.read_bytes()
    plain, slim = tmp_path / "plain.onnx", tmp_path / "slim.onnx"
    assert main(["export", str(src), "-o", str(plain), "--format", "packed"]) == 0
    assert "at least 387 channel(s) no weight reads" in capsys.readouterr().out
    assert main(["export", str(src), "-o", str(slim), "--format", "packed", "--remove-dead-channels"]) == 0
    assert "removed dead channels: conv2 7, fc1 380" in capsys.readouterr().out
    assert src.read_bytes() == before
    assert slim.stat().st_size < 0.8 * plain.stat().st_size
    x = np.random.default_rng(3).random((4, 1, 28, 28)).astype(np.float32)
    run = lambda p: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]  # noqa: E731
    a, b = run(src), run(slim)
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * np.abs(a).max())
    report = tmp_path / "r.json"
    report.write_text("{}")
    out = tmp_path / "x.onnx"
    assert main(["export", str(src), "-o", str(out), "--format", "packed", "--remove-dead-channels",
                 "--quantization", str(report)]) == 2
    assert "drop --quantization" in capsys.readouterr().err and not out.exists()
