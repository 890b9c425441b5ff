"""Typed pruning configuration, validated at construction.

A configuration is a list of :class:`Rule` s in the spirit of NNI's ``config_list`` plus the
ADMM schedule. Rules apply in order; a later rule overrides an earlier one for the weights it
selects. A rule selects by op type (``op_types``), by weight name or glob (``names``), or both
(a weight must then match both); with neither it selects every prunable weight.

The same schema loads from TOML or JSON (:func:`load_config`)::

    admm_iters = 10
    rho = 1e-3
    [[rules]]
    op_types = ["Conv"]
    sparsity = 0.8
    [[rules]]
    names = ["fc1.weight"]
    sparsity = 0.99
    rho = 5e-3
    [[rules]]
    names = ["fc2.*"]
    exclude = true
"""
from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import os
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

from .admm import RHO_MAX
from .errors import ConfigError
from .graph.analysis import PRUNABLE_OPS, GraphInfo
from .losses import LOSSES
from .projection import STRUCTURES
from .quantization import BITS

#: rho modes (admm.RhoPolicy): "balance" = residual balancing, "growth" = times rho_growth per iteration.
RHO_MODES = ("balance", "growth")
QUANT_SCALES = ("channel", "tensor")

OPTIMIZERS = ("adamw", "sgd")


def _check_sparsity(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: sparsity must be a number in [0, 1), got {value!r}")
    if not (0.0 <= float(value) < 1.0):
        raise ConfigError(f"{where}: sparsity must be in [0, 1), got {value}", hint="0.9 zeroes 90% of the weights")
    return float(value)


def _check_positive(value: Any, where: str, allow_zero: bool = False, integer: bool = False):
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value):
        raise ConfigError(f"{where} must be a {'whole number' if integer else 'number'}, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{where} must be {'>= 0' if allow_zero else '> 0'}, got {value}")
    return value


def _strings(value: Any, where: str) -> Tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{where} must be a list of non-empty strings, got {value!r}")
    return tuple(value)


@dataclass(frozen=True)
class Rule:
    """Select weights and say how to prune them."""

    sparsity: Optional[float] = None
    op_types: Tuple[str, ...] = ()
    names: Tuple[str, ...] = ()
    rho: Optional[float] = None
    structure: str = "element"
    exclude: bool = False
    #: Quantize the selected weights to symmetric k-bit levels with zero (2, 3, 4 or 8), alone
    #: (no sparsity given: 0) or with sparsity; ``quant_scale``: one scale per "channel"
    #: (output axis) or per "tensor".
    bits: Optional[int] = None
    quant_scale: str = "channel"

    def __post_init__(self):
        object.__setattr__(self, "op_types", _strings(self.op_types, "rule op_types"))
        object.__setattr__(self, "names", _strings(self.names, "rule names"))
        for op in self.op_types:
            if op not in PRUNABLE_OPS:
                raise ConfigError(f"rule op_types: {op!r} is not prunable; choose from {', '.join(PRUNABLE_OPS)}")
        if self.exclude is not True and self.exclude is not False:
            raise ConfigError(f"rule exclude must be true or false, got {self.exclude!r}")
        if self.exclude and (self.sparsity is not None or self.rho is not None or self.bits is not None):
            raise ConfigError("a rule with exclude = true cannot also set sparsity, bits or rho")
        if self.bits is not None and (isinstance(self.bits, bool) or self.bits not in BITS):
            raise ConfigError(f"rule bits must be one of {', '.join(map(str, BITS))}, got {self.bits!r}")
        if self.quant_scale not in QUANT_SCALES:
            raise ConfigError(f"rule quant_scale must be one of {', '.join(QUANT_SCALES)}, got {self.quant_scale!r}")
        if not self.exclude:
            if self.sparsity is None and self.bits is None:
                raise ConfigError("every rule needs a sparsity or bits (or exclude = true)")
            sparsity = 0.0 if self.sparsity is None else self.sparsity
            object.__setattr__(self, "sparsity", _check_sparsity(sparsity, "rule"))
        if self.rho is not None:
            _check_positive(self.rho, "rule rho")
        if self.structure not in STRUCTURES:
            raise ConfigError(f"rule structure must be one of {', '.join(STRUCTURES)}, got {self.structure!r}")

    def describe(self) -> str:
        parts = []
        if self.op_types:
            parts.append("op_types=" + ",".join(self.op_types))
        if self.names:
            parts.append("names=" + ",".join(self.names))
        return " ".join(parts) or "all weights"


