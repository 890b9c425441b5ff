"""Runs ONNX files in the deployment runtime (plain ``onnxruntime``, the newest release).

Executed by ``tests/deploy_env.py`` with the python of ``.venv-deploy``; it imports only
``onnxruntime`` and ``numpy`` (never this project, never ``onnx``). Usage::

    python deploy_runner.py REQUEST.json

REQUEST (JSON)::

    {"models": {"dense": "a.onnx", "csr": "b.onnx"},   # label -> file
     "feeds": "feeds.npz",                               # one array per model input
     "outputs": "out.npz",                               # written: "<label>/<i>" -> i-th output
     "runs": 200, "warmup": 20,                          # batch-1 timing rounds (0: no timing)
     "threads": 1,                                       # intra-op threads of every session
     "optimized_dir": "dir" or null,                     # also save each optimized graph there
     "result": "result.json"}                            # written, see below

Timing is interleaved: every round runs each model once, in a random order (seeded), all
sessions living in this one process, so load on the machine hits every model alike.
``result.json`` has the onnxruntime version, per label the median and minimum seconds per run,
all samples, the session creation seconds and the optimized graph path.
"""
from __future__ import annotations

import json
import statistics
import sys
import time

import numpy as np
import onnxruntime as ort


def _session(path, threads, optimized=None):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    if optimized:
        opts.optimized_model_filepath = optimized
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def main(argv):
    with open(argv[1], encoding="utf-8") as fh:
        req = json.load(fh)
    models = req["models"]
    threads = int(req.get("threads", 1))
    with np.load(req["feeds"]) as data:
        feeds = {k: data[k] for k in data.files}
    sessions, created, optimized = {}, {}, {}
    for label, path in models.items():
        t0 = time.perf_counter()
        sessions[label] = _session(path, threads)
        created[label] = time.perf_counter() - t0
        if req.get("optimized_dir"):
            optimized[label] = f"{req['optimized_dir']}/{label}.optimized.onnx"
            _session(path, threads, optimized[label])
    outputs = {}
    for label, sess in sessions.items():
        names = {i.name for i in sess.get_inputs()}
        for i, value in enumerate(sess.run(None, {k: v for k, v in feeds.items() if k in names})):
            outputs[f"{label}/{i}"] = np.asarray(value)
    np.savez(req["outputs"], **outputs)

    runs, warmup = int(req.get("runs", 0)), int(req.get("warmup", 0))
    samples = {label: [] for label in sessions}
    if runs > 0:
        one = {}
        for label, sess in sessions.items():
            names = {i.name for i in sess.get_inputs()}
            one[label] = {k: v[:1] if v.ndim else v for k, v in feeds.items() if k in names}
        labels = list(sessions)
        rng = np.random.default_rng(0)
        for r in range(warmup + runs):
            # a fresh random order every round: no model is always first, last, or run twice in a
            # row across a round boundary (which favours it through warm caches)
            order = [labels[i] for i in rng.permutation(len(labels))]
            for label in order:
                sess, feed = sessions[label], one[label]
                t0 = time.perf_counter()
                sess.run(None, feed)
                dt = time.perf_counter() - t0
                if r >= warmup:
                    samples[label].append(dt)
    result = {
        "onnxruntime": ort.__version__,
        "numpy": np.__version__,
        "models": {
            label: {
                "median_s": statistics.median(samples[label]) if samples[label] else None,
                "min_s": min(samples[label]) if samples[label] else None,
                "samples_s": samples[label],
                "create_s": created[label],
                "optimized": optimized.get(label),
            }
            for label in sessions
        },
    }
    with open(req["result"], "w", encoding="utf-8") as fh:
        json.dump(result, fh)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
