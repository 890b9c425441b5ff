"""Training throughput of LeNet-5: plain step vs ADMM step in ORT, and PyTorch eager for reference.

Measures samples/s of
  (a) a plain dense training step: admm_onnx Trainer (the library's session options: spinning
      off, denormals flushed; the library's training graph, with its exact speed rewrites),
      base loss (softmax cross-entropy), AdamW;
  (b) our ADMM training step: the same with AdmmPenalty on the 4 weights (targets and rho set
      to nonzero values, as during an ADMM iteration); also with 1 ORT thread, and on the
      graph as written (speed rewrites off, prepare_model(speedups=False));
  (b') the same ADMM step split over --workers processes with 1 ORT thread each
      (Trainer(workers=...), admm_onnx/parallel.py);
  (c) optionally the same LeNet-5 ADMM step (and a plain step) in PyTorch eager, 2 threads,
      run as a subprocess with another python (a venv holding torch; the main env is torch-free).
All on MNIST-size inputs (1x28x28, random data unless --mnist DIR is given), batch 64.

The measurements are interleaved: for each of --rounds rounds, every variant runs --steps steps
in turn (the torch subprocess stays alive and is driven over a pipe), so machine noise hits all
variants alike. Reported: median over rounds (and min/max), plus ratios of the medians.

Usage: python bench/throughput.py [--batch 64] [--rounds 7] [--steps 200] [--threads 2]
                                  [--torch-python /tmp/torchbench/bin/python | --no-torch]
                                  [--json OUT.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from lenet5_mnist import machine_info  # noqa: E402  (one machine description for every bench)
DEFAULT_TORCH_PYTHON = "/tmp/torchbench/bin/python"
WEIGHTS = ("conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight")
KEEP = {"conv1.weight": 0.20, "conv2.weight": 0.08, "fc1.weight": 0.009, "fc2.weight": 0.07}


# -- ORT side ------------------------------------------------------------------------------------
def make_trainers(work: Path, batch: int, seed: int, speedups: bool = True, threads: int = 0, workers: int = 1):
    from admm_onnx.admm import AdmmState
    from admm_onnx.config import PruneConfig, Rule
    from admm_onnx.graph.penalty import AdmmPenalty
    from admm_onnx.losses import ClassifierLoss
    from admm_onnx.models import build
    from admm_onnx.pipeline import prepare_model
    from admm_onnx.training import Trainer, build_artifacts

    model = build("lenet5", seed=seed)
    prepared = prepare_model(model, speedups=speedups)
    trainable = prepared.info.trainable
    build_artifacts(prepared.training, work / "plain", trainable, ClassifierLoss(), prepared.output_name)
    plain = Trainer(work / "plain", lr=1e-3, num_classes=10, threads=threads)
    penalty = AdmmPenalty(ClassifierLoss(), list(WEIGHTS))
    build_artifacts(prepared.training, work / "admm", trainable, penalty, prepared.output_name, penalty.frozen_params)
    admm = Trainer(work / "admm", lr=1e-3, num_classes=10, threads=threads, workers=workers)
    # Put the ADMM graph in an ADMM-iteration state: T = Proj(W), rho > 0.
    config = PruneConfig(rules=tuple(Rule(sparsity=1 - k, names=(n,)) for n, k in KEEP.items()), rho=1.5e-3)
    state = AdmmState(config.plan(prepared.info), rho_growth=1.0)
    state.initialize(state.read_weights(admm))
    state.write(admm)
    return plain, admm


def spin_module(directory: Path, threads: int = 0):
    """(module, optimizer) over the same artifacts with ORT's intra-op spinning on (ORT's default;
    the library's Trainer turns it off, admm_onnx.training.session_options), denormals flushed."""
    import onnxruntime as ort

    from admm_onnx._ort import api

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "1")
    so.add_session_config_entry("session.set_denormal_as_zero", "1")
    state = api.CheckpointState.load_checkpoint(str(directory / "checkpoint"))
    module = api.Module(str(directory / "training_model.onnx"), state, str(directory / "eval_model.onnx"), session_options=so)
    optimizer = api.Optimizer(str(directory / "optimizer_model.onnx"), module)
    optimizer.set_learning_rate(1e-3)
    return module, optimizer, state


