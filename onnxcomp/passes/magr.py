"""magr: before quantization, shrink each layer's largest weight magnitudes while keeping
its outputs on the calibration data (kernel: onnxcomp/kernels/magr.py)."""

from __future__ import annotations

import warnings

import numpy as np
import onnx_ir as ir
from onnxcomp.progress import stage

from onnxcomp.calibration.analysis import Calibration, CalibrationWarning
from onnxcomp.config import QuantConfig
from onnxcomp.kernels.magr import magr
from onnxcomp.layer_matrix import relative_output_error, weight_from_matrix, weight_matrix
from onnxcomp.layers import WeightLayer, find_weight_layers, shared
from onnxcomp.policy import layout, skip_reason
from onnxcomp.report import MagrRecord, Report

# A Gram matrix whose largest eigenvalue per row of data is below this holds no signal.
DEAD_INPUT = 1e-12


def magr_alpha(config: QuantConfig, blockwise: bool) -> float:
    """The paper's defaults: 1e-3 per channel, 1e-4 per block."""
    if config.magr_alpha is not None:
        return config.magr_alpha
    return 1e-4 if blockwise else 1e-3


def _block_rows(layer: WeightLayer, block_size: int | None, reduction: int) -> tuple[np.ndarray | None, int | None]:
    """(row permutation, block length) that makes each DequantizeLinear block a contiguous run
    of the matrix's rows, or (None, None) for one ℓ∞ per output channel.

    Matrix rows are ordered (input channel, kernel position); blocks run along input channels
    at a fixed kernel position, so rows are regrouped kernel position first.
    """
    if block_size is None:
        return None, None
    kernel = int(np.prod(layer.weight.shape[2:])) if layer.node.op_type in ("Conv", "ConvTranspose") else 1
    channels = reduction // kernel
    if channels % block_size:
        return None, None  # blocks cross a group's boundary: fall back to per channel
    order = np.arange(reduction).reshape(channels, kernel).T.ravel()
    return order, block_size


class MagrPass(ir.passes.InPlacePass):
    """MagR on every layer with input statistics: smaller weight magnitudes, the same outputs."""

    label = "magr"

    def __init__(self, config: QuantConfig, calibration: Calibration, report: Report, device: str = "cpu", progress: bool = False):
        super().__init__()
        self.config = config
        self.calibration = calibration
        self.report = report
        self.device = device
        self.progress = progress

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        layers = [
            l for l in find_weight_layers(model.graph)
            if l.node.op_type != "Gather" and skip_reason(l, self.config) is None and not shared(l)  # one input's statistics
        ]
        if not layers:
            return ir.passes.PassResult(model, modified=False)
        stats = self.calibration.statistics(model, "--magr", layers=layers)
        # Layers reading the same input (attention's Q, K, V) share one Gram matrix: one solve.
        batches: dict[tuple, list[WeightLayer]] = {}
        for layer in layers:
            record = stats.layers.get(layer)
            if record is None:
                reason = stats.skipped.get(layer, "no calibration statistics")
                self.report.note("magr", layer.name, f"left as it is: {reason}")
                continue
            _, block_size, _, _ = layout(layer, self.config)
            batches.setdefault((id(record.gram), block_size, layer.node.op_type), []).append(layer)
        modified = False
        for batch in stage(list(batches.values()), desc="magr", unit="solve", enabled=self.progress):
            gram = stats.layers[batch[0]].gram
            modified |= self._reduce(batch, gram.matrix, gram.rows)
        if modified:
            self.calibration.mark_stale()
        return ir.passes.PassResult(model, modified=modified)

    def _reduce(self, layers: list[WeightLayer], gram: np.ndarray, rows: int) -> bool:
        """MagR on layers sharing one input, their output channels solved together."""
        weights = [layer.weight.const_value.numpy() for layer in layers]
        matrices = [weight_matrix(layer, w) for layer, w in zip(layers, weights)]
        widths = np.cumsum([m.shape[2] for m in matrices])[:-1]
        matrix = np.concatenate(matrices, axis=2)
        _, block_size, granularity, _ = layout(layers[0], self.config)
        order, block = _block_rows(layers[0], block_size, matrix.shape[1])
        ordered_gram = gram if order is None else gram[:, order][:, :, order]
        if order is not None:
            matrix = matrix[:, order]
        result = magr(matrix, ordered_gram, magr_alpha(self.config, granularity.startswith("block")), self.config.magr_iters, block,
                      device=self.device, min_eigenvalue=DEAD_INPUT * max(rows, 1))
        names = ", ".join(layer.name for layer in layers)
        if result.dead.any():
            message = (f"the input of {int(result.dead.sum())} of {len(result.dead)} group(s) is (almost) always "
                       "zero on the calibration data; their weights are kept")
            warnings.warn(f"{names}: {message}", CalibrationWarning, stacklevel=2)
            self.report.note("magr", names, message)
            if result.dead.all():
                return False
        reduced = result.matrix if order is None else result.matrix[:, np.argsort(order)]
        if not np.isfinite(reduced).all():
            warnings.warn(f"{names}: MagR produced non-finite weights; weights kept", CalibrationWarning, stacklevel=2)
            self.report.note("magr", names, "non-finite result: weights kept")
            return False
        total = matrix.shape[2]
        for layer, w, part, start, end in zip(
            layers, weights, np.split(reduced, widths, axis=2), np.split(result.channel_start, widths, axis=1),
            np.split(result.channel_end, widths, axis=1),
        ):
            new_w = weight_from_matrix(layer, np.ascontiguousarray(part), w.shape)
            layer.weight.const_value = ir.Tensor(np.ascontiguousarray(new_w), name=layer.weight.name)
            self.report.magr.append(MagrRecord(
                name=layer.name,
                max_before=float(np.abs(w).max()),
                max_after=float(np.abs(new_w).max()),
                output_error=relative_output_error(layer, gram, w, new_w),
                objective_start=float(start.sum()),
                objective_end=float(end.sum()),
                iterations=result.iterations,
                seconds=result.seconds * part.shape[2] / total,
            ))
        return True
