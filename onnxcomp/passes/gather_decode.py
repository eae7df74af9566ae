"""gather-decode: an embedding table decodes only the rows a run looks up.

DequantizeLinear(table) → Gather(ids) decodes the whole table on every run: for MiniLM's
30,522 × 384 table, most of a 4-bit model's extra time over FP32. Gathering first gives the
same numbers for a sliver of the work:
  - 8-bit codes: Gather the codes, the scales (and zero points), then decode the gathered
    rows: (q − z)·s with Cast, Sub and Mul for one scale per row, DequantizeLinear along the
    last axis for blocks; standard ops (ONNX's Gather takes no 4- or 2-bit tensor);
  - 4-bit codes in blocks of a power of two ≥ 16 (or rows that long): onnxruntime's
    GatherBlockQuantized (com.microsoft), with `--target onnxruntime` only.
A table tied to the logits MatMul is rewritten by `tied_table` with `--target onnxruntime`
(one packed table for GatherBlockQuantized and MatMulNBits); otherwise it keeps its one
DequantizeLinear, since the logits MatMul reads all of it anyway.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxcomp.layers import attr_int, dequantize_layout
from onnxcomp.passes.graph_edit import NameAllocator, add_initializer
from onnxcomp.passes.tied_table import rewrite_tied_table
from onnxcomp.report import Report

_EIGHT_BIT = (ir.DataType.INT8, ir.DataType.UINT8)
_FOUR_BIT = (ir.DataType.INT4, ir.DataType.UINT4)


def _table_dequantize(gather: ir.Node) -> ir.Node | None:
    """The DequantizeLinear of initializers feeding this Gather's table, read by it alone."""
    table = gather.inputs[0]
    dequantize = table.producer() if table is not None else None
    if dequantize is None or dequantize.op_type != "DequantizeLinear" or attr_int(gather, "axis", 0) != 0:
        return None
    if len(list(table.uses())) != 1 or table.is_graph_output():
        return None
    if any(v is not None and (v.const_value is None or len(list(v.uses())) != 1) for v in dequantize.inputs):
        return None
    codes = dequantize.inputs[0]
    if len(codes.shape or ()) != 2 or not isinstance(codes.shape[1], int):
        return None
    axis, block = dequantize_layout(dequantize)
    if axis is None or (axis == 0) != (block is None):  # per tensor, or blocks along the rows
        return None
    return dequantize


class _Builder:
    def __init__(self, graph: ir.Graph, names: NameAllocator, before: ir.Node, base: str):
        self.graph, self.names, self.before, self.base = graph, names, before, base

    def node(self, op: str, inputs, domain: str = "", **attributes) -> ir.Value:
        node = ir.node(op, inputs, attributes=attributes, domain=domain, name=self.names.fresh(f"{self.base}_{op}"))
        node.outputs[0].name = self.names.fresh(f"{self.base}_{op.lower()}")
        self.graph.insert_before(self.before, node)
        return node.outputs[0]


def _decode_rows(graph: ir.Graph, names: NameAllocator, gather: ir.Node, dequantize: ir.Node, onnxruntime: bool) -> str | None:
    """Rewrite one Gather(DequantizeLinear(table)); the form chosen, or None where none fits."""
    codes, scale = dequantize.inputs[0], dequantize.inputs[1]
    zero = dequantize.inputs[2] if len(dequantize.inputs) > 2 else None
    ids = gather.inputs[1]
    _, block = dequantize_layout(dequantize)
    width = codes.shape[1]
    build = _Builder(graph, names, gather, codes.name)
    if codes.dtype in _EIGHT_BIT:
        rows = build.node("Gather", [codes, ids], axis=0)
        row_scale = build.node("Gather", [scale, ids], axis=0)
        row_zero = build.node("Gather", [zero, ids], axis=0) if zero is not None else None
        if block is not None:
            decoded = build.node("DequantizeLinear", [rows, row_scale] + ([row_zero] if row_zero else []), axis=-1,
                                 block_size=block)
            form = f"gathered rows decoded in blocks of {block}"
        else:
            last = add_initializer(graph, names, f"{codes.name}_last_axis", np.array([-1], dtype=np.int64))
            values = build.node("Cast", [rows], to=scale.dtype)
            if row_zero is not None:
                values = build.node("Sub", [values, build.node("Unsqueeze", [build.node("Cast", [row_zero], to=scale.dtype), last])])
            decoded = build.node("Mul", [values, build.node("Unsqueeze", [row_scale, last])])
            form = "gathered rows decoded, one scale each"
    elif codes.dtype in _FOUR_BIT and onnxruntime:
        size = block if block is not None else width
        if size < 16 or size & (size - 1):
            return None
        if block is None:  # one scale per row: GatherBlockQuantized wants [rows, blocks]
            scale = _as_column(graph, names, scale)
            zero = _as_column(graph, names, zero) if zero is not None else None
        decoded = build.node("GatherBlockQuantized", [codes, ids, scale] + ([zero] if zero is not None else []),
                             domain="com.microsoft", gather_axis=0, quantize_axis=1, block_size=size)
        form = f"GatherBlockQuantized, blocks of {size}"
    else:
        return None
    decoded.type, decoded.shape = gather.outputs[0].type, gather.outputs[0].shape
    ir.convenience.replace_all_uses_with(gather.outputs[0], decoded, replace_graph_outputs=True)
    output_name = gather.outputs[0].name
    graph.remove(gather, safe=True)
    decoded.name = output_name
    return form


def _as_column(graph: ir.Graph, names: NameAllocator, value: ir.Value) -> ir.Value:
    """An initializer [rows] as [rows, 1]: one block per row."""
    tensor = value.const_value
    return add_initializer(graph, names, f"{value.name}_column", tensor.numpy().reshape(-1, 1), tensor.dtype)


class GatherDecodePass(ir.passes.InPlacePass):
    """Decode the looked-up rows of each quantized embedding table, not the whole table."""

    label = "gather-decode"

    def __init__(self, report: Report, onnxruntime: bool = True, accuracy_level=lambda bits: 0):
        super().__init__()
        self.report = report
        self.onnxruntime = onnxruntime
        self.accuracy_level = accuracy_level  # bits → the level of a tied table's MatMulNBits

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        names = NameAllocator(graph)
        modified = False
        for gather in [n for n in graph if n.op_type == "Gather" and n.domain in ("", "ai.onnx")]:
            if gather.graph is None:  # removed with a tied table rewritten earlier in this loop
                continue
            table = gather.inputs[0].producer() if gather.inputs[0] is not None else None
            if table is None or table.op_type != "DequantizeLinear":
                continue
            name = table.inputs[0].name  # read before the rewrite removes the decode
            if _table_dequantize(gather) is not None:  # read by this Gather alone
                form = _decode_rows(graph, names, gather, table, self.onnxruntime)
            else:
                form = rewrite_tied_table(graph, names, table, self.accuracy_level) if self.onnxruntime else None
            if form is not None:
                self.report.note("gather-decode", name, form)
                modified = True
        if any(node.domain == "com.microsoft" for node in graph):
            model.opset_imports.setdefault("com.microsoft", 1)
        return ir.passes.PassResult(model, modified=modified)
