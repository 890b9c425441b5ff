"""Feeds for any model: one array per graph input, in the input's own dtype and shape.

A *feed* is what ``InferenceSession.run`` takes: a dict input name -> array. Readers yield
feeds one batch at a time (``get_next()``, ``None`` at the end of a pass), exactly as ONNX
Runtime's ``CalibrationDataReader`` does; training feeds may also carry labels under
:data:`~admm_onnx.data.LABELS`.

Contract:
- :func:`input_specs` reads the model's signature: name, NumPy dtype, shape (ints for fixed
  dims, symbols or None for dynamic ones) of every real input (not initializers).
- :func:`fit_inputs` turns user arrays into the arrays the model takes: every input present
  (one clear error listing what is missing), integer inputs (token ids, masks) kept integer and
  cast to the declared width (float data with fractional values refused), float inputs cast
  to the declared float type (uint8 images scaled to [0, 1] as before), per-sample shapes
  reshaped when the sizes agree. Nothing is modified in place.
- :class:`FeedDataset`: training and evaluation arrays keyed by input name, labels optional.
  ``.npz`` files keyed by input names load into one (:func:`load_feed_npz`); explicit
  evaluation arrays go under ``test/NAME`` (and ``test/labels``), else 10% is held out with
  a fixed seed.
- :func:`reader_for` accepts an admm-onnx :class:`~admm_onnx.data.DataReader` (used as is) or
  any object with ``get_next()`` (``rewind()`` optional, ``len()`` not needed): such a reader
  is read once into memory, its labels (under the key the user names) taken out, and served
  again in shuffled batches of the configured size, so a calibration reader that yields one
  sample at a time still trains in mini-batches.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnx

from .data import LABELS, ArrayReader, DataReader, WrappedReader
from .errors import DataError, ModelError

log = logging.getLogger(__name__)

#: Keys tried, in order, for the labels of a ``.npz`` or a reader's feeds when none is named.
LABEL_KEYS = ("labels", "label", "y")
#: Prefix of explicit evaluation arrays in a ``.npz`` keyed by input names.
TEST_PREFIX = "test/"
#: Feed keys that are not model inputs (padding rows count).
VALID = "__valid__"


@dataclass(frozen=True)
class InputSpec:
    """One graph input: name, NumPy dtype, shape (ints fixed; str/None dynamic)."""

    name: str
    dtype: np.dtype
    shape: Tuple[object, ...]

    @property
    def is_float(self) -> bool:
        return np.issubdtype(self.dtype, np.floating)


def input_specs(model: onnx.ModelProto) -> List[InputSpec]:
    """The real inputs of ``model`` (graph inputs that are not initializers), in order."""
    from .graph.analysis import graph_inputs, value_shape

    specs = []
    for value in graph_inputs(model):
        tensor_type = value.type.tensor_type
        if tensor_type.HasField("shape") and not tensor_type.shape.dim:
            raise ModelError(f"model input {value.name!r} is a scalar (rank 0); admm-onnx feeds every input a batch of "
                             "samples, so it cannot train or evaluate this model",
                             hint="give the input a batch axis, or fold the scalar into the graph as a constant")
        elem = value.type.tensor_type.elem_type
        try:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem))
        except (KeyError, TypeError, ValueError):
            dtype = np.dtype(np.float32)
        specs.append(InputSpec(value.name, dtype, tuple(value_shape(value))))
    return specs


def _fit_shape(x: np.ndarray, shape: Sequence, name: str) -> np.ndarray:
    from .data import fit_to_input

    return fit_to_input(x, list(shape), name)


def fit_array(x, spec: InputSpec, where: str = "data") -> np.ndarray:
    """``x`` as model input ``spec`` takes it (dtype and shape); raises a one-line DataError."""
    x = np.asarray(x)
    if x.dtype.kind not in "biuf":
        raise DataError(f"{where}: inputs must be numeric arrays, got dtype {x.dtype} for {spec.name!r}")
    if spec.is_float:
        if x.dtype == np.uint8:
            x = x.astype(spec.dtype) / spec.dtype.type(255.0)
        else:
            x = x.astype(spec.dtype, copy=False)
        if not np.isfinite(x).all():
            raise DataError(f"{where}: input {spec.name!r} contains NaN or Inf")
    elif spec.dtype == np.bool_:
        if x.dtype != np.bool_ and x.size and not np.isin(x, (0, 1)).all():
            raise DataError(f"{where}: model input {spec.name!r} takes bool but the data holds values other "
                            f"than 0 and 1 ({x.dtype})")
        x = x.astype(np.bool_, copy=False)
    elif spec.dtype.kind in "OSU":
        raise DataError(f"{where}: model input {spec.name!r} takes strings; admm-onnx feeds numeric arrays only")
    elif np.issubdtype(spec.dtype, np.integer):
        if x.dtype.kind == "f":
            if not np.all(np.isfinite(x)) or np.any(np.mod(x, 1) != 0):
                raise DataError(
                    f"{where}: model input {spec.name!r} takes {spec.dtype} (e.g. token ids) but the data holds "
                    "non-integer values"
                )
        info = np.iinfo(spec.dtype)
        if x.size and (x.min() < info.min or x.max() > info.max):
            raise DataError(f"{where}: values of {spec.name!r} do not fit its type {spec.dtype}")
        x = x.astype(spec.dtype, copy=False)
    else:
        x = x.astype(spec.dtype, copy=False)
    return _fit_shape(x, spec.shape, spec.name)


def fit_inputs(arrays: Dict[str, np.ndarray], specs: Sequence[InputSpec], where: str = "data",
               forms: str = "", note_extra: bool = True) -> Dict[str, np.ndarray]:
    """Arrays keyed by input name, fitted to ``specs`` (see :func:`fit_array`); arrays that are no
    input are ignored (logged once when ``note_extra``).

    A single unnamed-looking array (one key that is no input name) feeds a single-input model."""
    names = [s.name for s in specs]
    if len(specs) == 1 and len(arrays) == 1 and names[0] not in arrays:
        arrays = {names[0]: next(iter(arrays.values()))}
    missing = [n for n in names if n not in arrays]
    if missing:
        raise DataError(
            f"{where}: no array for model input(s) {', '.join(missing)}; it has {', '.join(sorted(arrays)) or 'none'} "
            f"(the model takes {', '.join(names)}){forms}"
        )
    extra = sorted(set(arrays) - set(names))
    if extra and note_extra:
        log.warning("%s: arrays %s are not model inputs; ignored", where, ", ".join(extra))
    out = {s.name: fit_array(arrays[s.name], s, where) for s in specs}
    rows = {n: len(a) for n, a in out.items()}
    if len(set(rows.values())) > 1:
        raise DataError(f"{where}: inputs have different numbers of rows: {rows}")
    return out


def check_labels(labels: Optional[np.ndarray], rows: int, where: str) -> Optional[np.ndarray]:
    """Labels as given: integer class indices (any rank: per sample, token or pixel) become
    int64; float targets (regression) float32. One row per sample."""
    if labels is None:
        return None
    y = np.asarray(labels)
    if y.ndim == 0 or len(y) != rows:
        raise DataError(f"{where}: {rows} samples but {0 if y.ndim == 0 else len(y)} labels")
    if np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_:
        y = y.astype(np.int64)
    elif np.issubdtype(y.dtype, np.floating):
        if not np.isfinite(y).all():
            raise DataError(f"{where}: labels contain NaN or Inf")
        if y.ndim == 1 and np.all(np.mod(y, 1) == 0):
            y = y.astype(np.int64)  # class indices stored as floats
        else:
            y = y.astype(np.float32)
    else:
        raise DataError(f"{where}: labels must be numeric, got {y.dtype}")
    if y.dtype == np.int64 and y.size and np.any((y < 0) & (y != -100)):
        raise DataError(f"{where}: labels contain negative class indices (-100 alone marks ignored positions)")
    return y


@dataclass
class FeedDataset:
    """Training and evaluation arrays keyed by input name; labels optional (``None``)."""

    train: Dict[str, np.ndarray]
    test: Dict[str, np.ndarray]
    y_train: Optional[np.ndarray] = None
    y_test: Optional[np.ndarray] = None
    name: str = "data"

    def __post_init__(self):
        for split in ("train", "test"):
            arrays = getattr(self, split)
            if not arrays:
                raise DataError(f"{self.name}: no input arrays")
            rows = {len(a) for a in arrays.values()}
            if len(rows) > 1:
                raise DataError(f"{self.name}: {split} arrays have different numbers of rows")
            n = rows.pop()
            if n == 0:
                raise DataError(f"{self.name}: the {split} split is empty")
            setattr(self, f"y_{split}", check_labels(getattr(self, f"y_{split}"), n, f"{self.name} ({split})"))
        if (self.y_train is None) != (self.y_test is None):
            raise DataError(f"{self.name}: labels for one split only")

    @property
    def has_labels(self) -> bool:
        return self.y_train is not None

    @property
    def num_classes(self) -> Optional[int]:
        if self.y_train is None or self.y_train.dtype != np.int64:
            return None
        return int(max(self.y_train.max(), self.y_test.max())) + 1

    @classmethod
    def from_arrays(cls, arrays: Dict[str, np.ndarray], labels: Optional[np.ndarray] = None, name: str = "data",
                    test_fraction: float = 0.1, seed: int = 0) -> "FeedDataset":
        """One set of arrays split into training and evaluation (``test_fraction`` held out)."""
        n = {len(a) for a in arrays.values()}
        if len(n) != 1:
            rows = {k: len(a) for k, a in arrays.items()}
            raise DataError(f"{name}: arrays have different numbers of rows: {rows} (in a .npz keyed by input names "
                            "every array but test/ ones holds one row per sample, extra arrays included)")
        n = n.pop()
        if n == 0:
            raise DataError(f"{name}: no samples")
        labels = check_labels(labels, n, name)
        order = np.random.default_rng(seed).permutation(n)
        n_test = min(n - 1, max(1, int(round(n * test_fraction)))) if n > 1 else 0
        test, train = order[:n_test], order[n_test:]
        if n_test == 0:
            test = train  # one sample: evaluate on it
        take = lambda idx: {k: a[idx] for k, a in arrays.items()}  # noqa: E731
        return cls(take(train), take(test), None if labels is None else labels[train],
                   None if labels is None else labels[test], name=name)


def pick_labels_key(keys, labels_key: Optional[str], inputs: Sequence[str] = ()) -> Optional[str]:
    """The key holding labels: the one named (must exist), else the first of LABEL_KEYS present
    that is not a model input; None if there is none."""
    if labels_key is not None:
        if labels_key not in keys:
            raise DataError(f"no labels under {labels_key!r}; keys: {', '.join(sorted(keys)) or 'none'}")
        return labels_key
    for k in LABEL_KEYS:
        if k in keys and k not in inputs:
            return k
    return None


def load_feed_npz(arrays: Dict[str, np.ndarray], name: str, labels_key: Optional[str] = None,
                  inputs: Sequence[str] = ()) -> FeedDataset:
    """A FeedDataset from the arrays of a ``.npz`` keyed by input names (see module docstring);
    ``inputs``: the model's input names when known (an input named like a label key stays an input)."""
    test = {k[len(TEST_PREFIX):]: v for k, v in arrays.items() if k.startswith(TEST_PREFIX)}
    train = {k: v for k, v in arrays.items() if not k.startswith(TEST_PREFIX)}
    key = pick_labels_key(train, labels_key, inputs)
    y = train.pop(key) if key else None
    if not train:
        raise DataError(f"{name}: no input arrays (only labels)")
    if test:
        y_test = test.pop(key, None) if key else None
        if key and y_test is None:
            raise DataError(f"{name}: {TEST_PREFIX}{key} missing (the training arrays have labels)")
        if set(test) != set(train):
            raise DataError(f"{name}: evaluation arrays {sorted(test)} differ from training arrays {sorted(train)}")
        return FeedDataset(train, test, y, y_test, name=name)
    return FeedDataset.from_arrays(train, y, name=name)


