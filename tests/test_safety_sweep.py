"""Safety probes found by an adversarial sweep on 2026-12-05 (inputs the earlier probes missed).

Same harness as tests/test_safety_probes.py (``Room.probe``): exit 2, exactly one ``error:``
line without C++ paths, every file byte-identical afterwards, nothing left behind. A second
group checks inputs that used to be mishandled and now work.
"""
from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from admm_onnx.cli.main import main
from admm_onnx.io import FOLDER_MARK
from test_safety_probes import QUICK, room  # noqa: F401  (the harness and its fixture)

PRUNE = ["prune", "@/m.onnx", "-d", "@/d.npz", "-o", "@/o.onnx", *QUICK]


def _runtime_failing_model(r):
    """Valid ONNX that fails inside onnxruntime at run time (a Reshape to a size the data has not)."""
    m = onnx.load(r / "m.onnx")
    g = m.graph
    g.initializer.append(numpy_helper.from_array(np.array([0, 0, 8, 8], np.int64), "bad"))
    g.node.insert(0, helper.make_node("Shape", ["input"], ["shp"]))
    g.node.insert(1, helper.make_node("Add", ["shp", "bad"], ["shp2"]))
    g.node.insert(2, helper.make_node("Reshape", ["input", "shp2"], ["inr"]))
    g.node[3].input[0] = "inr"
    onnx.save(m, r / "x.onnx")


def _config(text):
    return lambda r: (r / "k.toml").write_text("sparsity = 0.5\n" + text)


def _labels(value):
    def setup(r):
        x = np.random.default_rng(0).standard_normal((100, 1, 8, 8)).astype(np.float32)
        y = np.random.default_rng(1).integers(0, 4, 100).astype(np.float64)
        y[3] = value
        np.savez(r / "bad.npz", x_train=x, y_train=y)
    return setup


def _quantized(r, tamper):
    """A 4-bit pruned model (q.onnx) and its report with ``tamper`` applied (qq.json)."""
    assert main(r.argv(["prune", "@/m.onnx", "-d", "@/d.npz", "-o", "@/q.onnx", "--sparsity", "0.5", "--bits", "4",
                        *QUICK, "--report", "@/q.json"])) == 0
    report = json.loads((r / "q.json").read_text())
    tamper(report)
    (r / "qq.json").write_text(json.dumps(report))


def _zero_scale(report):
    spec = report["quantization"]["fc1.weight"]
    spec["scale"] = [0.0] * len(spec["scale"])


def _nan_weight(r):
    m = onnx.load(r / "m.onnx")
    t = m.graph.initializer[0]
    a = numpy_helper.to_array(t).copy()
    a[0, 0] = np.nan
    t.CopyFrom(numpy_helper.from_array(a, t.name))
    onnx.save(m, r / "nan.onnx")


def _bool_input(r):
    m = onnx.load(r / "m.onnx")
    m.graph.input[0].type.tensor_type.elem_type = TensorProto.BOOL
    m.graph.node.insert(0, helper.make_node("Cast", ["input"], ["input_f"], to=TensorProto.FLOAT))
    for n in m.graph.node[1:]:
        n.input[:] = ["input_f" if x == "input" else x for x in n.input]
    onnx.save(m, r / "b.onnx")


def _nothing(r):
    return None


PROBES = [
    ("ort-runtime-failure-eval", _runtime_failing_model, ["eval", "@/x.onnx", "-d", "@/d.npz"], "cannot run the model"),
    ("ort-runtime-failure-prune", _runtime_failing_model,
     ["prune", "@/x.onnx", "-d", "@/d.npz", "-o", "@/o.onnx", "--sparsity", "0.5", *QUICK], "cannot run the model"),
    ("distill-weight-text", _config('distill_weight = "abc"\n'), PRUNE + ["--config", "@/k.toml"], "distill_weight"),
    ("distill-weight-bool", _config("distill_weight = true\n"), PRUNE + ["--config", "@/k.toml"], "distill_weight"),
    ("class-axis-batch", _config("class_axis = 0\n"), PRUNE + ["--config", "@/k.toml"], "batch axis"),
    ("temperature-huge", _config('temperature = 1e308\nloss = "distill"\n'), PRUNE + ["--config", "@/k.toml"],
     "temperature"),
    ("temperature-tiny", _nothing, PRUNE + ["--sparsity", "0.5", "--temperature", "1e-300", "--loss", "distill"],
     "temperature"),
    ("rho-growth-huge", _nothing, PRUNE + ["--sparsity", "0.5", "--rho-mode", "growth", "--rho-growth", "1e300"],
     "rho_growth"),
    ("rho-huge", _nothing, PRUNE + ["--sparsity", "0.5", "--rho", "1e300"], "rho"),
    ("labels-inf", _labels(np.inf), ["prune", "@/m.onnx", "-d", "@/bad.npz", "-o", "@/o.onnx", "--sparsity", "0.5",
                                     *QUICK], "labels"),
    ("labels-1e30", _labels(1e30), ["prune", "@/m.onnx", "-d", "@/bad.npz", "-o", "@/o.onnx", "--sparsity", "0.5",
                                    *QUICK], "labels"),
    ("sensitivity-level-tiny", _nothing, ["sensitivity", "@/m.onnx", "-d", "@/d.npz", "--no-cache", "--workers", "1",
                                          "--samples", "20", "--levels", "1e-30", "-q"], "levels"),
    ("sensitivity-seed-negative", _nothing, ["sensitivity", "@/m.onnx", "-d", "@/d.npz", "--no-cache", "--seed", "-1"],
     "--seed"),
    ("quantization-list", lambda r: _quantized(r, lambda d: d.update(quantization=[1, 2])),
     ["export", "@/q.onnx", "-o", "@/p.onnx", "--format", "packed", "--quantization", "@/qq.json"], "quantization"),
    ("quantization-zero-scale", lambda r: _quantized(r, _zero_scale),
     ["export", "@/q.onnx", "-o", "@/p.onnx", "--format", "packed", "--quantization", "@/qq.json"], "scales"),
    ("quantization-no-specs", lambda r: _quantized(r, lambda d: d.pop("quantization")),
     ["export", "@/q.onnx", "-o", "@/p.onnx", "--format", "packed", "--quantization", "@/qq.json"], "no quantization"),
    ("qdq-nan-weight", _nan_weight, ["export", "@/nan.onnx", "-o", "@/p.onnx", "--format", "qdq", "-d", "@/d.npz"],
     "NaN"),
    ("sparse-output-bits-only", _nothing, PRUNE + ["--bits", "4", "--sparse-output", "@/s.onnx"], "--sparse-output"),
    ("sparse-output-too-little", _nothing, PRUNE + ["--sparsity", "0.3", "--sparse-output", "@/s.onnx"],
     "--sparse-output"),
    ("sparse-output-channels", _nothing, PRUNE + ["--sparsity", "0.5", "--structure", "channel",
                                                  "--sparse-output", "@/s.onnx"], "--sparse-output"),
    ("log-file-is-the-output", _nothing, ["--log-file", "@/o.onnx"] + PRUNE + ["--sparsity", "0.5"], "--log-file"),
    ("log-file-is-the-report", _nothing, ["--log-file", "@/r.json"] + PRUNE + ["--sparsity", "0.5", "--report",
                                                                               "@/r.json"], "--log-file"),
    ("bool-input-float-data", _bool_input, ["eval", "@/b.onnx", "-d", "@/d.npz"], "bool"),
    ("output-empty", _nothing, ["prune", "@/m.onnx", "-d", "@/d.npz", "-o", "", "--sparsity", "0.5", *QUICK], "empty"),
    ("output-folder-slash", _nothing, ["prune", "@/m.onnx", "-d", "@/d.npz", "-o", "@/o.onnx/", "--sparsity", "0.5",
                                       *QUICK], "names a folder"),
    ("round-to-zero", _nothing, PRUNE + ["--sparsity", "0.5", "--structure", "channel", "--round-to", "0"],
     "--round-to"),
    ("round-to-above-every-group", _nothing, PRUNE + ["--sparsity", "0.5", "--structure", "channel", "--round-to",
                                                      "4096"], "no channel would be removed"),
    ("workdir-not-utf8", _nothing, PRUNE + ["--sparsity", "0.5", "--workdir", "@/wd" + os.fsdecode(b"\xff")],
     "UTF-8"),
    ("log-file-in-the-workdir", lambda r: (r / "wd").mkdir(),
     ["--log-file", "@/wd/my.log"] + PRUNE + ["--sparsity", "0.5", "--workdir", "@/wd"], "--log-file"),
    ("channel-with-bits", _nothing, PRUNE + ["--sparsity", "0.5", "--structure", "channel", "--bits", "4"], "--bits"),
    ("channel-with-config-rules", _config('[[rules]]\nnames = ["fc1.weight"]\nexclude = true\n'),
     PRUNE + ["--sparsity", "0.5", "--structure", "channel", "--config", "@/k.toml"], "rules"),
    ("rule-names-empty", lambda r: (r / "k.toml").write_text('[[rules]]\nnames = []\nsparsity = 0.9\n'),
     PRUNE + ["--config", "@/k.toml"], "names is empty"),
    ("inspect-plot-names-its-option", _nothing, ["inspect", "@/m.onnx", "--plot", "@/nope/p.svg"], "--plot"),
]


# -- inputs that used to fail and now work ----------------------------------------------------


def test_eval_and_prune_read_a_packed_file_of_a_quantized_model(room, capsys):  # noqa: F811
    """The file's float16 scales are not float16 compute: the encoded weights are decoded first."""
    assert main(room.argv(["prune", "@/m.onnx", "-d", "@/d.npz", "-o", "@/q.onnx", "--sparsity", "0.5", "--bits", "4",
                           *QUICK])) == 0
    assert main(room.argv(["export", "@/q.onnx", "-o", "@/p.onnx", "--format", "packed"])) == 0
    capsys.readouterr()
    assert main(room.argv(["eval", "@/p.onnx", "-d", "@/d.npz", "--json"])) == 0
    packed = json.loads(capsys.readouterr().out)
    assert main(room.argv(["eval", "@/q.onnx", "-d", "@/d.npz", "--json"])) == 0
    assert json.loads(capsys.readouterr().out) == packed  # bit-exact weights: the same figures


def test_a_long_valid_output_name_is_written(room, capsys):  # noqa: F811
    name = "a" * 240 + ".onnx"  # the temporary name beside it used to pass 255 bytes
    assert main(room.argv(["export", "@/m.onnx", "-o", f"@/{name}", "--min-sparsity", "0"])) == 0
    assert (room / name).is_file()


def test_export_lowers_an_ir_11_model_that_uses_nothing_newer(room, capsys):  # noqa: F811
    m = onnx.load(room / "m.onnx")
    m.ir_version = 11
    onnx.save(m, room / "ir11.onnx")
    assert main(room.argv(["export", "@/ir11.onnx", "-o", "@/e.onnx", "--min-sparsity", "0"])) == 0
    assert onnx.load(room / "e.onnx").ir_version <= 10


def test_sensitivity_kl_takes_unlabeled_data(room, capsys):  # noqa: F811
    np.savez(room / "u.npz", input=np.random.default_rng(0).random((50, 1, 8, 8)).astype(np.float32))
    assert main(room.argv(["sensitivity", "@/m.onnx", "-d", "@/u.npz", "--metric", "kl", "--no-cache", "--workers",
                           "1", "--samples", "20", "--levels", "0.5", "-q"])) == 0


