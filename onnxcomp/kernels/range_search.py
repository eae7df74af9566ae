"""REQuant's range search: per group (or per layer), the clipping ratio α ∈ [α_min, 1] that
minimizes a quantization error, found for all groups at once.

The error of a ratio is only locally convex (rounding makes it bumpy at fine scales), so the
search first scans 16 evenly spaced ratios to bracket the best region, then narrows that
bracket by golden-section steps to 1e-3; the best ratio evaluated anywhere wins: 28
evaluations in all. Every evaluation covers all groups together (arrays, not a loop).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from onnxcomp.kernels.quantize import grouped_view

INVERSE_PHI = (np.sqrt(5.0) - 1.0) / 2.0  # 0.618…
COARSE_POINTS = 16


@dataclass
class SearchResult:
    ratio: np.ndarray  # per group
    error: np.ndarray  # the objective at `ratio`, per group
    evaluations: int  # objective calls, each covering every group


def golden_section_search(
    errors: Callable[[np.ndarray], np.ndarray],
    groups: int,
    minimum: float = 0.2,
    tolerance: float = 1e-3,
) -> SearchResult:
    """Minimize errors(ratios) → per-group errors over ratios in [minimum, 1], per group.

    A scan of COARSE_POINTS evenly spaced ratios brackets each group's best point between its
    neighbours; golden-section steps then shrink the bracket below `tolerance`.
    """
    best_ratio = np.full(groups, np.nan)
    best_error = np.full(groups, np.inf)
    evaluations = 0

    def evaluate(ratios: np.ndarray) -> np.ndarray:
        nonlocal evaluations
        evaluations += 1
        values = np.asarray(errors(ratios), dtype=np.float64)
        better = values < best_error
        best_error[better], best_ratio[better] = values[better], ratios[better]
        return values

    coarse = np.linspace(minimum, 1.0, COARSE_POINTS)
    scan = np.stack([evaluate(np.full(groups, r)) for r in coarse])
    index = scan.argmin(axis=0)
    spacing = coarse[1] - coarse[0]
    low = np.maximum(coarse[index] - spacing, minimum)
    high = np.minimum(coarse[index] + spacing, 1.0)
    left, right = high - INVERSE_PHI * (high - low), low + INVERSE_PHI * (high - low)
    f_left, f_right = evaluate(left), evaluate(right)
    while np.max(high - low) > tolerance:
        go_left = f_left <= f_right  # the minimum lies in [low, right]
        high = np.where(go_left, right, high)
        low = np.where(go_left, low, left)
        new_left = high - INVERSE_PHI * (high - low)
        new_right = low + INVERSE_PHI * (high - low)
        probe = np.where(go_left, new_left, new_right)
        f_probe = evaluate(probe)
        left, right = np.where(go_left, new_left, right), np.where(go_left, left, new_right)
        f_left, f_right = np.where(go_left, f_probe, f_right), np.where(go_left, f_left, f_probe)
    return SearchResult(best_ratio, best_error, evaluations)


class GroupedRounding:
    """Round-to-nearest of one weight under many clipping ratios, fast: the weight is laid
    out by scale group once, each group's extremes found once, and each call only rounds.

    Mirrors `quantize` (same scales, cast to the weight's dtype, same rounding and clipping),
    so the errors it measures are those of the weight finally emitted.
    """

    def __init__(self, source: np.ndarray, target: np.ndarray, grid, axis, block_size, decode=None):
        self.grid, self.dtype, self.decode = grid, source.dtype, decode
        self.source, self.reduce = grouped_view(source.astype(np.float64), axis, block_size)
        self.target = grouped_view(target.astype(np.float64), axis, block_size)[0]
        if grid.asymmetric:
            self.low = np.minimum(self.source.min(axis=self.reduce, keepdims=True), 0.0)
            self.high = np.maximum(self.source.max(axis=self.reduce, keepdims=True), 0.0)
        else:
            peak = np.expand_dims(np.abs(self.source).argmax(axis=self.reduce), self.reduce)
            self.extreme = np.take_along_axis(self.source, peak, axis=self.reduce)
        self.stat_shape = self.source.sum(axis=self.reduce).shape

    def _expand(self, ratio) -> np.ndarray:
        return np.expand_dims(np.broadcast_to(np.asarray(ratio, dtype=np.float64), self.stat_shape), self.reduce)

    def errors(self, ratio, low_ratio=None) -> np.ndarray:
        """Squared error per scale group (in `stat_shape`) of the decoded weight."""
        grid = self.grid
        if grid.asymmetric:
            low = self.low * self._expand(ratio if low_ratio is None else low_ratio)
            high = self.high * self._expand(ratio)
            scale = ((high - low) / (grid.qmax - grid.qmin)).astype(self.dtype).astype(np.float64)
            scale = np.where(np.isfinite(scale) & (scale != 0), scale, 1.0)
            zero = np.clip(np.rint(grid.qmin - low / scale), grid.qmin, grid.qmax)
            decoded = (np.clip(np.rint(self.source / scale) + zero, grid.qmin, grid.qmax) - zero) * scale
        else:
            scale = (self.extreme * self._expand(ratio) / grid.qmin).astype(self.dtype).astype(np.float64)
            scale = np.where(np.isfinite(scale) & (scale != 0), scale, 1.0)
            decoded = np.clip(np.rint(self.source / scale), grid.qmin, grid.qmax) * scale
        if self.decode is not None:
            decoded = self.decode(decoded)
        return np.square(self.target - decoded).sum(axis=self.reduce)
