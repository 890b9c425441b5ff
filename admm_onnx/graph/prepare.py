"""The rewrites that make a user's graph trainable by ORT training 1.19.2, in order, and the
exact rewrites that make its training step faster.

Each rewrite lives in its own module, mutates the training copy in place, runs the checker,
and returns how many nodes it changed. The user's own graph is never rewritten: the pruned
model is written from the original with new weights.
"""
from __future__ import annotations

import logging
from typing import Callable, Dict, Iterable, List, Tuple

import onnx

from .avgpool_conv import avgpool_to_conv
from .batchnorm_frozen import freeze_batchnorm
from .convtranspose_conv import convtranspose_to_conv
from .depth_space import depth_space_to_reshapes
from .dropout import enable_dropout
from .hard_activations import hard_activations
from .initializer_inputs import drop_initializer_inputs
from .layernorm_outputs import add_layernorm_outputs
from .instancenorm import instancenorm_to_reductions
from .lrn import lrn_to_pool
from .opset import upgrade_opset
from .pad_gather import pad_modes_to_gather
from .pool_first import pool_before_activation
from .pool_phases import split_pool_phases
from .outputs import train_on_logits
from .prelu import prelu_to_relu
from .resize_matmul import resize_to_matmul
from .retie import retie_embeddings
from .smooth_activations import smooth_activations
from .sum_to_add import sum_to_add
from .transpose_perm import explicit_transpose_perm
from .zipmap import zipmap_to_identity

log = logging.getLogger(__name__)

#: (description, rewrite) in the order they run.
REWRITES: List[Tuple[str, Callable[[onnx.ModelProto], int]]] = [
    # Versions first: refuses IR > 10 / opset > 21, upgrades opset < 13 (the later rewrites
    # emit opset-13 forms such as Unsqueeze with an axes input).
    ("opset/IR upgraded for training", upgrade_opset),
    ("initializers no longer listed as graph inputs", drop_initializer_inputs),
    ("Transpose given its default perm explicitly (ORT training looks it up)", explicit_transpose_perm),
    ("embedding and folded head re-tied", retie_embeddings),
    ("Sum -> chain of Add", sum_to_add),
    ("LRN -> Pow/AveragePool/Div", lrn_to_pool),
    ("PRelu -> Relu(x) - slope * Relu(-x)", prelu_to_relu),
    ("HardSigmoid/HardSwish -> Clip forms", hard_activations),
    ("Elu/Selu/Celu/Softplus/Softsign/Mish -> Relu/Exp/Log forms", smooth_activations),
    ("InstanceNormalization (GroupNorm exports) -> ReduceMean/Sub/Sqrt/Div forms", instancenorm_to_reductions),
    ("Resize -> MatMul with interpolation matrices (no CPU ResizeGrad)", resize_to_matmul),
    ("Pad reflect/edge/wrap -> Gather with an index map (Pad's gradient is constant mode only)", pad_modes_to_gather),
    ("DepthToSpace/SpaceToDepth -> Reshape/Transpose/Reshape", depth_space_to_reshapes),
    ("AveragePool -> depthwise Conv with a constant kernel (ORT's AveragePoolGrad crashes)", avgpool_to_conv),
    ("ConvTranspose -> Conv on flipped, zero-inserted activations (no CPU ConvTransposeGrad)", convtranspose_to_conv),
    ("LayerNormalization given its optional outputs", add_layernorm_outputs),
    ("BatchNormalization with frozen running statistics", freeze_batchnorm),
    ("Dropout active while training", enable_dropout),
    ("ZipMap outputs trained as their (N, C) tensor", zipmap_to_identity),
    ("class outputs trained as (N, C) logits", train_on_logits),
]


def prepare_for_training(model: onnx.ModelProto) -> Dict[str, int]:
    """Apply every rewrite to ``model`` in place; returns description -> nodes changed."""
    counts = {}
    for what, rewrite in REWRITES:
        counts[what] = rewrite(model)
        if counts[what]:
            log.info("training graph: %s (%d node(s))", what, counts[what])
    return counts


#: (description, rewrite(model, trainable names)): same function, less work per training step
#: (measured on LeNet-5 by bench/throughput.py). They run after the analysis of the prepared
#: graph, so weight names, layouts and the layer table are those of the user's graph.
SPEEDUPS: List[Tuple[str, Callable[[onnx.ModelProto, Iterable[str]], int]]] = [
    ("MaxPool(Relu(x)) -> Relu(MaxPool(x))", lambda model, trainable: pool_before_activation(model)),
    ("first-layer Conv -> MaxPool as the max of strided phase convs", split_pool_phases),
]


def speed_up_for_training(model: onnx.ModelProto, trainable: Iterable[str]) -> Dict[str, int]:
    """Apply every speed rewrite to the prepared ``model`` in place; returns description -> count."""
    trainable = list(trainable)
    counts = {}
    for what, rewrite in SPEEDUPS:
        counts[what] = rewrite(model, trainable)
        if counts[what]:
            log.debug("training graph: %s (%d)", what, counts[what])
    return counts
