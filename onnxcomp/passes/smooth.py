"""smooth: before 8-bit activations, move outlier channels of a layer's input into its
weights (SmoothQuant's migration): x·W = (x·diag(1/s))·(diag(s)·W), with
s_j = max|x_j|^α / max|W_j|^(1−α), so both factors have tamer ranges to quantize.

α is chosen per input from a grid (0, no smoothing, included) by the output noise it
predicts: uint8 rounding of x/s over its per-tensor range, propagated through sW, plus
int8 rounding of each column of sW, propagated through x/s's mean squares.

The division by s is a Mul inserted on the branch that feeds the layers only, so other users
of x (residual connections) see it unchanged.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxcomp.calibration.analysis import Calibration
from onnxcomp.calibration.statistics import ActivationStatistics
from onnxcomp.config import QuantConfig
from onnxcomp.layer_matrix import weight_from_matrix, weight_matrix
from onnxcomp.layers import WeightLayer, find_weight_layers, shared
from onnxcomp.passes.graph_edit import NameAllocator, add_initializer
from onnxcomp.policy import skip_reason
from onnxcomp.report import Report


ALPHAS = (0.0, 0.25, 0.4, 0.5, 0.6, 0.75, 0.9)
# Smoothing adds a Mul on the activation and can block kernel fusion; it must at least
# halve the predicted output noise to be worth that.
MIN_GAIN = 2.0


def smoothing_factors(channel_absmax: np.ndarray, weight_row_absmax: np.ndarray, alpha: float) -> np.ndarray:
    """s per input channel; 1 where either side is all zero."""
    x, w = channel_absmax.astype(np.float64), weight_row_absmax.astype(np.float64)
    usable = (x > 0) & (w > 0)
    s = np.ones_like(x)
    s[usable] = x[usable] ** alpha / w[usable] ** (1.0 - alpha)
    return np.clip(s, 1e-5, 1e5)


def predicted_noise(stats: ActivationStatistics, matrices: list[np.ndarray], s: np.ndarray) -> float:
    """Expected squared output error per token of uint8 x/s times int8 (per column) sW."""
    low = min(float(np.min(stats.channel_min / s)), 0.0)
    high = max(float(np.max(stats.channel_max / s)), 0.0)
    act_step2 = ((high - low) / 255.0) ** 2
    mean_square = stats.channel_mean_square / s**2
    noise = 0.0
    for matrix in matrices:
        scaled = matrix * s[:, None]
        weight_step2 = (np.abs(scaled).max(axis=0) / 127.5) ** 2  # per output column
        noise += act_step2 / 12.0 * float(np.sum(scaled**2)) + float(np.sum(weight_step2 / 12.0)) * float(np.sum(mean_square))
    return noise


def best_factors(stats: ActivationStatistics, matrices: list[np.ndarray], alphas=ALPHAS) -> tuple[float, np.ndarray]:
    absmax = np.maximum(np.abs(stats.channel_min), np.abs(stats.channel_max))
    weight_absmax = np.max([np.abs(m).max(axis=1) for m in matrices], axis=0)
    candidates = [(alpha, smoothing_factors(absmax, weight_absmax, alpha)) for alpha in alphas]
    return min(candidates, key=lambda c: predicted_noise(stats, matrices, c[1]))


def smoothable_groups(graph: ir.Graph, config: QuantConfig) -> dict[ir.Value, list[WeightLayer]]:
    """Input value → the MatMul/Gemm layers (to be quantized) that read it."""
    groups: dict[ir.Value, list[WeightLayer]] = {}
    for layer in find_weight_layers(graph):
        if layer.node.op_type not in ("MatMul", "Gemm") or layer.node.graph is not graph:
            continue
        if skip_reason(layer, config) is not None or shared(layer):  # scaling it would change the other readers
            continue
        groups.setdefault(layer.data, []).append(layer)
    return groups


class SmoothActivationsPass(ir.passes.InPlacePass):
    """Migrate activation outlier channels into the MatMul/Gemm weights that read them."""

    label = "smooth"

    def __init__(self, config: QuantConfig, calibration: Calibration, report: Report):
        super().__init__()
        self.config = config
        self.calibration = calibration
        self.report = report
        self.alphas = ALPHAS if config.smooth_alpha is None else (0.0, config.smooth_alpha)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        groups = smoothable_groups(graph, self.config)
        if not groups:
            return ir.passes.PassResult(model, modified=False)
        stats = self.calibration.statistics(model, "--act-bits smoothing", values=groups).activations
        names = NameAllocator(graph)
        modified = False
        for value, layers in groups.items():
            record = stats.get(value)
            depth = layers[0].weight.shape[layers[0].reduction_axis]
            if record is None or record.channel_min is None or record.channel_min.shape[0] != depth:
                continue
            matrices = [weight_matrix(layer, layer.weight.const_value.numpy())[0] for layer in layers]
            alpha, s = best_factors(record, matrices, self.alphas)
            gain = predicted_noise(record, matrices, np.ones_like(s)) / predicted_noise(record, matrices, s)
            if alpha == 0.0 or gain < MIN_GAIN:
                continue
            for layer, matrix in zip(layers, matrices):
                w = layer.weight.const_value.numpy()
                scaled = weight_from_matrix(layer, (matrix * s[:, None]).astype(w.dtype)[None], w.shape)
                layer.weight.const_value = ir.Tensor(np.ascontiguousarray(scaled), name=layer.weight.name)
            self._divide_input(graph, names, value, layers, (1.0 / s).astype(np.float32))
            self.report.note("smooth", value.name, f"α = {alpha} for {len(layers)} layer(s): predicted noise ÷ {gain:.1f}")
            modified = True
        if modified:
            self.calibration.mark_stale()
        return ir.passes.PassResult(model, modified=modified)

    @staticmethod
    def _divide_input(graph: ir.Graph, names: NameAllocator, value: ir.Value, layers: list[WeightLayer], inverse: np.ndarray) -> None:
        factor = add_initializer(graph, names, value.name + "_smooth_scale", inverse)
        mul = ir.node("Mul", [value, factor], name=names.fresh(value.name + "_Smooth"))
        mul.outputs[0].name = names.fresh(value.name + "_smoothed")
        mul.outputs[0].type, mul.outputs[0].shape = value.type, value.shape
        graph.append(mul)
        for layer in layers:
            layer.node.replace_input_with(0, mul.outputs[0])
