"""Data-parallel training steps over worker processes, for CPUs with more than one core.

Why: on small convolutional nets ORT 1.19.2's CPU training kernels gain little from intra-op
threads (ConvGrad runs one small GEMM per image; measured on LeNet-5: one thread about as fast
as two), and the training API holds the GIL during a step, so Python threads cannot overlap two
steps. Processes with one ORT thread each can.

Math: the batch is cut into P row slices of n_k rows (sum n). Worker k computes g_k, the
gradient of its slice's loss (the mean of the base loss over the slice, plus the ADMM penalty,
which does not depend on the data). Then

    sum_k (n_k / n) * g_k

is the gradient of the full-batch loss: the base-loss terms recombine into the mean over all
n rows, and the penalty's gradient, present in every g_k, comes out once (the weights sum to 1).
The main process (rank 0) forms it in its own gradient buffers and steps its optimizer; the
workers hold no optimizer state.

Contract:
- Workers load the same artifacts and checkpoint as the main :class:`~admm_onnx.training.Trainer`
  and run one ORT thread each (``threads`` overrides).
- Trainable parameters reach the workers through a shared file mapping (in ``/dev/shm`` when it
  exists) before every step; frozen ones (ADMM targets, rho, masks) through the pipe, once per
  epoch (:meth:`WorkerPool.sync_frozen`): they change only between epochs.
- Each worker writes its gradients into its own block of the mapping; nothing else is shared.
- A worker's error comes back as a one-line :class:`~admm_onnx.errors.TrainingError`; a worker
  that dies, or a main process that dies, ends the other side (end of file on the pipe); the
  workers of a killed main process remove the shared file.
  Workers ignore SIGINT: Ctrl-C is handled by the main process, which closes the pool.

Workers are started with ``python -m admm_onnx.parallel FD`` (not multiprocessing), so a user
script without an ``if __name__ == "__main__"`` guard is not re-executed in them.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import weakref
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .errors import TrainingError

log = logging.getLogger(__name__)

#: (name, dtype string, shape) of each trainable parameter, in a fixed order.
Layout = List[Tuple[str, str, Tuple[int, ...]]]


def _sizes(layout: Layout) -> List[int]:
    """Bytes of each parameter's slot in a block, rounded up to 64 (cache-line aligned views)."""
    return [(int(np.prod(shape, dtype=np.int64)) * np.dtype(dt).itemsize + 63) // 64 * 64 for _, dt, shape in layout]


class Exchange:
    """A file mapping holding one copy of the trainable parameters and one gradient block per
    worker: ``params[name]`` and ``grads[k][name]`` (k = 1 .. P-1) are NumPy views."""

    def __init__(self, path: Path, layout: Layout, workers: int, create: bool):
        self.path = Path(path)
        sizes = _sizes(layout)
        block = sum(sizes)
        total = max(1, block * workers)  # block 0: parameters; block k: worker k's gradients
        if create:
            with open(self.path, "wb") as f:
                f.truncate(total)
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r+", shape=(total,))
        self.params: Dict[str, np.ndarray] = {}
        self.grads: Dict[int, Dict[str, np.ndarray]] = {k: {} for k in range(1, workers)}
        for k in range(workers):
            offset = k * block
            for (name, dt, shape), size in zip(layout, sizes):
                count = int(np.prod(shape, dtype=np.int64))
                view = self._map[offset : offset + count * np.dtype(dt).itemsize].view(dt).reshape(shape)
                if k == 0:
                    self.params[name] = view
                else:
                    self.grads[k][name] = view
                offset += size

    def close(self) -> None:
        self.params, self.grads = {}, {}
        self._map = None


def _exchange_dir(fallback: Path, needed: int) -> Path:
    """/dev/shm when it is writable and has room for ``needed`` bytes (containers often give it
    only 64 MB; writing past a full tmpfs mapping would kill the process), else ``fallback``."""
    shm = Path("/dev/shm")
    try:
        stat = os.statvfs(shm)
        if os.access(shm, os.W_OK) and stat.f_bavail * stat.f_frsize > 2 * needed:
            return shm
    except OSError:
        pass
    return fallback


class WorkerPool:
    """P - 1 worker processes, each with its own ORT training module on the same artifacts."""

    def __init__(self, directory: Path, checkpoint: Path, layout: Layout, workers: int, threads: int = 1):
        if workers < 2:
            raise ValueError("a WorkerPool needs at least 2 workers (the main process is one)")
        from .interrupts import children_with_start_signals_blocked, deferred

        self.workers = workers
        self.conns: List[Connection] = []
        self.procs: List[subprocess.Popen] = []
        self._path: Optional[Path] = None
        self._remove = None
        self.exchange: Optional[Exchange] = None
        try:
            where = _exchange_dir(Path(directory), workers * sum(_sizes(layout)))
            # a signal waits until the file is registered for removal: close(), or this pool's
            # finalizer (a pool dropped without close(), at the latest when the process exits)
            with deferred():
                fd, name = tempfile.mkstemp(prefix="admm-onnx-exchange-", dir=where)
                self._path = Path(name)
                self._remove = weakref.finalize(self, _remove_file, self._path)
                os.close(fd)
            self.exchange = Exchange(self._path, layout, workers, create=True)
            # a signal waits until every worker has its whole start-up message; the workers never see
            # a terminal's Ctrl-C (this process answers it and closes them)
            with deferred(), children_with_start_signals_blocked():
                for rank in range(1, workers):
                    self._start(rank, directory, checkpoint, layout, threads)
            for rank, conn in enumerate(self.conns, 1):
                self._reply(rank, conn)  # "ready", or the worker's error
            log.info("data-parallel training over %d processes", workers)
        except BaseException:
            self.close()
            raise

    def _start(self, rank: int, directory: Path, checkpoint: Path, layout: Layout, threads: int) -> None:
        parent, child = socket.socketpair()
        # The package's own location first, so the worker imports this admm_onnx even when it is
        # not installed (a source checkout on sys.path).
        here = str(Path(__file__).resolve().parents[1])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p))
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "admm_onnx.parallel", str(child.fileno())],
                pass_fds=[child.fileno()], stdin=subprocess.DEVNULL, env=env,
            )
        finally:
            child.close()
        self.procs.append(proc)
        conn = Connection(parent.detach())
        self.conns.append(conn)
        conn.send(("init", str(directory), str(checkpoint), layout, self.workers, rank, threads, str(self.exchange.path)))

    def _died(self, rank: int) -> TrainingError:
        proc = self.procs[rank - 1]
        try:
            code = proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = None
        return TrainingError(f"training worker {rank} exited unexpectedly (exit code {code})")

    def _send(self, rank: int, msg) -> None:
        try:
            self.conns[rank - 1].send(msg)
        except OSError:
            raise self._died(rank) from None

    def _reply(self, rank: int, conn: Connection):
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            raise self._died(rank) from None
        if msg[0] == "error":
            raise TrainingError(f"training worker {rank}: {msg[1]}")
        return msg

    # -- per epoch / per step -----------------------------------------------------------
    def sync_frozen(self, values: Dict[str, np.ndarray]) -> None:
        """Send the frozen parameters (ADMM targets, rho, masks) to every worker."""
        for rank in range(1, self.workers):
            self._send(rank, ("frozen", values))
        for rank, conn in enumerate(self.conns, 1):
            self._reply(rank, conn)

    def publish(self, params: Dict[str, np.ndarray]) -> None:
        """Copy the main process's trainable parameters into the shared mapping."""
        for name, view in self.exchange.params.items():
            np.copyto(view, params[name])

    def start(self, rank: int, inputs: Sequence[np.ndarray]) -> None:
        self._send(rank, ("step", list(inputs)))

    def finish(self, rank: int) -> Tuple[float, np.ndarray]:
        """Wait for worker ``rank``'s step: its loss and output; its gradients are then in
        ``exchange.grads[rank]``."""
        _, loss, logits = self._reply(rank, self.conns[rank - 1])
        return loss, logits

    def close(self) -> None:
        """Stop the workers and remove the exchange file. A signal meanwhile waits until the end
        (``timeout`` sends its signal to the run, then again to its group: the second one used
        to cut this short, before the file was removed); the file goes whatever happens."""
        from .interrupts import deferred

        with deferred():
            try:
                for conn in self.conns:
                    try:
                        conn.send(("close",))
                    except OSError:
                        pass  # already gone
                    conn.close()
                for proc in self.procs:
                    try:
                        proc.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
                self.conns, self.procs = [], []
            finally:
                if self.exchange is not None:
                    self.exchange.close()
                    self.exchange = None
                if self._remove is not None:
                    self._remove()


