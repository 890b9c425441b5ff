"""Where the bytes of a ``packed`` LeNet-5 file go (positions, codes, scales, biases, decode function, graph).

Either a model file (``--model``): a pruned (and quantized) model written by ``admm-onnx prune``
or ``bench/lenet5_mnist.py`` (its dead channels are removed first, exactly, as
``bench/deploy_files.py`` does; ``--keep-dead`` skips that), or a file already exported as
``packed`` (measured as it is; ``--repack``: densified and exported again in the current layout). Or, without ``--model``, a proxy built in code: LeNet-5 (admm_onnx.models) with random
masks at the densities of the progressive x150 run (conv1 40%, conv2 6%, fc1 0.27%, fc2 3%),
every kept entry on a random nonzero 3-4-bit level (conv1 4, conv2 3, fc1 3, fc2 4 bits; scales per
channel for the convs, per tensor for the fcs) and seeded normal biases (0.1 std). Random
positions are a pessimistic proxy for trained ones (no structure to exploit).

Prints the byte breakdown (admm_onnx.formats.packed.size_breakdown), the ratio to the dense fp32
LeNet-5 file (1,725,213 bytes as the repository writes it; ``--dense-bytes`` to change) and,
with ``--json``, writes it. ``--out`` keeps the packed file.

With ``--data mnist:DIR`` the packed file also runs in plain onnxruntime (``.venv-deploy``,
tests/deploy_env.py) on the test split: top-1, outputs bit-exact to its decoded dense model,
decode ops left after load, batch-1 time against the decoded dense model (interleaved).

Usage: python bench/packed_size.py [--model PRUNED.onnx [--repack]] [--keep-dead] [--live] [--values exact|fp16]
       [--names short|keep] [--data mnist:DIR [--runs 300]] [--json OUT.json] [--out FILE]
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from admm_onnx import formats
from admm_onnx.formats import packed as packed_format
from admm_onnx.models import build
from admm_onnx.quantization import QuantSpec, dequantize, mark_model, max_level

ROOT = Path(__file__).resolve().parents[1]
DENSE_FP32_BYTES = 1_725_213
DENSITY = {"conv1.weight": 0.40, "conv2.weight": 0.06, "fc1.weight": 0.0027, "fc2.weight": 0.03}
LEVELS = {"conv1.weight": (4, 0), "conv2.weight": (3, 0), "fc1.weight": (3, None), "fc2.weight": (4, None)}


def _mask(rng, shape, density, rows=None) -> np.ndarray:
    """A random mask of ``round(density * size)`` entries, only in ``rows`` (axis 0) if given."""
    size = int(np.prod(shape))
    allowed = np.arange(size) if rows is None else (rows[:, None] * (size // shape[0]) + np.arange(size // shape[0])).ravel()
    keep = np.zeros(size, bool)
    keep[rng.choice(allowed, min(round(density * size), allowed.size), replace=False)] = True
    return keep.reshape(shape)


def proxy_lenet(seed: int = 0, live: bool = False) -> onnx.ModelProto:
    """LeNet-5 with random masks at the x150 densities on 3-4-bit levels (specs recorded).
    With ``live``, fc1's nonzeros sit only in the units fc2 reads (as training tends to leave
    them): none is removed as dead, so all ~2,930 nonzeros are packed."""
    rng = np.random.default_rng(seed)
    model = build("lenet5")
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    masks = {"fc2.weight": _mask(rng, shapes["fc2.weight"], DENSITY["fc2.weight"])}
    read = np.flatnonzero(masks["fc2.weight"].any(axis=0)) if live else None
    masks["fc1.weight"] = _mask(rng, shapes["fc1.weight"], DENSITY["fc1.weight"], read)
    for name in ("conv1.weight", "conv2.weight"):
        masks[name] = _mask(rng, shapes[name], DENSITY[name])
    specs = {}
    for t in model.graph.initializer:
        a = numpy_helper.to_array(t)
        if t.name in DENSITY:
            keep = masks[t.name]
            bits, axis = LEVELS[t.name]
            L = max_level(bits)
            nonzero_levels = np.concatenate([np.arange(-L, 0), np.arange(1, L + 1)])
            q = np.where(keep, rng.choice(nonzero_levels, a.shape), 0)
            scale = (0.01 + 0.1 * rng.random(1 if axis is None else a.shape[axis])).astype(np.float32)
            a = dequantize(q, scale, axis)
            specs[t.name] = QuantSpec(bits, tuple(float(s) for s in scale), axis)
        else:
            a = (0.1 * rng.standard_normal(a.shape)).astype(np.float32)
        t.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(a, dtype=np.float32), t.name))
    mark_model(model, specs)
    return model


def packed_file(model: onnx.ModelProto, keep_dead: bool, options: dict, repack: bool = False):
    """(packed model, facts): ``model`` itself when already packed (with ``repack``: densified
    and exported again in the current layout), else exported."""
    facts = {}
    kind = formats.detect(model)
    if kind is packed_format.PACKED:
        if not repack:
            return model, {"source": "already packed"}
        facts["repacked from bytes"] = model.ByteSize()
    if kind is not None:
        model = formats.densify(model)
    if not keep_dead:
        from admm_onnx.structured.dead import remove_dead_channels

        facts["nonzero weights before dead-channel removal"] = sum(
            r.nonzero for r in formats.inspect_model(model) if r.nonzero < r.count)

        model, removed = remove_dead_channels(model)
        facts["dead channels removed"] = removed
    out, _ = formats.export(model, "packed", **options)
    return out, facts


def run_in_deploy_env(model: onnx.ModelProto, data: str, runs: int) -> dict:
    """Top-1, bit-exactness against the decoded dense model, leftover decode ops and the batch-1
    time ratio of ``model`` in plain onnxruntime (tests/deploy_env.py)."""
    import tempfile

    sys.path.insert(0, str(ROOT / "tests"))
    from deploy_env import get_env

    from admm_onnx.data import load_idx_dir

    kind, _, path = data.partition(":")
    if kind != "mnist" or not path:
        raise SystemExit("--data: mnist:DIR")
    d = load_idx_dir(path)
    x, y = d.x_test.astype(np.float32), np.asarray(d.y_test)
    name = model.graph.input[0].name
    decoded = formats.densify(model)
    env = get_env()
    with tempfile.TemporaryDirectory(prefix="packed_size.") as tmp:
        res = env.run({"packed": model, "decoded": decoded}, {name: x}, optimized=True, workdir=tmp)
        ops = lambda p: {n.op_type for n in onnx.load(str(p)).graph.node}  # noqa: E731
        left = sorted(ops(res.optimized["packed"]) - ops(res.optimized["decoded"]))
    timing = env.run({"packed": model, "decoded": decoded}, {name: x[:1]}, runs=runs, warmup=30)
    logits = res.outputs["packed"][0]
    return {"onnxruntime": res.onnxruntime, "images": int(len(y)),
            "top1": float((logits.reshape(len(y), -1).argmax(1) == y).mean()),
            "bit_exact": all(np.array_equal(a, b) for a, b in zip(res.outputs["packed"], res.outputs["decoded"])),
            "decode_ops_left": left, "batch1_ratio": timing.ratio("packed", "decoded"),
            "batch1_us": timing.median("packed") * 1e6, "load": os.getloadavg()[0]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="pruned model or packed file (default: the proxy LeNet-5)")
    parser.add_argument("--keep-dead", action="store_true", help="do not remove dead channels before packing")
    parser.add_argument("--repack", action="store_true",
                        help="a packed --model (any version) is densified and exported again in the current layout")
    parser.add_argument("--seed", type=int, default=0, help="seed of the proxy model")
    parser.add_argument("--live", action="store_true",
                        help="proxy: fc1's nonzeros only in units fc2 reads (none dead: all ~2,930 packed)")
    parser.add_argument("--dense-bytes", type=int, default=DENSE_FP32_BYTES, help="dense fp32 file size to compare with")
    parser.add_argument("--values", choices=("exact", "fp16"), default="exact",
                        help="packed values option: fp16 stores the float32 biases left dense as "
                             "float16 (lossy)")
    parser.add_argument("--names", choices=("short", "keep"), default="short", help="packed names option")
    parser.add_argument("--data", metavar="mnist:DIR",
                        help="also run the packed file and its decoded dense model in plain onnxruntime "
                             "(.venv-deploy, tests/deploy_env.py) on the test split: top-1, bit-exactness, "
                             "batch-1 time / decoded")
    parser.add_argument("--runs", type=int, default=300, help="with --data: interleaved batch-1 rounds")
    parser.add_argument("--json", type=Path, help="write the breakdown here")
    parser.add_argument("--out", type=Path, help="keep the packed file here")
    args = parser.parse_args(argv)

    if args.model is not None:
        try:
            model = onnx.load(str(args.model))
        except Exception as exc:  # noqa: BLE001 - any unreadable file: one line
            print(f"error: cannot read {args.model}: {exc}", file=sys.stderr)
            return 2
        source = str(args.model)
    else:
        model = proxy_lenet(args.seed, args.live)
        source = (f"proxy LeNet-5, random masks at x150 densities{' (fc1 in live units)' if args.live else ''}, "
                  f"seed {args.seed}")
    options = {k: v for k, v in (("values", args.values), ("names", args.names)) if v != parser.get_default(k)}
    out, facts = packed_file(model, args.keep_dead, options, args.repack)
    data = out.SerializeToString()
    parts = packed_format.size_breakdown(out)
    rows = formats.inspect_model(out)
    nonzero = sum(r.nonzero for r in rows if r.storage.startswith("packed"))
    result = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"nproc {os.cpu_count()}, {platform.platform()}",
        "command": "python bench/packed_size.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "source": source, **facts,
        "bytes": len(data), "dense fp32 bytes": args.dense_bytes, "smaller than dense": args.dense_bytes / len(data),
        "packed nonzeros": nonzero, "breakdown": parts,
        "weights": [{"name": r.name, "shape": list(r.shape), "nonzero": r.nonzero, "storage": r.storage,
                     "bits": r.bits, "stored bytes": r.stored_bytes} for r in rows],
    }
    if args.data:
        result["deployment runtime"] = run_in_deploy_env(out, args.data, args.runs)
    print(f"# packed file of {source}\n")
    print(f"{len(data):,} bytes, {result['smaller than dense']:.1f}x smaller than dense fp32 "
          f"({args.dense_bytes:,}); {nonzero:,} nonzero packed weights\n")
    for k, v in facts.items():
        print(f"- {k}: {v}")
    if facts:
        print()
    print("| part | bytes |\n| --- | ---: |")
    for k, v in parts.items():
        print(f"| {k} | {v:,} |")
    print("\n| weight | shape | nonzero | storage | stored bytes |\n| --- | --- | ---: | --- | ---: |")
    for w in result["weights"]:
        print(f"| {w['name']} | {'x'.join(map(str, w['shape']))} | {w['nonzero']:,} | {w['storage']} | {w['stored bytes']:,} |")
    dep = result.get("deployment runtime")
    if dep:
        print(f"\nonnxruntime {dep['onnxruntime']} on {dep['images']:,} test images: top-1 {100 * dep['top1']:.2f}%, "
              f"outputs bit-exact to the decoded dense model: {dep['bit_exact']}, decode ops left after load: "
              f"{dep['decode_ops_left'] or 'none'}, batch-1 time / decoded dense {dep['batch1_ratio']:.3f} "
              f"(load {dep['load']:.1f})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    if args.out:
        args.out.write_bytes(data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
