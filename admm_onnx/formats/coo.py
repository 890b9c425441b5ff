"""``coo``: the standard ``sparse_initializer`` (values in the weight's own type, int64 indices).

Each selected weight moves from ``graph.initializer`` to ``graph.sparse_initializer`` as a
standard ``SparseTensorProto`` (values, sorted int64 linear indices), which the ONNX checker
validates and onnxruntime densifies when it loads the model (no decode graph, nothing to fold):
inference runs the dense kernels on the same weights, bit-exact. Any ``sparse_initializer``
(ours or anyone's) is read and densified by this format. Limits: onnx cannot store sparse
initializers as external data, so a ``coo`` export whose sparse tensors exceed 2 GB is refused;
int64 indices make it the largest of the sparse formats (about 12 bytes per nonzero).
"""
from __future__ import annotations

import json
from typing import Dict, List, Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import ModelError
from . import register
from .base import (
    _PROTOBUF_LIMIT,
    METADATA_KEY,
    ExportReport,
    Format,
    StoredWeight,
    WeightRow,
    _check_model_arg,
    _drop_metadata,
    _finish_encode,
    _read_metadata,
    _run_checker,
    _to_array,
    check_min_sparsity,
    copy_model,
    logger,
    select_weights,
)

#: Lowest IR version that has ``sparse_initializer``.
MIN_COO_IR = 6


def sparse_to_dense(sparse: onnx.SparseTensorProto) -> np.ndarray:
    """Dense array of a SparseTensorProto with linear (1-D) or coordinate (2-D) indices."""
    vals = _to_array(sparse.values)
    idx = _to_array(sparse.indices).astype(np.int64)
    shape = tuple(int(d) for d in sparse.dims)
    if idx.size and idx.min() < 0:
        raise ModelError(f"sparse initializer {sparse.values.name!r} has negative indices")
    flat = np.zeros(int(np.prod(shape, dtype=np.int64)), dtype=vals.dtype)
    if idx.ndim == 2:
        idx = np.ravel_multi_index(tuple(idx.T), shape) if idx.size else idx.reshape(-1)
    flat[idx] = vals
    return flat.reshape(shape)


class Coo(Format):
    name = "coo"
    summary = "standard sparse_initializer (onnxruntime densifies it at load)"
    limits = ("onnxruntime densifies sparse initializers at load (no sparse kernels); onnx cannot store them "
              "as external data (2 GB cap); int64 indices: about 12 bytes per nonzero.")
    options = ("min_sparsity",)

    def encode(self, model: onnx.ModelProto, min_sparsity: float = 0.5, **options):
        """Copy of ``model`` with each weight of sparsity >= ``min_sparsity`` a sparse initializer."""
        self.check_options({**options, "min_sparsity": min_sparsity})
        min_sparsity = check_min_sparsity(min_sparsity)
        _check_model_arg(model)
        if _read_metadata(model) is not None or len(model.graph.sparse_initializer):
            raise ModelError("the model already has sparse weights", hint="densify it first")
        if model.ir_version < MIN_COO_IR:
            raise ModelError(f"coo export needs IR version >= {MIN_COO_IR}, the model has {model.ir_version}",
                             hint="use --format csr")
        out = copy_model(model)
        report = ExportReport(format="coo", values="fp32", min_sparsity=min_sparsity,
                              model_bytes_before=model.ByteSize())
        selected = select_weights(out, report, min_sparsity)
        self._apply(out, selected, {r.name: r for r in report.rows})
        _finish_encode(out, report, len(selected))
        return out, report

    @staticmethod
    def _apply(model: onnx.ModelProto, selected: Mapping[str, np.ndarray],
               rows_by_name: Mapping[str, WeightRow]) -> None:
        graph = model.graph
        keep: List[TensorProto] = []
        meta_weights = {}
        sparse_bytes = 0
        for pos, tensor in enumerate(graph.initializer):
            arr = selected.get(tensor.name)
            if arr is None:
                keep.append(tensor)
                continue
            flat = arr.reshape(-1)
            lin = np.flatnonzero(flat != 0).astype(np.int64)  # sorted, as the checker requires
            vals = numpy_helper.from_array(flat[lin], tensor.name)
            idx = numpy_helper.from_array(lin, "")
            graph.sparse_initializer.append(helper.make_sparse_tensor(vals, idx, list(arr.shape)))
            meta_weights[tensor.name] = {"index": pos}
            row = rows_by_name[tensor.name]
            row.storage = "coo"
            row.stored_bytes = int(flat[lin].nbytes + lin.nbytes)
            sparse_bytes += row.stored_bytes
        if sparse_bytes >= _PROTOBUF_LIMIT:
            raise ModelError("the coo sparse tensors exceed 2 GB and onnx cannot store them as external data",
                             hint="use --format csr")
        del graph.initializer[:]
        graph.initializer.extend(keep)
        model.metadata_props.add(
            key=METADATA_KEY,
            value=json.dumps({"version": 1, "format": "coo", "weights": meta_weights}, separators=(",", ":")),
        )

    def detect(self, model: onnx.ModelProto) -> bool:
        meta = _read_metadata(model)
        return (meta is not None and meta.get("format") == "coo") or (
            meta is None and len(model.graph.sparse_initializer) > 0)

    def decode(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """Every ``sparse_initializer`` becomes a dense initializer, at its original position
        when we wrote it (else appended); our metadata is removed."""
        _check_model_arg(model)
        meta = _read_metadata(model)
        out = copy_model(model)
        graph = out.graph
        order = meta.get("weights", {}) if meta is not None and meta.get("format") == "coo" else {}
        inits = list(graph.initializer)
        placed, appended = [], []
        for sp in graph.sparse_initializer:
            tensor = numpy_helper.from_array(sparse_to_dense(sp), sp.values.name)
            info = order.get(sp.values.name) if isinstance(order, dict) else None
            pos = info.get("index") if isinstance(info, dict) else None
            if isinstance(pos, int) and pos >= 0:
                placed.append((pos, tensor))
            else:
                appended.append(tensor)
        # Inserting in increasing original position rebuilds the original order.
        for pos, tensor in sorted(placed, key=lambda pt: pt[0]):
            inits.insert(min(pos, len(inits)), tensor)
        inits += appended
        del graph.sparse_initializer[:]
        del graph.initializer[:]
        graph.initializer.extend(inits)
        _drop_metadata(out)
        _run_checker(out, "densify")
        logger.info("densified sparse initializers")
        return out

    def stored(self, model: onnx.ModelProto) -> Dict[str, StoredWeight]:
        out = {}
        for sp in model.graph.sparse_initializer:
            vals = _to_array(sp.values)
            idx = _to_array(sp.indices)
            out[sp.values.name] = StoredWeight(sp.values.name, sparse_to_dense(sp), "coo",
                                               int(vals.nbytes + idx.nbytes), vals.dtype.itemsize * 8)
        return out


COO = register(Coo())
