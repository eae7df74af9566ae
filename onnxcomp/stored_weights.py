"""The weights a compressed graph stores as codes, decoded back to float, in every form the
emit stages write: DequantizeLinear over constants, MatMulNBits, GatherBlockQuantized and
embedding rows gathered before they are decoded. `inspect` reads them; so can a user who
wants the float weights a file really holds."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxcomp.container.format import to_symbols
from onnxcomp.kernels.quantize import Quantized, dequantize
from onnxcomp.layers import attr_int, dequantize_layout


@dataclass(frozen=True)
class StoredWeight:
    name: str  # the stored codes' name
    op: str  # the operators reading the decoded weight
    storage: str  # the codes' element type: int4, uint8, ...
    weight: np.ndarray  # as the graph decodes it
    parts: tuple[ir.Value, ...]  # the constants it is made of (codes, scales, zero points)


def _constant(value: ir.Value | None) -> np.ndarray | None:
    return None if value is None or value.const_value is None else value.const_value.numpy()


def _readers(node: ir.Node) -> str:
    return "/".join(user.op_type for out in node.outputs for user, _ in out.uses()) or "-"


def _from_dequantize(node: ir.Node) -> StoredWeight | None:
    values = [_constant(v) for v in node.inputs]
    if any(v is None for v in values[:2]):
        return None
    zp = values[2].astype(np.int32) if len(values) > 2 and values[2] is not None else None
    weight = dequantize(Quantized(values[0].astype(np.int32), values[1], zp, *dequantize_layout(node)))
    parts = tuple(v for v in node.inputs if v is not None)
    return StoredWeight(node.inputs[0].name, _readers(node), node.inputs[0].dtype.name.lower(), weight, parts)


def _from_matmul_nbits(node: ir.Node) -> StoredWeight | None:
    """B [N, K/block, block·bits/8], lowest bits first; scales and zero points column by column;
    integer zero points packed like B, default 2^(bits−1)."""
    packed, scale = _constant(node.inputs[1]), _constant(node.inputs[2])
    zero_value = node.inputs[3] if len(node.inputs) > 3 else None
    zero = _constant(zero_value)
    if packed is None or scale is None or (zero_value is not None and zero is None):
        return None
    k, n, bits, block = (attr_int(node, key, 0) for key in ("K", "N", "bits", "block_size"))
    blocks = -(-k // block)
    codes = to_symbols(packed.tobytes(), bits, packed.size * 8 // bits).reshape(n, blocks * block)
    if zero is None:
        zero = np.full(n * blocks, 2 ** (bits - 1), np.float64)
    elif zero.dtype == np.uint8:
        zero = to_symbols(zero.tobytes(), bits, zero.size * 8 // bits).reshape(n, -1)[:, :blocks]
    zero = zero.astype(np.float64).reshape(n, blocks, 1)
    decoded = (codes.reshape(n, blocks, block) - zero) * scale.astype(np.float64).reshape(n, blocks, 1)
    weight = decoded.reshape(n, blocks * block)[:, :k].T.astype(scale.dtype)
    parts = tuple(v for v in node.inputs[1:] if v is not None and v.const_value is not None)
    return StoredWeight(node.inputs[1].name, "MatMulNBits", f"uint{bits} packed", weight, parts)


def _from_gather_block_quantized(node: ir.Node) -> StoredWeight | None:
    codes, scale = _constant(node.inputs[0]), _constant(node.inputs[2])
    zero = _constant(node.inputs[3]) if len(node.inputs) > 3 else None
    if codes is None or scale is None or attr_int(node, "gather_axis", 0) != 0 or attr_int(node, "quantize_axis", 1) != 1:
        return None
    signed = node.inputs[0].dtype in (ir.DataType.INT4, ir.DataType.INT8)
    zp = zero.astype(np.int32) if zero is not None else None if signed else np.full(scale.shape, 8, np.int32)
    weight = dequantize(Quantized(codes.astype(np.int32), scale, zp, 1, attr_int(node, "block_size", 128)))
    parts = tuple(v for v in (node.inputs[0], node.inputs[2], *node.inputs[3:]) if v is not None)
    return StoredWeight(node.inputs[0].name, "GatherBlockQuantized", node.inputs[0].dtype.name.lower(), weight, parts)


def _from_gathered_rows(node: ir.Node) -> StoredWeight | None:
    """Gather(codes, ids) beside Gather(scales, ids) (and zero points): rows decoded after the
    lookup, one scale per row or blocks along it."""
    codes = _constant(node.inputs[0])
    if codes is None or codes.ndim != 2 or codes.dtype.kind not in "iu" or attr_int(node, "axis", 0) != 0:
        return None
    siblings = [user.inputs[0] for user, index in node.inputs[1].uses()
                if user is not node and index == 1 and user.op_type == "Gather" and _constant(user.inputs[0]) is not None]
    rows, width = codes.shape
    scale_value = next((v for v in siblings if v.const_value.numpy().dtype.kind == "f" and v.shape[0] == rows
                        and (len(v.shape) == 1 or (v.shape[1] < width and width % v.shape[1] == 0))), None)
    if scale_value is None:
        return None
    scale = scale_value.const_value.numpy()
    zero_value = next((v for v in siblings if v is not node.inputs[0] and v.const_value.numpy().dtype.kind in "iu"
                       and tuple(v.shape) == tuple(scale.shape)), None)
    zero = None if zero_value is None else zero_value.const_value.numpy().astype(np.int32)
    axis, block = (0, None) if scale.ndim == 1 else (1, width // scale.shape[1])
    weight = dequantize(Quantized(codes.astype(np.int32), scale, zero, axis, block))
    parts = tuple(v for v in (node.inputs[0], scale_value, zero_value) if v is not None)
    return StoredWeight(node.inputs[0].name, "Gather", node.inputs[0].dtype.name.lower(), weight, parts)


_DECODERS = {
    ("", "DequantizeLinear"): _from_dequantize,
    ("com.microsoft", "MatMulNBits"): _from_matmul_nbits,
    ("com.microsoft", "GatherBlockQuantized"): _from_gather_block_quantized,
    ("", "Gather"): _from_gathered_rows,
}


def stored_weights(graph: ir.Graph) -> list[StoredWeight]:
    """Every quantized weight in the graph (subgraphs included), decoded."""
    found = []
    for node in ir.traversal.RecursiveGraphIterator(graph):
        decode = _DECODERS.get(("" if node.domain == "ai.onnx" else node.domain, node.op_type))
        stored = decode(node) if decode is not None else None
        if stored is not None:
            found.append(stored)
    return found
