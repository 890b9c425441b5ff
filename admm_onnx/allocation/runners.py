"""Where independent trials run: this process, local worker processes, or a Ray cluster.

A trial set is ``(setup, setup_args, task, tasks)``: ``setup(*setup_args)`` runs once per
worker (it loads the model and the data into module state), then ``task(t)`` runs for each
``t``; both must be module-level functions (picklable). Every runner yields
``(index, result)`` as results arrive; the results do not depend on the runner (each task is
computed by the same code with the same single-threaded session), which a test checks.

- :class:`SerialRunner`: in this process (``workers=1``);
- :class:`ProcessRunner`: ``concurrent.futures.ProcessPoolExecutor`` with ``spawn`` workers
  (safe whatever threads this process runs);
- :class:`RayRunner`: ``ray.util.multiprocessing.Pool`` on the cluster at ``address``
  (``auto``, ``ray://host:10001``, ...); needs the optional extra ``pip install "admm-onnx[ray]"``.

:func:`make_runner` picks one: ``--ray ADDRESS`` or the ``RAY_ADDRESS`` environment variable
selects Ray, else ``workers > 1`` local processes, else this process.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import sys
from contextlib import contextmanager
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Iterator, Optional, Sequence, Tuple

from ..errors import AdmmOnnxError, ConfigError, error_text

log = logging.getLogger(__name__)


class SerialRunner:
    name = "serial"
    workers = 1

    def run(self, setup: Callable, setup_args: tuple, task: Callable, tasks: Sequence[Any]) -> Iterator[Tuple[int, Any]]:
        setup(*setup_args)
        for i, t in enumerate(tasks):
            yield i, task(t)

    def describe(self) -> str:
        return "this process"


def _indexed(task_and_fn):
    fn, index, t = task_and_fn
    return index, fn(t)


_QUIET_CANCEL_RACE = False


def _quiet_cancel_race() -> None:
    """A pool cancelled while a worker's result arrives (an interrupt during the sweep) can make
    the executor's manager thread raise InvalidStateError setting a cancelled future's result,
    printed as a thread traceback on top of the run's one line; it changes nothing (the run is
    ending). From the first pool on, that error is logged at debug level (the manager thread can
    outlive the pool's shut-down, so the hook stays); every other thread error still reaches the
    previous hook."""
    global _QUIET_CANCEL_RACE
    if _QUIET_CANCEL_RACE:
        return
    import threading
    from concurrent.futures import InvalidStateError

    previous = threading.excepthook

    def hook(args):
        if isinstance(args.exc_value, InvalidStateError):
            log.debug("worker pool: %s (a result for a cancelled task; ignored)", args.exc_value)
            return
        previous(args)

    threading.excepthook = hook
    _QUIET_CANCEL_RACE = True


@contextmanager
def _main_not_reimported():
    """Keep ``spawn`` children from re-running the user's ``__main__`` (a script without an
    ``if __name__ == "__main__"`` guard would start the sweep again in every worker): the tasks
    are functions of this package, so the children never need it."""
    main = sys.modules.get("__main__")
    saved = {k: getattr(main, k) for k in ("__file__", "__spec__") if main is not None and hasattr(main, k)}
    try:
        for k in saved:
            if k == "__spec__":
                main.__spec__ = None
            else:
                delattr(main, k)
        yield
    finally:
        for k, v in saved.items():
            setattr(main, k, v)


from ..interrupts import children_with_start_signals_blocked, deferred, worker_started  # noqa: E402


def _start_resource_tracker() -> None:
    """multiprocessing's resource tracker, started (if it is not yet) with SIGHUP blocked: the
    tracker keeps the mask it inherits but for SIGINT and SIGTERM, which it ignores."""
    import signal
    from multiprocessing import resource_tracker

    mask = getattr(signal, "pthread_sigmask", None)
    if mask is None or not hasattr(signal, "SIGHUP"):  # pragma: no cover - not POSIX
        resource_tracker.ensure_running()
        return
    old = mask(signal.SIG_BLOCK, {signal.SIGHUP})
    try:
        resource_tracker.ensure_running()
    finally:
        mask(signal.SIG_SETMASK, old)


def _worker_setup(parent: int, setup, setup_args) -> None:
    """A worker's start: a watchdog that ends it when the run that started it is gone (a
    ``kill -9`` leaves no one to shut the pool down: the workers would sit idle, holding their
    memory), then the task's own ``setup``."""
    import threading
    import time

    # Ctrl-C in a terminal reaches the whole process group: the run that owns the pool answers it
    # (one line) and stops the workers; they stay quiet. SIGTERM / SIGHUP, blocked while the
    # worker started (children_with_start_signals_blocked), end it again from here on.
    worker_started()

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="admm-onnx-parent-watch", daemon=True).start()
    setup(*setup_args)


