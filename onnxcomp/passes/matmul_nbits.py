"""A MatMul whose weight sits on a grid with real-valued zero points, written as
onnxruntime's MatMulNBits (com.microsoft): DequantizeLinear takes integer zero points only,
MatMulNBits takes them in the scales' type, so each block's levels can span exactly its own
[min, max] (as HQQ's and llama.cpp's Q4_1 grids do), and onnxruntime runs it on the packed
codes.

Layout (onnxruntime's contrib-op spec): B [N, K/block, block·bits/8] uint8, each block's
codes along K, lowest bits first; scales and zero points [N · K/block], column by column.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxcomp.kernels.quantize import Quantized
from onnxcomp.layers import WeightLayer
from onnxcomp.passes.graph_edit import NameAllocator, add_initializer

BITS = (2, 4)  # onnxruntime's CPU kernel takes real zero points at these widths (3-bit codes as 4)


def usable(layer: WeightLayer, block_size: int | None, bits: int) -> bool:
    """Whether the layer can be written as MatMulNBits: a MatMul by a constant right-hand
    matrix, blocks of a power of two of at least 16 along its reduction axis."""
    node = layer.node
    return (node.op_type == "MatMul" and len(node.inputs) == 2 and node.inputs[1] is layer.weight
            and node.inputs[0] is not layer.weight and len(layer.weight.shape or ()) == 2 and block_size is not None
            and block_size >= 16 and not block_size & (block_size - 1) and (4 if bits == 3 else bits) in BITS)


def pack(codes: np.ndarray, bits: int, block_size: int) -> np.ndarray:
    """(K, N) codes in [0, 2^bits) → B [N, K/block, block·bits/8] uint8."""
    k, n = codes.shape
    per_byte = 8 // bits
    blocks = codes.T.reshape(n, k // block_size, block_size // per_byte, per_byte).astype(np.uint8)
    packed = np.zeros(blocks.shape[:3], dtype=np.uint8)
    for slot in range(per_byte):
        packed |= blocks[..., slot] << (slot * bits)
    return packed


def replace_with_matmul_nbits(graph: ir.Graph, names: NameAllocator, layer: WeightLayer, qt: Quantized, bits: int,
                              accuracy_level: int = 0) -> ir.Node:
    """Put a MatMulNBits where the layer's MatMul is (its output value's uses moved over)."""
    node = layer.node
    k, n = layer.weight.shape
    stored = 4 if bits == 3 else bits
    base = layer.weight.name
    inputs = [
        node.inputs[0],
        add_initializer(graph, names, base + "_nbits", pack(qt.q, stored, qt.block_size)),
        add_initializer(graph, names, base + "_scale", np.ascontiguousarray(qt.scale.T).reshape(-1)),
        add_initializer(graph, names, base + "_zero_point", np.ascontiguousarray(qt.zero_point.T).reshape(-1)),
    ]
    attributes = {"K": int(k), "N": int(n), "bits": stored, "block_size": int(qt.block_size), "accuracy_level": accuracy_level}
    fused = ir.node("MatMulNBits", inputs, attributes=attributes, domain="com.microsoft", name=names.fresh((node.name or base) + "_nbits"))
    out, old = fused.outputs[0], node.outputs[0]
    out.type, out.shape = old.type, old.shape
    graph.insert_before(node, fused)
    ir.convenience.replace_all_uses_with(old, out, replace_graph_outputs=True)
    name, old.name = old.name, None
    graph.remove(node, safe=True)
    out.name = name
    fused.name = node.name or fused.name
    if not list(layer.weight.uses()) and layer.weight.name in graph.initializers:
        graph.initializers.pop(layer.weight.name)
    return fused
