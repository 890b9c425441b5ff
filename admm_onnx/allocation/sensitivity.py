"""Sensitivity sweep: the model's metric after one-shot magnitude pruning of one weight at a
time, at each level, every other weight dense. ONNX Runtime inference only.

Faithful to ``prune``: the same prunable weights (graph/analysis.py) and the same projection
(projection.py: exact per-layer top-k, or whole slices by L2 norm) at the same keep counts.

Speed: every worker process opens **one** ``InferenceSession`` on the user's graph in which
the prunable weights are also graph inputs (ONNX "overridable initializers", IR >= 4), so a
task feeds the pruned copy of one weight and leaves the others at their stored values; no
session is rebuilt per task. Sessions run one intra-op thread, so results do not depend on
how many workers or which runner computed them (runners.py).

Metrics (lower is better; ``delta`` = value - dense value, with a paired standard error over
the samples as a noise band):
- ``loss``: mean cross-entropy against the labels;
- ``top1``: top-1 error (1 - accuracy);
- ``kl``: mean KL(dense outputs || pruned outputs), no labels needed (dense value 0).

Results are cached per task in a JSON file keyed by the model's and the data's fingerprints,
the metric and the batch size, in a folder the user names (``--cache DIR`` or
``$ADMM_ONNX_CACHE``; :func:`default_cache_dir`): a rerun, a run with more levels, or a sweep
restarted after a kill recomputes only what is missing. With neither, nothing is cached: a run
writes nowhere but the files it was told to write.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import ConfigError, DataError, ModelError, clean_message
from ..projection import STRUCTURES, keep_count, projection_mask
from .costs import LayerCost, layer_costs
from .runners import SerialRunner

log = logging.getLogger(__name__)

#: Fractions of each weight kept, on a log-like grid from 50% down to 0.2%.
DEFAULT_LEVELS = (0.5, 0.3, 0.2, 0.1, 0.05, 0.03, 0.02, 0.01, 0.005, 0.002)
METRICS = ("loss", "top1", "kl")
CACHE_VERSION = 1


def default_cache_dir() -> Optional[Path]:
    """``$ADMM_ONNX_CACHE`` when set, else None (no cache: nothing is written outside the outputs
    the user named)."""
    if os.environ.get("ADMM_ONNX_CACHE"):
        return Path(os.environ["ADMM_ONNX_CACHE"])
    return None


def check_levels(levels: Iterable[float]) -> Tuple[float, ...]:
    out = []
    for v in levels:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 1e-6 <= float(v) < 1.0:
            raise ConfigError(f"sensitivity levels are fractions kept in [0.000001, 1), got {v!r}")
        out.append(float(v))
    if not out:
        raise ConfigError("give at least one sensitivity level")
    return tuple(sorted(set(out), reverse=True))


# -- the model every worker evaluates ----------------------------------------------------------
def evaluation_model(prepared, extra: Sequence[str] = ()) -> onnx.ModelProto:
    """The user's graph (BatchNorm in inference mode) with every prunable weight, and every
    initializer derived from one, also listed as a graph input (overridable)."""
    from ..graph.batchnorm_frozen import freeze_batchnorm

    model = onnx.ModelProto()
    model.CopyFrom(prepared.original)
    freeze_batchnorm(model)
    if model.ir_version < 4:
        model.ir_version = 4  # IR < 4 already lists initializers as inputs; 4 keeps them overridable
    inputs = {i.name for i in model.graph.input}
    names = set(prepared.info.prunable) | {d for d, (src, _) in prepared.info.derived.items() if src in prepared.info.prunable}
    names |= set(extra)
    for t in model.graph.initializer:
        if t.name in names and t.name not in inputs:
            model.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return model


#: Samples of the sweep: one array (a single-input model) or arrays keyed by input name.
Samples = Union[np.ndarray, Dict[str, np.ndarray]]


def as_inputs(x: Samples, input_name: str) -> Dict[str, np.ndarray]:
    """``x`` keyed by input name, each array contiguous (one array feeds ``input_name``)."""
    if isinstance(x, dict):
        return {k: np.ascontiguousarray(v) for k, v in x.items()}
    return {input_name: np.ascontiguousarray(x)}


def sample_count(x: Samples) -> int:
    return len(next(iter(x.values()))) if isinstance(x, dict) else len(x)


def _fingerprint_data(x: Dict[str, np.ndarray], labels: Optional[np.ndarray]) -> str:
    """The data's part of the cache key (one input: the key of the single-input sweeps before)."""
    y = labels if labels is not None else np.zeros(0)
    if len(x) == 1:
        return _fingerprint_arrays(next(iter(x.values())), y)
    names = [np.frombuffer(k.encode(), np.uint8) for k in sorted(x)]
    return _fingerprint_arrays(*names, *(x[k] for k in sorted(x)), y)