class TrainerRunner:
    """Trainer.train_step (what train_epoch runs per batch: forward+backward, optimizer step,
    with workers the split and the gradient exchange), no reader."""

    def __init__(self, trainer, xs, ys):
        self.trainer, self.feeds = trainer, [{"input": x, "admm_labels": y} for x, y in zip(xs, ys)]
        self.i = 0

    def run(self, steps: int) -> float:
        t = self.trainer
        t.begin_training()
        t0 = time.perf_counter()
        for _ in range(steps):
            t.train_step(self.feeds[self.i % len(self.feeds)])
            self.i += 1
        return time.perf_counter() - t0


class OrtRunner:
    """The step of Trainer.train_epoch (forward+backward, optimizer step, grad reset), no reader."""

    def __init__(self, module, optimizer, xs, ys):
        self.module, self.optimizer, self.xs, self.ys = module, optimizer, xs, ys
        self.i = 0

    def run(self, steps: int) -> float:
        m, opt = self.module, self.optimizer
        m.train()
        n = len(self.xs)
        t0 = time.perf_counter()
        for _ in range(steps):
            j = self.i % n
            self.i += 1
            loss, logits = m(self.xs[j], self.ys[j])
            opt.step()
            m.lazy_reset_grad()
        return time.perf_counter() - t0


# -- torch side (runs in the subprocess) -------------------------------------------------------------
TORCH_WORKER = r'''
import json, sys, time
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

threads, batch, seed, pool_relu = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
torch.manual_seed(seed)

class LeNet5(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.fc1 = nn.Linear(800, 500)
        self.fc2 = nn.Linear(500, 10)
    def forward(self, x):
        if self.pool_relu:
            x = F.relu(F.max_pool2d(self.conv1(x), 2))
            x = F.relu(F.max_pool2d(self.conv2(x), 2))
        else:
            x = F.max_pool2d(F.relu(self.conv1(x)), 2)
            x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc2(x)

KEEP = {"conv1": 0.20, "conv2": 0.08, "fc1": 0.009, "fc2": 0.07}

def make(admm, pool_relu=False):
    model = LeNet5()
    model.pool_relu = pool_relu
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)  # ORT's AdamW defaults: wd 0.01
    targets = {}
    if admm:
        with torch.no_grad():
            for name, k in KEEP.items():
                w = getattr(model, name).weight
                flat = w.abs().flatten()
                kk = max(1, int(round(k * flat.numel())))
                thr = flat.topk(kk).values[-1]
                targets[name] = (w * (w.abs() >= thr)).detach().clone()
    rho = 1.5e-3
    def step(x, y):
        out = model(x)
        loss = F.cross_entropy(out, y)
        if admm:
            pen = 0.0
            for name, t in targets.items():
                pen = pen + (getattr(model, name).weight - t).pow(2).sum() * rho
            loss = loss + 0.5 * pen
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss
    return step

rng = np.random.default_rng(seed)
xs = [torch.from_numpy(rng.random((batch, 1, 28, 28), dtype=np.float32)) for _ in range(16)]
ys = [torch.from_numpy(rng.integers(0, 10, batch).astype(np.int64)) for _ in range(16)]
steps = {"torch_plain": make(False), "torch_admm": make(True), "torch_admm_poolrelu": make(True, True)}
counter = {k: 0 for k in steps}
print(json.dumps({"ready": True, "torch": torch.__version__, "threads": torch.get_num_threads()}), flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    name, n = cmd["variant"], cmd["steps"]
    step = steps[name]
    t0 = time.perf_counter()
    for _ in range(n):
        j = counter[name] % len(xs)
        counter[name] += 1
        step(xs[j], ys[j])
    print(json.dumps({"seconds": time.perf_counter() - t0}), flush=True)
'''


