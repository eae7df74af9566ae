"""Properties of the quantization kernel: grids, error bounds, layouts, packing round trips."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from onnxcomp.kernels.quantize import dequantize, expand, grid_for, quantize, relative_mse

finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)
weights = hnp.arrays(np.float32, st.tuples(st.integers(1, 6), st.sampled_from([4, 8, 16])), elements=finite)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_symmetric_grid_uses_every_level(bits):
    grid = grid_for(bits, asymmetric=False)
    assert grid.qmax - grid.qmin + 1 == 2**bits
    assert grid.qmin < 0 < grid.qmax or bits == 2 and grid.qmin == -2


@settings(max_examples=200, deadline=None)
@given(weights, st.sampled_from([2, 3, 4, 8]), st.booleans(), st.sampled_from(["tensor", "channel", "block"]))
def test_codes_on_grid_and_error_bounded(w, bits, asymmetric, layout):
    grid = grid_for(bits, asymmetric)
    axis, block = {"tensor": (None, None), "channel": (0, None), "block": (1, 4)}[layout]
    qt = quantize(w, grid, axis=axis, block_size=block)
    assert qt.q.min() >= grid.qmin and qt.q.max() <= grid.qmax
    w_hat = dequantize(qt).astype(np.float64)
    step = np.abs(expand(qt.scale, w.shape, axis, block).astype(np.float64))
    # Max-range scaling clips at most one step on the short side; elsewhere within half a step.
    assert np.all(np.abs(w.astype(np.float64) - w_hat) <= step * (1 + 1e-6) + 1e-30)


@settings(max_examples=100, deadline=None)
@given(weights, st.sampled_from([2, 4, 8]))
def test_largest_weight_of_each_group_is_exact(w, bits):
    qt = quantize(w, grid_for(bits, False), axis=0)
    w_hat = dequantize(qt)
    rows = np.arange(w.shape[0])
    peak = np.abs(w).argmax(axis=1)
    np.testing.assert_allclose(w_hat[rows, peak], w[rows, peak], rtol=1e-6, atol=1e-30)


@settings(max_examples=100, deadline=None)
@given(weights, st.sampled_from([2, 4, 8]))
def test_asymmetric_keeps_zero_exact(w, bits):
    w = w.copy()
    w[:, 0] = 0.0
    w_hat = dequantize(quantize(w, grid_for(bits, True), axis=0))
    assert np.all(w_hat[:, 0] == 0.0)


def test_blockwise_layout_matches_dequantizelinear():
    w = np.random.default_rng(0).normal(size=(64, 6)).astype(np.float32)
    qt = quantize(w, grid_for(4, False), axis=0, block_size=32)
    assert qt.scale.shape == (2, 6)
    per_channel = quantize(w, grid_for(4, False), axis=1)
    assert per_channel.scale.shape == (6,)
    assert quantize(w, grid_for(4, False)).scale.shape == ()


def test_more_bits_less_error():
    w = np.random.default_rng(1).standard_t(3, size=(128, 64)).astype(np.float32)
    errors = [relative_mse(w, dequantize(quantize(w, grid_for(b, False), axis=1))) for b in (2, 3, 4, 8)]
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] < 5e-4  # heavy tails (Student-t, 3 dof) at 8 bits per channel


def test_all_zero_weight_stays_zero():
    w = np.zeros((4, 8), np.float32)
    qt = quantize(w, grid_for(4, False), axis=0)
    assert np.all(np.isfinite(qt.scale)) and np.all(dequantize(qt) == 0)


@settings(max_examples=100, deadline=None)
@given(
    st.sampled_from([(ir.DataType.INT4, ml_dtypes.int4, -8, 7), (ir.DataType.UINT4, ml_dtypes.uint4, 0, 15),
                     (ir.DataType.INT2, ml_dtypes.int2, -2, 1), (ir.DataType.UINT2, ml_dtypes.uint2, 0, 3)]),
    st.lists(st.integers(1, 7), min_size=1, max_size=3),
    st.integers(0, 2**32 - 1),
)
def test_packed_initializer_round_trips(tmp_path_factory, kind, shape, seed):
    onnx_type, np_type, lo, hi = kind
    values = np.random.default_rng(seed).integers(lo, hi + 1, size=shape)
    tensor = ir.Tensor(values.astype(np_type), dtype=onnx_type, name="w")
    proto = ir.serde.serialize_tensor(tensor)
    back = ir.serde.deserialize_tensor(proto).numpy().astype(np.int32)
    assert np.array_equal(back, values)
    bits = 4 if onnx_type in (ir.DataType.INT4, ir.DataType.UINT4) else 2
    assert len(proto.raw_data) == (values.size * bits + 7) // 8


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("layout", [(None, None), (0, None), (1, 16)])
def test_positive_scales_decode_to_the_same_values(bits, layout):
    from onnxcomp.kernels.quantize import positive_scales

    w = np.random.default_rng(bits).normal(size=(8, 32)).astype(np.float32)
    qt = quantize(w, grid_for(bits, False), axis=layout[0], block_size=layout[1])
    positive = positive_scales(qt)
    zero = positive.zero_point if positive.zero_point is not None else np.zeros(1)  # None: no scale was negative
    assert (positive.scale > 0).all() and set(np.unique(zero)) <= {-1, 0}
    assert positive.q.min() >= -(2 ** (bits - 1)) and positive.q.max() <= 2 ** (bits - 1) - 1
    np.testing.assert_array_equal(dequantize(positive), dequantize(qt))
