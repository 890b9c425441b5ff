"""Data sets and readers.

Readers follow ONNX Runtime's ``CalibrationDataReader`` shape: ``get_next()`` returns a feed
dict (input name -> array) or ``None`` when the pass is over, and ``rewind()`` starts a new
pass. Training readers add the labels under :data:`LABELS`.

Data set specs understood by :func:`load_dataset` (and the CLI's ``-d``):

- ``digits``: the 8x8 handwritten digits bundled with scikit-learn (1,797 images; works
  offline right after ``pip install "admm-onnx[demo]"``). Split 80/20 with a fixed seed.
- ``mnist:DIR``: the four standard IDX ``.gz`` files (MNIST, Fashion-MNIST) in DIR.
- ``FILE.npz``: arrays ``x_train``, ``y_train`` and optionally ``x_test``, ``y_test``; or ``x``
  and ``y`` (then 10% is held out for evaluation, with a fixed seed); or, for any model, one
  array per model input keyed by the input's name plus optional labels under ``labels``/``y``
  (or a key the caller names), explicit evaluation arrays under ``test/NAME`` (see
  :mod:`admm_onnx.feeds`).

Every form keeps uint8 arrays as they are (other numbers become float32 in the ``x``/``y``
forms; arrays keyed by input names keep their dtype); readers fit every array to its model input
(admm_onnx/feeds.py): float inputs get float data (uint8 images scaled to [0, 1]), integer inputs
(token ids, uint8 ones included) stay integer.
"""
from __future__ import annotations

import gzip
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from .errors import DataError

log = logging.getLogger(__name__)

#: Name of the labels feed in training graphs.
LABELS = "admm_labels"


@dataclass
class Dataset:
    """Arrays for training and evaluation. ``x_*`` float32 (uint8 from a .npz: scaled when fitted
    to a float input), ``y_*`` int64 class indices."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    name: str = "data"

    def __post_init__(self):
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if len(x) == 0:
                raise DataError(f"{self.name}: the {split} split is empty")
            if len(x) != len(y):
                raise DataError(f"{self.name}: {len(x)} {split} inputs but {len(y)} labels")
            if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
                raise DataError(f"{self.name}: the {split} inputs contain NaN or Inf")
            if not np.issubdtype(y.dtype, np.integer):
                if np.issubdtype(y.dtype, np.floating) and np.isfinite(y).all() and np.all(np.mod(y, 1) == 0) \
                        and np.abs(y).max(initial=0) < 2**31:
                    setattr(self, f"y_{split}", y.astype(np.int64))
                else:
                    raise DataError(f"{self.name}: {split} labels must be integer class indices, got {y.dtype}"
                                    + (" with NaN, Inf, fractions or values above 2^31"
                                       if np.issubdtype(y.dtype, np.floating) else ""))
            elif y.size and (np.iinfo(y.dtype).max > 2**62 and int(y.max()) >= 2**31):
                raise DataError(f"{self.name}: {split} labels go up to {int(y.max())}: not class indices")
            if getattr(self, f"y_{split}").ndim != 1:
                raise DataError(f"{self.name}: {split} labels must be a 1-D array of class indices")
            if getattr(self, f"y_{split}").min() < 0:
                raise DataError(f"{self.name}: {split} labels contain negative class indices")

    @property
    def num_classes(self) -> int:
        return int(max(self.y_train.max(), self.y_test.max())) + 1


def _as_float(x: np.ndarray) -> np.ndarray:
    if x.dtype == np.uint8:
        return x.astype(np.float32) / np.float32(255.0)
    if np.issubdtype(x.dtype, np.complexfloating):
        raise DataError(f"inputs must be real numbers, got dtype {x.dtype}")
    if np.issubdtype(x.dtype, np.number):
        return x.astype(np.float32, copy=False)
    raise DataError(f"inputs must be numeric arrays, got dtype {x.dtype}")


def _split(x: np.ndarray, y: np.ndarray, fraction: float, seed: int = 0):
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = max(1, int(round(len(x) * fraction)))
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


def load_digits() -> Dataset:
    """scikit-learn's bundled 8x8 digits, scaled to [0, 1], shaped (N, 1, 8, 8)."""
    try:
        from sklearn.datasets import load_digits as _sk_digits
    except ImportError:
        raise DataError(
            "the embedded 'digits' data set needs scikit-learn",
            hint='pip install "admm-onnx[demo]"',
        ) from None
    bunch = _sk_digits()
    x = (bunch.images.astype(np.float32) / np.float32(16.0))[:, None, :, :]
    y = bunch.target.astype(np.int64)
    return Dataset(*_split(x, y, 0.2), name="digits")


