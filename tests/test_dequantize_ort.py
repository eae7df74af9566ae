"""onnxruntime's DequantizeLinear decodes exactly what the numpy kernel says, for every layout."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxcomp.kernels.quantize import dequantize, grid_for, quantize
from onnxcomp.layers import WeightLayer
from onnxcomp.passes.quantize_weights import NameAllocator, emit_dequantize
from onnxcomp.runtime import make_session, run


def _dq_model(w: np.ndarray, bits: int, asymmetric: bool, axis, block):
    """A graph whose only output is DequantizeLinear(Q(w)), built by the pass's own emitter."""
    weight = ir.Value(name="w", shape=ir.Shape(w.shape), type=ir.TensorType(ir.DataType.FLOAT), const_value=ir.tensor(w))
    x = ir.Value(name="x", shape=ir.Shape([1, w.shape[0]]), type=ir.TensorType(ir.DataType.FLOAT))
    matmul = ir.node("MatMul", [x, weight], name="mm")
    graph = ir.Graph([x], [], nodes=[matmul], initializers=[weight], opset_imports={"": 25}, name="g")
    qt = quantize(w, grid_for(bits, asymmetric), axis=axis, block_size=block)
    out = emit_dequantize(graph, NameAllocator(graph), WeightLayer(matmul, weight, 1, 0), qt, bits)
    matmul.replace_input_with(1, out)
    graph.outputs.append(out)
    matmul.outputs[0].name = "y"
    matmul.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    matmul.outputs[0].shape = ir.Shape([1, w.shape[1]])
    graph.outputs.append(matmul.outputs[0])
    graph.initializers.pop("w")
    return ir.Model(graph, ir_version=11), qt


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("asymmetric", [False, True])
@pytest.mark.parametrize("layout", [(None, None), (1, None), (0, 16)])
def test_onnxruntime_matches_numpy_dequantization(tmp_path, bits, asymmetric, layout):
    w = np.random.default_rng(bits).standard_t(4, size=(64, 24)).astype(np.float32)
    model, qt = _dq_model(w, bits, asymmetric, *layout)
    path = tmp_path / "dq.onnx"
    ir.save(model, path)
    onnx.checker.check_model(str(path), full_check=True)
    x = np.random.default_rng(0).normal(size=(1, 64)).astype(np.float32)
    result = run(make_session(path, accuracy_level=0), {"x": x})
    w_dq = result[model.graph.outputs[0].name]
    assert np.array_equal(w_dq, dequantize(qt))
    np.testing.assert_allclose(result["y"], x @ dequantize(qt), rtol=1e-5, atol=1e-5)
