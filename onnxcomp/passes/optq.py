"""OPTQ rounding of one layer under the scales quantize-weights chose (kernel:
onnxcomp/kernels/optq.py), mapped between the ONNX weight layout and the matrix form."""

from __future__ import annotations

import numpy as np

from onnxcomp.config import QuantConfig
from onnxcomp.kernels.optq import DynamicBlocks, optq
from onnxcomp.kernels.quantize import Grid, Quantized, collapse, expand
from onnxcomp.layer_matrix import weight_from_matrix, weight_matrix
from onnxcomp.layers import WeightLayer


def _as_matrix(layer: WeightLayer, param, qt: Quantized, shape) -> np.ndarray:
    """A scale-layout parameter as one value per element of the layer's matrix form."""
    full = expand(np.asarray(param, dtype=np.float64), shape, qt.axis, qt.block_size)
    return np.ascontiguousarray(weight_matrix(layer, np.ascontiguousarray(full)))


def _dynamic_blocks(layer: WeightLayer, qt: Quantized, shape, ratio_high, ratio_low) -> DynamicBlocks | None:
    """Which matrix row belongs to which block, when blocks are sets of rows that lie within
    one group (for ConvTranspose, blocks of input channels could cross groups: None)."""
    if qt.block_size is None:
        return None
    if layer.node.op_type == "ConvTranspose" and (shape[0] // layer.groups) % qt.block_size:
        return None
    ids = np.arange(qt.scale.size, dtype=np.float64).reshape(qt.scale.shape)
    row_block = _as_matrix(layer, ids, qt, shape)[0, :, 0].astype(np.int64)
    high = _as_matrix(layer, np.broadcast_to(ratio_high, qt.scale.shape), qt, shape)
    low = _as_matrix(layer, np.broadcast_to(ratio_low, qt.scale.shape), qt, shape)
    return DynamicBlocks(row_block, high, low)


def optq_quantize(
    layer: WeightLayer,
    w: np.ndarray,
    qt: Quantized,
    grid: Grid,
    gram: np.ndarray,
    config: QuantConfig,
    *,
    ratio_high=1.0,
    ratio_low=1.0,
    device: str = "cpu",
) -> tuple[Quantized, float, str]:
    """Codes for `w` rounded by OPTQ under `qt`'s scales (blocks: re-chosen as each block is
    reached, with the same clip ratios), the layer's relative output error
    tr(ΔWᵀHΔW)/tr(WᵀHW) after rounding, and a note for the report."""
    shape = w.shape
    dynamic = None if config.optq_act_order else _dynamic_blocks(layer, qt, shape, ratio_high, ratio_low)
    result = optq(
        weight_matrix(layer, w.astype(np.float64)),
        gram,
        _as_matrix(layer, qt.scale, qt, shape),
        None if qt.zero_point is None else _as_matrix(layer, qt.zero_point, qt, shape),
        grid,
        damp=config.optq_damp,
        act_order=config.optq_act_order,
        dynamic=dynamic,
        scale_dtype=qt.scale.dtype,
        device=device,
    )
    codes = weight_from_matrix(layer, result.codes, shape)
    scale = collapse(weight_from_matrix(layer, result.scale, shape), qt.axis, qt.block_size).astype(qt.scale.dtype)
    zero_point = None
    if result.zero_point is not None:
        zero_point = collapse(weight_from_matrix(layer, result.zero_point, shape), qt.axis, qt.block_size).astype(np.int32)
    notes = []
    if result.fallback:
        notes.append(f"optq: round-to-nearest kept on {result.fallback} of {result.error.size} channels")
    if result.damp > config.optq_damp:
        notes.append(f"optq: dampening raised to {result.damp:g}")
    energy = float(result.energy.sum())
    relative_error = float(result.error.sum()) / energy if energy > 0 else 0.0
    quantized = Quantized(np.ascontiguousarray(codes), scale, zero_point, qt.axis, qt.block_size)
    return quantized, relative_error, "; ".join(notes)
