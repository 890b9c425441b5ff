"""admm-onnx: ADMM weight pruning for any ONNX model, with sparse ONNX export.

High level (the shape of ONNX Runtime's ``quantize_static``)::

    import admm_onnx
    result = admm_onnx.prune("model.onnx", "pruned.onnx", train_reader,
                             admm_onnx.PruneConfig().with_sparsity(0.9), eval_reader)
    print(result.table())

Low level, for your own ORT training loop: :class:`AdmmPenalty` (an onnxblock Block wrapping
your loss), :class:`AdmmState` (Z, U, rho; reads and writes a ``CheckpointState``),
:func:`insert_masks` (masked retraining graph) and :func:`export_pruned` (the inference model).
"""
from __future__ import annotations

__version__ = "0.1.0"


def _quiet_signals_while_the_cli_starts() -> None:
    """Run as the ``admm-onnx`` command, a Ctrl-C / SIGTERM / SIGHUP during these imports
    (nothing is written yet) exits quietly with 128 + signum instead of a traceback; the CLI's
    own handlers replace these once it runs."""
    import os
    import signal
    import sys

    if not sys.argv or os.path.basename(sys.argv[0]) not in ("admm-onnx", "admm-onnx.exe"):
        return

    def leave(signum, frame):  # pragma: no cover - a race at start-up
        try:
            os.write(2, b"Interrupted.\n" if signum == signal.SIGINT else f"Interrupted by signal {signum}.\n".encode())
        finally:
            os._exit(128 + signum)

    for name in ("SIGINT", "SIGTERM", "SIGHUP"):
        try:
            signal.signal(getattr(signal, name), leave)
        except (AttributeError, ValueError, OSError):
            pass


_quiet_signals_while_the_cli_starts()

from . import _install

_install.check()  # plain onnxruntime beside the training build: one clear line, not an ImportError deep in ORT

from .admm import AdmmState, HardStep, Residual, RhoPolicy
from .constraints import Constraint, Levels, Slices, TopK, constraint_for
from .config import PruneConfig, Rule, WeightPlan, config_from_dict, load_config
from .data import (
    LABELS,
    ArrayReader,
    DataReader,
    Dataset,
    IdxReader,
    IterableReader,
    NpzReader,
    load_dataset,
)
from .errors import AdmmOnnxError, ConfigError, DataError, InstallError, ModelError, OutputError, TrainingError
from .graph.analysis import GraphInfo, WeightInfo, analyse
from .graph.masks import insert_masks, mask_name
from .graph.penalty import AdmmPenalty, rho_name, target_name
from .pipeline import evaluate, export_pruned, make_readers, masked_model, prepare_model, prune, train
from .progress import CallbackProgress, ProgressEvent, TextProgress, TqdmProgress
from .projection import project, projection_mask
from .report import PruneReport

__all__ = [
    "CallbackProgress", "ProgressEvent", "TextProgress", "TqdmProgress",
    "AdmmOnnxError", "AdmmPenalty", "AdmmState", "ArrayReader", "Constraint", "HardStep", "Levels", "RhoPolicy",
    "Slices", "TopK", "constraint_for", "ConfigError", "DataError", "DataReader",
    "Dataset", "GraphInfo", "IdxReader", "InstallError", "IterableReader", "LABELS", "ModelError", "NpzReader", "OutputError",
    "PruneConfig", "PruneReport", "Residual", "Rule", "TrainingError", "WeightInfo", "WeightPlan", "analyse",
    "config_from_dict", "evaluate", "export_pruned", "insert_masks", "load_config", "load_dataset",
    "make_readers", "mask_name", "masked_model", "prepare_model", "project", "projection_mask", "prune", "rho_name",
    "target_name", "train",
]