def test_a_weight_read_inside_an_if_branch_blocks_its_channels():
    from admm_onnx.structured.analysis import analyse

    rng = np.random.default_rng(0)
    w0 = numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "W0")
    w = numpy_helper.from_array(rng.standard_normal((64, 4)).astype(np.float32), "W")
    out = helper.make_tensor_value_info("t", TensorProto.FLOAT, [None, 4])
    then = helper.make_graph([helper.make_node("MatMul", ["h", "W"], ["t"])], "then", [], [out])
    other = helper.make_graph([helper.make_node("MatMul", ["h", "W"], ["t"])], "else", [], [out])
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W0"], ["h0"]), helper.make_node("Relu", ["h0"], ["h"]),
         helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])],
        [w0, w, numpy_helper.from_array(np.array(True), "c")])
    analysis = analyse(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert not analysis.prunable
    reasons = [r for g in analysis.groups for r in g.blocked]
    assert any("subgraph of If" in r for r in reasons), reasons


def test_fp16_values_keep_biases_outside_float16_range_in_float32():
    from admm_onnx import formats

    rng = np.random.default_rng(0)
    w = rng.standard_normal((32, 32)).astype(np.float32)
    w[rng.random(w.shape) < 0.8] = 0
    b = np.full(32, 1e6, np.float32)  # beyond float16's 65,504
    graph = helper.make_graph([helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    out, report = formats.export(model, "packed", values="fp16")
    assert report.float16 == [] and all(t.data_type != TensorProto.FLOAT16 for t in out.graph.initializer)


# -- a second sweep (2026-12-05) ------------------------------------------------------------------


def _zero_stride(r):
    m = onnx.load(r / "m.onnx")
    m.graph.node.insert(0, helper.make_node("MaxPool", ["input"], ["pooled"], kernel_shape=[1, 1], strides=[0, 0]))
    for n in m.graph.node[1:]:
        n.input[:] = ["pooled" if x == "input" else x for x in n.input]
    onnx.save(m, r / "z.onnx")


def _damaged_quant_record(r):
    assert main(r.argv(["prune", "@/m.onnx", "-d", "@/d.npz", "-o", "@/q.onnx", "--sparsity", "0.5", "--bits", "4",
                        *QUICK])) == 0
    m = onnx.load(r / "q.onnx")
    for p in m.metadata_props:
        if p.key == "admm_onnx.quantization":
            p.value = "{bad json"
    onnx.save(m, r / "qd.onnx")


def _nan_scale_packed(r):
    assert main(r.argv(["prune", "@/m.onnx", "-d", "@/d.npz", "-o", "@/q.onnx", "--sparsity", "0.5", "--bits", "4",
                        *QUICK])) == 0
    assert main(r.argv(["export", "@/q.onnx", "-o", "@/p.onnx", "--format", "packed"])) == 0
    m = onnx.load(r / "p.onnx")
    call = next(n for n in m.graph.node if n.domain == "admm.pk")
    for t in m.graph.initializer:
        if t.name == call.input[1]:
            a = numpy_helper.to_array(t).copy()
            a[...] = np.nan
            t.CopyFrom(numpy_helper.from_array(a, t.name))
    onnx.save(m, r / "pn.onnx")


def _nan_report(r):
    (r / "rep.json").write_text(json.dumps({"layers": [{"name": "w", "kept_percent": float("nan"), "weights": 10,
                                                        "nonzero": 5}], "total": {}}))


def _tampered_csr(change):
    def setup(r):
        assert main(r.argv(["export", "@/m.onnx", "-o", "@/c.onnx", "--min-sparsity", "0"])) == 0
        m = onnx.load(r / "c.onnx")
        for t in m.graph.initializer:
            out = change(t.name, numpy_helper.to_array(t))
            if out is not None:
                t.CopyFrom(numpy_helper.from_array(out, t.name))
        onnx.save(m, r / "ct.onnx")
    return setup


def _huge_csr_shape(name, a):
    return np.array([20000, 20000], np.int64) if name.endswith(".csr_shape") else None


def _negative_csr_index(name, a):
    if name.endswith(".csr_indices"):
        a = a.astype(np.int64).copy()
        a[0] = -1
        return a.astype(np.int64)
    return None


SECOND_OPTIONS = [
    ("budget-with-bits", PRUNE + ["--compression", "4x", "--bits", "4"], "--bits with a budget"),
    ("cache-and-no-cache", ["sensitivity", "@/m.onnx", "-d", "@/d.npz", "--cache", "@/cc", "--no-cache"],
     "exclude each other"),
]


@pytest.mark.parametrize("label,argv,expect", SECOND_OPTIONS, ids=[p[0] for p in SECOND_OPTIONS])
def test_second_sweep_option_clashes(room, label, argv, expect):  # noqa: F811
    room.probe(argv, expect, label)


SECOND = [
    ("csr-shape-tampered", _tampered_csr(_huge_csr_shape), ["eval", "@/ct.onnx", "-d", "@/d.npz"], "does not match"),
    ("csr-negative-index", _tampered_csr(_negative_csr_index), ["densify", "@/ct.onnx", "-o", "@/dd.onnx"],
     "negative"),
    ("zero-stride-inspect", _zero_stride, ["inspect", "@/z.onnx"], "strides"),
    ("zero-stride-eval", _zero_stride, ["eval", "@/z.onnx", "-d", "@/d.npz"], "strides"),
    ("damaged-quantization-record", _damaged_quant_record, ["export", "@/qd.onnx", "-o", "@/e.onnx", "--format",
                                                            "packed"], "quantization record"),
    ("packed-nan-scales", _nan_scale_packed, ["densify", "@/pn.onnx", "-o", "@/dd.onnx"], "damaged"),
    ("plot-nan-report", _nan_report, ["plot", "@/rep.json", "-o", "@/p.svg"], "cannot be drawn"),
]


@pytest.mark.parametrize("label,setup,argv,expect", PROBES + SECOND, ids=[p[0] for p in PROBES + SECOND])
def test_swept_inputs_are_one_clean_error(room, label, setup, argv, expect):  # noqa: F811
    setup(room)
    room.probe(argv, expect, label)


def test_resume_refuses_other_training_data(room, capsys):  # noqa: F811
    argv = ["prune", "@/m.onnx", "-d", "@/d.npz", "-o", "@/o.onnx", "--sparsity", "0.5", *QUICK, "--keep-workdir"]
    assert main(room.argv(argv)) == 0
    (room / "o.onnx").unlink()
    other = dict(np.load(room / "d.npz"))
    other["x_train"] = other["x_train"] + 1.0
    np.savez(room / "d.npz", **other)  # the same path, other content
    room.probe([a for a in argv if a != "--keep-workdir"] + ["--resume"], "different training data")


def test_a_failed_run_puts_back_the_output_folder_files_it_replaced(tmp_path):
    from admm_onnx.io import claim_output_folder

    with claim_output_folder(tmp_path, ["a.onnx", "b.json"]) as folder:  # an earlier run wrote a.onnx
        (folder / "a.onnx").write_text("earlier a")
    with pytest.raises(KeyboardInterrupt):
        with claim_output_folder(tmp_path, ["a.onnx", "b.json"]) as folder:
            (folder / "a.onnx").write_text("half")
            (folder / "b.json").write_text("half")
            raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == [FOLDER_MARK, "a.onnx"]
    assert (tmp_path / "a.onnx").read_text() == "earlier a"
    with claim_output_folder(tmp_path, ["a.onnx"]) as folder:  # success: replaced, no backup left
        (folder / "a.onnx").write_text("new a")
    assert sorted(p.name for p in tmp_path.iterdir()) == [FOLDER_MARK, "a.onnx"]
    assert (tmp_path / "a.onnx").read_text() == "new a"


def test_eval_reads_a_small_npz_keyed_by_input_name(room, capsys):  # noqa: F811
    rng = np.random.default_rng(0)
    np.savez(room / "k.npz", input=rng.standard_normal((100, 1, 8, 8)).astype(np.float32),
             labels=rng.integers(0, 4, 100))
    assert main(room.argv(["eval", "@/m.onnx", "-d", "@/k.npz"])) == 0


def test_api_checks_window_attributes_of_a_model_proto(room):  # noqa: F811
    """A ModelProto given to the Python API gets the check load_model gives a file (a stride of 0
    crashes onnxruntime's shape code with SIGFPE)."""
    from admm_onnx.errors import ModelError
    from admm_onnx.pipeline import prepare_model

    _zero_stride(room.root)
    model = onnx.load(room.root / "z.onnx")
    before = model.SerializeToString()
    with pytest.raises(ModelError, match="strides"):
        prepare_model(model)
    assert model.SerializeToString() == before


@pytest.mark.parametrize("raw, expected", [
    ("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code returned while running Conv node. Name:'c' "
     "Status Message: /onnxruntime_src/onnxruntime/core/framework/op_kernel.cc:83 virtual OrtValue* "
     "onnxruntime::OpKernelContext::OutputMPtr(int, const onnxruntime::TensorShape&) status.IsOK() was false. "
     "Shape mismatch attempting to re-use buffer.",
     "Non-zero status code returned while running Conv node. Name:'c' Status Message: Shape mismatch attempting to "
     "re-use buffer."),
    ("the virtual machine was false positive", "the virtual machine was false positive"),  # plain words stay
])
def test_onnxruntime_messages_lose_their_cpp_remnants(raw, expected):
    from admm_onnx.errors import clean_message

    assert clean_message(raw) == expected


# -- an interrupt or a failure while the outputs are written (2026-12-05, third session) ------------


@pytest.mark.parametrize("failure", [KeyboardInterrupt, OSError(28, "No space left on device")])
def test_prune_takes_back_its_outputs_when_the_last_writes_fail(room, monkeypatch, failure):  # noqa: F811
    """-o is written inside the run; an interrupt or a failure before --report is written takes
    -o back (this run created it) and keeps the work directory for --resume, which then finishes."""
    import admm_onnx.cli.main as cli_main

    real = cli_main._write_json

    def failing(path, data):
        raise failure

    monkeypatch.setattr(cli_main, "_write_json", failing)
    argv = ["prune", "@/m.onnx", "-d", "@/d.npz", "-o", "@/o.onnx", "--sparsity", "0.5", "--report", "@/r.json",
            *QUICK]
    code = main(room.argv(argv))
    err = room.capsys.readouterr().err
    assert code in (2, 130), err
    assert "--resume" in err
    assert not (room / "o.onnx").exists() and not (room / "r.json").exists()
    assert (room / "o.onnx.admm-work" / "progress.json").exists()
    monkeypatch.setattr(cli_main, "_write_json", real)
    assert main(room.argv(argv + ["--resume"])) == 0
    assert (room / "o.onnx").exists() and (room / "r.json").exists() and not (room / "o.onnx.admm-work").exists()


@pytest.mark.parametrize("when", ["before the run", "during the run"])
def test_prune_interrupted_keeps_a_report_it_did_not_write(room, monkeypatch, when):  # noqa: F811
    """Only what this run wrote is taken back: a file at the --report name stays, whether it was
    there before or another program put it there while the run trained."""
    import admm_onnx.cli.main as cli_main

    if when == "before the run":
        (room / "r.json").write_text("theirs")

    def interrupt(path, data):
        if when == "during the run":
            (room / "r.json").write_text("theirs")
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_main, "_write_json", interrupt)
    assert main(room.argv(["prune", "@/m.onnx", "-d", "@/d.npz", "-o", "@/o.onnx", "--sparsity", "0.5",
                           "--report", "@/r.json", *QUICK])) == 130
    assert (room / "r.json").read_text() == "theirs" and not (room / "o.onnx").exists()


def test_output_plan_removes_only_files_it_planned_as_new_and_wrote(tmp_path):
    from admm_onnx.io import OutputPlan, write_text

    (tmp_path / "old.onnx").write_bytes(b"x")
    plan = OutputPlan()
    plan.add_output(tmp_path / "old.onnx", "-o", model=True)
    plan.add_output(tmp_path / "new.json", "--report")
    plan.add_output(tmp_path / "theirs.svg", "--plot")
    write_text(tmp_path / "old.onnx", "y")  # existed before: stays
    write_text(tmp_path / "old.onnx.data", "d")  # new and written by this process
    write_text(tmp_path / "new.json", "{}")
    (tmp_path / "theirs.svg").write_text("another program's file")  # new, not written by the tool: stays
    (tmp_path / "other.txt").write_text("user")
    assert sorted(p.name for p in plan.remove_created()) == ["new.json", "old.onnx.data"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.onnx", "other.txt", "theirs.svg"]


def test_output_names_that_are_not_utf8_are_written(tmp_path):
    """Linux file names are bytes: a name that is not UTF-8 is a valid output."""
    from admm_onnx.io import write_text

    for name in (os.fsdecode(b"r\xff.json"), os.fsdecode(b"\xe9" * 250)):
        write_text(tmp_path / name, "{}")
        assert (tmp_path / name).read_text() == "{}"
    assert len(list(tmp_path.iterdir())) == 2


def test_user_files_named_temp_onnx_in_the_working_folder_survive(room):  # noqa: F811
    """onnxblock's Block deletes <cwd>/temp.onnx(.data) when it is collected; admm_onnx._ort gives
    every Block a private scratch name instead."""
    import gc

    (room / "temp.onnx").write_text("user file")
    (room / "temp.onnx.data").write_text("user data")
    assert main(room.argv(["prune", "@/m.onnx", "-d", "@/d.npz", "-o", "@/o.onnx", "--sparsity", "0.5", *QUICK])) == 0
    assert main(room.argv(["train", "@/m.onnx", "-d", "@/d.npz", "-o", "@/t.onnx", "--epochs", "1", "-q"])) == 0
    gc.collect()
    assert (room / "temp.onnx").read_text() == "user file" and (room / "temp.onnx.data").read_text() == "user data"


def _model_named(r, name, data):
    """m.onnx saved as ``name`` (no .onnx suffix) with its weights in ``data``."""
    onnx.save(onnx.load(r / "m.onnx"), r / name, save_as_external_data=True, location=data, size_threshold=0)


@pytest.mark.parametrize("argv", [
    ["inspect", "@/e.model", "--plot", "@/w.svg"],
    ["--log-file", "@/w.svg", "inspect", "@/e.model"],
    ["export", "@/e.model", "-o", "@/w.svg", "--format", "csr"],
])
def test_external_data_of_a_model_not_named_onnx_is_an_input(room, argv):  # noqa: F811
    _model_named(room.root, "e.model", "w.svg")
    room.probe(argv, "external data")


def test_output_folder_puts_back_what_a_killed_run_set_aside(tmp_path):
    """demo killed with SIGKILL while writing: the earlier file sits under its hidden backup name;
    the next run puts it back instead of refusing the folder as holding a foreign file."""
    from admm_onnx.io import claim_output_folder

    out = tmp_path / "out"
    out.mkdir()
    (out / FOLDER_MARK).write_text("")  # the folder of an earlier run
    (out / ".report.json.admm-previous").write_text("earlier")
    (out / "report.json").write_text("half of a killed run")
    with pytest.raises(RuntimeError):
        with claim_output_folder(out, ["report.json", "model.onnx"]):
            raise RuntimeError("this run fails too")
    assert sorted(os.listdir(out)) == [FOLDER_MARK, "report.json"] and (out / "report.json").read_text() == "earlier"


def test_output_names_of_up_to_255_bytes_work_for_prune_and_export(room):  # noqa: F811
    """OUT.data and OUT.admm-work do not fit beside a 250-byte name: neither may fail the run."""
    name = "L" * 245 + ".onnx"
    assert main(room.argv(["prune", "@/m.onnx", "-d", "@/d.npz", "-o", f"@/{name}", "--sparsity", "0.5", *QUICK])) == 0
    assert main(room.argv(["export", f"@/{name}", "-o", "@/" + "E" * 250 + ".onnx", "--format", "csr"])) == 0
    assert sorted(len(p.name) for p in room.root.iterdir() if p.name.startswith(("L", "E"))) == [250, 255]


def test_a_rule_selects_a_weight_by_its_exact_name_even_with_glob_characters(room):  # noqa: F811
    m = onnx.load(room / "m.onnx")
    for t in m.graph.initializer:
        if t.name == "fc1.weight":
            t.name = "fc[1].weight"
    for n in m.graph.node:
        n.input[:] = ["fc[1].weight" if x == "fc1.weight" else x for x in n.input]
    onnx.save(m, room / "g.onnx")
    (room / "k.toml").write_text('[[rules]]\nnames = ["fc[1].weight"]\nsparsity = 0.9\n')
    assert main(room.argv(["prune", "@/g.onnx", "-d", "@/d.npz", "-o", "@/o.onnx", "--config", "@/k.toml",
                           *QUICK])) == 0
    w = {t.name: numpy_helper.to_array(t) for t in onnx.load(room / "o.onnx").graph.initializer}
    assert np.mean(w["fc[1].weight"] == 0) >= 0.9 and np.mean(w["fc2.weight"] == 0) == 0


def test_a_second_run_on_a_locked_output_folder_is_refused_and_changes_nothing(tmp_path):
    from admm_onnx.errors import OutputError
    from admm_onnx.io import claim_output_folder

    out = tmp_path / "out"
    with claim_output_folder(out, ["a.json"]) as folder:
        (folder / "a.json").write_text("first run")
        with pytest.raises(OutputError, match="another admm-onnx run"):
            with claim_output_folder(out, ["a.json"]):
                pass
        assert sorted(os.listdir(out)) == [FOLDER_MARK, "a.json"]
    with claim_output_folder(out, ["a.json"]):  # released at the end of the first
        pass
    assert (out / "a.json").read_text() == "first run"


def _scalar_input(r):
    """m.onnx with a second, rank-0 input scaling the logits."""
    m = onnx.load(r / "m.onnx")
    out = m.graph.output[0].name
    m.graph.input.append(helper.make_tensor_value_info("temp", TensorProto.FLOAT, []))
    for n in m.graph.node:
        n.output[:] = ["pre" if o == out else o for o in n.output]
    m.graph.node.append(helper.make_node("Div", ["pre", "temp"], [out]))
    onnx.save(m, r / "s.onnx")
    x = np.random.default_rng(0).standard_normal((40, 1, 8, 8)).astype(np.float32)
    np.savez(r / "s.npz", input=x, temp=np.ones(40, np.float32), labels=np.zeros(40, np.int64))


def _token_labels_too_short(r):
    np.savez(r / "bad.npz", input=np.random.default_rng(0).standard_normal((40, 1, 8, 8)).astype(np.float32),
             labels=np.zeros((40, 3), np.int64))


def _opset6(r):
    m = onnx.load(r / "m.onnx")
    del m.opset_import[:]
    m.opset_import.append(helper.make_opsetid("", 6))
    m.ir_version = 3
    m.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in m.graph.initializer)
    onnx.save(m, r / "o6.onnx")


def _ir3_invalid(r):
    m = onnx.load(r / "m.onnx")
    m.ir_version = 3  # IR 3 needs every initializer listed as a graph input; these are not
    onnx.save(m, r / "ir3.onnx")


def _mnist_folder_with_many_files(r):
    from test_safety_probes import _mnist

    _mnist("ok")(r)
    for i in range(1005):  # more than the 1,000 folder entries counted as inputs
        (r / "mn" / f"a{i:04d}.txt").write_text("")


THIRD = [
    ("workdir-empty", _nothing, PRUNE + ["--sparsity", "0.5", "--workdir", ""], "--workdir is empty"),
    ("quant-scale-without-bits", _nothing, PRUNE + ["--sparsity", "0.5", "--quant-scale", "tensor"], "--bits"),
    ("sparsity-out-of-range-names-the-option", _nothing, PRUNE + ["--sparsity", "1.5"], "--sparsity must be"),
    ("models-build-too-small", _nothing, ["models", "build", "lenet5", "--input-shape", "1x1x1", "-o", "@/l.onnx"],
     "too small"),
    ("report-onto-an-idx-file-of-a-big-folder", _mnist_folder_with_many_files,
     ["prune", "@/m.onnx", "-d", "mnist:@/mn", "-o", "@/o.onnx", "--sparsity", "0.5", "--report",
      "@/mn/train-labels-idx1-ubyte.gz", *QUICK], "-d data"),
    ("opset-6-prune", _opset6, ["prune", "@/o6.onnx", "-d", "@/d.npz", "-o", "@/o.onnx", "--sparsity", "0.5", *QUICK],
     "opset 6"),
    ("opset-6-train", _opset6, ["train", "@/o6.onnx", "-d", "@/d.npz", "-o", "@/o.onnx", "--epochs", "1", "-q"],
     "opset 6"),
    ("invalid-ir3-prune", _ir3_invalid, ["prune", "@/ir3.onnx", "-d", "@/d.npz", "-o", "@/o.onnx", "--sparsity", "0.5",
                                         *QUICK], "not valid ONNX"),
    ("scalar-input-prune", _scalar_input, ["prune", "@/s.onnx", "-d", "@/s.npz", "-o", "@/o.onnx", "--sparsity", "0.5",
                                           *QUICK], "scalar"),
    ("scalar-input-eval", _scalar_input, ["eval", "@/s.onnx", "-d", "@/s.npz"], "scalar"),
    ("labels-not-class-indices-eval", _token_labels_too_short, ["eval", "@/m.onnx", "-d", "@/bad.npz"],
     "not class indices"),
    ("labels-not-class-indices-sensitivity", _token_labels_too_short,
     ["sensitivity", "@/m.onnx", "-d", "@/bad.npz", "--no-cache", "--workers", "1", "--samples", "20", "-q"],
     "one class index per sample"),
]


@pytest.mark.parametrize("label, setup, argv, expect", THIRD, ids=[p[0] for p in THIRD])
def test_third_sweep_inputs_are_one_clean_error(room, label, setup, argv, expect):  # noqa: F811
    setup(room.root)
    room.probe(argv, expect, label)


def test_a_fixed_batch_model_is_pruned_without_labels(room):  # noqa: F811
    """Distillation's teacher runs the dense model on every row: in pieces of the model's fixed
    batch (1 here), the last one padded, not 4 batches at a time."""
    m = onnx.load(room / "m.onnx")
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    onnx.save(m, room / "b1.onnx")
    x = np.random.default_rng(0).standard_normal((10, 1, 8, 8)).astype(np.float32)
    np.savez(room / "x.npz", input=x)
    assert main(room.argv(["prune", "@/b1.onnx", "-d", "@/x.npz", "-o", "@/o.onnx", "--sparsity", "0.5",
                           "--admm-iters", "1", "--retrain-epochs", "1", "-q"])) == 0


def test_single_int64_input_with_x_y_data_feeds_integers(room):  # noqa: F811
    """x/y data for a token model: sensitivity and qdq calibration cast to the input's int64, as
    prune and eval do (they fed float32: ONNX Runtime refused the type)."""
    import shutil
    from pathlib import Path

    shutil.copy(Path(__file__).parent / "fixtures" / "torch_mlp_tied.onnx", room / "tok.onnx")
    rng = np.random.default_rng(0)
    np.savez(room / "ids.npz", x=rng.integers(0, 50, (40, 8)), y=rng.integers(0, 10, 40))
    assert main(room.argv(["sensitivity", "@/tok.onnx", "-d", "@/ids.npz", "--no-cache", "--workers", "1",
                           "--samples", "16", "--levels", "50%", "-q"])) == 0
    assert main(room.argv(["export", "@/tok.onnx", "-o", "@/q.onnx", "--format", "qdq", "-d", "@/ids.npz",
                           "--calibration-samples", "16"])) == 0


def test_prune_and_train_run_from_a_deleted_working_folder(room, monkeypatch):  # noqa: F811
    """onnxblock's Block called os.getcwd() (FileNotFoundError there); every path here is absolute."""
    gone = room.root / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    assert main(room.argv(["prune", "@/m.onnx", "-d", "@/d.npz", "-o", "@/o.onnx", "--sparsity", "0.5", *QUICK])) == 0
    assert main(room.argv(["train", "@/m.onnx", "-d", "@/d.npz", "-o", "@/t.onnx", "--epochs", "1", "-q"])) == 0


def test_an_output_keeps_its_mode_and_a_read_only_one_is_refused(room):  # noqa: F811
    args = ["export", "@/q.onnx", "-o", "@/p.onnx", "--format", "csr"]
    assert main(room.argv(["prune", "@/m.onnx", "-d", "@/d.npz", "-o", "@/q.onnx", "--sparsity", "0.5", *QUICK])) == 0
    (room / "p.onnx").write_text("old")
    os.chmod(room / "p.onnx", 0o600)
    assert main(room.argv(args)) == 0
    assert oct(os.stat(room / "p.onnx").st_mode & 0o777) == "0o600"  # a private file stays private
    os.chmod(room / "p.onnx", 0o444)
    room.probe(args, "read-only")


def test_train_that_diverges_writes_nothing(room):  # noqa: F811
    room.probe(["train", "@/m.onnx", "-d", "@/d.npz", "-o", "@/t.onnx", "--epochs", "1", "--lr", "1e30", "-q"],
               "diverged")


def test_an_interrupted_channel_run_leaves_no_work_directory(room, monkeypatch):  # noqa: F811
    """Channel pruning does not resume: an interrupt after its ADMM phase keeps nothing."""
    import admm_onnx.structured.phase as phase

    from admm_onnx.models import build

    onnx.save(build("lenet5", input_shape=(1, 8, 8), num_classes=4), room / "c.onnx")

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(phase, "verify", interrupt)
    code = main(room.argv(["prune", "@/c.onnx", "-d", "@/d.npz", "-o", "@/o.onnx", "--structure", "channel",
                           "--sparsity", "0.5", "--round-to", "1", *QUICK]))
    assert code == 130 and "does not resume" in room.capsys.readouterr().err
    assert not (room / "o.onnx").exists() and not (room / "o.onnx.admm-work").exists()


def test_a_sensitivity_cache_that_cannot_be_written_is_a_warning(room):  # noqa: F811
    (room / "cache").mkdir()
    args = ["sensitivity", "@/m.onnx", "-d", "@/d.npz", "--workers", "1", "--samples", "16", "--levels", "50%", "-q",
            "--cache", "@/cache", "--json", "@/s.json"]
    assert main(room.argv(args)) == 0
    (cached,) = list((room / "cache").iterdir())
    cached.unlink()
    cached.mkdir()  # the cache file's name is now taken by a folder: writing it fails
    (room / "s.json").unlink()
    assert main(room.argv(args)) == 0 and (room / "s.json").exists()
    assert "sensitivity cache not written" in room.capsys.readouterr().err


def test_a_signal_during_the_final_writes_is_dropped_once_they_are_done():
    from admm_onnx import interrupts

    try:
        with interrupts.deferred(final=True):
            interrupts.handler(2, None)  # held
        assert interrupts.finished()
        interrupts.handler(15, None)  # after the command is complete: held and dropped, no exception
    finally:
        interrupts.reset()
    assert not interrupts.finished()
    try:
        with pytest.raises(KeyboardInterrupt):
            with interrupts.deferred():
                interrupts.handler(2, None)
    finally:
        interrupts.reset()  # an interrupt was raised: later signals would be dropped


def test_no_command_prints_the_help_and_upper_case_npz_is_data(room, capsys):  # noqa: F811
    assert main([]) == 0 and "Commands:" in capsys.readouterr().out
    import shutil

    shutil.copy(room / "d.npz", room / "D.NPZ")
    assert main(room.argv(["eval", "@/m.onnx", "-d", "@/D.NPZ"])) == 0


@pytest.mark.parametrize("fmt", ["csr", "packed", "qdq"])
def test_weights_listed_as_graph_inputs_are_exported_as_constants(room, fmt):  # noqa: F811
    """torch's keep_initializers_as_inputs: export used to skip every weight ("no sparse
    weights", or an invalid qdq graph)."""
    m = onnx.load(room / "m.onnx")
    m.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in m.graph.initializer)
    onnx.save(m, room / "ii.onnx")
    assert main(room.argv(["prune", "@/ii.onnx", "-d", "@/d.npz", "-o", "@/q.onnx", "--sparsity", "0.6", *QUICK])) == 0
    extra = ["-d", "@/d.npz", "--calibration-samples", "16"] if fmt == "qdq" else []
    assert main(room.argv(["export", "@/q.onnx", "-o", "@/e.onnx", "--format", fmt, *extra])) == 0
    out = onnx.load(room / "e.onnx")
    assert [i.name for i in out.graph.input] == [m.graph.input[0].name]


def test_a_channel_macs_budget_works_without_labels(room):  # noqa: F811
    """The channel allocation's sweep measures KL from the dense model when there are no labels
    (it asked for --metric kl, an option prune does not have)."""
    from admm_onnx.models import build

    onnx.save(build("lenet5", input_shape=(1, 8, 8), num_classes=4), room / "c.onnx")
    x = np.random.default_rng(0).standard_normal((96, 1, 8, 8)).astype(np.float32)
    np.savez(room / "x.npz", input=x)
    assert main(room.argv(["prune", "@/c.onnx", "-d", "@/x.npz", "-o", "@/o.onnx", "--structure", "channel",
                           "--target-macs", "0.5", "--round-to", "1", *QUICK])) == 0


def _mlp(first_output_is_table: bool = False, through_sequence: bool = False):
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "w2")
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"])]
    if through_sequence:
        nodes += [helper.make_node("SequenceConstruct", ["h"], ["s"], name="seq"),
                  helper.make_node("SequenceAt", ["s", "zero"], ["h2"], name="at")]
    nodes += [helper.make_node("MatMul", ["h2" if through_sequence else "h", "w2"], ["logits"])]
    inits = [w1, w2] + ([numpy_helper.from_array(np.array(0, np.int64), "zero")] if through_sequence else [])
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])]
    if first_output_is_table:
        outputs.insert(0, helper.make_tensor_value_info("w1", TensorProto.FLOAT, [16, 8]))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])], outputs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_the_default_output_is_computed_not_an_initializer_passed_through(room):  # noqa: F811
    onnx.save(_mlp(first_output_is_table=True), room / "t.onnx")
    rng = np.random.default_rng(0)
    np.savez(room / "v.npz", x=rng.standard_normal((64, 16)).astype(np.float32), y=rng.integers(0, 4, 64))
    assert main(room.argv(["prune", "@/t.onnx", "-d", "@/v.npz", "-o", "@/o.onnx", "--sparsity", "0.5", *QUICK])) == 0


