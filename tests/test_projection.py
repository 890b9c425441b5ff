import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from admm_onnx.projection import keep_count, project, projection_mask, slice_mask, topk_mask, zero_count

finite = st.floats(-1e6, 1e6, allow_nan=False, width=32, allow_subnormal=False)
tensors = arrays(np.float32, st.tuples(st.integers(1, 12), st.integers(1, 12)), elements=finite)
sparsities = st.floats(0.0, 0.999, allow_subnormal=False)  # training flushes denormals on this thread


def test_keeps_exactly_the_k_largest_magnitudes():
    x = np.array([0.1, -5.0, 3.0, -0.2, 4.0, 0.0, 2.5, -1.0], np.float32)
    z = project(x, 0.5)
    assert np.count_nonzero(z) == 4
    np.testing.assert_array_equal(z, [0, -5.0, 3.0, 0, 4.0, 0, 2.5, 0])


def test_zero_count_rounds_up_and_absorbs_float_error():
    assert zero_count(10, 0.7) == 7
    assert zero_count(10, 0.71) == 8
    assert zero_count(3, 0.5) == 2
    assert keep_count(430500, 0.99) == 4305


def test_ties_broken_deterministically_with_exact_count():
    x = np.ones((4, 5), np.float32)
    m = topk_mask(x, 0.5)
    assert m.sum() == 10
    assert m.ravel()[:10].all()


def test_structured_filter_and_channel():
    w = np.zeros((4, 3, 2, 2), np.float32)
    w[1] = 5.0
    w[3] = 1.0
    w[0, 0] = 0.5
    m = projection_mask(w, 0.5, "filter", out_axis=0, in_axis=1)
    assert m[1].all() and m[3].all() and not m[0].any() and not m[2].any()
    c = slice_mask(np.arange(12, dtype=np.float32).reshape(3, 4), 0.5, axis=1)
    assert c[:, 2:].all() and not c[:, :2].any()


def test_rejects_bad_sparsity():
    with pytest.raises(ValueError):
        project(np.ones(3), 1.0)
    with pytest.raises(ValueError):
        project(np.ones(3), -0.1)


@settings(max_examples=200, deadline=None)
@given(tensors, sparsities)
def test_exact_number_of_zeros_kept_entries_unchanged_idempotent(x, s):
    z = project(x, s)
    m = topk_mask(x, s)
    assert m.sum() == keep_count(x.size, s)
    # kept entries unchanged, the rest exactly zero
    np.testing.assert_array_equal(z[m], x[m])
    assert not z[~m].any()
    # at least the requested fraction of entries is zero (more only if x had zeros)
    assert np.count_nonzero(z) <= keep_count(x.size, s)
    # idempotent
    np.testing.assert_array_equal(project(z, s), z)
    # nothing outside the kept set is larger in magnitude than anything kept
    if m.any() and (~m).any():
        assert np.abs(x[~m]).max() <= np.abs(x[m]).min()


@settings(max_examples=100, deadline=None)
@given(tensors, sparsities, st.sampled_from(["filter", "channel"]))
def test_structured_projection_zeroes_whole_slices(x, s, structure):
    z = project(x, s, structure, out_axis=0, in_axis=1)
    axis = 0 if structure == "filter" else 1
    kept = np.moveaxis(z != 0, axis, 0).reshape(x.shape[axis], -1).any(axis=1)
    assert kept.sum() <= keep_count(x.shape[axis], s)
    np.testing.assert_array_equal(project(z, s, structure, 0, 1), z)
