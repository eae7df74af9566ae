"""The calibration of one compression run: data opened once, statistics computed once and
shared by every pass that asks, until a pass that changes weights marks them stale."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable

import onnx_ir as ir

from onnxcomp.calibration.collect import DEFAULT_MEMORY_BUDGET, Statistics, collect
from onnxcomp.calibration.sources import CalibOptions, CalibrationSet, Feeds, open_calibration
from onnxcomp.errors import ConfigError
from onnxcomp.feeds import index_bounds, input_specs
from onnxcomp.layers import WeightLayer

NO_DATA = "none"


class CalibrationWarning(UserWarning):
    """Statistics that will not represent real inputs."""


class Calibration:
    """Calibration data (a path, feeds, None for synthetic inputs, or "none" to forbid them)
    and a cache of the statistics computed from it.

    Statistics are cached per layer node and per value; `mark_stale()` drops them all, so
    the next request runs the model again on the weights as they are then.
    """

    def __init__(
        self,
        data: str | os.PathLike | Iterable[Feeds] | None = None,
        options: CalibOptions = CalibOptions(),
        *,
        device: str = "cpu",
        progress: bool = False,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
    ):
        self.data = data
        self.options = options
        self.device = device
        self.progress = progress
        self.memory_budget = memory_budget
        self._set: CalibrationSet | None = None
        self._cache = Statistics()
        self.runs = 0  # how many times the model was run over the calibration set

    @property
    def user_data(self) -> bool:
        """True when the user gave real data (not synthetic, not forbidden)."""
        return self.data is not None and not (isinstance(self.data, str) and self.data == NO_DATA)

    @property
    def label(self) -> str | None:
        return self._set.label if self._set else None

    def dataset(self, model: ir.Model, purpose: str) -> CalibrationSet:
        """The calibration set, opened (and checked against the model) on first use."""
        if self._set is None:
            if isinstance(self.data, str) and self.data == NO_DATA:
                raise ConfigError(
                    f"{purpose} needs calibration data and --calib none forbids synthetic inputs; "
                    "pass --calib with an .npz or a folder of real inputs"
                )
            self._set = open_calibration(self.data, input_specs(model), index_bounds(model), self.options)
            if self._set.synthetic:
                warnings.warn(
                    f"{purpose} uses synthetic calibration inputs made from the input types; its statistics "
                    "do not represent real data: pass --calib with an .npz or a folder of real inputs",
                    CalibrationWarning,
                    stacklevel=2,
                )
        return self._set

    def statistics(
        self, model: ir.Model, purpose: str, layers: Iterable[WeightLayer] = (), values: Iterable[ir.Value] = ()
    ) -> Statistics:
        """Gram matrices of `layers` and ranges of `values`, computed only where not cached."""
        layers, values = list(layers), list(values)
        missing_layers = [l for l in layers if l not in self._cache.layers and l not in self._cache.skipped]
        missing_values = [v for v in values if v not in self._cache.activations]
        if missing_layers or missing_values:
            fresh = collect(
                model, self.dataset(model, purpose), missing_layers, missing_values,
                device=self.device, progress=self.progress, memory_budget=self.memory_budget,
            )
            self.runs += 1
            self._cache.layers.update(fresh.layers)
            self._cache.activations.update(fresh.activations)
            self._cache.skipped.update(fresh.skipped)
        return self._cache

    def mark_stale(self) -> None:
        """Weights changed: what the layers see is no longer what was measured."""
        self._cache = Statistics()
