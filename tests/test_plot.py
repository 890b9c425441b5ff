"""Pictures: ``admm-onnx plot`` and ``prune --plot`` write non-empty PNG/SVG/HTML with the
expected series; ``inspect --plot`` draws the kept fraction per weight."""
from __future__ import annotations

import json
import re

import pytest

from admm_onnx.cli.main import main

QUICK = ["--admm-iters", "2", "--retrain-epochs", "1", "--batch-size", "32", "--quiet"]
LAYERS = ["conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"]


@pytest.fixture
def report(lenet5_small, data_npz, tmp_path):
    path = tmp_path / "report.json"
    html = tmp_path / "run.html"
    code = main(["prune", str(lenet5_small), "-d", str(data_npz), "-o", str(tmp_path / "p.onnx"), "--sparsity", "0.8",
                 "--report", str(path), "--plot", str(html), *QUICK])
    assert code == 0
    return path, html


def _series(svg: str):
    return re.findall(r'data-series="([^"]+)"', svg)


def test_prune_plot_html_is_self_contained_with_every_chart(report):
    _, html = report
    text = html.read_text()
    assert text.startswith("<!DOCTYPE html>") and "<svg" in text
    assert not re.search(r'(src|href)="(https?:)?//', text)  # opens offline
    charts = re.findall(r'data-chart="([^"]+)"', text)
    assert any(c.startswith("ADMM primal residual") for c in charts) and "rho per layer" in charts
    assert "kept fraction per layer (% nonzero)" in charts
    assert sum("|w| of nonzero weights" in c for c in charts) == len(LAYERS)
    series = _series(text)
    for name in LAYERS:
        assert series.count(name) == 3  # primal, dual, rho
    assert {"admm", "retrain"} <= set(series) and {"before", "after"} <= set(series)


def test_plot_command_svg_and_png(report, tmp_path, capsys):
    path, _ = report
    svg, png = tmp_path / "r.svg", tmp_path / "r.png"
    assert main(["plot", str(path), "-o", str(svg)]) == 0
    text = svg.read_text()
    assert text.startswith("<svg") and text.rstrip().endswith("</svg>")
    assert set(LAYERS) <= set(_series(text))
    pytest.importorskip("matplotlib")
    assert main(["plot", str(path), "-o", str(png)]) == 0
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_plot_bad_input_is_one_line(tmp_path, report, capsys):
    path, _ = report
    assert main(["plot", str(path), "-o", str(tmp_path / "r.gif")]) == 2
    assert main(["plot", str(tmp_path / "none.json"), "-o", str(tmp_path / "r.svg")]) == 2
    (tmp_path / "bad.json").write_text(json.dumps({"x": 1}))
    assert main(["plot", str(tmp_path / "bad.json"), "-o", str(tmp_path / "r.svg")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("error: ") for line in err)
    assert not (tmp_path / "r.svg").exists() and not (tmp_path / "r.gif").exists()


def test_inspect_plot(lenet5_small, tmp_path, capsys):
    out = tmp_path / "kept.svg"
    assert main(["inspect", str(lenet5_small), "--plot", str(out)]) == 0
    text = out.read_text()
    assert _series(text) == ["kept_percent"] and all(n in text for n in LAYERS)


def test_sensitivity_plot_any_format_and_plot_reads_its_json(lenet5_small, data_npz, tmp_path, capsys):
    sens, svg = tmp_path / "s.json", tmp_path / "s.svg"
    assert main(["sensitivity", str(lenet5_small), "-d", str(data_npz), "--levels", "50%,10%", "--samples", "64",
                 "--workers", "1", "--no-cache", "--json", str(sens), "--plot", str(svg), "-q"]) == 0
    text = svg.read_text()
    assert _series(text) == LAYERS and "<polygon" in text  # one curve per weight, each with its noise band
    html = tmp_path / "s.html"
    assert main(["plot", str(sens), "-o", str(html)]) == 0
    page = html.read_text()
    assert page.startswith("<!DOCTYPE html>") and _series(page) == LAYERS and "http" not in page.replace(
        "http://www.w3.org/2000/svg", "")


def test_png_without_matplotlib_stops_before_any_work(lenet5_small, data_npz, tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    out = tmp_path / "p.onnx"
    for argv in (["prune", str(lenet5_small), "-d", str(data_npz), "-o", str(out), "--sparsity", "0.5", "--plot",
                  str(tmp_path / "r.png"), *QUICK],
                 ["sensitivity", str(lenet5_small), "-d", str(data_npz), "--samples", "64", "--no-cache", "--plot",
                  str(tmp_path / "s.png"), "-q"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "PNG needs matplotlib" in err
    assert not out.exists() and not list(tmp_path.glob("*.png"))


def test_a_report_of_the_wrong_shape_is_one_error_line(tmp_path, capsys):
    from admm_onnx.cli.main import main

    bad = tmp_path / "bad.json"
    bad.write_text('{"layers": 5, "residuals": {"a": 1}}')
    assert main(["plot", str(bad), "-o", str(tmp_path / "x.svg")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "not an admm-onnx report" in err[0]
    assert not (tmp_path / "x.svg").exists()