def fit_dataset(data: FeedDataset, specs: Sequence[InputSpec]) -> FeedDataset:
    """``data`` with its inputs fitted to the model (:func:`fit_inputs`)."""
    forms = "; expected x_train and y_train (optionally x_test, y_test), x and y, or one array per model input " \
            "keyed by its name (plus labels)"
    return FeedDataset(fit_inputs(data.train, specs, data.name, forms),
                       fit_inputs(data.test, specs, data.name, forms, note_extra=False),
                       data.y_train, data.y_test, name=data.name)


def _concat(batches: List[np.ndarray], key: str, where: str) -> np.ndarray:
    shapes = {b.shape[1:] for b in batches}
    if len(shapes) > 1:
        raise DataError(
            f"{where}: batches of {key!r} have different shapes {sorted(shapes)[:3]}: pad every batch to one "
            "length (e.g. tokenizer(..., padding='max_length'))"
        )
    return np.concatenate(batches)


def drain(reader, labels_key: Optional[str] = None, inputs: Sequence[str] = (), where: str = "the data reader"):
    """Read every feed of ``reader`` (anything with ``get_next()``; ``rewind()`` called first if it
    has one) into one array per key: returns (arrays, labels or None). Scalars and 1-D feeds
    for models whose input has a batch axis are taken as given (one batch each)."""
    if hasattr(reader, "rewind"):
        reader.rewind()
    batches: Dict[str, List[np.ndarray]] = {}
    count = 0
    while True:
        feed = reader.get_next()
        if feed is None:
            break
        if not isinstance(feed, dict):
            raise DataError(f"{where}: get_next() must return a dict input name -> array (or None), "
                            f"got {type(feed).__name__}")
        valid = feed.get(VALID)
        for k, v in feed.items():
            if k == VALID:
                continue
            a = np.asarray(v)
            if a.ndim == 0:
                a = a[None]
            if valid is not None:
                a = a[: int(valid)]
            batches.setdefault(k, []).append(a)
        count += 1
    if not count:
        raise DataError(f"{where} yielded no feed")
    if len({len(v) for v in batches.values()}) > 1:
        raise DataError(f"{where}: some feeds lack some keys")
    arrays = {k: _concat(v, k, where) for k, v in batches.items()}
    key = LABELS if LABELS in arrays else pick_labels_key(arrays, labels_key, inputs)
    labels = arrays.pop(key) if key else None
    return arrays, labels


