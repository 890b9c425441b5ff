"""Metrics as plug-ins: top-1 when labels exist, fidelity to the dense model always.

A metric sees, batch by batch, the student's outputs, the teacher's (the dense model's) and
the labels when the data has them, trimmed of padding rows; :meth:`Metric.result` returns a
dict of floats (empty when it had nothing to measure). :class:`Evaluator` runs a model with
given weights in an ONNX Runtime ``InferenceSession`` over a reader and feeds every metric.

- :class:`Top1` (``accuracy``, ``loss``): top-1 and mean softmax cross-entropy of the first
  output against integer labels, over the class axis (per sample, token or pixel; label -100
  ignored).
- :class:`Fidelity`: how close the student is to the dense model, per selected output:
  class scores: ``agreement`` (the fraction of positions where the argmax agrees) and ``kl``
  (mean KL(teacher || student) at temperature 1); every output: ``rel_mse``
  (||s - t||^2 / ||t||^2 over the data) and ``cosine`` (mean cosine similarity of each
  sample's flattened outputs). The first output's figures are the headline; with several
  outputs the others are under ``outputs``.

Add a metric: subclass :class:`Metric` and pass it in ``Evaluator(metrics=[...])``.
"""
from __future__ import annotations

import logging
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import onnx

from .data import LABELS
from .errors import DataError
from .feeds import VALID, model_feed
from .losses import IGNORE_INDEX, class_axis_for, teacher_name

log = logging.getLogger(__name__)


def _log_softmax(z: np.ndarray, axis: int) -> np.ndarray:
    z = z.astype(np.float64)
    z = z - z.max(axis=axis, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=axis, keepdims=True))


class Metric:
    """One metric: ``update`` per batch, ``result`` at the end of a pass."""

    def update(self, student: Dict[str, np.ndarray], teacher: Optional[Dict[str, np.ndarray]],
               labels: Optional[np.ndarray]) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def result(self) -> Dict[str, object]:  # pragma: no cover - interface
        raise NotImplementedError


class Top1(Metric):
    """Top-1 and cross-entropy of the first output against integer labels."""

    def __init__(self, outputs: Sequence[str], kinds: Dict[str, str], class_axis: Optional[int] = None):
        self.output, self.class_axis = outputs[0], class_axis
        self.kl = kinds.get(outputs[0], "kl") == "kl"
        self.correct = self.count = 0
        self.nll = 0.0

    def update(self, student, teacher, labels) -> None:
        if labels is None or labels.dtype.kind not in "iu":
            return
        z = np.asarray(student[self.output])
        axis = class_axis_for(z.ndim, self.class_axis)
        if np.moveaxis(z, axis, -1).shape[:-1] != labels.shape:
            return  # labels that do not index this output's classes
        z = np.moveaxis(z, axis, -1)
        keep = labels != IGNORE_INDEX
        y = np.where(keep, labels, 0)
        if y.size and (y.max() >= z.shape[-1] or y.min() < 0):
            raise DataError(f"labels go up to {int(y.max())} but the model output {self.output!r} has {z.shape[-1]} "
                            "classes")
        logp = _log_softmax(z, -1)
        picked = np.take_along_axis(logp, y[..., None], axis=-1)[..., 0]
        self.correct += int(((np.argmax(z, axis=-1) == y) & keep).sum())
        self.nll -= float(picked[keep].sum())
        self.count += int(keep.sum())

    def result(self) -> Dict[str, object]:
        if not self.count:
            return {}
        return {"accuracy": self.correct / self.count, "loss": self.nll / self.count}


class Fidelity(Metric):
    """Agreement, KL, relative MSE and cosine of the student's outputs to the teacher's."""

    def __init__(self, outputs: Sequence[str], kinds: Dict[str, str], class_axis: Optional[int] = None):
        self.outputs, self.kinds, self.class_axis = list(outputs), kinds, class_axis
        self.sums = {o: {"agree": 0.0, "positions": 0, "kl": 0.0, "err": 0.0, "ref": 0.0, "cos": 0.0, "samples": 0}
                     for o in self.outputs}

    def update(self, student, teacher, labels) -> None:
        if teacher is None:
            return
        for o in self.outputs:
            s, t = np.asarray(student[o], np.float64), np.asarray(teacher[o], np.float64)
            acc = self.sums[o]
            if self.kinds.get(o) == "kl" and s.ndim >= 2:
                axis = class_axis_for(s.ndim, self.class_axis)
                sa, ta = np.moveaxis(s, axis, -1), np.moveaxis(t, axis, -1)
                acc["agree"] += float((np.argmax(sa, -1) == np.argmax(ta, -1)).sum())
                log_t, log_s = _log_softmax(ta, -1), _log_softmax(sa, -1)
                acc["kl"] += float((np.exp(log_t) * (log_t - log_s)).sum())
                acc["positions"] += int(np.prod(sa.shape[:-1]))
            acc["err"] += float(((s - t) ** 2).sum())
            acc["ref"] += float((t ** 2).sum())
            sf, tf = s.reshape(len(s), -1), t.reshape(len(t), -1)
            norms = np.linalg.norm(sf, axis=1) * np.linalg.norm(tf, axis=1)
            cos = np.where(norms > 0, (sf * tf).sum(1) / np.maximum(norms, 1e-300), 1.0)
            acc["cos"] += float(cos.sum())
            acc["samples"] += len(s)

    def _one(self, o: str) -> Dict[str, object]:
        a = self.sums[o]
        if not a["samples"]:
            return {}
        out = {"output": o}
        if a["positions"]:
            out["agreement"] = a["agree"] / a["positions"]
            out["kl"] = a["kl"] / a["positions"]
        out["rel_mse"] = a["err"] / a["ref"] if a["ref"] > 0 else float(a["err"] > 0)
        out["cosine"] = a["cos"] / a["samples"]
        return out

    def result(self) -> Dict[str, object]:
        first = self._one(self.outputs[0])
        if not first:
            return {}
        if len(self.outputs) > 1:
            first["outputs"] = {o: self._one(o) for o in self.outputs}
        return {"fidelity": first}


