"""The ADMM engine: Z, U and rho per *variable*, kept in NumPy, written into an ORT checkpoint.

A variable is a constraint set and the tensors it spans (constraints.py: element top-k,
filter/channel slices, quantization levels, sparsity + levels, or any object with the same
protocol, e.g. a channel group over several tensors). Problem: minimise f(W) subject to
W_C in S_C for every constraint C, split as f(W) + sum_C g_C(Z_C) with W_C = Z_C. In scaled
form, per iteration k:

    W^{k+1} = argmin f(W) + sum_C rho_C/2 ||W_C - Z_C^k + U_C^k||^2   (SGD epochs in ORT)
    Z^{k+1} = Proj_S(W^{k+1} + U^k)                                    (constraint.project)
    U^{k+1} = U^k + W^{k+1} - Z^{k+1}

The first step runs in the ORT training graph (graph/penalty.py), reading T = Z - U and rho
from frozen checkpoint parameters that :meth:`AdmmState.write` rewrites once per iteration
(every tensor of a variable gets the variable's rho).

Residuals, both relative to ||W_C|| (norms summed over the variable's tensors): primal
``||W - Z||`` (how far the weights are from the set) and dual ``||Z^{k+1} - Z^k||`` (how much
the target still moves; rho-free).

Penalty (:class:`RhoPolicy`). Initial rho: a number, or ``None`` = *auto*:
:meth:`AdmmState.calibrate` sets ``rho_C = ratio * g_C / max(||W_C - Z_C||, 0.01 ||W_C||)``,
g_C the mean per-batch norm of the base loss's gradient on the variable's tensors. The penalty's
gradient rho (W - Z) then starts at ``ratio`` times the loss gradient, on every layer, whatever
the scale of the weights, the loss or the model; this is what makes one default work for
LeNet-5 and a transformer. After every update rho changes by a factor f (mode ``"balance"``,
residual balancing, Boyd et al. 2011 section 3.4.1, on the relative residuals r, s):
f = tau if r > mu s (the weights lag a target that has settled), 1/tau if s > mu r (the target
still moves much more than the weights lag), else 1; and 1 once r <= tol (converged, held).
Mode ``"growth"``: f = growth every iteration (the paper's schedule). On every change the
scaled dual is rescaled, U <- U / f, so the unscaled multiplier rho * U is unchanged.

Stopping: :meth:`AdmmState.converged` is true when every variable's primal residual is at
most ``tol``; the pipeline then ends ADMM before its iteration cap.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Union

import numpy as np

from .constraints import Constraint, constraint_for
from .errors import TrainingError
from .graph.penalty import rho_name, target_name

log = logging.getLogger(__name__)

#: rho used when a variable has neither a number nor a calibration (low-level use only).
FALLBACK_RHO = 1e-3
#: The largest rho an update makes (the bound a configured rho has): residual balancing keeps
#: doubling rho once the dual residual is 0 (Z settled), until the penalty overflows.
RHO_MAX = 1e6


def _parameters(state):
    """Accept an ORT ``CheckpointState`` or anything holding one as ``.state``."""
    return getattr(state, "state", state).parameters


@dataclass
class Residual:
    primal: float
    dual: float


@dataclass(frozen=True)
class RhoPolicy:
    """How rho changes after each Z/U update (see the module docstring).

    ``mode``: ``"balance"`` (residual balancing with ``mu``, ``tau``) or ``"growth"`` (times
    ``growth`` every iteration). ``tol``: primal residual under which a variable counts as
    converged (its rho is then held in ``"balance"`` mode); 0 never counts as converged.
    """

    mode: str = "balance"
    growth: float = 1.3
    mu: float = 10.0
    tau: float = 2.0
    tol: float = 0.0
    stall: float = 0.0

    def factor(self, r: Residual, previous: Optional[Residual] = None) -> float:
        if self.mode == "growth":
            return self.growth
        if self.mode != "balance":
            raise ValueError(f"unknown rho mode {self.mode!r}")
        if self.tol > 0 and r.primal <= self.tol:
            return 1.0
        if r.primal > self.mu * r.dual:
            return self.tau
        if self.stall > 0 and previous is not None and r.primal > self.stall * previous.primal:
            return self.tau
        if r.dual > self.mu * r.primal:
            return 1.0 / self.tau
        return 1.0


@dataclass
class HardStep:
    """What the hard step did: 0/1 masks (support), tensors frozen entirely, report facts."""

    masks: Dict[str, np.ndarray]
    frozen: List[str]
    info: Dict[str, Dict[str, object]]


class AdmmState:
    """Z, U and rho for each variable; reads W from, and writes T/rho to, a checkpoint.

    ``plan``: a mapping weight -> :class:`~admm_onnx.config.WeightPlan` (one variable per
    weight, its constraint from :func:`~admm_onnx.constraints.constraint_for`, its rho from the
    plan), or a sequence of :class:`~admm_onnx.constraints.Constraint` objects. ``rho``: the
    initial rho for every variable, or a dict variable -> rho, overriding the plan's; a
    variable with none must be :meth:`calibrate` d. ``rho_growth`` alone keeps the paper's
    schedule (``RhoPolicy("growth", rho_growth)``); ``policy`` sets any other.
    """

    def __init__(
        self,
        plan: Union[Mapping[str, object], Sequence[Constraint]],
        rho_growth: float = 1.0,
        policy: Optional[RhoPolicy] = None,
        rho: Union[None, float, Mapping[str, float]] = None,
    ):
        if isinstance(plan, Mapping):
            self.plan = dict(plan)
            constraints = [constraint_for(p) for p in self.plan.values()]
            initial = {n: getattr(p, "rho", None) for n, p in self.plan.items()}
        else:
            self.plan = {}
            constraints = list(plan)
            initial = {}
        self.constraints: Dict[str, Constraint] = {}
        for c in constraints:
            if c.name in self.constraints:
                raise ValueError(f"two constraints named {c.name!r}")
            self.constraints[c.name] = c
        owner: Dict[str, str] = {}
        for c in constraints:
            for t in c.tensors:
                if t in owner:
                    raise ValueError(f"tensor {t!r} is in two constraints ({owner[t]!r}, {c.name!r})")
                owner[t] = c.name
        self.tensors: List[str] = list(owner)
        if isinstance(rho, Mapping):
            initial.update(rho)
        elif rho is not None:
            initial = {n: float(rho) for n in self.constraints}
        self.rho: Dict[str, Optional[float]] = {n: initial.get(n) for n in self.constraints}
        self.policy = policy or RhoPolicy("growth", growth=float(rho_growth))
        self.rho_growth = float(rho_growth)
        self.Z: Dict[str, np.ndarray] = {}
        self.U: Dict[str, np.ndarray] = {}
        self.iteration = 0
        self.history: List[Dict[str, Residual]] = []

    # -- projection ------------------------------------------------------------------
    def _project(self, name: str, x: np.ndarray) -> np.ndarray:
        """Projection of one single-tensor variable (kept for callers of the old API)."""
        return self.constraints[name].project({name: x})[name]

    def mask(self, name: str, w: np.ndarray) -> np.ndarray:
        """0/1 mask of the projection of ``w`` for the single-tensor variable ``name``."""
        return self.constraints[name].mask({name: w})[name]

    # -- state transitions ------------------------------------------------------------
    def initialize(self, weights: Mapping[str, np.ndarray]) -> None:
        """Z0 = Proj(W0), U0 = 0."""
        for c in self.constraints.values():
            values = {t: np.asarray(weights[t]) for t in c.tensors}
            self.Z.update(c.project(values))
            self.U.update({t: np.zeros_like(v) for t, v in values.items()})
        self.iteration = 0
        self.history = []

    def calibrate(self, grad_norms: Mapping[str, float], weights: Mapping[str, np.ndarray], ratio: float = 1.0,
                  only_unset: bool = True) -> Dict[str, float]:
        """Set rho from the base loss's gradient (after :meth:`initialize`; see the module docstring).

        ``grad_norms``: tensor -> mean per-batch ||dL/dW|| (rho = 0). Variables that already
        have a rho keep it when ``only_unset``. Returns the rho set per variable.
        """
        out = {}
        for name, c in self.constraints.items():
            if only_unset and self.rho[name] is not None:
                continue
            g = float(np.sqrt(sum(float(grad_norms[t]) ** 2 for t in c.tensors)))
            w = float(np.sqrt(sum(float(np.sum(np.square(np.asarray(weights[t], np.float64)))) for t in c.tensors)))
            d = float(np.sqrt(sum(float(np.sum(np.square(np.asarray(weights[t], np.float64) - self.Z[t])))
                                  for t in c.tensors)))
            denom = max(d, 1e-2 * w, 1e-12)
            rho = ratio * g / denom if g > 0 else FALLBACK_RHO
            self.rho[name] = float(rho)
            out[name] = float(rho)
        return out

    def read_weights(self, state) -> Dict[str, np.ndarray]:
        params = _parameters(state)
        return {name: np.array(params[name].data) for name in self.tensors}

    def write(self, state) -> None:
        """Write T = Z - U and rho into the checkpoint's frozen parameters."""
        params = _parameters(state)
        for name, c in self.constraints.items():
            rho = self.rho[name]
            if rho is None:
                log.warning("no rho for %s (not calibrated): using %g", name, FALLBACK_RHO)
                rho = self.rho[name] = FALLBACK_RHO
            for t in c.tensors:
                target = params[target_name(t)].data
                params[target_name(t)].data = (self.Z[t] - self.U[t]).astype(target.dtype, copy=False)
                r = params[rho_name(t)].data
                params[rho_name(t)].data = np.full(r.shape, rho, dtype=r.dtype)

    def update(self, state) -> Dict[str, Residual]:
        """One Z/U update from the weights now in ``state``; rewrites the frozen targets.

        Returns the residuals of this iteration per variable (also appended to :attr:`history`).
        """
        if not self.Z:
            raise RuntimeError("AdmmState.update() before initialize()")
        weights = self.read_weights(state)
        for t, w in weights.items():
            if not np.isfinite(w).all():
                raise TrainingError(f"weight {t} contains NaN/Inf", hint="lower --lr or --rho")
        residuals = {}
        for name, c in self.constraints.items():
            z_new = c.project({t: weights[t] + self.U[t] for t in c.tensors})
            norm = float(np.sqrt(sum(float(np.linalg.norm(weights[t])) ** 2 for t in c.tensors))) or 1.0
            primal = float(np.sqrt(sum(float(np.linalg.norm(weights[t] - z_new[t])) ** 2 for t in c.tensors)))
            dual = float(np.sqrt(sum(float(np.linalg.norm(z_new[t] - self.Z[t])) ** 2 for t in c.tensors)))
            r = Residual(primal=primal / norm, dual=dual / norm)
            residuals[name] = r
            prev = self.history[-1].get(name) if self.history else None
            f = self.policy.factor(r, prev)
            old = self.rho[name] if self.rho[name] is not None else FALLBACK_RHO
            if old * f > RHO_MAX:  # balancing doubles rho while the dual residual sits at 0: hold it
                f = max(1.0, RHO_MAX / old)
            for t in c.tensors:
                u = self.U[t] + weights[t] - z_new[t]
                self.Z[t] = z_new[t]
                self.U[t] = u / f if f != 1.0 else u
            self.rho[name] = old * f
        self.iteration += 1
        self.history.append(residuals)
        self.write(state)
        return residuals

    def residuals(self) -> Dict[str, Residual]:
        """Residuals of the last update (empty before the first)."""
        return self.history[-1] if self.history else {}

    def converged(self, tol: Optional[float] = None) -> bool:
        """True when every variable's last primal residual is at most ``tol`` (the policy's)."""
        tol = self.policy.tol if tol is None else tol
        last = self.residuals()
        return bool(last) and tol > 0 and all(r.primal <= tol for r in last.values())

    def harden(self, state) -> HardStep:
        """The hard step: project the current weights (not Z) and write them back.

        Returns the masks (support) of every tensor, the tensors to freeze entirely (constraints
        with ``freeze``, e.g. quantization levels) and the constraints' report facts.
        """
        params = _parameters(state)
        weights = self.read_weights(state)
        step = HardStep({}, [], {})
        for c in self.constraints.values():
            values = {t: weights[t] for t in c.tensors}
            projected = c.project(values)
            step.masks.update(c.mask(values))
            step.info.update(c.describe(values))
            if c.freeze:
                step.frozen.extend(c.tensors)
            for t in c.tensors:
                params[t].data = np.asarray(projected[t], dtype=params[t].data.dtype)
        return step

    def hard_prune(self, state) -> Dict[str, np.ndarray]:
        """:meth:`harden` and return the 0/1 masks only (the API before constraints)."""
        return self.harden(state).masks

    def disable(self, state) -> None:
        """Set every rho in the checkpoint to 0: the graph then trains on the base loss only."""
        params = _parameters(state)
        for name in self.tensors:
            r = params[rho_name(name)].data
            params[rho_name(name)].data = np.zeros(r.shape, dtype=r.dtype)

    # -- persistence --------------------------------------------------------------------
    def save(self, path) -> None:
        arrays = {}
        for t in self.tensors:
            arrays[f"Z/{t}"] = self.Z[t]
            arrays[f"U/{t}"] = self.U[t]
        for name, rho in self.rho.items():
            arrays[f"rho/{name}"] = np.float64(np.nan if rho is None else rho)
        arrays["__iteration__"] = np.int64(self.iteration)
        arrays["__history__"] = np.array(
            [[[r.primal, r.dual] for r in it.values()] for it in self.history], dtype=np.float64
        ).reshape(len(self.history), len(self.constraints), 2)
        np.savez(Path(path), **arrays)

    def load(self, path) -> "AdmmState":
        with np.load(Path(path), allow_pickle=False) as z:
            for t in self.tensors:
                self.Z[t] = z[f"Z/{t}"]
                self.U[t] = z[f"U/{t}"]
            for name in self.constraints:
                rho = float(z[f"rho/{name}"])
                self.rho[name] = None if np.isnan(rho) else rho
            self.iteration = int(z["__iteration__"])
            hist = z["__history__"]
        names = list(self.constraints)
        self.history = [{n: Residual(*map(float, it[i])) for i, n in enumerate(names)} for it in hist]
        return self
