#!/usr/bin/env bash
# LeNet-5 on MNIST at the paper's 71x from the command line alone: what a README reader can
# type (no bench script, so no data augmentation; the CLI's default ADMM settings).
#
#   bash bench/lenet5_cli.sh ../shared/data/mnist OUT
#
# Writes OUT/l5.onnx, OUT/l5.dense.onnx, OUT/l5.71x.onnx, OUT/report.json (prune --report:
# chosen ratios, predicted and measured one-shot loss, phases, times) and OUT/run.txt (load
# average, date and the eval lines).
set -euo pipefail
MNIST=${1:?usage: bash bench/lenet5_cli.sh MNIST_DIR OUT}
OUT=${2:?usage: bash bench/lenet5_cli.sh MNIST_DIR OUT}
mkdir -p "$OUT"
D="mnist:$MNIST"
{
  echo "start $(date -u +%FT%TZ), load $(cut -d' ' -f1-3 /proc/loadavg), $(nproc) cores"
  admm-onnx models build lenet5 -o "$OUT/l5.onnx"
  admm-onnx train "$OUT/l5.onnx" -d "$D" -o "$OUT/l5.dense.onnx" --epochs 4 --lr 2e-3 --batch-size 128 --workers 2 -q
  admm-onnx prune "$OUT/l5.dense.onnx" -d "$D" -o "$OUT/l5.71x.onnx" --compression 71x --batch-size 128 \
    --lr 2e-3 --retrain-lr 3e-3 --retrain-epochs 12 --workers 2 --report "$OUT/report.json" -q
  admm-onnx eval "$OUT/l5.71x.onnx" -d "$D"
  echo "end $(date -u +%FT%TZ), load $(cut -d' ' -f1-3 /proc/loadavg)"
} | tee "$OUT/run.txt"
