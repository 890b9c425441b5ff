"""Every export format of LeNet-5 in the deployment runtime: bytes, bit-exactness, batch-1 latency.

Builds LeNet-5 (admm_onnx.models, 431,080 weights), magnitude-prunes it at the ADMM paper's keep
ratios (conv1 20%, conv2 8%, fc1 0.9%, fc2 7%; admm_onnx.projection.project; seeded random
weights, not trained: sizes and speed depend on the counts, not on the values), and a second
copy whose pruned weights are also moved onto 3-bit levels (per output channel) and whose biases
onto 8-bit levels (per tensor), the specs recorded as ``prune --bits`` records them. Each is
written dense and in every registered format (csr also with fp16 values), then run in plain
onnxruntime (the newest release, ``.venv-deploy``, see tests/deploy_env.py): outputs compared
bit for bit with the same weights stored dense (``densify`` of the file), the optimized graph
checked for leftover decode ops, and batch 1 timed interleaved with the dense file in one
process (1 intra-op thread, a random order every round, median over rounds of the paired time
ratio).

Usage: python bench/deploy_formats.py [--runs 2000] [--out-dir DIR] [--json FILE]
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from deploy_env import get_env  # noqa: E402

from admm_onnx import formats, io  # noqa: E402
from admm_onnx.quantization import QuantSpec, dequantize, fit_levels, mark_model  # noqa: E402
from sparse_size import pruned_lenet  # noqa: E402

PAPER_KEEP = {"conv1.weight": 0.20, "conv2.weight": 0.08, "fc1.weight": 0.009, "fc2.weight": 0.07}


def quantized(model: onnx.ModelProto, weight_bits: int = 3, bias_bits: int = 8) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    specs = {}
    for t in out.graph.initializer:
        a = numpy_helper.to_array(t)
        if t.name in PAPER_KEEP:
            bits, axis, keep = weight_bits, 0, a != 0
        elif t.name.endswith(".bias"):
            bits, axis, keep = bias_bits, None, None
        else:
            continue
        q, scale = fit_levels(a, bits, axis, keep)
        t.CopyFrom(numpy_helper.from_array(dequantize(q, scale, axis), t.name))
        specs[t.name] = QuantSpec(bits, tuple(float(x) for x in scale), axis)
    mark_model(out, specs)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2000, help="interleaved batch-1 rounds per file")
    parser.add_argument("--out-dir", type=Path, default=None, help="keep the files here (default: temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    env = get_env()
    tmp = tempfile.TemporaryDirectory(prefix="deploy_formats.") if args.out_dir is None else None
    out_dir = Path(tmp.name) if tmp else args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    feeds = {"input": np.random.default_rng(0).standard_normal((8, 1, 28, 28)).astype(np.float32)}
    load_before = os.getloadavg()
    started = _dt.datetime.now().astimezone().isoformat(timespec="seconds")

    base = pruned_lenet(PAPER_KEEP)
    io.save_model(base, out_dir / "dense.onnx")
    dense_bytes = (out_dir / "dense.onnx").stat().st_size
    models = {"pruned fp32": base, "pruned + 3-bit levels": quantized(base)}
    variants = [("dense", {}), ("coo", {}), ("csr", {}), ("csr", {"values": "fp16"}), ("packed", {})]
    rows = []
    for mlabel, model in models.items():
        for fname, opts in variants:
            if mlabel != "pruned fp32" and fname in ("coo",):
                continue
            label = fname + ("-fp16" if opts.get("values") == "fp16" else "")
            tag = f"{'q3' if 'levels' in mlabel else 'fp32'}_{label}"
            encoded, report = formats.export(model, fname, **opts)
            path = out_dir / f"lenet5_{tag}.onnx"
            io.save_model(encoded, path)
            decoded = formats.densify(encoded) if fname != "dense" else encoded
            ref_path = out_dir / f"lenet5_{tag}.decoded.onnx"
            io.save_model(decoded, ref_path)
            res = env.run({"file": path, "decoded": ref_path, "dense": out_dir / "dense.onnx"}, feeds,
                          runs=args.runs, warmup=200, optimized=True, workdir=out_dir)
            exact = all(np.array_equal(a, b) for a, b in zip(res.outputs["file"], res.outputs["decoded"]))
            ops = {n.op_type for n in onnx.load(str(res.optimized["file"])).graph.node}
            dense_ops = {n.op_type for n in onnx.load(str(res.optimized["dense"])).graph.node}
            size = path.stat().st_size
            nnz = sum(r.nonzero for r in report.rows)
            rows.append({
                "model": mlabel, "format": label, "file_bytes": size, "vs_dense_fp32": round(dense_bytes / size, 1),
                "weight_bytes": report.total_stored_bytes, "nonzero": nnz,
                "bit_exact_vs_decoded": exact, "decode_ops_left": sorted(ops - dense_ops),
                "batch1_us": round(res.median("file") * 1e6, 1), "dense_batch1_us": round(res.median("dense") * 1e6, 1),
                "ratio_vs_dense": round(res.ratio("file", "dense"), 3), "session_create_ms": round(res.create_s["file"] * 1e3, 1),
            })
            print(f"{mlabel:24s} {label:10s} {size:>9,} B  {dense_bytes / size:6.1f}x  exact={exact}  "
                  f"left={sorted(ops - dense_ops)}  {res.median('file') * 1e6:7.1f} us  ratio {rows[-1]['ratio_vs_dense']:.3f}",
                  flush=True)
    load_after = os.getloadavg()
    meta = {
        "command": "python bench/deploy_formats.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": started, "machine": f"nproc {os.cpu_count()}, {platform.platform()}, {platform.processor() or platform.machine()}",
        "load_before": load_before, "load_after": load_after, "onnxruntime": env.version, "onnx": onnx.__version__,
        "dense_fp32_file_bytes": dense_bytes, "runs": args.runs, "threads": 1,
    }
    print(f"\n- {meta['date']}, {meta['machine']}, load {load_before[0]:.1f} -> {load_after[0]:.1f}, "
          f"onnxruntime {env.version}, {args.runs} interleaved rounds, 1 thread\n")
    print("| model | format | file bytes | smaller than dense fp32 | bit-exact vs decoded dense | decode ops left "
          "| batch-1 us (dense) | time / dense |")
    print("|---|---|---:|---:|---|---|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['format']} | {r['file_bytes']:,} | {r['vs_dense_fp32']}x | "
              f"{'yes' if r['bit_exact_vs_decoded'] else 'NO'} | {', '.join(r['decode_ops_left']) or 'none'} | "
              f"{r['batch1_us']} ({r['dense_batch1_us']}) | {r['ratio_vs_dense']:.3f} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    ok = all(r["bit_exact_vs_decoded"] and not r["decode_ops_left"] for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
