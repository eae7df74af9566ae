"""fold-bn: fold BatchNormalization into the Conv, ConvTranspose, Gemm or MatMul(+Add) before it.

With BN(y) = γ·(y − μ)/√(σ² + ε) + β and y = x·W + b, the fold gives
    W' = W · s,   b' = (b − μ) · s + β,   s = γ/√(σ² + ε),
scaling W along its output-channel axis. onnxscript's rules cover Conv, ConvTranspose and
Gemm; this module adds MatMul and MatMul+Add, which exporters emit for linear layers, and
says why each BatchNormalization it leaves is left.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass
from onnxscript.rewriter import pattern
from onnxscript.rewriter.rules.common import (
    fuse_batchnorm_into_conv_rule,
    fuse_batchnorm_into_conv_transpose_rule,
    fuse_batchnorm_into_gemm_rule,
)

from onnxcomp.errors import NonFiniteWeightError
from onnxcomp.layers import constant_weight
from onnxcomp.report import Report

_LAYERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_FOLDABLE = (*_LAYERS, "Add")


def _epsilon(bn: ir.Node) -> float:
    attr = bn.attributes.get("epsilon")
    return 1e-5 if attr is None else attr.as_float()


def _bn_scale_shift(bn: ir.Node) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    gamma, beta, mean, var = (v.const_value.numpy().astype(np.float64) for v in bn.inputs[1:5])
    scale = gamma / np.sqrt(var + _epsilon(bn))
    return scale, beta, mean


def _check_variance(bn: ir.Node) -> None:
    """A negative running variance makes the model itself compute NaN: refuse it by name."""
    if len(bn.inputs) < 5 or bn.inputs[4] is None or bn.inputs[4].const_value is None:
        return
    var = bn.inputs[4].const_value.numpy().astype(np.float64)
    bad = int(np.count_nonzero(~(var + _epsilon(bn) > 0)))
    if bad:
        raise NonFiniteWeightError(
            f"BatchNormalization {bn.name or bn.outputs[0].name!r} has {bad} channel(s) whose running variance plus "
            "epsilon is not positive, so the model computes NaN there; fix the model's statistics before compressing"
        )


def _only_used_by(value: ir.Value, nodes: set[ir.Node]) -> bool:
    return all(user in nodes for user, _ in value.uses())


class _FoldBnIntoMatMul(pattern.RewriteRuleClassBase):
    """BN(MatMul(x, W)) → MatMul(x, W') + b'  for a rank-2 MatMul output (channels = W's columns)."""

    def pattern(self, op, x, w):
        return op.BatchNormalization(op.MatMul(x, w, _outputs=["mm_out"]), _allow_other_inputs=True, _outputs=["bn_out"])

    def check(self, context, x, w, mm_out, bn_out, **_):
        return _check_matmul(pattern.MatchResult(), x, w, mm_out, bn_out)

    def rewrite(self, op, x, w, mm_out, bn_out, **_):
        return _rewrite_matmul(op, x, w, None, bn_out)


class _FoldBnIntoMatMulAdd(pattern.RewriteRuleClassBase):
    """BN(MatMul(x, W) + b) → MatMul(x, W') + b'."""

    def pattern(self, op, x, w, b):
        return op.BatchNormalization(
            op.Add(op.MatMul(x, w, _outputs=["mm_out"]), b), _allow_other_inputs=True, _outputs=["bn_out"]
        )

    def check(self, context, x, w, b, mm_out, bn_out, **_):
        result = _check_matmul(pattern.MatchResult(), x, w, mm_out, bn_out)
        if result and (b.const_value is None or b.const_value.numpy().size not in (1, w.shape[1])):
            return result.fail("the bias is not a constant per output channel")
        return result

    def rewrite(self, op, x, w, b, mm_out, bn_out, **_):
        return _rewrite_matmul(op, x, w, b, bn_out)


def _check_matmul(result, x, w, mm_out, bn_out):
    bn = bn_out.producer()
    if not constant_weight(w) or len(w.shape) != 2:
        return result.fail("the MatMul weight is not a constant matrix")
    if x.shape is None or len(x.shape) != 2:
        return result.fail("the MatMul output is not rank 2, so BatchNorm's channel axis is not the weight's")
    if any(v.const_value is None for v in bn.inputs[1:5]):
        return result.fail("BatchNormalization parameters are not constants")
    if not _only_used_by(w, {mm_out.producer()}):
        return result.fail(f"weight {w.name!r} is shared with other nodes")
    return result


def _rewrite_matmul(op, x, w, b, bn_out):
    scale, beta, mean = _bn_scale_shift(bn_out.producer())
    weight = w.const_value.numpy()
    bias = np.zeros_like(mean) if b is None else np.broadcast_to(b.const_value.numpy().astype(np.float64), mean.shape)
    new_w = (weight.astype(np.float64) * scale[None, :]).astype(weight.dtype)
    new_b = ((bias - mean) * scale + beta).astype(weight.dtype)
    bias_name = (b.name if b is not None else w.name + "_bn_bias") or "bn_bias"
    product = op.MatMul(x, op.initializer(ir.tensor(new_w), name=w.name))
    return op.Add(product, op.initializer(ir.tensor(new_b), name=bias_name))


RULES = pattern.RewriteRuleSet(
    [
        fuse_batchnorm_into_conv_rule,
        fuse_batchnorm_into_conv_transpose_rule,
        fuse_batchnorm_into_gemm_rule,
        _FoldBnIntoMatMul.rule(),
        _FoldBnIntoMatMulAdd.rule(),
    ]
)


def refusal_reason(bn: ir.Node) -> str:
    """Why a BatchNormalization left after folding could not be folded."""
    producer = bn.inputs[0].producer()
    if producer is None:
        return "its input is not produced by a node (graph input or initializer)"
    if producer.op_type not in _FOLDABLE:
        return f"it follows {producer.op_type}, which has no weight to absorb it"
    if len(bn.outputs) > 1 and any(out.uses() for out in bn.outputs[1:]):
        return "it is in training mode (running statistics are used)"
    if any(v is None or v.const_value is None for v in bn.inputs[1:5]):
        return "its scale, bias, mean or variance is not a constant"
    if len(list(bn.inputs[0].uses())) > 1:
        return f"the {producer.op_type} output is also used by other nodes"
    weight = producer.inputs[1] if len(producer.inputs) > 1 else None
    if producer.op_type != "Add" and not constant_weight(weight):
        return f"the {producer.op_type} weight is not a constant"
    if weight is not None and len(list(weight.uses())) > 1:
        return f"the {producer.op_type} weight is shared by {len(list(weight.uses()))} nodes"
    if producer.op_type in ("MatMul", "Add"):
        return "the MatMul output is not known to be rank 2, so BatchNorm's channel axis is not the weight's"
    return f"the {producer.op_type} does not match a supported fold"


class FoldBatchNormPass(ir.passes.InPlacePass):
    """Fold every BatchNormalization that a weight can absorb; note why the others stay."""

    label = "fold-bn"

    def __init__(self, report: Report):
        super().__init__()
        self.report = report

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        before = len(_batchnorms(model))
        if before == 0:
            return ir.passes.PassResult(model, modified=False)
        for node in _batchnorms(model):
            _check_variance(node)
        ShapeInferencePass()(model)  # MatMul folds need to know their output is rank 2
        names = _absorbing_names(model)
        RULES.apply_to_model(model)
        _restore_names(model, names)
        left = _batchnorms(model)
        folded = before - len(left)
        if folded:
            self.report.note("fold-bn", "BatchNormalization", f"{folded} of {before} folded into the layer before")
        by_reason: dict[str, list[str]] = {}
        for node in left:
            by_reason.setdefault(refusal_reason(node), []).append(node.name or node.outputs[0].name)
        for reason, names in by_reason.items():
            if len(names) <= 3:
                for name in names:
                    self.report.note("fold-bn", name, "left in place: " + reason)
            else:
                self.report.note("fold-bn", f"{len(names)} BatchNormalization", f"left in place: {reason} "
                                                                               f"({', '.join(names[:3])}, ...)")
        return ir.passes.PassResult(model, modified=folded > 0)


def _behind_bias_add(node: ir.Node | None) -> ir.Node | None:
    """The layer of a `layer + bias` Add (the MatMul before it), else the node itself."""
    if node is not None and node.op_type == "Add" and node.inputs[0] is not None and node.inputs[0].producer() is not None:
        return node.inputs[0].producer()
    return node


def _absorbing_names(model: ir.Model) -> dict[str, str]:
    """For each BatchNormalization, its output's name and the name of the layer before it.

    The rewrite gives the fused layer's output the BatchNormalization output's name, so the
    fused layer can be found by that name afterwards and keep the name the user knows (the
    nodes around it may have been rewritten too, so no node is held across the rewrite)."""
    found = {}
    for node in _batchnorms(model):
        producer = _behind_bias_add(node.inputs[0].producer())
        if producer is not None and producer.name and node.outputs[0].name:
            found[node.outputs[0].name] = producer.name
    return found


def _restore_names(model: ir.Model, found: dict[str, str]) -> None:
    for node in model.graph.all_nodes():
        for value in node.outputs:
            if value.name in found:
                layer = _behind_bias_add(node)
                if layer is not None and layer.op_type in _LAYERS:
                    layer.name = found[value.name]


def _batchnorms(model: ir.Model) -> list[ir.Node]:
    return [node for node in model.graph.all_nodes() if node.op_type == "BatchNormalization"]
