"""The paper-style per-layer table and the run report (printed and written as JSON).

Vocabulary, the same in the report (``--report``), ``inspect --json`` and the API
(:class:`LayerRow`, :class:`~admm_onnx.sparse.WeightRow`): a *weight* is a float initializer
with at least two dimensions (biases, normalisation parameters and shape constants are not
counted). Per weight: ``name``, ``op`` (the op types reading it), ``shape``, ``weights`` (its
number of entries), ``nonzero``, ``kept_percent`` (100 * nonzero / weights), ``prunable``
(true/false) and ``reason`` (why it was not pruned, else null). Totals (``total``) cover every
weight of the model, pruned or not: ``weights``, ``nonzero``, ``kept_percent``,
``compression`` (weights / nonzero).
"""
from __future__ import annotations

import datetime
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

#: Version of the report's JSON layout (``report_format`` in the file).
REPORT_FORMAT = 2


@dataclass
class LayerRow:
    """One weight of the written model: its size, what was kept, and how it was treated."""

    name: str
    weights: int
    nonzero: int
    target_sparsity: Optional[float] = None
    op: str = ""
    shape: Tuple[int, ...] = ()
    #: element, filter or channel for a pruned weight; None for one left alone
    structure: Optional[str] = None
    prunable: bool = True
    #: why the weight was not pruned (excluded by the config, or not prunable), else None
    reason: Optional[str] = None
    #: k of the weight's k-bit levels when it was quantized, else None
    bits: Optional[int] = None

    @property
    def kept_percent(self) -> float:
        return 100.0 * self.nonzero / self.weights if self.weights else 0.0

    @property
    def pruned(self) -> bool:
        return self.target_sparsity is not None

    @property
    def layer(self) -> str:  # the name before report format 2
        return self.name

    def to_dict(self) -> Dict[str, object]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        d["kept_percent"] = round(self.kept_percent, 4)
        return d

    @classmethod
    def from_dict(cls, r: Dict[str, object]) -> "LayerRow":
        return cls(
            r.get("name", r.get("layer")), r["weights"], r["nonzero"], r.get("target_sparsity", r.get("sparsity_target")),
            r.get("op", ""), tuple(r.get("shape", ())), r.get("structure"), r.get("prunable", True), r.get("reason"),
            r.get("bits"),
        )


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass
class PruneReport:
    """What a pruning run did and measured."""

    layers: List[LayerRow] = field(default_factory=list)
    accuracy_before: Optional[float] = None
    accuracy_after_admm: Optional[float] = None
    accuracy_hard_pruned: Optional[float] = None
    accuracy_after: Optional[float] = None
    loss_before: Optional[float] = None
    loss_after: Optional[float] = None
    #: fidelity to the dense model on the evaluation data (admm_onnx/metrics.py Fidelity):
    #: {"output", "agreement", "kl" (class scores), "rel_mse", "cosine"} at each phase's end
    fidelity_before: Optional[Dict[str, object]] = None
    fidelity_after_admm: Optional[Dict[str, object]] = None
    fidelity_hard_pruned: Optional[Dict[str, object]] = None
    fidelity_after: Optional[Dict[str, object]] = None
    #: the training objective used (admm_onnx/losses.py: cross_entropy, mse, distill, ce+distill,
    #: or the class name of a Block passed in) and the outputs it trains on
    objective: Optional[str] = None
    outputs: List[str] = field(default_factory=list)
    residuals: List[Dict[str, Dict[str, float]]] = field(default_factory=list)
    #: why ADMM ended: converged (every primal residual <= admm_tol) or the iteration cap
    admm_stop: Optional[str] = None
    #: top-1 after ADMM minus top-1 after the hard step (what the hard step cost)
    hard_prune_gap: Optional[float] = None
    #: rho per ADMM variable at the end of ADMM
    rho: Dict[str, float] = field(default_factory=dict)
    #: per quantized weight {"bits", "axis", "scale": [...]}; read with quantization.read_quantization
    quantization: Dict[str, Dict[str, object]] = field(default_factory=dict)
    epochs: List[Dict[str, object]] = field(default_factory=list)
    phase_seconds: Dict[str, float] = field(default_factory=dict)
    samples_seen: int = 0
    #: max |written model output - trained model output| on one batch (a self-check)
    max_output_diff: Optional[float] = None
    #: BatchNormalization running statistics re-estimated for the written model (ORT training
    #: never writes them back): {"nodes", "batches", "kept", "accuracy_stale", "accuracy_recalibrated"}
    batchnorm: Optional[Dict[str, object]] = None
    output: Optional[str] = None
    config: Dict[str, object] = field(default_factory=dict)
    #: With a budget: the chosen per-layer ratios, predicted and measured (admm_onnx/allocation).
    allocation: Optional[Dict[str, object]] = None
    #: admm-onnx version that wrote the report
    version: str = ""
    #: the command line (set by the CLI), else None
    command: Optional[str] = None
    #: the input model: {"path", "sha256"}
    input: Dict[str, object] = field(default_factory=dict)
    #: UTC times (ISO 8601) the run started and finished
    started: Optional[str] = None
    finished: Optional[str] = None
    #: weight-magnitude histograms before/after: {name: {"edges", "before", "after", "zeros_before", "zeros_after"}}
    histograms: Dict[str, Dict[str, object]] = field(default_factory=dict)

    def __post_init__(self):
        if not self.version:
            from . import __version__

            self.version = __version__
        if self.started is None:
            self.started = utc_now()

    @property
    def total_weights(self) -> int:
        return sum(r.weights for r in self.layers)

    @property
    def total_nonzero(self) -> int:
        return sum(r.nonzero for r in self.layers)

    @property
    def compression(self) -> float:
        nz = self.total_nonzero
        return self.total_weights / nz if nz else float("inf")

    @classmethod
    def from_dict(cls, data: Dict[str, object]) -> "PruneReport":
        """Inverse of :meth:`to_dict` (used to resume a run's partial report)."""
        fields = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        fields["layers"] = [LayerRow.from_dict(r) for r in data.get("layers", [])]
        return cls(**fields)

    @property
    def phases(self) -> List[Dict[str, object]]:
        """The run phase by phase: name, top-1 and loss at its end, seconds."""
        rows = [
            ("dense", self.accuracy_before, self.loss_before, self.phase_seconds.get("dense", self.phase_seconds.get("train")),
             self.fidelity_before),
            ("admm", self.accuracy_after_admm, None, self.phase_seconds.get("admm"), self.fidelity_after_admm),
            ("hard_prune", self.accuracy_hard_pruned, None, None, self.fidelity_hard_pruned),
            ("retrain", self.accuracy_after, self.loss_after, self.phase_seconds.get("retrain"), self.fidelity_after),
        ]
        return [{"phase": p, "accuracy": a, "loss": lo, "seconds": sec, "fidelity": f} for p, a, lo, sec, f in rows]

    def to_dict(self) -> Dict[str, object]:
        d = {"report_format": REPORT_FORMAT, **asdict(self)}
        d["layers"] = [row.to_dict() for row in self.layers]
        d["phases"] = self.phases
        if d.get("hard_prune_gap") is None and None not in (self.accuracy_after_admm, self.accuracy_hard_pruned):
            d["hard_prune_gap"] = self.accuracy_after_admm - self.accuracy_hard_pruned
        d.setdefault("hard_prune_gap", None)
        d["total"] = {
            "weights": self.total_weights,
            "nonzero": self.total_nonzero,
            "kept_percent": round(100.0 * self.total_nonzero / max(1, self.total_weights), 4),
            "compression": round(self.compression, 3),
        }
        return d

    def table(self) -> str:
        """Layer | Weights | Weights after prune | % kept, then a Total row, as in the paper."""
        return layer_table(self.layers) + "\n" + self.summary()

    def summary(self) -> str:
        lines = [f"Compression: {self.compression:.1f}x ({self.total_nonzero:,} of {self.total_weights:,} weights kept)"]
        if self.accuracy_before is not None or self.accuracy_after is not None:
            acc = lambda a: "n/a" if a is None else f"{100 * a:.2f}%"  # noqa: E731
            lines.append(
                f"Top-1: before {acc(self.accuracy_before)}, after ADMM {acc(self.accuracy_after_admm)}, "
                f"hard-pruned {acc(self.accuracy_hard_pruned)}, after retraining {acc(self.accuracy_after)}"
            )
        if self.fidelity_before is not None or self.fidelity_after is not None:
            from .metrics import fidelity_line

            what = self.fidelity_after or self.fidelity_before
            lines.append(
                f"Fidelity to the dense model ({what.get('output')}): after ADMM "
                f"{fidelity_line(self.fidelity_after_admm)}; hard-pruned {fidelity_line(self.fidelity_hard_pruned)}; "
                f"after retraining {fidelity_line(self.fidelity_after)}"
            )
        if self.objective:
            lines.append(f"Objective: {self.objective} on {', '.join(self.outputs) or 'the default output'}")
        if self.admm_stop:
            gap = "" if self.hard_prune_gap is None else f"; hard-prune gap {100 * self.hard_prune_gap:.2f} points"
            lines.append(f"ADMM: {self.admm_stop}{gap}")
        if self.quantization:
            bits = sorted({int(q["bits"]) for q in self.quantization.values()})
            lines.append(f"Quantized: {len(self.quantization)} weight(s) to {'/'.join(map(str, bits))}-bit levels")
        return "\n".join(lines)


