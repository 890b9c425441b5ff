"""Every file admm-onnx reads or writes goes through here: the safety rules in one place.

Reading a model -- :func:`load_model` (used by every command):

- the model must be a regular, readable, non-empty file (never a FIFO or device: no hangs);
- before any external data is read, every tensor stored outside the model is checked
  (:func:`external_data_files`): its ``location`` must resolve (``realpath``, so symlinks are
  followed) to a regular file *inside the model's folder*, and its declared ``offset`` and
  ``length`` must fit that file and match the tensor's dtype and shape; tensors over 2 GB are
  refused. ONNX Runtime sessions opened on a model path are safe once this passed.
- every way a model file can be wrong becomes one :class:`~admm_onnx.errors.ModelError` line.

Deciding outputs -- :class:`OutputPlan` (one per command run, checked before any work)::

    plan = OutputPlan()
    plan.add_model_input(model_path)          # the model and its external data files
    plan.add_input(data_path, config_path)    # any other file the run reads (None is skipped)
    out = plan.add_output(out_path, "-o", model=True, external=False)  # claims OUT and OUT.data
    rep = plan.add_output(report_path, "--report")                      # None is skipped
    plan.add_workdir(work_path)               # outputs and inputs may not live in it

Each ``add_*`` call checks at once and raises :class:`~admm_onnx.errors.OutputError`: an output
must be a regular file or not exist yet (never a directory, device, FIFO or socket), its folder
must exist and be writable, and it may not be any input of the run (compared by ``realpath`` and
inode), another output, or inside the work directory. A model output also claims ``OUT.data``:
it may not be an input, and a user's existing ``OUT.data`` is never deleted, nor overwritten
unless the existing ``OUT`` is the model that uses it.

Writing -- :func:`atomic_path` / :func:`write_text` / :func:`save_model`: everything is written
to a temporary name in the target folder and renamed into place when complete, so a failure
never leaves a half-written output, and the temporary file is removed on every exit path.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import stat
import sys
import tempfile
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Set, Tuple, Union

import numpy as np
import onnx
from google.protobuf.message import DecodeError

from .errors import ModelError, OutputError
from .interrupts import deferred

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

def _umask_file_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_FILE_MODE = _umask_file_mode()

#: protobuf refuses to serialise a message of 2 GiB or more.
PROTOBUF_LIMIT = 2**31 - 1


def uses_external_data(model: onnx.ModelProto) -> bool:
    """True if any initializer of the main graph is stored outside the model file."""
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def check_input_file(path: PathLike, what: str = "input", error=ModelError) -> Path:
    """``path`` exists, is (or links to) a regular readable file: raise ``error`` otherwise."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        shown = repr(str(path)) if str(path) != str(path).strip() else str(path)  # a stray space shows
        raise error(f"{what} file not found: {shown}") from None
    except OSError as exc:
        raise error(f"cannot access {what} file {path}: {exc.strerror}") from None
    if stat.S_ISDIR(st.st_mode) and error is ModelError:
        raise error(f"{what} path is a directory, not an ONNX file: {path}")
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{what} path {path} is {_kind(st.st_mode)}; only regular files are read")
    if not os.access(path, os.R_OK):
        raise error(f"{what} file is not readable: {path}")
    return path


