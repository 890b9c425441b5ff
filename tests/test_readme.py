"""The README, executed: every fenced code block of README.md runs, so docs and behaviour cannot drift.

Convention (also in README's "Contributing" section):

- Blocks are found by scanning README.md for fenced blocks; each becomes one test, named by
  its line number and language.
- ``bash`` blocks run with ``bash -e`` in a scratch folder that holds ``model.onnx`` (LeNet-5,
  28x28), ``data.npz`` (a small learnable set), ``prune.toml`` (the README's own ``config``
  block), ``M.onnx`` / ``D.npz`` (the same model and data), ``examples/`` and
  ``../shared/data/mnist`` (when the data is on this machine); ``pip install ... &&``
  prefixes are dropped (the package is already installed) and ``admm-onnx`` is this
  environment's command.
- ``python`` blocks run as ``python -c`` in the same scratch folder.
- ``toml`` / ``json`` blocks tagged ``config`` are loaded with ``load_config`` and planned on
  the tool's own LeNet-5; untagged ones are only parsed.
- Blocks without a language (sample output) are not run; one tagged ``output`` is what the
  nearest ``bash`` block above it prints on stdout, and is compared with it line by line
  (times such as ``52.8 s`` excepted) when that block runs.
- A tag is an HTML comment on the line just before the block:
  ``<!-- readme-test: slow -->`` (only with ``-m slow``),
  ``<!-- readme-test: skip: the reason -->`` (never run; the reason is shown),
  ``<!-- readme-test: config -->`` (see above), ``<!-- readme-test: output -->`` (see above).
  Untagged ``bash``/``python`` blocks run in the default suite: keep them to a few seconds, or
  tag them.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List, NamedTuple, Optional

import numpy as np
import pytest

from admm_onnx.io import save_model
from admm_onnx.models import build

from conftest import MNIST_DIR, blobs

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
TAG = re.compile(r"^\s*<!--\s*readme-test:\s*(.*?)\s*-->\s*$")
FENCE = re.compile(r"^(\s*)(```+|~~~+)\s*([\w+-]*)")
RUN_LANGS = {"bash", "sh", "shell", "console", "python", "py", "toml", "json"}


class Block(NamedTuple):
    line: int
    lang: str
    code: str
    tag: Optional[str]

    @property
    def id(self) -> str:
        return f"L{self.line}-{self.lang or 'text'}"


def expected_output(block: Block, blocks: List[Block]) -> Optional[Block]:
    """The ``output`` block that shows what ``block`` (a bash block) prints, if any: the first
    ``output`` block after it, before any other runnable block."""
    after = [b for b in blocks if b.line > block.line]
    for b in after:
        if b.tag == "output":
            return b
        if b.lang in RUN_LANGS:
            return None
    return None


TIME = re.compile(r"\b\d+(\.\d+)? s\b")


def _normalise(text: str) -> List[str]:
    return [TIME.sub("<t> s", line.rstrip()) for line in text.strip("\n").splitlines()]


def readme_blocks(text: str) -> List[Block]:
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, lang, start = m.group(2), m.group(3).lower(), i
        body = []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i])
            i += 1
        j = start - 1
        while j >= 0 and not lines[j].strip():
            j -= 1
        tag_match = TAG.match(lines[j]) if j >= 0 else None
        blocks.append(Block(start + 1, lang, "\n".join(body) + "\n", tag_match.group(1) if tag_match else None))
        i += 1
    return blocks


BLOCKS = readme_blocks(README.read_text(encoding="utf-8"))


def _params():
    for b in BLOCKS:
        marks = []
        if b.lang not in RUN_LANGS:
            marks.append(pytest.mark.skip(reason="no language: sample output"))
        elif b.tag and b.tag.startswith("skip"):
            marks.append(pytest.mark.skip(reason=b.tag.partition(":")[2].strip() or "tagged skip"))
        elif b.tag == "slow":
            marks.append(pytest.mark.slow)
        yield pytest.param(b, id=b.id, marks=marks)


def test_blocks_are_found_and_tags_are_known():
    assert any(b.lang == "bash" for b in BLOCKS) and any(b.lang == "python" for b in BLOCKS)
    for b in BLOCKS:
        if b.tag is not None:
            assert b.tag in ("slow", "config", "output") or b.tag.startswith("skip"), f"README line {b.line}: unknown tag {b.tag!r}"
        if b.tag == "output":
            shown_by = [c for c in BLOCKS if c.lang in ("bash", "sh", "shell") and expected_output(c, BLOCKS) == b]
            assert b.lang == "" and shown_by, f"README line {b.line}: an output block must follow a bash block"


def _config_block() -> Optional[Block]:
    return next((b for b in BLOCKS if b.tag == "config" and b.lang == "toml"), None)


@pytest.fixture
def sandbox(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    model = build("lenet5", input_shape=(1, 28, 28), seed=0)
    save_model(model, work / "model.onnx")
    save_model(model, work / "M.onnx")
    d = blobs(n=240, classes=10, shape=(1, 28, 28))
    for name in ("data.npz", "D.npz"):
        np.savez(work / name, x_train=d.x_train, y_train=d.y_train, x_test=d.x_test, y_test=d.y_test)
    config = _config_block()
    if config is not None:
        (work / "prune.toml").write_text(config.code, encoding="utf-8")
    (work / "examples").symlink_to(REPO / "examples")
    shared = _shared_data()
    if shared is not None:
        (tmp_path / "shared").mkdir()
        (tmp_path / "shared" / "data").symlink_to(shared)
    return work


def _shared_data() -> Optional[Path]:
    """The project's shared data folder (MNIST...), beside the clone or the worktree."""
    for candidate in (MNIST_DIR.parent, REPO.parent / "shared" / "data", REPO.parent.parent / "shared" / "data"):
        if (candidate / "mnist").is_dir():
            return candidate
    return None


