"""The layer policy: which layers stay float and why, the scale layout each gets at a bit
width, how its codes are stored and what they take. One module, so that every pass and
tool (quantize-weights, MagR, smoothing, sensitivity, the allocator) decides alike."""

from __future__ import annotations

import re

import ml_dtypes
import numpy as np
import onnx_ir as ir

from onnxcomp.config import Granularity, QuantConfig
from onnxcomp.errors import ConfigError
from onnxcomp.kernels.quantize import Quantized
from onnxcomp.layers import WeightLayer, reduction_depth, sharing_refusal

# ONNX element type and numpy storage dtype of the codes, by (bits, signed).
STORAGE = {
    (8, True): (ir.DataType.INT8, np.int8),
    (8, False): (ir.DataType.UINT8, np.uint8),
    (4, True): (ir.DataType.INT4, ml_dtypes.int4),
    (4, False): (ir.DataType.UINT4, ml_dtypes.uint4),
    (2, True): (ir.DataType.INT2, ml_dtypes.int2),
    (2, False): (ir.DataType.UINT2, ml_dtypes.uint2),
}


def storage_bits(bits: int) -> int:
    """ONNX has no 3-bit type: 3-bit codes live in 4-bit containers."""
    return 4 if bits == 3 else bits


def skip_reason(layer: WeightLayer, config: QuantConfig) -> str | None:
    """Why a layer stays in float, or None to quantize it."""
    if config.exclude and re.search(config.exclude, layer.name):
        return f"excluded by --exclude {config.exclude!r}"
    if dict(config.bits_plan).get(layer.name) == 0:
        return "kept float by the bit plan"
    size = int(np.prod(layer.weight.shape))
    if size == 0:
        return "holds no elements (a dimension of size 0)"
    if size < config.min_elements:
        return f"{size} elements < --min-elements {config.min_elements}"
    sharing = sharing_refusal(layer)
    if sharing:
        return sharing
    depth = reduction_depth(layer)
    if config.act_bits and layer.data is not None and depth < config.act_min_depth:
        # onnxruntime runs such layers (a first conv over 1-3 channels, depthwise convs)
        # faster in float than as integer kernels, and only float weights keep its fast path.
        return f"sums {depth} products < --act-min-depth {config.act_min_depth}: kept float for speed"
    return None


def layout(layer: WeightLayer, config: QuantConfig, bits: int | None = None) -> tuple[int | None, int | None, str, str]:
    """(axis, block_size, granularity label, note) for DequantizeLinear on this layer at
    `bits` (default: --bits)."""
    shape = layer.weight.shape
    granularity = config.layer_granularity(layer.node.op_type, config.bits if bits is None else bits)
    if granularity is Granularity.TENSOR:
        return None, None, "tensor", ""
    if layer.recurrent and granularity is Granularity.CHANNEL:
        # One scale per gate unit and direction: blocks as long as the row (DequantizeLinear's
        # axis takes one dimension only, and the directions are another).
        return layer.reduction_axis, shape[layer.reduction_axis], "channel", ""
    if granularity is Granularity.BLOCK:
        depth, block_size = shape[layer.reduction_axis], config.layer_block_size(layer.name)
        if depth % block_size == 0:
            return layer.reduction_axis, block_size, f"block{block_size}", ""
        note = f"reduction size {depth} is not a multiple of --block-size {block_size}; per-channel used"
        return layer.channel_axis, None, "channel", note
    return layer.channel_axis, None, "channel", ""


def check_block_size(layers: list[WeightLayer], config: QuantConfig) -> None:
    """A block size that divides no layer's reduction axis is a mistake, not a fallback."""
    if config.granularity is not Granularity.BLOCK or not layers:
        return
    depths = sorted({layer.weight.shape[layer.reduction_axis] for layer in layers})
    if not any(depth % config.block_size == 0 for depth in depths):
        raise ConfigError(
            f"--block-size {config.block_size} divides none of the layers' reduction sizes {depths}; "
            "choose a power of two that divides them (for example 32)"
        )


def packed_bytes(qt: Quantized, bits: int) -> int:
    """Bytes the codes, scales and zero points take as stored (3-bit codes in 4-bit slots)."""
    codes = (qt.q.size * storage_bits(bits) + 7) // 8
    if qt.zero_point is not None and qt.zero_point.dtype.kind == "f":  # real zero points: as stored
        return codes + qt.scale.nbytes + qt.zero_point.nbytes
    zp = 0 if qt.zero_point is None else (qt.zero_point.size * storage_bits(bits) + 7) // 8
    return codes + qt.scale.nbytes + zp


def one_per_weight(layers: list[WeightLayer]) -> list[WeightLayer]:
    """The first layer reading each weight: a weight several layers share is quantized once."""
    seen: set[ir.Value] = set()
    return [layer for layer in layers if not (layer.weight in seen or seen.add(layer.weight))]
