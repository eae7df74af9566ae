"""Streaming accumulators: memory fixed by the layer's size, never by the number of samples."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

# Rows multiplied at once when accumulating XᵀX: bounds the float64 copy of a chunk.
_GRAM_CHUNK_ELEMENTS = 1 << 24


class Gram:
    """H = XᵀX per group (float64), and the rows' sum, over every row the layer has
    multiplied so far.

    Rows wait in a buffer until there are max(reduction, `MIN_PRODUCT_ROWS`) of them: XᵀX
    over a thin slice of rows runs far below the machine's speed. The buffer stays about the
    size of H (or of 1024 rows, for narrow layers), whatever the number of samples.
    """

    MIN_PRODUCT_ROWS = 1024

    def __init__(self, matrix: np.ndarray, sums: np.ndarray, rows: int = 0):
        self._matrix, self._sums, self.rows = matrix, sums, rows
        self._pending: list[np.ndarray] = []
        self._pending_rows = 0

    @classmethod
    def empty(cls, groups: int, reduction: int) -> Gram:
        return cls(np.zeros((groups, reduction, reduction)), np.zeros((groups, reduction)))

    @property
    def matrix(self) -> np.ndarray:
        """(groups, reduction, reduction)."""
        self._flush()
        return self._matrix

    @property
    def sums(self) -> np.ndarray:
        """(groups, reduction)."""
        self._flush()
        return self._sums

    @property
    def mean(self) -> np.ndarray:
        """E[x] per group: the mean input row."""
        return self.sums / max(self.rows, 1)

    def add(self, rows: np.ndarray) -> None:
        """rows: (groups, n, reduction)."""
        self._pending.append(rows.astype(np.float64))
        self._pending_rows += rows.shape[1]
        self.rows += rows.shape[1]
        if self._pending_rows >= max(self._matrix.shape[-1], self.MIN_PRODUCT_ROWS):
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        rows = self._pending[0] if len(self._pending) == 1 else np.concatenate(self._pending, axis=1)
        self._pending, self._pending_rows = [], 0
        step = max(1, _GRAM_CHUNK_ELEMENTS // max(1, rows.shape[0] * rows.shape[2]))
        for start in range(0, rows.shape[1], step):
            chunk = rows[:, start : start + step]
            self._matrix += np.matmul(chunk.transpose(0, 2, 1), chunk)
            self._sums += chunk.sum(axis=1)


@dataclass
class Histogram:
    """Counts of values in bins of width 2**exponent, bin i covering [i·w, (i+1)·w).

    Bins are anchored at zero and widths are powers of two, so when the range outgrows
    `max_bins` the width doubles by merging neighbouring bins exactly. The width is always
    the finest (down to 2**MIN_EXPONENT) that covers every value seen in `max_bins` bins,
    so the histogram of a stream is the same whatever its batch boundaries.
    """

    MIN_EXPONENT = -40

    max_bins: int = 4096
    exponent: int | None = None
    first: int = 0  # index of counts[0]
    counts: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @property
    def width(self) -> float:
        return math.ldexp(1.0, self.exponent) if self.exponent is not None else 0.0

    def edges(self) -> np.ndarray:
        return (self.first + np.arange(len(self.counts) + 1)) * self.width

    def add(self, values: np.ndarray) -> None:
        values = values.ravel()
        if values.size == 0:
            return
        low, high = float(values.min()), float(values.max())
        if self.exponent is None:
            self.exponent = self._finest_exponent(low, high)
            self.first = math.floor(low / self.width)
        low_index = min(self.first, math.floor(low / self.width))
        high_index = max(self.first + len(self.counts) - 1, math.floor(high / self.width))
        while high_index - low_index + 1 > self.max_bins:
            self._coarsen()
            low_index, high_index = low_index // 2, high_index // 2
        self._extend(low_index, high_index)
        index = (np.floor(values.astype(np.float64) / self.width) - float(self.first)).astype(np.int64)
        self.counts += np.bincount(index, minlength=len(self.counts))

    def _finest_exponent(self, low: float, high: float) -> int:
        def fits(exponent: int) -> bool:
            width = math.ldexp(1.0, exponent)
            return math.floor(high / width) - math.floor(low / width) + 1 <= self.max_bins

        exponent = max(self.MIN_EXPONENT, math.frexp(max(high - low, 1e-300) / self.max_bins)[1])
        while exponent > self.MIN_EXPONENT and fits(exponent - 1):
            exponent -= 1
        while not fits(exponent):
            exponent += 1
        return exponent

    def _coarsen(self) -> None:
        """Double the bin width, merging each pair of neighbouring bins."""
        if len(self.counts):
            merged = (self.first + np.arange(len(self.counts))) // 2 - self.first // 2
            self.counts = np.bincount(merged, weights=self.counts).astype(np.int64)
        self.first //= 2
        self.exponent += 1

    def _extend(self, low_index: int, high_index: int) -> None:
        """Grow the bin array to cover [low_index, high_index]."""
        if len(self.counts) == 0:
            self.first, self.counts = low_index, np.zeros(high_index - low_index + 1, dtype=np.int64)
            return
        before, after = self.first - low_index, high_index - (self.first + len(self.counts) - 1)
        if before or after:
            self.counts = np.pad(self.counts, (before, after))
            self.first = low_index


@dataclass
class ActivationStatistics:
    """Range and distribution of one activation tensor over the calibration set."""

    minimum: float = math.inf
    maximum: float = -math.inf
    count: int = 0
    histogram: Histogram = field(default_factory=Histogram)
    # Per channel (the last axis: a token's features; axis 1 for a convolution's input):
    # min, max and mean square, reduced over every other axis, whatever each sample's size.
    channel_axis: int = -1
    channel_min: np.ndarray | None = None
    channel_max: np.ndarray | None = None
    channel_sum_squares: np.ndarray | None = None
    channels_vary: bool = False  # the axis changed size between batches: no per-channel statistics
    rows: int = 0

    def add(self, values: np.ndarray) -> None:
        """`values` must be finite (the collector checks)."""
        if values.size == 0:
            return
        self.minimum = min(self.minimum, float(values.min()))
        self.maximum = max(self.maximum, float(values.max()))
        self.count += int(values.size)
        self.histogram.add(values)
        needed = self.channel_axis + 1 if self.channel_axis >= 0 else -self.channel_axis
        if values.ndim >= needed and not self.channels_vary:
            channels = np.moveaxis(values, self.channel_axis, -1)
            rows = channels.reshape(-1, channels.shape[-1]).astype(np.float64)
            low, high, squares = rows.min(axis=0), rows.max(axis=0), np.einsum("ij,ij->j", rows, rows)
            if self.channel_min is None:
                self.channel_min, self.channel_max, self.channel_sum_squares = low, high, squares
            elif len(low) == len(self.channel_min):
                self.channel_min = np.minimum(self.channel_min, low)
                self.channel_max = np.maximum(self.channel_max, high)
                self.channel_sum_squares = self.channel_sum_squares + squares
            else:  # the axis changes size, so it is no channel axis: keep the range and histogram only
                self.channel_min = self.channel_max = self.channel_sum_squares = None
                self.channels_vary = True
                return
            self.rows += rows.shape[0]

    @property
    def channel_mean_square(self) -> np.ndarray:
        return self.channel_sum_squares / max(self.rows, 1)


@dataclass
class LayerStatistics:
    """What one layer's data input looked like: its Gram matrix and how many samples fed it."""

    gram: Gram
    samples: int = 0