def _fingerprint_arrays(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str((a.dtype.str, a.shape)).encode())
        h.update(a.tobytes())
    return h.hexdigest()


# -- worker side ---------------------------------------------------------------------------------
_W: Dict[str, object] = {}


def _session(model_bytes: bytes):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.set_denormal_as_zero", "1")
    so.log_severity_level = 4  # errors reach Python as exceptions; no C++ log lines
    return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _setup(spec: dict) -> None:
    """Worker initialiser: one session, the data, the dense weights and the dense outputs."""
    _W.clear()
    _W.update(spec)
    _W["sess"] = _session(spec["model"])
    _W["dense_logp"] = _forward({})
    _W["dense_per_sample"] = _per_sample(_W["dense_logp"])


def _forward(feeds: Dict[str, np.ndarray]) -> np.ndarray:
    """Log-probabilities (n, classes) of the model on the worker's samples."""
    sess, x, batch = _W["sess"], _W["x"], _W["batch"]
    out_name, softmax = _W["output"], _W["softmax"]
    n = sample_count(x)
    parts = []
    for s in range(0, n, batch):
        feed = {k: a[s:s + batch] for k, a in x.items()}
        valid = min(batch, n - s)
        if _W["fixed_batch"] and valid < batch:
            feed = {k: np.concatenate([a, np.repeat(a[:1], batch - valid, axis=0)]) for k, a in feed.items()}
        feed.update(feeds)
        (y,) = sess.run([out_name], feed)
        y = np.asarray(y)[:valid].reshape(valid, -1)
        if softmax:
            parts.append(np.log(np.maximum(y.astype(np.float64), np.finfo(np.float64).tiny)))
        else:
            parts.append(_log_softmax(y))
    return np.concatenate(parts)


def _per_sample(logp: np.ndarray) -> np.ndarray:
    metric, y = _W["metric"], _W["y"]
    if metric != "kl" and len(y) and y.max() >= logp.shape[-1]:
        raise DataError(f"labels go up to {int(y.max())} but the model output {_W['output']!r} has "
                        f"{logp.shape[-1]} classes")
    if metric == "loss":
        return -logp[np.arange(len(y)), y]
    if metric == "top1":
        return (np.argmax(logp, axis=-1) != y).astype(np.float64)
    dense = _W.get("dense_logp")
    if dense is None:  # the dense model itself
        return np.zeros(len(logp))
    return np.sum(np.exp(dense) * (dense - logp), axis=-1)


def _pruned_feeds(name: str, keep: float, structure: str) -> Dict[str, np.ndarray]:
    if structure == "groups":  # a channel group of admm_onnx/structured: every member tensor
        from ..structured.constraint import ChannelGroups

        analysis, group = _W["analysis"], _W["groups"][name]
        c = ChannelGroups(analysis, {group.id: max(1, keep_count(group.size, 1.0 - keep))})
        return c.project({t: _W["members"][t] for t in c.tensors})
    w, out_axis, in_axis, derived = _W["weights"][name]
    mask = projection_mask(w, 1.0 - keep, structure, out_axis, in_axis)
    pruned = np.where(mask, w, np.zeros_like(w))
    feeds = {name: pruned}
    for dname, perm in derived:
        feeds[dname] = np.ascontiguousarray(np.transpose(pruned, perm))
    return feeds


