"""Ctrl-C, SIGTERM and SIGHUP as one exception, and sections they may not cut in half.

The CLI installs :func:`handler` for SIGINT, SIGTERM and SIGHUP: outside a :func:`deferred`
section the signal raises :class:`Signalled` (a ``KeyboardInterrupt``, so every ``finally``
and ``except BaseException`` cleanup runs, and the pipeline commits its state as for Ctrl-C);
inside one it is remembered and raised when the section ends. Sections are the few places
where an exception half-way would leave a mess the cleanup cannot see, e.g. starting worker
processes (a child reading a half-written start-up message prints a traceback). A signal that
lands inside a finalizer (``__del__``, where Python only prints an exception and goes on) is
delivered again a moment later, outside it.
"""
from __future__ import annotations

import contextlib
import logging
import signal
from typing import Iterator, Optional

_depth = 0
_pending: Optional[int] = None
_finished = False
#: An interrupt was raised: the command is ending (its clean-up runs).
_interrupting = False


class Signalled(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP arrived; ``signum`` says which (exit code 128 + signum)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise(signum: int) -> None:
    global _interrupting
    _interrupting = True
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Signalled(signum)


def _in_finalizer(frame) -> bool:
    """True when ``frame`` runs inside a ``__del__`` (an onnxblock Block's, for instance): an
    exception raised there is only printed ("Exception ignored in ...") and the run goes on."""
    while frame is not None:
        if frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


def _repost(signum: int) -> None:
    """Send ``signum`` to the main thread again in a moment, from another thread: its handler
    runs then, out of the finalizer (else it is held again). A real signal, so that a wait the
    main thread is blocked in is interrupted as by the first one; not sent once the handler is
    no longer installed (the command has returned)."""
    import threading
    import time

    main = threading.main_thread().ident

    def later():
        time.sleep(0.01)
        if signal.getsignal(signum) is handler:
            signal.pthread_kill(main, signum)

    try:
        threading.Thread(target=later, name="admm-onnx-signal-again", daemon=True).start()
    except RuntimeError:  # the interpreter is shutting down: nothing left to stop
        pass


def handler(signum, frame) -> None:
    global _pending
    if _interrupting or _finished:  # the command is ending: one interrupt per command (a second one,
        return  # as ``timeout`` sends to the group, must not cut the first one's clean-up short), none
        # once its last outputs are written (deferred(final=True))
    if _depth:
        if _pending is None:  # the first one counts (its exit code)
            _pending = signum
        return
    if _in_finalizer(frame):  # raised there, the interrupt would be swallowed: raise it just after
        _repost(signum)
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
            _finished = True  # from now on every signal is dropped: the command is complete
            if _pending is not None:
                logging.getLogger(__name__).warning(
                    "signal %d arrived while the last outputs were written; they are complete", _pending)
            _pending = None
        elif _depth == 0 and _pending is not None:
            signum, _pending = _pending, None
            if ok:
                _raise(signum)


#: What the CLI answers with :func:`handler`; blocked in worker processes while they start.
START_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n))


@contextlib.contextmanager
def children_with_start_signals_blocked() -> Iterator[None]:
    """Start worker processes in this block: SIGINT, SIGTERM and SIGHUP are blocked in this
    thread meanwhile, and a child inherits the blocked mask across exec, so a signal sent to the
    whole process group (a terminal's Ctrl-C, a closed terminal, ``timeout``, ``kill -TERM
    -PGID``) cannot kill a worker while it starts up. A worker killed before it read its start-up
    message left the parent blocked forever writing it (multiprocessing's spawn keeps the pipe's
    read end open until that write returns). A worker calls :func:`worker_started` once it has
    its message. Signals meanwhile reach this process when the block ends (another thread or the
    handler takes them; :func:`deferred` holds them)."""
    mask = getattr(signal, "pthread_sigmask", None)
    if mask is None:  # pragma: no cover - not POSIX
        yield
        return
    old = mask(signal.SIG_BLOCK, set(START_SIGNALS))
    try:
        yield
    finally:
        mask(signal.SIG_SETMASK, old)


def worker_started() -> None:
    """In a worker started by :func:`children_with_start_signals_blocked`, once it holds its start-up message:
    SIGINT is ignored for good (the process that owns the worker answers a Ctrl-C and stops it),
    SIGTERM and SIGHUP are unblocked (one that arrived meanwhile ends the worker now, as it
    would have before: its parent is no longer writing to it)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    others = {s for s in START_SIGNALS if s != signal.SIGINT}
    for signum in others:
        # a spawn worker gets the run's sys.argv, so importing admm_onnx installed the CLI's
        # start-up handler in it, which printed a second "Interrupted." line: it ends quietly
        signal.signal(signum, signal.SIG_DFL)
    mask = getattr(signal, "pthread_sigmask", None)
    if mask is not None:
        mask(signal.SIG_UNBLOCK, others)


def finished() -> bool:
    """True once a ``deferred(final=True)`` block completed."""
    return _finished


def reset() -> None:
    """Forget a completed final block or a raised interrupt (a new command in the same
    process, e.g. tests)."""
    global _pending, _finished, _interrupting
    _finished, _pending, _interrupting = False, None, False
