"""Do the engine's defaults converge without tuning? (issue 16)

One short run per model, all ADMM settings at their defaults unless given: dense training, then
``prune`` at one sparsity for every prunable weight, evaluated before ADMM, after ADMM, after
the hard step and after retraining. Prints one line per run (top-1s, hard-prune gap, why ADMM
stopped, final rho, samples seen, wall time, load average) and writes them as JSON.

Models: ``lenet5`` (admm_onnx.models, MNIST), ``resnet20`` (the CIFAR-10 reference model of
admm_onnx.models, on the JPEG copy of CIFAR-10 in /work/shared/data/cifar10), ``cnn`` (a small Conv-BN-ReLU CNN built here,
Fashion-MNIST), ``transformer`` (a one-block ViT-style transformer on 7x7 patches built here,
MNIST). Data: the first ``--train-images`` training images, the full 10,000-image test split.

The issue's run (LeNet-5, 10,000 images, 2 dense epochs, then ``prune --sparsity 0.9
--admm-iters 3 --epochs-per-iter 1 --retrain-epochs 1``)::

    python bench/admm_defaults.py --data /work/shared/data --models lenet5
    python bench/admm_defaults.py --data /work/shared/data --models lenet5 --admm-update-steps 0 --rho-stall 0 --rho-tau 2  # before (2026-12-04)
    python bench/admm_defaults.py --data /work/shared/data --models lenet5 --rho-mode growth --rho 1e-3 --admm-tol 0 --admm-update-steps 0  # the paper's
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lenet5_mnist import machine_info  # noqa: E402

from admm_onnx.config import PruneConfig  # noqa: E402
from admm_onnx.data import Dataset, load_idx_dir  # noqa: E402
from admm_onnx.models import build  # noqa: E402
from admm_onnx.pipeline import make_readers, prepare_model, prune, train  # noqa: E402


def _init(rng, shape, fan_in):
    return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)


def small_cnn(input_shape=(1, 28, 28), num_classes=10, seed=0) -> onnx.ModelProto:
    """Conv(16)-BN-ReLU-MaxPool, Conv(32)-BN-ReLU-MaxPool, Conv(64)-BN-ReLU, global average pool, Gemm."""
    rng = np.random.default_rng(seed)
    c_in = input_shape[0]
    inits, nodes, x = [], [], "input"
    for i, (c, pool) in enumerate([(16, True), (32, True), (64, False)]):
        w = f"conv{i}.weight"
        inits += [numpy_helper.from_array(_init(rng, (c, c_in, 3, 3), 9 * c_in), w)]
        for n, v in (("scale", np.ones(c)), ("bias", np.zeros(c)), ("mean", np.zeros(c)), ("var", np.ones(c))):
            inits.append(numpy_helper.from_array(v.astype(np.float32), f"bn{i}.{n}"))
        nodes += [
            helper.make_node("Conv", [x, w], [f"c{i}"], pads=[1, 1, 1, 1]),
            helper.make_node("BatchNormalization", [f"c{i}", f"bn{i}.scale", f"bn{i}.bias", f"bn{i}.mean", f"bn{i}.var"], [f"b{i}"]),
            helper.make_node("Relu", [f"b{i}"], [f"r{i}"]),
        ]
        x = f"r{i}"
        if pool:
            nodes.append(helper.make_node("MaxPool", [x], [f"p{i}"], kernel_shape=[2, 2], strides=[2, 2]))
            x = f"p{i}"
        c_in = c
    inits += [numpy_helper.from_array(_init(rng, (num_classes, c_in), c_in), "fc.weight"),
              numpy_helper.from_array(np.zeros(num_classes, np.float32), "fc.bias")]
    nodes += [helper.make_node("GlobalAveragePool", [x], ["gap"]), helper.make_node("Flatten", ["gap"], ["flat"]),
              helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["logits"], transB=1)]
    graph = helper.make_graph(nodes, "small_cnn", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *input_shape])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", num_classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def tiny_transformer(input_shape=(1, 28, 28), num_classes=10, seed=0, dim=64, heads=4, patch=7) -> onnx.ModelProto:
    """ViT-style: 7x7 patches -> MatMul embedding + positions, one pre-norm block (multi-head
    self-attention, MLP 2x), LayerNorm, mean over tokens, MatMul classifier."""
    rng = np.random.default_rng(seed)
    c, h, w = input_shape
    tokens, pdim, hd = (h // patch) * (w // patch), c * patch * patch, dim // heads
    I = []  # noqa: E741

    def init(name, value):
        I.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    N = []

    def node(op, inputs, out, **kw):
        N.append(helper.make_node(op, inputs, [out], **kw))
        return out

    # (N, c, h, w) -> (N, tokens, pdim)
    x = node("Reshape", ["input", init("s1", np.array([-1, c, h // patch, patch, w // patch, patch], np.int64))], "x1")
    x = node("Transpose", [x], "x2", perm=[0, 2, 4, 1, 3, 5])
    x = node("Reshape", [x, init("s2", np.array([-1, tokens, pdim], np.int64))], "x3")
    x = node("MatMul", [x, init("embed.weight", _init(rng, (pdim, dim), pdim))], "e")
    x = node("Add", [x, init("pos", (0.02 * rng.standard_normal((tokens, dim))).astype(np.float32))], "e2")
    ones, zeros = np.ones(dim, np.float32), np.zeros(dim, np.float32)

    def ln(inp, name):
        return node("LayerNormalization", [inp, init(f"{name}.scale", ones), init(f"{name}.bias", zeros)], f"{name}.out", axis=-1)

    def heads_of(t, name):  # (N, T, dim) -> (N, heads, T, hd)
        r = node("Reshape", [t, init(f"{name}.shape", np.array([-1, tokens, heads, hd], np.int64))], f"{name}.r")
        return node("Transpose", [r], f"{name}.t", perm=[0, 2, 1, 3])

    y = ln(x, "ln1")
    q = heads_of(node("MatMul", [y, init("q.weight", _init(rng, (dim, dim), dim))], "q"), "qh")
    k = heads_of(node("MatMul", [y, init("k.weight", _init(rng, (dim, dim), dim))], "k"), "kh")
    v = heads_of(node("MatMul", [y, init("v.weight", _init(rng, (dim, dim), dim))], "v"), "vh")
    kt = node("Transpose", [k], "kt", perm=[0, 1, 3, 2])
    att = node("Mul", [node("MatMul", [q, kt], "qk"), init("att.scale", np.array(1 / np.sqrt(hd), np.float32))], "qks")
    att = node("Softmax", [att], "att", axis=-1)
    o = node("Transpose", [node("MatMul", [att, v], "av")], "avt", perm=[0, 2, 1, 3])
    o = node("Reshape", [o, init("o.shape", np.array([-1, tokens, dim], np.int64))], "avr")
    x = node("Add", [x, node("MatMul", [o, init("proj.weight", _init(rng, (dim, dim), dim))], "proj")], "res1")
    y = ln(x, "ln2")
    y = node("Relu", [node("Add", [node("MatMul", [y, init("mlp1.weight", _init(rng, (dim, 2 * dim), dim))], "m1"),
                                   init("mlp1.bias", np.zeros(2 * dim, np.float32))], "m1b")], "m1r")
    x = node("Add", [x, node("MatMul", [y, init("mlp2.weight", _init(rng, (2 * dim, dim), 2 * dim))], "m2")], "res2")
    x = ln(x, "ln3")
    x = node("ReduceMean", [x], "pooled", axes=[1], keepdims=0)
    node("Add", [node("MatMul", [x, init("head.weight", _init(rng, (dim, num_classes), dim))], "hm"),
                 init("head.bias", np.zeros(num_classes, np.float32))], "logits")
    graph = helper.make_graph(N, "tiny_transformer", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", c, h, w])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", num_classes])], I)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


MODELS = {
    "lenet5": (lambda seed: build("lenet5", seed=seed), "mnist", 2e-3),
    "resnet20": (lambda seed: build("resnet20", input_shape=(3, 32, 32), num_classes=10, seed=seed), "cifar10", 2e-3),
    "cnn": (lambda seed: small_cnn(seed=seed), "fashion-mnist", 2e-3),
    "transformer": (lambda seed: tiny_transformer(seed=seed), "mnist", 1e-3),
}


def _recalibrate(path: Path, reader, eval_reader) -> float:
    """BN running statistics of the model at ``path`` re-estimated on 50 training batches
    (admm_onnx.graph.bn_recalibrate), written back; returns its top-1 on ``eval_reader``."""
    from admm_onnx.graph.bn_recalibrate import recalibrate_batchnorm
    from admm_onnx.pipeline import evaluate

    model = onnx.load(str(path))
    reader.rewind()

    def batches():
        while True:
            feed = reader.get_next()
            if feed is None:
                return
            yield feed

    recalibrate_batchnorm(model, batches(), "input")
    reader.rewind()
    onnx.save(model, str(path))
    return evaluate(str(path), eval_reader).accuracy


def run(name, args, out_dir: Path) -> dict:
    builder, data_name, dense_lr = MODELS[name]
    if data_name == "cifar10":  # a JPEG copy of CIFAR-10 (see its README): decoded once into a cache
        from resnet20_cifar10 import load_cifar

        x_tr, y_tr, x_te, y_te = load_cifar(Path(args.cifar_cache))
        full = Dataset(x_tr.astype(np.float32) / 255.0, y_tr, x_te.astype(np.float32) / 255.0, y_te, name="cifar10")
        data_name = "cifar10 (JPEG copy)"
    else:
        full = load_idx_dir(str(Path(args.data) / data_name))
    n = args.train_images
    data = Dataset(full.x_train[:n], full.y_train[:n], full.x_test, full.y_test, name=data_name)
    model = builder(args.seed)
    dense_path, pruned_path = out_dir / f"{name}_dense.onnx", out_dir / f"{name}_pruned.onnx"
    base = PruneConfig(lr=dense_lr, batch_size=args.batch_size, seed=args.seed, workers=args.workers)
    prepared = prepare_model(model)
    tr, ev, _ = make_readers(prepared, data, base.batch_size, args.seed)
    t0 = time.perf_counter()
    dense = train(prepared, dense_path, tr, args.dense_epochs, ev, base)
    has_bn = any(n.op_type == "BatchNormalization" for n in model.graph.node)
    if has_bn:  # ORT training does not write BN running statistics back: re-estimate them
        dense.accuracy_after = _recalibrate(dense_path, tr, ev)
    t_dense = time.perf_counter() - t0
    overrides = {k: getattr(args, k) for k in ("rho", "rho_mode", "rho_growth", "admm_tol", "rho_ratio",
                                                 "admm_update_steps", "rho_stall", "rho_tau")}
    config = base.replace(admm_iters=args.admm_iters, epochs_per_iter=args.epochs_per_iter,
                          retrain_epochs=args.retrain_epochs, lr=args.lr, **overrides)
    config = config.with_sparsity(args.sparsity, args.bits)
    prepared = prepare_model(str(dense_path))
    tr, ev, _ = make_readers(prepared, data, config.batch_size, args.seed)
    t0 = time.perf_counter()
    rep = prune(prepared, pruned_path, tr, config, ev)
    t_prune = time.perf_counter() - t0
    final_bn = _recalibrate(pruned_path, tr, ev) if has_bn else None
    last = rep.residuals[-1] if rep.residuals else {}
    return {
        "model": name, "data": f"{data_name} ({n} train images, {len(full.y_test)} test)", "sparsity": args.sparsity,
        "bits": args.bits, "dense_top1": dense.accuracy_after, "top1_before": rep.accuracy_before,
        "top1_after_admm": rep.accuracy_after_admm, "top1_hard": rep.accuracy_hard_pruned, "top1_final": rep.accuracy_after,
        "hard_prune_gap": rep.hard_prune_gap, "batchnorm": has_bn, "top1_final_bn_reestimated": final_bn, "admm_stop": rep.admm_stop, "iterations": len(rep.residuals),
        "max_primal": max((r["primal"] for r in last.values()), default=None), "rho": rep.rho,
        "samples_seen": dense.samples_seen + rep.samples_seen, "seconds_dense": t_dense, "seconds_prune": t_prune,
        "loadavg_after": os.getloadavg(), "residuals": rep.residuals, "config": {k: v for k, v in config.to_dict().items() if k != "rules"},
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="directory holding mnist/ and fashion-mnist/ (IDX .gz files)")
    ap.add_argument("--models", default="lenet5,resnet20,cnn,transformer")
    ap.add_argument("--out", default="/tmp/admm_defaults")
    ap.add_argument("--cifar-cache", default="/tmp/admm-onnx-cifar10/cifar10_jpeg_uint8.npz",
                    help="decoded CIFAR-10 (JPEG copy) cache of bench/resnet20_cifar10.py (made if absent)")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-images", type=int, default=10_000)
    ap.add_argument("--dense-epochs", type=int, default=2)
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--bits", type=int, default=None)
    ap.add_argument("--admm-iters", type=int, default=3)
    ap.add_argument("--epochs-per-iter", type=int, default=1)
    ap.add_argument("--retrain-epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--workers", type=int, default=1)
    for k, t in (("rho", float), ("rho_mode", str), ("rho_growth", float), ("admm_tol", float), ("rho_ratio", float),
                 ("admm_update_steps", int), ("rho_stall", float), ("rho_tau", float)):
        ap.add_argument("--" + k.replace("_", "-"), type=t, default=None, help="default: PruneConfig's")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    machine = machine_info()
    print(f"{machine['date']}; nproc {machine['nproc']}, {machine['cpu']}; load average at start "
          + ", ".join(f"{x:.2f}" for x in machine["loadavg_at_start"]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    pct = lambda a: "n/a" if a is None else f"{100 * a:.2f}%"  # noqa: E731
    for name in args.models.split(","):
        r = run(name, args, out)
        results.append(r)
        bn = f" (BN statistics re-estimated: dense {pct(r['dense_top1'])}, final {pct(r['top1_final_bn_reestimated'])})" if r["batchnorm"] else ""
        print(f"{name}{bn}: top-1 dense {pct(r['top1_before'])}, after ADMM {pct(r['top1_after_admm'])}, hard {pct(r['top1_hard'])}, "
              f"final {pct(r['top1_final'])}; gap {100 * (r['hard_prune_gap'] or 0):.2f} pts; {r['admm_stop']}; max primal "
              f"{r['max_primal']:.4f}; {r['samples_seen']:,} samples; {r['seconds_dense']:.0f} + {r['seconds_prune']:.0f} s; "
              f"load {', '.join(f'{x:.1f}' for x in r['loadavg_after'])}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "argv": sys.argv, "results": results}, indent=1, default=float))
    return results


if __name__ == "__main__":
    main()