def _env() -> dict:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = str(REPO / "tests") + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _without_pip(code: str) -> str:
    return re.sub(r"^\s*pip3? install [^\n&]*&&\s*", "", code, flags=re.M)


def _python() -> str:
    return sys.executable


def _shell(code: str) -> str:
    # admm-onnx, python and python3 of this environment
    py = shutil.which("python", path=str(Path(sys.executable).parent)) or sys.executable
    return f'python() {{ "{py}" "$@"; }}\npython3() {{ "{py}" "$@"; }}\nset -o pipefail\n' + code


@pytest.mark.parametrize("block", list(_params()))
def test_readme_block(block: Block, sandbox):
    timeout = 1800 if block.tag == "slow" else 300
    if block.lang in ("toml", "json"):
        from admm_onnx.config import load_config
        from admm_onnx.graph.analysis import analyse

        path = sandbox / f"block.{block.lang}"
        path.write_text(block.code, encoding="utf-8")
        config = load_config(path)
        if block.tag == "config":
            plan = config.plan(analyse(build("lenet5", input_shape=(1, 28, 28))))
            assert plan, f"README line {block.line}: the config prunes nothing on LeNet-5"
        return
    needs = set(re.findall(r"\.\./shared/data/([\w-]+)", block.code))
    if needs and (_shared_data() is None or not all((_shared_data() / n).is_dir() for n in needs)):
        pytest.skip(f"needs ../shared/data/{', '.join(sorted(needs))}, not on this machine")
    if block.lang in ("python", "py"):
        cmd = [_python(), "-c", block.code]
    else:
        cmd = ["bash", "-e", "-c", _shell(_without_pip(block.code))]
    proc = subprocess.run(cmd, cwd=sandbox, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (
        f"README line {block.line} ({block.lang}) failed with exit {proc.returncode}:\n"
        f"--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}"
    )
    shown = expected_output(block, BLOCKS) if block.lang in ("bash", "sh", "shell") else None
    if shown is not None:
        assert _normalise(proc.stdout) == _normalise(shown.code), (
            f"README line {shown.line} does not show what line {block.line} prints:\n{proc.stdout}")
