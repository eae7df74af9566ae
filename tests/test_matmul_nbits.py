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
    packed, scale, zero = (values[name] for name in node.input[1:4])
    n, k, bits, block = attrs["N"], attrs["K"], attrs["bits"], attrs["block_size"]
    per_byte = 8 // bits
    codes = np.stack([(packed >> (slot * bits)) & (2**bits - 1) for slot in range(per_byte)], axis=-1).reshape(n, k)
    scale, zero = scale.reshape(n, k // block, 1), zero.reshape(n, k // block, 1)
    weight = (codes.reshape(n, k // block, block) - zero.astype(np.float64)) * scale
    return node, weight.reshape(n, k).T


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_matmul_nbits_computes_what_its_codes_decode_to(tmp_path, bits):
    source, out = tmp_path / "linear.onnx", tmp_path / "q.onnx"
    onnx.save(graphs.parsed(LINEAR, {"w": (64, 24), "b": (24,), "g": (64, 24)}), source)
    report = compress_to(source, out, bits=bits, granularity="block", block_size=32, asymmetric=True, zero_point="float")
    model = onnx.load(out)
    node, weight = _decoded_weight(model)
    assert node.domain == "com.microsoft" and op_count(out, "MatMul") == 0
    assert op_count(out, "DequantizeLinear") == 1  # the Gemm keeps an integer zero point, and says so
    assert any("integer zero point" in (r.note or "") for r in report.layers)
    original = {t.name: numpy_helper.to_array(t) for t in onnx.load(source).graph.initializer}
    assert np.abs(weight - original["w"]).max() <= np.abs(original["w"]).max() / (2**bits - 1)
    x = np.random.default_rng(1).normal(size=(5, 64)).astype(np.float32)
    expected = x.astype(np.float64) @ weight + original["b"]
    for level in (None, 0):
        np.testing.assert_allclose(outputs(out, {"x": x}, accuracy_level=level)["y"], expected, rtol=0, atol=0.05 if level is None else 1e-4)


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
    import onnx_ir as ir
    from onnxcomp.stored_weights import stored_weights

    source, out = tmp_path / "linear.onnx", tmp_path / "q.onnx"
    onnx.save(graphs.parsed(LINEAR, {"w": (64, 24), "b": (24,), "g": (64, 24)}), source)
    compress_to(source, out, bits=4, granularity="block", block_size=16, asymmetric=True, zero_point="float")
    _, expected = _decoded_weight(onnx.load(out))
    (nbits,) = [w for w in stored_weights(ir.load(str(out)).graph) if w.op == "MatMulNBits"]
    np.testing.assert_allclose(nbits.weight, expected, rtol=0, atol=1e-6)
