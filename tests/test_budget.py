"""compress under a budget: --target-size, --target-bits, --min-fidelity (the bit allocator
on the digits CNN)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from conftest import MODELS
from test_cli import _one_line_error, invoke

from onnxcomp.budget import parse_size
from onnxcomp.fidelity import mean_cosine
from onnxcomp.session import InferenceSession

DIGITS = MODELS / "digits_cnn.onnx"
CALIB = MODELS / "digits_calib.npz"
EVAL = MODELS / "digits_eval.npz"


def _compress(tmp_path, name, *args):
    out, report = tmp_path / name, tmp_path / (name + ".json")
    result = invoke("compress", DIGITS, *args, "--calib", CALIB, "-o", out, "--report-json", report, "-q")
    assert result.exit_code == 0, result.output
    return out, json.loads(report.read_text())


def _eval_cosine(path) -> float:
    feeds = {"image": np.load(EVAL)["image"]}
    return mean_cosine(InferenceSession(DIGITS).run(None, feeds)[0], InferenceSession(path).run(None, feeds)[0])


@pytest.mark.parametrize("size, args", [(25_000, []), (20_000, ["--entropy-code"])])
def test_target_size_is_hit_within_two_percent(tmp_path, size, args):
    out, report = _compress(tmp_path, "q.onnxc" if args else "q.onnx", "--target-size", size, *args)
    assert 0.98 * size <= out.stat().st_size <= size
    assert "bit allocation" in report["totals"] and report["options"]["bits_plan"]
    assert len({bits for bits in report["options"]["bits_plan"].values()}) > 1  # mixed precision, not one width
    assert _eval_cosine(out) > 0.99


def test_target_bits_is_an_average_over_the_layers(tmp_path):
    out, report = _compress(tmp_path, "q.onnx", "--target-bits", 3.5)
    layers = [r for r in report["layers"] if r["name"] in report["options"]["bits_plan"]]
    bits = 8 * sum(r["bytes_after"] for r in layers) / sum(np.prod(r["shape"]) for r in layers)
    assert 3.3 <= bits <= 3.5
    props = {p.key: p.value for p in onnx.load(out).metadata_props}
    assert json.loads(props["onnxcomp.options"])["bits_plan"] == report["options"]["bits_plan"]


def test_min_fidelity_holds_on_the_evaluation_inputs_in_a_smaller_file(tmp_path):
    out, report = _compress(tmp_path, "q.onnx", "--min-fidelity", 0.995, "--eval", EVAL)
    assert _eval_cosine(out) >= 0.995
    eight, _ = _compress(tmp_path, "q8.onnx", "--bits", 8)
    assert out.stat().st_size < 0.8 * eight.stat().st_size


def test_allocated_bits_beat_one_width_at_the_same_size(tmp_path):
    """At the size of the uniform 4-bit file, the allocator's file is closer to FP32."""
    uniform, _ = _compress(tmp_path, "u4.onnx", "--bits", 4)
    allocated, _ = _compress(tmp_path, "a.onnx", "--target-size", uniform.stat().st_size)
    assert allocated.stat().st_size <= uniform.stat().st_size
    assert _eval_cosine(allocated) > _eval_cosine(uniform)


def test_an_unreachable_budget_leaves_the_target_as_it_was(tmp_path):
    out = tmp_path / "q.onnx"
    out.write_bytes(b"an earlier file")
    _one_line_error(invoke("compress", DIGITS, "--target-size", 10_000, "--calib", CALIB, "-o", out, "-q"),
                    "--target-size", "cannot be met")
    assert out.read_bytes() == b"an earlier file"
    assert [p.name for p in tmp_path.iterdir()] == ["q.onnx"]  # no trial left behind


def test_budget_options_are_checked(tmp_path):
    out = tmp_path / "q.onnx"
    _one_line_error(invoke("compress", DIGITS, "--target-size", "1MB", "--target-bits", 3, "-o", out), "one of")
    _one_line_error(invoke("compress", DIGITS, "--min-fidelity", 0.99, "-o", out), "--eval")
    _one_line_error(invoke("compress", DIGITS, "--eval", EVAL, "-o", out), "--min-fidelity")
    _one_line_error(invoke("compress", DIGITS, "--target-size", "ten", "-o", out), "not a size")
    assert (parse_size("9.5MB"), parse_size("2KiB"), parse_size("123")) == (9_500_000, 2048, 123)


def test_the_allocator_chooses_block_sizes_too(tmp_path):
    out, report = _compress(tmp_path, "q.onnx", "--target-size", 22_000, "--block-size", 16, "--alloc-blocks", 64)
    assert out.stat().st_size <= 22_000
    assert 64 in report["options"]["block_plan"].values()  # the larger blocks' fewer scales bought something
    by_name = {r["name"]: r["granularity"] for r in report["layers"]}
    assert all(by_name[name] == f"block{size}" for name, size in report["options"]["block_plan"].items())


def test_a_stored_sensitivity_table_gives_the_same_file_without_measuring(tmp_path):
    table = tmp_path / "s.json"
    result = invoke("sensitivity", DIGITS, "--calib", CALIB, "--calib-samples", 128, "--json", table, "-q")
    assert result.exit_code == 0, result.output
    measured, _ = _compress(tmp_path, "a.onnx", "--target-size", 25_000)
    stored, report = _compress(tmp_path, "b.onnx", "--target-size", 25_000, "--sensitivity", table)
    assert stored.read_bytes() == measured.read_bytes()
    assert "bit allocation" in report["totals"]


def test_a_stored_table_must_match_the_options_and_the_model(tmp_path):
    table = tmp_path / "s.json"
    assert invoke("sensitivity", DIGITS, "--calib", CALIB, "--asymmetric", "--json", table, "-q").exit_code == 0
    out = tmp_path / "q.onnx"
    _one_line_error(invoke("compress", DIGITS, "--target-size", 25_000, "--sensitivity", table, "-o", out, "-q"),
                    "asymmetric", "measure it with these options")
    crnn = MODELS / "digits_crnn.onnx"
    other = tmp_path / "crnn.json"
    assert invoke("sensitivity", crnn, "--calib", MODELS / "crnn_calib.npz", "--json", other, "-q").exit_code == 0
    out.write_bytes(b"an earlier file")
    _one_line_error(invoke("compress", DIGITS, "--target-size", 25_000, "--sensitivity", other, "--calib", CALIB,
                           "-o", out, "-q"), "layers this model does not have")
    assert out.read_bytes() == b"an earlier file"
    (tmp_path / "bad.json").write_text("{}")
    _one_line_error(invoke("compress", DIGITS, "--target-size", 25_000, "--sensitivity", tmp_path / "bad.json", "-o", out),
                    "not a sensitivity table")
    _one_line_error(invoke("compress", DIGITS, "--sensitivity", table, "-o", out), "is for a budget")


def test_the_allocator_on_a_model_with_an_lstm(tmp_path):
    """A recurrent layer's per-channel scales are stored as blocks as long as a row: not a block size to plan."""
    out = tmp_path / "q.onnx"
    result = invoke("compress", MODELS / "digits_crnn.onnx", "--target-bits", 4, "--calib", MODELS / "crnn_calib.npz",
                    "-o", out, "--report-json", tmp_path / "r.json", "-q")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert {"/lstm/LSTM:W", "/lstm/LSTM:R"} <= set(report["options"]["bits_plan"])
    assert not set(report["options"]["block_plan"]) & {"/lstm/LSTM:W", "/lstm/LSTM:R"}
