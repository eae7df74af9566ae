"""Bias correction removes the mean output shift that weight rounding causes."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from onnxcomp import QuantConfig
from onnxcomp.pipeline import compress_model
from onnxcomp.calibration.analysis import Calibration
from onnxcomp.errors import ConfigError
from onnxcomp.modelio import load_model, save_model

from conftest import MODELS, outputs
from digits_accuracy import accuracy


def layer_model(kind: str) -> onnx.ModelProto:
    """A MatMul followed by a bias Add, or a Conv without a bias input."""
    rng = np.random.default_rng(0)
    if kind == "matmul":
        w, b = rng.standard_normal((16, 8)).astype(np.float32), rng.standard_normal(8).astype(np.float32)
        nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="dense"), helper.make_node("Add", ["m", "b"], ["y"])]
        inits = [onnx.numpy_helper.from_array(w, "w"), onnx.numpy_helper.from_array(b, "b")]
        x, y = ["N", 16], ["N", 8]
    else:
        w = rng.standard_normal((6, 3, 3, 3)).astype(np.float32)
        nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])]
        inits = [onnx.numpy_helper.from_array(w, "w")]
        x, y = ["N", 3, 5, 5], ["N", 6, 5, 5]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, y)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("kind", ["matmul", "conv"])
def test_mean_output_shift_is_removed(tmp_path, kind):
    proto = layer_model(kind)
    rng = np.random.default_rng(1)
    shape = (64, 16) if kind == "matmul" else (64, 3, 5, 5)
    x = (np.abs(rng.standard_normal(shape)) + 0.5).astype(np.float32)  # a non-zero mean input
    save_model(ir.from_proto(proto), tmp_path / "fp32.onnx")
    reference = outputs(tmp_path / "fp32.onnx", {"x": x}, 0)["y"]
    axes = (0,) if kind == "matmul" else (0, 2, 3)
    shifts = {}
    for corrected in (False, True):
        model, _ = compress_model(ir.from_proto(proto), QuantConfig(bits=2, bias_correction=corrected), calibration=Calibration([{"x": x}]))
        save_model(model, tmp_path / "q.onnx")
        shifts[corrected] = np.abs((outputs(tmp_path / "q.onnx", {"x": x}, 0)["y"] - reference).mean(axis=axes)).max()
    interior = 1e-3 if kind == "matmul" else None  # conv borders see padding, whose mean differs
    assert shifts[True] < shifts[False] / 5
    if interior:
        assert shifts[True] < interior


def test_bias_correction_lifts_2_bit_digits(tmp_path):
    results = []
    for corrected in (False, True):
        model, report = compress_model(load_model(MODELS / "digits_cnn.onnx"), QuantConfig(bits=2, bias_correction=corrected),
                                 calibration=Calibration(MODELS / "digits_calib.npz"))
        save_model(model, tmp_path / "q.onnx")
        results.append(accuracy(tmp_path / "q.onnx"))
    assert results[1] >= results[0] + 0.02, results
    assert all("bias corrected" in r.note for r in report.layers)


def test_bias_correction_follows_the_one_rule_for_data():
    with pytest.warns(UserWarning, match="--bias-correction uses synthetic calibration inputs"):
        compress_model(ir.from_proto(layer_model("matmul")), QuantConfig(bits=4, bias_correction=True))
    with pytest.raises(ConfigError, match="--bias-correction needs calibration data and --calib none"):
        compress_model(ir.from_proto(layer_model("matmul")), QuantConfig(bits=4, bias_correction=True),
                       calibration=Calibration("none"))


def test_sequential_bias_correction_removes_the_drift_from_earlier_layers(tmp_path):
    """MatMul → Add → Relu → MatMul → Add: the ReLU turns the first layer's errors into a
    mean shift of the second layer's input. With the sequential range objective the second
    bias also absorbs that drift, E[x̃]·Ŵ − E[x]·W, so the model's mean output on the
    calibration data matches FP32; plain bias correction removes only the layer's own part."""
    rng = np.random.default_rng(2)
    w1, w2 = rng.standard_normal((16, 12)).astype(np.float32), rng.standard_normal((12, 8)).astype(np.float32)
    b1, b2 = rng.standard_normal(12).astype(np.float32), rng.standard_normal(8).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["m1"], name="first"), helper.make_node("Add", ["m1", "b1"], ["a1"]),
             helper.make_node("Relu", ["a1"], ["r1"]),
             helper.make_node("MatMul", ["r1", "w2"], ["m2"], name="second"), helper.make_node("Add", ["m2", "b2"], ["y"])]
    inits = [onnx.numpy_helper.from_array(v, n) for v, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    x = rng.standard_normal((128, 16)).astype(np.float32)  # all of it calibrates (--calib-samples 128)
    save_model(ir.from_proto(proto), tmp_path / "fp32.onnx")
    reference = outputs(tmp_path / "fp32.onnx", {"x": x}, 0)["y"].mean(axis=0)
    shifts = {}
    for objective in ("output", "sequential"):
        config = QuantConfig(bits=2, range_search=True, range_objective=objective, bias_correction=True)
        model, _ = compress_model(ir.from_proto(proto), config, calibration=Calibration([{"x": x}]))
        save_model(model, tmp_path / "q.onnx")
        shifts[objective] = np.abs(outputs(tmp_path / "q.onnx", {"x": x}, 0)["y"].mean(axis=0) - reference).max()
    assert shifts["sequential"] < 1e-4 < shifts["output"] / 10, shifts