@dataclass(frozen=True)
class WeightPlan:
    """What happens to one prunable weight."""

    name: str
    sparsity: float
    rho: float
    structure: str
    out_axis: int
    in_axis: int
    shape: Tuple[int, ...]
    #: None: no quantization; else k-bit levels (quantization.py), scale per quant_scale.
    bits: Optional[int] = None
    quant_scale: str = "channel"


@dataclass(frozen=True)
class PruneConfig:
    """Everything a pruning run needs besides the model and the data."""

    rules: Tuple[Rule, ...] = ()
    admm_iters: int = 10
    epochs_per_iter: int = 1
    retrain_epochs: int = 4
    #: Initial ADMM penalty; None ("auto"): per layer, rho_ratio x the loss gradient's norm over
    #: ||W - Z|| (admm.py, AdmmState.calibrate).
    rho: Optional[float] = None
    #: "balance" (residual balancing, admm.RhoPolicy) or "growth" (times rho_growth per iteration).
    rho_mode: str = "balance"
    rho_growth: float = 1.3
    #: With rho auto: the penalty gradient starts at this multiple of the loss gradient.
    rho_ratio: float = 1.0
    #: ADMM stops when every layer's relative primal residual ||W - Z|| / ||W|| is at most this
    #: (0: always run admm_iters).
    admm_tol: float = 0.02
    #: Z/U update (and rho change, and convergence check) every this many optimizer steps inside
    #: the ADMM epochs, and at the end of every ADMM iteration; 0: only at the end of every
    #: iteration (the paper's schedule).
    admm_update_steps: int = 20
    #: rho_mode "balance": rho times rho_tau after an update whose primal residual is above
    #: rho_stall x the previous one (stalled) or above 10 x the dual; 0 turns the stall rule off.
    rho_stall: float = 0.9
    rho_tau: float = 1.5
    lr: float = 1e-3
    retrain_lr: Optional[float] = None
    #: "constant" or "cosine" (decay to 0 over the retraining phase) for masked retraining.
    retrain_schedule: str = "cosine"
    batch_size: int = 64
    seed: int = 0
    #: Objective (admm_onnx/losses.py): auto (cross_entropy with class labels, mse with float
    #: targets, distill without labels), cross_entropy, mse, distill, ce+distill.
    loss: str = "auto"
    #: Distillation: softmax temperature of KL terms; weight of distillation in ce+distill;
    #: "kl" or "mse" for every selected output (None: kl for class scores, mse otherwise);
    #: class axis of class scores (None: 1 for (N, C) and NCHW, last for (N, T, C)).
    temperature: float = 2.0
    distill_weight: float = 0.5
    distill_kind: Optional[str] = None
    class_axis: Optional[int] = None
    optimizer: str = "adamw"
    output: Optional[str] = None
    #: Key of the labels in the feeds of a reader that is not an admm-onnx reader (an ORT
    #: CalibrationDataReader) and in a .npz keyed by input names; None: "labels", "label" or "y"
    #: when present (admm_onnx/feeds.py). Data without labels trains by distillation.
    labels_key: Optional[str] = None
    #: ONNX Runtime intra-op threads for training (0: ORT's default, one per core). Not part
    #: of a run's identity (a resumed run may use another value); runs side by side go faster
    #: with 1 each.
    threads: int = 0
    #: Processes a training batch is split over (admm_onnx.parallel), this one included; each
    #: runs ``threads`` or 1 ORT thread. 1: no worker processes. Not part of a run's identity.
    workers: int = 1
    #: A budget instead of per-layer sparsities (admm_onnx/allocation): at most one of
    #: compression (71 or "71x"), target_params (weights kept), target_macs (fraction of MACs
    #: kept); rules still pin or exclude the weights they select. min_keep / max_keep bound the
    #: fraction each allocated weight keeps; the sensitivity sweep uses sensitivity_samples
    #: training samples and sensitivity_metric (loss, top1, kl).
    compression: Optional[Any] = None
    target_params: Optional[int] = None
    target_macs: Optional[float] = None
    allocation: str = "sensitivity"
    min_keep: Optional[float] = None
    max_keep: Optional[float] = None
    sensitivity_samples: int = 2000
    sensitivity_metric: str = "loss"

    def __post_init__(self):
        rules = tuple(r if isinstance(r, Rule) else _rule_from_dict(r, i) for i, r in enumerate(self.rules, 1))
        object.__setattr__(self, "rules", rules)
        _check_positive(self.admm_iters, "admm_iters", allow_zero=True, integer=True)
        _check_positive(self.epochs_per_iter, "epochs_per_iter", integer=True)
        _check_positive(self.retrain_epochs, "retrain_epochs", allow_zero=True, integer=True)
        if self.rho is not None:
            _check_positive(self.rho, "rho")
            if self.rho > RHO_MAX:
                raise ConfigError(f"rho must be at most {RHO_MAX:g}, got {self.rho!r}")
        if self.rho_mode not in RHO_MODES:
            raise ConfigError(f"rho_mode must be one of {', '.join(RHO_MODES)}, got {self.rho_mode!r}")
        _check_positive(self.rho_growth, "rho_growth")
        if self.rho_growth > 100:
            raise ConfigError(f"rho_growth must be at most 100 (a factor per Z/U update), got {self.rho_growth!r}")
        _check_positive(self.rho_ratio, "rho_ratio")
        _check_positive(self.admm_tol, "admm_tol", allow_zero=True)
        _check_positive(self.admm_update_steps, "admm_update_steps", allow_zero=True, integer=True)
        _check_positive(self.rho_stall, "rho_stall", allow_zero=True)
        if self.rho_stall >= 1:
            raise ConfigError(f"rho_stall must be below 1 (0: off), got {self.rho_stall!r}")
        _check_positive(self.rho_tau, "rho_tau")
        if self.rho_tau <= 1:
            raise ConfigError(f"rho_tau must be above 1, got {self.rho_tau!r}")
        _check_positive(self.lr, "lr")
        if self.retrain_lr is not None:
            _check_positive(self.retrain_lr, "retrain_lr")
        if self.retrain_schedule not in ("constant", "cosine"):
            raise ConfigError(f"retrain_schedule must be 'constant' or 'cosine', got {self.retrain_schedule!r}")
        _check_positive(self.batch_size, "batch_size", integer=True)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"seed must be a whole number >= 0, got {self.seed!r}")
        if self.loss not in LOSSES:
            raise ConfigError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.labels_key is not None and (not isinstance(self.labels_key, str) or not self.labels_key):
            raise ConfigError(f"labels_key must be a non-empty string, got {self.labels_key!r}")
        if isinstance(self.output, (list, tuple)):
            if not self.output or not all(isinstance(o, str) and o for o in self.output):
                raise ConfigError(f"output must be a tensor name or a list of names, got {self.output!r}")
            object.__setattr__(self, "output", self.output[0] if len(self.output) == 1 else tuple(self.output))
        elif self.output is not None and not isinstance(self.output, str):
            raise ConfigError(f"output must be a tensor name or a list of names, got {self.output!r}")
        _check_positive(self.temperature, "temperature")
        if not 1e-3 <= self.temperature <= 1e3:
            raise ConfigError(f"temperature must be between 0.001 and 1000, got {self.temperature!r}")
        _check_positive(self.distill_weight, "distill_weight", allow_zero=True)
        if self.distill_weight > 1.0:
            raise ConfigError(f"distill_weight must be in [0, 1], got {self.distill_weight!r}")
        if self.distill_kind not in (None, "kl", "mse"):
            raise ConfigError(f"distill_kind must be kl or mse, got {self.distill_kind!r}")
        if self.class_axis is not None and (isinstance(self.class_axis, bool) or not isinstance(self.class_axis, int)):
            raise ConfigError(f"class_axis must be an integer, got {self.class_axis!r}")
        if self.class_axis == 0:
            raise ConfigError("class_axis 0 is the batch axis; the class axis is 1 or later (or -1: the last)")
        _check_positive(self.threads, "threads", allow_zero=True, integer=True)
        _check_positive(self.workers, "workers", integer=True)
        from .allocation.budget import check_budget_fields, parse_compression

        check_budget_fields(self.compression, self.target_params, self.target_macs, self.allocation, self.min_keep,
                            self.max_keep)
        if self.compression is not None:
            object.__setattr__(self, "compression", parse_compression(self.compression))
        _check_positive(self.sensitivity_samples, "sensitivity_samples", integer=True)
        if self.sensitivity_metric not in ("loss", "top1", "kl"):
            raise ConfigError(f"sensitivity_metric must be loss, top1 or kl, got {self.sensitivity_metric!r}")

    def replace(self, **changes) -> "PruneConfig":
        """A copy with ``changes`` applied (``None`` values are ignored), validated again."""
        changes = {k: v for k, v in changes.items() if v is not None}
        return dataclasses.replace(self, **changes)

    def with_sparsity(self, sparsity: Optional[float], bits: Optional[int] = None,
                      quant_scale: str = "channel") -> "PruneConfig":
        """Prepend a rule pruning every prunable weight to ``sparsity`` and, with ``bits``, quantizing
        it with one scale per ``quant_scale`` ("channel" or "tensor"; file rules still override)."""
        rule = Rule(sparsity=sparsity, bits=bits, quant_scale=quant_scale)
        return dataclasses.replace(self, rules=(rule,) + self.rules)

    def with_bits(self, bits: int, quant_scale: str = "channel") -> "PruneConfig":
        """Prepend a rule quantizing every prunable weight to ``bits`` (no sparsity)."""
        return self.with_sparsity(None, bits, quant_scale)

    def rho_policy(self):
        """The :class:`~admm_onnx.admm.RhoPolicy` of this configuration."""
        from .admm import RhoPolicy

        return RhoPolicy(self.rho_mode, growth=self.rho_growth, tol=self.admm_tol, stall=self.rho_stall, tau=self.rho_tau)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def plan(self, info: GraphInfo) -> Dict[str, WeightPlan]:
        """Resolve the rules against a model's prunable weights (see :func:`resolve_rules`)."""
        return resolve_rules(self, info)