def test_a_weight_behind_a_sequence_is_refused_before_training(room):  # noqa: F811
    onnx.save(_mlp(through_sequence=True), room / "s.onnx")
    rng = np.random.default_rng(0)
    np.savez(room / "v.npz", x=rng.standard_normal((64, 16)).astype(np.float32), y=rng.integers(0, 4, 64))
    err = room.probe(["prune", "@/s.onnx", "-d", "@/v.npz", "-o", "@/o.onnx", "--sparsity", "0.5", *QUICK],
                     "SequenceConstruct")
    assert "resume" not in err


def _two_inputs(names):
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((16, 4)).astype(np.float32), "w")
    nodes = [helper.make_node("Add", list(names), ["s"]), helper.make_node("MatMul", ["s", "w"], ["logits"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 16]) for n in names],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])], [w])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("names", [("x", "y"), ("a", "labels")])
def test_inputs_named_like_label_keys_are_inputs(room, names):  # noqa: F811
    """Label-free data for a model whose inputs are called x and y (or labels): they are its
    inputs, not a data set's features and labels."""
    onnx.save(_two_inputs(names), room / "t.onnx")
    rng = np.random.default_rng(0)
    np.savez(room / "t.npz", **{n: rng.standard_normal((64, 16)).astype(np.float32) for n in names})
    assert main(room.argv(["prune", "@/t.onnx", "-d", "@/t.npz", "-o", "@/o.onnx", "--sparsity", "0.5",
                           "--admm-iters", "1", "--retrain-epochs", "1", "--batch-size", "16", "-q"])) == 0


