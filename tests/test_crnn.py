"""A CRNN text recognizer (Conv, BatchNorm, a bidirectional LSTM, CTC; models/make_crnn.py):
its recurrent weights are quantized like its convolutions, and it still reads the strings."""

from __future__ import annotations

import json
import sys

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from conftest import MODELS, outputs
from test_cli import invoke

sys.path.insert(0, str(MODELS))
from make_crnn import greedy_decode, string_accuracy  # noqa: E402

CRNN = MODELS / "digits_crnn.onnx"
EVAL = {"image": np.load(MODELS / "crnn_eval.npz")["image"]}
LABELS = np.load(MODELS / "crnn_eval_labels.npy")


@pytest.mark.parametrize("bits, args, max_drop, max_ratio", [
    (8, [], 0.01, 0.3),
    (4, [], 0.05, 0.2),
    (4, ["--granularity", "block", "--block-size", 16, "--asymmetric", "--rounding", "optq", "--calib",
         MODELS / "crnn_calib.npz"], 0.05, 0.25),
])
def test_crnn_reads_strings_after_compression(tmp_path, bits, args, max_drop, max_ratio):
    out, report = tmp_path / "q.onnx", tmp_path / "r.json"
    assert invoke("compress", CRNN, "--bits", bits, *args, "-o", out, "--report-json", report, "-q").exit_code == 0
    rows = json.loads(report.read_text())["layers"]
    lstm = [r for r in rows if r["op"] == "LSTM"]
    assert [r["name"] for r in lstm] == ["/lstm/LSTM:W", "/lstm/LSTM:R"] and all(r["bits"] == bits for r in lstm)
    if "--calib" in args:  # W sees the input sequence, R the hidden states: both measured, both rounded by OPTQ
        assert all(r["output_error"] is not None and "no input statistics" not in r["note"] for r in lstm)
    stored = {t.name: numpy_helper.to_array(t) for t in onnx.load(out).graph.initializer}
    codes = [a for name, a in stored.items() if name.startswith(lstm[0]["weight"]) and name.endswith("_q")]
    assert codes and codes[0].dtype.itemsize == 1 and codes[0].shape == tuple(lstm[0]["shape"])
    assert out.stat().st_size < CRNN.stat().st_size * max_ratio
    reference = outputs(CRNN, EVAL)["log_probs"]
    got = outputs(out, EVAL)["log_probs"]
    exact_fp32, _ = string_accuracy(reference, LABELS)
    exact, _ = string_accuracy(got, LABELS)
    agree = np.mean([a == b for a, b in zip(greedy_decode(reference), greedy_decode(got))])
    assert exact >= exact_fp32 - max_drop and agree >= 1 - 2 * max_drop, (exact, exact_fp32, agree)
