"""Everything a user can set is documented in README.md: every option of every command (as
``--help`` lists it) where that command is documented, every config key (``PruneConfig`` and
``Rule`` fields, plus the top-level ``sparsity``/``bits``) in the config documentation, and
each option's default in README's option tables is the one ``--help`` shows."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Dict, List, Tuple

import click
import pytest

from admm_onnx.cli.main import cli
from admm_onnx.config import PruneConfig, Rule

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def section(heading: str) -> str:
    """The text under ``heading`` (any level) up to the next heading of the same or a higher level."""
    m = re.search(rf"^(#+) {re.escape(heading)}\s*$", README, flags=re.M)
    assert m, f"README has no section {heading!r}"
    level = len(m.group(1))
    end = re.search(rf"^#{{1,{level}}} ", README[m.end():], flags=re.M)
    return README[m.end(): m.end() + end.start() if end else len(README)]


def command_row(path: Tuple[str, ...]) -> str:
    """The row of README's "Other commands" table for ``admm-onnx PATH``."""
    rows = [line for line in section("Other commands").splitlines()
            if line.startswith(f"| `admm-onnx {' '.join(path)} ") or line.startswith(f"| `admm-onnx {' '.join(path)}`")]
    assert rows, f"README's 'Other commands' table has no row for admm-onnx {' '.join(path)}"
    return "\n".join(rows)


#: where each command's options are documented (a section, or its row in "Other commands")
WHERE = {
    ("prune",): lambda: section("Pruning your model"),
    ("sensitivity",): lambda: section("Automatic per-layer ratios"),
    ("export",): lambda: command_row(("export",)) + section("Deployment"),
}


def _commands(group, prefix=()):
    for name, command in sorted(group.commands.items()):
        if isinstance(command, click.Group):
            yield from _commands(command, prefix + (name,))
        else:
            yield prefix + (name,), command


def _options(command) -> List[click.Option]:
    return [p for p in command.params if isinstance(p, click.Option) and not p.hidden and "--help" not in p.opts]


def _mentioned(option: click.Option, text: str) -> bool:
    """Some spelling of the option stands inside backticks in ``text``."""
    for name in option.opts:
        if re.search(rf"`[^`\n]*(?<![\w-]){re.escape(name)}(?![\w-])[^`\n]*`", text):
            return True
    return False


COMMANDS = list(_commands(cli))


@pytest.mark.parametrize("path, command", COMMANDS, ids=[" ".join(p) for p, _ in COMMANDS])
def test_every_option_is_documented(path, command):
    text = WHERE[path]() if path in WHERE else command_row(path)
    missing = [p.opts[-1] for p in _options(command) if not _mentioned(p, text)]
    assert not missing, f"admm-onnx {' '.join(path)}: {', '.join(missing)} not documented in README"


def test_global_options_are_documented():
    missing = [p.opts[-1] for p in _options(cli) if not _mentioned(p, README)]
    assert not missing, f"global options {missing} not documented in README"


def test_every_config_key_is_documented():
    text = section("Config file") + section("Automatic per-layer ratios") + section("API reference")
    keys = {f.name for f in dataclasses.fields(PruneConfig)} | {f.name for f in dataclasses.fields(Rule)} | {"sparsity", "bits"}
    missing = sorted(k for k in keys if not re.search(rf"(?<![\w-]){k}(?![\w-])", text))
    assert not missing, f"config keys not documented in README: {missing}"


def _help_defaults(command) -> Dict[str, str]:
    """``{--option: default}`` as ``--help`` shows it (``[default: X]``)."""
    out = {}
    with click.Context(command, info_name=command.name) as ctx:
        for p in _options(command):
            record = p.get_help_record(ctx)
            m = re.search(r"\[default: ([^\]]*)\]", " ".join(record[1].split())) if record else None
            if m:
                out[p.opts[-1]] = m.group(1)
    return out


def _table_defaults(text: str) -> Dict[str, str]:
    """``{--option: default}`` from README option tables whose row names one option."""
    out = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`-"):
            continue
        names = re.findall(r"(?<![\w-])(--?[a-z][\w-]*)", cells[0])
        if len({n for n in names if n.startswith("--")}) == 1 and "," not in cells[2]:
            for n in names:
                out[n] = cells[2].strip("`")
    return out


def _same(help_default: str, readme_default: str) -> bool:
    def norm(v):
        v = v.replace("`", "").strip().lower()
        return {"none": "", "1e-3": "0.001"}.get(v, v)

    a, b = norm(help_default), norm(readme_default)
    return a == b or a.startswith(b) or b.startswith(a) or (b and b in a)


@pytest.mark.parametrize("path", [("prune",), ("sensitivity",)], ids=lambda p: " ".join(p))
def test_readme_table_defaults_match_the_help(path):
    command = dict(COMMANDS)[path]
    shown = _help_defaults(command)
    text = WHERE[path]()
    table = _table_defaults(text.split("\n### ")[0])  # the command's own table, not a subsection's
    assert table, "no option table found"
    wrong = {o: (table[o], shown[o]) for o in table if o in shown and not _same(shown[o], table[o])}
    assert not wrong, f"README default vs --help default: {wrong}"


def test_config_names_the_model_tensor_like_the_command_line():
    from admm_onnx.config import config_from_dict
    from admm_onnx.errors import ConfigError

    assert config_from_dict({"model_output": "logits"}).output == "logits"
    assert config_from_dict({"output": "logits"}).output == "logits"  # the older key still works
    with pytest.raises(ConfigError, match="model_output only"):
        config_from_dict({"model_output": "a", "output": "b"})
    with pytest.raises(ConfigError) as info:
        config_from_dict({"outptu": "a"})
    assert "model_output" in str(info.value) and " output," not in str(info.value)
