"""normalize: weights become main-graph initializers, every weight to quantize is finite, and the opset
is raised only as far as the emitted DequantizeLinear needs."""

from __future__ import annotations

import onnx
import onnx_ir as ir
from onnx_ir.passes.common import LiftConstantsToInitializersPass, LiftSubgraphInitializersToMainGraphPass
from onnxscript.optimizer._constant_folding import FoldConstantsPass

from onnxcomp.errors import OpsetConversionError
from onnxcomp.layers import find_weight_layers
from onnxcomp.passes.finite import check_layer_weights
from onnxcomp.report import Report

# The lowest IR version that carries the element types an opset's DequantizeLinear takes.
_IR_VERSION_FOR_OPSET = {13: 7, 21: 10, 25: 11}


def default_opset(model: ir.Model) -> int:
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))


# onnxscript's defaults: fold nodes reading at most 8192 elements into at most 256 Ki.
_FOLD_INPUT_LIMIT, _FOLD_OUTPUT_LIMIT = 8192, 1 << 18

# Initializers larger than this cross the version converter as references, not bytes.
_PLACEHOLDER_BYTES = 1024
_PLACEHOLDER = "onnxcomp-weight-kept-in-memory"


def _serialize_without_weights(model: ir.Model) -> tuple[onnx.ModelProto, dict[str, ir.TensorProtocol]]:
    """The model's proto with each large initializer's data left out (an external-data
    reference stands in for it: no converter rule rewrites existing weights), and the
    tensors left out, by name. Small tensors stored as external data are read into memory
    first: in the proto their relative location would lose the folder it is relative to."""
    kept = {}
    for name, value in model.graph.initializers.items():
        tensor = value.const_value
        if tensor is None:
            continue
        if tensor.nbytes > _PLACEHOLDER_BYTES:
            kept[name] = tensor
            value.const_value = ir.ExternalTensor(
                _PLACEHOLDER, 0, tensor.nbytes, tensor.dtype, shape=tensor.shape, name=name
            )
        elif isinstance(tensor, ir.ExternalTensor):
            value.const_value = ir.Tensor(tensor.numpy(), dtype=tensor.dtype, name=name)
    try:
        return ir.serde.serialize_model(model), kept
    finally:
        for name, tensor in kept.items():
            model.graph.initializers[name].const_value = tensor


def raise_opset(model: ir.Model, target: int) -> bool:
    """Convert the default-domain opset up to `target` with onnx.version_converter."""
    current = default_opset(model)
    if current >= target:
        return False
    model.ir_version = max(model.ir_version, _IR_VERSION_FOR_OPSET.get(target, model.ir_version))
    proto, kept = _serialize_without_weights(model)  # IR 3 would want the weights as graph inputs again
    try:
        converted = onnx.version_converter.convert_version(proto, target)
    except Exception as err:
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise OpsetConversionError(
            f"raising the opset from {current} to {target} failed: {detail}; "
            "re-export the model at that opset, or choose --bits 8 (opset 13 suffices)"
        ) from None
    fresh = ir.serde.deserialize_model(converted)
    for name, tensor in kept.items():
        fresh.graph.initializers[name].const_value = tensor
    model.graph = fresh.graph
    return True


def weights_as_constants(model: ir.Model) -> int:
    """Initializers also listed as graph inputs (IR 3 required it, and exporters kept doing
    it) are overridable defaults in ONNX's terms; a trained model's weights are meant as
    constants, so they leave the inputs. Returns how many did."""
    inputs = [v for v in model.graph.inputs if v.is_initializer()]
    for value in inputs:
        model.graph.inputs.remove(value)
    return len(inputs)


def fold_small_constants(model: ir.Model) -> bool:
    """Fold small constant subgraphs (onnxscript's folder, inputs up to 8192 elements): an
    exporter that computes a Conv's zero bias with Expand, or BatchNorm parameters with
    CastLike, or reads a weight's Shape to pad, leaves the layer's parameters looking
    computed or shared, so nothing would fold or quantize. Weights a graph fills with ConstantOfShape stay as they are: folding them would
    store what the file computes."""
    result = FoldConstantsPass(
        shape_inference=False,
        input_size_limit=_FOLD_INPUT_LIMIT,
        output_size_limit=_FOLD_OUTPUT_LIMIT,
        should_fold=lambda node: False if _keep_unfolded(node) else None,
    )(model)
    return result.modified


def _keep_unfolded(node: ir.Node) -> bool:
    """A weight the graph fills in, or a node reading a stored tensor that others read too:
    its folded result would be a second copy (a tied embedding's Transpose)."""
    if node.op_type == "ConstantOfShape":
        return True
    return any(v is not None and v.is_initializer() and len(v.uses()) > 1 for v in node.inputs)


def free_unset_dims(model: ir.Model) -> list[str]:
    """Exporters also write a free dimension as -1 or 0; onnxruntime takes a 0 as a fixed,
    empty dimension, so such a model would not run on real inputs. The graph inputs and
    outputs with such dimensions get free ones instead; their names are returned."""
    changed = []
    for value in (*model.graph.inputs, *model.graph.outputs):
        if value.shape is not None and any(isinstance(d, int) and d <= 0 for d in value.shape):
            value.shape = ir.Shape([ir.SymbolicDim(None) if isinstance(d, int) and d <= 0 else d for d in value.shape])
            changed.append(value.name)
    return changed


class NormalizePass(ir.passes.InPlacePass):
    """Lift Constant-node weights (subgraphs too) to main-graph initializers, check that
    every weight to quantize is finite, and raise the opset to `target_opset` if it is lower."""

    label = "normalize"

    def __init__(self, target_opset: int, report: Report):
        super().__init__()
        self.target_opset = target_opset
        self.report = report

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        before = default_opset(model)
        lifted = LiftConstantsToInitializersPass(lift_all_constants=False)(model).modified
        lifted |= LiftSubgraphInitializersToMainGraphPass()(model).modified
        if lifted:
            self.report.note("normalize", "constants", "Constant nodes lifted to initializers")
        folded = fold_small_constants(model)
        constants = weights_as_constants(model)
        if constants:
            self.report.note("normalize", "inputs", f"{constants} weight(s) declared as graph inputs too (an older "
                                                    "exporters' habit) are constants in the output")
        check_layer_weights(model)
        freed = free_unset_dims(model)
        if freed:
            self.report.note("normalize", "shapes", f"dimensions declared -1 or 0 made free on {', '.join(freed)}")
        layers = find_weight_layers(model.graph)
        # Recurrent weights get one scale per gate unit and direction: blockwise, opset 21.
        target = max(self.target_opset, 21) if any(layer.recurrent for layer in layers) else self.target_opset
        raised = bool(layers) and raise_opset(model, target)  # no layer to quantize, no opset to raise
        if raised:
            self.report.note("normalize", "opset", f"raised from {before} to {target}")
        return ir.passes.PassResult(model, modified=lifted or raised or bool(freed) or constants > 0 or folded)
