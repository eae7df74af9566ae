"""normalize and fold-bn on the small graphs: structure, outputs against the original, reasons."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from conftest import MODELS, compress_to, op_count, outputs
from onnxcomp.config import QuantConfig
from onnxcomp.modelio import load_model, save_model
from onnxcomp.passes.fold_bn import FoldBatchNormPass
from onnxcomp.passes.normalize import NormalizePass, default_opset
from onnxcomp.report import Report


def _fold_only(source, target) -> Report:
    report = Report()
    model = load_model(source)
    result = FoldBatchNormPass(report)(model)
    assert result.modified
    save_model(result.model, target)
    return report


@pytest.mark.parametrize(
    "name, feeds",
    [
        ("convtranspose_bn.onnx", {"x": np.random.default_rng(0).normal(size=(2, 8, 5, 5)).astype(np.float32)}),
        ("matmul_bn.onnx", {"x": np.random.default_rng(1).normal(size=(5, 32)).astype(np.float32)}),
        ("digits_cnn.onnx", {"image": np.load(MODELS / "digits_eval.npz")["image"][:64]}),
    ],
)
def test_fold_bn_preserves_outputs(tmp_path, name, feeds):
    target = tmp_path / name
    report = _fold_only(MODELS / name, target)
    before, after = outputs(MODELS / name, feeds), outputs(target, feeds)
    for key, ref in before.items():
        scale = np.abs(ref).max()
        assert np.abs(after[key] - ref).max() <= 1e-5 * scale
    onnx.checker.check_model(str(target), full_check=True)
    assert any(n.pass_name == "fold-bn" for n in report.notes)


def test_fold_bn_counts_and_reasons(tmp_path):
    report = _fold_only(MODELS / "matmul_bn.onnx", tmp_path / "m.onnx")
    assert op_count(tmp_path / "m.onnx", "BatchNormalization") == 1
    left = [n for n in report.notes if n.subject == "bn3_after_relu"]
    assert left and "Relu" in left[0].message
    _fold_only(MODELS / "digits_cnn.onnx", tmp_path / "digits.onnx")
    assert op_count(tmp_path / "digits.onnx", "BatchNormalization") == 0


def test_fold_bn_keeps_layer_names(tmp_path):
    _fold_only(MODELS / "digits_cnn.onnx", tmp_path / "d.onnx")
    names = {n.name for n in ir.load(str(tmp_path / "d.onnx")).graph if n.op_type in ("Conv", "Gemm")}
    original = {n.name for n in ir.load(str(MODELS / "digits_cnn.onnx")).graph if n.op_type in ("Conv", "Gemm")}
    assert names == original


def test_fold_bn_refuses_shared_weight(tmp_path):
    model = onnx.load(MODELS / "matmul_bn.onnx")
    # Make a second MatMul read fc2's weight: folding would change that node's output too.
    model.graph.node.append(onnx.helper.make_node("MatMul", ["relu1_out", "fc2_w"], ["extra"], name="extra"))
    model.graph.output.append(onnx.helper.make_tensor_value_info("extra", onnx.TensorProto.FLOAT, ["N", 48]))
    path = tmp_path / "shared.onnx"
    onnx.save(model, path)
    report = Report()
    FoldBatchNormPass(report)(load_model(path))
    assert any(n.subject == "bn2" and "shared" in n.message for n in report.notes)


def test_normalize_lifts_subgraph_constants_and_quantizes_them(tmp_path):
    model = load_model(MODELS / "subgraph_const.onnx")
    NormalizePass(21, Report())(model)
    assert {"then_w", "else_w"} <= set(model.graph.initializers)
    assert not any(n.op_type == "Constant" for n in ir.traversal.RecursiveGraphIterator(model.graph))
    target = tmp_path / "q.onnx"
    compress_to(MODELS / "subgraph_const.onnx", target, bits=8)
    assert op_count(target, "DequantizeLinear") == 2
    x = np.random.default_rng(0).normal(size=(3, 24)).astype(np.float32)
    for cond in (True, False):
        feeds = {"cond": np.array(cond), "x": x}
        ref, out = outputs(MODELS / "subgraph_const.onnx", feeds)["y"], outputs(target, feeds)["y"]
        assert np.abs(out - ref).max() < 0.02 * np.abs(ref).max()


@pytest.mark.parametrize("bits, granularity, opset", [(8, "channel", 13), (8, "block", 21), (4, "channel", 21), (3, "channel", 21), (2, "channel", 25)])
def test_opset_raised_only_as_far_as_needed(tmp_path, bits, granularity, opset):
    assert QuantConfig(bits=bits, granularity=granularity).required_opset == opset
    target = tmp_path / "q.onnx"
    compress_to(MODELS / "digits_cnn.onnx", target, bits=bits, granularity=granularity)
    assert default_opset(ir.load(str(target))) == opset