def _read_idx(path: Path) -> np.ndarray:
    """An unsigned-byte IDX array. The header is read first and the declared size checked
    against the memory available before the body is inflated (a gzip bomb is refused)."""
    import zlib

    from .io import check_input_file, memory_budget

    path = check_input_file(path, "IDX", error=DataError)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            head = f.read(4)
            if len(head) < 4:
                raise DataError(f"not an IDX file (too short): {path}")
            zero, dtype_code, ndim = struct.unpack(">HBB", head)
            if zero != 0 or dtype_code != 0x08 or not 1 <= ndim <= 4:
                raise DataError(f"not an unsigned-byte IDX file: {path}", hint="expected the standard MNIST .gz files")
            raw_dims = f.read(4 * ndim)
            if len(raw_dims) < 4 * ndim:
                raise DataError(f"not an IDX file (too short): {path}")
            dims = struct.unpack(f">{ndim}I", raw_dims)
            size = 1
            for d in dims:
                size *= d
            if size == 0:
                raise DataError(f"IDX file {path} holds no data (header says {dims})")
            if size > memory_budget():
                raise DataError(f"IDX file {path} declares {dims}: {size / 2**30:.1f} GiB, more than the memory available")
            raw = f.read(size + 1)
    except DataError:
        raise
    except MemoryError:
        raise DataError(f"not enough memory to read {path}") from None
    except (OSError, EOFError, zlib.error, ValueError) as exc:
        raise DataError(f"cannot read IDX file {path}: {' '.join(str(exc).split())[:200]}",
                        hint="the file is truncated or damaged") from None
    if len(raw) != size:
        raise DataError(f"IDX file {path} is {'truncated' if len(raw) < size else 'longer than its header says'}: "
                        f"header says {dims}")
    return np.frombuffer(raw, dtype=np.uint8).reshape(dims)


def _find(directory: Path, stem: str) -> Path:
    names = (f"{stem}.gz", stem, stem.replace("-idx", ".idx") + ".gz", stem.replace("-idx", ".idx"))
    for name in names:
        if (directory / name).is_file():
            return directory / name
    for name in names:  # there, but no regular file (a FIFO, a folder): say so, never read it
        if os.path.lexists(directory / name):
            raise DataError(f"{directory / name} is not a regular file")
    raise DataError(f"{directory}: missing {stem}.gz (expected the four standard MNIST IDX files)")


#: The four files of an MNIST-style folder (each also read gzipped, ``.gz``).
IDX_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def load_idx_dir(directory) -> Dataset:
    """MNIST-style IDX files (train/t10k images and labels, gzipped or not) in ``directory``."""
    d = Path(directory)
    if not d.is_dir():
        raise DataError(f"data directory not found: {d}")
    x_tr, y_tr, x_te, y_te = (_read_idx(_find(d, stem)) for stem in IDX_STEMS)
    return Dataset(
        _as_float(x_tr)[:, None], y_tr.astype(np.int64), _as_float(x_te)[:, None], y_te.astype(np.int64), name=d.name
    )


