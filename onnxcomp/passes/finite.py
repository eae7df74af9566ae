"""Finiteness of weights: the weights onnxcomp quantizes must be finite, and no pass may
make a finite tensor NaN or Inf.

A model may hold NaN or Inf where it means them (a −inf attention mask in a constant that
no layer multiplies): onnxruntime runs it, so onnxcomp leaves such tensors alone. What it
refuses is a weight it would quantize (garbage scales) and a value that a pass computed
(a BatchNorm folded with a negative variance, a solver that diverged).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxcomp.errors import NonFiniteWeightError
from onnxcomp.layers import FLOAT_TYPES, find_weight_layers


def nonfinite_count(tensor: ir.TensorProtocol) -> int:
    array = tensor.numpy()
    return int(array.size - np.count_nonzero(np.isfinite(array)))


def check_layer_weights(model: ir.Model) -> None:
    """Refuse a model with NaN or Inf in a weight onnxcomp would quantize, naming it."""
    for layer in find_weight_layers(model.graph):
        bad = nonfinite_count(layer.weight.const_value)
        if bad:
            raise NonFiniteWeightError(
                f"weight {layer.weight.name!r} of {layer.name!r} holds {bad} NaN/Inf value(s); "
                "fix the model (or its training) before compressing"
            )


def _float_initializers(model: ir.Model, computed_only: bool):
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is None or value.dtype not in FLOAT_TYPES:
            continue
        if computed_only and isinstance(tensor, (ir.ExternalTensor, ir.TensorProtoTensor)):
            continue  # as loaded: no pass computed it
        yield value, tensor


def nonfinite_initializers(model: ir.Model) -> set[str]:
    """Names of the float initializers that hold NaN or Inf as the model was given."""
    return {value.name for value, tensor in _float_initializers(model, False) if nonfinite_count(tensor)}


def check_computed_finite(model: ir.Model, pass_name: str, allowed: set[str]) -> None:
    """After `pass_name`: every tensor a pass computed is finite (those in `allowed` held
    NaN/Inf in the input already)."""
    for value, tensor in _float_initializers(model, True):
        if value.name in allowed:
            continue
        bad = nonfinite_count(tensor)
        if bad:
            raise NonFiniteWeightError(
                f"{pass_name} computed {bad} NaN/Inf value(s) in {value.name!r}; the model or the options "
                "give values no float holds (a BatchNormalization with a negative variance, a solver option out "
                "of range): fix the model or change the options"
            )
