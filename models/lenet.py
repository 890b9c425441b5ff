"""LeNet-5 and LeNet-300-100 as in the ADMM pruning paper (Zhang et al., arXiv 1804.03294).

LeNet-5 (Caffe variant used by the paper): conv 5x5x1x20, 2x2 max-pool, conv 5x5x20x50,
2x2 max-pool, fc 800x500, fc 500x10, ReLU after each conv and after fc1; 430,500 weights
(431,080 parameters with biases) at 28x28 input.
LeNet-300-100: fc 784x300, fc 300x100, fc 100x10 with ReLU; 266,200 weights.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def _truncated_normal(rng: np.random.Generator, shape: Sequence[int], fan_in: int) -> np.ndarray:
    """He-scaled normal truncated at two standard deviations, as float32."""
    std = np.sqrt(2.0 / fan_in)
    x = rng.standard_normal(shape)
    x = np.clip(x, -2.0, 2.0) * std
    return x.astype(np.float32)


class _Graph:
    """Tiny builder collecting nodes and initializers."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.nodes: List[onnx.NodeProto] = []
        self.inits: List[onnx.TensorProto] = []

    def param(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(array, name))
        return name

    def node(self, op: str, inputs: List[str], output: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    def conv(self, x: str, name: str, cin: int, cout: int, k: int, pad: int) -> str:
        w = self.param(f"{name}.weight", _truncated_normal(self.rng, (cout, cin, k, k), cin * k * k))
        b = self.param(f"{name}.bias", np.zeros(cout, np.float32))
        return self.node("Conv", [x, w, b], name, kernel_shape=[k, k], pads=[pad] * 4)

    def fc(self, x: str, name: str, fin: int, fout: int) -> str:
        w = self.param(f"{name}.weight", _truncated_normal(self.rng, (fout, fin), fin))
        b = self.param(f"{name}.bias", np.zeros(fout, np.float32))
        return self.node("Gemm", [x, w, b], name, transB=1)

    def model(self, name: str, input_shape: Tuple[int, ...], out: str, classes: int) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes,
            name,
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *input_shape])],
            [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N", classes])],
            self.inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="admm-onnx")
        model.ir_version = 8
        onnx.checker.check_model(model, full_check=True)
        return model


def lenet5(input_shape: Sequence[int] = (1, 28, 28), num_classes: int = 10, seed: int = 0) -> onnx.ModelProto:
    """The paper's LeNet-5. Inputs smaller than 16x16 get 'same' padding so the shapes work."""
    c, h, w = input_shape
    g = _Graph(np.random.default_rng(seed))
    pad = 2 if min(h, w) < 16 else 0
    x = g.node("Relu", [g.conv("input", "conv1", c, 20, 5, pad)], "relu1")
    x = g.node("MaxPool", [x], "pool1", kernel_shape=[2, 2], strides=[2, 2])
    h, w = (h + 2 * pad - 4) // 2, (w + 2 * pad - 4) // 2
    x = g.node("Relu", [g.conv(x, "conv2", 20, 50, 5, pad)], "relu2")
    x = g.node("MaxPool", [x], "pool2", kernel_shape=[2, 2], strides=[2, 2])
    h, w = (h + 2 * pad - 4) // 2, (w + 2 * pad - 4) // 2
    x = g.node("Flatten", [x], "flatten", axis=1)
    x = g.node("Relu", [g.fc(x, "fc1", 50 * h * w, 500)], "relu3")
    g.fc(x, "fc2", 500, num_classes)
    g.nodes[-1].output[0] = "logits"
    return g.model("lenet5", tuple(input_shape), "logits", num_classes)


def lenet300_100(input_shape: Sequence[int] = (1, 28, 28), num_classes: int = 10, seed: int = 0) -> onnx.ModelProto:
    """LeNet-300-100: three fully connected layers with ReLU."""
    g = _Graph(np.random.default_rng(seed))
    x = g.node("Flatten", ["input"], "flatten", axis=1)
    x = g.node("Relu", [g.fc(x, "fc1", int(np.prod(input_shape)), 300)], "relu1")
    x = g.node("Relu", [g.fc(x, "fc2", 300, 100)], "relu2")
    g.fc(x, "fc3", 100, num_classes)
    g.nodes[-1].output[0] = "logits"
    return g.model("lenet300_100", tuple(input_shape), "logits", num_classes)