class TorchRunner:
    """Drives a long-lived torch worker subprocess over stdin/stdout."""

    def __init__(self, python: str, threads: int, batch: int, seed: int, variant: str, proc=None):
        self.variant = variant
        if proc is None:
            self.script = tempfile.NamedTemporaryFile("w", suffix="_torch_worker.py", delete=False)
            self.script.write(TORCH_WORKER)
            self.script.close()
            env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
            proc = subprocess.Popen(
                [python, self.script.name, str(threads), str(batch), str(seed), "0"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
            )
            hello = proc.stdout.readline()
            if not hello:
                raise RuntimeError(f"the torch worker ({python}) did not start")
            self.info = json.loads(hello)
        self.proc = proc

    def sibling(self, variant: str) -> "TorchRunner":
        other = TorchRunner.__new__(TorchRunner)
        other.variant, other.proc, other.info = variant, self.proc, self.info
        return other

    def run(self, steps: int) -> float:
        self.proc.stdin.write(json.dumps({"variant": self.variant, "steps": steps}) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())["seconds"]

    def close(self):
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        finally:
            os.unlink(self.script.name)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=200, help="steps per variant per round")
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--workers", type=int, default=2, help="processes for the data-parallel ORT variant (Trainer workers)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mnist", help="use real MNIST training images from this IDX dir (default: random data)")
    ap.add_argument("--torch-python", default=None, help=f"python with torch (default {DEFAULT_TORCH_PYTHON} if it exists)")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--torch-pool-relu", action="store_true",
                    help="also time the PyTorch ADMM step with MaxPool before ReLU (same function)")
    ap.add_argument("--spin-variants", action="store_true", help="also time ORT with intra-op spinning on")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)

    info = machine_info()
    print(f"Date {info['date']}; machine: {info['nproc']} CPUs, {info['cpu']}, {info['platform']}, Python {info['python']}, "
          f"load average {', '.join(f'{x:.2f}' for x in info['loadavg_at_start'])}")
    import onnxruntime

    rng = np.random.default_rng(args.seed)
    if args.mnist:
        from admm_onnx.data import load_idx_dir

        data = load_idx_dir(args.mnist)
        idx = rng.permutation(len(data.x_train))[: 16 * args.batch].reshape(16, args.batch)
        xs = [np.ascontiguousarray(data.x_train[i]) for i in idx]
        ys = [data.y_train[i] for i in idx]
    else:
        xs = [rng.random((args.batch, 1, 28, 28), dtype=np.float32) for _ in range(16)]
        ys = [rng.integers(0, 10, args.batch).astype(np.int64) for _ in range(16)]

    with tempfile.TemporaryDirectory(prefix="admm-throughput-") as tmp:
        plain, admm = make_trainers(Path(tmp), args.batch, args.seed)
        for t in (plain, admm):  # feeds in the graph's input order: image, labels
            assert len(t.input_names) == 2 and t.input_names[1] == "admm_labels", t.input_names
        runners = {"ort_plain": TrainerRunner(plain, xs, ys), "ort_admm": TrainerRunner(admm, xs, ys)}
        _, admm_dp = make_trainers(Path(tmp) / "workers", args.batch, args.seed, workers=args.workers)
        runners["ort_admm_workers"] = TrainerRunner(admm_dp, xs, ys)
        _, admm1 = make_trainers(Path(tmp) / "one_thread", args.batch, args.seed, threads=1)
        runners["ort_admm_1thread"] = TrainerRunner(admm1, xs, ys)
        _, admm_asis = make_trainers(Path(tmp) / "as_written", args.batch, args.seed, speedups=False)
        runners["ort_admm_as_written"] = TrainerRunner(admm_asis, xs, ys)
        if args.spin_variants:
            m, o, _ = spin_module(Path(tmp) / "plain")
            runners["ort_plain_spin"] = OrtRunner(m, o, xs, ys)
            m, o, st = spin_module(Path(tmp) / "admm")
            for name in admm.parameter_names():  # same ADMM targets and rho as the Trainer's graph
                st.parameters[name].data = admm.get(name)
            runners["ort_admm_spin"] = OrtRunner(m, o, xs, ys)
        torch_python = None if args.no_torch else (args.torch_python or (DEFAULT_TORCH_PYTHON if Path(DEFAULT_TORCH_PYTHON).exists() else None))
        torch_info = None
        tr = None
        if torch_python:
            tr = TorchRunner(torch_python, args.threads, args.batch, args.seed, "torch_plain")
            torch_info = tr.info
            runners["torch_plain"] = tr
            runners["torch_admm"] = tr.sibling("torch_admm")
            if args.torch_pool_relu:
                runners["torch_admm_poolrelu"] = tr.sibling("torch_admm_poolrelu")
        print(f"onnxruntime {onnxruntime.__version__}" + (f"; torch {torch_info['torch']} ({torch_info['threads']} threads) via {torch_python}" if torch_info else "; torch: not run"))
        print(f"LeNet-5, batch {args.batch}, {'MNIST' if args.mnist else 'random'} inputs 1x28x28, AdamW lr 1e-3; "
              f"{args.rounds} rounds x {args.steps} steps per variant, interleaved")
        try:
            for r in runners.values():
                r.run(args.warmup)
            seconds = {k: [] for k in runners}
            for _ in range(args.rounds):
                for k, r in runners.items():
                    seconds[k].append(r.run(args.steps))
        finally:
            admm_dp.close()
            if tr is not None:
                tr.close()

    print(f"load average at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    rates = {k: [args.steps * args.batch / s for s in v] for k, v in seconds.items()}
    med = {k: statistics.median(v) for k, v in rates.items()}
    print()
    print("| variant | samples/s (median) | min | max | ms/step |")
    print("|---|---:|---:|---:|---:|")
    names = {"ort_plain": "(a) ORT plain step", "ort_admm": "(b) ORT ADMM step",
             "ort_plain_spin": "    ORT plain step, spinning on", "ort_admm_spin": "    ORT ADMM step, spinning on",
             "ort_admm_workers": f"(b') ORT ADMM step, {args.workers} worker processes x 1 thread",
             "ort_admm_1thread": "    ORT ADMM step, 1 ORT thread", "ort_admm_as_written": "    ORT ADMM step, graph as written (no speed rewrites)",
             "torch_admm_poolrelu": "    PyTorch eager ADMM step, MaxPool before ReLU",
             "torch_plain": "    PyTorch eager plain step", "torch_admm": "(c) PyTorch eager ADMM step"}
    for k in runners:
        print(f"| {names[k]} | {med[k]:,.0f} | {min(rates[k]):,.0f} | {max(rates[k]):,.0f} | {1000 * args.batch / med[k]:.2f} |")
    ratios = {"admm_overhead_vs_plain_pct": 100.0 * (med["ort_plain"] / med["ort_admm"] - 1.0)}
    # Paired per-round ratios (same time window) are less noisy than a ratio of medians.
    paired = [a / p for a, p in zip(rates["ort_admm"], rates["ort_plain"])]
    ratios["ort_admm_over_ort_plain_paired_median"] = statistics.median(paired)
    print()
    print(f"ADMM step cost vs plain step: {ratios['admm_overhead_vs_plain_pct']:+.1f}% time "
          f"(ADMM/plain throughput, median of per-round ratios: {ratios['ort_admm_over_ort_plain_paired_median']:.3f}; target: ADMM <= +10%)")
    if "torch_admm" in med:
        ratios["ort_admm_over_torch_admm"] = med["ort_admm"] / med["torch_admm"]
        ratios["ort_admm_over_torch_admm_paired_median"] = statistics.median(
            a / t for a, t in zip(rates["ort_admm"], rates["torch_admm"]))
        ratios["ort_plain_over_torch_plain"] = med["ort_plain"] / med["torch_plain"]
        print(f"ORT ADMM / PyTorch eager ADMM throughput: {ratios['ort_admm_over_torch_admm']:.2f}x "
              f"(paired per-round median {ratios['ort_admm_over_torch_admm_paired_median']:.2f}x; target >= 1.0)")
        print(f"ORT plain / PyTorch eager plain throughput: {ratios['ort_plain_over_torch_plain']:.2f}x")
        if "ort_admm_spin" in med:
            ratios["ort_admm_spin_over_torch_admm"] = med["ort_admm_spin"] / med["torch_admm"]
            print(f"ORT ADMM (spinning on) / PyTorch eager ADMM throughput: {ratios['ort_admm_spin_over_torch_admm']:.2f}x")
    ratios["workers_over_one_process"] = med["ort_admm_workers"] / med["ort_admm"]
    print(f"{args.workers} worker processes: ADMM step {ratios['workers_over_one_process']:.2f}x the one-process throughput")
    if "torch_admm" in med:
        ratios["ort_admm_workers_over_torch_admm"] = med["ort_admm_workers"] / med["torch_admm"]
        ratios["ort_admm_workers_over_torch_admm_paired_median"] = statistics.median(
            a / t for a, t in zip(rates["ort_admm_workers"], rates["torch_admm"]))
        print(f"ORT ADMM with {args.workers} workers / PyTorch eager ADMM throughput: {ratios['ort_admm_workers_over_torch_admm']:.2f}x "
              f"(paired per-round median {ratios['ort_admm_workers_over_torch_admm_paired_median']:.2f}x; target >= 1.0)")
    ratios["speedups_over_as_written"] = med["ort_admm"] / med["ort_admm_as_written"]
    ratios["one_thread_over_default"] = med["ort_admm_1thread"] / med["ort_admm"]
    print(f"Speed rewrites: the ADMM step runs at {ratios['speedups_over_as_written']:.2f}x the throughput of the graph as written; "
          f"1 ORT thread: {ratios['one_thread_over_default']:.2f}x the default threads")
    if "torch_admm" in med:
        ratios["ort_admm_as_written_over_torch_admm"] = med["ort_admm_as_written"] / med["torch_admm"]
        ratios["ort_admm_1thread_over_torch_admm"] = med["ort_admm_1thread"] / med["torch_admm"]
        print(f"vs PyTorch eager ADMM: graph as written {ratios['ort_admm_as_written_over_torch_admm']:.2f}x, "
              f"1 ORT thread {ratios['ort_admm_1thread_over_torch_admm']:.2f}x")
    if "torch_admm_poolrelu" in med:
        ratios["ort_admm_over_torch_admm_poolrelu"] = med["ort_admm"] / med["torch_admm_poolrelu"]
        print(f"ORT ADMM / PyTorch eager ADMM with MaxPool before ReLU: {ratios['ort_admm_over_torch_admm_poolrelu']:.2f}x")
    if "ort_admm_spin" in med:
        ratios["ort_admm_spin_overhead_vs_plain_spin_pct"] = 100.0 * (med["ort_plain_spin"] / med["ort_admm_spin"] - 1.0)
        ratios["nospin_speedup_admm"] = med["ort_admm"] / med["ort_admm_spin"]
        print(f"Spinning on: ADMM vs plain {ratios['ort_admm_spin_overhead_vs_plain_spin_pct']:+.1f}% time; the library's "
              f"ADMM step (spinning off) runs at {ratios['nospin_speedup_admm']:.2f}x the throughput of spinning on")
    result = {"machine": info, "onnxruntime": onnxruntime.__version__, "torch": torch_info, "args": vars(args),
              "samples_per_s": rates, "median_samples_per_s": med, "ratios": ratios}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
