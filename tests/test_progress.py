"""Progress in the API (a callback, a ready text bar) and the CLI's --log-file."""
from __future__ import annotations

import io

import admm_onnx
from admm_onnx.cli.main import main
from admm_onnx.data import ArrayReader

FAST = dict(admm_iters=1, retrain_epochs=1, batch_size=32)


def test_prune_calls_a_plain_callable(lenet5_small, data, tmp_path):
    events = []
    train = ArrayReader(data.x_train, data.y_train, 32)
    config = admm_onnx.PruneConfig(**FAST).with_sparsity(0.5)
    admm_onnx.prune(lenet5_small, tmp_path / "p.onnx", train, config, progress=events.append)
    kinds = [e.kind for e in events]
    assert kinds[0] == "start" and kinds[-1] == "finish" and "advance" in kinds
    starts = [e for e in events if e.kind == "start"]
    assert [e.label for e in starts] == ["ADMM 1/1", "retrain 1/1"]
    ends = [e for e in events if e.kind == "finish"]
    assert all(e.done == e.total > 0 for e in ends)


def test_text_progress_on_a_file_is_one_line_per_phase():
    stream = io.StringIO()
    bar = admm_onnx.TextProgress(stream)
    for label in ("ADMM 1/2", "ADMM 2/2"):
        bar.start(5, label)
        for _ in range(5):
            bar.advance()
        bar.finish()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("ADMM 1/2: 100%|") and "5/5" in lines[0]


def test_log_file_gets_the_log_even_when_quiet(lenet5_small, data_npz, tmp_path, capsys):
    log = tmp_path / "run.log"
    code = main(["--log-file", str(log), "prune", str(lenet5_small), "-d", str(data_npz), "-o", str(tmp_path / "p.onnx"),
                 "--sparsity", "0.5", "--admm-iters", "1", "--retrain-epochs", "1", "-q"])
    assert code == 0
    text = log.read_text()
    assert "ADMM 1/1" in text and "retrain 1/1" in text and " INFO " in text
    err = capsys.readouterr().err
    assert "ADMM 1/1" not in err  # -q: nothing per epoch on the terminal
    assert not any(line.strip() in ("ADMM 1/1", "retrain 1/1") for line in err.splitlines())
