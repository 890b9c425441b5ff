"""Size of ``packed`` files: the byte breakdown (admm_onnx.formats.packed.size_breakdown) and
bench/packed_size.py, which prints it for any pruned model or packed file."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from admm_onnx import formats
from admm_onnx.formats import packed
from test_deploy import mlp, quantized

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("packed_size", ROOT / "bench" / "packed_size.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def small_q():
    return quantized(mlp(sizes=(32, 64, 48, 5), keep=0.2))


@pytest.mark.parametrize("kind", ["levels", "raw"])
def test_breakdown_sums_to_the_file(small_q, kind):
    model = small_q if kind == "levels" else mlp(sizes=(32, 64, 48, 5), keep=0.2)
    out, report = formats.export(model, "packed")
    parts = packed.size_breakdown(out)
    assert sum(parts.values()) == len(out.SerializeToString())
    assert all(v >= 0 for v in parts.values()), parts
    assert parts["decode functions"] > 0 and parts["graph nodes"] > 0 and parts["positions"] > 0
    payload = parts["positions"] + parts["codes"] + parts["raw values"] + parts["scales"]
    assert payload <= report.total_stored_bytes
    if kind == "levels":
        assert parts["codes"] > 0 and parts["raw values"] == 0 and parts["scales"] > 0
    else:
        assert parts["codes"] == 0 and parts["raw values"] > 0


def test_bench_script_on_the_proxy_and_on_a_file(tmp_path, capsys):
    bench = _bench()
    assert bench.main(["--live", "--json", str(tmp_path / "a.json"), "--out", str(tmp_path / "a.onnx")]) == 0
    doc = json.loads((tmp_path / "a.json").read_text())
    assert doc["bytes"] == (tmp_path / "a.onnx").stat().st_size == sum(doc["breakdown"].values())
    assert doc["packed nonzeros"] == 2930  # 200 + 1,500 + 1,080 + 150: every kept entry on a nonzero level
    # an already packed file is measured as it is
    assert bench.main(["--model", str(tmp_path / "a.onnx")]) == 0
    assert f"{doc['bytes']:,} bytes" in capsys.readouterr().out
    # a pruned model file is exported first
    onnx.save(small_q_model := quantized(mlp(sizes=(32, 64, 48, 5), keep=0.2)), tmp_path / "m.onnx")
    assert bench.main(["--model", str(tmp_path / "m.onnx"), "--keep-dead"]) == 0
    out, _ = formats.export(small_q_model, "packed")
    assert f"{len(out.SerializeToString()):,} bytes" in capsys.readouterr().out
    assert bench.main(["--model", str(tmp_path / "missing.onnx")]) == 2
    assert capsys.readouterr().err.startswith("error:")
