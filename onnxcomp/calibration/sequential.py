"""Input statistics for quantizing layers in order against the unquantized model's outputs.

A layer quantized after others receives inputs X̃ that those layers' errors have already
moved away from the unquantized model's X. Its output error against what the unquantized
model computes, ‖X̃Ŵ − XW‖², weighs both: it needs H̃ = X̃ᵀX̃, the cross product C = X̃ᵀX and
H = XᵀX. A layer whose choices make up for the drift upstream scores better than one that
is only faithful to its own weight.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import TopologicalSortPass
from onnxcomp.progress import stage

from onnxcomp.calibration.collect import FetchSession, fetchable, row_chunks, same_rows
from onnxcomp.calibration.sources import CalibrationSet
from onnxcomp.calibration.statistics import Gram
from onnxcomp.errors import CalibrationError
from onnxcomp.layer_matrix import UnsupportedLayer
from onnxcomp.layers import WeightLayer, reduction_depth


class PairedGram:
    """Per group: H̃ and H (`Gram`s, with their rows' sums) and C = X̃ᵀX, float64."""

    def __init__(self, groups: int, reduction: int):
        self.current = Gram.empty(groups, reduction)
        self.reference = Gram.empty(groups, reduction)
        self.cross = np.zeros((groups, reduction, reduction))

    def add(self, current_rows: np.ndarray, reference_rows: np.ndarray) -> None:
        """Rows of the same samples, (groups, n, reduction) each."""
        self.current.add(current_rows)
        self.reference.add(reference_rows)
        self.cross += np.matmul(current_rows.astype(np.float64).transpose(0, 2, 1), reference_rows.astype(np.float64))


class SequentialStatistics:
    """Paired statistics of each layer's input, measured when first asked for: on the model
    as it is then (the layers before it quantized) and on the model as it was when this
    object was made (the reference, a clone).

    Layers reading one input are measured together: both models run once per distinct
    layer input, each only as far as that input. Ask in graph order, before quantizing the
    layer asked about.
    """

    def __init__(self, model: ir.Model, calibration: CalibrationSet, layers: list[WeightLayer], device: str = "cpu",
                 progress: bool = False):
        self.calibration, self.device, self.progress = calibration, device, progress
        graph = model.graph
        self.readers: dict[ir.Value, list[WeightLayer]] = {}
        for layer in layers:
            if layer.rows_source is not None and fetchable(layer.rows_source, graph):
                self.readers.setdefault(layer.rows_source, []).append(layer)
        TopologicalSortPass()(model)  # earlier passes may leave appended nodes to a final sort; cloning needs order
        self.reference = model.clone()  # shares the weights' tensors, which quantizing replaces, not edits
        self.measured: dict[WeightLayer, PairedGram] = {}  # measured, not yet handed over
        self.done: set[ir.Value] = set()

    def __call__(self, model: ir.Model, layer: WeightLayer) -> PairedGram | None:
        """The layer's paired statistics, handed over (not kept: ask once per layer); None
        where its input cannot be fetched or written as rows."""
        source = layer.rows_source
        if source in self.readers and source not in self.done:
            self._measure(model, source)
            self.done.add(source)
        return self.measured.pop(layer, None)

    def _measure(self, model: ir.Model, value: ir.Value) -> None:
        readers: list[WeightLayer] = []
        for layer in self.readers[value]:
            shared = next((self.measured[r] for r in readers if same_rows(r, layer)), None)
            self.measured[layer] = shared or PairedGram(layer.groups, reduction_depth(layer))
            readers.append(layer)
        unique = list({id(self.measured[r]): r for r in readers}.values())
        synthetic = self.calibration.synthetic
        current = FetchSession(model, [value], self.device, prefix=True, synthetic=synthetic)
        reference = FetchSession(self.reference, [value], self.device, prefix=True, synthetic=synthetic)  # found by name
        total = self.calibration.samples or None
        with stage(total=total, desc=f"calibrate {value.name}", unit="sample", enabled=self.progress) as bar:
            for number, feeds in enumerate(self.calibration.batches()):
                x = current.run(feeds)[value.name]
                x_reference = reference.run(feeds)[value.name]
                if not np.isfinite(x).all():
                    raise CalibrationError(
                        f"activation {value.name!r} holds NaN or Inf on calibration batch {number} once the layers "
                        "before it are quantized; try more bits for those layers (--keep-first-last-bits, --bits)"
                    )
                for layer in list(unique):
                    try:
                        draw = self.calibration.positions  # the same positions in both: C = X̃ᵀX pairs rows
                        pairs = zip(row_chunks(layer, x, draw, self.calibration.position_rng(number)),
                                    row_chunks(layer, x_reference, draw, self.calibration.position_rng(number)))
                        for rows, reference_rows in pairs:
                            self.measured[layer].add(rows, reference_rows)
                    except UnsupportedLayer:  # its attributes cannot be written as rows
                        unique.remove(layer)
                        failed = self.measured[layer]
                        for reader in readers:
                            if self.measured.get(reader) is failed:
                                del self.measured[reader]
                bar.update(len(next(iter(feeds.values()))))