def layer_rows(weights: Dict[str, np.ndarray], targets: Optional[Dict[str, float]] = None) -> List[LayerRow]:
    return [
        LayerRow(name, int(w.size), int(np.count_nonzero(w)), (targets or {}).get(name)) for name, w in weights.items()
    ]


def model_rows(model, info=None, plan=None) -> List[LayerRow]:
    """One :class:`LayerRow` per weight of ``model`` (a ModelProto), in graph order: the pruned
    ones with their target, the others with why they were left alone (``info``: the model's
    :class:`~admm_onnx.graph.analysis.GraphInfo`; ``plan``: name -> WeightPlan)."""
    from onnx import numpy_helper

    consumers: Dict[str, List[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            ops = consumers.setdefault(name, [])
            if node.op_type not in ops:
                ops.append(node.op_type)
    rows = []
    plan = plan or {}
    for tensor in model.graph.initializer:
        if len(tensor.dims) < 2 or tensor.data_type not in _FLOAT_TYPES:
            continue
        arr = numpy_helper.to_array(tensor)
        name = tensor.name
        row = LayerRow(name, int(arr.size), int(np.count_nonzero(arr)), op=",".join(consumers.get(name, [])),
                       shape=tuple(int(d) for d in arr.shape))
        if name in plan:
            row.target_sparsity, row.structure = float(plan[name].sparsity), plan[name].structure
            row.bits = getattr(plan[name], "bits", None)
        elif info is not None and name in info.prunable:
            row.reason = "excluded by the config" if plan else "not pruned (dense training)"
        elif info is not None:
            row.prunable, row.reason = False, info.not_prunable.get(name, "not a Conv/Gemm/MatMul weight")
        rows.append(row)
    return rows


#: float, float16, double, bfloat16
_FLOAT_TYPES = (1, 10, 11, 16)


def weight_histograms(before: Dict[str, np.ndarray], after: Dict[str, np.ndarray], bins: int = 40) -> Dict[str, Dict[str, object]]:
    """Histograms of log10 |w| of the nonzero entries of each weight, before and after, on shared
    edges (zeros counted apart: a log scale has no place for them)."""
    out = {}
    for name, b in before.items():
        a = after.get(name)
        if a is None:
            continue
        mb, ma = np.abs(b[b != 0]).astype(np.float64), np.abs(a[a != 0]).astype(np.float64)
        both = np.concatenate([mb, ma])
        if both.size == 0:
            continue
        lo, hi = np.log10(both.min()), np.log10(both.max())
        if hi - lo < 1e-6:
            lo, hi = lo - 0.5, hi + 0.5
        edges = np.linspace(lo, hi, bins + 1)
        out[name] = {
            "edges": [round(float(e), 5) for e in edges],
            "before": np.histogram(np.log10(mb), edges)[0].tolist() if mb.size else [0] * bins,
            "after": np.histogram(np.log10(ma), edges)[0].tolist() if ma.size else [0] * bins,
            "zeros_before": int(b.size - mb.size),
            "zeros_after": int(a.size - ma.size),
        }
    return out


def layer_table(rows: List[LayerRow]) -> str:
    """The paper's table; a Bits column (k of the k-bit levels, "32" for float) when any weight was quantized."""
    bits = any(r.bits for r in rows)
    header = ("Layer", "Weights", "Weights after prune", "% kept") + (("Bits",) if bits else ())
    body = [(r.name + ("" if r.reason is None else " (not pruned)"), f"{r.weights:,}", f"{r.nonzero:,}", f"{r.kept_percent:.2f}%")
            + ((str(r.bits or 32),) if bits else ()) for r in rows]
    total_w, total_nz = sum(r.weights for r in rows), sum(r.nonzero for r in rows)
    body.append(("Total", f"{total_w:,}", f"{total_nz:,}", f"{100.0 * total_nz / max(1, total_w):.2f}%")
                + (("",) if bits else ()))
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    fmt = lambda cells: "| " + " | ".join(  # noqa: E731
        str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
    ) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([fmt(header), sep] + [fmt(b) for b in body[:-1]] + [sep, fmt(body[-1])])