_CONFIG_KEYS = {f.name for f in dataclasses.fields(PruneConfig)}
_RULE_KEYS = {f.name for f in dataclasses.fields(Rule)}


def _rule_from_dict(data: Any, index: int) -> Rule:
    if not isinstance(data, Mapping):
        raise ConfigError(f"rule {index} must be a table/object, got {type(data).__name__}")
    unknown = set(data) - _RULE_KEYS
    if unknown:
        raise ConfigError(f"rule {index}: unknown key(s) {', '.join(sorted(unknown))}; valid: {', '.join(sorted(_RULE_KEYS))}")
    for key in ("names", "op_types"):
        if key in data and isinstance(data[key], (list, tuple)) and not data[key]:
            raise ConfigError(f"rule {index}: {key} is empty; leave the key out to select every prunable weight")
    try:
        return Rule(**data)
    except ConfigError as exc:
        raise ConfigError(f"rule {index}: {exc}") from None


def config_from_dict(data: Mapping[str, Any]) -> PruneConfig:
    """Build a :class:`PruneConfig` from plain data (parsed TOML/JSON)."""
    if not isinstance(data, Mapping):
        raise ConfigError("the configuration must be a table/object at the top level")
    data = dict(data)
    if not all(isinstance(k, str) for k in data):
        raise ConfigError(f"config keys must be strings, got {sorted(map(repr, data))[:5]}")
    if "model_output" in data:  # the model tensor, named like --model-output (``output`` is the old key)
        if "output" in data and data["output"] != data["model_output"]:
            raise ConfigError("both model_output and output given; use model_output only")
        data["output"] = data.pop("model_output")
    unknown = set(data) - _CONFIG_KEYS - {"sparsity", "bits"}
    if unknown:
        valid = (_CONFIG_KEYS - {"output"}) | {"sparsity", "bits", "model_output"}
        raise ConfigError(f"unknown config key(s) {', '.join(sorted(unknown))}; valid: {', '.join(sorted(valid))}")
    sparsity = data.pop("sparsity", None)
    bits = data.pop("bits", None)
    rules = data.pop("rules", [])
    if not isinstance(rules, (list, tuple)):
        raise ConfigError("rules must be a list of tables")
    config = PruneConfig(rules=tuple(_rule_from_dict(r, i) for i, r in enumerate(rules, 1)), **data)
    if sparsity is not None or bits is not None:
        config = config.with_sparsity(None if sparsity is None else _check_sparsity(sparsity, "config"), bits)
    return config


