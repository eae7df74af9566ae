"""Uniform quantization of a weight tensor with the three layouts ONNX DequantizeLinear takes.

The layout follows DequantizeLinear's own attributes, so what this module computes is
exactly what onnxruntime will decode:
- per-tensor: one scale (`axis=None`);
- per-channel: one scale per index of `axis`;
- blockwise: one scale per run of `block_size` elements along `axis`, for every index of
  the other axes (the scale has the weight's rank, with `shape[axis] // block_size` there).

Values are rounded half to even, as QuantizeLinear does, and decoded as (q - zp) * scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Grid:
    """The integer levels a weight may take: q in [qmin, qmax], zero point or not."""

    bits: int
    qmin: int
    qmax: int
    asymmetric: bool
    float_zero: bool = False  # a real-valued zero point: the levels span exactly [min, max]

    @property
    def label(self) -> str:
        kind = "asym-float-zp" if self.float_zero else "asym" if self.asymmetric else "sym"
        return f"{kind}[{self.qmin},{self.qmax}]"


def grid_for(bits: int, asymmetric: bool, float_zero: bool = False) -> Grid:
    """The grid for a bit width: all 2^b levels, with or without a zero point.

    Symmetric grids take the full signed range [-2^(b-1), 2^(b-1)-1]. Their scale carries the
    sign of each group's largest-magnitude weight (scale = w_extreme / qmin), so that weight
    lands exactly on the lone extra level and nothing is clipped: the restricted range
    [-(2^(b-1)-1), 2^(b-1)-1] would waste a level, and at 2 bits leave a ternary grid on
    which most weights round to zero.
    """
    if asymmetric or float_zero:
        return Grid(bits, 0, 2**bits - 1, True, float_zero)
    return Grid(bits, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1, False)


@dataclass(frozen=True)
class Quantized:
    """Integer codes, and scales and zero points in DequantizeLinear's layout."""

    q: np.ndarray  # int32 codes, the weight's shape
    scale: np.ndarray  # the weight's float dtype
    zero_point: np.ndarray | None  # int32 (the scale's dtype on a float-zero grid), the scale's shape; None when symmetric
    axis: int | None
    block_size: int | None


