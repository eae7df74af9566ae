"""Finding the layers whose constant weight can be quantized, and their weight layout."""

from __future__ import annotations

import math
from dataclasses import dataclass

import onnx_ir as ir

FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
# Recurrent layers: W (input 1) and R (input 2) are [directions, gates·hidden, inputs].
RECURRENT = ("LSTM", "GRU", "RNN")


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
    index: int = 1  # the node input the weight is read at (a recurrent node's W is 1, R is 2)

    @property
    def name(self) -> str:
        """The node's name; a recurrent node's two views say which weight (`lstm:W`, `lstm:R`)."""
        base = self.node.name or self.weight.name or "?"
        if self.recurrent and self.node.name:
            return f"{base}:{'W' if self.index == 1 else 'R'}"
        return base

    @property
    def data(self) -> ir.Value | None:
        """The activation the weight multiplies, as rows of a matrix product; None for an
        embedding lookup and for recurrent layers (their inputs are not plain rows)."""
        return None if self.node.op_type in ("Gather", *RECURRENT) else self.node.inputs[0]

    @property
    def rows_source(self) -> ir.Value | None:
        """The value whose rows the weight multiplies, for input statistics: `data`, or for a
        recurrent layer its input sequence X (weight W) or its hidden states Y (weight R: the
        states of the step before). None where there is none: an embedding lookup, a
        recurrent layer without Y, and GRU's R unless linear_before_reset (its new gate
        multiplies r⊙h, not the hidden state)."""
        if not self.recurrent:
            return self.data
        if self.index == 1:
            return self.node.inputs[0]
        hidden = self.node.outputs[0] if self.node.outputs else None
        if hidden is None or not hidden.name:
            return None
        if self.node.op_type == "GRU" and not attr_int(self.node, "linear_before_reset", 0):
            return None
        return hidden

    @property
    def recurrent(self) -> bool:
        return self.node.op_type in RECURRENT

    @property
    def groups(self) -> int:
        """Convolution groups; for a recurrent layer its directions, each a matrix of its own."""
        if self.recurrent:
            return int(self.weight.shape[0])
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


def layer_axes(node: ir.Node, index: int, rank: int) -> tuple[int, int] | None:
    """(channel axis, reduction axis) of the weight a node reads at input `index`, or None
    when that input is no layer weight. Conv: (M, C/g, k...) sums over C/g; ConvTranspose:
    (C, M/g, k...) sums over C; an embedding table has one row per id."""
    if node.domain not in ("", "ai.onnx"):
        return None
    op = node.op_type
    if op == "Conv" and index == 1:
        return 0, 1
    if op == "ConvTranspose" and index == 1:
        return 1, 0
    if op == "Gemm" and index == 1:
        return (0, 1) if attr_int(node, "transB", 0) else (1, 0)
    if op == "MatMul" and index == 1 and rank == 2:
        return 1, 0
    if op == "Gather" and index == 0 and rank == 2 and attr_int(node, "axis", 0) == 0:
        return 0, 1
    if op in RECURRENT and index in (1, 2) and rank == 3:
        return 1, 2  # one row per gate unit and direction, summed over the inputs (or hidden state)
    return None


def weight_layers(node: ir.Node, include_quantized: bool = False) -> list[WeightLayer]:
    """The layer views of one node: one per quantizable constant weight it reads (two for a
    recurrent layer, W and R; none for a node without one).

    With `include_quantized`, a weight that is already DequantizeLinear(initializers) counts too.
    """
    indices = (1, 2) if node.op_type in RECURRENT else (0,) if node.op_type == "Gather" else (1,)
    found = []
    for index in indices:
        weight = node.inputs[index] if len(node.inputs) > index else None
        if not (constant_weight(weight) or (include_quantized and dequantized_constant(weight))):
            continue
        axes = layer_axes(node, index, len(weight.shape or ()))
        if axes is not None:
            found.append(WeightLayer(node, weight, *axes, index))
    return found


def weight_layer(node: ir.Node, include_quantized: bool = False) -> WeightLayer | None:
    """The node's first layer view (`weight_layers`), or None."""
    layers = weight_layers(node, include_quantized)
    return layers[0] if layers else None


