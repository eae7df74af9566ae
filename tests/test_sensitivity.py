"""onnxcomp sensitivity: each layer quantized alone, measured end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import MODELS
from test_cli import _one_line_error, invoke

from onnxcomp.fidelity import mean_cosine
from onnxcomp.runtime import make_session, run
from onnxcomp.sensitivity import mean_kl

DIGITS = MODELS / "digits_cnn.onnx"
CALIB = MODELS / "digits_calib.npz"


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sensitivity")
    result = invoke("sensitivity", DIGITS, "--calib", CALIB, "--json", folder / "s.json", "--plot", folder / "s.png", "-q")
    assert result.exit_code == 0, result.output
    assert (folder / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return json.loads((folder / "s.json").read_text())


def test_every_layer_at_every_bit_width(table):
    assert table["bits"] == [2, 3, 4, 8] and table["samples"] == 32
    assert [layer["op"] for layer in table["layers"]] == ["Conv"] * 4 + ["Gemm"] * 2
    for layer in table["layers"]:
        points = {p["bits"]: p for p in layer["points"]}
        assert sorted(points) == [2, 3, 4, 8]
        loss = [1 - points[b]["cosine"] for b in (2, 3, 4, 8)]
        assert loss[0] > loss[2] > loss[3] >= 0, (layer["name"], loss)  # fewer bits, more loss
        assert all(p["estimate"] > 0 and p["kl"] >= 0 for p in points.values())  # the output is named logits


@pytest.mark.parametrize("name, bits, args", [("/14/Gemm", 2, []), ("/3/Conv", 3, []),
                                             ("/10/Conv", 2, ["--rounding", "optq"]), ("/14/Gemm", 4, ["--rate-lambda", 0.3])])
def test_a_point_equals_compressing_that_layer_alone(tmp_path, table, name, bits, args):
    """The table's number is what compress gives, rounding as it does, with every other layer left float."""
    if args:
        result = invoke("sensitivity", DIGITS, "--calib", CALIB, "--bits", bits, *args, "--json", tmp_path / "s.json", "-q")
        assert result.exit_code == 0, result.output
        table = json.loads((tmp_path / "s.json").read_text())
    others = "|".join(layer["name"] for layer in table["layers"] if layer["name"] != name)
    out = tmp_path / "one.onnx"
    result = invoke("compress", DIGITS, "--bits", bits, *args, "--exclude", f"^({others})$", "--calib", CALIB,
                    "--calib-samples", 32, "-o", out, "--no-check", "-q")
    assert result.exit_code == 0, result.output
    images = np.load(CALIB)["image"][:32]
    batches = [{"image": images[i:i + 16]} for i in (0, 16)]
    reference, single = make_session(DIGITS), make_session(out)
    pairs = [(run(reference, b)["logits"], run(single, b)["logits"]) for b in batches]
    point = next(p for layer in table["layers"] if layer["name"] == name for p in layer["points"] if p["bits"] == bits)
    assert point["cosine"] == pytest.approx(np.mean([mean_cosine(r, q) for r, q in pairs]), abs=1e-6)
    assert point["kl"] == pytest.approx(np.mean([mean_kl(r, q) for r, q in pairs]), rel=1e-4, abs=1e-9)
    assert point["cosine"] < 1 - 1e-5  # the layer was changed


def test_kl_of_identical_logits_is_zero_and_grows_with_the_change():
    logits = np.random.default_rng(0).normal(size=(4, 10))
    assert mean_kl(logits, logits) == pytest.approx(0, abs=1e-12)
    bump = np.eye(10)[0]  # raise one class's logit
    assert 0 < mean_kl(logits, logits + 0.1 * bump) < mean_kl(logits, logits + bump)
    assert mean_kl(logits, logits + 5.0) == pytest.approx(0, abs=1e-12)  # softmax ignores a common shift


def test_bad_bit_widths_are_one_line(tmp_path):
    _one_line_error(invoke("sensitivity", DIGITS, "--bits", "4,5"), "--bits", "2, 3, 4 or 8")
    _one_line_error(invoke("sensitivity", DIGITS, "--bits", "four"), "--bits")
