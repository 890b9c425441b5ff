"""Divergence stops with advice and keeps the last good state; the config parser never crashes."""
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from admm_onnx.cli.main import main
from admm_onnx.config import config_from_dict
from admm_onnx.errors import ConfigError


def test_divergence_stops_with_advice_and_keeps_state(lenet5_small, data_npz, tmp_path, capsys):
    out = tmp_path / "out.onnx"
    code = main(["prune", str(lenet5_small), "-d", str(data_npz), "-o", str(out), "--sparsity", "0.5",
                 "--lr", "1e9", "--admm-iters", "3", "--retrain-epochs", "1", "--batch-size", "32", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert "diverged" in err and "lower --lr" in err and "--resume" in err and "\n" not in err
    assert not out.exists()
    assert json.loads((tmp_path / "out.onnx.admm-work" / "progress.json").read_text())["phase"] == "admm"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=True, allow_subnormal=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=10,
)
keys = st.sampled_from(
    ["sparsity", "rules", "rho", "rho_growth", "admm_iters", "lr", "batch_size", "seed", "loss", "optimizer",
     "retrain_epochs", "epochs_per_iter", "output", "names", "op_types", "structure", "exclude", "bogus",
     "bits", "rho_mode", "admm_tol", "rho_ratio"]
)
rule = st.dictionaries(st.sampled_from(["sparsity", "names", "op_types", "rho", "structure", "exclude", "bits", "quant_scale", "x"]),
                      json_values, max_size=4)
configs = st.dictionaries(keys, json_values | st.lists(rule, max_size=3), max_size=6)


@settings(max_examples=300, deadline=None)
@given(configs)
def test_config_parser_only_ever_raises_config_errors(data):
    try:
        config_from_dict(data)
    except ConfigError as exc:
        assert "\n" not in exc.one_line()


@settings(max_examples=100, deadline=None)
@given(st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=False))
def test_any_sparsity_value_is_accepted_or_refused_cleanly(value):
    try:
        config = config_from_dict({"sparsity": value})
        assert 0 <= config.rules[0].sparsity < 1
    except ConfigError:
        assert not (0 <= value < 1)
