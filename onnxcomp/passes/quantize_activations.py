"""quantize-activations: QuantizeLinear → DequantizeLinear (uint8, ranges from calibration)
on the inputs of layers whose weights are quantized, placed where onnxruntime fuses them
into integer kernels (MatMulIntegerToFloat, QLinearConv, QGemm)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import onnx_ir as ir

from onnxcomp.calibration.analysis import Calibration
from onnxcomp.config import QuantConfig
from onnxcomp.kernels.act_range import activation_range, quantization_params
from onnxcomp.layers import WeightLayer, dequantized_constant, find_weight_layers, reduction_depth
from onnxcomp.passes.channels_last import flatten_channels_last
from onnxcomp.passes.graph_edit import NameAllocator, add_initializer
from onnxcomp.report import Report

# Elementwise ops a uint8 Q with zero point 0 absorbs (it clips at zero itself).
_RECTIFIERS = ("Relu",)


def _rectified_output(node: ir.Node) -> ir.Value:
    """A Conv's output, or that of the ReLU right after it when it is the only consumer:
    quantizing there lets onnxruntime fuse DQ → Conv → ReLU → Q into one QLinearConv."""
    out = node.outputs[0]
    users = list(out.uses())
    if len(users) == 1 and users[0][0].op_type in _RECTIFIERS and not out.is_graph_output():
        return users[0][0].outputs[0]
    return out


class Targets(NamedTuple):
    inputs: dict[ir.Value, list[WeightLayer]]  # input value → the quantized layers reading it
    convs: dict[ir.Value, WeightLayer]  # (rectified) Conv output → its Conv
    two_bit: list[WeightLayer]  # layers whose inputs stay float


def _codes_type(layer: WeightLayer) -> ir.DataType:
    return layer.weight.producer().inputs[0].dtype


def activation_targets(graph: ir.Graph, min_depth: int) -> Targets:
    """The layers whose inputs get QDQ, by the value they read, and their Conv outputs.

    Layers summing fewer than `min_depth` products are left out (quantize-weights keeps
    them in float too when activations are quantized), and so are layers with 2-bit weights:
    onnxruntime has no integer kernel for them, and its QDQ fusion would emit a QLinearConv
    with int2 weights that fails to load.
    """
    targets = Targets({}, {}, [])
    for layer in find_weight_layers(graph, include_quantized=True):
        if layer.data is None or layer.node.graph is not graph or not dequantized_constant(layer.weight):
            continue
        if reduction_depth(layer) < min_depth:
            continue
        if _codes_type(layer) in (ir.DataType.INT2, ir.DataType.UINT2):
            targets.two_bit.append(layer)
            continue
        targets.inputs.setdefault(layer.data, []).append(layer)
        if layer.node.op_type == "Conv":
            targets.convs.setdefault(_rectified_output(layer.node), layer)
    return targets


def _add_zero_point(graph: ir.Graph, names: NameAllocator, dequantize: ir.Node) -> None:
    """Give a symmetric weight's DequantizeLinear its (all-zero) zero point explicitly:
    onnxruntime fuses DQ → Gemm into QGemm only when the weight has one."""
    if len(dequantize.inputs) > 2 and dequantize.inputs[2] is not None:
        return
    codes, scale = dequantize.inputs[0], dequantize.inputs[1]
    zeros = np.zeros(scale.const_value.numpy().shape, dtype=codes.const_value.dtype.numpy())
    value = add_initializer(graph, names, codes.name + "_zero_point", zeros, codes.const_value.dtype)
    dequantize.resize_inputs(3)
    dequantize.replace_input_with(2, value)


class QuantizeActivationsPass(ir.passes.InPlacePass):
    """Insert x → QuantizeLinear → DequantizeLinear → (every former user of x)."""

    label = "quantize-activations"

    def __init__(self, config: QuantConfig, calibration: Calibration, report: Report):
        super().__init__()
        self.config = config
        self.calibration = calibration
        self.report = report

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        inputs, convs, two_bit = activation_targets(graph, self.config.act_min_depth)
        for layer in two_bit:
            self.report.note("quantize-activations", layer.name, "2-bit weights: input left in float (onnxruntime has no int2 integer kernel)")
        # integer Conv outputs are quantized too, so onnxruntime fuses the Conv and its ReLU
        targets = [*inputs, *(v for v in convs if v not in inputs and not v.is_graph_output())]
        if not targets:
            return ir.passes.PassResult(model, modified=False)
        stats = self.calibration.statistics(model, "--act-bits", values=targets).activations
        records = {r.name: r for r in self.report.layers}
        names = NameAllocator(graph)
        for value, conv in convs.items():
            if _codes_type(conv) not in (ir.DataType.INT8, ir.DataType.UINT8):
                continue  # onnxruntime runs it in float, NCHW: a Transpose would stay
            shape = conv.weight.shape
            permuted = flatten_channels_last(graph, names, value, shape[0], len(shape))
            if permuted:
                self.report.note("quantize-activations", value.name,
                                 f"flattened channels-last ({', '.join(permuted)}: weights reordered along their inputs), "
                                 "so onnxruntime's NHWC integer Conv needs no Transpose back")
        for value in targets:
            if value not in stats or stats[value].count == 0:
                self.report.note("quantize-activations", value.name, "no calibration statistics; left in float")
                continue
            low, high = activation_range(stats[value], self.config.act_calib, self.config.percentile, self.config.act_bits)
            scale, zero_point = quantization_params(low, high, self.config.act_bits)
            self._insert_qdq(graph, names, value, scale, zero_point)
            grid_low = float((0 - int(zero_point)) * scale)
            grid_high = float((255 - int(zero_point)) * scale)
            for layer in inputs.get(value, ()):
                if layer.name in records:
                    records[layer.name].act_range = (grid_low, grid_high)
                if layer.node.op_type == "Gemm":
                    _add_zero_point(graph, names, layer.weight.producer())
            if value not in inputs:
                self.report.note("quantize-activations", value.name, f"Conv output quantized to [{grid_low:.4g}, {grid_high:.4g}]")
        self.report.totals["activations"] = f"uint8 {self.config.act_calib}, {len(targets)} tensors"
        self.calibration.mark_stale()
        return ir.passes.PassResult(model, modified=True)

    @staticmethod
    def _insert_qdq(graph: ir.Graph, names: NameAllocator, value: ir.Value, scale, zero_point) -> None:
        base = value.name
        parameters = [
            add_initializer(graph, names, base + "_act_scale", np.array(scale, dtype=np.float32)),
            add_initializer(graph, names, base + "_act_zero_point", np.array(zero_point, dtype=np.uint8)),
        ]
        users = list(value.uses())
        quantize = ir.node("QuantizeLinear", [value, *parameters], name=names.fresh(base + "_QuantizeLinear"))
        quantize.outputs[0].name = names.fresh(base + "_quantized")
        dequantize = ir.node("DequantizeLinear", [quantize.outputs[0], *parameters], name=names.fresh(base + "_DequantizeLinear"))
        dequantized = dequantize.outputs[0]
        dequantized.name = names.fresh(base + "_dequantized")
        dequantized.type, dequantized.shape = value.type, value.shape
        graph.extend([quantize, dequantize])  # placed by the topological sort that follows
        for user, index in users:
            user.replace_input_with(index, dequantized)