def _task(task: Tuple[str, float, str]) -> Tuple[float, float]:
    """(mean metric, standard error of the paired difference to the dense model)."""
    name, keep, structure = task
    per = _per_sample(_forward(_pruned_feeds(name, keep, structure)))
    diff = per - _W["dense_per_sample"]
    se = float(np.std(diff, ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else 0.0
    return float(per.mean()), se


def _dense_task(_=None) -> Tuple[float, float]:
    return float(np.mean(_W["dense_per_sample"])), 0.0


# -- results ---------------------------------------------------------------------------------------
@dataclass
class Curve:
    """One weight's sensitivity: metric at each fraction kept (ascending, the dense 1.0 last)."""

    name: str
    params: int
    macs: int
    keep: List[float]
    value: List[float]
    noise: List[float]
    nonzero: List[int]

    def deltas(self, baseline: float) -> List[float]:
        return [v - baseline for v in self.value]

    @property
    def positions(self) -> int:
        return max(1, self.macs // max(1, self.params))


@dataclass
class SensitivityResult:
    metric: str
    structure: str
    baseline: float
    samples: int
    curves: Dict[str, Curve]
    levels: List[float]
    fingerprint: str
    seconds: float = 0.0
    computed: int = 0
    cached: int = 0
    runner: str = ""
    skipped: Dict[str, str] = field(default_factory=dict)

    def flags(self) -> Dict[str, str]:
        """name -> why its curve should not be trusted (flat within noise, or negative)."""
        out = {}
        for n, c in self.curves.items():
            d = np.array(c.deltas(self.baseline)[:-1])
            noise = np.array(c.noise[:-1])
            if len(d) and np.all(np.abs(d) <= 2 * noise + 1e-12):
                out[n] = "flat within noise at every level"
            elif len(d) and np.any(d < -2 * noise - 1e-12):
                out[n] = "pruning improves the metric at some level (noise or a poorly trained layer)"
        return out

    def to_dict(self) -> dict:
        return {
            "metric": self.metric, "structure": self.structure, "baseline": self.baseline, "samples": self.samples,
            "levels": self.levels, "fingerprint": self.fingerprint, "seconds": self.seconds,
            "computed": self.computed, "cached": self.cached, "runner": self.runner, "skipped": self.skipped,
            "flags": self.flags(),
            "layers": {n: {"params": c.params, "macs": c.macs, "keep": c.keep, "value": c.value,
                           "delta": c.deltas(self.baseline), "noise": c.noise, "nonzero": c.nonzero}
                       for n, c in self.curves.items()},
        }

    @classmethod
    def from_dict(cls, d: dict) -> "SensitivityResult":
        curves = {n: Curve(n, v["params"], v["macs"], list(v["keep"]), list(v["value"]), list(v["noise"]),
                           list(v["nonzero"])) for n, v in d["layers"].items()}
        return cls(d["metric"], d["structure"], d["baseline"], d["samples"], curves, list(d["levels"]),
                   d["fingerprint"], d.get("seconds", 0.0), d.get("computed", 0), d.get("cached", 0),
                   d.get("runner", ""), dict(d.get("skipped", {})))

    def table(self) -> str:
        levels = self.levels
        groups = self.structure == "groups"
        head = (["Group", "Channels"] if groups else ["Layer", "Weights", "MACs/sample"]) + [f"{100 * k:g}%" for k in levels]
        rows = []
        for n, c in self.curves.items():
            by_keep = dict(zip(c.keep, c.deltas(self.baseline)))
            rows.append([n, f"{c.params:,}"] + ([] if groups else [f"{c.macs:,}"])
                        + [f"{by_keep[k]:+.4f}" if k in by_keep else "" for k in levels])
        widths = [max(len(x) for x in col) for col in zip(head, *rows)]
        fmt = lambda cells: "| " + " | ".join(  # noqa: E731
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))) + " |"
        sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
        what = {"loss": "cross-entropy", "top1": "top-1 error", "kl": "KL to the dense outputs"}[self.metric]
        lines = [f"Change in {what} (dense: {self.baseline:.4f}) when one {'channel group' if groups else 'weight'} keeps the given fraction "
                 f"({self.structure}), every other weight dense; {self.samples:,} samples", fmt(head), sep]
        lines += [fmt(r) for r in rows]
        for n, why in self.flags().items():
            lines.append(f"note: {n}: {why}")
        for n, why in self.skipped.items():
            lines.append(f"skipped: {n}: {why}")
        return "\n".join(lines)


# -- driver ----------------------------------------------------------------------------------------
def _task_key(name: str, keep: float, structure: str) -> str:
    return f"{name}|{structure}|{keep!r}"


class _Cache:
    def __init__(self, directory: Optional[Path], key: str):
        self.path = None if directory is None else Path(directory) / f"sensitivity-{key[:24]}.json"
        self.data: Dict[str, List[float]] = {}
        if self.path is not None and self.path.is_file():
            try:
                raw = json.loads(self.path.read_text(encoding="utf-8"))
                if raw.get("version") == CACHE_VERSION and raw.get("key") == key:
                    data = {str(k): [float(x) for x in v] for k, v in raw["results"].items()}
                    self.data = {k: v for k, v in data.items() if len(v) >= 2 and all(np.isfinite(v))}
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                log.warning("ignoring an unreadable sensitivity cache %s", self.path)
        self.key = key

    def save(self) -> None:
        if self.path is None:
            return
        from ..errors import AdmmOnnxError
        from ..io import atomic_path

        try:
            self.path.parent.mkdir(exist_ok=True)  # inside the cache folder, which must exist
            with atomic_path(self.path) as tmp:
                tmp.write_text(json.dumps({"version": CACHE_VERSION, "key": self.key, "results": self.data}),
                               encoding="utf-8")
        except (OSError, AdmmOnnxError) as exc:  # the cache is an optimisation: the sweep goes on without it
            log.warning("sensitivity cache not written (%s); the sweep goes on without it", clean_message(str(exc)))
            self.path = None


def run_sensitivity(
    prepared,
    x: np.ndarray,
    y: Optional[np.ndarray],
    levels: Sequence[float] = DEFAULT_LEVELS,
    metric: str = "loss",
    structure: str = "element",
    names: Optional[Sequence[str]] = None,
    runner=None,
    cache_dir="default",
    batch_size: int = 500,
) -> SensitivityResult:
    """Sweep every prunable weight of ``prepared`` (or ``names``) over ``levels`` (fractions kept).

    ``x``: model inputs (already fitted to the model's input), ``y``: labels (required for
    ``loss`` and ``top1``). ``runner``: runners.make_runner(...) (default: this process).
    ``cache_dir``: a directory, ``"default"`` (:func:`default_cache_dir`) or None (no cache).
    """
    if metric not in METRICS:
        raise ConfigError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if structure not in STRUCTURES + ("groups",):
        raise ConfigError(f"structure must be one of {', '.join(STRUCTURES + ('groups',))}, got {structure!r}")
    if metric != "kl" and y is None:
        raise DataError(f"metric {metric!r} needs labels; use --metric kl for data without labels")
    if metric != "kl" and (np.ndim(y) != 1 or np.asarray(y).dtype.kind not in "iu"):
        raise DataError(f"metric {metric!r} takes one class index per sample, and the labels have shape "
                        f"{list(np.shape(y))} ({np.asarray(y).dtype}); use --metric kl (fidelity to the dense model)")
    x = as_inputs(x, prepared.input_name)
    if sample_count(x) == 0:
        raise DataError("no samples for the sensitivity sweep")
    levels = check_levels(levels)
    info = prepared.info
    if not info.prunable:
        raise ConfigError("the model has no prunable weights")
    group_spec = {}
    if structure == "groups":
        group_spec = _channel_groups(prepared)
        units = group_spec["groups"]
    else:
        units = info.prunable
    if names is None:
        names = list(units)
    for n in names:
        if n not in units:
            raise ConfigError(f"no prunable {'channel group' if structure == 'groups' else 'weight'} named {n!r}")
    runner = runner or SerialRunner()
    model = evaluation_model(prepared, list(group_spec.get("members", ())))
    try:
        model_bytes = model.SerializeToString()
    except ValueError:
        raise ModelError("models over 2 GB are not supported by the sensitivity sweep yet") from None
    costs: Dict[str, LayerCost] = layer_costs(prepared.original, info)
    weights = {}
    inits = {t.name: t for t in prepared.original.graph.initializer}
    for n in (names if structure != "groups" else ()):
        w = info.prunable[n]
        derived = [(d, perm) for d, (src, perm) in info.derived.items() if src == n]
        weights[n] = (numpy_helper.to_array(inits[n]), w.out_axis, w.in_axis, derived)
    batch = prepared.fixed_batch or int(batch_size)
    from ..graph.outputs import output_view

    view = output_view(prepared.original, prepared.output_name)
    labels = None if y is None else np.asarray(y, dtype=np.int64)
    key = hashlib.sha256(json.dumps({
        "model": hashlib.sha256(model_bytes).hexdigest(), "output": prepared.output_name,
        "data": _fingerprint_data(x, labels),
        "metric": metric, "batch": batch, "version": CACHE_VERSION,
    }, sort_keys=True).encode()).hexdigest()
    cache = _Cache(default_cache_dir() if cache_dir == "default" else (Path(cache_dir) if cache_dir else None), key)

    tasks: List[Tuple[str, float, str]] = []
    want = [("", 1.0, "dense")] + [(n, k, structure) for n in names for k in levels]
    for t in want:
        if _task_key(*t) not in cache.data:
            tasks.append(t)
    cached = len(want) - len(tasks)
    t0 = time.perf_counter()
    if tasks:
        spec = {"model": model_bytes, "x": x, "y": labels, "output": prepared.output_name,
                "softmax": view.softmax, "weights": weights,
                "metric": metric, "batch": batch, "fixed_batch": bool(prepared.fixed_batch), **group_spec}
        log.info("sensitivity: %d evaluations of %d samples on %s (%d cached)", len(tasks), sample_count(x), runner.describe(), cached)
        done = 0
        for index, result in runner.run(_setup, (spec,), _dispatch, tasks):
            cache.data[_task_key(*tasks[index])] = list(result)
            done += 1
            if done % max(1, len(tasks) // 10) == 0 or done == len(tasks):
                cache.save()
                log.info("sensitivity: %d/%d evaluations done, %.1f s", done, len(tasks), time.perf_counter() - t0)
        cache.save()
    seconds = time.perf_counter() - t0
    baseline = cache.data[_task_key("", 1.0, "dense")][0]
    curves = {}
    for n in names:
        ks = sorted(levels)
        if structure == "groups":
            g = group_spec["groups"][n]
            vals = [cache.data[_task_key(n, k, structure)] for k in ks]
            nz = [max(1, keep_count(g.size, 1.0 - k)) for k in ks]
            curves[n] = Curve(n, g.size, 0, ks + [1.0], [v[0] for v in vals] + [baseline], [v[1] for v in vals] + [0.0],
                              nz + [g.size])
            continue
        w = info.prunable[n]
        vals = [cache.data[_task_key(n, k, structure)] for k in ks]
        if structure == "element":
            nz = [keep_count(w.size, 1.0 - k) for k in ks]
        else:
            axis = w.out_axis if structure == "filter" else w.in_axis
            nz = [keep_count(w.shape[axis], 1.0 - k) * (w.size // w.shape[axis]) for k in ks]
        curves[n] = Curve(n, w.size, costs[n].macs, ks + [1.0], [v[0] for v in vals] + [baseline],
                          [v[1] for v in vals] + [0.0], nz + [w.size])
    return SensitivityResult(metric, structure, baseline, sample_count(x), curves, list(levels), key, seconds,
                             len(tasks), cached, runner.describe())


def _channel_groups(prepared) -> dict:
    """The prunable channel groups of admm_onnx/structured (``admm-onnx groups``) and their
    member tensors, for ``structure = "groups"`` (a curve per group; sizes in channels)."""
    try:
        from ..structured.analysis import analyse as channel_analysis
    except ImportError:  # pragma: no cover - the structured package ships with admm_onnx
        raise ConfigError("channel groups need admm_onnx.structured") from None
    analysis = channel_analysis(prepared.original)
    groups = {g.name: g for g in analysis.groups if g.prunable}
    if not groups:
        raise ConfigError("the model has no prunable channel group", hint="'admm-onnx groups MODEL' says why")
    inits = {t.name: t for t in prepared.original.graph.initializer}
    members = {m.init: numpy_helper.to_array(inits[m.init]) for g in groups.values() for m in g.members
               if not m.stat and m.init in inits}
    return {"analysis": analysis, "groups": groups, "members": members}


def _dispatch(task):
    if task[0] == "":
        return _dense_task()
    return _task(task)


def joint_metric(prepared, x, y, keep: Dict[str, float], metric: str = "loss", structure: str = "element",
                 batch_size: int = 500) -> float:
    """The metric with every weight of ``keep`` pruned one-shot at once (the allocation's
    measured counterpart of the additive prediction), in this process."""
    info = prepared.info
    from ..graph.outputs import output_view

    inits = {t.name: t for t in prepared.original.graph.initializer}
    weights = {n: (numpy_helper.to_array(inits[n]), info.prunable[n].out_axis, info.prunable[n].in_axis,
                   [(d, perm) for d, (src, perm) in info.derived.items() if src == n]) for n in keep}
    spec = {"model": evaluation_model(prepared).SerializeToString(), "x": as_inputs(x, prepared.input_name),
            "y": None if y is None else np.asarray(y, np.int64), "output": prepared.output_name,
            "softmax": output_view(prepared.original, prepared.output_name).softmax,
            "weights": weights, "metric": metric, "batch": prepared.fixed_batch or batch_size,
            "fixed_batch": bool(prepared.fixed_batch)}
    saved = dict(_W)
    try:
        _setup(spec)
        feeds = {}
        for n, k in keep.items():
            feeds.update(_pruned_feeds(n, k, structure))
        return float(_per_sample(_forward(feeds)).mean())
    finally:
        _W.clear()
        _W.update(saved)


def sensitivity_chart(result: SensitivityResult) -> dict:
    """The curves as a chart spec of :mod:`admm_onnx.plot` (change in the metric vs % kept, log x,
    each with its band of two paired standard errors)."""
    from ..plot import _chart

    series = []
    for n, c in result.curves.items():
        d = np.array(c.deltas(result.baseline), dtype=float)
        e = 2 * np.array(c.noise, dtype=float)
        series.append({"name": n, "x": [100 * k for k in c.keep], "y": d.tolist(), "lo": (d - e).tolist(),
                       "hi": (d + e).tolist()})
    return _chart(f"sensitivity: change in {result.metric} ({result.samples:,} samples, {result.structure})", "lines",
                  series, "% of the weight kept (one pruned, the others dense)", f"change in {result.metric}",
                  logx=True)


def write_plot(result: SensitivityResult, path) -> Path:
    """The curves as FILE.(png|svg|html) (PNG needs matplotlib), like ``admm-onnx plot``."""
    from ..plot import write_charts

    return write_charts([sensitivity_chart(result)], path, "admm-onnx sensitivity", result.table())
