"""Reading encoded models back, whatever their format: ``densify``, ``inspect_model``,
``csr_weights``, and checking outputs (``sample_feeds``, ``max_output_change``)."""
from __future__ import annotations

from contextlib import contextmanager

from typing import Dict, Mapping

import numpy as np
import onnx
from onnx import helper

from ..errors import ModelError
from ..graph.analysis import analyse
from .base import (
    _FLOAT_TYPES,
    WeightRow,
    WeightTable,
    _check_model_arg,
    _consumers,
    _to_array,
    _view_2d,
)


def densify(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with every encoded weight a plain dense initializer (the inverse of
    any registered format's encode; also densifies anyone's ``sparse_initializer``). Raises
    :class:`ModelError` when the model has nothing encoded."""
    from . import REGISTRY, detect

    _check_model_arg(model)
    fmt = detect(model)
    if fmt is None:
        raise ModelError("the model has no sparse weights to densify")
    coo = REGISTRY["coo"]
    with damaged_files(fmt.name):
        out = fmt.decode(model)
        if fmt is not coo and len(out.graph.sparse_initializer):
            out = coo.decode(out)
    from . import csr, packed

    domains = {csr.DOMAIN, packed.DOMAIN, packed.DOMAIN_V1}  # of the decode functions the formats write
    left = sorted({n.op_type for n in out.graph.node if n.domain in domains})
    if left:  # metadata that names fewer weights than the file's decode nodes write
        raise ModelError(f"the {fmt.name} file's metadata does not match its decode nodes ({', '.join(left)} left)",
                         hint="export the file again")
    return out


@contextmanager
def damaged_files(fmt: str):
    """Arrays or metadata of an encoded file that do not fit each other (a tampered or truncated
    file) are the user's input: a :class:`ModelError`, not a Python error from deep inside."""
    try:
        yield
    except (ValueError, IndexError, TypeError, KeyError, OverflowError, AttributeError, NotImplementedError) as exc:
        raise ModelError(f"the {fmt} weights of the model are damaged: {type(exc).__name__}: {exc}"[:300],
                         hint="export the file again") from None


def _stored(model: onnx.ModelProto, fmt) -> Dict[str, object]:
    """name -> StoredWeight of every encoded weight: ``fmt``'s (the detected format, or None)
    and anyone's ``sparse_initializer``; a damaged file is a ModelError."""
    from . import REGISTRY

    coo = REGISTRY["coo"]
    with damaged_files(fmt.name if fmt is not None else coo.name):
        stored = dict(fmt.stored(model)) if fmt is not None else {}
        if fmt is not coo and len(model.graph.sparse_initializer):
            stored.update(coo.stored(model))
    return stored


def csr_weights(model: onnx.ModelProto) -> Dict[str, object]:
    """Encoded weights of ``model`` as SciPy CSR matrices over their 2-D views.

    For a weight of shape ``(d0, d1, ..., dk)`` the matrix has shape ``(d0, d1 * ... * dk)``;
    ``matrix.toarray().reshape(shape)`` is the decoded weight (fp16- or k-bit-stored values as
    the decode computes them). Covers every registered format and every ``sparse_initializer``;
    dense initializers are not included; a model without encoded weights gives an empty dict.
    """
    import scipy.sparse

    from . import detect

    _check_model_arg(model)
    out: Dict[str, scipy.sparse.csr_matrix] = {}
    for name, sw in _stored(model, detect(model)).items():
        rows, cols = _view_2d(sw.dense.shape) if sw.dense.ndim else (1, 1)
        out[name] = scipy.sparse.csr_matrix(sw.dense.reshape(rows, cols))
    return out


def _prunability(model: onnx.ModelProto):
    """What ``prune`` would see: the analysis of the prepared training copy (rewrites and
    re-ties included); the plain analysis when the model cannot be prepared (an encoded file)."""
    from ..errors import AdmmOnnxError
    from ..pipeline import prepare_model

    try:
        return prepare_model(model).info
    except (AdmmOnnxError, onnx.checker.ValidationError, ValueError):
        return analyse(model)


def inspect_model(model: onnx.ModelProto) -> WeightTable:
    """Per-weight sparsity and storage of ``model`` (dense or any registered format).

    Rows (:class:`WeightRow`) cover every float initializer of ndim >= 2 and every encoded
    weight, in graph order (sparse initializers last); ``op`` lists the op types reading the
    weight (decode nodes excluded); ``bits`` is the width of a stored value; ``prunable`` says
    "yes" or why admm-onnx would not prune a dense weight. ``.totals`` sums them.
    """
    from . import detect

    _check_model_arg(model)
    graph = model.graph
    fmt = detect(model)
    stored = _stored(model, fmt)
    skip = fmt.decode_nodes(model) if fmt is not None else set()
    consumers = _consumers(graph, skip)
    anchors = {sw.anchor: sw for sw in stored.values() if sw.anchor}
    owned = set().union(*(sw.tensors for sw in stored.values())) if stored else set()
    info = _prunability(model)
    table = WeightTable()
    from ..quantization import model_quantization

    levels = model_quantization(model)  # dense weights exactly on recorded k-bit levels

    def encoded_row(sw) -> WeightRow:
        arr = sw.dense
        return WeightRow(sw.name, ",".join(consumers.get(sw.name, [])), tuple(arr.shape), int(arr.size),
                         int(np.count_nonzero(arr)), sw.storage, sw.stored_bytes, int(arr.nbytes), bits=sw.bits)

    for tensor in graph.initializer:
        name = tensor.name
        if name in anchors:
            table.append(encoded_row(anchors[name]))
            continue
        if name in owned or tensor.data_type not in _FLOAT_TYPES or len(tensor.dims) < 2:
            continue
        arr = _to_array(tensor)
        why = "yes" if name in info.prunable else info.not_prunable.get(name, "")
        table.append(WeightRow(name, ",".join(consumers.get(name, [])), tuple(arr.shape), int(arr.size),
                               int(np.count_nonzero(arr)),
                               f"dense ({levels[name].bits}-bit levels)" if name in levels else "dense",
                               int(arr.nbytes), int(arr.nbytes), why,
                               bits=arr.dtype.itemsize * 8))
    for sw in stored.values():
        if not sw.anchor:
            table.append(encoded_row(sw))
    return table



def sample_feeds(model: onnx.ModelProto, seed: int = 0) -> Dict[str, np.ndarray]:
    """A random batch for every real input of ``model`` (symbolic dims set to 1): standard
    normal floats, integers in [0, 10) for integer inputs (token ids)."""
    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    feeds = {}
    for value in model.graph.input:
        if value.name in inits:
            continue
        tt = value.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1 for d in tt.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if np.issubdtype(dtype, np.integer):
            feeds[value.name] = rng.integers(0, 10, shape).astype(dtype)
        else:
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def max_output_change(dense_model: onnx.ModelProto, sparse_model: onnx.ModelProto,
                      feeds: Mapping[str, np.ndarray]) -> float:
    """Largest absolute difference over all outputs of the two models on ``feeds``.

    Both run in ``onnxruntime.InferenceSession`` on CPU with default options. 0.0 means
    identical outputs (NaNs in the same places count as equal). Models must fit in one
    protobuf (< 2 GB in memory).
    """
    import onnxruntime as ort  # the runtime installed beside admm-onnx

    results = []
    for m in (dense_model, sparse_model):
        _check_model_arg(m)
        try:
            sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
            results.append(sess.run(None, dict(feeds)))
        except Exception as exc:  # ORT raises its own exception types
            raise ModelError(f"onnxruntime could not run the model: {' '.join(str(exc).split())}") from exc
    worst = 0.0
    for a, b in zip(*results):
        a = np.asarray(a, np.float64)
        b = np.asarray(b, np.float64)
        if a.shape != b.shape:
            raise ModelError(f"output shapes differ: {a.shape} vs {b.shape}")
        diff = np.abs(a - b)
        diff[np.isnan(a) & np.isnan(b)] = 0.0
        if diff.size:
            worst = max(worst, float(np.max(diff)))
    return worst