def grouped_view(w: np.ndarray, axis: int | None, block_size: int | None) -> tuple[np.ndarray, int]:
    """A view of `w` and the axis of it that one scale covers (reduced over): (channels, rest)
    per channel, the blocked shape per block, (1, everything) per tensor."""
    if axis is None:
        return w.reshape(1, -1), 1
    if block_size is None:
        moved = np.moveaxis(w, axis, 0)
        return moved.reshape(moved.shape[0], -1), 1
    shape = w.shape
    blocked = w.reshape(shape[:axis] + (shape[axis] // block_size, block_size) + shape[axis + 1 :])
    return blocked, axis + 1


def _to_layout(stat: np.ndarray, w_shape: tuple[int, ...], axis: int | None, block_size: int | None) -> np.ndarray:
    """Turn a per-group statistic from `_grouped` into DequantizeLinear's scale shape."""
    if axis is None:
        return stat.reshape(())
    if block_size is None:
        return stat.reshape(w_shape[axis])
    return stat.reshape(w_shape[:axis] + (w_shape[axis] // block_size,) + w_shape[axis + 1 :])


def group_sums(values: np.ndarray, axis: int | None, block_size: int | None) -> np.ndarray:
    """Sum of `values` (the weight's shape) over each scale group, in the scale's layout."""
    groups, reduce = grouped_view(values, axis, block_size)
    return _to_layout(groups.sum(axis=reduce), values.shape, axis, block_size)


def expand(param: np.ndarray, w_shape: tuple[int, ...], axis: int | None, block_size: int | None) -> np.ndarray:
    """Broadcast a scale or zero point in DequantizeLinear's layout to the weight's shape."""
    if axis is None:
        return np.broadcast_to(param, w_shape)
    if block_size is None:
        shape = [1] * len(w_shape)
        shape[axis] = w_shape[axis]
        return np.broadcast_to(param.reshape(shape), w_shape)
    return np.repeat(param, block_size, axis=axis)


def collapse(full: np.ndarray, axis: int | None, block_size: int | None) -> np.ndarray:
    """Inverse of `expand`: a parameter given for every weight element (constant within each
    scale group) back in DequantizeLinear's layout."""
    groups, reduce = grouped_view(full, axis, block_size)
    return _to_layout(np.take(groups, 0, axis=reduce), full.shape, axis, block_size)


def quantize(
    w: np.ndarray,
    grid: Grid,
    *,
    axis: int | None = None,
    block_size: int | None = None,
    clip_ratio: np.ndarray | float = 1.0,
    clip_ratio_low: np.ndarray | float | None = None,
) -> Quantized:
    """Round-to-nearest quantization of `w` onto `grid`.

    `clip_ratio` (in DequantizeLinear's scale layout, or a scalar) shrinks each group's
    range before the scale is chosen; 1.0 keeps the full range (max-abs or min/max). On an
    asymmetric grid, `clip_ratio_low` shrinks the lower end separately (default: the same).
    """
    if block_size is not None and w.shape[axis] % block_size:
        raise ValueError(f"axis {axis} of shape {w.shape} is not a multiple of block size {block_size}")
    w64 = w.astype(np.float64)
    groups, reduce = grouped_view(w64, axis, block_size)
    ratio = np.asarray(clip_ratio, dtype=np.float64)
    if grid.float_zero:  # the levels span the group's own range; zero need not be one of them
        lo = _to_layout(groups.min(axis=reduce), w.shape, axis, block_size)
        hi = _to_layout(groups.max(axis=reduce), w.shape, axis, block_size)
        scale = (hi - lo) / (grid.qmax - grid.qmin)
    elif grid.asymmetric:
        low_ratio = ratio if clip_ratio_low is None else np.asarray(clip_ratio_low, dtype=np.float64)
        lo = _to_layout(np.minimum(groups.min(axis=reduce), 0.0), w.shape, axis, block_size) * low_ratio
        hi = _to_layout(np.maximum(groups.max(axis=reduce), 0.0), w.shape, axis, block_size) * ratio
        scale = (hi - lo) / (grid.qmax - grid.qmin)
    else:
        peak = np.expand_dims(np.abs(groups).argmax(axis=reduce), reduce)
        extreme = np.take_along_axis(groups, peak, axis=reduce).squeeze(reduce)
        scale = _to_layout(extreme, w.shape, axis, block_size) * ratio / grid.qmin
    scale = scale.astype(w.dtype)
    scale = np.where(np.isfinite(scale) & (scale != 0), scale, np.ones_like(scale))
    s_full = expand(scale.astype(np.float64), w.shape, axis, block_size)
    zero_point = None
    if grid.float_zero:  # stored in the scale's dtype; rounded with the codes, not before
        zero_point = (grid.qmin - lo / scale.astype(np.float64)).astype(scale.dtype)
        q = np.rint(w64 / s_full + expand(zero_point.astype(np.float64), w.shape, axis, block_size))
        return Quantized(np.clip(q, grid.qmin, grid.qmax).astype(np.int32), scale, zero_point, axis, block_size)
    if grid.asymmetric:
        zp = np.clip(np.rint(grid.qmin - lo / scale.astype(np.float64)), grid.qmin, grid.qmax)
        zero_point = zp.astype(np.int32)
        offset = expand(zp, w.shape, axis, block_size)
    else:
        offset = 0.0
    q = np.clip(np.rint(w64 / s_full) + offset, grid.qmin, grid.qmax).astype(np.int32)
    return Quantized(q=q, scale=scale, zero_point=zero_point, axis=axis, block_size=block_size)


def positive_scales(qt: Quantized) -> Quantized:
    """The same decoded values with every scale positive, for runtimes that refuse negative
    ones (TensorRT, WebNN). A symmetric group whose scale is negative gets codes −q − 1 and a
    zero point of −1: (−q − 1 + 1)·(−s) = q·s, and −q − 1 stays on the full signed grid.
    Groups with positive scales get a zero point of 0; nothing changes if none is negative."""
    if qt.zero_point is not None or not (qt.scale < 0).any():
        return qt
    negative = qt.scale < 0
    flip = expand(negative, qt.q.shape, qt.axis, qt.block_size)
    q = np.where(flip, -qt.q - 1, qt.q).astype(np.int32)
    return Quantized(q, np.abs(qt.scale), np.where(negative, -1, 0).astype(np.int32), qt.axis, qt.block_size)


def dequantize(qt: Quantized) -> np.ndarray:
    """What DequantizeLinear computes from the codes, in the scale's dtype."""
    shape = qt.q.shape
    s = expand(qt.scale, shape, qt.axis, qt.block_size).astype(np.float64)
    q = qt.q.astype(np.float64)
    if qt.zero_point is not None:
        q = q - expand(qt.zero_point, shape, qt.axis, qt.block_size).astype(np.float64)
    return (q * s).astype(qt.scale.dtype)


def relative_mse(w: np.ndarray, w_hat: np.ndarray) -> float:
    """||w - w_hat||^2 / ||w||^2, 0 for an all-zero w."""
    w64 = w.astype(np.float64)
    denom = float(np.sum(w64 * w64))
    err = float(np.sum((w64 - w_hat.astype(np.float64)) ** 2))
    return err / denom if denom > 0 else 0.0