def _swaps_matrix(node: ir.Node) -> bool:
    perm = node.attributes.get("perm")
    return node.op_type == "Transpose" and (perm is None or list(perm.as_ints()) == [1, 0])


def weight_consumers(weight: ir.Value) -> list[tuple[ir.Node, tuple[int, int] | None]]:
    """Every node that reads `weight`, with the (channel, reduction) axes it reads it along
    in the weight's own coordinates, or None where it is no layer. A matrix read through a
    Transpose (a tied embedding feeding the logits MatMul) counts as read by the Transpose's
    consumers, axes swapped back."""
    rank = len(weight.shape or ())
    found = []
    for user, index in weight.uses():
        if rank == 2 and _swaps_matrix(user) and not user.outputs[0].is_graph_output():
            for reader, reader_index in user.outputs[0].uses():
                axes = layer_axes(reader, reader_index, 2)
                found.append((reader, None if axes is None else (axes[1], axes[0])))
        else:
            found.append((user, layer_axes(user, index, rank)))
    return found


def sharing_refusal(layer: WeightLayer) -> str | None:
    """Why a weight read by several nodes cannot be quantized once for all of them (with one
    DequantizeLinear), or None when it can: every reader is a layer reading it along the
    same axes."""
    readers = weight_consumers(layer.weight)
    if len(readers) < 2:
        return None
    others = sorted({node.op_type for node, axes in readers if axes is None})
    if others:
        return f"weight shared by {len(readers)} nodes, not all layers ({', '.join(others)})"
    if len({axes for _, axes in readers}) > 1:
        return f"weight shared by {len(readers)} layers that read it along different axes"
    return None


def shared(layer: WeightLayer) -> bool:
    """True when other layers read this layer's weight too."""
    return len(weight_consumers(layer.weight)) > 1


def computed_weight_sources(graph: ir.Graph) -> dict[str, int]:
    """Layers whose weight the graph computes instead of storing it (a Conv's weight from
    ConstantOfShape, a graph input): what computes it → how many such layers. A MatMul of
    two activations (attention) is no layer and is not counted."""
    found: dict[str, int] = {}
    for node in ir.traversal.RecursiveGraphIterator(graph):
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or len(node.inputs) < 2:
            continue
        weight = node.inputs[1]
        if weight is None or weight_layer(node) is not None:
            continue
        producer = weight.producer()
        source = producer.op_type if producer is not None else "a graph input"
        if node.op_type in ("Conv", "ConvTranspose") or source == "ConstantOfShape":
            found[source] = found.get(source, 0) + 1
    return found


def reduction_depth(layer: WeightLayer) -> int:
    """How many products each output of the layer sums (per group, kernel included)."""
    shape = layer.weight.shape
    kernel = math.prod(shape[2:]) if layer.node.op_type in ("Conv", "ConvTranspose") else 1
    if layer.node.op_type == "ConvTranspose":
        return shape[0] // layer.groups * kernel
    return shape[layer.reduction_axis] * kernel


def find_weight_layers(graph: ir.Graph, include_quantized: bool = False) -> list[WeightLayer]:
    """Every quantizable layer of the graph and its subgraphs, in graph order."""
    return [layer for node in ir.traversal.RecursiveGraphIterator(graph) for layer in weight_layers(node, include_quantized)]


# Operators that only a quantized model holds (ONNX's and onnxruntime's contrib ops).
QUANTIZED_OPS = frozenset({
    "QuantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul", "QLinearAdd", "QLinearMul",
    "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearConcat", "QLinearSigmoid", "QLinearLeakyRelu",
    "QLinearSoftmax", "QGemm", "ConvInteger", "MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat",
    "MatMulNBits", "GatherBlockQuantized", "MatMulBnb4", "QAttention", "QOrderedMatMul",
})


def quantized_parts(graph: ir.Graph) -> dict[str, int]:
    """What makes a graph already quantized: op type → count (DequantizeLinear counted
    where it decodes a constant weight)."""
    found: dict[str, int] = {}
    for node in ir.traversal.RecursiveGraphIterator(graph):
        quantized = node.op_type in QUANTIZED_OPS or (node.op_type == "DequantizeLinear" and dequantized_constant(node.outputs[0]))
        if quantized:
            found[node.op_type] = found.get(node.op_type, 0) + 1
    return found
