"""LeNet-5 / MNIST: bytes of every measured ``packed`` file against its top-1, next to the target.

Reads the JSON files ``bench/packed_size.py --data mnist:... --json FILE`` wrote into
bench/results (``lenet5_packed_*.json``: layout 2, ``lenet5_packed3_*.json``: the same models
packed in layout 3; the file's bytes and its top-1 in plain onnxruntime on the 10,000 test
images) and draws one point per file, by layout, exact values and float16 biases
(``--values fp16``) apart, with the issue's target drawn dotted: at most 5,750 bytes (300x smaller
than the dense fp32 file) at >= 99.2% top-1. A file measured twice (before and after dead-channel
removal reached a fixed point, ``*_fixedpoint_*``) counts once, with the later measurement.

    python bench/lenet5_frontier.py [--results bench/results] [--out bench/results/lenet5_frontier.svg]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Tuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from admm_onnx.plot import _chart, write_charts  # noqa: E402

TARGET_BYTES = 5750
TARGET_TOP1 = 99.2


SERIES = ("layout 3, exact values", "layout 3, float16 biases", "layout 2, exact values", "layout 2, float16 biases")


def points(results: Path) -> Dict[str, List[Tuple[int, float, str]]]:
    """{series name (:data:`SERIES`): [(bytes, top-1 %, file name)]}, one per packed file."""
    files = sorted(results.glob("lenet5_packed_*.json")) + sorted(results.glob("lenet5_packed3_*.json"))
    names = {f.name for f in files}
    out: Dict[str, List[Tuple[int, float, str]]] = {k: [] for k in SERIES}
    for f in files:
        later = f.name.replace("_2026", "_fixedpoint_2026", 1)
        if "_fixedpoint_" not in f.name and later != f.name and later in names:
            continue  # re-measured after dead-channel removal reached a fixed point
        d = json.loads(f.read_text())
        top1 = (d.get("deployment runtime") or {}).get("top1")
        if not d.get("bytes") or top1 is None:
            continue
        layout = "layout 3" if f.name.startswith("lenet5_packed3_") else "layout 2"
        key = f"{layout}, " + ("float16 biases" if "fp16" in f.name else "exact values")
        out[key].append((int(d["bytes"]), 100 * float(top1), f.name))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "lenet5_frontier.svg"))
    args = ap.parse_args(argv)
    pts = points(Path(args.results))
    if not any(pts.values()):
        raise SystemExit(f"no lenet5_packed_*.json with a measured top-1 in {args.results}")
    xs = [b for v in pts.values() for b, _, _ in v] + [TARGET_BYTES]
    ys = [t for v in pts.values() for _, t, _ in v] + [TARGET_TOP1]
    x_lo, x_hi, y_lo, y_hi = min(xs) - 100, max(xs) + 100, min(ys) - 0.05, max(ys) + 0.05
    steps = 40  # the target's two edges, drawn as dotted lines of points
    edge_x = [x_lo + (TARGET_BYTES - x_lo) * i / steps for i in range(steps + 1)] + [TARGET_BYTES] * (steps + 1)
    edge_y = [TARGET_TOP1] * (steps + 1) + [TARGET_TOP1 + (y_hi - TARGET_TOP1) * i / steps for i in range(steps + 1)]
    series = [{"name": f"{k} ({len(v)})", "x": [b for b, _, _ in v], "y": [t for _, t, _ in v]}
              for k, v in pts.items() if v]
    series.append({"name": "target: <= 5,750 B, >= 99.2%", "x": edge_x, "y": edge_y, "color": "#bbbbbb"})
    chart = _chart("LeNet-5 packed files: bytes vs top-1 (onnxruntime 1.32, MNIST test)", "points", series,
                   xlabel="file bytes (dense fp32: 1,725,213)", ylabel="top-1 %")
    path = write_charts([chart], args.out, title="LeNet-5 packed files")
    for k, v in pts.items():
        for b, t, name in sorted(v):
            print(f"{k:25s} {b:6,d} B  {1725213 / b:6.1f}x  {t:.2f}%  {name}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