def reader_for(obj, specs: Sequence[InputSpec], batch_size: int = 64, seed: int = 0, train: bool = True,
               labels_key: Optional[str] = None, fixed_batch: Optional[int] = None):
    """A DataReader for ``obj`` (see the module docstring); None stays None. An admm-onnx reader
    is used as is, its feeds fitted to ``specs`` batch by batch unless it was built fitted."""
    if obj is None or getattr(obj, "fitted", False):
        return obj
    if isinstance(obj, DataReader):
        return FittedReader(obj, specs)
    if not callable(getattr(obj, "get_next", None)):
        raise DataError(f"a reader needs a get_next() method returning feed dicts; got {type(obj).__name__}")
    where = f"{type(obj).__name__} reader"
    if callable(getattr(obj, "rewind", None)) and batch_size > 1 and not fixed_batch:
        obj.rewind()
        first = obj.get_next()
        obj.rewind()
        rows = _rows(first)
        if rows is not None and rows > 1:  # batches already: stream them
            return FittedReader(obj, specs, labels_key)
    arrays, labels = drain(obj, labels_key, [s.name for s in specs], where)
    x = fit_inputs(arrays, specs, where)
    y = check_labels(labels, len(next(iter(x.values()))), where)
    if fixed_batch:
        batch_size = fixed_batch
    n = len(next(iter(x.values())))
    if train:
        reader = ArrayReader(x, y, min(batch_size, n), shuffle=True, seed=seed, drop_last=True)
    else:
        reader = ArrayReader(x, y, batch_size, pad_last=fixed_batch is not None)
    reader.fitted = True
    return reader


