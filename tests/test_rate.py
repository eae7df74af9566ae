"""Rate-aware rounding: fewer bits for a bounded error, and nothing changes at λ = 0."""

from __future__ import annotations

import numpy as np
import pytest

from onnxcomp.kernels.quantize import dequantize, grid_for, quantize
from onnxcomp.kernels.rate import code_costs, rate_aware


def entropy_bits(codes: np.ndarray) -> float:
    """Order-0 entropy of the codes, in bits per code (what the coder approaches)."""
    _, counts = np.unique(codes, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def _weights(seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_t(4, size=(64, 256)) * 0.02).astype(np.float32)  # heavy-tailed, as trained weights are


def _objective(w, qt, lam):
    """Mean squared error in squared steps plus λ times the mean code length under the codes' own histogram."""
    decoded = dequantize(qt).astype(np.float64)
    s = np.repeat(qt.scale.astype(np.float64), qt.q.shape[1] // qt.scale.shape[1], axis=1)
    error = ((w - decoded) / s) ** 2
    return float(error.mean() + lam * code_costs(qt.q, grid_for(4, False))[qt.q - grid_for(4, False).qmin].mean())


@pytest.mark.parametrize("asymmetric", [False, True])
def test_lambda_zero_is_round_to_nearest(asymmetric):
    w = _weights()
    qt = quantize(w, grid_for(4, asymmetric), axis=1, block_size=32)
    assert rate_aware(w, qt, grid_for(4, asymmetric), 0.0) is qt


@pytest.mark.parametrize("asymmetric", [False, True])
def test_larger_lambda_spends_fewer_bits_for_more_error(asymmetric):
    w = _weights(1)
    grid = grid_for(4, asymmetric)
    qt = quantize(w, grid, axis=1, block_size=32)
    entropies, errors = [], []
    for lam in (0.0, 0.05, 0.2, 0.8):
        out = rate_aware(w, qt, grid, lam)
        assert np.abs(out.q - qt.q).max() <= 1 and out.q.min() >= grid.qmin and out.q.max() <= grid.qmax
        assert out.scale is qt.scale and out.zero_point is qt.zero_point  # the grid stays, only the codes move
        entropies.append(entropy_bits(out.q))
        errors.append(float(np.mean((w - dequantize(out)) ** 2)))
    assert entropies == sorted(entropies, reverse=True) and entropies[-1] < entropies[0] - 0.3
    assert errors == sorted(errors)


def test_it_lowers_its_own_objective_below_round_to_nearest():
    w = _weights(2)
    grid = grid_for(4, False)
    qt = quantize(w, grid, axis=1, block_size=32)
    for lam in (0.05, 0.3):
        assert _objective(w, rate_aware(w, qt, grid, lam), lam) < _objective(w, qt, lam)


def test_code_costs_are_minus_log2_of_the_smoothed_histogram():
    grid = grid_for(2, False)  # levels -2..1
    costs = code_costs(np.array([0, 0, 0, 1]), grid)
    np.testing.assert_allclose(costs, -np.log2(np.array([1, 1, 4, 2]) / 8))