def memory_budget() -> int:
    """Bytes an input may decompress to: three quarters of the memory available now (a
    compressed archive declaring more is refused before anything is inflated)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 * 3 // 4
    except (OSError, ValueError, IndexError):
        pass
    return 8 * 2**30


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def _npy_header(fp, version):
    """(shape, fortran_order, dtype) of a .npy stream positioned after its magic."""
    fmt = np.lib.format
    if version == (1, 0):
        return fmt.read_array_header_1_0(fp, max_header_size=10000)
    if version == (2, 0):
        return fmt.read_array_header_2_0(fp, max_header_size=10000)
    impl = getattr(fmt, "_read_array_header", None)
    if impl is None:
        from numpy.lib import _format_impl as impl_mod  # numpy >= 2

        impl = impl_mod._read_array_header
    return impl(fp, version, max_header_size=10000)


def read_npz(path: PathLike, what: str = "data") -> Dict[str, np.ndarray]:
    """The arrays of a NumPy ``.npz`` archive, read safely, or a :class:`DataError`.

    A regular file only; never pickles (``allow_pickle=False``); every member's header is read
    first and the archive refused if a member is not a ``.npy`` array, holds objects, declares
    a size its compressed data cannot hold, or more than :func:`memory_budget` in total
    (a zip bomb fails here, before anything is inflated)."""
    import zipfile
    import zlib

    from .errors import DataError

    path = check_input_file(path, what, error=DataError)
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(b"\x93NUMPY"):
        raise DataError(f"{path} is a single .npy array, not an .npz archive",
                        hint="save the arrays with numpy.savez(path, x_train=..., y_train=...)")
    if not head.startswith(b"PK"):
        raise DataError(f"{path} is not a NumPy .npz archive (no zip header)",
                        hint="save the arrays with numpy.savez(path, x_train=..., y_train=...)")
    fmt = np.lib.format
    arrays: Dict[str, np.ndarray] = {}
    try:
        with zipfile.ZipFile(path) as zf:
            members = zf.infolist()
            if len(members) > 1000:
                raise DataError(f"{path} holds {len(members)} members; a data archive holds a few arrays")
            total = 0
            budget = memory_budget()
            for info in members:
                if not info.filename.endswith(".npy") or info.is_dir():
                    raise DataError(f"{path}: member {info.filename!r} is not a .npy array")
                with zf.open(info) as member:
                    version = fmt.read_magic(member)
                    if version not in ((1, 0), (2, 0), (3, 0)):
                        raise DataError(f"{path}: member {info.filename!r} has an unknown .npy version {version}")
                    shape, _fortran, dtype = _npy_header(member, version)
                if dtype.hasobject:
                    raise DataError(f"{path}: array {info.filename[:-4]!r} holds Python objects; only numeric arrays are read",
                                    hint="numeric arrays only: objects would need pickle, which admm-onnx never loads")
                count = 1
                for d in shape:
                    count *= int(d)
                nbytes = count * dtype.itemsize
                if nbytes > info.file_size:
                    raise DataError(f"{path}: array {info.filename[:-4]!r} declares shape {shape} ({_gib(nbytes)}) "
                                    f"but holds only {info.file_size} bytes", hint="the file is truncated or damaged")
                total += nbytes
                if total > budget:
                    raise DataError(f"{path} would take {_gib(total)} or more in memory; {_gib(budget)} is available",
                                    hint="use a smaller data set or free memory")
            with np.load(path, allow_pickle=False) as z:
                for name in z.files:
                    arrays[name] = z[name]
    except DataError:
        raise
    except MemoryError:
        raise DataError(f"not enough memory to read {path}") from None
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error, NotImplementedError,
            RuntimeError, SyntaxError, TypeError, OverflowError) as exc:
        text = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise DataError(f"cannot read {path} as a NumPy .npz file: {text}", hint="the file is truncated or damaged") from None
    return arrays


def read_gzip_or_file(path: PathLike, limit: int, what: str = "data") -> bytes:
    """The bytes of ``path`` (inflated if it ends in ``.gz``), at most ``limit`` + 1 of them
    (the caller checks the size it expected). OS, gzip and zlib errors become :class:`DataError`."""
    import gzip
    import zlib

    from .errors import DataError

    path = check_input_file(path, what, error=DataError)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            return f.read(limit + 1)
    except MemoryError:
        raise DataError(f"not enough memory to read {path}") from None
    except (OSError, EOFError, zlib.error, ValueError) as exc:
        text = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise DataError(f"cannot read {path}: {text}", hint="the file is truncated or damaged") from None


# -- reading models -----------------------------------------------------------------------
def _all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto of the model: initializers, sparse ones, attributes, subgraphs, functions."""

    def graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
        yield from graph.initializer
        for sparse in graph.sparse_initializer:
            yield sparse.values
            yield sparse.indices
        yield from node_tensors(graph.node)

    def node_tensors(nodes) -> Iterator[onnx.TensorProto]:
        for node in nodes:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
                if attr.HasField("g"):
                    yield from graph_tensors(attr.g)
                for g in attr.graphs:
                    yield from graph_tensors(g)

    yield from graph_tensors(model.graph)
    for function in model.functions:
        yield from node_tensors(function.node)


def check_in_memory(model: onnx.ModelProto) -> None:
    """A ``ModelProto`` handed to the API must hold its weights: a tensor still pointing at an
    external file would be read by ONNX Runtime relative to the working folder, from any path
    it names (a file is only checked against its own folder when the model is read from disk)."""
    for tensor in _all_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            raise ModelError(
                f"the model's tensor {tensor.name!r} keeps its data in an external file",
                hint="pass the model's path instead, or onnx.load(path) it (which reads the data in)")


def _tensor_nbytes(tensor: onnx.TensorProto) -> Optional[int]:
    """Bytes the raw data of ``tensor`` must hold, or None if the dtype has no fixed size."""
    count = 1
    for d in tensor.dims:
        count *= int(d)
    dt = tensor.data_type
    four_bit = {getattr(onnx.TensorProto, n) for n in ("INT4", "UINT4") if hasattr(onnx.TensorProto, n)}
    if dt in four_bit:
        return (count + 1) // 2
    if dt in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return None
    try:
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(dt)).itemsize
    except Exception:  # unknown / newer dtype: size not checked
        return None
    return count * itemsize


def _inside(path: str, folder: str) -> bool:
    return os.path.commonpath([path, folder]) == folder


