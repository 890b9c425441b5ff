"""A CIFAR-10 ResNet-20-class network (He et al. 2016, section 4.2) built as ONNX.

3 stages of n basic blocks (3x3 conv-BN-ReLU, 3x3 conv-BN, residual Add, ReLU), widths
16/32/64 (times ``width``), stride 2 at the start of stages 2 and 3 with a 1x1 conv + BN
projection on the shortcut (option B), global average pool, flatten, fully connected layer.
n = 3 gives ResNet-20 (0.27 M parameters, 41 M MACs at 32x32). BatchNormalization nodes are in
inference form (admm-onnx trains them with frozen running statistics, see graph/batchnorm_frozen.py).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper

from .lenet import OPSET, _Graph, _truncated_normal


class _Net(_Graph):
    def bn(self, x: str, name: str, c: int) -> str:
        scale = self.param(f"{name}.weight", np.ones(c, np.float32))
        bias = self.param(f"{name}.bias", np.zeros(c, np.float32))
        mean = self.param(f"{name}.running_mean", np.zeros(c, np.float32))
        var = self.param(f"{name}.running_var", np.ones(c, np.float32))
        return self.node("BatchNormalization", [x, scale, bias, mean, var], name, epsilon=1e-5)

    def conv_nb(self, x: str, name: str, cin: int, cout: int, k: int, stride: int) -> str:
        w = self.param(f"{name}.weight", _truncated_normal(self.rng, (cout, cin, k, k), cin * k * k))
        return self.node("Conv", [x, w], name, kernel_shape=[k, k], pads=[k // 2] * 4, strides=[stride, stride])


def resnet_cifar(input_shape: Sequence[int] = (3, 32, 32), num_classes: int = 10, seed: int = 0,
                 blocks: int = 3, width: int = 16) -> onnx.ModelProto:
    """ResNet-(6n+2) for 32x32 inputs; ``blocks`` = n (3: ResNet-20)."""
    c, h, w = input_shape
    g = _Net(np.random.default_rng(seed))
    x = g.node("Relu", [g.bn(g.conv_nb("input", "conv1", c, width, 3, 1), "bn1", width)], "relu1")
    cin = width
    for stage, cout in enumerate((width, 2 * width, 4 * width), 1):
        for b in range(blocks):
            stride = 2 if stage > 1 and b == 0 else 1
            p = f"layer{stage}.{b}"
            y = g.node("Relu", [g.bn(g.conv_nb(x, f"{p}.conv1", cin, cout, 3, stride), f"{p}.bn1", cout)], f"{p}.relu1")
            y = g.bn(g.conv_nb(y, f"{p}.conv2", cout, cout, 3, 1), f"{p}.bn2", cout)
            if stride != 1 or cin != cout:
                x = g.bn(g.conv_nb(x, f"{p}.downsample", cin, cout, 1, stride), f"{p}.downsample.bn", cout)
            x = g.node("Relu", [g.node("Add", [y, x], f"{p}.add")], f"{p}.relu2")
            cin = cout
    x = g.node("GlobalAveragePool", [x], "pool")
    x = g.node("Flatten", [x], "flatten", axis=1)
    g.fc(x, "fc", cin, num_classes)
    g.nodes[-1].output[0] = "logits"
    return g.model(f"resnet{6 * blocks + 2}_cifar", tuple(input_shape), "logits", num_classes)


def resnet20(input_shape: Sequence[int] = (3, 32, 32), num_classes: int = 10, seed: int = 0) -> onnx.ModelProto:
    return resnet_cifar(input_shape, num_classes, seed, blocks=3)