def load_config(path) -> PruneConfig:
    """Load a configuration from a ``.toml`` or ``.json`` file."""
    from .io import check_input_file

    if not isinstance(path, (str, os.PathLike)):
        raise ConfigError(f"the config must be a file path, got {type(path).__name__}")
    p = check_input_file(path, "config", error=ConfigError)  # a regular file: never blocks on a FIFO
    if p.stat().st_size > 16 * 2**20:
        raise ConfigError(f"config file {p} is {p.stat().st_size / 2**20:.0f} MiB; a configuration is a few lines")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {p}: {exc}") from exc
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, an int of over 4300 digits
            raise ConfigError(f"{p}: invalid JSON: {' '.join(str(exc).split())[:200]}") from None
    else:
        try:
            import tomllib
        except ImportError:  # Python < 3.11
            import tomli as tomllib
        try:
            data = tomllib.loads(text)
        except (ValueError, RecursionError) as exc:  # TOMLDecodeError, an int of over 4300 digits
            raise ConfigError(f"{p}: invalid TOML: {' '.join(str(exc).split())[:200]}") from None
    try:
        return config_from_dict(data)
    except TypeError as exc:
        raise ConfigError(f"{p}: {exc}") from exc


def _is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def resolve_rules(config: PruneConfig, info: GraphInfo) -> Dict[str, WeightPlan]:
    """Map every selected prunable weight to its :class:`WeightPlan`.

    Errors: a rule naming a weight that does not exist or is not prunable (with the reason and
    close matches), a rule selecting nothing, two rules naming the same weight explicitly with
    different settings, and a plan that prunes nothing.
    """
    if not info.prunable:
        raise ConfigError("the model has no prunable weights (Conv, ConvTranspose, Gemm or MatMul with a constant weight)")
    if not config.rules:
        raise ConfigError("nothing to prune: give a sparsity (--sparsity S), a budget (--compression 71x) or rules in a config file")
    chosen: Dict[str, Tuple[Rule, int]] = {}
    excluded: set = set()
    explicit: Dict[str, Tuple[Rule, int]] = {}
    for index, rule in enumerate(config.rules, 1):
        for pattern in rule.names:
            if not _is_glob(pattern) and pattern not in info.prunable:
                if pattern in info.not_prunable:
                    raise ConfigError(f"rule {index}: {pattern!r} is not prunable: {info.not_prunable[pattern]}")
                close = difflib.get_close_matches(pattern, list(info.prunable), n=3)
                hint = f"did you mean {', '.join(close)}?" if close else "run 'admm-onnx inspect MODEL' to list prunable weights"
                raise ConfigError(f"rule {index}: no prunable weight named {pattern!r}", hint=hint)
        selected = [
            w
            for w in info.prunable.values()
            if (not rule.op_types or set(rule.op_types) & set(w.op_types))
            and (not rule.names or any(w.name == p or fnmatch.fnmatchcase(w.name, p) for p in rule.names))
        ]
        if not selected:
            raise ConfigError(f"rule {index} ({rule.describe()}) selects no prunable weight")
        for w in selected:
            if w.name in rule.names:
                if w.name in explicit and explicit[w.name][0] != rule:
                    raise ConfigError(
                        f"rules {explicit[w.name][1]} and {index} both name {w.name!r} with different settings"
                    )
                explicit[w.name] = (rule, index)
            if rule.exclude:
                excluded.add(w.name)
                chosen.pop(w.name, None)
            else:
                excluded.discard(w.name)
                chosen[w.name] = (rule, index)
    plan = {}
    for name, (rule, _) in chosen.items():
        w = info.prunable[name]
        plan[name] = WeightPlan(
            name=name,
            sparsity=rule.sparsity,
            rho=rule.rho if rule.rho is not None else config.rho,
            structure=rule.structure,
            out_axis=w.out_axis,
            in_axis=w.in_axis,
            shape=w.shape,
            bits=rule.bits,
            quant_scale=rule.quant_scale,
        )
    if not plan:
        raise ConfigError("the rules exclude every prunable weight: nothing to prune")
    # Keep the graph's order for stable reports.
    return {n: plan[n] for n in info.prunable if n in plan}
