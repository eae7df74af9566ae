"""--target portable writes standard operators with positive scales and decodes to the same
weights as --target onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import numpy_helper

from conftest import MODELS
from onnxcomp.stored_weights import stored_weights
from test_cli import invoke


def _scales(path) -> list[np.ndarray]:
    model = onnx.load(path)
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return [values[n.input[1]] for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[1] in values]


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_portable_scales_are_positive_and_decode_the_same(tmp_path, bits):
    source = MODELS / "digits_cnn.onnx"
    fast, portable = tmp_path / "fast.onnx", tmp_path / "portable.onnx"
    for target, out in (("onnxruntime", fast), ("portable", portable)):
        assert invoke("compress", source, "--bits", bits, "--target", target, "-o", out, "-q", "--no-check").exit_code == 0
    assert any((s < 0).any() for s in _scales(fast))  # the full symmetric grid does make negative ones
    assert all((s > 0).all() for s in _scales(portable))
    decoded = {kind: {w.name: w.weight for w in stored_weights(ir.load(str(path)).graph)}
               for kind, path in (("fast", fast), ("portable", portable))}
    assert decoded["fast"].keys() == decoded["portable"].keys() and len(decoded["fast"]) >= 3
    for name, weight in decoded["fast"].items():  # equal values (a zero may change sign)
        np.testing.assert_array_equal(decoded["portable"][name], weight)
