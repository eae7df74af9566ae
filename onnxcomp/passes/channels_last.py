"""Flatten in channels-last order after an integer convolution.

onnxruntime runs integer convolutions (QLinearConv) in NHWC and transposes back to NCHW
wherever the graph needs NCHW, as before a Flatten into a Gemm. On small CNNs that
Transpose of the whole activation costs more than the integer kernels save. Flattening the
NHWC tensor instead, with the rows of the reading layers' weights permuted to match, computes
the same function, and onnxruntime cancels the Transpose it inserts against ours.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxcomp.layers import WeightLayer, attr_int, constant_weight, dequantize_layout, dequantized_constant, weight_layer
from onnxcomp.passes.graph_edit import NameAllocator


def _stored_weight(layer: WeightLayer) -> ir.Value | None:
    """The initializer whose reduction axis a permutation may reorder: the float weight, or the
    integer codes of a per-channel (or per-tensor) DequantizeLinear; None when it is shared or
    blockwise (blocks would mix channels)."""
    weight = layer.weight
    if len(list(weight.uses())) != 1:
        return None
    if constant_weight(weight):
        return weight
    if not dequantized_constant(weight):
        return None
    dequantize = weight.producer()
    codes = dequantize.inputs[0]
    axis, block_size = dequantize_layout(dequantize)
    if block_size is not None or axis not in (None, layer.channel_axis) or len(list(codes.uses())) != 1:
        return None
    return codes


def _channels_last_order(channels: int, depth: int) -> np.ndarray:
    """For each position of a channels-last flattened row, its position channels-first."""
    spatial = depth // channels
    return (np.arange(channels)[None, :] * spatial + np.arange(spatial)[:, None]).reshape(-1)


def _readers(flat: ir.Value, channels: int) -> list[tuple[WeightLayer, ir.Value]] | None:
    """The layers reading the flattened value as data with a weight that can be permuted, or
    None when any reader cannot be."""
    readers = []
    for node, _ in flat.uses():
        layer = weight_layer(node, include_quantized=True)
        if layer is None or layer.data is not flat:
            return None
        stored = _stored_weight(layer)
        if stored is None or stored.shape[layer.reduction_axis] % channels:
            return None
        readers.append((layer, stored))
    return readers or None


def flatten_channels_last(graph: ir.Graph, names: NameAllocator, conv_output: ir.Value, channels: int, rank: int) -> list[str]:
    """Rewrite each Flatten(axis=1) of `conv_output` (rank-4, `channels` channels) whose
    readers can all be permuted; returns the names of the layers whose weights were permuted."""
    if rank != 4 or conv_output.is_graph_output():
        return []
    permuted = []
    for flatten, _ in list(conv_output.uses()):
        if flatten.op_type != "Flatten" or attr_int(flatten, "axis", 1) != 1 or flatten.outputs[0].is_graph_output():
            continue
        readers = _readers(flatten.outputs[0], channels)
        if readers is None:
            continue
        for layer, stored in readers:
            order = _channels_last_order(channels, stored.shape[layer.reduction_axis])
            tensor = stored.const_value
            stored.const_value = ir.Tensor(np.take(tensor.numpy(), order, axis=layer.reduction_axis), dtype=tensor.dtype, name=tensor.name)
            permuted.append(layer.name)
        transpose = ir.node("Transpose", [conv_output], attributes={"perm": [0, 2, 3, 1]}, name=names.fresh(conv_output.name + "_to_channels_last"))
        transposed = transpose.outputs[0]
        transposed.name = names.fresh(conv_output.name + "_channels_last")
        transposed.type = conv_output.type
        graph.extend([transpose])  # placed by the topological sort that follows
        flatten.replace_input_with(0, transposed)
    return permuted
