"""Progress for API users: a callback, or a ready text bar in the manner of tqdm.

:func:`~admm_onnx.prune` and :func:`~admm_onnx.train` take ``progress=``: a
:class:`~admm_onnx.training.Progress` object, or any callable, which is then called with one
:class:`ProgressEvent` per step (``event.kind`` is ``"start"``, ``"advance"`` or ``"finish"``)::

    admm_onnx.prune(model, out, reader, config, progress=lambda e: print(e.label, e.done, e.total))
    admm_onnx.prune(model, out, reader, config, progress=admm_onnx.TextProgress())  # tqdm-like bar

Neither needs tqdm; with tqdm installed, ``TqdmProgress`` drives real tqdm bars.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, TextIO, Union

from .training import NO_PROGRESS, Progress


@dataclass
class ProgressEvent:
    kind: str  # "start", "advance" or "finish"
    label: str
    done: int
    total: int
    info: Dict[str, object] = field(default_factory=dict)


class CallbackProgress(Progress):
    """Calls ``fn(ProgressEvent)`` at the start of a phase, after every batch, and at its end."""

    def __init__(self, fn: Callable[[ProgressEvent], None]):
        self.fn, self.label, self.done, self.total = fn, "", 0, 0

    def start(self, total: int, label: str) -> None:
        self.label, self.done, self.total = label, 0, total
        self.fn(ProgressEvent("start", label, 0, total))

    def advance(self, n: int = 1, **info) -> None:
        self.done += n
        self.fn(ProgressEvent("advance", self.label, self.done, self.total, dict(info)))

    def finish(self) -> None:
        self.fn(ProgressEvent("finish", self.label, self.done, self.total))


class TextProgress(Progress):
    """A tqdm-like bar on a stream (stderr by default), redrawn in place on a terminal; on a
    file or pipe one line per phase when it ends (no per-batch noise)."""

    def __init__(self, stream: Optional[TextIO] = None, width: int = 30, min_interval: float = 0.1):
        self.stream, self.width, self.min_interval = stream or sys.stderr, width, min_interval
        self.label, self.done, self.total, self.t0, self._last = "", 0, 0, 0.0, 0.0

    def _tty(self) -> bool:
        return bool(getattr(self.stream, "isatty", lambda: False)())

    def _line(self) -> str:
        elapsed = time.perf_counter() - self.t0
        frac = self.done / self.total if self.total else 0.0
        bar = "#" * int(frac * self.width)
        eta = elapsed / frac - elapsed if frac > 0 else 0.0
        return (f"{self.label}: {100 * frac:3.0f}%|{bar:<{self.width}}| {self.done}/{self.total} "
                f"[{elapsed:.0f}s<{eta:.0f}s]")

    def start(self, total: int, label: str) -> None:
        self.label, self.done, self.total = label, 0, total
        self.t0 = self._last = time.perf_counter()

    def advance(self, n: int = 1, **info) -> None:
        self.done += n
        now = time.perf_counter()
        if self._tty() and (now - self._last >= self.min_interval or self.done >= self.total):
            self._last = now
            self.stream.write("\r" + self._line())
            self.stream.flush()

    def finish(self) -> None:
        self.stream.write(("\r" if self._tty() else "") + self._line() + "\n")
        self.stream.flush()


class TqdmProgress(Progress):
    """Real tqdm bars (needs ``pip install tqdm``)."""

    def __init__(self, **tqdm_kwargs):
        from tqdm.auto import tqdm  # noqa: F401 - fail early if missing

        self._tqdm, self.kwargs, self.bar = tqdm, tqdm_kwargs, None

    def start(self, total: int, label: str) -> None:
        self.bar = self._tqdm(total=total, desc=label, **self.kwargs)

    def advance(self, n: int = 1, **info) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def finish(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def as_progress(progress: Union[Progress, Callable[[ProgressEvent], None], None]) -> Progress:
    """A :class:`Progress` from a Progress, a callable or ``None``."""
    if progress is None:
        return NO_PROGRESS
    if isinstance(progress, Progress) or all(hasattr(progress, a) for a in ("start", "advance", "finish")):
        return progress
    if callable(progress):
        return CallbackProgress(progress)
    from .errors import ConfigError

    raise ConfigError(f"progress must be a Progress or a callable, not {type(progress).__name__}")
