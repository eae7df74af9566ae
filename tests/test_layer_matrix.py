"""Each layer as rows @ matrix reproduces onnxruntime's own output of that layer."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from onnxcomp.layer_matrix import input_rows, weight_from_matrix, weight_matrix
from onnxcomp.layers import find_weight_layers


def single_layer(op: str, x_shape, w: np.ndarray, **attrs) -> onnx.ModelProto:
    node = helper.make_node(op, ["x", "w"], ["y"], **attrs)
    graph = helper.make_graph(
        [node], "layer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(w, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def rows_times_matrix(proto: onnx.ModelProto, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(onnxruntime's output, the same output assembled from rows @ weight_matrix)."""
    expected = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    layer = find_weight_layers(ir.from_proto(proto).graph)[0]
    w = layer.weight.const_value.numpy()
    rows, matrix = input_rows(layer, x), weight_matrix(layer, w)
    assert np.array_equal(weight_from_matrix(layer, matrix, w.shape), w)
    product = np.einsum("gnr,gro->gno", rows.astype(np.float64), matrix.astype(np.float64))
    if layer.node.op_type in ("Conv", "ConvTranspose"):
        n, m, *out = expected.shape
        groups = product.shape[0]
        product = product.reshape(groups, n, -1, m // groups).transpose(1, 0, 3, 2).reshape(n, m, *out)
    else:
        product = product[0].reshape(expected.shape)
    return expected, product


CONVS = [
    dict(x=(2, 4, 9, 9), w=(6, 4, 3, 3), attrs={}),
    dict(x=(2, 4, 9, 9), w=(6, 2, 3, 3), attrs=dict(group=2, strides=[2, 2], pads=[1, 0, 2, 1])),
    dict(x=(2, 6, 11, 10), w=(6, 1, 3, 3), attrs=dict(group=6, dilations=[2, 2], pads=[2, 2, 2, 2])),
    dict(x=(1, 3, 10, 7), w=(4, 3, 3, 2), attrs=dict(auto_pad="SAME_UPPER", strides=[2, 3])),
    dict(x=(1, 3, 10, 7), w=(4, 3, 3, 2), attrs=dict(auto_pad="SAME_LOWER", strides=[3, 2])),
    dict(x=(3, 4, 12), w=(8, 2, 5), attrs=dict(group=2, strides=[2], pads=[2, 1])),
    dict(x=(1, 2, 5, 6, 4), w=(3, 2, 2, 3, 2), attrs=dict(strides=[1, 2, 1], pads=[0, 1, 1, 1, 0, 0])),
]


@pytest.mark.parametrize("case", CONVS, ids=lambda c: f"{c['w']}-{c['attrs']}")
def test_conv_rows(case):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(case["x"]).astype(np.float32)
    w = rng.standard_normal(case["w"]).astype(np.float32)
    expected, product = rows_times_matrix(single_layer("Conv", case["x"], w, **case["attrs"]), x)
    np.testing.assert_allclose(product, expected, rtol=1e-4, atol=1e-4)


CONV_TRANSPOSES = [
    dict(x=(2, 4, 5, 5), w=(4, 3, 3, 3), attrs={}),
    dict(x=(2, 4, 5, 6), w=(4, 2, 3, 2), attrs=dict(group=2, strides=[2, 3], pads=[1, 0, 0, 1], output_padding=[1, 0])),
    dict(x=(1, 3, 6, 4), w=(3, 2, 3, 3), attrs=dict(dilations=[2, 1], strides=[2, 2], pads=[3, 1, 2, 2])),
    dict(x=(2, 2, 7), w=(2, 5, 4), attrs=dict(strides=[3], pads=[1, 2])),
]


@pytest.mark.parametrize("case", CONV_TRANSPOSES, ids=lambda c: f"{c['w']}-{c['attrs']}")
def test_conv_transpose_rows(case):
    rng = np.random.default_rng(1)
    x = rng.standard_normal(case["x"]).astype(np.float32)
    w = rng.standard_normal(case["w"]).astype(np.float32)
    expected, product = rows_times_matrix(single_layer("ConvTranspose", case["x"], w, **case["attrs"]), x)
    np.testing.assert_allclose(product, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("op,x_shape,w_shape,attrs", [
    ("MatMul", (2, 5, 8), (8, 3), {}),
    ("MatMul", (7, 8), (8, 3), {}),
    ("Gemm", (5, 8), (8, 3), {}),
    ("Gemm", (5, 8), (3, 8), dict(transB=1)),
    ("Gemm", (8, 5), (3, 8), dict(transA=1, transB=1)),
])
def test_matrix_rows(op, x_shape, w_shape, attrs):
    rng = np.random.default_rng(2)
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = rng.standard_normal(w_shape).astype(np.float32)
    expected, product = rows_times_matrix(single_layer(op, x_shape, w, **attrs), x)
    np.testing.assert_allclose(product, expected, rtol=1e-4, atol=1e-4)


def test_conv_rows_match_torch_unfold():
    """An independent im2col: torch's unfold gives the same patches, column for column."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 4, 9, 8)).astype(np.float32)
    w = rng.standard_normal((4, 4, 3, 3)).astype(np.float32)
    proto = single_layer("Conv", x.shape, w, strides=[2, 1], pads=[1, 2, 1, 2], dilations=[1, 2])
    layer = find_weight_layers(ir.from_proto(proto).graph)[0]
    ours = input_rows(layer, x)[0]
    unfolded = torch.nn.functional.unfold(torch.from_numpy(x), (3, 3), dilation=(1, 2), padding=(1, 2), stride=(2, 1))
    theirs = unfolded.permute(0, 2, 1).reshape(-1, 4 * 9).numpy()
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("op, groups", [("Conv", 1), ("Conv", 4), ("ConvTranspose", 2)])
def test_sampled_positions_are_rows_of_the_full_set(op, groups):
    rng = np.random.default_rng(3)
    w = rng.normal(size=(8, 8 // groups, 3, 3)).astype(np.float32)
    layer = find_weight_layers(ir.from_proto(single_layer(op, (2, 8, 20, 24), w, group=groups, pads=[1, 1, 1, 1])).graph)[0]
    x = rng.normal(size=(2, 8, 20, 24)).astype(np.float32)
    full = input_rows(layer, x)
    sampled = input_rows(layer, x, positions=50, rng=np.random.default_rng(7))
    assert sampled.shape == (full.shape[0], 2 * 50, full.shape[2])
    per_sample = full.shape[1] // 2
    for g in range(full.shape[0]):  # every sampled row is one of its sample's own rows, in order
        for sample in range(2):
            rows = full[g, sample * per_sample : (sample + 1) * per_sample]
            picked = sampled[g, sample * 50 : (sample + 1) * 50]
            hits = [int(np.flatnonzero((rows == row).all(axis=1))[0]) for row in picked]
            assert hits == sorted(set(hits))
    again = input_rows(layer, x, positions=50, rng=np.random.default_rng(7))
    assert np.array_equal(sampled, again)
    assert np.array_equal(input_rows(layer, x, positions=10_000), full)  # a cap above the size takes all


def test_sampled_gram_estimates_the_full_one():
    rng = np.random.default_rng(4)
    w = rng.normal(size=(16, 3, 3, 3)).astype(np.float32)
    layer = find_weight_layers(ir.from_proto(single_layer("Conv", (4, 3, 96, 96), w, pads=[1, 1, 1, 1])).graph)[0]
    x = np.cumsum(rng.normal(size=(4, 3, 96, 96)), axis=3).astype(np.float32) / 10  # smooth, image-like
    full = input_rows(layer, x)[0].astype(np.float64)
    sampled = input_rows(layer, x, positions=1024, rng=np.random.default_rng(0))[0].astype(np.float64)
    h_full, h_sampled = full.T @ full / len(full), sampled.T @ sampled / len(sampled)
    assert np.linalg.norm(h_sampled - h_full) / np.linalg.norm(h_full) < 0.1


def _rnn(direction: str, layout: int, w: np.ndarray, r: np.ndarray, x_shape) -> onnx.ModelProto:
    hidden = r.shape[-1]
    node = helper.make_node("RNN", ["x", "W", "R"], ["y"], hidden_size=hidden, direction=direction, layout=layout)
    graph = helper.make_graph(
        [node], "rnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(w, "W"), onnx.numpy_helper.from_array(r, "R")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)], ir_version=8)


@pytest.mark.parametrize("direction, layout", [("forward", 0), ("reverse", 0), ("bidirectional", 0), ("bidirectional", 1)])
def test_recurrent_rows_give_each_step_its_preactivation(direction, layout):
    """An RNN's hidden state is tanh(x_t Wᵀ + h_prev Rᵀ): the rows of W (the input sequence)
    and of R (the states of the step before, in the direction's own order) must line up step
    by step with onnxruntime's Y, for every direction and layout (onnxruntime runs layout 0
    only; the batch-first case reads the same run transposed)."""
    rng = np.random.default_rng(5)
    steps, batch, inputs, hidden = 6, 3, 5, 4
    directions = 2 if direction == "bidirectional" else 1
    w = (rng.normal(size=(directions, hidden, inputs)) * 0.4).astype(np.float32)
    r = (rng.normal(size=(directions, hidden, hidden)) * 0.4).astype(np.float32)
    x = rng.normal(size=(steps, batch, inputs)).astype(np.float32)
    proto = _rnn(direction, 0, w, r, x.shape)
    y = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    states = y.transpose(1, 0, 2, 3)  # (D, T, N, hidden)
    if layout:  # (N, T, inputs) in, (N, T, D, hidden) out
        x, y = x.transpose(1, 0, 2), y.transpose(2, 0, 1, 3)
        proto = _rnn(direction, 1, w, r, x.shape)
    w_layer, r_layer = find_weight_layers(ir.from_proto(proto).graph)
    assert w_layer.groups == r_layer.groups == directions
    from_x = np.einsum("gnr,gro->gno", input_rows(w_layer, x), weight_matrix(w_layer, w))  # (D, T·N, hidden)
    from_h = np.einsum("gnr,gro->gno", input_rows(r_layer, y), weight_matrix(r_layer, r))  # (D, (T−1)·N, hidden)
    if layout:  # the input rows follow X's own order, (N, T)
        from_x = from_x.reshape(directions, batch, steps, hidden).transpose(0, 2, 1, 3)
    from_x = from_x.reshape(directions, steps, batch, hidden)
    from_h = from_h.reshape(directions, steps - 1, batch, hidden)
    for d in range(directions):
        backward = direction == "reverse" or d == 1
        later = slice(0, steps - 1) if backward else slice(1, steps)  # every step but the first one run
        np.testing.assert_allclose(np.tanh(from_x[d, later] + from_h[d]), states[d, later], atol=1e-5)
