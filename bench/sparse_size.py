"""File size and ONNX Runtime load time of sparse LeNet-5 exports (dense vs COO vs CSR).

Builds LeNet-5 (admm_onnx.models), prunes every weight by magnitude with
admm_onnx.projection.project, once at the ADMM paper's keep ratios (conv1 20%, conv2 8%,
fc1 0.9%, fc2 7%: 1.4% of the weights overall) and once at a uniform 90% sparsity, writes each
as dense, coo, csr (fp32) and csr-fp16 with admm_onnx.io.save_model, and prints a markdown
table. The weights are random (seeded) and magnitude-pruned, not trained: fine for sizes and
load times, since those depend only on the sparsity pattern's counts, not on the values.

Usage: python bench/sparse_size.py [--repeats 20] [--out-dir DIR]
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from admm_onnx import io, sparse
from admm_onnx.models import build
from admm_onnx.projection import project

PAPER_KEEP = {"conv1.weight": 0.20, "conv2.weight": 0.08, "fc1.weight": 0.009, "fc2.weight": 0.07}
UNIFORM_KEEP = {name: 0.10 for name in PAPER_KEEP}
TARGET = 40.0


def pruned_lenet(keep: dict) -> onnx.ModelProto:
    model = build("lenet5")
    for tensor in model.graph.initializer:
        if tensor.name in keep:
            w = project(numpy_helper.to_array(tensor), 1.0 - keep[tensor.name])
            tensor.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(w), tensor.name))
    return model


def load_ms(path: Path, repeats: int) -> float:
    """Median wall time of creating an InferenceSession from the file (default options)."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        times.append(time.perf_counter() - t0)
    return 1000.0 * statistics.median(times[1:])  # first run warms caches


def run(path: Path, feeds: dict) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20, help="session creations timed per file")
    parser.add_argument("--out-dir", type=Path, default=None, help="keep the files here (default: temp dir)")
    args = parser.parse_args(argv)

    tmp = None
    if args.out_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="sparse_size.")
        out_dir = Path(tmp.name)
    else:
        out_dir = args.out_dir
        out_dir.mkdir(parents=True, exist_ok=True)

    feeds = {"input": np.random.default_rng(0).standard_normal((8, 1, 28, 28)).astype(np.float32)}
    variants = [("dense", None, None), ("coo", "coo", "fp32"), ("csr", "csr", "fp32"), ("csr-fp16", "csr", "fp16")]
    lines = [
        "| pruning | nonzero weights | format | file bytes | smaller than dense | file bytes / nonzero "
        "| ORT load ms (median) | max abs output change |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    csr_paper_ratio = None
    for label, keep in (("paper ratios (1.4% kept)", PAPER_KEEP), ("uniform 90% sparsity", UNIFORM_KEEP)):
        model = pruned_lenet(keep)
        nnz = sum(int(np.count_nonzero(numpy_helper.to_array(t))) for t in model.graph.initializer if t.name in keep)
        tag = "paper" if keep is PAPER_KEEP else "u90"
        dense_path = out_dir / f"lenet5_{tag}_dense.onnx"
        io.save_model(model, dense_path)
        reference = run(dense_path, feeds)
        dense_bytes = dense_path.stat().st_size
        for name, fmt, values in variants:
            if fmt is None:
                path = dense_path
            else:
                encoded, _ = sparse.export_sparse(model, fmt=fmt, values=values)
                path = out_dir / f"lenet5_{tag}_{name}.onnx"
                io.save_model(encoded, path)
            size = path.stat().st_size
            ratio = dense_bytes / size
            if tag == "paper" and name == "csr":
                csr_paper_ratio = ratio
            change = float(np.max(np.abs(run(path, feeds) - reference)))
            lines.append(
                f"| {label} | {nnz:,} | {name} | {size:,} | {ratio:.1f}x | {size / nnz:.2f} "
                f"| {load_ms(path, args.repeats):.2f} | {change:.2e} |"
            )

    print("# Sparse export of LeNet-5: file size and ORT load time\n")
    print(f"- date: {_dt.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(f"- machine: nproc {os.cpu_count()}, {platform.platform()}, {platform.processor() or platform.machine()}")
    print(f"- python {platform.python_version()}, onnx {onnx.__version__}, onnxruntime {ort.__version__}")
    print("- weights: seeded random init, magnitude-pruned per layer (admm_onnx.projection.project), not "
          "trained; sizes depend only on the nonzero counts, so this is fine for sizes and load times.")
    print("- file bytes include biases (580 dense floats), graph and decode function; "
          "output change: 8 random inputs, ORT default options, vs the dense file.\n")
    print("\n".join(lines))
    verdict = "met" if csr_paper_ratio >= TARGET else "NOT met"
    print("\nLoad time of csr files includes ORT inlining the CsrDecode function and constant-folding it "
          "into dense initializers (once per session); inference then runs the dense kernels.")
    print(f"\nCSR (fp32) at the paper's ratios: {csr_paper_ratio:.2f}x smaller than dense fp32 "
          f"(target >= {TARGET:.0f}x: {verdict}).")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
