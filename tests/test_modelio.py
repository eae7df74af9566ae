"""Loading and saving: external data in, external data out when the weights are large."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import onnxcomp.modelio as modelio
from conftest import MODELS, compress_to, outputs

FEEDS = {"image": np.load(MODELS / "digits_eval.npz")["image"][:32]}


def test_model_with_external_data_compresses(tmp_path):
    model = onnx.load(MODELS / "digits_cnn.onnx")
    source = tmp_path / "ext.onnx"
    onnx.save(model, source, save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    assert (tmp_path / "ext.onnx.data").stat().st_size > 100_000
    target = tmp_path / "q.onnx"
    compress_to(source, target, bits=8)
    ref, out = outputs(source, FEEDS)["logits"], outputs(target, FEEDS)["logits"]
    assert np.abs(ref - out).max() < 0.05 * np.abs(ref).max()


def test_large_weights_are_saved_as_external_data(tmp_path, monkeypatch):
    monkeypatch.setattr(modelio, "EXTERNAL_DATA_THRESHOLD", 1_000)  # stands in for 2 GB
    target = tmp_path / "q.onnx"
    compress_to(MODELS / "digits_cnn.onnx", target, bits=4)
    assert (tmp_path / "q.onnx.data").is_file() and target.stat().st_size < 20_000
    onnx.checker.check_model(str(target))
    assert outputs(target, FEEDS)["logits"].shape == (32, 10)


def test_gemm_without_transpose(tmp_path):
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(32, 16)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w"], ["y"], name="gemm", transB=0)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])], [w],
    )
    source = tmp_path / "gemm.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), source)
    target = tmp_path / "q.onnx"
    report = compress_to(source, target, bits=8, granularity="block", block_size=16)
    assert report.layers[0].granularity == "block16" and report.layers[0].bits == 8
    feeds = {"x": rng.normal(size=(4, 32)).astype(np.float32)}
    ref, out = outputs(source, feeds)["y"], outputs(target, feeds)["y"]
    assert np.abs(ref - out).max() < 0.01 * np.abs(ref).max()
