"""The ADMM penalty as an onnxblock ``Block`` wrapping any base loss.

Math: total = base_loss + sum_i (rho_i / 2) * ||W_i - T_i||_F^2, with T_i = Z_i - U_i.
Its gradient with respect to W_i is rho_i * (W_i - Z_i + U_i), added to the base gradient.
T_i and rho_i are initializers listed as frozen parameters, so they live in the ORT
checkpoint: the ADMM engine rewrites them once per ADMM iteration through
``CheckpointState.parameters[name].data`` and nothing is fed per step. They start at T = 0 and
rho = 0, so a freshly built graph trains exactly as the base loss until the engine writes them.

The per-weight terms are chained with binary ``Add`` (ORT training has no ``Sum`` gradient).
The base loss must hold a single value (scalar or one-element tensor); it is reshaped to a
scalar before the penalty is added.
"""
from __future__ import annotations

from typing import List, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .._ort import onnxblock


def target_name(weight: str) -> str:
    """Frozen parameter holding T = Z - U for ``weight``."""
    return f"admm/target/{weight}"


def rho_name(weight: str) -> str:
    """Frozen scalar parameter holding rho for ``weight``."""
    return f"admm/rho/{weight}"


class AdmmPenalty(onnxblock.Block):
    """``loss(*inputs) + sum_i rho_i/2 ||W_i - T_i||^2`` for the weights named in ``weights``.

    ``loss`` is any onnxblock Block (ORT's ``onnxblock.loss.CrossEntropyLoss``, a user's own).
    Pass ``penalty.frozen_params`` to ``generate_artifacts(frozen_params=...)``.
    """

    def __init__(self, loss: onnxblock.Block, weights: Sequence[str]):
        super().__init__()
        if not weights:
            raise ValueError("AdmmPenalty needs at least one weight")
        self.loss = loss
        self.weights: List[str] = list(dict.fromkeys(weights))

    @property
    def frozen_params(self) -> List[str]:
        return [n for w in self.weights for n in (target_name(w), rho_name(w))]

    def build(self, *loss_inputs):
        base_loss = self.loss(*loss_inputs)
        graph = self.base.graph
        inits = {t.name: t for t in graph.initializer}
        terms = []
        for w in self.weights:
            if w not in inits:
                raise ValueError(f"AdmmPenalty: no initializer named {w!r} in the model")
            tensor = inits[w]
            dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
            graph.initializer.append(numpy_helper.from_array(np.zeros(tuple(tensor.dims), dtype), target_name(w)))
            graph.initializer.append(numpy_helper.from_array(np.zeros((), dtype), rho_name(w)))
            p = f"admm/penalty/{w}"
            graph.node.extend(
                [
                    helper.make_node("Sub", [w, target_name(w)], [f"{p}/diff"], name=f"{p}/Sub"),
                    helper.make_node("Mul", [f"{p}/diff", f"{p}/diff"], [f"{p}/sq"], name=f"{p}/Square"),
                    helper.make_node("ReduceSum", [f"{p}/sq"], [f"{p}/sum"], name=f"{p}/ReduceSum", keepdims=0),
                    helper.make_node("Mul", [f"{p}/sum", rho_name(w)], [f"{p}/weighted"], name=f"{p}/Mul"),
                ]
            )
            term = f"{p}/weighted"
            if tensor.data_type != onnx.TensorProto.FLOAT:
                graph.node.append(helper.make_node("Cast", [term], [f"{p}/f32"], to=onnx.TensorProto.FLOAT))
                term = f"{p}/f32"
            terms.append(term)
        acc = terms[0]
        for i, term in enumerate(terms[1:], start=1):
            graph.node.append(helper.make_node("Add", [acc, term], [f"admm/penalty/acc{i}"], name=f"admm/penalty/Add{i}"))
            acc = f"admm/penalty/acc{i}"
        graph.initializer.append(numpy_helper.from_array(np.array(0.5, np.float32), "admm/penalty/half"))
        graph.node.append(helper.make_node("Mul", [acc, "admm/penalty/half"], ["admm/penalty/total"], name="admm/penalty/Half"))
        # The base loss may be a scalar or a one-element tensor (a user's Block): make it a
        # scalar so the Add needs no broadcasting (ORT's Add gradient mishandles [1] + []).
        graph.initializer.append(numpy_helper.from_array(np.zeros(0, np.int64), "admm/loss/scalar_shape"))
        graph.node.append(
            helper.make_node("Reshape", [base_loss, "admm/loss/scalar_shape"], ["admm/loss/base"], name="admm/loss/Reshape")
        )
        graph.node.append(helper.make_node("Add", ["admm/loss/base", "admm/penalty/total"], ["admm/loss"], name="admm/loss/Add"))
        return "admm/loss"
