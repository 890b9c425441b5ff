"""A user's own ONNX Runtime training loop, with ADMM pruning added in a handful of lines.

    python examples/ort_training_loop.py --model M.onnx --data D.npz --output OUT.onnx --sparsity 0.9

Everything marked "ADMM" is what admm-onnx adds; the rest is an ordinary ORT on-device training
loop (generate_artifacts, CheckpointState, Module, Optimizer) with the user's own loss Block.
D.npz holds x_train, y_train (and optionally x_test, y_test) as for `admm-onnx prune`.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnx

import admm_onnx
from admm_onnx.ort import api, artifacts, onnxblock  # = onnxruntime.training.*, without torch


class MyLoss(onnxblock.Block):
    """The user's loss: cross-entropy on the model output against a "labels" input."""

    def __init__(self):
        super().__init__()
        self.ce = onnxblock.loss.CrossEntropyLoss()

    def build(self, logits):
        return self.ce(logits, "labels")


def batches(x, y, batch_size, rng):
    order = rng.permutation(len(x))
    for i in range(0, len(x) - batch_size + 1, batch_size):
        idx = order[i : i + batch_size]
        yield x[idx], y[idx].astype(np.int64)


def accuracy(module, x, y, batch_size=256):
    module.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        _, logits = module(x[i : i + batch_size], y[i : i + batch_size].astype(np.int64))
        correct += int((logits.argmax(-1) == y[i : i + batch_size]).sum())
    return correct / len(x)


def train_epochs(module, optimizer, x, y, epochs, batch_size, rng):
    for _ in range(epochs):
        module.train()
        for xb, yb in batches(x, y, batch_size, rng):
            module(xb, yb)
            optimizer.step()
            module.lazy_reset_grad()


def make_artifacts(model, trainable, frozen, loss, directory):
    directory.mkdir(parents=True, exist_ok=True)
    output = model.graph.output[0].name
    artifacts.generate_artifacts(
        model, requires_grad=trainable, frozen_params=frozen, loss=loss, optimizer=artifacts.OptimType.AdamW,
        artifact_directory=str(directory), additional_output_names=[output], loss_input_names=[output],
    )
    state = api.CheckpointState.load_checkpoint(str(directory / "checkpoint"))
    module = api.Module(str(directory / "training_model.onnx"), state, str(directory / "eval_model.onnx"))
    return state, module, api.Optimizer(str(directory / "optimizer_model.onnx"), module)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--admm-iters", type=int, default=6)
    p.add_argument("--retrain-epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args()

    data = admm_onnx.load_dataset(args.data)
    model = onnx.load(args.model)
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim][1:]
    x_train = data.x_train.reshape((-1, *shape)) if all(shape) else data.x_train
    x_test = data.x_test.reshape((-1, *shape)) if all(shape) else data.x_test
    rng = np.random.default_rng(0)
    work = Path(tempfile.mkdtemp(prefix="ort-loop-"))

    info = admm_onnx.analyse(model)                                                   # ADMM
    plan = admm_onnx.PruneConfig(rho=1e-2, rho_growth=1.3).with_sparsity(args.sparsity).plan(info)  # ADMM
    penalty = admm_onnx.AdmmPenalty(MyLoss(), list(plan))                             # ADMM: wraps my loss

    state, module, optimizer = make_artifacts(model, info.trainable, penalty.frozen_params, penalty, work / "admm")
    print(f"dense top-1 {100 * accuracy(module, x_test, data.y_test):.2f}%")
    admm = admm_onnx.AdmmState(plan, rho_growth=1.3)                                  # ADMM
    admm.initialize(admm.read_weights(state))                                         # ADMM
    admm.write(state)                                                                 # ADMM
    for it in range(args.admm_iters):
        train_epochs(module, optimizer, x_train, data.y_train, 1, args.batch_size, rng)
        residuals = admm.update(state)                                                # ADMM: Z, U, rho
        worst = max(r.primal for r in residuals.values())
        print(f"ADMM iteration {it + 1}: worst primal residual {worst:.4f}")
    admm.disable(state)                                                               # ADMM
    masks = admm.hard_prune(state)                                                    # ADMM

    retrain_model, mask_params = admm_onnx.masked_model(model, state, masks)          # ADMM
    state, module, optimizer = make_artifacts(retrain_model, info.trainable, mask_params, MyLoss(), work / "retrain")
    train_epochs(module, optimizer, x_train, data.y_train, args.retrain_epochs, args.batch_size, rng)
    print(f"pruned top-1 {100 * accuracy(module, x_test, data.y_test):.2f}%")

    admm_onnx.export_pruned(args.model, args.output, state, masks)                    # ADMM
    written = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(args.output).graph.initializer}
    for name in plan:
        print(f"{name}: {100 * (written[name] == 0).mean():.2f}% zeros")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