def external_data_files(model: onnx.ModelProto, model_path: PathLike) -> List[Path]:
    """Check every external-data reference of ``model`` (loaded from ``model_path``) and return
    the resolved data files. Nothing is read: only ``stat``. Raises :class:`ModelError`."""
    model_path = Path(model_path)
    base = os.path.dirname(os.path.abspath(model_path))
    real_base = os.path.realpath(base)
    sizes: Dict[str, int] = {}
    for tensor in _all_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        name = tensor.name or "<unnamed>"
        location = info.get("location", "")
        where = f"{model_path}: tensor {name!r} stores its data in {location!r}"
        if not location or os.path.isabs(location) or "\x00" in location:
            raise ModelError(f"{where}; external data must be a relative path inside the model's folder")
        real = os.path.realpath(os.path.join(base, location))
        if not _inside(real, real_base):
            raise ModelError(
                f"{where}, which resolves outside the model's folder ({real})",
                hint="external data must be a file inside the folder of the model; refusing to read it",
            )
        if real not in sizes:
            try:
                st = os.stat(real)
            except OSError:
                raise ModelError(f"{where}, which does not exist", hint="copy the .data file beside the model") from None
            if not stat.S_ISREG(st.st_mode):
                raise ModelError(f"{where}, which is {_kind(st.st_mode)}; external data must be a regular file")
            sizes[real] = st.st_size
        try:
            offset = int(info.get("offset", 0) or 0)
            length = int(info["length"]) if info.get("length") not in (None, "") else None
        except ValueError:
            raise ModelError(f"{where} with a non-numeric offset or length") from None
        size = sizes[real]
        needed = _tensor_nbytes(tensor)
        if offset < 0 or (length is not None and length < 0):
            raise ModelError(f"{where} at a negative offset or length")
        if needed is not None and needed > PROTOBUF_LIMIT:
            raise ModelError(
                f"{model_path}: tensor {name!r} holds {needed / 2**30:.1f} GiB; tensors over 2 GiB are not supported",
            )
        end = offset + (length if length is not None else max(size - offset, 0))
        if offset > size or end > size:
            raise ModelError(
                f"{where} at bytes {offset}..{end}, but the file has only {size} bytes",
                hint="the .data file is truncated or belongs to another model",
            )
        have = end - offset
        if needed is not None and have != needed:
            raise ModelError(
                f"{where}: {have} bytes declared, but a {onnx.TensorProto.DataType.Name(tensor.data_type)} tensor of shape "
                f"{list(tensor.dims)} needs {needed}",
                hint="the .data file does not match the model",
            )
    return [Path(p) for p in sizes]


def _parse(path: Path) -> onnx.ModelProto:
    if path.stat().st_size == 0:
        raise ModelError(f"model file is empty: {path}")
    if path.stat().st_size > PROTOBUF_LIMIT:
        raise ModelError(
            f"model file {path} is over 2 GiB; ONNX files must keep large weights in external data",
        )
    try:
        model = onnx.load(str(path), load_external_data=False)
    except DecodeError as exc:
        raise ModelError(f"not an ONNX model (protobuf decode failed): {path}") from exc
    except MemoryError:
        raise ModelError(f"not enough memory to read {path}") from None
    except Exception as exc:  # onnx raises assorted errors on garbage input
        raise ModelError(f"cannot read ONNX model {path}: {' '.join(str(exc).split())[:200]}") from exc
    if not model.HasField("graph") or (not model.graph.node and not model.graph.output):
        raise ModelError(f"not an ONNX model (no graph found): {path}")
    if model.ir_version < 3:
        raise ModelError(
            f"{path} declares IR version {model.ir_version}; ONNX files from ONNX 1.0 on have IR >= 3",
            hint="re-export the model with a current exporter",
        )
    check_tensors(model, path)
    return model


_TYPED_FIELDS = ("float_data", "int32_data", "int64_data", "double_data", "uint64_data")


def check_tensors(model: onnx.ModelProto, path: PathLike = "the model") -> None:
    """Every tensor stored in the model: known dtype, non-negative dims, at most 2 GiB, and
    exactly as many bytes (or values) as its shape needs; no two initializers of the main graph
    with one name. Raises :class:`ModelError`."""
    seen = set()
    for t in model.graph.initializer:
        if t.name in seen:
            raise ModelError(f"{path}: two initializers are named {t.name!r}; ONNX names each value once",
                             hint="the model file is damaged, or its exporter wrote it twice")
        seen.add(t.name)
    for tensor in _all_tensors(model):
        name = tensor.name or "<unnamed>"
        if any(int(d) < 0 for d in tensor.dims):
            raise ModelError(f"{path}: tensor {name!r} has a negative dimension {list(tensor.dims)}")
        count = 1
        for d in tensor.dims:
            count *= int(d)
        if count > 2**40:
            raise ModelError(f"{path}: tensor {name!r} declares {count:,} elements {list(tensor.dims)}; the file is damaged")
        if tensor.data_type == onnx.TensorProto.UNDEFINED:
            raise ModelError(f"{path}: tensor {name!r} has no data type")
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            continue  # checked by external_data_files
        needed = _tensor_nbytes(tensor)
        if needed is not None and needed > PROTOBUF_LIMIT:
            raise ModelError(f"{path}: tensor {name!r} holds {needed / 2**30:.1f} GiB; tensors over 2 GiB are not supported")
        if tensor.HasField("raw_data"):
            if needed is not None and len(tensor.raw_data) != needed:
                raise ModelError(
                    f"{path}: tensor {name!r} stores {len(tensor.raw_data)} bytes, but a "
                    f"{onnx.TensorProto.DataType.Name(tensor.data_type)} tensor of shape {list(tensor.dims)} needs {needed}",
                    hint="the model file is damaged",
                )
            continue
        stored = sum(len(getattr(tensor, f)) for f in _TYPED_FIELDS)
        if stored and tensor.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.INT64,
                                           onnx.TensorProto.INT32, onnx.TensorProto.UINT64) and stored != count:
            raise ModelError(
                f"{path}: tensor {name!r} stores {stored} values, but its shape {list(tensor.dims)} needs {count}",
                hint="the model file is damaged",
            )


