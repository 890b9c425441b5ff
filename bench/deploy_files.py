"""Deployment files of a trained model and how they do in the newest plain onnxruntime.

From an fp32 model (``--fp32``, e.g. ``lenet5_dense.onnx`` of bench/lenet5_mnist.py) and
optionally its pruned + quantized version (``--pruned``, written by ``prune --bits``: its
quantization specs are in the file), this writes into ``--out``:

- ``pruned.packed.onnx``: the pruned model with its dead channels removed (exact,
  admm_onnx.structured.dead) in the ``packed`` format (Golomb-coded positions, k-bit levels);
- ``pruned.qdq.onnx``: int8 QDQ of the pruned model, its weights the trained levels exactly;
- ``fp32.qdq.onnx``: int8 QDQ of the fp32 model (post-training 8-bit weights);
- (``--also LABEL=PATH``: other files to measure beside them, e.g. a channel-pruned model;
  with ``--also-qdq`` their int8 QDQ exports ``LABEL.qdq.onnx`` too)

QDQ activations are calibrated (min/max) on ``--calibration`` training images. Then
bench/deploy_eval.py runs every file in ``--deploy-python`` (plain onnxruntime): top-1 on the
whole test split, the op types onnxruntime runs, batch-1 and batch-32 latency interleaved in
one process. Sizes are file sizes on disk; compression is fp32 file bytes / file bytes.

    python bench/deploy_files.py --data mnist:../shared/data/mnist --fp32 OUT/lenet5_dense.onnx \\
        --pruned OUT/lenet5_pruned.onnx --out OUT/deploy --results bench/results/lenet5_deploy.json

``--data cifar10:CACHE.npz`` reads the decoded JPEG copy of CIFAR-10 that bench/resnet20_cifar10.py
caches (x / 255, as it trains).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def load_data(spec: str):
    kind, path = spec.split(":", 1)
    if kind == "mnist":
        from admm_onnx.data import load_idx_dir

        d = load_idx_dir(path)
        return d.x_train, d.y_train, d.x_test, d.y_test, f"MNIST ({path})"
    if kind == "cifar10":
        sys.path.insert(0, str(HERE))
        from resnet20_cifar10 import load_cifar

        x_tr, y_tr, x_te, y_te = load_cifar(Path(path))
        return (x_tr.astype(np.float32) / 255.0, y_tr, x_te.astype(np.float32) / 255.0, y_te,
                "CIFAR-10 (JPEG copy)")
    raise SystemExit(f"--data: unknown kind {kind!r} (mnist:DIR or cifar10:CACHE.npz)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--fp32", required=True, type=Path)
    p.add_argument("--pruned", type=Path, default=None)
    p.add_argument("--also", action="append", default=[], metavar="LABEL=PATH")
    p.add_argument("--also-qdq", action="store_true",
                   help="also write and measure the int8 QDQ export of every --also model (LABEL.qdq), "
                        "e.g. a channel-pruned model")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--results", type=Path, default=None)
    p.add_argument("--calibration", type=int, default=1000, help="training images for the activation ranges")
    p.add_argument("--activations", choices=("uint8", "int8"), default="uint8")
    p.add_argument("--deploy-python", default=str(ROOT / ".venv-deploy" / "bin" / "python"))
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)

    from admm_onnx import formats
    from admm_onnx.quantization import model_quantization
    from admm_onnx.structured.dead import remove_dead_channels

    t0 = time.time()
    x_tr, y_tr, x_te, y_te, data_name = load_data(args.data)
    calib = x_tr[np.random.default_rng(0).permutation(len(x_tr))[: args.calibration]]
    args.out.mkdir(parents=True, exist_ok=True)
    files = {"fp32": str(args.fp32)}
    facts = {}
    fp32 = onnx.load(str(args.fp32))
    q, rep = formats.export(fp32, "qdq", calibration=calib, activations=args.activations)
    onnx.save(q, args.out / "fp32.qdq.onnx")
    files["fp32.qdq"] = str(args.out / "fp32.qdq.onnx")
    if args.pruned is not None:
        pruned = onnx.load(str(args.pruned))
        specs = model_quantization(pruned)
        facts["quantization"] = {n: {"bits": s.bits, "axis": s.axis, "scales": len(s.scale)} for n, s in specs.items()}
        files["pruned"] = str(args.pruned)
        q, rep = formats.export(pruned, "qdq", calibration=calib, activations=args.activations)
        onnx.save(q, args.out / "pruned.qdq.onnx")
        files["pruned.qdq"] = str(args.out / "pruned.qdq.onnx")
        facts["pruned.qdq exact weights"] = sorted(r.name for r in rep.rows if r.storage == "int8")
        slim, removed = remove_dead_channels(pruned)
        facts["dead channels removed"] = removed
        onnx.save(slim, args.out / "pruned.slim.onnx")
        files["pruned.slim"] = str(args.out / "pruned.slim.onnx")
        packed, rep = formats.export(slim, "packed")
        onnx.save(packed, args.out / "pruned.packed.onnx")
        files["pruned.packed"] = str(args.out / "pruned.packed.onnx")
        facts["packed rows"] = [{"name": r.name, "shape": list(r.shape), "nonzero": r.nonzero, "storage": r.storage,
                                 "stored_bytes": r.stored_bytes, "bits": r.bits} for r in rep.rows]
    for item in args.also:
        label, path = item.split("=", 1)
        files[label] = path
        if args.also_qdq:
            q, rep = formats.export(onnx.load(path), "qdq", calibration=calib, activations=args.activations)
            onnx.save(q, args.out / f"{label}.qdq.onnx")
            files[f"{label}.qdq"] = str(args.out / f"{label}.qdq.onnx")
    np.savez(args.out / "test.npz", x_test=x_te.astype(np.float32), y_test=np.asarray(y_te, np.int64))
    cmd = [args.deploy_python, str(HERE / "deploy_eval.py"), *[f"{k}={v}" for k, v in files.items()],
           "--data", str(args.out / "test.npz"), "--rounds", str(args.rounds), "--threads", str(args.threads),
           "--batches", "1", "32"]
    res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    dense_bytes = os.path.getsize(args.fp32)
    for label, m in res["models"].items():
        m["compression_vs_fp32_file"] = dense_bytes / m["bytes"]
    result = {
        "benchmark": "deployment files in the newest plain onnxruntime",
        "command": "python bench/deploy_files.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "data": data_name, "calibration_images": int(len(calib)), "activations": args.activations,
        "machine": {"platform": platform.platform(), "nproc": os.cpu_count(), "python": platform.python_version()},
        "loadavg_at_end": os.getloadavg(), "seconds": time.time() - t0,
        "files": files, "facts": facts, "deploy": res,
    }
    text = json.dumps(result, indent=2, default=float)
    if args.results:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(text + "\n")
    print(f"onnxruntime {res['onnxruntime']}, {data_name}, {len(y_te)} test images; load {os.getloadavg()[0]:.1f}")
    print(f"{'file':<14} {'bytes':>10} {'x fp32':>8} {'top-1':>8} {'b1 ms':>8} {'b32 ms':>8}  ops")
    for label, m in res["models"].items():
        lat = res["latency"]
        print(f"{label:<14} {m['bytes']:>10,} {m['compression_vs_fp32_file']:>7.1f}x {100 * m['top1']:>7.2f}% "
              f"{lat['1'][label]['median_ms']:>8.3f} {lat['32'][label]['median_ms']:>8.3f}  "
              + ",".join(o for o in m["optimized_ops"] if o not in ("Relu", "Flatten", "Reshape")))


if __name__ == "__main__":
    main()
