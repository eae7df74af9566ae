"""A MatMul by a constant matrix written as onnxruntime's MatMulNBits (com.microsoft), which
runs on the packed codes: what `--target onnxruntime` writes for blockwise MatMul layers at
2, 3 (in 4-bit slots), 4 and 8 bits, with the codes, scales and zero points onnxcomp chose.
It is also the only way to give a block a real-valued zero point (`--zero-point float`):
DequantizeLinear takes integer ones only.

Layout (onnxruntime's contrib-op spec): B [N, K/block, block·bits/8] uint8, each block's
codes along K, lowest bits first; scales [N · K/block], column by column; integer zero
points packed like the codes, each column's padded to whole bytes; real ones in the
scales' type. Without zero points MatMulNBits takes 2^(bits−1), so symmetric codes q are
stored as q + 2^(bits−1) and decode to the same values.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxcomp.kernels.quantize import Quantized
from onnxcomp.layers import WeightLayer, weight_consumers
from onnxcomp.passes.graph_edit import NameAllocator, add_initializer, replace_node

STORED_BITS = {2: 2, 3: 4, 4: 4, 8: 8}  # the slot width onnxruntime's kernels take per code width
REAL_ZERO_BITS = (2, 3, 4)  # real zero points: onnxruntime's CPU kernel takes them at these widths
MAX_BLOCK = 256  # onnxruntime's CPU kernel takes blocks of 16 to 256


def usable(layer: WeightLayer, block_size: int | None, bits: int, real_zero: bool = False) -> bool:
    """Whether the layer can be written as MatMulNBits: a MatMul by a constant right-hand
    matrix that no other node reads, blocks of a power of two from 16 to 256 along its
    reduction axis."""
    node = layer.node
    return (node.op_type == "MatMul" and len(node.inputs) == 2 and node.inputs[1] is layer.weight
            and len(weight_consumers(layer.weight)) == 1
            and node.inputs[0] is not layer.weight and len(layer.weight.shape or ()) == 2 and block_size is not None
            and 16 <= block_size <= MAX_BLOCK and not block_size & (block_size - 1) and bits in STORED_BITS
            and (not real_zero or bits in REAL_ZERO_BITS))


def as_blocks(layer: WeightLayer, qt: Quantized) -> Quantized | None:
    """A per-channel or per-tensor MatMul weight in MatMulNBits' blockwise layout: blocks as
    long as the largest power of two dividing the reduction (16 to 256), each repeating its
    column's scale and zero point, so the codes and decoded values stay the same. None where
    the reduction has no such divisor."""
    if qt.block_size is not None or qt.axis not in (None, 1) or layer.node.op_type != "MatMul":
        return None
    k, n = qt.q.shape
    block = min(k & -k, MAX_BLOCK)  # the largest power of two dividing k, as far as the kernel goes
    if block < 16:
        return None
    count = k // block

    def repeated(param):
        return None if param is None else np.ascontiguousarray(np.broadcast_to(np.reshape(param, (1, -1)), (count, n)))

    return Quantized(qt.q, repeated(qt.scale), repeated(qt.zero_point), 0, block)


def pack_rows(codes: np.ndarray, bits: int) -> np.ndarray:
    """[rows, columns] unsigned codes → [rows, ⌈columns·bits/8⌉] uint8, lowest bits first."""
    per_byte = 8 // bits
    rows, columns = codes.shape
    padded = np.zeros((rows, -(-columns // per_byte) * per_byte), np.uint8)
    padded[:, :columns] = codes
    slots = padded.reshape(rows, -1, per_byte)
    packed = np.zeros(slots.shape[:2], np.uint8)
    for slot in range(per_byte):
        packed |= slots[..., slot] << (slot * bits)
    return packed


def replace_with_matmul_nbits(graph: ir.Graph, names: NameAllocator, layer: WeightLayer, qt: Quantized, bits: int,
                              accuracy_level: int) -> ir.Node:
    """Put a MatMulNBits where the layer's MatMul is (its output value's uses moved over)."""
    node = layer.node
    k, n = layer.weight.shape
    stored = STORED_BITS[bits]
    blocks = k // qt.block_size
    codes = qt.q.T  # [N, K]
    if qt.zero_point is None:
        codes = codes + 2 ** (stored - 1)
    base = layer.weight.name
    packed = pack_rows(codes.astype(np.uint8), stored).reshape(n, blocks, qt.block_size * stored // 8)
    inputs = [node.inputs[0], add_initializer(graph, names, base + "_nbits", packed),
              add_initializer(graph, names, base + "_scale", np.ascontiguousarray(qt.scale.T).reshape(-1))]
    if qt.zero_point is not None:
        zero = qt.zero_point.T  # [N, blocks]
        if zero.dtype.kind != "f":
            zero = pack_rows(zero.astype(np.uint8), stored)
        inputs.append(add_initializer(graph, names, base + "_zero_point", np.ascontiguousarray(zero).reshape(-1)))
    attributes = {"K": int(k), "N": int(n), "bits": stored, "block_size": int(qt.block_size), "accuracy_level": accuracy_level}
    fused = ir.node("MatMulNBits", inputs, attributes=attributes, domain="com.microsoft", name=names.fresh((node.name or base) + "_nbits"))
    replace_node(graph, node, fused)
    fused.name = node.name or fused.name
    if not list(layer.weight.uses()) and layer.weight.name in graph.initializers:
        graph.initializers.pop(layer.weight.name)
    return fused
