"""W8A8: activation QDQ from calibration keeps accuracy and fuses into integer kernels."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx_ir
import onnxruntime as ort
import pytest

from onnxcomp import QuantConfig
from onnxcomp.pipeline import compress_model
from onnxcomp.calibration.analysis import Calibration
from onnxcomp.modelio import load_model, save_model
from onnxcomp.fidelity import mean_cosine

from conftest import MODELS, outputs
from digits_accuracy import accuracy

DIGITS = MODELS / "digits_cnn.onnx"


def w8a8(source, target, calib, **options):
    calibration = Calibration(calib)
    model, report = compress_model(load_model(source), QuantConfig(bits=8, act_bits=8, **options), calibration=calibration)
    save_model(model, target)
    return report, calibration


def optimized_graph(path, tmp_path) -> onnx.GraphProto:
    """The graph onnxruntime's CPU provider actually runs."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return onnx.load(options.optimized_model_filepath).graph


def fused_ops(path, tmp_path) -> Counter:
    return Counter(node.op_type for node in optimized_graph(path, tmp_path).node)


@pytest.mark.parametrize("method", ["minmax", "percentile", "mse"])
def test_w8a8_digits_keeps_accuracy(tmp_path, method):
    target = tmp_path / "digits.w8a8.onnx"
    report, _ = w8a8(DIGITS, target, MODELS / "digits_calib.npz", act_calib=method)
    assert accuracy(target) >= accuracy(DIGITS) - 0.01
    ops = fused_ops(target, tmp_path)
    assert ops["QLinearConv"] >= 2
    quantized_inputs = [r for r in report.layers if r.act_range is not None]
    assert len(quantized_inputs) >= 4 and all(low <= 0 <= high for low, high in (r.act_range for r in quantized_inputs))
    assert "models/digits_calib.npz" in report.totals["calibration"]


def test_w8a8_digits_flattens_channels_last_without_a_transpose(tmp_path):
    target = tmp_path / "digits.w8a8.onnx"
    report, _ = w8a8(DIGITS, target, MODELS / "digits_calib.npz")
    assert any("flattened channels-last" in n.message for n in report.notes)
    graph = optimized_graph(target, tmp_path)
    producers = {out: node.op_type for node in graph.node for out in node.output}
    transposed = [producers.get(node.input[0]) for node in graph.node if node.op_type == "Transpose"]
    assert "QLinearConv" in producers.values() and "QLinearConv" not in transposed
    feeds = dict(np.load(MODELS / "digits_eval.npz"))
    # the Gemm's weights were reordered to match: the logits still follow FP32's
    assert mean_cosine(outputs(DIGITS, feeds)["logits"], outputs(target, feeds)["logits"]) >= 0.999


def test_two_bit_layers_keep_float_inputs_and_the_model_loads(tmp_path):
    mixed, weights_only = tmp_path / "w2a8.onnx", tmp_path / "w2.onnx"
    calibration = Calibration(MODELS / "digits_calib.npz")
    model, report = compress_model(load_model(DIGITS), QuantConfig(bits=2, keep_first_last_bits=8, act_bits=8), calibration=calibration)
    save_model(model, mixed)
    save_model(compress_model(load_model(DIGITS), QuantConfig(bits=2, keep_first_last_bits=8), calibration=calibration)[0], weights_only)
    two_bit = [n for n in report.notes if "2-bit weights" in n.message]
    assert len(two_bit) == 3  # /6, /10 and /14; /17 is the last layer, at 8 bits
    assert accuracy(mixed) >= accuracy(weights_only) - 0.01  # onnxruntime loads and runs it


def test_w8a8_minilm_fidelity_and_integer_kernels(tmp_path, minilm, minilm_calib, minilm_feeds):
    target = tmp_path / "minilm.w8a8.onnx"
    report, calibration = w8a8(minilm, target, minilm_calib)
    ref = outputs(minilm, minilm_feeds)["sentence_embedding"]
    out = outputs(target, minilm_feeds)["sentence_embedding"]
    assert mean_cosine(ref, out) >= 0.99
    assert fused_ops(target, tmp_path)["MatMulIntegerToFloat"] == 36
    assert any(n.pass_name == "smooth" for n in report.notes)
    # smoothing, then the output-error column, then the activation ranges: each on fresh weights
    assert calibration.runs == 3


def test_smoothing_never_predicts_more_noise_than_none():
    from onnxcomp.calibration.statistics import ActivationStatistics
    from onnxcomp.passes.smooth import best_factors, predicted_noise

    rng = np.random.default_rng(0)
    x = rng.standard_normal((4000, 32)).astype(np.float32)
    x[:, 3] *= 40  # an outlier channel
    stats = ActivationStatistics()
    stats.add(x)
    w = rng.standard_normal((32, 16))
    alpha, s = best_factors(stats, [w])
    assert alpha > 0 and s[3] == s.max()
    assert predicted_noise(stats, [w], s) < predicted_noise(stats, [w], np.ones(32))


def test_output_error_is_reported_with_real_calibration(tmp_path):
    model, report = compress_model(load_model(DIGITS), QuantConfig(bits=4), calibration=Calibration(MODELS / "digits_calib.npz"))
    errors = [r.output_error for r in report.layers]
    assert all(e is not None and 0 < e < 0.05 for e in errors)
    assert "out err" in report.to_table()
    _, plain = compress_model(load_model(DIGITS), QuantConfig(bits=4))
    assert all(r.output_error is None for r in plain.layers)


def test_sequential_range_search_after_smoothing(tmp_path):
    """Smoothing appends its Mul nodes for the final sort to place; the sequential range
    search runs (and clones) the model mid-pass, so it orders the graph first."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(4)
    w1, w2 = rng.standard_normal((32, 16)).astype(np.float32), rng.standard_normal((16, 8)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="first"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="second")]
    inits = [onnx.numpy_helper.from_array(w1, "w1"), onnx.numpy_helper.from_array(w2, "w2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    x = rng.standard_normal((128, 32)).astype(np.float32)
    x[:, 3] *= 40  # an outlier channel, which smoothing moves into w1
    config = QuantConfig(bits=4, act_bits=8, range_search=True, range_objective="sequential")
    model, report = compress_model(onnx_ir.from_proto(proto), config, calibration=Calibration([{"x": x}]))
    assert any(n.pass_name == "smooth" for n in report.notes)
    save_model(onnx_ir.from_proto(proto), tmp_path / "fp32.onnx")
    save_model(model, tmp_path / "q.onnx")
    reference = outputs(tmp_path / "fp32.onnx", {"x": x}, 0)["y"]
    assert mean_cosine(reference, outputs(tmp_path / "q.onnx", {"x": x}, 0)["y"]) > 0.98
