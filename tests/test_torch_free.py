"""The tool runs with torch absent, and the artifacts it builds load in ORT 1.19.2."""
import importlib.util
import subprocess
import sys
import textwrap

import onnx
import pytest
from onnx import helper

from admm_onnx.graph.ir_version import MAX_IR_VERSION, normalise_ir, normalise_ir_file

TORCH_INSTALLED = importlib.util.find_spec("torch") is not None
needs_no_torch = pytest.mark.skipif(
    TORCH_INSTALLED, reason="torch is installed here; the fresh CI machine has none (pip uninstall torch to run)"
)


@needs_no_torch
def test_prune_runs_without_torch(tmp_path, mlp_small, data_npz):
    script = textwrap.dedent(
        f"""
        import sys
        from admm_onnx.cli.main import main
        code = main([
            "prune", r"{mlp_small}", "-d", r"{data_npz}", "-o", r"{tmp_path / 'out.onnx'}",
            "--sparsity", "0.5", "--admm-iters", "1", "--retrain-epochs", "1", "--quiet",
        ])
        assert code == 0, code
        assert "torch" not in sys.modules
        import onnxruntime.training.api, onnxruntime.training.artifacts  # the torch-free stubs
        print("TORCH-FREE-OK")
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "TORCH-FREE-OK" in proc.stdout
    assert (tmp_path / "out.onnx").exists()


@needs_no_torch
def test_plain_onnxruntime_training_import_would_need_torch():
    """Documents why _ort.py exists: the package __init__ imports torch (ORT issue 22070)."""
    script = "import onnxruntime.training\n"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "torch" in proc.stderr


def test_ir_version_is_normalised(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 11
    assert normalise_ir(model) and model.ir_version == MAX_IR_VERSION
    model.ir_version = 11
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    assert normalise_ir_file(path)
    assert onnx.load(path).ir_version == MAX_IR_VERSION
    assert not normalise_ir_file(path)


def test_generated_artifacts_load_in_ort(tmp_path, mlp_small):
    from admm_onnx.graph.analysis import analyse
    from admm_onnx.losses import ClassifierLoss
    from admm_onnx.training import Trainer, build_artifacts

    model = onnx.load(mlp_small)
    build_artifacts(model, tmp_path, analyse(model).trainable, ClassifierLoss(), "logits")
    for name in ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx"):
        assert onnx.load(tmp_path / name).ir_version <= MAX_IR_VERSION
    Trainer(tmp_path)  # loads all three in ORT