def test_remove_dead_channels_that_leaves_nothing_sparse_writes_the_dense_model(room):  # noqa: F811
    m = onnx.load(room / "m.onnx")
    for t in m.graph.initializer:
        if t.name == "fc2.weight":
            a = numpy_helper.to_array(t).copy()
            a[:, : a.shape[1] // 2] = 0  # fc1 units nothing reads: dead channels, and no other zeros
            t.CopyFrom(numpy_helper.from_array(a, t.name))
    onnx.save(m, room / "dead.onnx")
    assert main(room.argv(["export", "@/dead.onnx", "-o", "@/e.onnx", "--format", "csr", "--remove-dead-channels"])) == 0
    assert "without them, dense" in room.capsys.readouterr().out


def test_qdq_calibrates_a_fixed_batch_model_in_its_batch(room):  # noqa: F811
    m = onnx.load(room / "m.onnx")
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    onnx.save(m, room / "b1.onnx")
    assert main(room.argv(["export", "@/b1.onnx", "-o", "@/q.onnx", "--format", "qdq", "-d", "@/d.npz",
                           "--calibration-samples", "40", "--min-sparsity", "0"])) == 0


def test_qdq_refuses_a_float16_model(room):  # noqa: F811
    from onnx import TensorProto as T

    w = numpy_helper.from_array(np.ones((4, 3), np.float16), "w")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [helper.make_tensor_value_info(
        "x", T.FLOAT16, ["N", 4])], [helper.make_tensor_value_info("y", T.FLOAT16, ["N", 3])], [w])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), room / "h.onnx")
    np.savez(room / "h.npz", x=np.ones((8, 4), np.float32), y=np.zeros(8, np.int64))
    room.probe(["export", "@/h.onnx", "-o", "@/q.onnx", "--format", "qdq", "-d", "@/h.npz"], "float32 models")