def load_model(path: PathLike, load_external_data: bool = True) -> onnx.ModelProto:
    """Load an ONNX model from ``path`` or raise a :class:`ModelError` saying what is wrong.

    External-data references are always checked (see :func:`external_data_files`), also when
    ``load_external_data=False``, so a path handed to ONNX Runtime afterwards is safe too."""
    path = check_input_file(path, "model")
    model = _parse(path)
    check_window_attributes(model.graph)
    files = external_data_files(model, path)
    if load_external_data and files:
        try:
            onnx.external_data_helper.load_external_data_for_model(model, os.path.dirname(os.path.abspath(path)))
        except MemoryError:
            raise ModelError(f"not enough memory to load the external data of {path}") from None
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot load the external data of {path}: {exc}") from exc
    return model


#: Ops with a sliding window: strides, dilations and kernel sizes must be positive, pads not
#: negative nor absurd (onnx's shape inference divides by them; a 0 stride kills the process).
_WINDOW_OPS = {"Conv", "ConvTranspose", "ConvInteger", "QLinearConv", "MaxPool", "AveragePool", "LpPool",
               "MaxUnpool", "DeformConv"}
MAX_PAD = 1 << 16


def check_window_attributes(graph: onnx.GraphProto) -> None:
    """Refuse, as a :class:`ModelError`, a windowed node whose attributes no runtime can run
    (strides, dilations or kernel sizes below 1, a group below 1, negative or huge pads),
    in the graph and its subgraphs."""
    for node in graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                check_window_attributes(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    check_window_attributes(g)
        if node.op_type not in _WINDOW_OPS or node.domain not in ("", "ai.onnx"):
            continue
        attrs = {a.name: (list(a.ints) if a.type == onnx.AttributeProto.INTS else a.i) for a in node.attribute
                 if a.type in (onnx.AttributeProto.INTS, onnx.AttributeProto.INT)}
        where = f"{node.op_type} node {node.name or (node.output[0] if node.output else '?')!r}"
        for key in ("strides", "dilations", "kernel_shape"):
            if key in attrs and any(v < 1 for v in attrs[key]):
                raise ModelError(f"{where} has {key} {attrs[key]}: every value must be at least 1")
        if "group" in attrs and attrs["group"] < 1:
            raise ModelError(f"{where} has group {attrs['group']}: it must be at least 1")
        for key in ("pads", "output_padding"):
            if key in attrs and any(v < 0 or v > MAX_PAD for v in attrs[key]):
                raise ModelError(f"{where} has {key} {attrs[key]}: each must be in 0..{MAX_PAD}")


#: Files up to this size without an .onnx suffix are read to see whether they are a model.
_SNIFF_BYTES = 64 << 20


def check_onnx_path(path: PathLike, option: str) -> None:
    """A path ONNX and ONNX Runtime (C++, UTF-8 strings) can take: its bytes are UTF-8, and this
    Python can pass them as such (not with an ASCII locale, where names are escaped)."""
    text = os.fspath(path)
    try:
        text.encode("utf-8")
        return
    except UnicodeEncodeError:
        pass
    try:
        os.fsencode(text).decode("utf-8")
    except UnicodeDecodeError:
        raise OutputError(f"{option}: the path {text!r} is not valid UTF-8",
                          hint="ONNX and ONNX Runtime take UTF-8 paths; choose another name") from None
    raise OutputError(f"{option}: the path {os.fsencode(text).decode('utf-8')!r} is UTF-8, but this Python reads file names as "
                      f"{sys.getfilesystemencoding()} (the locale), so it cannot hand it to ONNX Runtime",
                      hint="run with PYTHONUTF8=1 or a UTF-8 locale (LC_ALL=C.UTF-8)")


def looks_like_model(path: PathLike) -> bool:
    """True for a regular file named ``*.onnx``, or a smaller one that starts as a serialized
    ModelProto does (field 1, ``ir_version``: byte 0x08), e.g. ``model.bin``."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            return False
        if str(path).lower().endswith(".onnx"):
            return True
        if st.st_size > _SNIFF_BYTES:
            return False
        with open(path, "rb") as f:
            return f.read(1) == b"\x08"
    except OSError:
        return False


def model_files(path: PathLike) -> List[Path]:
    """The files a model occupies: ``path`` and its (checked) external data files.

    A model that cannot be read yields just ``[path]``: :func:`load_model` reports why."""
    path = Path(path)
    try:
        return [path] + external_data_files(_parse(check_input_file(path, "model")), path)
    except ModelError:
        return [path]


# -- deciding outputs ---------------------------------------------------------------------
def _real(path: PathLike) -> str:
    return os.path.realpath(os.path.abspath(path))


def _same(a: PathLike, b: PathLike) -> bool:
    if _real(a) == _real(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _references(model_path: Path, data_path: Path) -> bool:
    """True if the existing model ``model_path`` keeps its external data in ``data_path``."""
    try:
        model = onnx.load(str(model_path), load_external_data=False)
        return any(_same(f, data_path) for f in external_data_files(model, model_path))
    except Exception:
        return False


def _check_parent(path: Path, option: str, denied: str) -> None:
    """The folder ``path`` goes in exists and this process may write there (``denied``: what to
    say when it may not)."""
    if not path.parent.is_dir():
        raise OutputError(f"{option}: the folder {path.parent} does not exist", hint="create it first")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise OutputError(f"{option}: {denied}")


class OutputPlan:
    """Every input and output of one run, checked against each other before any work is done.

    See the module docstring for the rules and an example."""

    def __init__(self):
        self.inputs: List[Tuple[Path, str]] = []
        self.outputs: List[Tuple[Path, str]] = []
        self.workdir: Optional[Path] = None
        #: Outputs that did not exist when they were planned: the run's own if they exist later.
        self.new: List[Path] = []
        #: Outputs that existed, kept aside while the run replaces them (keep_previous).
        self._kept: List[Path] = []

    # inputs ----------------------------------------------------------------------------
    def add_input(self, *paths: Optional[PathLike], what: str = "an input") -> None:
        """Register files (or folders: every file under them counts) the run reads; a file that
        is an ONNX model (whatever its name) counts with its external data."""
        for p in paths:
            if p is None or str(p) == "":
                continue
            p = Path(p)
            self.inputs.append((p, what))
            if p.is_dir():
                with contextlib.suppress(OSError):
                    for child in sorted(p.iterdir())[:1000]:
                        self.inputs.append((child, what))
            elif looks_like_model(p):
                for data in model_files(p)[1:]:
                    self.inputs.append((data, f"the external data of the model {p.name}"))

    def add_model_input(self, path: Optional[PathLike]) -> None:
        """Register a model file and its external data files."""
        if path is None:
            return
        files = model_files(path)
        self.inputs.append((files[0], "the input model"))
        self.inputs.extend((f, "the input model's external data") for f in files[1:])

    def _clash(self, path: Path) -> Optional[str]:
        for other, what in self.inputs:
            if _same(path, other):
                return what
        for other, what in self.outputs:
            if _same(path, other):
                return f"also the {what} output"
        return None

    # outputs ---------------------------------------------------------------------------
    def add_output(
        self, path: Optional[PathLike], option: str = "-o", model: bool = False, external: Optional[bool] = None
    ) -> Optional[Path]:
        """Check and claim an output path (None: nothing to do). ``model=True`` also claims
        ``OUT.data``; ``external=True`` says the model will be written with external data."""
        if path is None:
            return None
        out = Path(path)
        if str(path) == "" or out.name in ("", ".", ".."):
            raise OutputError(f"{option}: {str(path)!r} is not a file name")
        if model:
            check_onnx_path(out, option)
        _check_parent(out, option, f"cannot write in {out.parent} (permission denied)")
        try:
            st = os.stat(out)
        except FileNotFoundError:
            st = None
        except OSError as exc:
            raise OutputError(f"{option}: cannot use {out}: {exc.strerror}") from None
        if st is not None and not stat.S_ISREG(st.st_mode):
            raise OutputError(f"{option}: {out} is {_kind(st.st_mode)}; outputs are only written as regular files")
        if st is not None and not st.st_mode & 0o222:
            raise OutputError(f"{option}: {out} is read-only; refusing to replace it",
                              hint="make it writable (chmod u+w) or choose another path")
        clash = self._clash(out)
        if clash:
            raise OutputError(f"{option}: {out} is {clash} of this run", hint=f"choose another {option} path")
        if self.workdir is not None and _inside(_real(out), _real(self.workdir)):
            raise OutputError(f"{option}: {out} is inside the work directory {self.workdir}")
        if model:
            self._check_companion(out, option, external)
        self.outputs.append((out, option))
        if st is None:
            self.new.append(out)
        return out

    def keep_previous(self) -> None:
        """The planned outputs that exist now are kept aside (a hidden hard link beside each,
        made when this process first replaces it) until :meth:`commit`; :meth:`remove_created`
        puts them back. So an unfinished run leaves the earlier set of outputs as it was, not
        some replaced and some not. Call :meth:`commit` or :meth:`remove_created` on every exit."""
        for path, _ in self.outputs:
            if path not in self.new and (_regular(path) or path.is_symlink()):  # a link comes back as a link
                _PREVIOUS.setdefault(os.path.abspath(path), None)
                self._kept.append(path)

    def commit(self) -> None:
        """The run is complete: the earlier outputs kept aside go."""
        for path in self._kept:
            backup = _PREVIOUS.pop(os.path.abspath(path), None)
            if backup is not None:
                with contextlib.suppress(OSError):
                    os.unlink(backup)
        self._kept = []

    def remove_created(self) -> List[Path]:
        """Delete the planned outputs that did not exist when planned and that this process
        wrote since (what an unfinished run wrote: no half set of outputs is left; a file another
        program put there meanwhile stays), and put back the earlier outputs kept aside
        (:meth:`keep_previous`); returns the paths deleted or put back."""
        gone = []
        with deferred():
            for path in self.new:
                ident = _identity(path)
                if ident is None or ident not in _WRITTEN:
                    continue
                with contextlib.suppress(OSError):
                    os.unlink(path)
                    _WRITTEN.discard(ident)
                    gone.append(path)
            for path in self._kept:
                backup = _PREVIOUS.pop(os.path.abspath(path), None)
                if backup is None:
                    continue  # not replaced by this run
                ident = _identity(path)
                with contextlib.suppress(OSError):
                    if ident is not None and ident in _WRITTEN:  # still this run's file: the earlier one back
                        os.replace(backup, path)
                        _WRITTEN.discard(ident)
                        gone.append(path)
                    else:  # another program wrote there since: its file stays
                        log.warning("%s was replaced by another program during the run; left as it is", path)
                        os.unlink(backup)
            self._kept = []
        return gone

    def _check_companion(self, out: Path, option: str, external: Optional[bool]) -> None:
        data = out.parent / (out.name + ".data")
        clash = self._clash(data)
        if clash:
            raise OutputError(
                f"{option}: the model would keep its weights in {data}, which is {clash} of this run",
                hint=f"choose another {option} path",
            )
        self.outputs.append((data, f"{option} external data"))
        try:
            st = os.stat(data)
        except FileNotFoundError:
            self.new.append(data)
            return
        except OSError:
            return
        if not stat.S_ISREG(st.st_mode):
            raise OutputError(f"{option}: {data} (where the model's weights would go) is {_kind(st.st_mode)}")
        if external and not st.st_mode & 0o222:
            raise OutputError(f"{option}: {data} (where the model's weights would go) is read-only; refusing to "
                              "replace it", hint="make it writable (chmod u+w) or choose another path")
        if external and not _references(out, data):
            raise OutputError(
                f"{option}: {data} exists and is not the external data of {out}; refusing to overwrite it",
                hint="move it away or choose another output name",
            )

    def add_workdir(self, path: Optional[PathLike], option: str = "--workdir") -> Optional[Path]:
        """Check the work directory: not an input, no input or output inside it, parent writable."""
        if path is None:
            return None
        work = Path(path)
        check_onnx_path(Path(os.path.abspath(work)), option)
        if not work.is_dir():
            _check_parent(work, option, f"cannot create {work} (no write permission in {work.parent})")
        if work.is_symlink():
            raise OutputError(f"{option}: {work} is a symbolic link; give the folder itself (a link could lead the "
                              "tool's writes elsewhere)")
        if work.exists() and not work.is_dir():
            raise OutputError(f"{option}: {work} exists and is not a directory")
        if work.is_dir() and not os.access(work, os.W_OK | os.X_OK):
            raise OutputError(f"{option}: cannot write in {work} (permission denied)")
        real = _real(work)
        for other, what in self.inputs + self.outputs:
            if _inside(_real(other), real):
                kind = what if (other, what) in self.inputs else f"the {what} output"
                raise OutputError(f"{option}: {work} contains {kind} ({other})", hint="use a separate folder")
        self.workdir = work
        return work


#: In a folder :func:`claim_output_folder` created or wrote into: the files named there are the
#: tool's to replace (a user's file of the same name in a folder without it is not).
FOLDER_MARK = ".admm-onnx-output"


def _previous(name: str) -> str:
    """Where :func:`claim_output_folder` keeps an earlier run's file while a run writes."""
    return f".{name}.admm-previous"


@contextlib.contextmanager
def claim_output_folder(folder: PathLike, names: Iterable[str], option: str = "-o",
                        final: bool = False) -> Iterator[Path]:
    """An output folder a command writes the files ``names`` into: created if missing (its
    parent must exist), or an existing folder whose files are all among ``names`` (a folder
    with other files is refused). The folder is locked while the block runs (a second run on it
    is refused). On failure, the files written and a folder created are removed. ``final``: the
    block's end is the command's (a signal while the earlier files' backups go is dropped)."""
    folder = Path(folder)
    names = tuple(names)
    created = False
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise OutputError(f"{option}: {folder} exists and is not a folder")
    if not folder.exists():
        _check_parent(folder, option, f"cannot create {folder} (no write permission in {folder.parent})")
        try:
            folder.mkdir()
        except OSError as exc:
            raise _disk_error(exc, folder) from None
        created = True
    lock = _lock_folder(folder, option)
    if lock is None:
        if created:
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise OutputError(f"{option}: another admm-onnx run is writing into {folder}",
                          hint="wait for it to finish, or choose another folder")
    with _releasing(lock):
        yield from _claimed(folder, names, option, created, final)


@contextlib.contextmanager
def _releasing(lock):
    try:
        yield
    finally:
        if lock is not False:
            os.close(lock)  # releases the lock


def _claimed(folder: Path, names: Tuple[str, ...], option: str, created: bool, final: bool) -> Iterator[Path]:
    """The body of :func:`claim_output_folder`, with the folder locked."""
    try:
        for name in names:  # a run killed outright (SIGKILL, power loss) left an earlier file aside
            backup = folder / _previous(name)
            if _regular(folder / FOLDER_MARK) and _regular(backup):
                with contextlib.suppress(OSError):
                    os.replace(backup, folder / name)
                    log.info("put back %s, set aside by a run that did not finish", folder / name)
        try:
            foreign = sorted(n for n in os.listdir(folder) if n not in names and n != FOLDER_MARK)
        except OSError as exc:
            raise OutputError(f"{option}: cannot read {folder}: {exc.strerror}") from None
        if foreign:
            raise OutputError(
                f"{option}: {folder} holds other files ({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); "
                "refusing to write into it", hint="give a new or empty folder")
        if os.path.lexists(folder / FOLDER_MARK) and not _regular(folder / FOLDER_MARK):
            raise OutputError(f"{option}: {folder / FOLDER_MARK} is not a regular file; refusing to write into {folder}",
                              hint="give a new or empty folder")
        present = [n for n in names if os.path.lexists(folder / n)]
        if present and not _regular(folder / FOLDER_MARK):
            raise OutputError(
                f"{option}: {folder} holds {', '.join(present[:3])}{', ...' if len(present) > 3 else ''}, not written "
                "there by admm-onnx; refusing to replace it", hint="give a new or empty folder")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise OutputError(f"{option}: cannot write in {folder} (permission denied)")
        for name in names:
            target = folder / name
            if target.is_symlink() or (target.exists() and not target.is_file()):
                raise OutputError(f"{option}: {target} exists and is not a regular file")
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    before = {n: _fingerprint_or_none(folder / n) for n in names}
    mark = folder / FOLDER_MARK
    marked = _regular(mark)
    # Files of an earlier run are moved aside (same folder, hidden name) and put back if this
    # run fails: a failed or interrupted run leaves the folder as it found it. Each step below
    # is whole for a signal (a move half recorded would lose the earlier file).
    saved = {}
    try:
        with deferred():
            if not marked:  # before any file: a run killed outright leaves a folder the next may reuse
                os.close(os.open(mark, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644))
            for name in names:
                if before[name] is not None:
                    backup = folder / _previous(name)
                    os.replace(folder / name, backup)
                    saved[name] = backup
        yield folder
    except BaseException:
        with deferred():
            for name in names:
                target = folder / name
                if name in saved or before[name] is None:
                    if target.is_file() and not target.is_symlink():
                        with contextlib.suppress(OSError):
                            target.unlink()  # written by this run
            for name, backup in saved.items():
                with contextlib.suppress(OSError):
                    os.replace(backup, folder / name)
            if not marked and _regular(mark):
                with contextlib.suppress(OSError):
                    mark.unlink()
            if created:
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only if empty
        raise
    with deferred(final=final):  # final: the command is complete, a signal now changes nothing
        for name, backup in saved.items():
            with contextlib.suppress(OSError):
                if (folder / name).exists():
                    backup.unlink()  # replaced by this run
                else:
                    os.replace(backup, folder / name)  # not written this time: the earlier file stays


def _regular(path: Path) -> bool:
    """A regular file itself, not a link to one."""
    return not path.is_symlink() and path.is_file()


def _lock_folder(folder: Path, option: str):
    """An exclusive lock on ``folder`` (an open descriptor; closing it releases the lock), None
    when another process holds it, False where the platform has no ``flock``."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return False
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as exc:
        raise OutputError(f"{option}: cannot open {folder}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _fingerprint_or_none(path: Path) -> Optional[int]:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def check_output_path(output: PathLike, *inputs: Optional[PathLike], option: str = "-o") -> Path:
    """Check one output path (given by ``option``) against ``inputs`` (model paths count with
    their external data).

    A shortcut for commands with one output; see :class:`OutputPlan` for the rules."""
    plan = OutputPlan()
    plan.add_input(*inputs)
    return plan.add_output(output, option)


# -- writing --------------------------------------------------------------------------------
def _disk_error(exc: OSError, target: Path) -> OutputError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return OutputError(f"no space left on the device to write {target}", hint="free some disk space and retry")
    return OutputError(f"cannot write {target}: {exc.strerror or exc}")


def cut_name(name: str, limit: int) -> str:
    """``name`` cut to at most ``limit`` bytes (file names hold 255), without splitting a UTF-8
    character at the cut (a name that is not UTF-8 anyway is cut anywhere: os.fsdecode keeps
    any bytes)."""
    raw = os.fsencode(name)[:limit]
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start >= len(raw) - 3:  # a character cut in half at the end
            raw = raw[: exc.start]
    return os.fsdecode(raw)


#: (device, inode) of every file this process wrote through :func:`atomic_path` or
#: :func:`save_model`: what :meth:`OutputPlan.remove_created` may take back.
_WRITTEN: Set[Tuple[int, int]] = set()


def _take_mode(tmp: Path, target: Path) -> None:
    """Give ``tmp`` (about to replace ``target``) the permissions of the file it replaces (a
    private 0600 output stays private), or the usual umask-based mode for a new file (mkstemp
    makes 0600)."""
    try:
        mode = stat.S_IMODE(os.stat(target).st_mode)
    except OSError:
        mode = _FILE_MODE
    os.chmod(tmp, mode)


def _exists(path: PathLike) -> bool:
    """``path`` exists (False, not an error, for a name the file system cannot hold)."""
    try:
        os.lstat(path)
    except (OSError, ValueError):
        return False
    return True


def _identity(path: PathLike) -> Optional[Tuple[int, int]]:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISREG(st.st_mode) else None


#: Absolute path of an output an unfinished run must give back -> the hidden hard link to its
#: earlier file (None until this process first replaces it): OutputPlan.keep_previous.
_PREVIOUS: Dict[str, Optional[Path]] = {}


def _set_aside(target: Path) -> None:
    """Before ``target`` is replaced: keep its earlier file under a hidden name if a plan asked
    for it (OutputPlan.keep_previous) and this process has not done so yet."""
    key = os.path.abspath(target)
    if key not in _PREVIOUS or _PREVIOUS[key] is not None or not (_regular(target) or target.is_symlink()):
        return
    for _ in range(100):
        backup = target.parent / f".{cut_name(target.name, 200)}.{os.urandom(4).hex()}.admm-previous"
        try:
            os.link(target, backup, follow_symlinks=False)  # a link to the file, or to the symlink itself
        except FileExistsError:
            continue
        except OSError:  # no hard links here (vfat, some network or FUSE file systems): a copy
            try:
                shutil.copy2(target, backup, follow_symlinks=False)
            except OSError as exc:
                log.warning("cannot keep %s aside (%s): an unfinished run leaves it replaced", target,
                            exc.strerror or exc)
                with contextlib.suppress(OSError):
                    os.unlink(backup)
                return
        _PREVIOUS[key] = backup
        return


def _wrote(path: PathLike) -> None:
    ident = _identity(path)
    if ident is not None:
        _WRITTEN.add(ident)


def _put_in_place(tmp: Path, target: Path) -> None:
    """Rename the finished ``tmp`` onto ``target``: the earlier file kept aside first if a plan
    asked for it, the new one then known as this run's. Call inside :func:`deferred` (an
    interrupt in between would leave a file the take-back does not know)."""
    _set_aside(target)
    os.replace(tmp, target)
    _wrote(target)


@contextlib.contextmanager
def atomic_path(target: PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` on success only.

    The temporary file is removed on every exit path; OS errors become :class:`OutputError`."""
    target = Path(target)
    prefix = f".{target.name}."
    if len(os.fsencode(prefix)) + len(suffix) + 16 > 255:  # a long valid name: a shorter temporary one
        prefix = f".{cut_name(target.name, 180)}."
    tmp_path = None
    try:
        with deferred():  # a signal waits until the finally below knows the file
            fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp" + suffix, dir=target.parent or ".")
            tmp_path = Path(tmp)
            os.close(fd)
        _take_mode(tmp_path, target)
        yield tmp_path
        with deferred():  # a signal waits until the file is known as this run's (an interrupt takes it back)
            _put_in_place(tmp_path, target)
    except OSError as exc:
        raise _disk_error(exc, target) from exc
    finally:
        with contextlib.suppress(OSError):
            if tmp_path is not None and tmp_path.exists():
                tmp_path.unlink()


