"""Streaming statistics equal the ones computed from all activations at once."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from onnxcomp.calibration.analysis import Calibration
from onnxcomp.calibration.collect import collect
from onnxcomp.calibration.sources import CalibOptions, open_calibration
from onnxcomp.calibration.statistics import ActivationStatistics, Histogram
from onnxcomp.errors import CalibrationError
from onnxcomp.feeds import index_bounds, input_specs
from onnxcomp.kernels.act_range import activation_range, quantization_params
from onnxcomp.layers import find_weight_layers


def conv_matmul_model(rng) -> ir.Model:
    """x → Relu → Conv(groups 2, stride 2, pads, dilation 2);  t → Add → MatMul (3-D input)."""
    w_conv = rng.standard_normal((6, 2, 3, 3)).astype(np.float32)
    w_mm = rng.standard_normal((8, 3)).astype(np.float32)
    shift = rng.standard_normal(8).astype(np.float32)
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Conv", ["r", "w_conv"], ["y"], group=2, strides=[2, 2], pads=[1, 2, 0, 1], dilations=[2, 2], name="conv"),
        helper.make_node("Add", ["t", "shift"], ["u"]),
        helper.make_node("MatMul", ["u", "w_mm"], ["z"], name="matmul"),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 11, 10]),
         helper.make_tensor_value_info("t", TensorProto.FLOAT, ["N", 5, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6, "H", "W"]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 5, 3])],
        [onnx.numpy_helper.from_array(w_conv, "w_conv"), onnx.numpy_helper.from_array(w_mm, "w_mm"),
         onnx.numpy_helper.from_array(shift, "shift")],
    )
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))


@pytest.fixture
def calib_npz(tmp_path):
    rng = np.random.default_rng(7)
    path = tmp_path / "calib.npz"
    np.savez(path, x=rng.standard_normal((37, 4, 11, 10)).astype(np.float32), t=rng.standard_normal((37, 5, 8)).astype(np.float32))
    return path


def direct_conv_gram(path) -> np.ndarray:
    """The conv's H from all its inputs stacked, with torch's unfold as the im2col."""
    r = torch.from_numpy(np.maximum(np.load(path)["x"], 0))
    padded = torch.nn.functional.pad(r, (2, 1, 1, 0))  # ONNX pads [1, 2, 0, 1]: top, left, bottom, right
    patches = torch.nn.functional.unfold(padded, (3, 3), dilation=2, stride=2).double()  # (N, C·9, positions)
    per_group = [patches[:, g * 18 : (g + 1) * 18, :].permute(0, 2, 1).reshape(-1, 18) for g in range(2)]
    return np.stack([(p.T @ p).numpy() for p in per_group])


def test_streamed_gram_equals_direct(calib_npz):
    rng = np.random.default_rng(0)
    model = conv_matmul_model(rng)
    shift = model.graph.initializers["shift"].const_value.numpy().astype(np.float64)
    dataset = open_calibration(calib_npz, input_specs(model), {}, CalibOptions(samples=100, batch=8))
    layers = find_weight_layers(model.graph)
    stats = collect(model, dataset, layers)
    grams = {layer.node.name: record for layer, record in stats.layers.items()}

    expected = direct_conv_gram(calib_npz)
    got = grams["conv"].gram.matrix
    assert got.shape == (2, 18, 18)
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-9 * np.abs(expected).max())
    assert grams["conv"].samples == 37

    rows = (np.load(calib_npz)["t"].astype(np.float32) + shift.astype(np.float32)).astype(np.float64).reshape(-1, 8)
    want = rows.T @ rows
    np.testing.assert_allclose(grams["matmul"].gram.matrix[0], want, rtol=1e-9, atol=1e-9 * np.abs(want).max())
    assert grams["matmul"].gram.rows == 37 * 5


def test_groups_under_a_tiny_memory_budget_give_the_same_statistics(calib_npz):
    model = conv_matmul_model(np.random.default_rng(0))
    layers = find_weight_layers(model.graph)
    dataset = open_calibration(calib_npz, input_specs(model), {}, CalibOptions(batch=8))
    values = [layer.data for layer in layers]
    whole = collect(model, dataset, layers, values)
    split = collect(model, dataset, layers, values, memory_budget=1)  # one value per onnxruntime session
    for layer, record in whole.layers.items():
        np.testing.assert_array_equal(split.layers[layer].gram.matrix, record.gram.matrix)
    for value, record in whole.activations.items():
        np.testing.assert_array_equal(split.activations[value].histogram.counts, record.histogram.counts)
        assert split.activations[value].maximum == record.maximum


def test_statistics_are_cached_until_marked_stale(calib_npz):
    model = conv_matmul_model(np.random.default_rng(0))
    layers = find_weight_layers(model.graph)
    calibration = Calibration(calib_npz)
    first = calibration.statistics(model, "test", layers=layers)
    gram = first.layers[layers[0]].gram.matrix.copy()
    calibration.statistics(model, "test", layers=layers[:1])
    assert calibration.runs == 1
    calibration.mark_stale()
    again = calibration.statistics(model, "test", layers=layers)
    assert calibration.runs == 2
    np.testing.assert_array_equal(again.layers[layers[0]].gram.matrix, gram)


def test_nan_inside_the_model_is_reported(tmp_path):
    model = conv_matmul_model(np.random.default_rng(0))
    path = tmp_path / "nan.npz"
    t = np.ones((4, 5, 8), np.float32)
    t[2, 1, 3] = np.nan
    np.savez(path, x=np.ones((4, 4, 11, 10), np.float32), t=t)
    dataset = open_calibration(path, input_specs(model), {}, CalibOptions(batch=2))
    layers = find_weight_layers(model.graph)
    with pytest.raises(CalibrationError, match="NaN or Inf on calibration batch 1"):
        collect(model, dataset, layers)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.lists(st.integers(1, 300), min_size=1, max_size=6), st.floats(1e-3, 1e3))
def test_histogram_is_independent_of_batch_boundaries(seed, sizes, scale):
    rng = np.random.default_rng(seed)
    values = (rng.standard_t(3, sum(sizes)) * scale).astype(np.float32)
    streamed, whole = Histogram(max_bins=256), Histogram(max_bins=256)
    start = 0
    for size in sizes:
        streamed.add(values[start : start + size])
        start += size
    whole.add(values)
    assert streamed.exponent == whole.exponent and streamed.first == whole.first
    np.testing.assert_array_equal(streamed.counts, whole.counts)
    assert streamed.counts.sum() == values.size and len(streamed.counts) <= 256
    edges = streamed.edges()
    index = np.searchsorted(edges, values.astype(np.float64), side="right") - 1
    np.testing.assert_array_equal(np.bincount(index, minlength=len(streamed.counts)), streamed.counts)


def test_activation_ranges():
    rng = np.random.default_rng(3)
    values = np.concatenate([rng.standard_normal(100_000), [40.0, -25.0]]).astype(np.float32)
    stats = ActivationStatistics()
    stats.add(values)
    assert activation_range(stats, "minmax") == (stats.minimum, stats.maximum)
    low, high = activation_range(stats, "percentile", 99.9)
    assert stats.minimum < low < -2.5 and 2.5 < high < stats.maximum  # the two outliers are clipped
    mse_low, mse_high = activation_range(stats, "mse")
    assert mse_high < stats.maximum  # clipping the outlier pays off in squared error

    def error(bounds):
        scale, zero = quantization_params(*bounds)
        q = np.clip(np.round(values / scale) + zero, 0, 255)
        return float(np.mean(((q - zero) * scale - values) ** 2))

    assert error((mse_low, mse_high)) < error((stats.minimum, stats.maximum))
    scale, zero = quantization_params(0.0, 6.0)
    assert zero == 0 and scale == np.float32(6.0 / 255)
    scale, zero = quantization_params(-1.0, 3.0)
    grid_low, grid_high = -int(zero) * float(scale), (255 - int(zero)) * float(scale)
    assert abs(grid_low + 1.0) <= scale / 2 + 1e-7 and abs(grid_high - 3.0) <= scale / 2 + 1e-7


def test_synthetic_inputs_respect_embedding_tables(minilm):
    from onnxcomp.modelio import load_model

    model = load_model(minilm)
    dataset = open_calibration(None, input_specs(model), index_bounds(model), CalibOptions(samples=20, batch=8))
    batches = list(dataset.batches())
    assert [len(b["input_ids"]) for b in batches] == [8, 8, 4]
    assert all(b["input_ids"].max() < 30522 and (b["attention_mask"] == 1).all() for b in batches)
    assert dataset.synthetic


def test_progress_in_a_log_is_one_line_with_the_count(calib_npz, capsys):
    model = conv_matmul_model(np.random.default_rng(0))
    dataset = open_calibration(calib_npz, input_specs(model), {}, CalibOptions(batch=8))
    collect(model, dataset, find_weight_layers(model.graph), progress=True)  # stderr is no terminal here
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnxcomp: calibrate: 37 samples in "), lines


def test_external_data_model_calibrates(tmp_path):
    """A model whose weights live in an external file (as every model over 2 GB does)."""
    from onnxcomp.modelio import load_model

    model = conv_matmul_model(np.random.default_rng(0))
    ir.save(model, tmp_path / "ext.onnx", external_data="ext.onnx.data", size_threshold_bytes=0)
    assert (tmp_path / "ext.onnx.data").stat().st_size > 0
    reloaded = load_model(tmp_path / "ext.onnx")
    rng = np.random.default_rng(1)
    feeds = [{"x": rng.standard_normal((4, 4, 11, 10)).astype(np.float32), "t": rng.standard_normal((4, 5, 8)).astype(np.float32)}]
    dataset = open_calibration(feeds, input_specs(reloaded), {}, CalibOptions())
    stats = collect(reloaded, dataset, find_weight_layers(reloaded.graph))
    assert {layer.node.name for layer in stats.layers} == {"conv", "matmul"}
    assert all(record.samples == 4 for record in stats.layers.values())


@pytest.mark.skipif("CUDAExecutionProvider" in __import__("onnxruntime").get_available_providers(), reason="CUDA present")
def test_cuda_without_onnxruntime_gpu_is_a_clear_error(calib_npz):
    from onnxcomp.errors import ConfigError

    model = conv_matmul_model(np.random.default_rng(0))
    with pytest.raises(ConfigError, match="onnxruntime-gpu"):
        Calibration(calib_npz, device="cuda").statistics(model, "test", layers=find_weight_layers(model.graph))
