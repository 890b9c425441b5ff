"""Side-by-side CPU latency of ONNX models in whatever onnxruntime this interpreter has.

Run it with the newest plain onnxruntime (a venv of its own: admm-onnx pins the training
build). For every (batch, threads) pair, one session per model is opened and the models are
timed in alternating rounds (each round: ``--runs`` calls per model, the order alternating), so
load changes on a shared machine hit all of them alike; the median per-call time over rounds is
reported. Prints JSON.

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
    args = p.parse_args(argv)
    results = []
    for threads in args.threads:
        for batch in args.batches:
            sessions = []
            for path in args.models:
                o = ort.SessionOptions()
                o.intra_op_num_threads = threads
                o.inter_op_num_threads = 1
                o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
                s = ort.InferenceSession(path, o, providers=["CPUExecutionProvider"])
                feed = _feed(s, batch)
                for _ in range(5):
                    s.run(None, feed)
                sessions.append((s, feed))
            runs = args.runs
            if not runs:
                s, feed = sessions[0]
                t0 = time.perf_counter()
                s.run(None, feed)
                runs = max(3, int(0.05 / max(1e-5, time.perf_counter() - t0)))
            times = [[] for _ in sessions]
            for r in range(args.rounds):
                order = range(len(sessions)) if r % 2 == 0 else reversed(range(len(sessions)))
                for i in order:
                    s, feed = sessions[i]
                    t0 = time.perf_counter()
                    for _ in range(runs):
                        s.run(None, feed)
                    times[i].append((time.perf_counter() - t0) / runs)
            row = {"batch": batch, "threads": threads, "runs_per_round": runs, "rounds": args.rounds,
                   "ms": {path: 1e3 * statistics.median(t) for path, t in zip(args.models, times)}}
            results.append(row)
    print(json.dumps({"onnxruntime": ort.__version__, "python": platform.python_version(), "results": results}))


if __name__ == "__main__":
    main()
