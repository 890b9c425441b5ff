"""`eval` reads a model as prune does: IR 11 / opset 22 files that use nothing newer are lowered
for ONNX Runtime 1.19 (graph/opset.py), not refused by the session after the model was accepted."""
from __future__ import annotations

import numpy as np
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from admm_onnx.cli.main import cli, main


def _identity_gemm(opset: int, ir: int):
    """y = x @ eye(4, 3): the first three features."""
    w = np.eye(4, 3, dtype=np.float32)
    g = helper.make_graph([helper.make_node("Gemm", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], [numpy_helper.from_array(w, "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = ir
    return m


def test_eval_lowers_an_ir11_model_like_prune(tmp_path):
    m = _identity_gemm(opset=21, ir=11)
    path = tmp_path / "ir11.onnx"
    path.write_bytes(m.SerializeToString())
    x = np.random.default_rng(0).random((40, 4)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=np.argmax(x[:, :3], axis=1))
    before = path.read_bytes()
    result = CliRunner().invoke(cli, ["eval", str(path), "-d", str(tmp_path / "d.npz")])
    assert result.exit_code == 0, result.output
    assert "Top-1 100.00%" in result.output  # y = argmax of the first three features: the identity Gemm
    assert path.read_bytes() == before


def test_eval_without_labels_is_one_line(tmp_path, capsys):
    m = _identity_gemm(opset=17, ir=8)
    (tmp_path / "m.onnx").write_bytes(m.SerializeToString())
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(0).random((600, 4)).astype(np.float32))
    assert main(["eval", str(tmp_path / "m.onnx"), "-d", str(tmp_path / "d.npz")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "has none" in err[0]