def _remove_file(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


# -- the worker process ------------------------------------------------------------------------
def _serve(conn: Connection) -> None:
    from ._ort import api
    from .training import _first_line, flush_denormals, session_options

    msg = conn.recv()
    from .interrupts import worker_started

    worker_started()  # SIGTERM / SIGHUP were blocked until the start-up message was read
    _, directory, checkpoint, layout, workers, rank, threads, exchange_path = msg
    try:
        flush_denormals()
        directory = Path(directory)
        state = api.CheckpointState.load_checkpoint(checkpoint)
        module = api.Module(str(directory / "training_model.onnx"), state, str(directory / "eval_model.onnx"),
                            session_options=session_options(threads or 1))
        module.train()
        exchange = Exchange(Path(exchange_path), layout, workers, create=False)
        names = [name for name, _, _ in layout]
        grads_out = exchange.grads[rank]
    except Exception as exc:  # reported to the main process as one line
        conn.send(("error", _first_line(exc)))
        return
    conn.send(("ready",))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):  # the main process died without closing us: clean up for it
            try:
                Path(exchange_path).unlink()
            except OSError:
                pass
            return
        try:
            if msg[0] == "close":
                return
            if msg[0] == "frozen":
                for name, value in msg[1].items():
                    state.parameters[name].data = value
                conn.send(("ok",))
            elif msg[0] == "step":
                for name in names:
                    np.copyto(state.parameters[name].data, exchange.params[name])
                result = module(*msg[1])
                loss, logits = (result[0], result[1]) if isinstance(result, (list, tuple)) else (result, None)
                for name in names:
                    grad = state.parameters[name].grad
                    if grad is None:
                        grads_out[name][...] = 0
                    else:
                        np.copyto(grads_out[name], grad)
                module.lazy_reset_grad()
                conn.send(("done", float(loss), None if logits is None else np.asarray(logits)))
        except (BrokenPipeError, ConnectionResetError):
            return
        except Exception as exc:
            try:
                conn.send(("error", _first_line(exc)))
            except OSError:
                return


def main(argv: Optional[List[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process handles Ctrl-C and closes us
    logging.disable(logging.WARNING)
    try:
        _serve(Connection(int(argv[0])))
    except (BrokenPipeError, ConnectionResetError, EOFError):
        pass  # the main process went away (interrupted while we started): nothing to report to


if __name__ == "__main__":
    main()
