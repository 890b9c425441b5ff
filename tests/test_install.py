"""Coexistence with plain ``onnxruntime``: detected at import, reported in one line.

The fast tests check the diagnosis on made-up install states and the way ``check()`` stops;
the slow one builds a fresh virtual environment that already has the newest plain
onnxruntime and installs admm-onnx into it as the README says.
"""
from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from admm_onnx import _install
from admm_onnx.errors import AdmmOnnxError, InstallError

REPO = Path(__file__).resolve().parents[1]


def test_training_build_alone_is_fine():
    assert _install.diagnose({"onnxruntime-training-cpu": "1.19.2"}, "onnxruntime-training-cpu") is None


def test_this_environment_is_fine():
    assert _install.problem() is None
    assert _install.module_build() == _install.TRAINING_DIST


@pytest.mark.parametrize("build", ["onnxruntime", "onnxruntime-training-cpu"])
def test_both_distributions_is_one_line_with_the_fix(build):
    line = _install.diagnose({"onnxruntime-training-cpu": "1.19.2", "onnxruntime": "1.23.2"}, build)
    assert line is not None and "\n" not in line
    assert "onnxruntime 1.23.2" in line and "own virtual environment" in line
    assert "pip uninstall -y onnxruntime onnxruntime-training-cpu" in line
    assert "pip install onnxruntime-training-cpu==1.19.2" in line


def test_the_line_names_what_to_install_from(monkeypatch):
    line = _install.diagnose({"onnxruntime-training-cpu": "1.19.2", "onnxruntime": "1.32.0"}, "onnxruntime",
                             source="/home/me/admm-onnx")
    assert "pip install /home/me/admm-onnx" in line and "pipx install /home/me/admm-onnx" in line


def test_install_source_is_the_folder_pip_was_given(monkeypatch, tmp_path):
    from importlib import metadata

    class Dist:
        def read_text(self, name):
            return '{"url": "file:///tmp/my%20clone", "dir_info": {}}' if name == "direct_url.json" else None

    monkeypatch.setattr(metadata, "distribution", lambda name: Dist())
    assert _install.install_source() == "'/tmp/my clone'"

    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", missing)
    assert _install.install_source() == "admm-onnx"


def test_plain_onnxruntime_only():
    line = _install.diagnose({"onnxruntime": "1.23.2"}, "onnxruntime")
    assert "needs onnxruntime-training-cpu==1.19.2" in line and "pip uninstall -y onnxruntime" in line


def test_module_of_another_build():
    line = _install.diagnose({"onnxruntime-training-cpu": "1.19.2"}, "onnxruntime-gpu")
    assert "built as onnxruntime-gpu" in line


def test_check_raises_an_import_error_from_python(monkeypatch):
    monkeypatch.setattr(_install, "problem", lambda: "plain onnxruntime beside the training build")
    monkeypatch.setattr(sys, "argv", ["python"])
    with pytest.raises(InstallError) as info:
        _install.check()
    assert isinstance(info.value, ImportError) and isinstance(info.value, AdmmOnnxError)


def test_check_from_the_command_is_one_line_and_exit_2(monkeypatch, capsys):
    monkeypatch.setattr(_install, "problem", lambda: "plain onnxruntime beside the training build")
    monkeypatch.setattr(sys, "argv", ["/venv/bin/admm-onnx", "--version"])
    with pytest.raises(SystemExit) as info:
        _install.check()
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err == "error: plain onnxruntime beside the training build\n"


def _run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=1500, **kw)


@pytest.mark.slow
def test_fresh_venv_with_newest_onnxruntime(tmp_path):
    """README's install into an environment that already has plain onnxruntime: works or one line."""
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    step = _run([str(py), "-m", "pip", "install", "-q", "onnxruntime"], env=env)
    if step.returncode != 0:
        pytest.skip(f"cannot install onnxruntime here: {step.stderr.strip().splitlines()[-1:]}")
    step = _run([str(py), "-m", "pip", "install", "-q", str(REPO)], env=env)  # README: pip install .
    assert step.returncode == 0, step.stderr
    cmd = env_dir / "bin" / "admm-onnx"
    result = _run([str(cmd), "--version"], env=env, cwd=tmp_path)
    if result.returncode == 0:
        assert "admm-onnx" in result.stdout
    else:
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr
        assert "onnxruntime" in lines[0] and "pip install onnxruntime-training-cpu==1.19.2" in lines[0]
        assert f"pip install {REPO}" in lines[0]  # where this admm-onnx came from, not a name on PyPI
    # and from Python: an ImportError that says the same
    result = _run([str(py), "-c", "import admm_onnx"], env=env, cwd=tmp_path)
    if result.returncode != 0:
        assert "InstallError" in result.stderr and "own virtual environment" in result.stderr
        # the repair the line gives works: run it in this environment, then every entry point does
        repair = lines[0].split("to repair this one: ", 1)[1]
        step = _run(["bash", "-c", repair], env={**env, "PATH": f"{env_dir / 'bin'}:{env.get('PATH', '')}"}, cwd=tmp_path)
        assert step.returncode == 0, step.stderr
        result = _run([str(cmd), "--version"], env=env, cwd=tmp_path)
        assert result.returncode == 0 and "admm-onnx" in result.stdout, result.stderr
        assert _run([str(py), "-c", "import admm_onnx"], env=env, cwd=tmp_path).returncode == 0
