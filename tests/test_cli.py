"""The command line as a user meets it: outputs, one-line errors with non-zero exits, safety."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from conftest import MODELS
from onnxcomp.cli import main

DIGITS = MODELS / "digits_cnn.onnx"


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _one_line_error(result, *words):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("onnxcomp: error:"), result.output
    for word in words:
        assert word in lines[0]


def test_compress_prints_table_writes_json_and_keeps_input(tmp_path):
    digest = hashlib.sha256(DIGITS.read_bytes()).hexdigest()
    out, report = tmp_path / "q4.onnx", tmp_path / "report.json"
    result = invoke("compress", DIGITS, "--bits", 4, "-o", out, "--report-json", report)
    assert result.exit_code == 0, result.output
    assert "/14/Gemm" in result.output and "ratio:" in result.output
    data = json.loads(report.read_text())
    assert len(data["layers"]) == 6 and data["totals"]["file size after"] == out.stat().st_size
    assert hashlib.sha256(DIGITS.read_bytes()).hexdigest() == digest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q4.onnx", "report.json"]  # no temporary left


def test_verify_reports_and_gates(tmp_path):
    out = tmp_path / "q.onnx"
    assert invoke("compress", DIGITS, "--bits", 2, "-o", out, "-q").exit_code == 0
    ok = invoke("verify", DIGITS, out, "--inputs", MODELS / "digits_eval.npz", "--json")
    assert ok.exit_code == 0
    cosine = json.loads(ok.output)["outputs"][0]["cosine"]
    assert 0 < cosine < 0.99
    gate = invoke("verify", DIGITS, out, "--inputs", MODELS / "digits_eval.npz", "--min-cosine", 0.99)
    assert gate.exit_code == 1 and "below 0.99" in gate.output
    synthetic = invoke("verify", DIGITS, DIGITS)
    assert synthetic.exit_code == 0 and "synthetic" in synthetic.output and "1.000000" in synthetic.output


def test_inspect_lists_layer_statistics():
    result = invoke("inspect", DIGITS, "--json")
    assert result.exit_code == 0
    stats = json.loads(result.output)["layers"]
    assert len(stats) == 6 and all(s["std"] > 0 and s["max_over_std"] > 1 for s in stats)


def test_inspect_decodes_quantized_weights(tmp_path):
    out = tmp_path / "q.onnx"
    invoke("compress", DIGITS, "--bits", 4, "-o", out, "-q")
    data = json.loads(invoke("inspect", out, "--json").output)
    stats = data["layers"]
    assert {s["storage"] for s in stats} == {"int4"} and len(stats) == 6
    assert data["made"]["options"]["bits"] == 4 and data["made"]["onnxcomp"]
    assert "made by onnxcomp" in invoke("inspect", out).output


def test_missing_file(tmp_path):
    _one_line_error(invoke("compress", tmp_path / "nope.onnx", "-o", tmp_path / "o.onnx"), "no such file")


def test_not_onnx(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_text("this is not a model")
    _one_line_error(invoke("compress", bad, "-o", tmp_path / "o.onnx"), "bad.onnx")


@pytest.mark.parametrize("fraction", [0.3, 0.6, 0.95])
def test_truncated_file(tmp_path, fraction):
    data = DIGITS.read_bytes()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[: int(len(data) * fraction)])
    _one_line_error(invoke("compress", cut, "-o", tmp_path / "o.onnx"), "cut.onnx")


@pytest.mark.parametrize(
    "args, words",
    [
        (("--bits", 5), ("--bits", "5", "2", "8")),
        (("--bits", 4, "--granularity", "block", "--block-size", 48), ("--block-size 48", "power of two")),
        (("--bits", 4, "--granularity", "block", "--block-size", 1024), ("divides none",)),
        (("--exclude", "(["), ("--exclude",)),
    ],
)
def test_bad_options(tmp_path, args, words):
    _one_line_error(invoke("compress", DIGITS, "-o", tmp_path / "o.onnx", *args), *words)


def test_output_equal_to_input(tmp_path):
    copy = tmp_path / "m.onnx"
    copy.write_bytes(DIGITS.read_bytes())
    _one_line_error(invoke("compress", copy, "-o", copy), "is the input file")
    assert copy.read_bytes() == DIGITS.read_bytes()


def test_nan_weight_is_named(tmp_path):
    model = onnx.load(MODELS / "matmul_bn.onnx")
    w = onnx.numpy_helper.to_array(model.graph.initializer[0]).copy()
    w[0, 0] = np.nan
    model.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(w, model.graph.initializer[0].name))
    path = tmp_path / "nan.onnx"
    onnx.save(model, path)
    _one_line_error(invoke("compress", path, "-o", tmp_path / "o.onnx"), repr(model.graph.initializer[0].name), "NaN")


def test_failed_opset_conversion_is_one_line(tmp_path, monkeypatch):
    # onnx.version_converter handled every real model we tried, so its failure is simulated
    # here to check the message a user gets when it does fail on an operator.
    def refuse(model, target):
        raise RuntimeError("No Adapter For GroupNormalization from 20 to 21")

    monkeypatch.setattr(onnx.version_converter, "convert_version", refuse)
    _one_line_error(invoke("compress", DIGITS, "--bits", 4, "-o", tmp_path / "o.onnx"), "GroupNormalization", "13 to 21")


def test_verify_rejects_mismatched_inputs(tmp_path):
    feeds = tmp_path / "feeds.npz"
    np.savez(feeds, pixels=np.zeros((2, 1, 8, 8), np.float32))
    _one_line_error(invoke("verify", DIGITS, DIGITS, "--inputs", feeds), "pixels", "image")
    np.savez(feeds, image=np.zeros((2, 1, 7, 8), np.float32))
    _one_line_error(invoke("verify", DIGITS, DIGITS, "--inputs", feeds), "'image'", "[2, 1, 7, 8]")


def test_calib_info_describes_the_data(tmp_path):
    result = invoke("calib-info", DIGITS, "--calib", MODELS / "digits_calib.npz", "--calib-samples", 100, "--calib-batch", 32)
    assert result.exit_code == 0, result.output
    assert "100 of 128 samples" in result.output
    row = next(line for line in result.output.splitlines() if line.startswith("image"))
    assert row.split()[1:5] == ["float32", "100", "4", "1x8x8"]
    data = json.loads(invoke("calib-info", DIGITS, "--calib", MODELS / "digits_calib.npz", "--json").output)
    assert data["inputs"][0]["samples"] == 128 and data["inputs"][0]["shape_max"] == [1, 8, 8]


def test_compress_w8a8_from_cli(tmp_path):
    out, report = tmp_path / "w8a8.onnx", tmp_path / "r.json"
    result = invoke("compress", DIGITS, "--act-bits", 8, "--calib", MODELS / "digits_calib.npz", "-o", out, "--report-json", report, "-q")
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert "digits_calib.npz" in data["totals"]["calibration"]
    assert sum(1 for r in data["layers"] if r["act_range"]) >= 4
    assert sum(1 for n in onnx.load(out).graph.node if n.op_type == "QuantizeLinear") >= 4


def test_synthetic_calibration_warns_on_stderr(tmp_path):
    result = CliRunner().invoke(main, ["compress", str(DIGITS), "--act-bits", "8", "-o", str(tmp_path / "o.onnx"), "-q"])
    assert result.exit_code == 0, result.stderr
    assert result.stderr.startswith("onnxcomp: warning:") and "--calib" in result.stderr


@pytest.mark.parametrize("args,words", [
    (["--act-bits", "4"], ["--act-bits 4", "choose 8"]),
    (["--act-bits", "8", "--calib", "none"], ["--calib none", "real inputs"]),
    (["--act-bits", "8", "--calib", "MISSING.npz"], ["MISSING.npz", "no such file"]),
    (["--act-bits", "8", "--calib", str(MODELS / "digits_eval_labels.npy")], ["not an .npz"]),
    (["--act-bits", "8", "--mean", "a,b"], ["--mean", "comma-separated"]),
    (["--percentile", "20", "--act-bits", "8"], ["--percentile 20.0"]),
])
def test_bad_calibration_options_are_one_line_errors(tmp_path, args, words):
    _one_line_error(invoke("compress", DIGITS, "-o", tmp_path / "o.onnx", "-q", *args), *words)


def test_help_documents_calibration_options():
    text = invoke("compress", "--help").output
    for option in ("--calib ", "--calib-samples", "--calib-batch", "--image-size", "--layout", "--act-bits", "--act-calib", "--device"):
        assert option in text
    assert "[default: 128]" in text and "[default: minmax]" in text


def test_compress_with_magr_from_cli(tmp_path):
    out, report = tmp_path / "m.onnx", tmp_path / "r.json"
    result = invoke("compress", DIGITS, "--bits", 4, "--magr", "--magr-iters", 50, "--calib", MODELS / "digits_calib.npz",
                    "-o", out, "--report-json", report)
    assert result.exit_code == 0, result.output
    assert "MagR:" in result.output and "max|w| before" in result.output
    data = json.loads(report.read_text())
    assert len(data["magr"]) == 6 and all(m["iterations"] <= 50 and m["max_after"] < m["max_before"] for m in data["magr"])
    _one_line_error(invoke("compress", DIGITS, "--magr", "--magr-alpha", -1, "-o", out), "--magr-alpha -1.0", "positive")


def test_verify_baseline_gates_a_regression(tmp_path):
    good, bad, baseline = tmp_path / "q8.onnx", tmp_path / "q2.onnx", tmp_path / "baseline.json"
    invoke("compress", DIGITS, "--bits", 8, "-o", good, "-q")
    invoke("compress", DIGITS, "--bits", 2, "-o", bad, "-q")
    feeds = MODELS / "digits_eval.npz"
    assert invoke("verify", DIGITS, good, "--inputs", feeds, "--baseline", baseline, "--update-baseline").exit_code == 0
    assert json.loads(baseline.read_text())["outputs"]["logits"]["cosine"] > 0.99
    assert invoke("verify", DIGITS, good, "--inputs", feeds, "--baseline", baseline).exit_code == 0
    failed = invoke("verify", DIGITS, bad, "--inputs", feeds, "--baseline", baseline)
    assert failed.exit_code == 1 and "logits: cosine" in failed.output and "the baseline reached" in failed.output


def test_verbose_prints_debug_events_and_quiet_runs_none(tmp_path):
    loud = invoke("-v", "compress", DIGITS, "--bits", 4, "-o", tmp_path / "a.onnx", "-q")
    assert loud.exit_code == 0, loud.output
    debug = [line for line in loud.output.splitlines() if line.startswith("onnxcomp: debug:")]
    assert any("quantize-weights: modified in" in line for line in debug), loud.output
    plain = invoke("compress", DIGITS, "--bits", 4, "-o", tmp_path / "b.onnx", "-q")
    assert "debug" not in plain.output
