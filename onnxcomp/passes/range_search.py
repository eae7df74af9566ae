"""Range search for one layer: the clipping ratios (per channel, block or layer) that
minimize the weight error or the layer-output error, optionally on sqrt-reshaped weights.

Used by quantize-weights with `--range-search` / `--sqrt`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from onnxcomp.config import QuantConfig
from onnxcomp.kernels.quantize import Grid, Quantized, dequantize, group_sums, quantize
from onnxcomp.kernels.range_search import GroupedRounding, golden_section_search
from onnxcomp.layer_matrix import weight_matrix
from onnxcomp.layers import WeightLayer


def sqrt_reshape(w: np.ndarray) -> np.ndarray:
    """sign(w)·√|w|: small weights get finer steps once the grid is uniform in this space."""
    return np.sign(w) * np.sqrt(np.abs(w))


def sqrt_decode(y: np.ndarray) -> np.ndarray:
    """y·|y|, the inverse of `sqrt_reshape` (what the emitted Abs → Mul computes)."""
    return y * np.abs(y)


@dataclass
class RangeChoice:
    qt: Quantized
    w_hat: np.ndarray  # the decoded weight
    sqrt: bool
    alpha: float  # mean chosen ratio (upper end for asymmetric grids)
    evaluations: int
    ratio_high: np.ndarray | float = 1.0  # the chosen ratios, in DequantizeLinear's scale layout
    ratio_low: np.ndarray | float = 1.0  # (lower end; the upper one on symmetric grids)
    summary: dict[str, float] = field(default_factory=dict)


@dataclass
class InputStatistics:
    """What the output objective weighs a layer's errors with: H = X̃ᵀX̃ of the inputs X̃ the
    layer receives and, when those differ from the unquantized model's X (the sequential
    objective), C = X̃ᵀX and H_ref = XᵀX, so that the target is XW rather than X̃W."""

    gram: np.ndarray  # (groups, reduction, reduction) each
    cross: np.ndarray | None = None
    reference: np.ndarray | None = None


class LayerErrors:
    """Per-group errors of a decoded weight, in the scale's layout: the squared weight error,
    or (with input statistics and per-channel or per-tensor scales) the output error
    ‖X̃Ŵ − XW‖² per output column, written with D = Ŵ − W as DᵀHD + 2Dᵀ(H − C)W + its
    value at D = 0 (the last two vanish when X̃ = X)."""

    def __init__(self, layer: WeightLayer, w: np.ndarray, axis: int | None, block_size: int | None,
                 inputs: InputStatistics | None):
        self.layer, self.w, self.axis, self.block_size = layer, w.astype(np.float64), axis, block_size
        usable = inputs is not None and block_size is None and axis in (None, layer.channel_axis)
        self.gram = inputs.gram if usable else None
        self.drift = self.drift_error = None
        if usable and inputs.cross is not None:
            m = weight_matrix(layer, self.w)
            self.drift = (inputs.gram - inputs.cross) @ m  # (groups, reduction, outputs)
            self.drift_error = _quadratic(inputs.gram, m) - 2.0 * _quadratic(inputs.cross, m) + _quadratic(inputs.reference, m)

    @property
    def uses_output(self) -> bool:
        return self.gram is not None

    def weight(self, w_hat: np.ndarray) -> np.ndarray:
        delta = self.w - w_hat
        return group_sums(delta * delta, self.axis, self.block_size)

    def output(self, w_hat: np.ndarray) -> np.ndarray:
        d = weight_matrix(self.layer, w_hat.astype(np.float64) - self.w)  # (groups, reduction, outputs per group)
        per_column = _quadratic(self.gram, d)
        if self.drift is not None:
            per_column += 2.0 * np.einsum("grn,grn->gn", self.drift, d) + self.drift_error
        if self.axis is None:
            return per_column.sum().reshape(())
        if self.layer.node.op_type == "ConvTranspose":  # scales along axis 1 are shared by the groups
            return per_column.sum(axis=0)
        return per_column.reshape(-1)

    def __call__(self, w_hat: np.ndarray) -> np.ndarray:
        return self.output(w_hat) if self.uses_output else self.weight(w_hat)


def _quadratic(gram: np.ndarray, m: np.ndarray) -> np.ndarray:
    """mᵀ·gram·m per column: (groups, outputs)."""
    return np.einsum("grn,grn->gn", gram @ m, m)


def _decode(source: np.ndarray, grid: Grid, axis, block_size, ratio, low, sqrt: bool, dtype) -> tuple[Quantized, np.ndarray]:
    qt = quantize(source, grid, axis=axis, block_size=block_size, clip_ratio=ratio, clip_ratio_low=low)
    y = dequantize(qt).astype(np.float64)
    return qt, (sqrt_decode(y) if sqrt else y).astype(dtype)


def _search(w, grid, axis, block_size, errors: LayerErrors, config: QuantConfig, sqrt: bool) -> RangeChoice:
    source = sqrt_reshape(w) if sqrt else w
    rounding = GroupedRounding(source, w, grid, axis, block_size, sqrt_decode if sqrt else None)
    layout_size = int(np.prod(rounding.stat_shape))
    per_layer = config.range_scope == "layer"
    groups = 1 if per_layer else layout_size
    layout = quantize(source, grid, axis=axis, block_size=block_size).scale.shape  # DequantizeLinear's scale shape

    def spread(ratios: np.ndarray) -> np.ndarray:
        """Ratios searched (one per group, or one for the layer) → one per scale group, flat."""
        return np.broadcast_to(ratios, (layout_size,)) if per_layer else ratios

    def error(high: np.ndarray, low: np.ndarray | None) -> np.ndarray:
        if errors.uses_output:
            shaped_low = None if low is None else spread(low).reshape(layout)
            values = errors(_decode(source, grid, axis, block_size, spread(high).reshape(layout), shaped_low, sqrt, w.dtype)[1])
        else:
            shaped_low = None if low is None else spread(low).reshape(rounding.stat_shape)
            values = rounding.errors(spread(high).reshape(rounding.stat_shape), shaped_low)
        return values.sum(keepdims=True).reshape(1) if per_layer else values.reshape(-1)

    ones = np.ones(groups)
    high = golden_section_search(lambda r: error(r, ones if grid.asymmetric else None), groups, config.range_min)
    ratio, low, evaluations = high.ratio, None, high.evaluations
    if grid.asymmetric:  # then the lower end, the upper one fixed
        lower = golden_section_search(lambda r: error(ratio, r), groups, config.range_min)
        low, evaluations = lower.ratio, evaluations + lower.evaluations
    high_layout = spread(ratio).reshape(layout)
    low_layout = high_layout if low is None else spread(low).reshape(layout)
    qt, w_hat = _decode(source, grid, axis, block_size, high_layout, None if low is None else low_layout, sqrt, w.dtype)
    return RangeChoice(qt, w_hat, sqrt, float(np.mean(ratio)), evaluations, high_layout, low_layout)


def choose_range(layer: WeightLayer, w: np.ndarray, grid: Grid, axis, block_size, config: QuantConfig,
                 inputs: InputStatistics | None) -> RangeChoice:
    """The searched quantization of `w` (sqrt-reshaped with `config.sqrt`), and a summary of
    weight and output errors: plain round-to-nearest, searched, and searched with sqrt."""
    errors = LayerErrors(layer, w, axis, block_size, inputs if config.range_objective != "mse" else None)
    plain = _decode(w, grid, axis, block_size, 1.0, None, False, w.dtype)[1]
    searched = _search(w, grid, axis, block_size, errors, config, sqrt=False)
    choice = _search(w, grid, axis, block_size, errors, config, sqrt=True) if config.sqrt else searched
    energy = float(np.sum(w.astype(np.float64) ** 2)) or 1.0
    summary = {"alpha": choice.alpha, "objective": config.range_objective if errors.uses_output else "mse"}
    candidates = {"rtn": plain, "searched": searched.w_hat} | ({"sqrt": choice.w_hat} if config.sqrt else {})
    output_energy = float(errors.output(np.zeros_like(w)).sum()) or 1.0 if errors.uses_output else 1.0
    for name, w_hat in candidates.items():
        summary[f"weight_mse_{name}"] = float(errors.weight(w_hat).sum()) / energy
        if errors.uses_output:
            summary[f"output_error_{name}"] = float(errors.output(w_hat).sum()) / output_energy
    choice.summary = summary
    return choice
