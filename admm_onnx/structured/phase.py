"""Channel pruning as pipeline phases: ADMM over channel groups, hard step, shrink + verify,
dense retraining of the smaller model, write.

Called by :func:`admm_onnx.pipeline.prune` when it is given ``channels=ChannelTargets(...)``.
1. analysis of the user's graph (BatchNorm in inference form, as written; constants the exporter
   shared between nodes untied first, untie.py), budgets per group;
2. ADMM: one engine variable (:class:`ChannelGroups`, admm_onnx.constraints protocol) spans
   every trainable member tensor (conv/gemm weights, biases, BatchNorm scale and shift),
   penalised towards T = Z - U; the Z-update is the exact top-k channel projection per group
   (once per iteration, or every ChannelTargets.update_steps optimizer steps);
   rho as configured (auto: from the loss gradient; the engine's policy adapts it);
   (BatchNorm running statistics are first re-estimated on training batches: ORT training
   normalises with batch statistics and never writes the running ones back, so a model
   trained by the tool carries stale ones; again after the shrink and after retraining);
3. hard step: the channels that the current weights (not Z) score highest are kept;
4. shrink the graph, and verify that it computes what the masked model computes (ORT, random
   inputs; a mismatch raises, see verify.py);
5. retrain the shrunk model, dense (no masks), ``retrain_epochs`` epochs, cosine schedule;
6. write it.
No resume: the run keeps its artifacts in ``workdir`` (or a temporary directory) only while it runs.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from ..admm import AdmmState
from ..config import PruneConfig
from ..errors import ConfigError
from ..graph.penalty import AdmmPenalty
from ..io import save_model
from ..report import LayerRow, PruneReport
from ..training import NO_PROGRESS, Progress, cosine_schedule
from .analysis import ChannelAnalysis, analyse
from .constraint import ChannelGroups
from .report import shrink_rows, shrink_table
from .shrink import masked, shrink
from .targets import ChannelTargets
from .untie import untie_constants
from .verify import verify

log = logging.getLogger(__name__)


@dataclass
class ChannelPruneReport(PruneReport):
    """A PruneReport with the per-group channels, MACs and parameters before and after."""

    groups: List[Dict[str, object]] = field(default_factory=list)
    totals_before: Dict[str, int] = field(default_factory=dict)
    totals_after: Dict[str, int] = field(default_factory=dict)
    max_shrink_diff: Optional[float] = None

    def table(self) -> str:
        return shrink_table(self.groups, self.totals_before, self.totals_after) + "\n" + self.summary()

    def summary(self) -> str:
        acc = lambda a: "n/a" if a is None else f"{100 * a:.2f}%"  # noqa: E731
        return (f"Top-1: before {acc(self.accuracy_before)}, after ADMM {acc(self.accuracy_after_admm)}, "
                f"hard-pruned {acc(self.accuracy_hard_pruned)}, after retraining {acc(self.accuracy_after)}")


def _recalibrate(model, reader, input_name) -> int:
    """BatchNorm running statistics from training batches (graph/bn_recalibrate.py: ORT training
    normalises with batch statistics and never writes the running ones back)."""
    from ..graph.bn_recalibrate import recalibrate_batchnorm

    n = recalibrate_batchnorm(model, iter(reader), input_name)
    if n:
        log.info("BatchNorm running statistics of %d node(s) re-estimated on training batches", n)
    return n


def prune_channels(prepared, out: Path, train_reader, config: PruneConfig, targets: ChannelTargets,
                   eval_reader=None, progress: Progress = NO_PROGRESS, workdir: Optional[Path] = None) -> ChannelPruneReport:
    from ..pipeline import (ZUUpdates, _admm_outcome, _epoch, _gradient_norms, _PruneRun, _set_epoch, _trainer,
                            _workdir, evaluate, output_model, prepare_model)

    base, untied = untie_constants(output_model(prepared, {}))
    if _recalibrate(base, train_reader, prepared.input_name) or untied:
        prepared = prepare_model(base, prepared.output_name)
    analysis = analyse(base)
    if targets.method == "sensitivity":
        from .allocate import allocate_channels

        counts, allocation = allocate_channels(prepared, analysis, targets, train_reader, config)
    else:
        from .allocate import uniform_record

        counts = targets.keep_counts(analysis)
        allocation = uniform_record(analysis, targets, counts)
    by_id = {g.id: g for g in analysis.groups}
    if counts and all(k >= by_id[gid].size for gid, k in counts.items()):
        largest = max(by_id[gid].size for gid in counts)
        raise ConfigError(
            f"no channel would be removed: every prunable group keeps all its channels (largest group: {largest} "
            f"channels, kept counts rounded up to a multiple of --round-to {targets.round_to})",
            hint="lower --round-to (1 keeps exact counts) or raise --sparsity / lower --target-macs")
    trainable = set(prepared.info.trainable)
    constraint = ChannelGroups(analysis, counts, tensors=trainable)
    report = ChannelPruneReport(config=dict(config.to_dict(), channels=targets.__dict__))
    report.allocation = allocation
    for g in analysis.groups:
        if g.id in counts:
            log.info("group %s: keep %d of %d channels", g.name, counts[g.id], g.size)
    from ..pipeline import base_loss

    loss = base_loss(prepared, config, train_reader)
    with _workdir(workdir, resumable=False) as work:  # channel runs do not resume: no debris on failure
        penalty = AdmmPenalty(loss, list(constraint.tensors))
        trainer = _trainer(prepared, prepared.training, work / "admm", config, penalty, penalty.frozen_params, config.lr)
        state = AdmmState([constraint], policy=config.rho_policy(), rho=config.rho)
        state.initialize(state.read_weights(trainer))
        if eval_reader is not None:
            before = trainer.evaluate(eval_reader)
            report.accuracy_before, report.loss_before = before.accuracy, before.loss
            if before.accuracy is not None:
                log.info("before pruning: top-1 %.2f%%", 100 * before.accuracy)
        if config.rho is None:
            norms = _gradient_norms(trainer, train_reader, state.tensors, _PruneRun.CALIBRATION_BATCHES)
            for n, rho in state.calibrate(norms, state.read_weights(trainer), config.rho_ratio).items():
                log.info("rho for %s: %.3g (auto)", n, rho)
        state.write(trainer)
        t0 = time.perf_counter()
        updates = ZUUpdates(trainer, state, report, targets.update_steps)
        for it in range(config.admm_iters):
            if state.converged():
                break
            label = f"ADMM {it + 1}/{config.admm_iters}"
            for e in range(config.epochs_per_iter):
                _set_epoch(train_reader, it * config.epochs_per_iter + e)
                _epoch(trainer, train_reader, None, label, progress, report, updates.after_step(label))
                if state.converged():
                    break
            updates.end_iteration(label)
        _admm_outcome(state, config, report)
        report.phase_seconds["admm"] = time.perf_counter() - t0
        state.disable(trainer)
        if eval_reader is not None and config.admm_iters:
            report.accuracy_after_admm = trainer.evaluate(eval_reader).accuracy
        weights = {n: trainer.get(n) for n in prepared.info.trainable}
        trainer.close()

    # hard step + shrink + verify
    keep = constraint.kept({n: weights[n] for n in constraint.tensors})
    full = output_model(prepared, weights)
    small = shrink(full, analysis, keep)
    report.max_shrink_diff = verify(masked(full, analysis, keep), small)
    log.info("shrunk model == masked model (max |diff| %.3g)", report.max_shrink_diff)
    report.totals_before, report.totals_after = analysis.counts(), analysis.counts(keep)
    report.groups = shrink_rows(analysis, keep)
    _recalibrate(small, train_reader, prepared.input_name)
    if eval_reader is not None:
        report.accuracy_hard_pruned = evaluate(small, eval_reader, prepared.output_name).accuracy
        if report.accuracy_hard_pruned is not None:
            log.info("hard-pruned and shrunk: top-1 %.2f%%", 100 * report.accuracy_hard_pruned)

    # dense retraining of the smaller model
    small_prepared = prepare_model(small, prepared.output_name)
    lr = config.retrain_lr or config.lr
    t0 = time.perf_counter()
    with _workdir(None) as work:
        trainer = _trainer(small_prepared, small_prepared.training, work / "retrain", config, loss, (), lr)
        try:
            steps = len(train_reader)
        except TypeError:
            steps = 0
        if config.retrain_schedule == "cosine" and steps:
            trainer.schedule = cosine_schedule(lr, steps * config.retrain_epochs)
        for e in range(config.retrain_epochs):
            _set_epoch(train_reader, config.admm_iters * config.epochs_per_iter + e)
            _epoch(trainer, train_reader, eval_reader, f"retrain {e + 1}/{config.retrain_epochs}", progress, report)
        weights = {n: trainer.get(n) for n in small_prepared.info.trainable}
        trainer.close()
    report.phase_seconds["retrain"] = time.perf_counter() - t0
    final = output_model(small_prepared, weights)
    _recalibrate(final, train_reader, prepared.input_name)
    save_model(final, out, external_data=prepared.used_external_data or None)
    report.output = str(out)
    before = {t.name: int(np.prod(t.dims)) for t in base.graph.initializer}
    report.layers = [LayerRow(t.name, before[t.name], int(np.prod(t.dims)), shape=tuple(t.dims), structure="channel")
                     for t in final.graph.initializer if t.name in before and t.name in constraint.tensors]
    if eval_reader is not None:
        after = evaluate(final, eval_reader, prepared.output_name)
        report.accuracy_after, report.loss_after = after.accuracy, after.loss
        if after.accuracy is not None:
            log.info("after retraining: top-1 %.2f%%", 100 * after.accuracy)
    return report