def load_npz(path, labels_key: Optional[str] = None, inputs: Sequence[str] = ()):
    """Arrays from a ``.npz``: ``x_train``/``y_train`` (+ ``x_test``/``y_test``) or ``x``/``y``
    (a :class:`Dataset`); otherwise arrays keyed by input names (a
    :class:`~admm_onnx.feeds.FeedDataset`, labels optional under ``labels_key``). ``inputs``: the
    model's input names, when known: a file holding an array for each of them is read keyed by
    input names even if they are called x and y (and an input named like a label key is no label)."""
    from .io import read_npz

    p = Path(path)
    arrays = read_npz(p, "data")
    for key, value in arrays.items():
        if value.ndim == 0:
            raise DataError(f"{p}: array {key!r} is a single value; expected one entry per sample")
    for x_key, y_key in (("x", "y"), ("x_train", "y_train"), ("x_test", "y_test")):
        if x_key in arrays and y_key in arrays and len(arrays[x_key]) != len(arrays[y_key]):
            raise DataError(f"{p}: {len(arrays[x_key])} inputs in {x_key!r} but {len(arrays[y_key])} labels in {y_key!r}")
    keys = set(arrays)
    # x/y names that are the model's own inputs (a model taking x and y, or y_train...): read by input name
    by_input = bool(inputs) and set(inputs) <= keys and (
        bool(set(inputs) & {"y", "y_train", "x_test", "y_test"}) or (len(inputs) > 1 and bool(set(inputs) & {"x", "x_train"})))
    if by_input:
        from .feeds import load_feed_npz

        return load_feed_npz(arrays, p.stem, labels_key, inputs)
    if labels_key is None and {"x_train", "y_train"} <= keys:
        x_tr, y_tr = _numeric(arrays["x_train"]), arrays["y_train"]
        if {"x_test", "y_test"} <= keys:
            x_te, y_te = _numeric(arrays["x_test"]), arrays["y_test"]
        else:
            x_tr, y_tr, x_te, y_te = _split(x_tr, y_tr, 0.1)
    elif labels_key is None and {"x", "y"} <= keys and len(keys) == 2:
        x_tr, y_tr, x_te, y_te = _split(_numeric(arrays["x"]), arrays["y"], 0.1)
    elif not keys:
        raise DataError(
            f"{p} has no arrays; expected arrays keyed by model input names (plus labels), x_train and y_train "
            "(optionally x_test, y_test) or x and y"
        )
    else:
        from .feeds import load_feed_npz

        return load_feed_npz(arrays, p.stem, labels_key, inputs)
    return Dataset(x_tr, y_tr, x_te, y_te, name=p.stem)


def _numeric(x: np.ndarray) -> np.ndarray:
    """x/y-form inputs: uint8 kept (images are scaled, token ids not, once the model input's
    type is known: feeds.fit_array), other numbers as float32."""
    if x.dtype == np.uint8:
        return x
    return _as_float(x)


def dataset_paths(spec: str) -> List[Path]:
    """The files and folders a data spec reads (for output-path checks); [] for ``digits``."""
    if spec == "digits":
        return []
    folder = Path(spec[len("mnist:") :]) if spec.startswith("mnist:") else Path(spec)
    if spec.startswith("mnist:") or folder.is_dir():  # the IDX files it reads, whatever else the folder holds
        return [folder] + [folder / (stem + ext) for stem in IDX_STEMS for ext in ("", ".gz")]
    return [folder]


def load_dataset(spec: str, labels_key: Optional[str] = None, inputs: Sequence[str] = ()):
    """Load a data set from a spec string (see the module docstring): a :class:`Dataset`, or a
    :class:`~admm_onnx.feeds.FeedDataset` for a ``.npz`` keyed by input names."""
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if not isinstance(spec, str):
        raise DataError(f"the data spec must be a string or a path ('digits', 'mnist:DIR', FILE.npz), got "
                        f"{type(spec).__name__}")
    if spec == "digits":
        return load_digits()
    if spec.startswith("mnist:"):
        return load_idx_dir(spec[len("mnist:") :])
    if spec.lower().endswith(".npz"):
        return load_npz(spec, labels_key, inputs)
    if os.path.isdir(spec):
        return load_idx_dir(spec)
    raise DataError(f"unknown data spec {spec!r}; use 'digits', 'mnist:DIR' or FILE.npz")


