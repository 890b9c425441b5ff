"""Channel analysis + default shrink + shrunk == masked on real exports (issue 13's held-out
check): the small zoo fixtures in tests/fixtures/zoo (fast) and, when present, the full-size
exports the zoo helper writes to /tmp/zoo (bench/zoo_export.py; slow). Every model is analysed
(what is blocked says why, nothing crashes); every prunable one shrinks with the default
budget (half the channels of every group, kept counts rounded up to multiples of 8) and
computes what the masked model computes in ORT."""
from __future__ import annotations

import glob
import os
from pathlib import Path

import numpy as np
import pytest

from admm_onnx.io import load_model
from admm_onnx.structured import analyse, masked, shrink, verify
from admm_onnx.structured.targets import ChannelTargets
from admm_onnx.structured.untie import untie_constants

FIXTURES = Path(__file__).parent / "fixtures" / "zoo"
FULL = Path(os.environ.get("ADMM_ONNX_ZOO", "/tmp/zoo"))
# Full-size exports whose analysis must find prunable groups (issue 13: ResNet-18,
# EfficientNet-B0, MobileNetV3, RegNetX, ConvNeXt, ViT MLPs).
MUST_PRUNE = ("timm_resnet18", "timm_efficientnet_b0", "timm_mobilenetv3_large", "timm_regnetx_002",
              "timm_convnext_atto", "timm_vit_tiny")


def _check(path: Path):
    model, _ = untie_constants(load_model(path))
    a = analyse(model)
    for g in a.groups:  # a group is prunable, or blocked with a reason, or has nothing to cut
        assert g.prunable or g.blocked or not g.members or g.size <= 1, g.name
    if not a.prunable:
        return a, None
    counts = ChannelTargets(sparsity=0.5).keep_counts(a)
    rng = np.random.default_rng(0)
    sizes = {g.id: g.size for g in a.groups}
    keep = {gid: np.sort(rng.choice(sizes[gid], k, replace=False)) for gid, k in counts.items()}
    small = shrink(model, a, keep)
    verify(masked(model, a, keep), small)
    assert a.counts(keep)["params"] < a.counts()["params"]
    return a, small


@pytest.mark.parametrize("name", sorted(p.name for p in FIXTURES.glob("*.onnx")))
def test_zoo_fixtures_analyse_and_shrink(name):
    _check(FIXTURES / name)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(Path(p).stem for p in glob.glob(str(FULL / "*.onnx"))) or ["none"])
def test_full_size_exports_shrink_with_default_settings(name):
    if name == "none":
        pytest.skip(f"no exports in {FULL} (bench/zoo_export.py writes them)")
    a, small = _check(FULL / f"{name}.onnx")
    if name.split("_dynamo")[0] in MUST_PRUNE:
        assert small is not None and len(a.prunable) >= 5, [g.blocked for g in a.groups]