def _pool_died() -> None:
    """A worker died (a signal to the whole process group, the out-of-memory killer): an
    interrupt when this process got the signal too, else one line, not a bug."""
    import time

    time.sleep(1.0)  # a group signal reaches this process too: its handler interrupts the wait
    raise AdmmOnnxError("a worker process of the sweep died (killed by a signal, or out of memory)",
                        hint="run again, or with --workers 1") from None


def _result(fut):
    """A task's result (see :func:`_pool_died`)."""
    try:
        return fut.result()
    except BrokenProcessPool:
        _pool_died()


class ProcessRunner:
    name = "processes"

    def __init__(self, workers: int):
        self.workers = int(workers)

    def run(self, setup, setup_args, task, tasks):
        if not tasks:
            return
        workers = min(self.workers, len(tasks))
        ctx = multiprocessing.get_context("spawn")
        pool = None
        futures = {}
        _quiet_cancel_race()
        try:
            # The pool's queues (POSIX semaphores, registered for removal only after they exist)
            # and the workers start here; a signal waits until the pool is whole and the workers
            # have their start-up message, then the shut-down below removes everything.
            with _main_not_reimported(), deferred():
                # multiprocessing's resource tracker, started on first use, unblocks SIGINT and
                # SIGTERM in the thread that starts it: started inside children_with_start_signals_blocked
                # it undid the block for every worker after it. It ignores SIGINT and SIGTERM
                # but not SIGHUP: it starts with SIGHUP blocked, so a closed terminal does not
                # kill it (the pool's tear-down then printed its relaunch warnings and tracebacks)
                _start_resource_tracker()
                with children_with_start_signals_blocked():
                    pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_setup,
                                               initargs=(os.getpid(), setup, setup_args))
                    try:
                        futures = {pool.submit(task, t): i for i, t in enumerate(tasks)}
                    except BrokenProcessPool:  # a worker already died: this process's own signal is held
                        futures = {}
            if not futures:
                _pool_died()  # the held signal was raised as the section ended, else one line
            for fut in as_completed(futures):
                yield futures[fut], _result(fut)
        except BaseException:
            for fut in futures:
                fut.cancel()
            if pool is not None:
                # Every worker ends now (a task under way is not waited for), including one
                # spawned while the executor was already tearing down after a worker died of
                # the same SIGTERM: the executor never stopped that one, and the exit waited
                # for it forever.
                for proc in list((getattr(pool, "_processes", None) or {}).values()):
                    try:
                        proc.kill()  # not terminate(): a worker still starting holds SIGTERM blocked,
                        # and reading its start-up data after the pool is gone printed tracebacks
                    except (OSError, ValueError):
                        pass
            raise
        finally:
            if pool is not None:
                pool.shutdown(wait=True)

    def describe(self) -> str:
        return f"{self.workers} local worker processes"


class RayRunner:
    name = "ray"

    def __init__(self, address: str, workers: Optional[int] = None):
        try:
            import ray  # noqa: F401
            from ray.util.multiprocessing import Pool  # noqa: F401
        except ImportError:
            raise ConfigError("--ray needs Ray", hint='pip install "admm-onnx[ray]"') from None
        self.address = address
        self.workers = workers

    def run(self, setup, setup_args, task, tasks):
        if not tasks:
            return
        import ray
        from ray.util.multiprocessing import Pool

        started_here = not ray.is_initialized()
        if started_here:
            try:
                # The workers import admm_onnx from this environment (same machine or an image
                # with the same install); only logs of level WARNING come back.
                ray.init(address=None if self.address in ("local", "") else self.address,
                         logging_level=logging.WARNING, log_to_driver=False)
            except Exception as exc:  # ConnectionError, RuntimeError, ValueError depending on Ray's version
                raise ConfigError(f"cannot connect to the Ray cluster at {self.address!r}: "
                                  f"{error_text(exc)}") from None
        try:
            processes = self.workers or int(ray.cluster_resources().get("CPU", 1))
            pool = Pool(processes=max(1, min(processes, len(tasks))), initializer=setup, initargs=setup_args)
            try:
                for index, result in pool.imap_unordered(_indexed, [(task, i, t) for i, t in enumerate(tasks)]):
                    yield index, result
            finally:
                pool.terminate()
        finally:
            if started_here:
                ray.shutdown()

    def describe(self) -> str:
        return f"Ray cluster at {self.address}" + (f" ({self.workers} workers)" if self.workers else "")


def make_runner(workers: int = 1, ray_address: Optional[str] = None):
    """Ray if ``ray_address`` (or ``RAY_ADDRESS``) is set, else local processes if ``workers`` > 1."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"workers must be a whole number >= 1, got {workers!r}")
    address = ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        return RayRunner(address, workers if workers > 1 else None)
    if workers > 1:
        return ProcessRunner(workers)
    return SerialRunner()
