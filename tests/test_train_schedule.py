"""Dense training schedules (pipeline.train)."""
from __future__ import annotations

import onnx
import pytest

from admm_onnx.config import PruneConfig
from admm_onnx.pipeline import make_readers, prepare_model



def test_dense_training_with_a_cosine_schedule(tmp_path, monkeypatch):
    """train(..., schedule="cosine") decays the rate from config.lr to 0 over all its steps."""
    import admm_onnx.pipeline as pipeline
    from admm_onnx.data import load_dataset
    from admm_onnx.errors import ConfigError
    from admm_onnx.models import build

    data = load_dataset("digits")
    src = tmp_path / "l5.onnx"
    onnx.save(build("lenet5", input_shape=(1, 8, 8), num_classes=10), src)
    prepared = prepare_model(src)
    tr, ev, _ = make_readers(prepared, data, 64)
    seen = []
    real = pipeline.cosine_schedule

    def spy(lr, total):
        sched = real(lr, total)
        seen.append((lr, total, sched))
        return sched

    monkeypatch.setattr(pipeline, "cosine_schedule", spy)
    rep = pipeline.train(prepared, tmp_path / "d.onnx", tr, 2, ev, PruneConfig(lr=3e-3, batch_size=64), schedule="cosine")
    (lr, total, sched), = seen
    assert lr == 3e-3 and total == 2 * len(tr)
    assert sched(0) == 3e-3 and sched(total) == 0.0 and rep.accuracy_after > 0.5
    with pytest.raises(ConfigError, match="schedule"):
        pipeline.train(prepared, tmp_path / "e.onnx", tr, 1, None, PruneConfig(), schedule="linear")
