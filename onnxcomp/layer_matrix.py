"""Every weighted layer as one matrix product per group: output = rows @ matrix.

The calibration statistics, MagR and OPTQ all work on this form. `input_rows` turns a
layer's data input into the rows its weight multiplies (im2col patches for convolutions,
honouring strides, padding, dilation and groups); `weight_matrix` turns the weight into the
matching (reduction × output) matrix per group, and `weight_from_matrix` undoes it.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from onnxcomp.layers import WeightLayer, attr_int

MATRIX_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


class UnsupportedLayer(ValueError):
    """A layer whose attributes this module cannot express as rows (said so in the report)."""


def _ints(node: ir.Node, name: str, default: list[int]) -> list[int]:
    attr = node.attributes.get(name)
    return default if attr is None else list(attr.as_ints())


def _string(node: ir.Node, name: str, default: str) -> str:
    attr = node.attributes.get(name)
    return default if attr is None else attr.as_string()


def _pad_or_crop(x: np.ndarray, begins: list[int], ends: list[int]) -> np.ndarray:
    """Zero-pad (positive) or crop (negative) each spatial axis of an (N, C, *S) array."""
    crop = tuple(slice(max(-b, 0), x.shape[2 + i] - max(-e, 0)) for i, (b, e) in enumerate(zip(begins, ends)))
    x = x[(slice(None), slice(None), *crop)]
    widths = [(0, 0), (0, 0)] + [(max(b, 0), max(e, 0)) for b, e in zip(begins, ends)]
    return np.pad(x, widths) if any(w != (0, 0) for w in widths) else x


def _windows(x: np.ndarray, kernel: list[int], strides: list[int], dilations: list[int]) -> np.ndarray:
    """(N, C, *S) padded input → (N, C, *out, *kernel) view of every receptive field."""
    reach = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    view = np.lib.stride_tricks.sliding_window_view(x, reach, axis=tuple(range(2, x.ndim)))
    steps = tuple(slice(None, None, s) for s in strides) + tuple(slice(None, None, d) for d in dilations)
    return view[(slice(None), slice(None), *steps)]


def _group_rows(windows: np.ndarray, groups: int) -> np.ndarray:
    """(N, C, *out, *kernel) → (groups, N·positions, C/groups·kernel), rows ordered (c, k...)."""
    n, channels = windows.shape[:2]
    nd = (windows.ndim - 2) // 2
    out, kernel = windows.shape[2 : 2 + nd], windows.shape[2 + nd :]
    grouped = windows.reshape(n, groups, channels // groups, *out, *kernel)
    order = (1, 0, *range(3, 3 + nd), 2, *range(3 + nd, 3 + 2 * nd))
    return grouped.transpose(order).reshape(groups, n * math.prod(out), (channels // groups) * math.prod(kernel))


def _sampled_rows(windows: np.ndarray, groups: int, positions: int, rng: np.random.Generator) -> np.ndarray:
    """Like `_group_rows`, but of `positions` output positions per sample, drawn by `rng`
    without replacement (sorted, so the rows keep the image's order)."""
    n, channels = windows.shape[:2]
    nd = (windows.ndim - 2) // 2
    out, kernel = windows.shape[2 : 2 + nd], windows.shape[2 + nd :]
    picks = np.sort(np.stack([rng.choice(math.prod(out), positions, replace=False) for _ in range(n)]), axis=1)
    index = np.unravel_index(picks, out)  # each (n, positions)
    chosen = windows[(np.arange(n)[:, None], slice(None), *index)]  # (n, positions, C, *kernel)
    grouped = chosen.reshape(n, positions, groups, channels // groups, *kernel)
    return grouped.transpose(2, 0, 1, *range(3, 4 + nd)).reshape(groups, n * positions, -1)


def _rows_of(windows: np.ndarray, groups: int, positions: int | None, rng: np.random.Generator | None) -> np.ndarray:
    nd = (windows.ndim - 2) // 2
    if positions and math.prod(windows.shape[2 : 2 + nd]) > positions:
        return _sampled_rows(windows, groups, positions, rng if rng is not None else np.random.default_rng(0))
    return _group_rows(windows, groups)


def _conv_pads(node: ir.Node, spatial: tuple[int, ...], kernel, strides, dilations) -> tuple[list[int], list[int]]:
    nd = len(spatial)
    auto = _string(node, "auto_pad", "NOTSET")
    if auto == "VALID":
        return [0] * nd, [0] * nd
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        begins, ends = [], []
        for size, k, s, d in zip(spatial, kernel, strides, dilations):
            total = max(0, (math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size)
            small, large = total // 2, total - total // 2
            begins.append(small if auto == "SAME_UPPER" else large)
            ends.append(large if auto == "SAME_UPPER" else small)
        return begins, ends
    pads = _ints(node, "pads", [0] * (2 * nd))
    return pads[:nd], pads[nd:]


def _conv_rows(node: ir.Node, x: np.ndarray, weight_shape, groups: int, positions=None, rng=None) -> np.ndarray:
    nd = x.ndim - 2
    kernel = list(weight_shape[2:])
    strides, dilations = _ints(node, "strides", [1] * nd), _ints(node, "dilations", [1] * nd)
    begins, ends = _conv_pads(node, x.shape[2:], kernel, strides, dilations)
    return _rows_of(_windows(_pad_or_crop(x, begins, ends), kernel, strides, dilations), groups, positions, rng)


def _conv_transpose_rows(node: ir.Node, x: np.ndarray, weight_shape, groups: int, positions=None, rng=None) -> np.ndarray:
    """ConvTranspose is a stride-1 correlation, with the kernel flipped, over the input with
    (stride − 1) zeros inserted between samples and (k − 1)·d − pad added at each border."""
    if "output_shape" in node.attributes or _string(node, "auto_pad", "NOTSET") != "NOTSET":
        raise UnsupportedLayer("ConvTranspose with output_shape or auto_pad")
    nd = x.ndim - 2
    kernel = list(weight_shape[2:])
    strides, dilations = _ints(node, "strides", [1] * nd), _ints(node, "dilations", [1] * nd)
    extra = _ints(node, "output_padding", [0] * nd)
    pads = _ints(node, "pads", [0] * (2 * nd))
    n, c, *size = x.shape
    upsampled = np.zeros((n, c, *[(i - 1) * s + 1 for i, s in zip(size, strides)]), dtype=x.dtype)
    upsampled[(slice(None), slice(None), *[slice(None, None, s) for s in strides])] = x
    begins, ends = [], []
    for i in range(nd):
        reach = (kernel[i] - 1) * dilations[i]
        out = strides[i] * (size[i] - 1) + extra[i] + reach + 1 - pads[i] - pads[nd + i]
        begins.append(reach - pads[i])
        ends.append(out + reach - begins[i] - upsampled.shape[2 + i])
    windows = _windows(_pad_or_crop(upsampled, begins, ends), kernel, [1] * nd, dilations)
    flipped = windows[(Ellipsis, *[slice(None, None, -1)] * nd)]
    return _rows_of(flipped, groups, positions, rng)


def _recurrent_rows(layer: WeightLayer, x: np.ndarray) -> np.ndarray:
    """(directions, rows, features): for W the input sequence X, the same rows for every
    direction; for R the hidden states each direction multiplied, h(t−1) of every step but
    the first (whose state, initial_h, is not among the node's outputs). X is (T, N, in) and
    Y (T, D, N, hidden), or with layout = 1 (N, T, in) and (N, T, D, hidden)."""
    directions = layer.groups
    batch_first = attr_int(layer.node, "layout", 0) == 1
    if layer.index == 1:
        rows = x.reshape(-1, x.shape[-1])
        return np.broadcast_to(rows, (directions, *rows.shape))
    states = x.transpose(2, 1, 0, 3) if batch_first else x.transpose(1, 0, 2, 3)  # (D, T, N, hidden)
    reverse = _string(layer.node, "direction", "forward") == "reverse"
    per_direction = []
    for d in range(directions):
        backward = reverse or d == 1  # a reverse pass reads the state of the step after
        previous = states[d, 1:] if backward else states[d, :-1]
        per_direction.append(previous.reshape(-1, states.shape[-1]))
    return np.stack(per_direction)


def input_rows(
    layer: WeightLayer, x: np.ndarray, positions: int | None = None, rng: np.random.Generator | None = None
) -> np.ndarray:
    """(groups, rows, reduction) array such that rows @ weight_matrix = the layer's output.

    With `positions`, a convolution gives the rows of at most that many output positions per
    sample, drawn by `rng`: a Gram matrix estimated from them costs the same for any image
    size."""
    node, op = layer.node, layer.node.op_type
    if op == "MatMul":
        return x.reshape(1, -1, x.shape[-1])
    if op == "Gemm":
        return (x.T if attr_int(node, "transA", 0) else x)[None]
    if layer.recurrent:
        return _recurrent_rows(layer, x)
    shape = tuple(layer.weight.shape)
    if op == "Conv":
        return _conv_rows(node, x, shape, layer.groups, positions, rng)
    if op == "ConvTranspose":
        return _conv_transpose_rows(node, x, shape, layer.groups, positions, rng)
    raise UnsupportedLayer(f"{op} has no input rows")


def weight_matrix(layer: WeightLayer, w: np.ndarray) -> np.ndarray:
    """(groups, reduction, outputs per group) view of the weight, matching `input_rows`."""
    op, groups = layer.node.op_type, layer.groups
    if layer.recurrent:
        return w.transpose(0, 2, 1)  # (directions, gates·hidden, in) → (directions, in, gates·hidden)
    if op == "MatMul" or (op == "Gemm" and layer.channel_axis == 1):
        return w[None]
    if op == "Gemm":
        return w.T[None]
    if op == "Conv":
        return w.reshape(groups, w.shape[0] // groups, -1).transpose(0, 2, 1)
    if op == "ConvTranspose":
        per_group = w.reshape(groups, w.shape[0] // groups, w.shape[1], -1)  # (g, C/g, M/g, K)
        return per_group.transpose(0, 1, 3, 2).reshape(groups, -1, w.shape[1])
    raise UnsupportedLayer(f"{op} has no weight matrix")


def weight_from_matrix(layer: WeightLayer, matrix: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of `weight_matrix`: the weight in its ONNX layout."""
    op, groups = layer.node.op_type, layer.groups
    if layer.recurrent:
        return matrix.transpose(0, 2, 1).reshape(shape)
    if op == "MatMul" or (op == "Gemm" and layer.channel_axis == 1):
        return matrix[0].reshape(shape)
    if op == "Gemm":
        return matrix[0].T.reshape(shape)
    if op == "Conv":
        return matrix.transpose(0, 2, 1).reshape(shape)
    if op == "ConvTranspose":
        kernel = math.prod(shape[2:])
        per_group = matrix.reshape(groups, shape[0] // groups, kernel, shape[1]).transpose(0, 1, 3, 2)
        return per_group.reshape(shape)
    raise UnsupportedLayer(f"{op} has no weight matrix")


def relative_output_error(layer: WeightLayer, gram: np.ndarray, w: np.ndarray, w_hat: np.ndarray) -> float:
    """tr(ΔWᵀ H ΔW) / tr(Wᵀ H W): the squared error a weight change adds to the layer's
    outputs on the calibration data, relative to the outputs' own energy."""
    m = weight_matrix(layer, w.astype(np.float64))
    delta = weight_matrix(layer, w_hat.astype(np.float64)) - m
    error = float(np.sum((gram @ delta) * delta))
    energy = float(np.sum((gram @ m) * m))
    return error / energy if energy > 0 else 0.0
