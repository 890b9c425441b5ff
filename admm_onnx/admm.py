"""The ADMM engine: Z, U and rho per weight, kept in NumPy, written into an ORT checkpoint.

Problem: minimise f(W) subject to W_i in S_i (at most k_i nonzeros), split as
f(W) + sum_i g_i(Z_i) with W_i = Z_i. In scaled form, per iteration k:

    W^{k+1} = argmin f(W) + sum_i rho_i/2 ||W_i - Z_i^k + U_i^k||^2   (SGD epochs in ORT)
    Z^{k+1} = Proj_S(W^{k+1} + U^k)                                    (projection.py)
    U^{k+1} = U^k + W^{k+1} - Z^{k+1}

The first step runs in the ORT training graph (graph/penalty.py), reading T = Z - U and rho
from frozen checkpoint parameters that :meth:`AdmmState.write` rewrites once per iteration.
When rho grows (rho <- rho * growth) the scaled dual is rescaled, U <- U / growth, so the
unscaled multiplier rho * U is unchanged (Boyd et al. 2011, section 3.4.1).

Residuals, both relative to ||W||: primal ||W - Z|| (how far the weights are from the
sparse set) and dual rho-free ||Z^{k+1} - Z^k|| (how much the sparse target still moves).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping

import numpy as np

from .config import WeightPlan
from .errors import TrainingError
from .graph.penalty import rho_name, target_name
from .projection import project, projection_mask

log = logging.getLogger(__name__)


def _parameters(state):
    """Accept an ORT ``CheckpointState`` or anything holding one as ``.state``."""
    return getattr(state, "state", state).parameters


@dataclass
class Residual:
    primal: float
    dual: float


class AdmmState:
    """Z, U and rho for each weight of ``plan``; reads W from, and writes T/rho to, a checkpoint."""

    def __init__(self, plan: Mapping[str, WeightPlan], rho_growth: float = 1.0):
        self.plan: Dict[str, WeightPlan] = dict(plan)
        self.rho_growth = float(rho_growth)
        self.Z: Dict[str, np.ndarray] = {}
        self.U: Dict[str, np.ndarray] = {}
        self.rho: Dict[str, float] = {n: p.rho for n, p in self.plan.items()}
        self.iteration = 0
        self.history: List[Dict[str, Residual]] = []

    # -- projection ------------------------------------------------------------------
    def _project(self, name: str, x: np.ndarray) -> np.ndarray:
        p = self.plan[name]
        return project(x, p.sparsity, p.structure, p.out_axis, p.in_axis)

    def mask(self, name: str, w: np.ndarray) -> np.ndarray:
        """0/1 mask of the projection of ``w`` for weight ``name``."""
        p = self.plan[name]
        return projection_mask(w, p.sparsity, p.structure, p.out_axis, p.in_axis)

    # -- state transitions ------------------------------------------------------------
    def initialize(self, weights: Mapping[str, np.ndarray]) -> None:
        """Z0 = Proj(W0), U0 = 0."""
        for name in self.plan:
            w = np.asarray(weights[name])
            self.Z[name] = self._project(name, w)
            self.U[name] = np.zeros_like(w)
        self.iteration = 0
        self.history = []

    def read_weights(self, state) -> Dict[str, np.ndarray]:
        params = _parameters(state)
        return {name: np.array(params[name].data) for name in self.plan}

    def write(self, state) -> None:
        """Write T = Z - U and rho into the checkpoint's frozen parameters."""
        params = _parameters(state)
        for name in self.plan:
            target = params[target_name(name)].data
            params[target_name(name)].data = (self.Z[name] - self.U[name]).astype(target.dtype, copy=False)
            r = params[rho_name(name)].data
            params[rho_name(name)].data = np.full(r.shape, self.rho[name], dtype=r.dtype)

    def update(self, state) -> Dict[str, Residual]:
        """One Z/U update from the weights now in ``state``; rewrites the frozen targets.

        Returns the residuals of this iteration (also appended to :attr:`history`).
        """
        if not self.Z:
            raise RuntimeError("AdmmState.update() before initialize()")
        weights = self.read_weights(state)
        residuals = {}
        for name, w in weights.items():
            if not np.isfinite(w).all():
                raise TrainingError(f"weight {name} contains NaN/Inf", hint="lower --lr or --rho")
            z_new = self._project(name, w + self.U[name])
            u = self.U[name] + w - z_new
            norm = float(np.linalg.norm(w)) or 1.0
            residuals[name] = Residual(
                primal=float(np.linalg.norm(w - z_new)) / norm,
                dual=float(np.linalg.norm(z_new - self.Z[name])) / norm,
            )
            self.Z[name] = z_new
            self.U[name] = u / self.rho_growth
            self.rho[name] *= self.rho_growth
        self.iteration += 1
        self.history.append(residuals)
        self.write(state)
        return residuals

    def residuals(self) -> Dict[str, Residual]:
        """Residuals of the last update (empty before the first)."""
        return self.history[-1] if self.history else {}

    def hard_prune(self, state) -> Dict[str, np.ndarray]:
        """Project the current weights (not Z) and write them back pruned; returns the 0/1 masks."""
        params = _parameters(state)
        masks = {}
        for name, w in self.read_weights(state).items():
            m = self.mask(name, w)
            params[name].data = np.where(m, w, np.zeros_like(w))
            masks[name] = m
        return masks

    def disable(self, state) -> None:
        """Set every rho in the checkpoint to 0: the graph then trains on the base loss only."""
        params = _parameters(state)
        for name in self.plan:
            r = params[rho_name(name)].data
            params[rho_name(name)].data = np.zeros(r.shape, dtype=r.dtype)

    # -- persistence --------------------------------------------------------------------
    def save(self, path) -> None:
        arrays = {}
        for name in self.plan:
            arrays[f"Z/{name}"] = self.Z[name]
            arrays[f"U/{name}"] = self.U[name]
            arrays[f"rho/{name}"] = np.float64(self.rho[name])
        arrays["__iteration__"] = np.int64(self.iteration)
        arrays["__history__"] = np.array(
            [[[r.primal, r.dual] for r in it.values()] for it in self.history], dtype=np.float64
        ).reshape(len(self.history), len(self.plan), 2)
        np.savez(Path(path), **arrays)

    def load(self, path) -> "AdmmState":
        with np.load(Path(path), allow_pickle=False) as z:
            for name in self.plan:
                self.Z[name] = z[f"Z/{name}"]
                self.U[name] = z[f"U/{name}"]
                self.rho[name] = float(z[f"rho/{name}"])
            self.iteration = int(z["__iteration__"])
            hist = z["__history__"]
        names = list(self.plan)
        self.history = [{n: Residual(*map(float, it[i])) for i, n in enumerate(names)} for it in hist]
        return self
