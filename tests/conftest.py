"""Shared fixtures: tiny models and tiny learnable data sets, built in code, in tmp dirs."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest

from admm_onnx.data import Dataset
from admm_onnx.models import build

MNIST_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
if not MNIST_DIR.is_dir():  # CI: shared/ sits beside the clone
    MNIST_DIR = Path(os.environ.get("ADMM_ONNX_MNIST", MNIST_DIR))


def blobs(n: int = 600, classes: int = 4, shape=(1, 8, 8), seed: int = 0) -> Dataset:
    """Gaussian class blobs: learnable in a few epochs by any of our models."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((classes, int(np.prod(shape)))).astype(np.float32)
    y = rng.integers(0, classes, n)
    x = centers[y] + 0.5 * rng.standard_normal((n, centers.shape[1])).astype(np.float32)
    x = x.reshape((n, *shape)).astype(np.float32)
    cut = int(n * 0.8)
    return Dataset(x[:cut], y[:cut], x[cut:], y[cut:], name="blobs")


@pytest.fixture
def data() -> Dataset:
    return blobs()


@pytest.fixture
def data_npz(tmp_path, data) -> Path:
    path = tmp_path / "data.npz"
    np.savez(path, x_train=data.x_train, y_train=data.y_train, x_test=data.x_test, y_test=data.y_test)
    return path


@pytest.fixture
def lenet5_small(tmp_path) -> Path:
    """LeNet-5 for 1x8x8 inputs and 4 classes, saved to a tmp file."""
    path = tmp_path / "lenet5.onnx"
    onnx.save(build("lenet5", input_shape=(1, 8, 8), num_classes=4), path)
    return path


@pytest.fixture
def mlp_small(tmp_path) -> Path:
    path = tmp_path / "mlp.onnx"
    onnx.save(build("lenet300-100", input_shape=(1, 8, 8), num_classes=4), path)
    return path


@pytest.fixture(scope="session")
def deploy_env():
    """Plain onnxruntime (the newest release) in ``.venv-deploy``, created on first use (see
    tests/deploy_env.py). Skipped only when ADMM_ONNX_NO_DEPLOY_ENV=1; a runtime that cannot be
    created fails the tests that need it."""
    from deploy_env import SKIP_VAR, DeployEnvError, get_env

    if os.environ.get(SKIP_VAR) == "1":
        pytest.skip(f"{SKIP_VAR}=1: deployment runtime checks skipped")
    try:
        return get_env()
    except DeployEnvError as exc:
        pytest.fail(f"deployment runtime unavailable (set {SKIP_VAR}=1 to skip deliberately): {exc}")
