"""The work directory of a pruning run: what it takes to resume after Ctrl-C, a crash or kill -9.

Layout::

    run.json          what run this is: model fingerprint, plan, config (written once)
    progress.json     the commit point: phase and step completed, the partial report
    admm/             ADMM training artifacts; admm/state.ckpt the ORT checkpoint (+ optimizer)
    admm_state.npz    Z, U, rho, residual history
    pruned.npz        trainable weights and masks right after the hard prune
    retrain/          masked retraining artifacts; retrain/state.ckpt

Every file is written to a temporary name and renamed; ``progress.json`` is written last, so
whatever it says is complete on disk.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np

from .errors import ConfigError
from .io import atomic_path


def fingerprint_file(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fingerprint_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class WorkDir:
    """Reads and writes the run state under ``path``."""

    def __init__(self, path):
        self.path = Path(path)

    # -- identity -------------------------------------------------------------------------
    @property
    def run_file(self) -> Path:
        return self.path / "run.json"

    @property
    def progress_file(self) -> Path:
        return self.path / "progress.json"

    def has_progress(self) -> bool:
        return self.progress_file.is_file()

    def start(self, identity: Dict[str, Any]) -> None:
        """Start a fresh run here (the directory must hold no earlier run's progress)."""
        self.path.mkdir(parents=True, exist_ok=True)
        for child in ("admm", "retrain"):
            shutil.rmtree(self.path / child, ignore_errors=True)
        for name in ("progress.json", "admm_state.npz", "pruned.npz"):
            (self.path / name).unlink(missing_ok=True)
        self.write_json(self.run_file, identity)

    def check_identity(self, identity: Dict[str, Any]) -> None:
        """Refuse to resume a work directory that belongs to another model or plan."""
        if not self.run_file.is_file() or not self.has_progress():
            raise ConfigError(f"nothing to resume in {self.path}", hint="run without --resume to start")
        saved = json.loads(self.run_file.read_text(encoding="utf-8"))
        for key in ("model", "plan"):
            if saved.get(key) != identity.get(key):
                raise ConfigError(
                    f"{self.path} holds a run of a different {'model' if key == 'model' else 'pruning plan'}",
                    hint="resume with the same model and rules, or delete the work directory",
                )

    # -- progress -------------------------------------------------------------------------
    def read_progress(self) -> Dict[str, Any]:
        return json.loads(self.progress_file.read_text(encoding="utf-8"))

    def write_progress(self, progress: Dict[str, Any]) -> None:
        self.write_json(self.progress_file, progress)

    # -- files ------------------------------------------------------------------------------
    def write_json(self, path: Path, data: Any) -> None:
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(data, indent=1, default=float), encoding="utf-8")

    def save_arrays(self, name: str, arrays: Dict[str, np.ndarray]) -> None:
        with atomic_path(self.path / name, suffix=".npz") as tmp:
            np.savez(tmp, **arrays)

    def load_arrays(self, name: str) -> Dict[str, np.ndarray]:
        with np.load(self.path / name, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    def save_state(self, state) -> None:
        """Save an :class:`~admm_onnx.admm.AdmmState` as ``admm_state.npz``."""
        with atomic_path(self.path / "admm_state.npz", suffix=".npz") as tmp:
            state.save(tmp)

    def checkpoint(self, phase: str) -> Path:
        return self.path / phase / "state.ckpt"

    def save_checkpoint(self, trainer, phase: str) -> None:
        target = self.checkpoint(phase)
        tmp = target.with_name(target.name + ".tmp")
        trainer.save_checkpoint(tmp)
        os.replace(tmp, target)

    def existing_checkpoint(self, phase: str) -> Optional[Path]:
        path = self.checkpoint(phase)
        return path if path.is_file() else None
