"""The digits CNN (BatchNorm, depthwise Conv, Gemm): accuracy, validity, size and determinism."""

from __future__ import annotations

import hashlib

import onnx
import pytest
from digits_accuracy import accuracy

from conftest import MODELS, compress_to, op_count

SOURCE = MODELS / "digits_cnn.onnx"


@pytest.fixture(scope="module")
def fp32_accuracy() -> float:
    return accuracy(SOURCE)


@pytest.mark.parametrize("bits, allowed_drop", [(8, 0.005), (4, 0.03)])
def test_heldout_accuracy_per_channel(tmp_path, fp32_accuracy, bits, allowed_drop):
    target = tmp_path / f"q{bits}.onnx"
    compress_to(SOURCE, target, bits=bits)
    assert fp32_accuracy > 0.95
    assert accuracy(target) >= fp32_accuracy - allowed_drop


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("options", [{"granularity": "tensor"}, {"granularity": "channel"}, {"granularity": "block", "block_size": 16}, {"asymmetric": True}])
def test_every_combination_is_valid_and_runs(tmp_path, bits, options):
    target = tmp_path / "q.onnx"
    report = compress_to(SOURCE, target, bits=bits, **options)
    onnx.checker.check_model(str(target), full_check=True)
    assert op_count(target, "BatchNormalization") == 0
    assert op_count(target, "DequantizeLinear") == sum(1 for r in report.layers if r.bits) == 6
    assert accuracy(target) > 0.1 if bits == 2 else accuracy(target) > 0.9


def test_size_shrinks_with_bits(tmp_path):
    sizes = {}
    for bits in (8, 4, 2):
        compress_to(SOURCE, tmp_path / f"q{bits}.onnx", bits=bits, granularity="channel")
        sizes[bits] = (tmp_path / f"q{bits}.onnx").stat().st_size
    fp32 = SOURCE.stat().st_size
    assert sizes[8] < 0.3 * fp32 and sizes[4] < 0.17 * fp32 and sizes[2] < 0.11 * fp32


def test_same_input_same_bytes(tmp_path):
    digests = set()
    for name in ("a.onnx", "b.onnx"):
        compress_to(SOURCE, tmp_path / name, bits=4, granularity="block", block_size=16)
        digests.add(hashlib.sha256((tmp_path / name).read_bytes()).hexdigest())
    assert len(digests) == 1


def test_keep_first_last_bits(tmp_path):
    report = compress_to(SOURCE, tmp_path / "q.onnx", bits=2, keep_first_last_bits=8)
    assert [r.bits for r in report.layers] == [8, 2, 2, 2, 2, 8]


def test_exclude_and_min_elements_leave_float(tmp_path):
    report = compress_to(SOURCE, tmp_path / "q.onnx", bits=4, exclude=r"/17/", min_elements=600)
    left = {r.name: r.note for r in report.layers if r.bits is None}
    assert "--exclude" in left.pop("/17/Gemm")
    assert set(left) == {"/0/Conv", "/3/Conv", "/6/Conv"} and all("--min-elements" in n for n in left.values())
    assert op_count(tmp_path / "q.onnx", "DequantizeLinear") == 2
