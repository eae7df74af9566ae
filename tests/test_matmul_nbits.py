"""Real-valued zero points (--zero-point float): each block's levels span its own range, and
the MatMul is written as onnxruntime's MatMulNBits, which computes what the codes decode to."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import graphs
from conftest import compress_to, op_count, outputs
from onnxcomp import QuantConfig
from onnxcomp.errors import ConfigError
from onnxcomp.fidelity import mean_cosine
from onnxcomp.kernels.quantize import dequantize, grid_for, quantize
from onnxcomp.stored_weights import stored_weights
import onnx_ir as ir

LINEAR = """
<ir_version: 8, opset_import: ["" : 17]>
linear (float[batch, 64] x) => (float[batch, 24] y, float[batch, 24] z) {
    h = MatMul(x, w)
    y = Add(h, b)
    z = Gemm(x, g)
}
"""


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_float_zero_grid_spans_each_block_exactly(bits):
    w = np.random.default_rng(bits).normal(size=(64, 24)).astype(np.float32) + 0.7  # blocks off-centre
    qt = quantize(w, grid_for(bits, True, float_zero=True), axis=0, block_size=32)
    decoded = dequantize(qt).astype(np.float64)
    blocks, approx = w.reshape(2, 32, 24), decoded.reshape(2, 32, 24)
    scale = qt.scale.astype(np.float64)
    assert qt.zero_point.dtype == np.float32 and qt.q.min() >= 0 and qt.q.max() <= 2**bits - 1
    np.testing.assert_allclose(approx.min(axis=1), blocks.min(axis=1), atol=1e-5)  # the ends are levels
    np.testing.assert_allclose(approx.max(axis=1), blocks.max(axis=1), atol=1e-5)
    assert (np.abs(approx - blocks) <= scale[:, None, :] / 2 + 1e-5).all()  # nearest level, nothing clipped


def _decoded_weight(model: onnx.ModelProto) -> tuple[onnx.NodeProto, np.ndarray]:
    """Unpack the MatMulNBits initializers as the contrib-op spec lays them out."""
    (node,) = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    packed, scale = values[node.input[1]], values[node.input[2]]
    n, k, bits, block = attrs["N"], attrs["K"], attrs["bits"], attrs["block_size"]
    per_byte, blocks = 8 // bits, k // block

    def unpack(array, count):
        slots = [(array.reshape(n, -1) >> (slot * bits)) & (2**bits - 1) for slot in range(per_byte)]
        return np.stack(slots, axis=-1).reshape(n, -1)[:, :count]

    codes = unpack(packed, k)
    if len(node.input) < 4:
        zero = np.full((n, blocks), 2 ** (bits - 1), np.float64)
    else:
        zero = values[node.input[3]]
        zero = zero.reshape(n, blocks) if zero.dtype.kind == "f" else unpack(zero, blocks)
    weight = (codes.reshape(n, blocks, block) - zero.astype(np.float64)[..., None]) * scale.reshape(n, blocks, 1)
    return node, weight.reshape(n, k).T


CASES = [(bits, kind) for bits in (2, 3, 4, 8) for kind in ("symmetric", "integer", "float") if (bits, kind) != (8, "float")]


@pytest.mark.parametrize("bits, kind", CASES)
def test_matmul_nbits_computes_what_its_codes_decode_to(tmp_path, bits, kind):
    source, out, portable = tmp_path / "linear.onnx", tmp_path / "q.onnx", tmp_path / "portable.onnx"
    onnx.save(graphs.parsed(LINEAR, {"w": (64, 24), "b": (24,), "g": (64, 24)}), source)
    options = {"bits": bits, "granularity": "block", "block_size": 32, "asymmetric": kind != "symmetric"}
    report = compress_to(source, out, **options, zero_point="float" if kind == "float" else "integer")
    model = onnx.load(out)
    node, weight = _decoded_weight(model)
    assert node.domain == "com.microsoft" and op_count(out, "MatMul") == 0
    assert op_count(out, "DequantizeLinear") == 1  # the Gemm: MatMulNBits is a MatMul
    if kind == "float":
        assert any("integer zero point" in (r.note or "") for r in report.layers)
    else:  # the same codes and scales as the portable graph's DequantizeLinear
        compress_to(source, portable, **options, target="portable")
        (stored,) = [w for w in stored_weights(ir.load(str(portable)).graph) if w.weight.shape == (64, 24) and "MatMul" in w.op]
        np.testing.assert_allclose(weight, stored.weight, rtol=0, atol=1e-7)
    original = {t.name: numpy_helper.to_array(t) for t in onnx.load(source).graph.initializer}
    assert np.abs(weight - original["w"]).max() <= np.abs(original["w"]).max() / (2 ** (bits - 1) - 0.5)
    x = np.random.default_rng(1).normal(size=(5, 64)).astype(np.float32)
    expected = x.astype(np.float64) @ weight + original["b"]
    level = 0  # what onnxcomp writes by default: float compute
    assert onnx.helper.get_attribute_value(next(a for a in node.attribute if a.name == "accuracy_level")) == level
    np.testing.assert_allclose(outputs(out, {"x": x})["y"], expected, rtol=0, atol=0.05 if level else 1e-4)


@pytest.mark.parametrize("options, message", [
    ({"granularity": "channel", "asymmetric": True}, "--granularity block"),
    ({"granularity": "block", "asymmetric": False}, "--asymmetric"),
    ({"granularity": "block", "asymmetric": True, "target": "portable"}, "--target onnxruntime"),
    ({"granularity": "block", "asymmetric": True, "range_search": True}, "no --range-search"),
])
def test_float_zero_points_need_their_layout(options, message):
    with pytest.raises(ConfigError, match=message):
        QuantConfig(bits=4, zero_point="float", **options)


def test_minilm_with_real_zero_points(tmp_path, minilm, minilm_feeds):
    reference = outputs(minilm, minilm_feeds)["sentence_embedding"]
    cosines = {}
    for kind in ("integer", "float"):
        target = tmp_path / f"{kind}.onnx"
        compress_to(minilm, target, bits=4, granularity="block", block_size=32, asymmetric=True, zero_point=kind)
        cosines[kind] = mean_cosine(reference, outputs(target, minilm_feeds)["sentence_embedding"])
    assert op_count(tmp_path / "float.onnx", "MatMulNBits") >= 36
    assert cosines["float"] >= cosines["integer"] - 0.002 and cosines["float"] > 0.97, cosines


def test_stored_weights_decode_matmul_nbits_as_the_spec_lays_it_out(tmp_path):
    source, out = tmp_path / "linear.onnx", tmp_path / "q.onnx"
    onnx.save(graphs.parsed(LINEAR, {"w": (64, 24), "b": (24,), "g": (64, 24)}), source)
    compress_to(source, out, bits=4, granularity="block", block_size=16, asymmetric=True, zero_point="float")
    _, expected = _decoded_weight(onnx.load(out))
    (nbits,) = [w for w in stored_weights(ir.load(str(out)).graph) if w.op == "MatMulNBits"]
    np.testing.assert_allclose(nbits.weight, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("bits, asymmetric, granularity", [(8, False, "channel"), (4, True, "channel"), (4, False, "tensor")])
def test_per_channel_matmul_is_packed_with_repeated_scales(tmp_path, bits, asymmetric, granularity):
    source, out, portable = tmp_path / "linear.onnx", tmp_path / "q.onnx", tmp_path / "portable.onnx"
    onnx.save(graphs.parsed(LINEAR, {"w": (64, 24), "b": (24,), "g": (64, 24)}), source)
    options = {"bits": bits, "asymmetric": asymmetric, "granularity": granularity}
    report = compress_to(source, out, **options)
    compress_to(source, portable, **options, target="portable")
    node, weight = _decoded_weight(onnx.load(out))
    assert onnx.helper.get_attribute_value(next(a for a in node.attribute if a.name == "block_size")) == 64
    assert any("scales repeated per block of 64" in (r.note or "") for r in report.layers)
    (stored,) = [w for w in stored_weights(ir.load(str(portable)).graph) if "MatMul" in w.op]
    np.testing.assert_allclose(weight, stored.weight, rtol=0, atol=1e-7)


def test_a_shared_matrix_keeps_its_one_dequantize(tmp_path):
    source, out = tmp_path / "shared.onnx", tmp_path / "q.onnx"
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    shared (float[batch, 64] x, float[batch, 64] u) => (float[batch, 24] y, float[batch, 24] z) {
        y = MatMul(x, w)
        z = MatMul(u, w)
    }
    """
    onnx.save(graphs.parsed(text, {"w": (64, 24)}), source)
    compress_to(source, out, bits=4, granularity="block", block_size=32)
    assert op_count(out, "MatMulNBits") == 0 and op_count(out, "DequantizeLinear") == 1
    assert not [t for t in onnx.load(out).graph.initializer if t.data_type == onnx.TensorProto.FLOAT and t.name == "w"]


def test_repeated_scales_stay_within_the_kernels_block_sizes(tmp_path):
    source, out = tmp_path / "wide.onnx", tmp_path / "q.onnx"
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    wide (float[batch, 1536] x) => (float[batch, 8] y) {
        y = MatMul(x, w)
    }
    """
    onnx.save(graphs.parsed(text, {"w": (1536, 8)}), source)  # 1536 = 512 · 3: blocks of 256
    compress_to(source, out, bits=4, granularity="channel")
    node, _ = _decoded_weight(onnx.load(out))
    assert onnx.helper.get_attribute_value(next(a for a in node.attribute if a.name == "block_size")) == 256
    x = np.random.default_rng(0).normal(size=(2, 1536)).astype(np.float32)
    assert np.isfinite(outputs(out, {"x": x})["y"]).all()
