"""The deployment runtime for tests and benches: plain ``onnxruntime`` in its own venv.

``onnxruntime`` (what users deploy with, 1.32 in 2026-12) and ``onnxruntime-training`` (what
admm-onnx trains with, 1.19.2) ship the same module name and cannot be installed together. So
the deployment runtime lives in ``.venv-deploy`` at the repository root (gitignored), created on
first use with ``python -m venv`` + ``pip install onnxruntime numpy`` (the newest releases), and
models run there through ``tests/deploy_runner.py`` in a subprocess.

Use::

    env = get_env()                      # creates .venv-deploy if missing
    res = env.run({"dense": "a.onnx", "csr": "b.onnx"}, {"input": x}, runs=300)
    res.outputs["csr"][0]                # first output on the whole batch
    res.ratio("csr", "dense")            # median over rounds of paired batch-1 time ratios

Environment variables:

- ``ADMM_ONNX_DEPLOY_PYTHON``: a python that already has ``onnxruntime`` and ``numpy``; used
  instead of ``.venv-deploy``.
- ``ADMM_ONNX_NO_DEPLOY_ENV=1``: tests needing the runtime are skipped (the ``deploy_env``
  fixture in ``conftest.py``). Without it a missing runtime (no network to create the venv)
  makes those tests fail, loudly, never skip.

``python tests/deploy_env.py`` creates the venv and prints the onnxruntime version (``.ci/run``
does this before the tests).
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Union

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv-deploy"
RUNNER = Path(__file__).resolve().parent / "deploy_runner.py"
#: Written last when the venv is complete; its absence means a half-made venv we may remove.
READY = ".admm-onnx-ready"
PACKAGES = ("onnxruntime", "numpy")
SKIP_VAR = "ADMM_ONNX_NO_DEPLOY_ENV"
PYTHON_VAR = "ADMM_ONNX_DEPLOY_PYTHON"


class DeployEnvError(RuntimeError):
    """The deployment runtime cannot be created or failed to run a model."""


@dataclass
class DeployResult:
    """What :meth:`DeployEnv.run` measured."""

    onnxruntime: str
    outputs: Dict[str, List[np.ndarray]]
    samples: Dict[str, List[float]] = field(default_factory=dict)
    create_s: Dict[str, float] = field(default_factory=dict)
    optimized: Dict[str, Optional[Path]] = field(default_factory=dict)

    def median(self, label: str) -> float:
        return statistics.median(self.samples[label])

    def ratio(self, label: str, reference: str) -> float:
        """Median over rounds of time(label) / time(reference), the two run back to back."""
        pairs = [a / b for a, b in zip(self.samples[label], self.samples[reference]) if b > 0]
        return statistics.median(pairs)


def _python_of(venv: Path) -> Path:
    return venv / "bin" / "python"


def _check(python: Path) -> str:
    out = subprocess.run(
        [str(python), "-c", "import onnxruntime, numpy; print(onnxruntime.__version__)"],
        capture_output=True, text=True, timeout=300,
    )
    if out.returncode != 0:
        raise DeployEnvError(f"{python} cannot import onnxruntime: {out.stderr.strip()[-500:]}")
    return out.stdout.strip()


def ensure_venv(venv: Path = VENV) -> Path:
    """Create ``venv`` with onnxruntime + numpy unless it is complete; return its python.

    Creation runs under a file lock (parallel test processes wait for one another). A venv
    without the ready marker is a half-made one of ours and is rebuilt; a folder that is not a
    venv at all is left alone and refused.
    """
    python = _python_of(venv)
    if (venv / READY).is_file() and python.exists():
        return python
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / (venv.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (venv / READY).is_file() and python.exists():
            return python
        if venv.exists():
            if not (venv / "pyvenv.cfg").is_file():
                raise DeployEnvError(f"{venv} exists and is not a venv; remove it or set {PYTHON_VAR}")
            shutil.rmtree(venv)  # a half-made venv of ours (no ready marker)
        steps = [
            [sys.executable, "-m", "venv", str(venv)],
            [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *PACKAGES],
        ]
        for cmd in steps:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
            if done.returncode != 0:
                raise DeployEnvError(
                    f"creating the deployment runtime failed: {' '.join(cmd)}\n{done.stderr.strip()[-2000:]}"
                )
        _check(python)
        (venv / READY).write_text("created by tests/deploy_env.py\n")
    return python


class DeployEnv:
    """A python with plain onnxruntime, and a way to run models in it."""

    def __init__(self, python: Union[str, Path]):
        self.python = Path(python)
        self.version = _check(self.python)

    def run(
        self,
        models: Mapping[str, Union[str, Path, "onnx.ModelProto"]],  # noqa: F821
        feeds: Mapping[str, np.ndarray],
        runs: int = 0,
        warmup: int = 20,
        threads: int = 1,
        optimized: bool = False,
        workdir: Optional[Union[str, Path]] = None,
    ) -> DeployResult:
        """Run every model on ``feeds`` (outputs), then time batch 1 interleaved ``runs`` times.

        Models are file paths or ModelProtos (saved to a temporary folder first). With
        ``optimized`` the graph each session runs is saved too (``result.optimized[label]``),
        which shows whether a decode subgraph was folded; it is kept in ``workdir``, which
        ``optimized`` therefore needs (nothing is left behind in the system's temp folder).
        """
        if optimized and workdir is None:
            raise ValueError("optimized=True needs a workdir to keep the optimized graphs in")
        with tempfile.TemporaryDirectory(prefix="admm-deploy-", dir=workdir) as tmp:
            tmp = Path(tmp)
            paths = {}
            for label, model in models.items():
                if isinstance(model, (str, Path)):
                    paths[label] = str(Path(model).resolve())
                else:
                    paths[label] = str(tmp / f"{label}.onnx")
                    with open(paths[label], "wb") as fh:
                        fh.write(model.SerializeToString())
            np.savez(tmp / "feeds.npz", **{k: np.asarray(v) for k, v in feeds.items()})
            keep = Path(workdir) if workdir is not None and optimized else None
            opt_dir = tmp / "optimized"
            if optimized:
                opt_dir.mkdir()
            req = {
                "models": paths, "feeds": str(tmp / "feeds.npz"), "outputs": str(tmp / "out.npz"),
                "runs": int(runs), "warmup": int(warmup) if runs else 0, "threads": int(threads),
                "optimized_dir": str(opt_dir) if optimized else None, "result": str(tmp / "result.json"),
            }
            (tmp / "request.json").write_text(json.dumps(req))
            done = subprocess.run([str(self.python), str(RUNNER), str(tmp / "request.json")],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                raise DeployEnvError(f"onnxruntime {self.version} failed:\n{done.stderr.strip()[-3000:]}")
            result = json.loads((tmp / "result.json").read_text())
            outputs: Dict[str, List[np.ndarray]] = {label: [] for label in models}
            with np.load(tmp / "out.npz") as data:
                for key in sorted(data.files, key=lambda k: (k.rsplit("/", 1)[0], int(k.rsplit("/", 1)[1]))):
                    label, _ = key.rsplit("/", 1)
                    outputs[label].append(data[key])
            opt_paths: Dict[str, Optional[Path]] = {}
            for label, info in result["models"].items():
                src = info.get("optimized")
                if src:
                    dest = keep / Path(src).name
                    shutil.copyfile(src, dest)
                    opt_paths[label] = dest
            return DeployResult(
                onnxruntime=result["onnxruntime"],
                outputs=outputs,
                samples={label: info["samples_s"] for label, info in result["models"].items()},
                create_s={label: info["create_s"] for label, info in result["models"].items()},
                optimized=opt_paths,
            )


_ENV: Optional[DeployEnv] = None


def get_env() -> DeployEnv:
    """The deployment runtime (``$ADMM_ONNX_DEPLOY_PYTHON`` or ``.venv-deploy``, created if missing)."""
    global _ENV
    if _ENV is None:
        python = os.environ.get(PYTHON_VAR)
        _ENV = DeployEnv(python if python else ensure_venv())
    return _ENV


if __name__ == "__main__":
    try:
        env = get_env()
    except DeployEnvError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(f"deployment runtime: onnxruntime {env.version} ({env.python})")
