"""ResNet-20 on CIFAR-10 (JPEG copy): dense training, channel pruning (--structure channel),
latency side by side in the newest plain onnxruntime, top-1 of both.

Data: /work/shared/data/cifar10 is a JPEG re-encoding of CIFAR-10 (see its README), so every
figure is "CIFAR-10 (JPEG copy)". The images are decoded once (Pillow) into a cache outside
the project (``--cache``). Training uses random crops (4-pixel zero padding) and horizontal
flips; evaluation the plain test split (10,000 images, never used for any choice here).

    python bench/resnet20_cifar10.py --epochs 30 --admm-iters 6 --retrain-epochs 12 --target-macs 0.4 \\
        --latency-python /work/venvs/ortnew/bin/python

Writes bench/results/resnet20_cifar10.json (and the models under --work).
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DATA = Path("/work/shared/data/cifar10")


def load_cifar(cache: Path):
    """uint8 NCHW arrays from the JPEG npz files, decoded once into ``cache``."""
    if cache.exists():
        with np.load(cache) as z:
            return z["x_train"], z["y_train"], z["x_test"], z["y_test"]
    from PIL import Image

    out = []
    for split in ("train", "test"):
        with np.load(DATA / f"{split}.npz", allow_pickle=False) as z:
            jpeg, offsets, labels = z["jpeg"], z["offsets"], z["labels"]
        x = np.empty((len(labels), 3, 32, 32), np.uint8)
        for i in range(len(labels)):
            img = Image.open(io.BytesIO(jpeg[offsets[i]:offsets[i + 1]].tobytes())).convert("RGB")
            x[i] = np.asarray(img).transpose(2, 0, 1)
        out += [x, labels.astype(np.int64)]
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp.npz")
    np.savez(tmp, x_train=out[0], y_train=out[1], x_test=out[2], y_test=out[3])
    os.replace(tmp, cache)
    return tuple(out)


def augmenting_reader(x, y, batch_size, seed, epoch_images=0):
    """An ArrayReader whose training batches are randomly cropped (pad 4) and flipped.

    ``epoch_images`` N > 0: an epoch is N images drawn afresh (without replacement) from the whole
    training split at every pass, so short schedules still see all of it."""
    from admm_onnx.data import ArrayReader

    class Augment(ArrayReader):
        def rewind(self):
            super().rewind()
            if epoch_images:
                self._order = self._order[:epoch_images]

        def __len__(self):
            n = min(len(self.x), epoch_images or len(self.x))
            return n // self.batch_size

        def get_next(self):
            if epoch_images and self._pos + self.batch_size > min(len(self.x), epoch_images):
                return None
            feed = super().get_next()
            if feed is None:
                return None
            xb = feed["input"]
            n = len(xb)
            rng = np.random.default_rng([self.seed, self._pos])
            padded = np.pad(xb, ((0, 0), (0, 0), (4, 4), (4, 4)))
            dx, dy = rng.integers(0, 9, n), rng.integers(0, 9, n)
            out = np.empty_like(xb)
            flip = rng.random(n) < 0.5
            for i in range(n):
                crop = padded[i, :, dy[i]:dy[i] + 32, dx[i]:dx[i] + 32]
                out[i] = crop[:, :, ::-1] if flip[i] else crop
            feed["input"] = out
            return feed

    return Augment(x, y, batch_size, "input", shuffle=True, seed=seed, drop_last=True)


def machine():
    load = os.getloadavg()
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "loadavg_at_start": load,
            "python": platform.python_version()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=30, help="dense training epochs")
    p.add_argument("--admm-iters", type=int, default=6)
    p.add_argument("--retrain-epochs", type=int, default=12)
    p.add_argument("--target-macs", type=float, default=0.4)
    p.add_argument("--round-to", type=int, default=8)
    p.add_argument("--train-subset", type=int, default=0, help="use the first N shuffled training images (0: all)")
    p.add_argument("--epoch-images", type=int, default=0,
                   help="dense training: an epoch is this many images drawn afresh from the training split (0: all)")
    p.add_argument("--prune-epoch-images", type=int, default=0,
                   help="the same for the ADMM and retraining epochs (0: all)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--loss", default="auto", choices=["auto", "cross_entropy", "ce+distill"],
                   help="pruning objective; ce+distill adds distillation from the dense model (ADMM and retraining)")
    p.add_argument("--admm-update-steps", type=int, default=0,
                   help="channel ADMM: a Z/U update every N optimizer steps (0: once per iteration, the default)")
    p.add_argument("--rho", type=float, default=None, help="ADMM rho (default: auto, from the loss gradient)")
    p.add_argument("--allocation", choices=["sensitivity", "uniform"], default="sensitivity",
                   help="how --target-macs is split among the channel groups")
    p.add_argument("--sensitivity-samples", type=int, default=1000)
    p.add_argument("--monitor-images", type=int, default=2000,
                   help="test images for the in-run top-1 figures (the final ones use all 10,000)")
    p.add_argument("--test-images", type=int, default=0, help="evaluate on the first N test images only (0: all; smoke tests)")
    p.add_argument("--latency-rounds", type=int, default=15)
    p.add_argument("--tag", default="", help="name of this pruning run (pruned model, results file)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", type=Path, default=Path("/tmp/admm-onnx-cifar10/cifar10_jpeg_uint8.npz"))
    p.add_argument("--work", type=Path, default=Path("/tmp/admm-onnx-cifar10/run"))
    p.add_argument("--latency-python", default="/work/venvs/ortnew/bin/python",
                   help="interpreter with the newest plain onnxruntime")
    p.add_argument("--out", type=Path, default=None,
                   help="results JSON [default: bench/results/resnet20_cifar10[_TAG].json]")
    p.add_argument("--skip-train", action="store_true", help="reuse the dense model in --work")
    p.add_argument("--init", type=Path, default=None,
                   help="dense training starts from this model (e.g. to continue a dense run) instead of a fresh ResNet-20")
    p.add_argument("--dense-only", action="store_true", help="train and save the dense model, then stop")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)

    from admm_onnx.config import PruneConfig
    from admm_onnx.data import ArrayReader
    from admm_onnx.graph.bn_recalibrate import recalibrate_batchnorm
    from admm_onnx.io import load_model, save_model
    from admm_onnx.models import build
    from admm_onnx.pipeline import evaluate, prune, train
    from admm_onnx.structured import analyse
    from admm_onnx.structured.targets import ChannelTargets

    info = machine()
    t_start = time.time()
    x_tr, y_tr, x_te, y_te = load_cifar(args.cache)
    if args.train_subset:
        order = np.random.default_rng(args.seed).permutation(len(x_tr))[: args.train_subset]
        x_tr, y_tr = x_tr[order], y_tr[order]
    if args.test_images:  # the test split is sorted by class: a seeded random subset
        sub = np.sort(np.random.default_rng(1234).permutation(len(y_te))[: args.test_images])
        x_te, y_te = x_te[sub], y_te[sub]
    x_tr = x_tr.astype(np.float32) / 255.0
    x_te = x_te.astype(np.float32) / 255.0
    train_reader = augmenting_reader(x_tr, y_tr, args.batch_size, args.seed, args.epoch_images)
    eval_reader = ArrayReader(x_te, y_te, 500, "input")
    args.work.mkdir(parents=True, exist_ok=True)
    tag = f"_{args.tag}" if args.tag else ""
    dense, pruned = args.work / "resnet20_dense.onnx", args.work / f"resnet20_channels{tag}.onnx"
    out = args.out or HERE / "results" / f"resnet20_cifar10{tag}.json"
    config = PruneConfig(loss=args.loss, lr=args.lr, batch_size=args.batch_size, seed=args.seed, threads=args.threads,
                         workers=args.workers, rho=args.rho, admm_iters=args.admm_iters,
                         retrain_epochs=args.retrain_epochs, sensitivity_samples=args.sensitivity_samples)
    t0 = time.time()
    dense_info = args.work / "resnet20_dense.json"
    if not args.skip_train:
        previous = None
        if args.init:
            init = args.work / "resnet20_init.onnx"
            save_model(load_model(args.init), init)
            earlier = args.init.with_suffix(".json")
            previous = json.loads(earlier.read_text()) if earlier.exists() else {"model": str(args.init)}
        else:
            init = args.work / "resnet20_init.onnx"
            save_model(build("resnet20", input_shape=(3, 32, 32), num_classes=10, seed=args.seed), init)
        train(init, dense, train_reader, args.epochs, None, config, schedule="cosine")
        # ORT training normalises with batch statistics and does not write the running ones
        # back: re-estimate them on training batches before the dense model is evaluated.
        model = load_model(dense)
        recalibrate_batchnorm(model, iter(train_reader), "input")
        save_model(model, dense)
        t_dense = time.time() - t0
        top1 = evaluate(dense, eval_reader).accuracy
        dense_info.write_text(json.dumps(
            {"top1_dense": top1, "seconds": t_dense, "epochs": args.epochs, "epoch_images": args.epoch_images or len(x_tr),
             "lr": args.lr, "schedule": "cosine", "optimizer": config.optimizer, "batch_size": args.batch_size,
             "seed": args.seed, "machine": info, "loadavg_at_end": os.getloadavg(),
             "command": "python bench/resnet20_cifar10.py " + " ".join(argv if argv is not None else sys.argv[1:]),
             "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime(t_start)),
             "continued_from": previous}, indent=2) + "\n")
        print(f"dense top-1 {100 * top1:.2f}% after {args.epochs} epochs, {t_dense:.0f} s")
        if args.dense_only:
            return
    dense_run = json.loads(dense_info.read_text())
    prune_reader = augmenting_reader(x_tr, y_tr, args.batch_size, args.seed + 1, args.prune_epoch_images)
    # the test split is sorted by class: the in-run figures use a seeded random subset of it
    sub = np.sort(np.random.default_rng(4321).permutation(len(y_te))[: args.monitor_images])
    monitor = ArrayReader(x_te[sub], y_te[sub], 500, "input")
    t0 = time.time()
    targets = ChannelTargets(target_macs=args.target_macs, round_to=args.round_to, allocation=args.allocation,
                             update_steps=args.admm_update_steps)
    report = prune(dense, pruned, prune_reader, config, monitor, channels=targets)
    t_prune = time.time() - t0
    top1_dense = dense_run["top1_dense"]
    top1_pruned = evaluate(pruned, eval_reader).accuracy
    counts_dense = analyse(load_model(dense)).counts()
    counts_pruned = analyse(load_model(pruned)).counts()
    lat = json.loads(subprocess.run(
        [args.latency_python, str(HERE / "ort_latency.py"), str(dense), str(pruned), "--batches", "1", "32",
         "--threads", "1", "2", "--rounds", str(args.latency_rounds)], check=True, capture_output=True, text=True).stdout)
    rows = []
    for r in lat["results"]:
        d, s = r["ms"][str(dense)], r["ms"][str(pruned)]
        rows.append({"batch": r["batch"], "threads": r["threads"], "dense_ms": d, "pruned_ms": s, "speedup": d / s})
    result = {
        "benchmark": "ResNet-20, CIFAR-10 (JPEG copy), --structure channel",
        "command": "python bench/resnet20_cifar10.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime(t_start)),
        "machine": info, "loadavg_at_end": os.getloadavg(),
        "dense_training": dense_run,
        "schedule": {"admm_iters": args.admm_iters, "retrain_epochs": args.retrain_epochs,
                     "epoch_images": args.prune_epoch_images or int(len(x_tr)), "batch_size": args.batch_size,
                     "lr": args.lr, "loss": args.loss, "admm_update_steps": args.admm_update_steps, "rho": args.rho if args.rho is not None else "auto",
                     "target_macs": args.target_macs, "round_to": args.round_to, "allocation": args.allocation,
                     "sensitivity_samples": args.sensitivity_samples},
        "top1_dense": top1_dense, "top1_pruned": top1_pruned, "test_images": int(len(y_te)),
        "macs_dense": counts_dense["macs"], "macs_pruned": counts_pruned["macs"],
        "macs_fraction": counts_pruned["macs"] / counts_dense["macs"],
        "params_dense": counts_dense["params"], "params_pruned": counts_pruned["params"],
        "monitor_images": args.monitor_images, "monitor_subset": "seeded random subset of the test split (seed 4321)",
        "monitor_top1": {"before": report.accuracy_before, "after_admm": report.accuracy_after_admm,
                         "hard_pruned": report.accuracy_hard_pruned, "after_retrain": report.accuracy_after},
        "allocation": report.allocation,
        "groups": report.groups, "shrink_max_diff": report.max_shrink_diff,
        "latency_onnxruntime": lat["onnxruntime"], "latency": rows,
        "seconds": {"prune": t_prune, **{k: float(v) for k, v in report.phase_seconds.items()}},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=float) + "\n")
    print(f"CIFAR-10 (JPEG copy) top-1: dense {100 * top1_dense:.2f}%, channel-pruned {100 * top1_pruned:.2f}%")
    print(f"MACs {counts_dense['macs']:,} -> {counts_pruned['macs']:,}; params {counts_dense['params']:,} -> {counts_pruned['params']:,}")
    print(f"onnxruntime {lat['onnxruntime']}: " + "; ".join(
        f"batch {r['batch']} x{r['threads']} thr: {r['dense_ms']:.2f} -> {r['pruned_ms']:.2f} ms ({r['speedup']:.2f}x)" for r in rows))


if __name__ == "__main__":
    main()
