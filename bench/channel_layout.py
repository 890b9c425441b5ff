"""Why kept channel counts are rounded to multiples of 8: latency of ResNet-20 (random weights)
shrunk to odd counts vs multiples of 8 vs 16, side by side in the newest plain onnxruntime.

    python bench/channel_layout.py [--latency-python /work/venvs/ortnew/bin/python]

Writes bench/results/channel_layout.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

LAYOUTS = {  # kept channels per stage width (16, 32, 64)
    "dense 16/32/64": {16: 16, 32: 32, 64: 64},
    "odd 11/21/41": {16: 11, 32: 21, 64: 41},
    "x8 8/16/40": {16: 8, 32: 16, 64: 40},
    "x16 16/16/32": {16: 16, 32: 16, 64: 32},
    # How far must channels go for 2x at batch 1 (issue 13)? Added 2026-12-05.
    "x8 8/16/32": {16: 8, 32: 16, 64: 32},
    "x8 8/8/24": {16: 8, 32: 8, 64: 24},
    "x8 8/8/16": {16: 8, 32: 8, 64: 16},
    # The floor at 8-channel granularity: what no channel budget can beat (added 2026-12-05).
    "x8 8/8/8": {16: 8, 32: 8, 64: 8},
    # Multiples of 16 (the NCHWc block on AVX-512) at two threads (added 2026-12-05).
    "x16 16/16/16": {16: 16, 32: 16, 64: 16},
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--latency-python", default="/work/venvs/ortnew/bin/python")
    p.add_argument("--out", type=Path, default=HERE / "results" / "channel_layout.json")
    args = p.parse_args(argv)
    import onnx

    from admm_onnx.models import build
    from admm_onnx.structured import analyse, shrink

    model = build("resnet20", input_shape=(3, 32, 32))
    a = analyse(model)
    with tempfile.TemporaryDirectory(prefix="admm-layout-") as tmpdir:
        tmp = Path(tmpdir)
        paths, macs = {}, {}
        for name, sizes in LAYOUTS.items():
            keep = {g.id: range(sizes[g.size]) for g in a.prunable}
            path = tmp / (name.replace(" ", "_").replace("/", "-") + ".onnx")
            onnx.save(shrink(model, a, keep), str(path))
            paths[name], macs[name] = path, a.counts(keep)["macs"]
        out = json.loads(subprocess.run([args.latency_python, str(HERE / "ort_latency.py"), *map(str, paths.values()),
                                         "--batches", "1", "32", "--threads", "1", "2"],
                                        check=True, capture_output=True, text=True).stdout)
    rows = []
    for r in out["results"]:
        dense = r["ms"][str(paths["dense 16/32/64"])]
        for name, path in paths.items():
            rows.append({"layout": name, "batch": r["batch"], "threads": r["threads"], "ms": r["ms"][str(path)],
                         "speedup_vs_dense": dense / r["ms"][str(path)], "macs_fraction": macs[name] / macs["dense 16/32/64"]})
    result = {"date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "loadavg": os.getloadavg(),
              "onnxruntime": out["onnxruntime"], "command": "python bench/channel_layout.py", "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for r in rows:
        print(f"{r['layout']:<14} batch {r['batch']:>2} x{r['threads']} thr: {r['ms']:7.2f} ms  "
              f"{r['speedup_vs_dense']:.2f}x  (MACs {r['macs_fraction']:.2f})")


if __name__ == "__main__":
    main()
