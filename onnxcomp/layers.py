"""Finding the layers whose constant weight can be quantized, and their weight layout."""

from __future__ import annotations

import math
from dataclasses import dataclass

import onnx_ir as ir

FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


@dataclass(frozen=True)
class WeightLayer:
    """A node with a constant weight, and which weight axes mean what.

    `channel_axis` indexes output channels (one scale each, per-channel);
    `reduction_axis` is the axis the layer sums over (blocks run along it).
    """

    node: ir.Node
    weight: ir.Value
    channel_axis: int
    reduction_axis: int

    @property
    def name(self) -> str:
        return self.node.name or self.weight.name or "?"

    @property
    def data(self) -> ir.Value | None:
        """The activation the weight multiplies; None for an embedding lookup."""
        return None if self.node.op_type == "Gather" else self.node.inputs[0]

    @property
    def groups(self) -> int:
        return attr_int(self.node, "group", 1) if self.node.op_type in ("Conv", "ConvTranspose") else 1


def attr_int(node: ir.Node, name: str, default: int) -> int:
    """An integer attribute of `node`, or `default` where it is absent."""
    attr = node.attributes.get(name)
    return default if attr is None else attr.as_int()


def constant_weight(value: ir.Value | None) -> bool:
    """True for an initializer with data, of a float type, that is not a graph input."""
    return (
        value is not None
        and value.const_value is not None
        and value.is_initializer()
        and not value.is_graph_input()
        and value.dtype in FLOAT_TYPES
    )


def dequantized_constant(value: ir.Value | None) -> bool:
    """True for the output of a DequantizeLinear of initializers: a weight already quantized."""
    producer = value.producer() if value is not None else None
    return (
        producer is not None
        and producer.op_type == "DequantizeLinear"
        and all(v is None or v.const_value is not None for v in producer.inputs)
    )


def dequantize_layout(node: ir.Node) -> tuple[int | None, int | None]:
    """A DequantizeLinear's (axis, block size) as the quantize kernels take them: axis None
    for a single scale (otherwise made non-negative), block size None when not blockwise."""
    codes, scale = node.inputs[0].const_value, node.inputs[1].const_value
    block = attr_int(node, "block_size", 0)
    axis = None if scale.size == 1 else attr_int(node, "axis", 1) % len(codes.shape)
    return axis, (block if block > 0 else None)


def weight_layer(node: ir.Node, include_quantized: bool = False) -> WeightLayer | None:
    """The layer view of one node, or None when it has no quantizable constant weight.

    With `include_quantized`, a weight that is already DequantizeLinear(initializers) counts too.
    """
    if node.domain not in ("", "ai.onnx"):
        return None
    op = node.op_type
    inputs = node.inputs

    def usable(value: ir.Value | None) -> bool:
        return constant_weight(value) or (include_quantized and dequantized_constant(value))

    if op in ("Conv", "ConvTranspose") and len(inputs) > 1 and usable(inputs[1]):
        # Conv: (M, C/g, k...) sums over C/g; ConvTranspose: (C, M/g, k...) sums over C.
        if op == "Conv":
            return WeightLayer(node, inputs[1], channel_axis=0, reduction_axis=1)
        return WeightLayer(node, inputs[1], channel_axis=1, reduction_axis=0)
    if op == "Gemm" and len(inputs) > 1 and usable(inputs[1]):
        if attr_int(node, "transB", 0):
            return WeightLayer(node, inputs[1], channel_axis=0, reduction_axis=1)
        return WeightLayer(node, inputs[1], channel_axis=1, reduction_axis=0)
    if op == "MatMul" and len(inputs) > 1 and usable(inputs[1]) and len(inputs[1].shape or ()) == 2:
        return WeightLayer(node, inputs[1], channel_axis=1, reduction_axis=0)
    if op == "Gather" and usable(inputs[0]) and len(inputs[0].shape or ()) == 2 and attr_int(node, "axis", 0) == 0:
        # An embedding table: one scale per row, blocks along the embedding dimension.
        return WeightLayer(node, inputs[0], channel_axis=0, reduction_axis=1)
    return None


def reduction_depth(layer: WeightLayer) -> int:
    """How many products each output of the layer sums (per group, kernel included)."""
    shape = layer.weight.shape
    kernel = math.prod(shape[2:]) if layer.node.op_type in ("Conv", "ConvTranspose") else 1
    if layer.node.op_type == "ConvTranspose":
        return shape[0] // layer.groups * kernel
    return shape[layer.reduction_axis] * kernel


def find_weight_layers(graph: ir.Graph, include_quantized: bool = False) -> list[WeightLayer]:
    """Every quantizable layer of the graph and its subgraphs, in graph order."""
    return [
        layer
        for node in ir.traversal.RecursiveGraphIterator(graph)
        if (layer := weight_layer(node, include_quantized))
    ]
