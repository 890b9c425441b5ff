"""The paper-style per-layer table and the run report (printed and written as JSON)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

import numpy as np


@dataclass
class LayerRow:
    layer: str
    weights: int
    nonzero: int
    sparsity_target: Optional[float] = None

    @property
    def kept_percent(self) -> float:
        return 100.0 * self.nonzero / self.weights if self.weights else 0.0


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
    output: Optional[str] = None
    config: Dict[str, object] = field(default_factory=dict)
    #: With a budget: the chosen per-layer ratios, predicted and measured (admm_onnx/allocation).
    allocation: Optional[Dict[str, object]] = None

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
        fields["layers"] = [
            LayerRow(r["layer"], r["weights"], r["nonzero"], r.get("sparsity_target")) for r in data.get("layers", [])
        ]
        return cls(**fields)

    def to_dict(self) -> Dict[str, object]:
        d = asdict(self)
        for row, src in zip(d["layers"], self.layers):
            row["kept_percent"] = round(src.kept_percent, 4)
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


def layer_table(rows: List[LayerRow]) -> str:
    header = ("Layer", "Weights", "Weights after prune", "% kept")
    body = [(r.layer, f"{r.weights:,}", f"{r.nonzero:,}", f"{r.kept_percent:.2f}%") for r in rows]
    total_w, total_nz = sum(r.weights for r in rows), sum(r.nonzero for r in rows)
    body.append(("Total", f"{total_w:,}", f"{total_nz:,}", f"{100.0 * total_nz / max(1, total_w):.2f}%"))
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    fmt = lambda cells: "| " + " | ".join(  # noqa: E731
        str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
    ) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([fmt(header), sep] + [fmt(b) for b in body[:-1]] + [sep, fmt(body[-1])])
