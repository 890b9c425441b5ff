"""Constraint sets: the extension point of the ADMM engine.

ADMM solves ``min f(W)  s.t.  (W_t for t in C.tensors) in S_C`` for every constraint ``C``.
The engine (:class:`~admm_onnx.admm.AdmmState`) runs Z, U and rho per *variable*: one
constraint and the tensors it spans. It never looks at op types or at what the set is; it only
calls the methods below.

The protocol (subclass :class:`Constraint`, or duck-type it)::

    name: str                       # the variable's name (residuals and rho are keyed by it)
    tensors: tuple[str, ...]        # the weights it spans (initializer names), >= 1
    freeze: bool                    # after the hard step: True = the tensors are fixed entirely
                                    #   to project(W) (quantization levels); False = entries
                                    #   outside mask() are fixed at zero, the rest retrain
    project(values) -> dict         # Euclidean projection onto S_C (the Z-update); ``values``
                                    #   maps every name in ``tensors`` to an array; return the
                                    #   same names, same shapes and dtypes; never modify inputs
    mask(values) -> dict            # bool arrays: True where project(values) keeps the entry
                                    #   free (its support); default: project(values) != 0
    describe(values) -> dict        # JSON-able facts per tensor for the report, after the hard
                                    #   step (e.g. bits and scales); default: {}

Rules a constraint must keep: ``project`` is deterministic (resume replays it and must get
the same bits) and idempotent (``project(project(v)) == project(v)``); with ``freeze=False``
every entry outside ``mask`` is zero in ``project``. A set that spans several tensors (a channel
group across a Conv, its BatchNorm and the next Conv; a global top-k across layers) scores them
together in ``project`` and returns each tensor's slice; the engine sums the residual norms
over the tensors of the variable and gives them one rho.

Implementations here: :class:`TopK` (element sparsity), :class:`Slices` (whole filters or
input channels by L2 norm), :class:`Levels` (k-bit symmetric levels, alone or over a sparsity
constraint: sparsity + levels). :func:`constraint_for` builds the one a
:class:`~admm_onnx.config.WeightPlan` asks for.
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Tuple

import numpy as np

from .errors import ConfigError
from .projection import slice_mask, topk_mask
from .quantization import BITS, QuantSpec, dequantize, fit_levels


def _sparsity(value) -> float:
    """A constraint's sparsity, checked when it is built (not at its first projection)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not 0.0 <= float(value) < 1.0:
        raise ConfigError(f"sparsity must be a number in [0, 1), got {value!r}")
    return float(value)


def _axis(value, what: str = "axis") -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f"{what} must be a whole number, got {value!r}")
    return int(value)

Values = Mapping[str, np.ndarray]


class Constraint:
    """Base class of a constraint set over ``tensors`` (see the module docstring)."""

    name: str
    tensors: Tuple[str, ...]
    freeze: bool = False

    def project(self, values: Values) -> Dict[str, np.ndarray]:  # pragma: no cover - interface
        raise NotImplementedError

    def mask(self, values: Values) -> Dict[str, np.ndarray]:
        return {n: z != 0 for n, z in self.project(values).items()}

    def describe(self, values: Values) -> Dict[str, Dict[str, object]]:
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class _Single(Constraint):
    """A constraint on one tensor: subclasses define ``_mask(x)`` and get ``project``/``mask``."""

    def __init__(self, tensor: str):
        self.name = tensor
        self.tensors = (tensor,)

    def _mask(self, x: np.ndarray) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def mask(self, values: Values) -> Dict[str, np.ndarray]:
        return {self.name: self._mask(np.asarray(values[self.name]))}

    def project(self, values: Values) -> Dict[str, np.ndarray]:
        x = np.asarray(values[self.name])
        return {self.name: np.where(self._mask(x), x, np.zeros_like(x))}


class TopK(_Single):
    """At most ``keep_count(size, sparsity)`` nonzeros: keep the largest magnitudes."""

    def __init__(self, tensor: str, sparsity: float):
        super().__init__(tensor)
        self.sparsity = _sparsity(sparsity)

    def _mask(self, x):
        return topk_mask(x, self.sparsity)


class Slices(_Single):
    """At most k nonzero slices along ``axis`` (whole filters or input channels), by L2 norm."""

    def __init__(self, tensor: str, sparsity: float, axis: int):
        super().__init__(tensor)
        self.sparsity, self.axis = _sparsity(sparsity), _axis(axis)

    def _mask(self, x):
        return slice_mask(x, self.sparsity, self.axis)


class Levels(Constraint):
    """Symmetric ``bits``-bit levels with zero (one scale per tensor, or per slice along ``axis``),
    optionally inside a single-tensor sparsity constraint ``support`` (sparsity + levels).

    Projection: the support (if any) is chosen first, as the sparsity constraint alone would,
    then the kept entries are moved onto levels with the scale fitted to them
    (:func:`~admm_onnx.quantization.fit_levels`). Entries that round to zero stay free in
    :meth:`mask` (the mask is the support, not the nonzeros). After the hard step the tensor is
    on its levels (``freeze = True``); the pipeline's retraining keeps it there through fake
    quantization (graph/fake_quant.py) rather than freezing it.
    """

    freeze = True

    def __init__(self, tensor: str, bits: int, axis: Optional[int] = None, support: Optional[Constraint] = None):
        if isinstance(bits, bool) or bits not in BITS:
            raise ConfigError(f"bits must be one of {', '.join(map(str, BITS))}, got {bits!r}")
        self.name = tensor
        self.tensors = (tensor,)
        self.bits = int(bits)
        self.axis = None if axis is None else _axis(axis)
        self.support = support

    def _keep(self, x: np.ndarray) -> Optional[np.ndarray]:
        if self.support is None:
            return None
        return self.support.mask({self.name: x})[self.name]

    def fit(self, values: Values) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
        """(integers q, float32 scales, support mask or None) of the projection of ``values``."""
        x = np.asarray(values[self.name])
        keep = self._keep(x)
        q, scale = fit_levels(x, self.bits, self.axis, keep)
        return q, scale, keep

    def project(self, values: Values) -> Dict[str, np.ndarray]:
        x = np.asarray(values[self.name])
        q, scale, _ = self.fit(values)
        return {self.name: dequantize(q, scale, self.axis, dtype=x.dtype)}

    def mask(self, values: Values) -> Dict[str, np.ndarray]:
        x = np.asarray(values[self.name])
        keep = self._keep(x)
        return {self.name: np.ones(x.shape, bool) if keep is None else keep}

    def spec(self, values: Values) -> QuantSpec:
        _, scale, _ = self.fit(values)
        return QuantSpec(self.bits, tuple(float(s) for s in scale), self.axis)

    def describe(self, values: Values) -> Dict[str, Dict[str, object]]:
        return {self.name: self.spec(values).to_dict()}


def constraint_for(plan) -> Constraint:
    """The constraint a :class:`~admm_onnx.config.WeightPlan` asks for."""
    name = plan.name
    structure = getattr(plan, "structure", "element")
    if structure == "element":
        sparse: Constraint = TopK(name, plan.sparsity)
    elif structure == "filter":
        sparse = Slices(name, plan.sparsity, plan.out_axis)
    elif structure == "channel":
        sparse = Slices(name, plan.sparsity, plan.in_axis)
    else:
        raise ValueError(f"unknown structure {structure!r}")
    bits = getattr(plan, "bits", None)
    if not bits:
        return sparse
    axis = plan.out_axis if getattr(plan, "quant_scale", "channel") == "channel" else None
    return Levels(name, bits, axis, support=sparse if plan.sparsity > 0 else None)
