"""A tied embedding table (one table read by the input's Gather and, transposed, by the
logits MatMul) as onnxruntime's packed operators, the codes stored once.

Left as DequantizeLinear → {Gather, Transpose → MatMul}, onnxruntime decodes the whole
table on every run (for SmolLM2, 28 M weights, for one MatMul). Its MatMulNBits wants the
table as it is stored, row by row (N = the vocabulary, blocks along the hidden size), and
GatherBlockQuantized reads the same bytes viewed 2-D; both take the same scales and zero
points. So one packed initializer serves both, through a Reshape onnxruntime folds at load.
Symmetric codes q become unsigned ones q + 2^(b−1) with that zero point: the same values.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxcomp.layers import attr_int, dequantize_layout
from onnxcomp.passes.graph_edit import NameAllocator, add_initializer, replace_node
from onnxcomp.passes.matmul_nbits import MAX_BLOCK, pack_rows

_BITS = {ir.DataType.INT4: 4, ir.DataType.UINT4: 4, ir.DataType.INT8: 8, ir.DataType.UINT8: 8}


def _readers(dequantize: ir.Node) -> tuple[list[ir.Node], list[tuple[ir.Node, ir.Node]]] | None:
    """The Gathers of the decoded table and the (Transpose, MatMul) pairs that read it as the
    logits weight; None when anything else reads it."""
    gathers, matmuls = [], []
    for user, index in dequantize.outputs[0].uses():
        if user.op_type == "Gather" and index == 0 and user.domain in ("", "ai.onnx") and attr_int(user, "axis", 0) == 0:
            gathers.append(user)
            continue
        if user.op_type != "Transpose" or list(user.attributes["perm"].as_ints()) != [1, 0]:
            return None
        uses = list(user.outputs[0].uses())
        if not uses or user.outputs[0].is_graph_output() or any(m.op_type != "MatMul" or i != 1 for m, i in uses):
            return None
        matmuls.extend((user, matmul) for matmul, _ in uses)
    return (gathers, matmuls) if gathers and matmuls else None


def rewrite_tied_table(graph: ir.Graph, names: NameAllocator, dequantize: ir.Node, accuracy_level) -> str | None:
    """Rewrite one tied table's readers; the form chosen, or None where none fits.
    `accuracy_level(bits)` gives the MatMulNBits' accuracy level."""
    codes_value, scale_value = dequantize.inputs[0], dequantize.inputs[1]
    zero_value = dequantize.inputs[2] if len(dequantize.inputs) > 2 else None
    if dequantize.outputs[0].is_graph_output() or codes_value.dtype not in _BITS or len(codes_value.shape or ()) != 2:
        return None
    if any(v is not None and (v.const_value is None or len(list(v.uses())) != 1) for v in dequantize.inputs):
        return None
    axis, block = dequantize_layout(dequantize)
    if axis != 1 or block is None or not 16 <= block <= MAX_BLOCK or block & (block - 1):
        return None
    readers = _readers(dequantize)
    if readers is None or scale_value.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16):
        return None
    gathers, matmuls = readers
    bits = _BITS[codes_value.dtype]
    offset = 2 ** (bits - 1) if codes_value.dtype in (ir.DataType.INT4, ir.DataType.INT8) else 0
    codes = (codes_value.const_value.numpy().astype(np.int32) + offset).astype(np.uint8)
    scale = scale_value.const_value.numpy()
    zero = (zero_value.const_value.numpy().astype(np.int32) if zero_value is not None else np.zeros(scale.shape, np.int32))
    zero = (zero + offset).astype(np.uint8)
    rows, width = codes.shape
    base = codes_value.name
    packed = add_initializer(graph, names, f"{base}_nbits", pack_rows(codes, bits).reshape(rows, width // block, block * bits // 8))
    scales = add_initializer(graph, names, f"{base}_scale", scale)
    zeros = add_initializer(graph, names, f"{base}_zero_point", pack_rows(zero, bits))
    shape = add_initializer(graph, names, f"{base}_rows", np.array([rows, -1], np.int64))
    first = gathers[0]
    flat = ir.node("Reshape", [packed, shape], name=names.fresh(f"{base}_Reshape"))
    flat.outputs[0].name = names.fresh(f"{base}_packed_rows")
    graph.insert_before(first, flat)
    for gather in gathers:
        lookup = ir.node("GatherBlockQuantized", [flat.outputs[0], gather.inputs[1], scales, zeros], domain="com.microsoft",
                         attributes={"gather_axis": 0, "quantize_axis": 1, "block_size": block, "bits": bits},
                         name=names.fresh(f"{base}_GatherBlockQuantized"))
        replace_node(graph, gather, lookup)
    for _, matmul in matmuls:
        logits = ir.node("MatMulNBits", [matmul.inputs[0], packed, scales, zeros], domain="com.microsoft",
                         attributes={"K": width, "N": rows, "bits": bits, "block_size": block,
                                     "accuracy_level": accuracy_level(bits)},
                         name=names.fresh(f"{base}_MatMulNBits"))
        replace_node(graph, matmul, logits)
    for transpose in {id(t): t for t, _ in matmuls}.values():
        graph.remove(transpose, safe=True)
    graph.remove(dequantize, safe=True)
    for value in (codes_value, scale_value, zero_value):
        if value is not None and not list(value.uses()):
            graph.initializers.pop(value.name, None)
    return f"tied: GatherBlockQuantized and MatMulNBits on one packed table, {bits}-bit blocks of {block}"
