"""``admm-onnx demo``: the whole pipeline on the embedded digits data, in well under a minute.

Builds LeNet-5 for 8x8 inputs, trains it dense, ADMM-prunes it with per-layer ratios in the
paper's spirit (conv1 keeps 20%, conv2 and fc2 10%, fc1 3%), retrains with masks, prints the
paper-style table and writes the models and the report into the output directory.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Callable

from .config import PruneConfig, Rule
from .data import load_digits
from .io import save_model, write_text
from .models import build
from .pipeline import make_readers, prepare_model, prune, train
from .training import NO_PROGRESS, Progress

log = logging.getLogger(__name__)

DEMO_CONFIG = PruneConfig(
    rules=(
        Rule(sparsity=0.8, names=("conv1.weight",)),
        Rule(sparsity=0.9, names=("conv2.weight", "fc2.weight")),
        Rule(sparsity=0.97, names=("fc1.weight",)),
    ),
    admm_iters=10,
    epochs_per_iter=5,  # a cap: ADMM ends once every primal residual is under admm_tol (default rho settings)
    retrain_epochs=30,
    lr=1e-3,
    batch_size=32,
    seed=0,
)
DENSE_EPOCHS = 15
#: The files the demo writes into its output folder (nothing else there is touched).
DEMO_FILES = ("lenet5_init.onnx", "lenet5_dense.onnx", "lenet5_pruned.onnx", "report.json")


def run_demo(out_dir: Path, progress: Progress = NO_PROGRESS, echo: Callable[[str], None] = log.info) -> dict:
    """Run the demo into ``out_dir``; returns the report as a dict."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = load_digits()
    echo(f"Data: scikit-learn digits, {len(data.x_train)} train / {len(data.x_test)} test images of 8x8")
    initial = out_dir / "lenet5_init.onnx"
    save_model(build("lenet5", input_shape=(1, 8, 8), seed=DEMO_CONFIG.seed), initial)
    prepared = prepare_model(initial)
    train_reader, eval_reader, _ = make_readers(prepared, data, DEMO_CONFIG.batch_size, DEMO_CONFIG.seed)

    dense = out_dir / "lenet5_dense.onnx"
    echo(f"1/2 Dense training, {DENSE_EPOCHS} epochs")
    dense_report = train(prepared, dense, train_reader, DENSE_EPOCHS, eval_reader, DEMO_CONFIG, progress)
    echo(f"    dense top-1 {100 * dense_report.accuracy_after:.2f}%")

    pruned = out_dir / "lenet5_pruned.onnx"
    c = DEMO_CONFIG
    echo(f"2/2 ADMM pruning: at most {c.admm_iters} iterations x {c.epochs_per_iter} epochs (ends once converged), "
         f"then {c.retrain_epochs} masked retraining epochs")
    report = prune(dense, pruned, train_reader, DEMO_CONFIG, eval_reader, progress)
    report.phase_seconds["dense"] = dense_report.phase_seconds.get("train", 0.0)
    report.phase_seconds["total"] = time.perf_counter() - t0
    result = report.to_dict()
    write_text(out_dir / "report.json", json.dumps(result, indent=2, default=float) + "\n")
    echo("")
    echo(report.table())
    echo(f"Total time {report.phase_seconds['total']:.1f} s. Wrote {initial}, {dense}, {pruned} and {out_dir / 'report.json'}")
    return result