class EvalResult:
    """What an evaluation pass measured: ``accuracy``/``loss`` (None without labels),
    ``fidelity`` (None without a teacher), every metric's dict in ``metrics``."""

    def __init__(self, metrics: Dict[str, object], samples: int, seconds: float):
        self.metrics, self.samples, self.seconds = metrics, samples, seconds
        self.accuracy = metrics.get("accuracy")
        self.loss = metrics.get("loss")
        self.fidelity = metrics.get("fidelity")

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else float("nan")


class Evaluator:
    """Runs ``model`` (the training copy, or its masked version) with given weights in an ORT
    InferenceSession over a reader; the teacher's outputs come from the feeds
    (:func:`~admm_onnx.losses.teacher_name` keys) when a teacher reader added them."""

    def __init__(self, model: onnx.ModelProto, outputs: Sequence[str], kinds: Dict[str, str],
                 class_axis: Optional[int] = None, metrics: Optional[Sequence] = None):
        self.model, self.outputs, self.kinds, self.class_axis = model, list(outputs), dict(kinds), class_axis
        self.metric_types = list(metrics) if metrics is not None else [Top1, Fidelity]

    def session(self, weights: Optional[Dict[str, np.ndarray]] = None,
                bn_feeds: Optional[Sequence[Dict[str, np.ndarray]]] = None):
        """An InferenceSession of the model with ``weights``; with ``bn_feeds`` (training batches)
        its BatchNorm running statistics are first re-estimated on them (the model's own are
        those it came with: ORT training does not update them)."""
        from .pipeline import _session, with_weights

        model = with_weights(self.model, weights) if weights else self.model
        if bn_feeds and any(n.op_type == "BatchNormalization" for n in model.graph.node):
            from .graph.bn_recalibrate import recalibrate_batchnorm

            if model is self.model:  # with_weights made a copy already
                model = onnx.ModelProto()
                model.CopyFrom(self.model)
            inits = {t.name for t in model.graph.initializer}
            names = [i.name for i in model.graph.input if i.name not in inits]
            try:  # writes the statistics only once every batch ran: a failure leaves the model as it was
                recalibrate_batchnorm(model, (model_feed(f, names) for f in bn_feeds), max_batches=len(bn_feeds))
            except Exception as exc:  # a refinement of an in-run figure: never fail the run on it
                log.debug("BatchNorm statistics not re-estimated for evaluation: %s", exc)
        return _session(model)

    def outputs_for(self, sess, feed: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        names = [i.name for i in sess.get_inputs()]
        return dict(zip(self.outputs, sess.run(self.outputs, model_feed(feed, names))))

    def evaluate(self, reader, weights: Optional[Dict[str, np.ndarray]] = None, sess=None,
                 bn_feeds: Optional[Sequence[Dict[str, np.ndarray]]] = None) -> EvalResult:
        sess = sess or self.session(weights, bn_feeds)
        metrics = [m(self.outputs, self.kinds, self.class_axis) if isinstance(m, type) else m
                   for m in self.metric_types]
        t0 = time.perf_counter()
        seen = 0
        reader.rewind()
        while True:
            feed = reader.get_next()
            if feed is None:
                break
            student = self.outputs_for(sess, feed)
            valid = int(feed.get(VALID, len(next(iter(student.values())))))
            student = {k: v[:valid] for k, v in student.items()}
            teacher = None
            if all(teacher_name(o) in feed for o in self.outputs):
                teacher = {o: np.asarray(feed[teacher_name(o)])[:valid] for o in self.outputs}
            labels = np.asarray(feed[LABELS])[:valid] if LABELS in feed else None
            for m in metrics:
                m.update(student, teacher, labels)
            seen += valid
        if seen == 0:
            raise DataError("the evaluation reader yielded no batch")
        merged: Dict[str, object] = {}
        for m in metrics:
            merged.update(m.result())
        return EvalResult(merged, seen, time.perf_counter() - t0)


def fidelity_line(f: Optional[Dict[str, object]]) -> str:
    """One line for a fidelity dict: agreement, KL, relative MSE, cosine."""
    if not f:
        return "-"
    parts = []
    if "agreement" in f:
        parts.append(f"agreement {100 * f['agreement']:.2f}%")
    if "kl" in f:
        parts.append(f"KL {f['kl']:.4g}")
    parts.append(f"rel. MSE {f['rel_mse']:.4g}")
    parts.append(f"cosine {f['cosine']:.4f}")
    return ", ".join(parts)