def test_a_weight_exactly_at_min_sparsity_is_exported(room):  # noqa: F811
    m = onnx.load(room / "m.onnx")
    for t in m.graph.initializer:
        if t.name == "fc2.weight":
            a = numpy_helper.to_array(t).copy().reshape(-1)
            a[: a.size // 5] = 0  # exactly 20% zeros (1 - nz/n rounds just below 0.2)
            t.CopyFrom(numpy_helper.from_array(a.reshape(tuple(t.dims)), t.name))
    onnx.save(m, room / "z.onnx")
    assert main(room.argv(["export", "@/z.onnx", "-o", "@/e.onnx", "--format", "csr", "--min-sparsity", "0.2"])) == 0


def test_an_exported_file_is_not_exported_again(room):  # noqa: F811
    assert main(room.argv(["prune", "@/m.onnx", "-d", "@/d.npz", "-o", "@/p.onnx", "--sparsity", "0.6", *QUICK])) == 0
    assert main(room.argv(["export", "@/p.onnx", "-o", "@/c.onnx", "--format", "csr"])) == 0
    room.probe(["export", "@/c.onnx", "-o", "@/q.onnx", "--format", "qdq", "-d", "@/d.npz"], "densify it first")


def _interrupt_a_prune_after(room, monkeypatch, method: str, calls: int, admm_iters: int) -> list:
    """Run a small prune that is interrupted right after the ``calls``-th call of WorkDir.``method``
    (the call itself completes); returns its argv, for a --resume."""
    import admm_onnx.workdir as wdm

    real = getattr(wdm.WorkDir, method)
    count = {"n": 0}

    def then_stop(self, *args):
        real(self, *args)
        count["n"] += method != "save_checkpoint" or args[-1] == "admm"
        if count["n"] == calls:
            raise KeyboardInterrupt

    argv = ["prune", "@/m.onnx", "-d", "@/d.npz", "-o", "@/o.onnx", "--sparsity", "0.5", "--admm-iters",
            str(admm_iters), "--retrain-epochs", "1", "--batch-size", "32", "-q"]
    monkeypatch.setattr(wdm.WorkDir, method, then_stop)
    assert main(room.argv(argv)) == 130
    monkeypatch.setattr(wdm.WorkDir, method, real)
    room.capsys.readouterr()
    return argv


def test_resume_refuses_a_checkpoint_newer_than_the_last_commit(room, monkeypatch):  # noqa: F811
    """A stop between saving an ADMM iteration's checkpoint and committing it: resuming would
    replay that iteration on weights that already had it; the recorded digest refuses it."""
    argv = _interrupt_a_prune_after(room, monkeypatch, "save_checkpoint", 2, admm_iters=3)
    assert main(room.argv(argv + ["--resume"])) == 2
    assert "stopped while saving it" in room.capsys.readouterr().err


def test_train_interrupted_leaves_no_work_directory(room, monkeypatch):  # noqa: F811
    import admm_onnx.pipeline as pipeline

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "refresh_batchnorm", interrupt)  # after the last epoch
    assert main(room.argv(["train", "@/m.onnx", "-d", "@/d.npz", "-o", "@/t.onnx", "--epochs", "1", "-q"])) == 130
    assert not (room / "t.onnx.admm-work").exists() and not (room / "t.onnx").exists()


def test_mse_with_ignored_labels_is_one_line(room):  # noqa: F811
    y = np.zeros(200, np.int64)
    y[:10] = -100
    x = np.random.default_rng(0).standard_normal((200, 1, 8, 8)).astype(np.float32)
    np.savez(room / "ign.npz", input=x, labels=y)  # keyed by input name: -100 marks ignored positions
    room.probe(["train", "@/m.onnx", "-d", "@/ign.npz", "-o", "@/t.onnx", "--epochs", "1", "--loss", "mse", "-q"],
               "-100")


@pytest.mark.parametrize("restated", [["--model-output", "logits"], ["--loss", "cross_entropy"]])
def test_resume_accepts_options_that_restate_what_the_run_used(room, monkeypatch, restated):  # noqa: F811
    argv = _interrupt_a_prune_after(room, monkeypatch, "write_progress", 2, admm_iters=2)  # ADMM iteration 1 committed
    assert main(room.argv(argv + ["--resume"] + restated)) == 0


def test_an_external_data_output_keeps_its_modes_and_a_read_only_data_file_is_refused(room):  # noqa: F811
    args = ["prune", "@/ext.onnx", "-d", "@/d.npz", "-o", "@/x.onnx", "--sparsity", "0.5", *QUICK]
    assert main(room.argv(args)) == 0
    for name in ("x.onnx", "x.onnx.data"):
        os.chmod(room / name, 0o600)
    assert main(room.argv(args)) == 0
    assert [oct(os.stat(room / n).st_mode & 0o777) for n in ("x.onnx", "x.onnx.data")] == ["0o600", "0o600"]
    os.chmod(room / "x.onnx.data", 0o444)
    room.probe(args, "read-only")


def test_workers_started_while_sigint_is_blocked_do_not_see_it():
    """A terminal's Ctrl-C reaches the whole process group: workers started inside
    children_with_start_signals_blocked inherit SIGINT blocked, so it cannot kill one while it starts up (the
    parent then waited forever on its start-up pipe)."""
    import signal
    import subprocess
    import sys

    from admm_onnx.interrupts import children_with_start_signals_blocked

    code = "import signal, sys; sys.stdout.write(str(signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, [])))"
    with children_with_start_signals_blocked():
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout
    assert out == "True"
    assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, [])  # unblocked again here


def test_workers_start_with_sigterm_and_sighup_blocked_and_take_them_once_started():
    """A SIGTERM / SIGHUP sent to the whole process group (timeout, a closed terminal) killed a
    sensitivity worker before it read its start-up message: the parent then waited forever
    writing it. Children start with the three signals blocked; a worker unblocks SIGTERM and
    SIGHUP (and ignores SIGINT) once it has its message, so a signal held meanwhile ends it then."""
    import signal

    wanted = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    code = ("import signal, sys; m = signal.pthread_sigmask(signal.SIG_BLOCK, []); "
            "sys.stdout.write(' '.join(str(int(s)) for s in sorted(m)))")
    out = _run_as_worker(code).stdout
    assert wanted <= {int(s) for s in out.split()}
    assert not wanted & signal.pthread_sigmask(signal.SIG_BLOCK, [])  # unblocked again here

    # a worker's start (the pool initializer): a SIGTERM held while it started ends it there
    code = ("import os, signal, sys\n"
            "from admm_onnx.allocation.runners import _worker_setup\n"
            "os.kill(os.getpid(), signal.SIGTERM)  # held: blocked since the start\n"
            "_worker_setup(os.getppid(), print, ('setup ran',))\n")
    done = _run_as_worker(code)
    assert done.returncode == -signal.SIGTERM and "setup ran" not in done.stdout
    code = ("import os, signal, sys\n"
            "from admm_onnx.allocation.runners import _worker_setup\n"
            "_worker_setup(os.getppid(), print, ('setup ran',))\n"
            "m = signal.pthread_sigmask(signal.SIG_BLOCK, [])\n"
            "print(signal.SIGTERM in m, signal.SIGHUP in m, signal.getsignal(signal.SIGINT) is signal.SIG_IGN)\n")
    done = _run_as_worker(code)
    assert done.stdout.split("\n")[:2] == ["setup ran", "False False True"], done.stderr


_SUBMIT_MASK = """
import signal
from admm_onnx.allocation import runners
seen = []
class Pool(runners.ProcessPoolExecutor):
    def submit(self, *a, **k):  # the workers are spawned here
        seen.append(sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])))
        return super().submit(*a, **k)
runners.ProcessPoolExecutor = Pool
if __name__ == "__main__":
    print(sorted(r for _, r in runners.ProcessRunner(2).run(len, ((),), abs, [-1, -2])))
    print(seen)
"""


def test_the_sensitivity_pool_spawns_its_workers_with_the_signals_blocked(tmp_path):
    """multiprocessing's resource tracker, started on first use inside children_with_start_signals_blocked,
    unblocked SIGINT and SIGTERM again: the workers then started with only SIGHUP blocked (a
    fresh interpreter, where the tracker does not run yet)."""
    import ast
    import signal
    import subprocess
    import sys

    (tmp_path / "probe.py").write_text(_SUBMIT_MASK)
    done = subprocess.run([sys.executable, str(tmp_path / "probe.py")], capture_output=True, text=True, timeout=300)
    lines = done.stdout.splitlines()
    assert lines[:1] == ["[1, 2]"], done.stderr
    masks = ast.literal_eval(lines[1])
    assert masks and all({signal.SIGINT, signal.SIGTERM, signal.SIGHUP} <= set(m) for m in masks)


