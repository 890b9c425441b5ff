"""Ctrl-C, SIGTERM and SIGHUP as one exception, and sections they may not cut in half.

The CLI installs :func:`handler` for SIGINT, SIGTERM and SIGHUP: outside a :func:`deferred`
section the signal raises :class:`Signalled` (a ``KeyboardInterrupt``, so every ``finally``
and ``except BaseException`` cleanup runs, and the pipeline commits its state as for Ctrl-C);
inside one it is remembered and raised when the section ends. Sections are the few places
where an exception half-way would leave a mess the cleanup cannot see, e.g. starting worker
processes (a child reading a half-written start-up message prints a traceback).
"""
from __future__ import annotations

import contextlib
import logging
import signal
from typing import Iterator, Optional

_depth = 0
_pending: Optional[int] = None
_finished = False


class Signalled(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP arrived; ``signum`` says which (exit code 128 + signum)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise(signum: int) -> None:
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Signalled(signum)


def handler(signum, frame) -> None:  # pragma: no cover - exercised through subprocess tests
    global _pending
    if _depth:
        _pending = signum
        return
    _raise(signum)


@contextlib.contextmanager
def deferred(final: bool = False) -> Iterator[None]:
    """Hold SIGINT/SIGTERM/SIGHUP (when :func:`handler` is installed) until the block ends.

    ``final``: the block finishes the command (its last outputs): a signal held meanwhile is
    dropped when the block completes (the work it asked to stop is done; logged), and every
    later one too, until the process exits."""
    global _depth, _pending, _finished
    _depth += 1
    ok = False
    try:
        yield
        ok = True
    finally:
        _depth -= 1
        if ok and final:
            _finished = True
            _depth += 1  # from now on every signal is held, then dropped: the command is complete
            if _pending is not None:
                logging.getLogger(__name__).warning(
                    "signal %d arrived while the last outputs were written; they are complete", _pending)
            _pending = None
        elif _depth == 0 and _pending is not None:
            signum, _pending = _pending, None
            if ok:
                _raise(signum)


@contextlib.contextmanager
def children_without_sigint() -> Iterator[None]:
    """Start worker processes in this block: SIGINT is blocked in this thread meanwhile, and a
    child inherits the blocked mask across exec, so a terminal's Ctrl-C (sent to the whole
    process group) never reaches a worker, not even while it starts up. A Ctrl-C meanwhile
    reaches this process when the block ends."""
    mask = getattr(signal, "pthread_sigmask", None)
    if mask is None:  # pragma: no cover - not POSIX
        yield
        return
    old = mask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        mask(signal.SIG_SETMASK, old)


def finished() -> bool:
    """True once a ``deferred(final=True)`` block completed."""
    return _finished


def reset() -> None:
    """Forget a completed final block (a new command in the same process, e.g. tests)."""
    global _depth, _pending, _finished
    if _finished:
        _depth = max(0, _depth - 1)
    _finished, _pending = False, None