class DataReader:
    """Base class: ``get_next()`` returns a feed dict or ``None``; ``rewind()`` restarts."""

    def get_next(self) -> Optional[Dict[str, np.ndarray]]:
        raise NotImplementedError

    def rewind(self) -> None:
        raise NotImplementedError

    def __iter__(self) -> Iterator[Dict[str, np.ndarray]]:
        self.rewind()
        while True:
            feed = self.get_next()
            if feed is None:
                return
            yield feed

    def __len__(self) -> int:  # number of batches per pass, when known
        raise TypeError(f"{type(self).__name__} has no known length")


class WrappedReader(DataReader):
    """A reader over another one (``self.reader``): rewinding, epochs and length pass through;
    each feed the wrapped reader yields goes through :meth:`transform` (``None`` ends a pass)."""

    def __init__(self, reader):
        self.reader = reader

    def rewind(self) -> None:
        self.reader.rewind()

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.reader, "set_epoch"):
            self.reader.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.reader)

    def get_next(self):
        feed = self.reader.get_next()
        if feed is None:
            return None
        return self.transform(feed)

    def transform(self, feed):
        raise NotImplementedError


class ArrayReader(DataReader):
    """Batches of in-memory arrays.

    Each pass visits every sample once; with ``shuffle`` the order is a fresh permutation per
    pass from a generator seeded with ``seed`` (so passes are reproducible). With ``drop_last``
    a final partial batch is skipped; with ``pad_last`` it is padded to ``batch_size`` by
    repeating its first row and the feed carries ``"__valid__"``: the number of real rows.

    ``x``: one array (fed as ``input_name``) or a dict input name -> array (several inputs,
    each in its own dtype), all with the same number of rows. ``y`` (labels) is optional.
    """

    def __init__(
        self,
        x: "np.ndarray | Dict[str, np.ndarray]",
        y: Optional[np.ndarray] = None,
        batch_size: int = 64,
        input_name: str = "input",
        label_name: str = LABELS,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        pad_last: bool = False,
    ):
        if batch_size < 1:
            raise DataError(f"batch size must be at least 1, got {batch_size}")
        self.arrays: Dict[str, np.ndarray] = dict(x) if isinstance(x, dict) else {input_name: x}
        rows = {len(a) for a in self.arrays.values()}
        if len(rows) != 1:
            raise DataError("input arrays have different numbers of rows" if rows else "no input arrays")
        if rows.pop() == 0:
            raise DataError("no samples to read")
        n = len(next(iter(self.arrays.values())))
        if y is not None and (np.ndim(y) == 0 or len(y) != n):
            raise DataError(f"{n} input rows but {'a single label' if np.ndim(y) == 0 else f'{len(y)} labels'}")
        self.x, self.y = x, y
        self._rows = len(next(iter(self.arrays.values())))
        self.batch_size, self.input_name, self.label_name = batch_size, input_name, label_name
        self.shuffle, self.drop_last, self.pad_last = shuffle, drop_last, pad_last
        self.seed = seed
        self._rng = np.random.default_rng(seed)
        self._order = np.arange(self._rows)
        self._pos = 0
        if drop_last and self._rows < batch_size:
            raise DataError(f"only {self._rows} samples, fewer than one batch of {batch_size}")
        self.rewind()

    def rewind(self) -> None:
        self._pos = 0
        if self.shuffle:
            self._order = self._rng.permutation(self._rows)

    def set_epoch(self, epoch: int) -> None:
        """Make the next passes' shuffles depend only on (seed, epoch): resumed runs match."""
        self._rng = np.random.default_rng([self.seed, epoch])

    def __len__(self) -> int:
        n = self._rows
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def get_next(self) -> Optional[Dict[str, np.ndarray]]:
        n = self._rows
        if self._pos >= n or (self.drop_last and self._pos + self.batch_size > n):
            return None
        idx = self._order[self._pos : self._pos + self.batch_size]
        self._pos += self.batch_size
        valid = len(idx)
        if self.pad_last and valid < self.batch_size:
            idx = np.concatenate([idx, np.full(self.batch_size - valid, idx[0])])
        feed = {name: a[idx] for name, a in self.arrays.items()}
        if self.y is not None:
            feed[self.label_name] = self.y[idx]
        if self.pad_last:
            feed["__valid__"] = np.int64(valid)
        return feed


