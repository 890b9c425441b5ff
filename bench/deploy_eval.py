"""Top-1 and side-by-side latency of ONNX files in the deployment runtime (plain onnxruntime).

Run it with the newest plain onnxruntime (its own venv: admm-onnx pins the training build;
``python tests/deploy_env.py`` makes ``.venv-deploy``). Imports only onnxruntime and numpy.

    .venv-deploy/bin/python bench/deploy_eval.py --data test.npz --out result.json \\
        fp32=lenet5_dense.onnx int8=lenet5.qdq.onnx --batches 1 32 --rounds 15

``--data``: an .npz with ``x_test`` (float32, N x input shape) and ``y_test`` (int labels).
For every model: top-1 over all of ``x_test`` (batches of 100), the op types of the graph
onnxruntime runs after its optimizations (``session.optimized_model_filepath``, read as
protobuf-free text: the op type strings), and for each batch size the median per-call
latency, the models timed in alternating rounds in this one process (``--runs`` calls per
model per round; order reversed every round) so load on a shared machine hits them alike.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import tempfile
import time

import numpy as np
import onnxruntime as ort


def _session(path, threads, optimized=None):
    o = ort.SessionOptions()
    o.intra_op_num_threads = threads
    o.inter_op_num_threads = 1
    o.log_severity_level = 3
    o.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if optimized:
        o.optimized_model_filepath = optimized
    return ort.InferenceSession(path, o, providers=["CPUExecutionProvider"])


def _op_types(path):
    """Op types named in a saved optimized model (scanned from its bytes: no onnx import)."""
    data = open(path, "rb").read()
    known = ("QLinearConv", "QGemm", "QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat", "ConvInteger",
             "DynamicQuantizeLinear", "QuantizeLinear", "DequantizeLinear", "NhwcMaxPool", "FusedConv", "FusedGemm",
             "Conv", "Gemm", "MatMul", "MaxPool", "Relu", "Add", "GlobalAveragePool", "QLinearAdd",
             "QLinearGlobalAveragePool", "ReorderInput", "ReorderOutput", "Transpose", "Flatten", "Reshape")
    found = set()
    for name in known:
        if re.search(rb"\x22" + bytes([len(name)]) + name.encode(), data):  # field 4 (op_type) of a NodeProto
            found.add(name)
    return sorted(found)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", help="label=path")
    p.add_argument("--data", required=True)
    p.add_argument("--out", default=None)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--runs", type=int, default=0, help="calls per model per round (0: about 40 ms of the first model)")
    args = p.parse_args(argv)
    models = dict(m.split("=", 1) for m in args.models)
    with np.load(args.data) as d:
        x, y = d["x_test"].astype(np.float32), d["y_test"].astype(np.int64)
    result = {"onnxruntime": ort.__version__, "numpy": np.__version__, "platform": platform.platform(),
              "nproc": os.cpu_count(), "threads": args.threads, "loadavg_start": os.getloadavg(),
              "samples": int(len(x)), "models": {}}
    sessions = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, path in models.items():
            opt = os.path.join(tmp, f"{label}.opt.onnx")
            _session(path, args.threads, opt)
            sessions[label] = _session(path, args.threads)
            result["models"][label] = {"path": path, "bytes": os.path.getsize(path), "optimized_ops": _op_types(opt)}
    for label, sess in sessions.items():
        name = sess.get_inputs()[0].name
        correct = 0
        for i in range(0, len(x), 100):
            out = sess.run(None, {name: x[i:i + 100]})[0]
            correct += int((out.reshape(len(out), -1).argmax(1) == y[i:i + 100]).sum())
        result["models"][label]["top1"] = correct / len(x)
    result["latency"] = {}
    for batch in args.batches:
        feeds = {l: {s.get_inputs()[0].name: x[:batch]} for l, s in sessions.items()}
        for l, s in sessions.items():
            for _ in range(5):
                s.run(None, feeds[l])
        runs = args.runs
        if not runs:
            first = next(iter(sessions))
            t0 = time.perf_counter()
            sessions[first].run(None, feeds[first])
            runs = max(3, int(0.04 / max(1e-5, time.perf_counter() - t0)))
        labels = list(sessions)
        times = {l: [] for l in labels}
        for r in range(args.rounds):
            for l in (labels if r % 2 == 0 else labels[::-1]):
                s, f = sessions[l], feeds[l]
                t0 = time.perf_counter()
                for _ in range(runs):
                    s.run(None, f)
                times[l].append((time.perf_counter() - t0) / runs)
        result["latency"][str(batch)] = {
            "runs_per_round": runs, "rounds": args.rounds,
            **{l: {"median_ms": 1e3 * statistics.median(t), "min_ms": 1e3 * min(t)} for l, t in times.items()},
        }
    result["loadavg_end"] = os.getloadavg()
    text = json.dumps(result, indent=2)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
