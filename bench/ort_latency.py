"""Side-by-side CPU latency of ONNX models in whatever onnxruntime this interpreter has.

Run it with the newest plain onnxruntime (a venv of its own: admm-onnx pins the training
build). For every (batch, threads) pair, one session per model is opened and the models are
timed in alternating rounds (each round: ``--runs`` calls per model, the order alternating), so
load changes on a shared machine hit all of them alike; the median per-call time over rounds is
reported. Prints JSON.

By default only one session is alive at a time (``--sessions one``): every round opens the
model's session, warms it up, times it and closes it. ONNX Runtime's worker threads spin-wait
for work after each call, so sessions kept open side by side (``--sessions all``, this script's
behaviour before 2026-12-05) compete for the cores through their idle spinners: on this 2-core
machine that made every 2-thread figure erratic (dense ResNet-20 at batch 1 took 1.27 ms with
2 threads against 0.62 ms with 1).

    /work/venvs/ortnew/bin/python bench/ort_latency.py dense.onnx pruned.onnx --batches 1 32 --threads 1 2
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import numpy as np
import onnxruntime as ort


def _feed(sess, batch):
    inp = sess.get_inputs()[0]
    shape = [batch if not isinstance(d, int) or i == 0 else d for i, d in enumerate(inp.shape)]
    return {inp.name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--runs", type=int, default=0, help="calls per model per round (0: about 50 ms worth)")
    p.add_argument("--sessions", choices=("one", "all"), default="one",
                   help="one: a single session alive at a time, reopened every round (default); all: every "
                        "model's session open throughout (their idle threads compete for the cores)")
    args = p.parse_args(argv)

    def open_session(path, threads, batch):
        o = ort.SessionOptions()
        o.intra_op_num_threads = threads
        o.inter_op_num_threads = 1
        o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        s = ort.InferenceSession(path, o, providers=["CPUExecutionProvider"])
        feed = _feed(s, batch)
        for _ in range(5):
            s.run(None, feed)
        return s, feed

    results = []
    for threads in args.threads:
        for batch in args.batches:
            kept = [open_session(path, threads, batch) for path in args.models] if args.sessions == "all" else None
            runs = args.runs
            if not runs:
                s, feed = kept[0] if kept else open_session(args.models[0], threads, batch)
                t0 = time.perf_counter()
                for _ in range(5):
                    s.run(None, feed)
                runs = max(3, int(0.05 / max(1e-5, (time.perf_counter() - t0) / 5)))
                del s
            times = [[] for _ in args.models]
            for r in range(args.rounds):
                order = range(len(args.models)) if r % 2 == 0 else reversed(range(len(args.models)))
                for i in order:
                    s, feed = kept[i] if kept else open_session(args.models[i], threads, batch)
                    t0 = time.perf_counter()
                    for _ in range(runs):
                        s.run(None, feed)
                    times[i].append((time.perf_counter() - t0) / runs)
                    del s  # with --sessions one, the session (and its threads) closes here
            row = {"batch": batch, "threads": threads, "runs_per_round": runs, "rounds": args.rounds,
                   "sessions": args.sessions,
                   "ms": {path: 1e3 * statistics.median(t) for path, t in zip(args.models, times)}}
            results.append(row)
    print(json.dumps({"onnxruntime": ort.__version__, "python": platform.python_version(), "results": results}))


if __name__ == "__main__":
    main()