def _split_arrays(data, split: str):
    if split not in ("train", "test"):
        raise DataError(f"split must be 'train' or 'test', got {split!r}")
    if not isinstance(data, Dataset):  # a FeedDataset: arrays keyed by input name
        return getattr(data, split), getattr(data, f"y_{split}")
    return getattr(data, f"x_{split}"), getattr(data, f"y_{split}")


class NpzReader(ArrayReader):
    """Batches from a ``.npz`` file (see :func:`load_npz`); ``split`` is "train" or "test".
    ``labels_key`` names the labels array of a ``.npz`` keyed by input names. The arrays are
    fitted to the model's inputs by :func:`admm_onnx.prune` (dtype, shape)."""

    def __init__(self, path, split: str = "train", batch_size: int = 64, labels_key: Optional[str] = None, **kwargs):
        super().__init__(*_split_arrays(load_npz(path, labels_key), split), batch_size=batch_size, **kwargs)


class IdxReader(ArrayReader):
    """Batches from an MNIST-style IDX directory; ``split`` is "train" or "test"."""

    def __init__(self, directory, split: str = "train", batch_size: int = 64, **kwargs):
        super().__init__(*_split_arrays(load_idx_dir(directory), split), batch_size=batch_size, **kwargs)


class IterableReader(DataReader):
    """Wrap any re-iterable of ``(inputs, labels)`` pairs (inputs: array or feed dict)."""

    def __init__(self, iterable: Iterable[Tuple[object, np.ndarray]], input_name: str = "input", label_name: str = LABELS):
        self.iterable, self.input_name, self.label_name = iterable, input_name, label_name
        self._it = None

    def rewind(self) -> None:
        self._it = iter(self.iterable)

    def get_next(self) -> Optional[Dict[str, np.ndarray]]:
        if self._it is None:
            self.rewind()
        try:
            inputs, labels = next(self._it)
        except StopIteration:
            return None
        feed = dict(inputs) if isinstance(inputs, dict) else {self.input_name: np.asarray(inputs)}
        feed[self.label_name] = np.asarray(labels)
        return feed


def fit_to_input(x: np.ndarray, shape: Sequence, name: str = "input") -> np.ndarray:
    """Reshape per-sample data to the model input's shape (batch axis first) when sizes agree.

    ``shape`` is the model input shape with ``None``/strings for symbolic dims. Raises a
    :class:`DataError` naming both shapes when the data cannot fit.
    """
    sample = list(shape[1:])
    if x.ndim > 1 and 0 in x.shape[1:]:
        raise DataError(f"data for model input {name!r} has samples of shape {tuple(x.shape[1:])}: an axis of length 0 "
                        "(e.g. empty sequences) holds no data to train or evaluate on")
    if all(isinstance(d, int) and d > 0 for d in sample):
        want = int(np.prod(sample)) if sample else 1
        have = int(np.prod(x.shape[1:])) if x.ndim > 1 else 1
        if have != want:
            raise DataError(
                f"data samples have shape {tuple(x.shape[1:])} ({have} values) but model input "
                f"{name!r} takes {tuple(shape[1:])} ({want} values)"
            )
        return x.reshape((x.shape[0], *sample))
    if x.ndim != len(shape):
        raise DataError(f"data has {x.ndim} dimensions but model input {name!r} has {len(shape)}: {list(shape)}")
    for got, want in zip(x.shape[1:], shape[1:]):
        if isinstance(want, int) and want > 0 and got != want:
            raise DataError(f"data samples have shape {tuple(x.shape[1:])}, model input {name!r} wants {list(shape)}")
    return x
