"""Is the ``onnxruntime`` module the training build admm-onnx needs?

Two PyPI distributions ship the same importable package ``onnxruntime``: plain
``onnxruntime`` (inference only; most ML environments have it) and
``onnxruntime-training-cpu`` (inference plus the training API admm-onnx uses). pip installs
them side by side without complaint (``pip check`` is silent): whichever was installed last
owns the shared files, and uninstalling either one removes files the other needs. The result
is an ImportError deep inside ONNX Runtime, or a training API that loads against the wrong
native library.

:func:`problem` looks at the installed distributions (``importlib.metadata``) and at the
build stamp of the module on ``sys.path`` (``onnxruntime/capi/build_and_package_info.py``),
without importing onnxruntime, and returns one line saying what is wrong and what to do, or
``None``. ``admm_onnx/__init__`` calls it before anything imports onnxruntime.
"""
from __future__ import annotations

import importlib.util
import json
import re
import shlex
from pathlib import Path
from typing import Dict, Iterable, Optional

#: The distribution admm-onnx is built on (pinned in setup.py).
TRAINING_DIST = "onnxruntime-training-cpu"
TRAINING_VERSION = "1.19.2"

#: Other distributions that install the same ``onnxruntime`` package.
CONFLICTING_DISTS = (
    "onnxruntime",
    "onnxruntime-gpu",
    "onnxruntime-directml",
    "onnxruntime-openvino",
    "onnxruntime-silicon",
    "onnxruntime-training",
    "ort-nightly",
)

FIX = (
    "install admm-onnx in its own virtual environment (python3 -m venv ~/.venvs/admm-onnx && "
    "~/.venvs/admm-onnx/bin/pip install {source}; or pipx install {source}); "
    f"to repair this one: pip uninstall -y {{names}} && pip install {TRAINING_DIST}=={TRAINING_VERSION}"
)


def install_source() -> str:
    """What ``pip install`` was given for this admm-onnx: its folder for an install from a clone
    (pip records it in ``direct_url.json``), else the project name."""
    from importlib import metadata
    from urllib.parse import unquote, urlparse

    try:
        text = metadata.distribution("admm-onnx").read_text("direct_url.json")
        url = json.loads(text).get("url", "") if text else ""
    except Exception:  # noqa: BLE001 - not installed, or no/odd metadata: the generic advice
        return "admm-onnx"
    parsed = urlparse(url)
    if parsed.scheme == "file" and parsed.path:
        return shlex.quote(unquote(parsed.path))
    return shlex.quote(url) if url else "admm-onnx"


def installed_distributions(names: Iterable[str] = (TRAINING_DIST,) + CONFLICTING_DISTS) -> Dict[str, str]:
    """``{distribution: version}`` for each of ``names`` that is installed."""
    from importlib import metadata

    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def module_build() -> Optional[str]:
    """The distribution name stamped into the ``onnxruntime`` module on ``sys.path``
    (``None`` if there is no such module or no stamp)."""
    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        stamp = Path(location) / "capi" / "build_and_package_info.py"
        try:
            text = stamp.read_text(encoding="utf-8")
        except OSError:
            continue
        match = re.search(r"""package_name\s*=\s*['"]([^'"]+)['"]""", text)
        if match:
            return match.group(1)
    return None


def diagnose(dists: Dict[str, str], build: Optional[str], source: str = "admm-onnx") -> Optional[str]:
    """One line saying what is wrong with this combination, or ``None`` (pure: for tests).
    ``source``: what to give ``pip install`` for admm-onnx (:func:`install_source`)."""
    others = {name: version for name, version in dists.items() if name != TRAINING_DIST}
    if TRAINING_DIST in dists and others:
        listed = ", ".join(f"{name} {version}" for name, version in sorted(others.items()))
        return (
            f"{listed} is installed beside {TRAINING_DIST} {dists[TRAINING_DIST]} and both ship the module "
            f"'onnxruntime', so one overwrites the other; " + FIX.format(source=source, names=" ".join(sorted(others)) + " " + TRAINING_DIST)
        )
    if TRAINING_DIST not in dists and others:
        listed = ", ".join(f"{name} {version}" for name, version in sorted(others.items()))
        return (
            f"admm-onnx needs {TRAINING_DIST}=={TRAINING_VERSION} (ONNX Runtime with its training API) but only "
            f"{listed} is installed; " + FIX.format(source=source, names=" ".join(sorted(others)))
        )
    if build is not None and build != TRAINING_DIST:
        return (
            f"the 'onnxruntime' module on sys.path was built as {build}, not {TRAINING_DIST}; "
            + FIX.format(source=source, names=" ".join(sorted(set(dists) | {build})))
        )
    return None


def problem() -> Optional[str]:
    """What is wrong with the installed ONNX Runtime, as one line, or ``None``."""
    try:
        return diagnose(installed_distributions(), module_build(), install_source())
    except Exception:  # noqa: BLE001 - a broken metadata store must not hide the real import error
        return None


def _running_cli() -> bool:
    import sys

    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return name in ("admm-onnx", "admm-onnx.exe") and "--debug" not in sys.argv[1:]


def check() -> None:
    """Stop if the installed ONNX Runtime is not usable by admm-onnx.

    From the ``admm-onnx`` command: one ``error:`` line on stderr and exit code 2. From Python:
    :class:`~admm_onnx.errors.InstallError` (an ``ImportError``) with the same line.
    """
    message = problem()
    if message is None:
        return
    if _running_cli():
        import sys

        sys.stderr.write(f"error: {message}\n")
        raise SystemExit(2)
    from .errors import InstallError

    raise InstallError(message)
