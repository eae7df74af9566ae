"""`calib-info`: what a calibration set holds, per input, without running the model."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from onnxcomp.calibration.sources import CalibrationSet
from onnxcomp.report import format_table


@dataclass
class InputSummary:
    name: str
    dtype: str
    samples: int = 0
    batches: int = 0
    shape_min: list[int] = field(default_factory=list)  # per axis after the sample axis
    shape_max: list[int] = field(default_factory=list)
    minimum: float = float("inf")
    maximum: float = float("-inf")
    mean: float = 0.0
    std: float = 0.0
    _sum: float = 0.0
    _sum_squares: float = 0.0
    _count: int = 0

    def add(self, array: np.ndarray) -> None:
        dims = list(array.shape[1:])
        self.shape_min = dims if not self.shape_min else [min(a, b) for a, b in zip(self.shape_min, dims)]
        self.shape_max = dims if not self.shape_max else [max(a, b) for a, b in zip(self.shape_max, dims)]
        self.samples += array.shape[0]
        self.batches += 1
        if array.size:
            values = array.astype(np.float64)
            self.minimum = min(self.minimum, float(values.min()))
            self.maximum = max(self.maximum, float(values.max()))
            self._sum += float(values.sum())
            self._sum_squares += float(np.square(values).sum())
            self._count += values.size
            self.mean = self._sum / self._count
            self.std = float(np.sqrt(max(self._sum_squares / self._count - self.mean**2, 0.0)))


def summarize(calibration: CalibrationSet) -> list[InputSummary]:
    summaries: dict[str, InputSummary] = {}
    for batch in calibration.batches():
        for name, array in batch.items():
            summaries.setdefault(name, InputSummary(name, str(array.dtype))).add(array)
    return list(summaries.values())


def summary_table(calibration: CalibrationSet, summaries: list[InputSummary]) -> str:
    rows = [("input", "dtype", "samples", "batches", "shape (per sample)", "min", "max", "mean", "std")]
    for s in summaries:
        shape = "x".join(f"{a}" if a == b else f"{a}..{b}" for a, b in zip(s.shape_min, s.shape_max)) or "scalar"
        rows.append((s.name, s.dtype, str(s.samples), str(s.batches), shape, f"{s.minimum:.4g}", f"{s.maximum:.4g}", f"{s.mean:.4g}", f"{s.std:.4g}"))
    return f"source: {calibration.label}\n" + format_table(rows)
