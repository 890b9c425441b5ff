"""One CLI style: ``-o/--output`` is the written file on every command, the model tensor is
``--model-output``, and help shows defaults one way (``[default: X]``)."""
from __future__ import annotations

import re

import pytest
from click.testing import CliRunner

from admm_onnx.cli.main import cli, default_output, main

QUICK = ["--admm-iters", "1", "--retrain-epochs", "0", "--batch-size", "32", "--quiet"]


def _commands(group, prefix=()):
    for name, command in group.commands.items():
        if hasattr(command, "commands"):
            yield from _commands(command, prefix + (name,))
        else:
            yield prefix + (name,), command


def test_default_output_name():
    assert default_output("dir/net.onnx") == "dir/net.pruned.onnx"
    assert default_output("net") == "net.pruned.onnx"


def test_prune_writes_model_pruned_onnx_when_o_is_omitted(lenet5_small, data_npz):
    code = main(["prune", str(lenet5_small), "-d", str(data_npz), "--sparsity", "0.5", *QUICK])
    assert code == 0
    assert lenet5_small.with_name(lenet5_small.stem + ".pruned.onnx").stat().st_size > 0


def test_output_long_form_and_deprecated_out(lenet5_small, tmp_path, capsys):
    out = tmp_path / "a.onnx"
    assert main(["models", "build", "lenet5", "--output", str(out), "--input-shape", "1x8x8"]) == 0
    old = tmp_path / "b.onnx"
    assert main(["models", "build", "lenet5", "--out", str(old), "--input-shape", "1x8x8"]) == 0
    assert out.stat().st_size > 0 and old.stat().st_size > 0
    assert "--out is deprecated; use -o/--output" in capsys.readouterr().err


def test_output_required_where_there_is_no_default(tmp_path, capsys):
    assert main(["models", "build", "lenet5"]) == 2
    err = capsys.readouterr().err
    assert "Missing option '-o' / '--output'" in err


def test_model_output_selects_the_tensor(lenet5_small, data_npz, tmp_path, capsys):
    code = main(["eval", str(lenet5_small), "-d", str(data_npz), "--model-output", "nope"])
    assert code == 2
    assert "nope" in capsys.readouterr().err


@pytest.mark.parametrize("path, command", list(_commands(cli)), ids=lambda v: " ".join(v) if isinstance(v, tuple) else "")
def test_help_one_style(path, command):
    result = CliRunner().invoke(cli, [*path, "--help"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    # defaults as "[default: X]" only (choices "[a|b]" and extras like "admm-onnx[plot]" are not defaults)
    assert not re.search(r"(?<![\w-])\[(?!default: |required\]|[a-z0-9_]+\|)[^\]]*\]", text.split("Options:")[-1]), text
    visible = [p for p in command.params if not getattr(p, "hidden", False)]
    names = {o for p in visible for o in getattr(p, "opts", [])}
    assert "--out" not in names and "--out-dir" not in names
    if "--output" in names:
        assert "-o" in names


def test_defaults_are_written_one_way_in_every_help_text():
    for path, command in _commands(cli):
        for p in command.params:
            text = getattr(p, "help", None) or ""
            # "  [default: X]" as click writes it (two spaces), whether click or the help text adds it
            assert not re.search(r"(?<!  )\[default:", text), (path, p.name, text)


def test_unknown_option_never_suggests_a_hidden_spelling(capsys):
    assert main(["prune", "model.onnx", "--ou"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'--output'" in err and "'--out'" not in err


def test_fixed_iteration_count_is_not_reported_as_a_failure(lenet5_small, data_npz, tmp_path, capsys):
    code = main(["prune", str(lenet5_small), "-d", str(data_npz), "-o", str(tmp_path / "p.onnx"), "--sparsity", "0.5",
                 "--admm-tol", "0", "--admm-iters", "1", "--retrain-epochs", "0", "--batch-size", "32"])
    assert code == 0
    out, err = capsys.readouterr()
    assert "ADMM: all 1 Z/U update(s) run (--admm-tol 0)" in out
    assert "did not converge" not in err


def test_log_file_anywhere_and_for_every_command(lenet5_small, data_npz, tmp_path, capsys):
    log = tmp_path / "run.log"
    assert main(["eval", str(lenet5_small), "-d", str(data_npz), "--log-file", str(log), "--debug"]) == 0
    assert "training graph" in log.read_text()  # the library's (debug) log, though eval prints no log
    other = tmp_path / "other.log"
    assert main(["inspect", str(lenet5_small), f"--log-file={other}", "--debug"]) == 0
    assert other.exists()


def test_unwritable_log_file_is_one_line(lenet5_small, data_npz, tmp_path, capsys):
    assert main(["eval", str(lenet5_small), "-d", str(data_npz), "--log-file", str(tmp_path / "no" / "x.log")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "--log-file" in err


def test_command_list_is_not_cut_mid_phrase():
    text = CliRunner().invoke(cli, ["--help"]).output.split("Commands:")[1]
    rows = [line.split(None, 1) for line in text.strip().splitlines()]
    assert {r[0] for r in rows} == set(cli.commands)
    assert all(len(r) == 2 and not r[1].endswith("...") for r in rows), text