def test_an_interrupt_while_the_sensitivity_pool_is_built_leaks_no_semaphore(monkeypatch):
    """The process pool was built before the deferred section: a Ctrl-C between the creation of
    one of its queue's POSIX semaphores and its registration for removal left
    /dev/shm/sem.mp-* for good. The signal is sent exactly there."""
    import gc
    import signal
    from multiprocessing import resource_tracker

    from admm_onnx import interrupts
    from admm_onnx.allocation.runners import ProcessRunner

    real = resource_tracker.register
    names = []

    def register(name, rtype):
        if rtype == "semaphore":
            names.append(name)
            if len(names) == 1:
                os.kill(os.getpid(), signal.SIGINT)  # lands after sem_open, before the registration
        return real(name, rtype)

    monkeypatch.setattr(resource_tracker, "register", register)
    previous = signal.signal(signal.SIGINT, interrupts.handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            list(ProcessRunner(2).run(len, ((),), abs, [-1, -2, -3]))
    finally:
        signal.signal(signal.SIGINT, previous)
        interrupts.reset()
    gc.collect()
    assert names
    assert not [n for n in names if os.path.exists("/dev/shm/sem." + n.lstrip("/"))]


def _exchange_files():
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


def test_an_interrupt_just_after_the_exchange_file_is_created_removes_it(tmp_path, monkeypatch):
    """train/prune --workers: a signal between the exchange file's creation and the try that
    removes it leaked /dev/shm/admm-onnx-exchange-* (README: removed on every exit path)."""
    import signal
    import tempfile

    from admm_onnx import interrupts, parallel

    real = tempfile.mkstemp
    made = []

    def mkstemp(*a, **k):
        fd, name = real(*a, **k)
        made.append(name)
        os.kill(os.getpid(), signal.SIGINT)  # lands right after the file exists
        return fd, name

    monkeypatch.setattr(parallel.tempfile, "mkstemp", mkstemp)
    previous = signal.signal(signal.SIGINT, interrupts.handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            parallel.WorkerPool(tmp_path, tmp_path / "checkpoint", [("w", "float32", (4,))], 2)
    finally:
        signal.signal(signal.SIGINT, previous)
        interrupts.reset()
    assert made and not os.path.exists(made[0])


def test_a_second_signal_while_the_worker_pool_closes_still_removes_the_exchange_file(tmp_path, monkeypatch):
    """``timeout`` signals the run, then its whole group: the second signal landed while the
    pool waited for its workers to end and the exchange file was never removed."""
    from admm_onnx import parallel

    monkeypatch.setattr(parallel.WorkerPool, "_start", lambda self, *a: None)  # no worker processes
    pool = parallel.WorkerPool(tmp_path, tmp_path / "checkpoint", [("w", "float32", (4,))], 2)
    path = pool._path
    assert path.exists()

    class Waiting:
        def wait(self, timeout=None):
            raise KeyboardInterrupt  # the second signal

    pool.procs = [Waiting()]
    with pytest.raises(KeyboardInterrupt):
        pool.close()
    assert not path.exists()


def test_a_worker_pool_dropped_without_close_removes_its_exchange_file(tmp_path, monkeypatch):
    import gc

    from admm_onnx import parallel

    monkeypatch.setattr(parallel.WorkerPool, "_start", lambda self, *a: None)
    pool = parallel.WorkerPool(tmp_path, tmp_path / "checkpoint", [("w", "float32", (4,))], 2)
    path = pool._path
    del pool
    gc.collect()
    assert not path.exists()


def test_a_signal_inside_a_finalizer_is_raised_just_after_it():
    """A Ctrl-C landing in a __del__ (onnxblock Blocks are destroyed while the artifacts are
    built) was only printed as 'Exception ignored in ...' and the run went on to exit 0."""
    import signal
    import sys
    import time

    from admm_onnx import interrupts

    ignored = []
    log = []

    class Finalized:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)
            log.append(os.path.exists("/"))  # Python code after the signal, still in the finalizer
            log.append("finalizer done")

    previous_hook, sys.unraisablehook = sys.unraisablehook, ignored.append
    previous = signal.signal(signal.SIGINT, interrupts.handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            obj = Finalized()
            del obj
            for _ in range(200):
                time.sleep(0.01)
            log.append("not interrupted")
    finally:
        signal.signal(signal.SIGINT, previous)
        sys.unraisablehook = previous_hook
    assert log == [True, "finalizer done"] and not ignored


def test_prune_interrupted_inside_a_block_finalizer_exits_130_and_keeps_the_report(room, monkeypatch):  # noqa: F811
    from admm_onnx._ort import onnxblock

    real = onnxblock.Block.__del__
    sent = []

    def __del__(self):  # the user's Ctrl-C lands while a Block is destroyed
        if not sent:
            sent.append(1)
            os.kill(os.getpid(), __import__("signal").SIGINT)
        real(self)

    monkeypatch.setattr(onnxblock.Block, "__del__", __del__)
    (room / "r.json").write_text("my report\n")
    assert main(room.argv(PRUNE + ["--sparsity", "0.5", "--report", "@/r.json"])) == 130
    assert sent and (room / "r.json").read_text() == "my report\n" and not (room / "o.onnx").exists()


def test_an_interrupted_sensitivity_pool_stops_every_worker_at_once():
    """An interrupt ended the sweep only once the tasks under way were done, and a worker spawned
    while the executor tore itself down after another worker died of the group's SIGTERM was
    never stopped: the exit then waited for it forever. Every worker is stopped now."""
    import multiprocessing
    import signal
    import threading
    import time

    from admm_onnx.allocation.runners import ProcessRunner

    timer = threading.Timer(3.0, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT))
    t0 = time.monotonic()
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            list(ProcessRunner(2).run(len, ((),), time.sleep, [60, 60, 60]))
    finally:
        timer.cancel()
    assert time.monotonic() - t0 < 30
    assert not multiprocessing.active_children()


def test_an_interrupt_just_after_the_external_data_temp_folder_is_made_leaves_no_folder(room, monkeypatch):  # noqa: F811
    """save_model made its hidden .OUT.XXXX/ folder one statement before the try that removes
    it: a Ctrl-C there left it beside the output for good, even after a successful --resume."""
    import signal

    from admm_onnx import io

    real = io.tempfile.mkdtemp

    def mkdtemp(*a, **k):
        path = real(*a, **k)
        if os.path.basename(path).startswith(".x.onnx."):
            os.kill(os.getpid(), signal.SIGINT)  # lands just after the folder exists
        return path

    argv = ["prune", "@/ext.onnx", "-d", "@/d.npz", "-o", "@/x.onnx", "--sparsity", "0.5", *QUICK]
    monkeypatch.setattr(io.tempfile, "mkdtemp", mkdtemp)
    assert main(room.argv(argv)) == 130
    assert not [p for p in os.listdir(room.root) if p.startswith(".x.onnx")]
    monkeypatch.setattr(io.tempfile, "mkdtemp", real)
    assert main(room.argv(argv + ["--resume"])) == 0
    assert not [p for p in os.listdir(room.root) if p.startswith(".x.onnx")]


def test_an_interrupt_just_after_an_atomic_temp_file_is_made_leaves_no_file(tmp_path, monkeypatch):
    import signal

    from admm_onnx import interrupts, io

    real = io.tempfile.mkstemp

    def mkstemp(*a, **k):
        made = real(*a, **k)
        os.kill(os.getpid(), signal.SIGINT)
        return made

    monkeypatch.setattr(io.tempfile, "mkstemp", mkstemp)
    previous = signal.signal(signal.SIGINT, interrupts.handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            io.write_text(tmp_path / "r.json", "{}")
    finally:
        signal.signal(signal.SIGINT, previous)
        interrupts.reset()
    assert os.listdir(tmp_path) == []


def test_a_sensitivity_worker_ends_quietly_on_a_group_sigterm():
    """A spawn worker runs with the CLI's sys.argv: importing admm_onnx installed the CLI's
    start-up handler in it, and a group SIGTERM printed 'Interrupted.' once per worker on top of
    the run's own line."""
    import signal

    code = ("import os, signal, sys\n"
            "sys.argv = ['admm-onnx', 'sensitivity']  # what spawn's prepare() gives a worker\n"
            "from admm_onnx.allocation.runners import _worker_setup\n"
            "os.kill(os.getpid(), signal.SIGTERM)  # the group's SIGTERM, held while it started\n"
            "_worker_setup(os.getppid(), print, ('setup ran',))\n")
    done = _run_as_worker(code)
    assert done.returncode == -signal.SIGTERM and done.stderr == "" and done.stdout == ""


def test_eval_with_every_label_ignored_says_so(room):  # noqa: F811
    x = np.random.default_rng(0).standard_normal((40, 1, 8, 8)).astype(np.float32)
    np.savez(room / "ign.npz", input=x, labels=np.full(40, -100))
    room.probe(["eval", "@/m.onnx", "-d", "@/ign.npz"], "every label")


@pytest.mark.parametrize("tail", [["-d"], ["-o"], ["--sparsity"]])
def test_an_option_missing_its_value_at_the_end_points_to_the_commands_help(room, tail):  # noqa: F811
    room.probe(["--log-file", "@/l.log", "prune", "@/m.onnx", *tail], "'admm-onnx prune --help'")


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_full_standard_output_is_named_as_such(room):  # noqa: F811
    """The write error names no file: it was reported as a full disk."""
    import subprocess
    import sys

    def run(*argv):
        with open("/dev/full", "w") as full:
            return subprocess.run([sys.executable, "-m", "admm_onnx.cli.main", *room.argv(argv)],
                                  stdout=full, stderr=subprocess.PIPE, text=True)

    done = run("inspect", "@/m.onnx")
    assert done.returncode == 2
    assert done.stderr.splitlines() == ["error: cannot write to standard output: No space left on device"]
    for argv in (["prune", "@/m.onnx", "-d", "@/d.npz", "-o", "@/o.onnx", "--sparsity", "0.5", *QUICK],
                 ["train", "@/m.onnx", "-d", "@/d.npz", "-o", "@/t.onnx", "--epochs", "1", "-q"]):
        done = run(*argv)  # the summary cannot be printed: the run's outputs are taken back
        errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
        assert done.returncode == 2 and errors[0].startswith("error: cannot write to standard output"), done.stderr
        assert not (room / "o.onnx").exists() and not (room / "t.onnx").exists()


def test_a_sparse_file_larger_than_its_model_is_warned_about(tmp_path, capsys):
    w = np.arange(24, dtype=np.float32).reshape(8, 3)
    w[::2] = 0  # half zeros, but only 24 weights: the decode graph outweighs them
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, tmp_path / "t.onnx")
    for fmt in ("packed", "csr"):
        assert main(["export", str(tmp_path / "t.onnx"), "-o", str(tmp_path / f"t.{fmt}.onnx"), "--format", fmt]) == 0
        assert os.path.getsize(tmp_path / f"t.{fmt}.onnx") > os.path.getsize(tmp_path / "t.onnx")
        assert f"warning: the {fmt} file is" in capsys.readouterr().err


def test_the_pool_cancel_race_prints_no_thread_traceback(monkeypatch):
    """Ctrl-C or a group SIGTERM while the sensitivity pool cancelled printed a concurrent.futures
    InvalidStateError thread traceback (the executor's manager thread can outlive the pool's
    shut-down); from the first pool on that error is logged, others still reach the previous
    hook (the traceback printer)."""
    import threading
    from concurrent.futures import InvalidStateError

    from admm_onnx.allocation import runners

    seen = []
    monkeypatch.setattr(threading, "excepthook", lambda args: seen.append(type(args.exc_value).__name__))
    monkeypatch.setattr(runners, "_QUIET_CANCEL_RACE", False)

    def boom(exc):
        def run():
            raise exc
        t = threading.Thread(target=run)
        t.start()
        t.join()

    boom(InvalidStateError("before any pool"))
    runners._quiet_cancel_race()
    runners._quiet_cancel_race()  # once only: the hook is not stacked
    boom(InvalidStateError("CANCELLED: <Future>"))
    boom(ValueError("a real bug"))
    assert seen == ["InvalidStateError", "ValueError"]


def _stop_before_the_final_writes(monkeypatch):
    """A Ctrl-C as a command's final writes begin (when it enters deferred(final=True)); returns
    what puts the real deferred back."""
    import admm_onnx.interrupts as interrupts

    real = interrupts.deferred

    def stop_before_final(final=False):
        if final:
            raise KeyboardInterrupt
        return real()

    monkeypatch.setattr(interrupts, "deferred", stop_before_final)
    return lambda: monkeypatch.setattr(interrupts, "deferred", real)


def test_an_interrupt_between_the_training_and_the_final_writes_takes_back_o(room, monkeypatch):  # noqa: F811
    """-o is written by the training's last step; a Ctrl-C just after it returned, before the
    final writes began, left -o without its --report (a bare 'Interrupted.')."""
    restore = _stop_before_the_final_writes(monkeypatch)
    argv = PRUNE + ["--sparsity", "0.5", "--report", "@/r.json"]
    assert main(room.argv(argv)) == 130
    assert "--resume" in room.capsys.readouterr().err
    assert not (room / "o.onnx").exists() and not (room / "r.json").exists()
    restore()
    assert main(room.argv(argv + ["--resume"])) == 0
    assert (room / "o.onnx").exists() and (room / "r.json").exists()


@pytest.mark.parametrize("argv, expect", [
    (["prune", "", "-d", "@/d.npz", "--sparsity", "0.5"], "names no file"),  # an unset "$MODEL": was an internal error
    (PRUNE + ["--sparsity", "0.5", "--config", ""], "--config is empty"),  # were read as not given
    (["--log-file", "", "inspect", "@/m.onnx"], "--log-file is empty"),
    (["sensitivity", "@/m.onnx", "-d", "@/d.npz", "--cache", " "], "--cache is empty"),
])
def test_empty_names_are_refused(room, argv, expect):  # noqa: F811
    room.probe(argv, expect)


def test_a_command_group_alone_prints_its_help(capsys):
    """As bare admm-onnx does; it was the whole help squeezed into one error line, exit 2."""
    assert main(["models"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("Usage: admm-onnx models") and "build" in out.out and out.err == ""


def test_api_checks_progress_labels_and_workdir_up_front(room):  # noqa: F811
    import admm_onnx
    from admm_onnx.errors import ConfigError, DataError, OutputError

    x = np.random.default_rng(0).standard_normal((64, 1, 8, 8)).astype(np.float32)
    with pytest.raises(DataError, match="64 input rows but 63 labels"):
        admm_onnx.ArrayReader(x, np.zeros(63, np.int64))
    reader = admm_onnx.ArrayReader(x, np.zeros(64, np.int64), 16)
    config = admm_onnx.PruneConfig(admm_iters=1, retrain_epochs=0, batch_size=16).with_sparsity(0.5)
    with pytest.raises(ConfigError, match="progress must be"):
        admm_onnx.prune(str(room / "m.onnx"), str(room / "p.onnx"), reader, config, progress=5)
    with pytest.raises(OutputError, match="contains the model_output output"):  # it trained, then failed
        admm_onnx.prune(str(room / "m.onnx"), str(room / "p.onnx"), reader, config, workdir=str(room / "p.onnx"))
    with pytest.raises(OutputError, match="external data output"):  # the output's weights file
        admm_onnx.prune(str(room / "ext.onnx"), str(room / "p.onnx"), reader, config, workdir=str(room / "p.onnx.data"))
    assert not (room / "p.onnx").exists() and not (room / "p.onnx.data").exists()


@pytest.mark.parametrize("name", ["report.json", "lenet5_pruned.onnx"])
def test_demo_refuses_a_folder_whose_file_it_did_not_write(tmp_path, name):
    """A folder holding only a file named like one of the demo's was taken for an earlier demo's
    folder, and the file replaced."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / name).write_text("the user's own")
    assert main(["demo", "-o", str(out), "-q"]) == 2
    assert os.listdir(out) == [name] and (out / name).read_text() == "the user's own"


def test_eval_runs_an_int8_qdq_file(room, capsys):  # noqa: F811
    """It was refused as 'a qdq deployment file: it trains and prunes no more'; eval does neither."""
    assert main(room.argv(["export", "@/m.onnx", "-o", "@/q.onnx", "--format", "qdq", "-d", "@/d.npz",
                           "--calibration-samples", "32"])) == 0
    capsys.readouterr()
    assert main(room.argv(["eval", "@/q.onnx", "-d", "@/d.npz", "--json"])) == 0
    result = json.loads(capsys.readouterr().out)
    assert 0 <= result["accuracy"] <= 1 and result["samples"] > 0


def test_a_refused_resume_leaves_the_work_directory_byte_identical(room):  # noqa: F811
    """A work directory a killed run left before its first step (marker and lock only): the
    refused --resume wrote its pid into the lock file, though the run never started."""
    from fs_snapshot import snapshot

    from admm_onnx.workdir import WorkDir

    work = WorkDir(room / "o.onnx.admm-work")
    work.claim()  # as a run killed outright (SIGKILL, an abort inside ONNX Runtime) leaves it
    work.release()
    (work.path / "run.lock").write_text("12345\n")  # that run's pid (this test's process has another)
    before = snapshot(room.root)
    room.probe(PRUNE + ["--sparsity", "0.5", "--resume"], "nothing to resume")
    assert snapshot(room.root) == before


# -- sweep 6 (2026-12-05): graphs ONNX Runtime training aborts on, precision ---------------------
def _vi(name, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def _w(name, shape, seed=0):
    return numpy_helper.from_array((np.random.default_rng(seed).standard_normal(shape) * 0.3).astype(np.float32), name)


def _if_model(branch_reads="h", before=None, after=None):
    """x -> [before] -> If(sum(x) > -1e9) whose branches read ``branch_reads`` -> [after] -> logits."""
    then = helper.make_graph([helper.make_node("Relu", [branch_reads], ["o_t"])], "then", [], [_vi("o_t", None)])
    other = helper.make_graph([helper.make_node("Neg", [branch_reads], ["o_e"])], "else", [], [_vi("o_e", None)])
    cond = [helper.make_node("ReduceSum", ["x"], ["sx"], keepdims=0), helper.make_node("Greater", ["sx", "zero"], ["cond"])]
    nodes = list(before or []) + cond + [helper.make_node("If", ["cond"], ["hi"], name="branch", then_branch=then,
                                                          else_branch=other)] + list(after or [])
    inits = [_w("w1", (8, 8), 1), _w("w2", (8, 4), 2), numpy_helper.from_array(np.array(-1e9, np.float32), "zero")]
    inits = [t for t in inits if any(t.name in n.input for n in nodes)]
    model = helper.make_model(helper.make_graph(nodes, "g", [_vi("x", ["N", 8])], [_vi("logits", ["N", 4])], inits),
                              opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def test_if_nodes_ort_training_aborts_on_are_refused_and_the_others_pass(tmp_path):
    """ORT 1.19.2 kills the process (C++ assertion, SIGABRT) building the gradient graph when an
    If/Loop the trained output depends on reads, from the outer graph, a value a node computes;
    outer reads of inputs, initializers and Constant nodes, and Ifs the output does not depend
    on, train (each case checked against generate_artifacts in a subprocess)."""
    from admm_onnx.errors import TrainingError
    from admm_onnx.graph.analysis import analyse
    from admm_onnx.graph.differentiable import check_differentiable, outer_reads
    from admm_onnx.losses import ClassifierLoss
    from admm_onnx.training import build_artifacts

    mm1 = helper.make_node("MatMul", ["x", "w1"], ["h"])
    mm2 = helper.make_node("MatMul", ["hi", "w2"], ["logits"])
    refused = {
        # a trained weight's value flows into the branches: no gradient for If
        "differentiate through If (node 'branch'): its branches read 'h'": _if_model("h", [mm1], [mm2]),
        # the branches read a computed value, upstream of every weight: ORT aborts all the same
        "through If (node 'branch'): its branches read 'h' (computed by node 'h')":
            _if_model("h", [helper.make_node("Relu", ["x"], ["h"], name="h")],
                      [helper.make_node("MatMul", ["hi", "w1"], ["h2"]), helper.make_node("MatMul", ["h2", "w2"], ["logits"])]),
    }
    for expect, model in refused.items():
        with pytest.raises(TrainingError, match=expect.replace("(", r"\(").replace(")", r"\)")):
            check_differentiable(model, analyse(model).trainable, "logits")
    # the branches read the graph input: trains
    fine = _if_model("x", None, [helper.make_node("MatMul", ["hi", "w1"], ["h2"]), helper.make_node("Relu", ["h2"], ["r"]),
                                 helper.make_node("MatMul", ["r", "w2"], ["logits"])])
    assert outer_reads(fine.graph.node[2]) == ["x"]
    trainable = analyse(fine).trainable
    check_differentiable(fine, trainable, "logits")
    build_artifacts(fine, tmp_path / "a", trainable, ClassifierLoss(), "logits")  # would abort if wrong
    assert (tmp_path / "a" / "training_model.onnx").exists()


def test_prune_and_train_refuse_an_if_on_the_gradient_path_up_front(room):  # noqa: F811
    """Sweep 6 #6: prune/train of a valid model with an If after a weight aborted inside ONNX
    Runtime (exit 134, a C++ assertion, OUT.admm-work left); now one line before any work
    directory or sweep, while eval, inspect and export still take the model."""
    then = helper.make_graph([helper.make_node("MatMul", ["h", "wt"], ["o_t"])], "then", [], [_vi("o_t", None)])
    other = helper.make_graph([helper.make_node("MatMul", ["h", "we"], ["o_e"])], "else", [], [_vi("o_e", None)])
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("ReduceSum", ["x"], ["sx"], keepdims=0),
             helper.make_node("Greater", ["sx", "zero"], ["cond"]),
             helper.make_node("If", ["cond"], ["logits"], name="pick", then_branch=then, else_branch=other)]
    inits = [_w("w1", (8, 16)), _w("wt", (16, 4)), _w("we", (16, 4)), numpy_helper.from_array(np.array(-1e9, np.float32), "zero")]
    model = helper.make_model(helper.make_graph(nodes, "g", [_vi("x", ["N", 8])], [_vi("logits", ["N", 4])], inits),
                              opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.save(model, room / "if.onnx")
    rng = np.random.default_rng(0)
    np.savez(room / "f.npz", x=rng.standard_normal((64, 8)).astype(np.float32), labels=rng.integers(0, 4, 64))
    expect = "ONNX Runtime training cannot differentiate through If (node 'pick')"
    common = ["-d", "@/f.npz", "--batch-size", "16", "-q"]
    room.probe(["prune", "@/if.onnx", "-o", "@/o.onnx", "--sparsity", "0.5", "--admm-iters", "1",
                "--retrain-epochs", "0", *common], expect)
    room.probe(["prune", "@/if.onnx", "-o", "@/o.onnx", "--compression", "2", "--admm-iters", "1",
                "--retrain-epochs", "0", "--workers", "1", *common], expect)  # before the sensitivity sweep
    room.probe(["train", "@/if.onnx", "-o", "@/t.onnx", "--epochs", "1", *common], expect)
    assert main(room.argv(["eval", "@/if.onnx", "-d", "@/f.npz"])) == 0
    assert main(room.argv(["inspect", "@/if.onnx"])) == 0
    assert main(room.argv(["export", "@/if.onnx", "-o", "@/e.onnx", "--format", "qdq", "-d", "@/f.npz"])) == 0


def _f64_model(path, weights=np.float64, inner=None):
    """MatMul -> [Relu] -> MatMul with ``weights``-typed initializers and a float64 input, or
    with ``inner`` a float32 model computing one Add in float64 between Casts."""
    rng = np.random.default_rng(0)
    if inner:
        nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Cast", ["h"], ["hd"], to=TensorProto.DOUBLE),
                 helper.make_node("Add", ["hd", "hd"], ["ad"]), helper.make_node("Cast", ["ad"], ["af"], to=TensorProto.FLOAT),
                 helper.make_node("MatMul", ["af", "w2"], ["logits"])]
        elem = TensorProto.FLOAT
    else:
        nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["hr"]),
                 helper.make_node("MatMul", ["hr", "w2"], ["logits"])]
        elem = TensorProto.DOUBLE
    inits = [numpy_helper.from_array((rng.standard_normal(s) * 0.3).astype(weights), n) for n, s in [("w1", (8, 16)), ("w2", (16, 4))]]
    model = helper.make_model(helper.make_graph(nodes, "g", [_vi("x", ["N", 8], elem)], [_vi("logits", ["N", 4], elem)], inits),
                              opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, path)
    return model


def test_a_float64_model_is_refused_before_any_training_or_sweep(room):  # noqa: F811
    """Sweep 6 #11c: prune/train of a float64 model ended in ORT's 'Could not find an
    implementation for ReluGrad(1)' (InPlaceAccumulatorV2 for a model without Relu), with
    --compression only after the whole sensitivity sweep. Now one line up front; eval still runs it."""
    _f64_model(room / "f64.onnx")
    rng = np.random.default_rng(1)
    np.savez(room / "f.npz", x=rng.standard_normal((64, 8)), labels=rng.integers(0, 4, 64))
    expect = "ONNX Runtime training needs float32 weights and activations; this model's weights 'w1', 'w2' are float64"
    common = ["-d", "@/f.npz", "--batch-size", "16", "-q"]
    room.probe(["prune", "@/f64.onnx", "-o", "@/o.onnx", "--sparsity", "0.5", "--admm-iters", "1", *common], expect)
    room.probe(["prune", "@/f64.onnx", "-o", "@/o.onnx", "--compression", "2", "--workers", "1", "--admm-iters", "1",
                *common], expect)
    room.probe(["train", "@/f64.onnx", "-o", "@/t.onnx", "--epochs", "1", *common], expect)
    assert main(room.argv(["eval", "@/f64.onnx", "-d", "@/f.npz"])) == 0


def test_float32_weights_with_a_float64_add_still_train(tmp_path):
    """Refuse only what fails: float32 weights computing an Add in double between Casts train."""
    from admm_onnx.graph.analysis import analyse
    from admm_onnx.graph.differentiable import check_differentiable
    from admm_onnx.losses import ClassifierLoss
    from admm_onnx.training import Trainer, build_artifacts

    model = _f64_model(tmp_path / "mix.onnx", np.float32, inner=True)
    trainable = analyse(model).trainable
    assert trainable == ["w1", "w2"]
    check_differentiable(model, trainable, "logits")
    build_artifacts(model, tmp_path / "a", trainable, ClassifierLoss(), "logits")
    Trainer(tmp_path / "a").close()  # the training session loads


def _run_as_worker(code: str):
    """``code`` run in a fresh interpreter started as the pools start their workers (the
    start-up signals blocked): the finished process."""
    import subprocess
    import sys

    from admm_onnx.interrupts import children_with_start_signals_blocked

    with children_with_start_signals_blocked():
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_resume_takes_a_work_directory_that_recorded_defaults_unresolved(room, monkeypatch):  # noqa: F811
    """Versions before 2026-12-05 saved --model-output and --loss as given (None, 'auto'); the
    current one saves what they resolved to, and refused to resume such a folder as changed."""
    argv = _interrupt_a_prune_after(room, monkeypatch, "write_progress", 2, admm_iters=2)
    run = room / "o.onnx.admm-work" / "run.json"
    saved = json.loads(run.read_text())
    saved["config"]["output"], saved["config"]["loss"] = None, "auto"
    run.write_text(json.dumps(saved))
    room.probe(argv + ["--resume", "--loss", "mse"], "--loss")  # a setting other than the default is still refused
    assert main(room.argv(argv + ["--resume"])) == 0


def _with_interrupt_handler(fn):
    """``fn()`` with the CLI's SIGINT handler installed (signals held in deferred sections)."""
    import signal

    from admm_onnx import interrupts

    previous = signal.signal(signal.SIGINT, interrupts.handler)
    try:
        return fn()
    finally:
        signal.signal(signal.SIGINT, previous)
        interrupts.reset()


def test_an_interrupt_while_earlier_files_are_set_aside_leaves_the_folder_as_it_was(tmp_path, monkeypatch):
    """claim_output_folder moved an earlier file aside, then a Ctrl-C before it was recorded:
    the file was missing and its hidden backup left."""
    import signal

    from admm_onnx import io

    out = tmp_path / "out"
    with io.claim_output_folder(out, ["a.onnx", "b.json"]) as folder:  # an earlier run
        (folder / "a.onnx").write_text("earlier a")
        (folder / "b.json").write_text("earlier b")
    real = os.replace

    def replace(a, b):
        real(a, b)
        if str(b).endswith(".admm-previous"):
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(io.os, "replace", replace)

    def run():
        with pytest.raises(KeyboardInterrupt):
            with io.claim_output_folder(out, ["a.onnx", "b.json"]):
                pass

    _with_interrupt_handler(run)
    assert sorted(os.listdir(out)) == [FOLDER_MARK, "a.onnx", "b.json"]
    assert (out / "a.onnx").read_text() == "earlier a" and (out / "b.json").read_text() == "earlier b"


def test_an_output_folder_mark_that_is_a_link_is_refused_and_left(tmp_path):
    """The mark was written through a user's dangling link (a file outside the folder), and the
    link deleted when the run was interrupted."""
    from admm_onnx import io
    from admm_onnx.errors import OutputError

    out = tmp_path / "out"
    out.mkdir()
    os.symlink(tmp_path / "elsewhere", out / FOLDER_MARK)
    with pytest.raises(OutputError, match="not a regular file"):
        with io.claim_output_folder(out, ["a.onnx"]):
            pass
    assert os.path.islink(out / FOLDER_MARK) and not os.path.lexists(tmp_path / "elsewhere")


def test_an_interrupt_just_after_an_output_is_renamed_into_place_still_takes_it_back(tmp_path, monkeypatch):
    """The output was renamed into place, then registered as this run's: a signal between the two
    kept it (a half set of outputs after the interrupt)."""
    import signal

    from admm_onnx import io

    plan = io.OutputPlan()
    target = plan.add_output(tmp_path / "r.json", "--report")
    real = os.replace

    def replace(a, b):
        real(a, b)
        if str(b) == str(target):
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(io.os, "replace", replace)

    def run():
        with pytest.raises(KeyboardInterrupt):
            io.write_text(target, "{}")

    _with_interrupt_handler(run)
    assert plan.remove_created() == [target] and os.listdir(tmp_path) == []


def _if_on_condition(condition_nodes, condition_inits=()):
    """x [N, 8] -> MatMul w1 -> h; If(c) then h @ wt else h @ we (branches read h, computed in
    the main graph)."""
    rng = np.random.default_rng(0)
    v = helper.make_tensor_value_info

    def branch(name, w):
        return helper.make_graph([helper.make_node("MatMul", ["h", w], [name])], name, [], [v(name, TensorProto.FLOAT, None)])

    weights = [numpy_helper.from_array((rng.standard_normal(s) * .3).astype(np.float32), n)
               for n, s in [("w1", (8, 16)), ("wt", (16, 4)), ("we", (16, 4))]]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), *condition_nodes,
             helper.make_node("If", ["c"], ["y"], then_branch=branch("t", "wt"), else_branch=branch("e", "we"))]
    graph = helper.make_graph(nodes, "g", [v("x", TensorProto.FLOAT, ["N", 8])], [v("y", TensorProto.FLOAT, ["N", 4])],
                              weights + list(condition_inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_an_if_decided_before_any_data_is_not_refused_for_training():
    """ORT folds an If whose condition comes from initializers, constants or static shapes (a
    scripted `if x.shape[1] == 8`); the up-front check refused it, though it pruned before."""
    from admm_onnx.errors import TrainingError
    from admm_onnx.graph.differentiable import check_differentiable

    eight = numpy_helper.from_array(np.array([8], np.int64), "eight")
    shape_if = _if_on_condition([helper.make_node("Shape", ["x"], ["sh"], start=1),
                          helper.make_node("Equal", ["sh", "eight"], ["c"])], [eight])
    const_if = _if_on_condition([], [numpy_helper.from_array(np.array(True), "c")])
    for model in (shape_if, const_if):
        check_differentiable(model, ["w1", "wt", "we"], "y")
    batch_if = _if_on_condition([helper.make_node("Shape", ["x"], ["sh"]),  # the batch size: known at run time only
                          helper.make_node("ReduceSum", ["sh"], ["s"], keepdims=0),
                          helper.make_node("Greater", ["s", "eight"], ["c"])], [eight])
    data_if = _if_on_condition([helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
                         helper.make_node("Greater", ["s", "zero"], ["c"])],
                        [numpy_helper.from_array(np.array(0.0, np.float32), "zero")])
    for model in (batch_if, data_if):
        with pytest.raises(TrainingError, match="If"):
            check_differentiable(model, ["w1", "wt", "we"], "y")


@pytest.mark.parametrize("model", ["m.onnx", "ext.onnx"])
def test_an_interrupted_rerun_gives_back_the_earlier_outputs_it_replaced(room, monkeypatch, model):  # noqa: F811
    """A re-run into existing outputs, interrupted after -o was replaced but before --report:
    the new -o (with the old report) stayed, a half set; now the earlier files come back."""
    from fs_snapshot import snapshot

    argv = ["prune", f"@/{model}", "-d", "@/d.npz", "-o", "@/o.onnx", "--report", "@/r.json", *QUICK]
    assert main(room.argv(argv + ["--sparsity", "0.5"])) == 0
    before = snapshot(room.root)
    restore = _stop_before_the_final_writes(monkeypatch)
    assert main(room.argv(argv + ["--sparsity", "0.9"])) == 130
    restore()
    after = snapshot(room.root)
    assert {k: v for k, v in after.items() if not k.startswith("o.onnx.admm-work")} == before
    assert main(room.argv(argv + ["--sparsity", "0.9", "--resume"])) == 0  # then completed: no hidden file left
    assert not [p for p in os.listdir(room.root) if p.startswith(".")]
    assert snapshot(room.root)["r.json"] != before["r.json"]  # the new set


def test_train_interrupted_after_its_output_is_written_gives_the_earlier_one_back(room, monkeypatch):  # noqa: F811
    import signal

    from admm_onnx import io

    (room / "t.onnx").write_bytes(b"my earlier model")
    real = io._wrote

    def wrote(path):
        real(path)
        if str(path).endswith("t.onnx"):
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(io, "_wrote", wrote)
    assert main(room.argv(["train", "@/m.onnx", "-d", "@/d.npz", "-o", "@/t.onnx", "--epochs", "1", "-q"])) == 130
    assert (room / "t.onnx").read_bytes() == b"my earlier model"
    assert not [p for p in os.listdir(room.root) if p.startswith(".") or p.endswith(".admm-work")]


def test_a_second_signal_does_not_cut_the_first_ones_clean_up_short():
    """timeout signals the run, then its whole group: the second SIGTERM arrived while the first
    one's clean-up gave the earlier outputs back, and skipped it."""
    import signal

    from admm_onnx import interrupts

    def run():
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # the clean-up goes on
        with interrupts.deferred():
            pass  # nor is it raised later

    _with_interrupt_handler(run)

    def again():  # a new command (reset) takes its first interrupt again
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)

    _with_interrupt_handler(again)


def test_an_if_on_a_trained_weight_is_not_taken_for_one_decided_before_data():
    from admm_onnx.errors import TrainingError
    from admm_onnx.graph.differentiable import check_differentiable

    model = _if_on_condition([helper.make_node("ReduceSum", ["w1"], ["s"], keepdims=0),
                              helper.make_node("Greater", ["s", "zero"], ["c"])],
                             [numpy_helper.from_array(np.array(0.0, np.float32), "zero")])
    check_differentiable(model, ["wt", "we"], "y")  # w1 frozen: the condition is a constant to ORT
    with pytest.raises(TrainingError, match="If"):
        check_differentiable(model, ["w1", "wt", "we"], "y")


@pytest.mark.parametrize("case", ["symlink", "no hard links", "another program"])
def test_giving_back_a_replaced_output(tmp_path, monkeypatch, case):
    from admm_onnx import io

    out = tmp_path / "o.json"
    if case == "symlink":
        (tmp_path / "target.json").write_text("the user's")
        os.symlink("target.json", out)
    else:
        out.write_text("earlier")
    if case == "no hard links":
        def no_link(*a, **k):
            raise PermissionError(1, "Operation not permitted")
        monkeypatch.setattr(io.os, "link", no_link)
    plan = io.OutputPlan()
    plan.add_output(out, "--report")
    plan.keep_previous()
    io.write_text(out, "this run's")
    if case == "another program":  # written beside, then renamed over it (another file, not ours)
        (tmp_path / "other.tmp").write_text("another program's")
        os.replace(tmp_path / "other.tmp", out)
    plan.remove_created()
    if case == "symlink":
        assert os.readlink(out) == "target.json" and out.read_text() == "the user's"
    elif case == "another program":
        assert out.read_text() == "another program's"
    else:
        assert out.read_text() == "earlier"
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]


def test_train_interrupted_between_its_training_and_its_last_line_gives_the_earlier_model_back(room, monkeypatch):  # noqa: F811
    (room / "t.onnx").write_bytes(b"my earlier model")
    restore = _stop_before_the_final_writes(monkeypatch)
    assert main(room.argv(["train", "@/m.onnx", "-d", "@/d.npz", "-o", "@/t.onnx", "--epochs", "1", "-q"])) == 130
    restore()
    assert (room / "t.onnx").read_bytes() == b"my earlier model"
    assert not [p for p in os.listdir(room.root) if p.startswith(".") or p.endswith(".admm-work")]


def test_a_dead_pool_worker_is_an_interrupt_or_one_line_not_a_bug():
    """A group SIGTERM killed the sensitivity workers before this process's own signal arrived:
    BrokenProcessPool ended the run as an internal error (exit 1)."""
    import signal
    import threading
    from concurrent.futures import Future
    from concurrent.futures.process import BrokenProcessPool

    from admm_onnx.allocation.runners import _result
    from admm_onnx.errors import AdmmOnnxError

    fut = Future()
    fut.set_exception(BrokenProcessPool("A child process terminated abruptly"))
    with pytest.raises(AdmmOnnxError, match="worker process of the sweep died"):
        _result(fut)

    def run():
        threading.Timer(0.2, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT)).start()
        with pytest.raises(KeyboardInterrupt):
            _result(fut)

    _with_interrupt_handler(run)


def test_of_two_held_signals_the_first_one_counts():
    from admm_onnx import interrupts

    try:
        with pytest.raises(KeyboardInterrupt) as raised:
            with interrupts.deferred():
                interrupts.handler(2, None)
                interrupts.handler(15, None)
        assert not isinstance(raised.value, interrupts.Signalled)  # SIGINT's (exit 130), not SIGTERM's
    finally:
        interrupts.reset()
