"""Activation quantization ranges from a calibration histogram, and their uint8 parameters."""

from __future__ import annotations

import numpy as np

from onnxcomp.calibration.statistics import ActivationStatistics
from onnxcomp.config import ACTIVATION_METHODS

_MSE_CANDIDATES = 256


def quantization_params(low: float, high: float, bits: int = 8) -> tuple[np.float32, np.uint8]:
    """Scale and zero point of an unsigned grid covering [low, high] and exactly 0 (which
    padding and ReLU outputs need represented without error)."""
    low, high = min(low, 0.0), max(high, 0.0)
    levels = 2**bits - 1
    scale = (high - low) / levels if high > low else 1.0
    zero_point = int(np.clip(round(-low / scale), 0, levels))
    return np.float32(scale), np.uint8(zero_point)


def _percentile_range(stats: ActivationStatistics, percentile: float) -> tuple[float, float]:
    """The values below which (100 − p)/100 and p/100 of the mass lie, read off bin edges
    on the side that keeps more of the range."""
    hist = stats.histogram
    cumulative = np.cumsum(hist.counts)
    total = cumulative[-1]
    edges = hist.edges()
    tail = total * (100.0 - percentile) / 100.0
    low = edges[int(np.searchsorted(cumulative, tail, side="right"))]
    high = edges[int(np.searchsorted(cumulative, total - tail, side="left")) + 1]
    return max(float(low), stats.minimum), min(float(high), stats.maximum)


def _mse_range(stats: ActivationStatistics, bits: int) -> tuple[float, float]:
    """Shrink [min, max] towards zero by the factor t that minimizes the expected squared
    error over the histogram: rounding noise scale²/12 inside the range, clipping outside."""
    hist = stats.histogram
    edges = hist.edges()
    centers = (edges[:-1] + edges[1:]) / 2
    weights = hist.counts.astype(np.float64)
    t = np.linspace(1.0 / _MSE_CANDIDATES, 1.0, _MSE_CANDIDATES)[:, None]
    low, high = np.minimum(t * stats.minimum, 0.0), np.maximum(t * stats.maximum, 0.0)
    scale = (high - low) / (2**bits - 1)
    clipped = np.clip(centers[None, :], low, high)
    inside = clipped == centers[None, :]
    error = np.where(inside, scale**2 / 12.0, (centers[None, :] - clipped) ** 2) @ weights
    best = int(np.flatnonzero(error <= error.min() * (1 + 1e-12))[-1])  # ties: the wider range
    return float(low[best, 0]), float(high[best, 0])


def activation_range(stats: ActivationStatistics, method: str = "minmax", percentile: float = 99.99, bits: int = 8) -> tuple[float, float]:
    """[low, high] to quantize this activation to, by `method` (see ACTIVATION_METHODS)."""
    if stats.count == 0:
        raise ValueError("no calibration values were seen")
    if method == "minmax":
        return stats.minimum, stats.maximum
    if method == "percentile":
        return _percentile_range(stats, percentile)
    if method == "mse":
        return _mse_range(stats, bits)
    raise ValueError(f"unknown range method {method!r}; choose one of {', '.join(ACTIVATION_METHODS)}")