def write_text(target: PathLike, text: str) -> Path:
    """Atomically write ``text`` (UTF-8) to ``target``."""
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(target)


def save_model(
    model: onnx.ModelProto, path: PathLike, external_data: Optional[bool] = None, check: bool = True
) -> Path:
    """Atomically save ``model`` to ``path`` (external data in ``<name>.data`` if needed).

    ``external_data=None`` chooses: external data when the model would not fit in one protobuf.
    An existing ``<name>.data`` is left alone when the model is written without external data.
    """
    path = Path(path)
    check_onnx_path(path, "the output")
    if external_data is None:
        external_data = model.ByteSize() >= PROTOBUF_LIMIT
    data_name = path.name + ".data"
    data_target = path.parent / data_name
    try:
        if not external_data:
            with atomic_path(path) as tmp:
                onnx.save_model(model, str(tmp))
                if check:
                    onnx.checker.check_model(str(tmp))
            if _exists(data_target):
                log.info("left %s in place (the new %s does not use it)", data_target, path.name)
            return path
        # External data: onnx writes the data file under the name given in `location`,
        # relative to the model's directory. Write both under temporary names, then rename the
        # data file first so the model never points at a missing file.
        tmp_dir = None
        try:
            with deferred():  # a signal waits until the folder is known to the finally below
                tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent or "."))
            model = _copy_for_external_save(model)
            tmp_model = tmp_dir / path.name
            onnx.save_model(
                model,
                str(tmp_model),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=data_name,
                size_threshold=1024,
            )
            if check:
                onnx.checker.check_model(str(tmp_model))
            _take_mode(tmp_model, path)
            # One step for a signal: the model and its data are replaced together (an earlier
            # model beside this run's data would compute with other weights) and known as this
            # run's (an interrupt then takes both back)
            with deferred():
                if (tmp_dir / data_name).exists():
                    _take_mode(tmp_dir / data_name, data_target)
                    _put_in_place(tmp_dir / data_name, data_target)
                _put_in_place(tmp_model, path)
        finally:
            if tmp_dir is not None:
                with deferred():  # a second signal must not cut the removal short
                    for leftover in tmp_dir.iterdir():
                        leftover.unlink()
                    tmp_dir.rmdir()
        return path
    except onnx.checker.ValidationError as exc:
        raise OutputError(f"refusing to write an invalid model to {path}: {exc}") from exc
    except OSError as exc:
        raise _disk_error(exc, path) from exc
    except ValueError as exc:  # protobuf: message too large
        raise OutputError(f"cannot write {path}: {' '.join(str(exc).split())[:200]}") from exc


def _copy_for_external_save(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnx's external-data save mutates the proto it is given; work on a copy."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy
