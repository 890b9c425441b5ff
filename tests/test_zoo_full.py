"""Slow: the held-out-like zoo of full-size real exports (bench/zoo_export.py writes it to
/tmp/zoo, or $ADMM_ONNX_ZOO), each pruned by bench/zoo_run.py with default settings but
``--sparsity 0.5`` and a short schedule, then loaded and run in the deployment onnxruntime
(the ``deploy_env`` harness) with an unchanged signature. Skipped when the folder is absent:
the exports are hundreds of MB and need torch, transformers, timm, scikit-learn and tensorflow
to make, which are never dependencies."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ZOO = Path(os.environ.get("ADMM_ONNX_ZOO", "/tmp/zoo"))
MODELS = sorted(p.stem for p in ZOO.glob("*.onnx")) if ZOO.is_dir() else []


@pytest.mark.slow
@pytest.mark.skipif(not MODELS, reason=f"no zoo of exports in {ZOO} (make one with bench/zoo_export.py)")
@pytest.mark.parametrize("name", MODELS)
def test_zoo_export_prunes_and_deploys(name, tmp_path, deploy_env):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "zoo_run.py"), name, "--zoo", str(ZOO), "--out", str(tmp_path),
         "--ort-python", str(deploy_env.python), "--admm", str(Path(sys.executable).with_name("admm-onnx"))],
        capture_output=True, text=True, timeout=1800,
    )
    result = json.loads((tmp_path / "zoo.json").read_text())
    (row,) = result["rows"]
    assert row["result"] == "ok", f"{row['result']}: {row.get('reason')}\n{proc.stdout[-1500:]}"
    assert row["sparsity"] > 0  # zeros among all float matrices (embedding tables are not pruned)
    assert all(o.get("finite", True) for o in row["outputs"].values())
