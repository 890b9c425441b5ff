"""The work directory of a pruning run: what it takes to resume after Ctrl-C, a crash or kill -9.

Layout::

    run.json          what run this is: model fingerprint, plan, config (written once)
    progress.json     the commit point: phase and step completed, the partial report
    admm/             ADMM training artifacts; admm/state.ckpt the ORT checkpoint (+ optimizer)
    admm_state.npz    Z, U, rho, residual history
    pruned.npz        trainable weights and masks right after the hard prune
    retrain/          masked retraining artifacts; retrain/state.ckpt

    .admm-onnx-workdir   the marker: this folder belongs to admm-onnx
    run.lock             held (flock) by the running process; holds its pid

Every file is written to a temporary name and renamed; ``progress.json`` is written last, so
whatever it says is complete on disk.

Ownership (:meth:`WorkDir.claim`): a work directory is created by the tool and marked; an
existing folder is used only if it is empty or holds nothing but the files above (a folder
with any other file, a symbolic link or special file anywhere in it, or one of the names
above in the wrong kind, is refused, so ``--workdir .`` can never touch a user's files and no
write follows a link out of the folder; a non-empty folder without the marker is refused too).
A second run on the same folder is refused while the first holds the lock, naming its pid.
:meth:`WorkDir.remove` deletes only the names above (in the artifact folders, only the files
onnxruntime training and the run write there), and the folder itself only if the tool created
it and it is then empty.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import stat
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from .errors import ConfigError, OutputError
from .io import atomic_path, cut_name

log = logging.getLogger(__name__)

MARKER = ".admm-onnx-workdir"
LOCK = "run.lock"
#: Every name the tool writes in a work directory (files and folders); nothing else is deleted.
OWN_NAMES = frozenset(
    {MARKER, LOCK, "run.json", "progress.json", "admm", "retrain", "dense", "admm_state.npz", "pruned.npz"}
)
#: The own names that are folders (training artifacts); the others are files.
OWN_FOLDERS = frozenset({"admm", "retrain", "dense"})
# atomic_path's temporary names: ".<name>.<random>.tmp[.npz]"
_TEMP = re.compile(r"^\.(run\.json|progress\.json|admm_state\.npz|pruned\.npz)\..+\.tmp(\.npz)?$")
#: What onnxruntime training writes in an artifact folder (models, their external data, the
#: checkpoint) and the run's own checkpoint (state.ckpt, via state.ckpt.tmp).
_ARTIFACT = re.compile(r"^(checkpoint|(training|eval|optimizer)_model\.onnx|state\.ckpt)(\.tmp)?(\.data)?$")


#: The option (or config key) a run setting comes from, where it is not ``--<name-with-dashes>``.
_OPTION = {"output": "--model-output", "rules": "the pruning rules (--sparsity, --bits, --config)",
           "compression": "--compression", "rho_policy": "--rho-mode"}

#: Settings ``--resume`` may change (besides --workers and --threads, which are not recorded).
RESUME_MAY_CHANGE = ("lr", "retrain_lr")


def _own(name: str) -> bool:
    return name in OWN_NAMES or bool(_TEMP.match(name))


def _strange(path: Path, name: str, top: bool) -> Optional[str]:
    """Why ``path`` (named ``name``, in the work directory when ``top``, else in one of its
    artifact folders) is not something admm-onnx writes there, or None."""
    try:
        st = os.lstat(path)
    except OSError:
        return None  # gone meanwhile
    if stat.S_ISLNK(st.st_mode):
        return f"{name} is a symbolic link"
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        return f"{name} is not a regular file"
    is_dir = stat.S_ISDIR(st.st_mode)
    if top:
        if not _own(name):
            return name
        if is_dir != (name in OWN_FOLDERS):
            return f"{name} is a {'folder' if is_dir else 'file'}"
        return None
    if is_dir or not _ARTIFACT.match(name):
        return name
    return None


#: Suffix of the default work directory beside the output (``OUT.admm-work``).
SUFFIX = ".admm-work"


def default_workdir(output) -> Path:
    """``OUT.admm-work`` beside ``output``; a name too long for that (file names hold 255 bytes)
    is cut to fit, without splitting a UTF-8 character."""
    out = Path(output)
    return out.parent / (cut_name(out.name, 255 - len(SUFFIX)) + SUFFIX)


def fingerprint_file(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fingerprint_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class WorkDir:
    """Reads and writes the run state under ``path``."""

    def __init__(self, path):
        self.path = Path(path)
        self._lock_fd: Optional[int] = None
        self._lock_before: Optional[bytes] = None  # the lock file's content before this run (None: it made it)
        #: :meth:`claim` made the folder
        self.created = False

    # -- ownership ---------------------------------------------------------------------------
    def foreign_files(self) -> List[str]:
        """What in the folder admm-onnx did not write: names it never uses, its names as the
        wrong kind (a folder for a file), symbolic links and special files anywhere (which a
        write would follow out of the folder), unknown names in its artifact folders."""
        try:
            names = sorted(os.listdir(self.path))
        except (FileNotFoundError, NotADirectoryError):
            return []
        out = []
        for name in names:
            why = _strange(self.path / name, name, top=True)
            if why is not None:
                out.append(why)
            elif name in OWN_FOLDERS:
                with contextlib.suppress(OSError):
                    out += [f"{name}/{why}" for why in (_strange(self.path / name / child, child, top=False)
                                                        for child in sorted(os.listdir(self.path / name)))
                            if why is not None]
        return out

    def claim(self) -> None:
        """Create (or adopt an empty / own) work directory, mark it and take its lock.

        Raises :class:`OutputError` for a folder holding other files, a path that is not a
        folder, or one that cannot be written, and :class:`ConfigError` when another run holds
        the lock."""
        p = self.path
        created = False
        if p.is_symlink() or (p.exists() and not p.is_dir()):
            raise OutputError(f"work directory {p} exists and is not a folder", hint="choose another --workdir")
        if not p.exists():
            try:
                p.mkdir()
            except FileNotFoundError:
                raise OutputError(f"cannot create work directory {p}: its parent folder does not exist") from None
            except OSError as exc:
                raise OutputError(f"cannot create work directory {p}: {exc.strerror}") from None
            created = self.created = True
        foreign = self.foreign_files()
        refused = None
        if foreign:
            shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
            refused = OutputError(f"work directory {p} holds files admm-onnx did not write ({shown}); refusing to use it",
                                  hint="use a new or empty folder (--workdir, or another -o)")
        elif not created and not (p / MARKER).is_file() and any(True for _ in os.scandir(p)):
            refused = OutputError(f"work directory {p} is not empty and has no {MARKER} marker: admm-onnx did not "
                                  "make it; refusing to use it", hint="use a new or empty folder (--workdir, or another -o)")
        if refused is not None:
            refused.resumable = False
            raise refused
        try:
            self._lock()
            marker = p / MARKER
            if not marker.exists():
                self.write_json(marker, {"tool": "admm-onnx", "created_folder": created})
        except BaseException:
            self.release()
            if created:
                self.remove()
            raise

    def _lock(self) -> None:
        import fcntl

        path = self.path / LOCK
        existed = path.is_file()
        try:  # never through a link planted under the lock's name
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as exc:
            raise OutputError(f"cannot write in work directory {self.path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                pid = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
            finally:
                os.close(fd)
            raise ConfigError(
                f"work directory {self.path} is in use by another admm-onnx run (pid {pid})",
                hint="wait for it to finish, or give this run another -o or --workdir",
            ) from None
        self._lock_before = os.pread(fd, 64, 0) if existed else None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def release(self, restore: bool = False) -> None:
        """Drop the lock (the lock file stays until :meth:`remove`). ``restore``: put the lock
        file back as the claim found it (a refused --resume leaves the folder as it was)."""
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                if restore and self._lock_before is None:
                    os.unlink(self.path / LOCK)
                elif restore:
                    os.ftruncate(self._lock_fd, 0)
                    os.pwrite(self._lock_fd, self._lock_before, 0)
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)
            self._lock_fd = None

    def remove(self) -> None:
        """Delete what admm-onnx wrote here; the folder too if the tool created it and it is empty."""
        p = self.path
        if not p.is_dir() or p.is_symlink():
            return
        created = self.created  # without a readable marker: only a folder this object created
        with contextlib.suppress(Exception):
            created = bool(json.loads((p / MARKER).read_text(encoding="utf-8")).get("created_folder", True))
        for name in os.listdir(p):
            target = p / name
            if name == MARKER or _strange(target, name, top=True) is not None:
                continue  # not ours, or ours in a form the tool never writes: left alone
            with contextlib.suppress(OSError):
                if name in OWN_FOLDERS:  # the artifacts in it; the folder once empty
                    for child in os.listdir(target):
                        if _strange(target / child, child, top=False) is None:
                            (target / child).unlink()
                    target.rmdir()
                else:
                    target.unlink()
        rest = self.foreign_files()
        if rest:
            log.warning("left %s in place: it holds files admm-onnx did not write (%s)", p, ", ".join(rest[:5]))
            return
        with contextlib.suppress(OSError):
            (p / MARKER).unlink()  # absent when it could not be written (a full disk)
        if created:
            with contextlib.suppress(OSError):
                p.rmdir()  # only when empty

    # -- identity -------------------------------------------------------------------------
    @property
    def run_file(self) -> Path:
        return self.path / "run.json"

    @property
    def progress_file(self) -> Path:
        return self.path / "progress.json"

    def has_progress(self) -> bool:
        return self.progress_file.is_file()

    def start(self, identity: Dict[str, Any]) -> None:
        """Start a fresh run here (the directory must hold no earlier run's progress)."""
        self.path.mkdir(exist_ok=True)
        for child in ("admm", "retrain"):
            shutil.rmtree(self.path / child, ignore_errors=True)
        for name in ("progress.json", "admm_state.npz", "pruned.npz"):
            (self.path / name).unlink(missing_ok=True)
        self.write_json(self.run_file, identity)

    def check_identity(self, identity: Dict[str, Any], defaults: Optional[Dict[str, Any]] = None) -> None:
        """Refuse to resume a work directory that belongs to another run, naming what changed.

        ``defaults``: config fields this run left to their default, with what it resolved them
        to; a run saved by a version that recorded them unresolved (``None``, ``"auto"``) is
        the same run when they agree."""
        if not self.run_file.is_file() or not self.has_progress():
            raise ConfigError(f"nothing to resume in {self.path}", hint="run without --resume to start")
        saved = self._read_json(self.run_file)
        for key in ("model", "plan"):
            if saved.get(key) != identity.get(key):
                raise ConfigError(
                    f"{self.path} holds a run of a different {'model' if key == 'model' else 'pruning plan'}",
                    hint="resume with the same model and rules, or delete the work directory",
                )
        if "data" in saved and "data" in identity and saved["data"] != identity["data"]:
            raise ConfigError(f"{self.path} holds a run on different training data",
                              hint="resume with the same -d data, or delete the work directory")
        old = saved.get("config") or {}
        if not isinstance(old, dict):
            raise self.damaged(self.run_file, "its config is not a table")
        new = json.loads(json.dumps(identity.get("config") or {}, default=float))  # as saved: lists, floats
        for key, value in (defaults or {}).items():
            if key in old and old[key] in (None, "auto") and new.get(key) == json.loads(json.dumps(value)):
                new[key] = old[key]
        for key in RESUME_MAY_CHANGE:  # a lower learning rate is how a diverged run goes on
            if key in old and key in new and old[key] != new[key]:
                log.warning("resuming with %s %r (was %r)", key, new[key], old[key])
                new[key] = old[key]
        changed = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        if changed:
            shown = ", ".join(f"{_OPTION.get(k, '--' + k.replace('_', '-'))} {old.get(k)!r} -> {new.get(k)!r}"
                              for k in changed[:4])
            raise ConfigError(
                f"--resume with settings that differ from the interrupted run: {shown}"
                + (", ..." if len(changed) > 4 else ""),
                hint="resume with the same options (only --lr, --retrain-lr, --workers and --threads may change)",
            )

    def damaged(self, path: Path, why: str = "") -> ConfigError:
        """The error for a state file of this work directory that cannot be used."""
        return ConfigError(f"{path} is damaged{f' ({why})' if why else ''}; this run cannot be resumed",
                           hint=f"remove {self.path} and start again")

    def _read_json(self, path: Path) -> Dict[str, Any]:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as exc:
            raise ConfigError(
                f"{path} is damaged ({type(exc).__name__}); this run cannot be resumed",
                hint=f"remove {self.path} and start again",
            ) from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path} is damaged; this run cannot be resumed", hint=f"remove {self.path} and start again")
        return data

    # -- progress -------------------------------------------------------------------------
    def read_progress(self) -> Dict[str, Any]:
        data = self._read_json(self.progress_file)
        step = data.get("step")
        if (data.get("phase") not in ("admm", "retrain") or isinstance(step, bool) or not isinstance(step, int)
                or step < 0 or not isinstance(data.get("report"), dict)):
            raise ConfigError(f"{self.progress_file} is damaged; this run cannot be resumed",
                              hint=f"remove {self.path} and start again")
        return data

    def write_progress(self, progress: Dict[str, Any]) -> None:
        self.write_json(self.progress_file, progress)

    # -- files ------------------------------------------------------------------------------
    def write_json(self, path: Path, data: Any) -> None:
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(data, indent=1, default=float), encoding="utf-8")

    def save_arrays(self, name: str, arrays: Dict[str, np.ndarray]) -> None:
        with atomic_path(self.path / name, suffix=".npz") as tmp:
            np.savez(tmp, **arrays)

    def load_arrays(self, name: str) -> Dict[str, np.ndarray]:
        from .errors import DataError
        from .io import read_npz

        try:
            return read_npz(self.path / name, "work directory state")
        except DataError as exc:
            raise self.damaged(self.path / name, str(exc).split(": ")[-1]) from None

    def save_state(self, state) -> None:
        """Save an :class:`~admm_onnx.admm.AdmmState` as ``admm_state.npz``."""
        with atomic_path(self.path / "admm_state.npz", suffix=".npz") as tmp:
            state.save(tmp)

    def checkpoint(self, phase: str) -> Path:
        return self.path / phase / "state.ckpt"

    def save_checkpoint(self, trainer, phase: str) -> None:
        target = self.checkpoint(phase)
        tmp = target.with_name(target.name + ".tmp")
        try:
            trainer.save_checkpoint(tmp)
            os.replace(tmp, target)
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()  # a half-written one (a full disk) must not keep the space the error asks for

    def checkpoint_stamp(self, phase: str) -> Dict[str, Any]:
        """The digest of the phase's checkpoint, recorded with the step it ends (a copied or moved
        work directory keeps it)."""
        return {"phase": phase, "sha256": fingerprint_file(self.checkpoint(phase))}

    def existing_checkpoint(self, phase: str) -> Path:
        """The checkpoint a resumed ``phase`` starts from: it must exist and be the one the last
        committed step recorded (not a newer one written by a run killed before its commit)."""
        path = self.checkpoint(phase)
        if path.is_symlink():  # the tool writes regular files only: never read through a planted link
            raise self.damaged(path, "a symbolic link")
        if not path.is_file():
            raise self.damaged(path, "missing")
        stamp = self.read_progress().get("checkpoint")
        if isinstance(stamp, dict) and stamp.get("phase") == phase:
            if fingerprint_file(path) != stamp.get("sha256"):
                raise self.damaged(path, "not the checkpoint of the last completed step: the run was stopped while "
                                         "saving it")
        return path
