"""Cost and parallel speed-up of the sensitivity sweep (issue 14): LeNet-5 on MNIST, 4 layers x
10 levels + the dense baseline on 2,000 training images, in one process, in local worker
processes and (``--ray``) on a local Ray cluster, interleaved round by round so that all of
them see the same machine load.

    python bench/sensitivity_sweep.py --mnist ../shared/data/mnist --out /tmp/sens [--rounds 3] [--ray]

The dense model is the bench's (``bench/lenet5_mnist.py``: 4 epochs, lr 2e-3, batch 128),
trained once into OUT/lenet5_dense.onnx (or ``--model FILE``). No run reads the cache. Writes
OUT/sensitivity_sweep.json (``--json`` to put it elsewhere, e.g. bench/results/) with the
machine, the load average before every run, each run's seconds (evaluations, and wall
including worker start-up), its CPU seconds (this process and its worker processes: the cost,
which a loaded machine changes far less than the wall time) and whether every runner gave the
same curves.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from lenet5_mnist import machine_info  # noqa: E402


def _cpu() -> float:
    """User + system CPU seconds of this process and of its reaped children."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def dense_model(path: Path, mnist: str, seed: int) -> Path:
    """The bench's dense LeNet-5 (trained once, then reused)."""
    if path.exists():
        return path
    import admm_onnx
    from admm_onnx.io import save_model
    from admm_onnx.models import build

    init = path.with_name("lenet5_init.onnx")
    save_model(build("lenet5", input_shape=(1, 28, 28), seed=seed), init)
    prepared = admm_onnx.prepare_model(str(init))
    data = admm_onnx.load_dataset(f"mnist:{mnist}")
    config = admm_onnx.PruneConfig(lr=2e-3, batch_size=128, seed=seed, workers=2)
    train_reader, eval_reader, _ = admm_onnx.make_readers(prepared, data, config.batch_size, seed)
    report = admm_onnx.train(prepared, str(path), train_reader, 4, eval_reader, config)
    print(f"dense LeNet-5: top-1 {100 * report.accuracy_after:.2f}% -> {path}", flush=True)
    return path


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mnist", required=True, help="directory with the four MNIST IDX .gz files")
    ap.add_argument("--out", required=True, help="output directory (the dense model is kept there)")
    ap.add_argument("--model", default=None, help="dense model to sweep (default: train the bench's LeNet-5)")
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (every runner once per round)")
    ap.add_argument("--workers", type=int, default=2, help="local worker processes of the parallel variant")
    ap.add_argument("--ray", action="store_true", help="also a local Ray cluster (needs pip install '.[ray]')")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="results file (default: OUT/sensitivity_sweep.json)")
    args = ap.parse_args(argv)

    import numpy as np

    import admm_onnx
    from admm_onnx.allocation.runners import make_runner
    from admm_onnx.allocation.sensitivity import DEFAULT_LEVELS, run_sensitivity
    from admm_onnx.data import fit_to_input

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    model = Path(args.model) if args.model else dense_model(out / "lenet5_dense.onnx", args.mnist, args.seed)
    prepared = admm_onnx.prepare_model(str(model))
    data = admm_onnx.load_dataset(f"mnist:{args.mnist}")
    idx = np.sort(np.random.default_rng(args.seed).permutation(len(data.x_train))[: args.samples])
    x = fit_to_input(data.x_train[idx], prepared.input_shape, prepared.input_name)
    y = data.y_train[idx]

    variants = [("one process", dict(workers=1)), (f"--workers {args.workers}", dict(workers=args.workers))]
    if args.ray:
        variants.append((f"--ray local ({args.workers} workers)", dict(workers=args.workers, ray_address="local")))
    runs, curves = [], {}
    for r in range(args.rounds):
        for label, kw in variants:
            load = os.getloadavg()[0]
            cpu0 = _cpu()
            t0 = time.perf_counter()
            result = run_sensitivity(prepared, x, y, DEFAULT_LEVELS, "loss", "element", None, make_runner(**kw), None)
            wall = time.perf_counter() - t0
            cpu = _cpu() - cpu0
            runs.append({"round": r, "runner": label, "evaluations": result.computed, "seconds": result.seconds,
                         "wall_seconds": wall, "loadavg_1min_before": load,
                         # this process + its finished worker processes (not Ray's workers)
                         "cpu_seconds": None if "ray" in label else cpu})
            curves.setdefault(label, result.to_dict()["layers"])
            print(f"round {r + 1}/{args.rounds} {label}: {result.computed} evaluations, {result.seconds:.1f} s "
                  f"({wall:.1f} s wall), load {load:.1f}", flush=True)

    def median(label, key):
        return float(np.median([run[key] for run in runs if run["runner"] == label]))

    base = variants[0][0]
    summary = {label: {"median_seconds": median(label, "seconds"), "median_wall_seconds": median(label, "wall_seconds"),
                       "speedup_vs_one_process": median(base, "seconds") / median(label, "seconds"),
                       "median_cpu_seconds": None if "ray" in label else median(label, "cpu_seconds")}
               for label, _ in variants}
    first = curves[base]
    identical = all(json.dumps(c, sort_keys=True) == json.dumps(first, sort_keys=True) for c in curves.values())
    result = {"machine": info, "command": " ".join(["python", "bench/sensitivity_sweep.py", *(argv or sys.argv[1:])]),
              "model": str(model), "layers": len(prepared.info.prunable), "levels": list(DEFAULT_LEVELS),
              "samples": int(len(x)), "metric": "loss", "runs": runs, "summary": summary,
              "identical_curves": identical, "loadavg_at_end": os.getloadavg()}
    path = Path(args.json) if args.json else out / "sensitivity_sweep.json"
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    for label, s in summary.items():
        cpu = "" if s["median_cpu_seconds"] is None else f", {s['median_cpu_seconds']:.1f} CPU-s"
        print(f"{label}: median {s['median_seconds']:.1f} s ({s['median_wall_seconds']:.1f} s wall{cpu}), "
              f"{s['speedup_vs_one_process']:.2f}x")
    print(f"identical curves: {identical}; wrote {path}")
    return result


if __name__ == "__main__":
    main()
