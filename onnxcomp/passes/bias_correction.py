"""Bias correction: rounding errors in a layer's weights shift its outputs on average by
E[x]·ΔW per output channel; subtracting that from the layer's bias removes the shift.

Used by quantize-weights with `--bias-correction` and calibration data (E[x] is the mean
input row the calibration statistics keep beside the Gram matrix).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxcomp.layer_matrix import weight_matrix
from onnxcomp.layers import WeightLayer
from onnxcomp.passes.graph_edit import NameAllocator, add_initializer


def output_shift(layer: WeightLayer, mean_row: np.ndarray, w: np.ndarray, w_hat: np.ndarray,
                 reference_mean: np.ndarray | None = None) -> np.ndarray:
    """E[x]·(Ŵ − W) per output channel, in the order of the layer's bias; with the mean input
    row of the unquantized model, E[x̃]·Ŵ − E[x_ref]·W: the drift from the layers before too."""
    w64 = w.astype(np.float64)
    delta = weight_matrix(layer, w_hat.astype(np.float64) - w64)  # (groups, reduction, outputs)
    shift = np.einsum("gr,gro->go", mean_row, delta)
    if reference_mean is not None:
        shift += np.einsum("gr,gro->go", mean_row - reference_mean, weight_matrix(layer, w64))
    return shift.reshape(-1)


def _attr_float(node: ir.Node, name: str) -> float:
    attr = node.attributes.get(name)
    return 1.0 if attr is None else attr.as_float()


def _bias_value(graph: ir.Graph, names: NameAllocator, layer: WeightLayer, channels: int) -> tuple[ir.Value | None, float]:
    """The constant the shift is subtracted from, and the factor it enters the output with;
    a zero bias is added to a Conv or Gemm that has none. None where there is no place."""
    node = layer.node
    if layer.recurrent:  # B is [directions, Wb and Rb]: the shift goes to W's half or R's
        return _recurrent_bias(graph, names, layer, channels), 1.0
    if node.op_type in ("Conv", "ConvTranspose", "Gemm"):
        scale = _attr_float(node, "alpha") / _attr_float(node, "beta") if node.op_type == "Gemm" else 1.0
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            bias = node.inputs[2]
            ok = bias.const_value is not None and bias.is_initializer() and len(list(bias.uses())) == 1
            return (bias, scale) if ok and bias.const_value.numpy().size == channels else (None, 0.0)
        dtype = layer.weight.const_value.numpy().dtype if layer.weight.const_value is not None else np.float32
        bias = add_initializer(graph, names, (node.name or layer.weight.name) + "_bias", np.zeros(channels, dtype=dtype))
        node.resize_inputs(3)
        node.replace_input_with(2, bias)
        return bias, scale
    if node.op_type == "MatMul":  # MatMul → Add(constant vector), the common exported pattern
        users = list(node.outputs[0].uses())
        if len(users) == 1 and users[0][0].op_type == "Add":
            add = users[0][0]
            other = add.inputs[1 - users[0][1]]
            ok = other is not None and other.const_value is not None and other.is_initializer() and len(list(other.uses())) == 1
            if ok and other.const_value.numpy().shape == (channels,):
                return other, 1.0
    return None, 0.0


def _recurrent_bias(graph: ir.Graph, names: NameAllocator, layer: WeightLayer, channels: int) -> ir.Value | None:
    node = layer.node
    if len(node.inputs) > 3 and node.inputs[3] is not None:
        bias = node.inputs[3]
        ok = bias.const_value is not None and bias.is_initializer() and len(list(bias.uses())) == 1
        return bias if ok and bias.const_value.numpy().size == 2 * channels else None
    dtype = layer.weight.const_value.numpy().dtype if layer.weight.const_value is not None else np.float32
    bias = add_initializer(graph, names, (node.name or layer.weight.name) + "_B",
                           np.zeros((layer.groups, 2 * channels // layer.groups), dtype=dtype))
    node.resize_inputs(max(4, len(node.inputs)))
    node.replace_input_with(3, bias)
    return bias


def correct_bias(graph: ir.Graph, names: NameAllocator, layer: WeightLayer, mean_row: np.ndarray,
                 w: np.ndarray, w_hat: np.ndarray, reference_mean: np.ndarray | None = None) -> float | None:
    """Subtract the layer's mean output shift from its bias; return the largest |shift|
    corrected, or None where the layer has no bias to correct."""
    shift = output_shift(layer, mean_row, w, w_hat, reference_mean)
    bias, scale = _bias_value(graph, names, layer, shift.size)
    if bias is None:
        return None
    b = bias.const_value.numpy()
    corrected = b.astype(np.float64)
    if layer.recurrent:
        half = corrected.shape[1] // 2
        part = slice(0, half) if layer.index == 1 else slice(half, None)
        corrected[:, part] -= shift.reshape(corrected.shape[0], half)
    else:
        corrected -= scale * shift
    bias.const_value = ir.Tensor(corrected.astype(b.dtype), name=bias.name)
    return float(np.abs(shift).max()) if shift.size else 0.0