def _rows(feed) -> Optional[int]:
    if not isinstance(feed, dict):
        return None
    for k, v in feed.items():
        if k != VALID:
            a = np.asarray(v)
            return len(a) if a.ndim else None
    return None


def _feed_keys(feed: Dict[str, np.ndarray], names: Sequence[str]) -> Dict[str, str]:
    """Model input name -> feed key. A single-input model takes a feed's only input-like array
    under another name (as before multi-input feeds)."""
    if all(n in feed for n in names):
        return {n: n for n in names}
    rest = [k for k in feed if k not in (LABELS, VALID) and not k.startswith("admm_")]
    if len(names) == 1 and len(rest) == 1:
        return {names[0]: rest[0]}
    missing = [n for n in names if n not in feed]
    raise DataError(f"the feed has no {', '.join(missing)} (it has {', '.join(sorted(feed))})")


def model_feed(feed: Dict[str, np.ndarray], names: Sequence[str]) -> Dict[str, np.ndarray]:
    """The part of a feed a session with inputs ``names`` takes (labels, teacher outputs and the
    padding count left out)."""
    return {n: feed[k] for n, k in _feed_keys(feed, names).items()}


class FittedReader(WrappedReader):
    """A DataReader whose feeds are fitted to the model's inputs batch by batch (dtype and
    shape, :func:`fit_array`); labels (under ``labels_key`` or the first of LABEL_KEYS that is
    not an input) move to LABELS; other keys pass through. ``reader`` is the wrapped one."""

    def __init__(self, reader, specs: Sequence[InputSpec], labels_key: Optional[str] = None):
        super().__init__(reader)
        self.specs, self.labels_key = list(specs), labels_key

    def transform(self, feed):
        if not isinstance(feed, dict):
            raise DataError(f"{type(self.reader).__name__}.get_next() must return a dict input name -> array "
                            f"(or None), got {type(feed).__name__}")
        names = [s.name for s in self.specs]
        if LABELS not in feed:
            key = pick_labels_key(feed, self.labels_key, names) if (self.labels_key or not isinstance(
                self.reader, DataReader)) else None
            if key:
                feed = {**{k: v for k, v in feed.items() if k != key}, LABELS: feed[key]}
        keys = _feed_keys(feed, names)
        out = {k: v for k, v in feed.items() if k not in keys.values()}
        out.update({s.name: fit_array(feed[keys[s.name]], s, type(self.reader).__name__) for s in self.specs})
        return out
