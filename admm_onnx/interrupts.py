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
import signal
from typing import Iterator, Optional

_depth = 0
_pending: Optional[int] = None


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
def deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM/SIGHUP (when :func:`handler` is installed) until the block ends."""
    global _depth, _pending
    _depth += 1
    ok = False
    try:
        yield
        ok = True
    finally:
        _depth -= 1
        if _depth == 0 and _pending is not None:
            signum, _pending = _pending, None
            if ok:
                _raise(signum)
