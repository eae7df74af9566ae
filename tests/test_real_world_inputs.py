"""Models in the shapes real exporters write, each of which once crashed onnxcomp or
damaged what it wrote: every one must compress, or be refused in one line."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import numpy_helper

from onnxcomp.stored_weights import stored_weights

import graphs
from conftest import MODELS, op_count, outputs
from test_cli import _one_line_error, invoke

DIGITS = MODELS / "digits_cnn.onnx"


def _save(model: onnx.ModelProto, path, **kwargs):
    onnx.save(model, path, **kwargs)
    return path


def test_fold_bn_through_a_chain_of_conv_bn_pairs(tmp_path):
    # The second fold replaces the Conv that consumed the first BatchNorm's output.
    source = _save(graphs.conv_bn_chain(), tmp_path / "chain.onnx")
    out = tmp_path / "q8.onnx"
    result = invoke("compress", source, "--bits", 8, "-o", out, "-q")
    assert result.exit_code == 0, result.output
    assert op_count(out, "BatchNormalization") == 0 and op_count(out, "DequantizeLinear") == 2
    x = {"x": np.random.default_rng(0).normal(size=(1, 3, 8, 8)).astype(np.float32)}
    ref, got = outputs(source, x)["y"], outputs(out, x)["y"]
    assert np.abs(ref - got).max() < 0.02 * np.abs(ref).max()


def test_batchnorm_with_negative_variance_is_refused(tmp_path):
    source = _save(graphs.conv_bn_chain(variance=-1.0), tmp_path / "neg.onnx")
    _one_line_error(invoke("compress", source, "-o", tmp_path / "o.onnx"), "running variance", "BatchNormalization")
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_external_data_from_another_working_directory(tmp_path, monkeypatch, bits):
    folder = tmp_path / "model"
    folder.mkdir()
    source = _save(onnx.load(DIGITS), folder / "m.onnx", save_as_external_data=True, location="m.onnx_data",
                   size_threshold=0)  # every tensor external, the small ones too
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    out = tmp_path / "q.onnx"
    result = invoke("compress", source, "--bits", bits, "-o", out, "-q")
    assert result.exit_code == 0, result.output
    feeds = {"image": np.load(MODELS / "digits_eval.npz")["image"][:16]}
    assert outputs(out, feeds)["logits"].shape == (16, 10)


def test_nonfinite_constant_that_no_layer_multiplies_is_kept(tmp_path):
    source = _save(graphs.masked(), tmp_path / "masked.onnx")
    out = tmp_path / "q.onnx"
    result = invoke("compress", source, "--bits", 8, "-o", out, "-q")
    assert result.exit_code == 0, result.output
    x = {"x": np.random.default_rng(0).normal(size=(4, 16)).astype(np.float32)}
    ref, got = outputs(source, x)["y"], outputs(out, x)["y"]
    assert np.isneginf(got[:, 3]).all() and np.isneginf(ref[:, 3]).all()
    finite = np.isfinite(ref)
    assert np.abs(ref[finite] - got[finite]).max() < 0.02 * np.abs(ref[finite]).max()


def test_nonfinite_weight_of_a_layer_is_still_refused(tmp_path):
    model = graphs.masked()
    w = numpy_helper.to_array(model.graph.initializer[0]).copy()
    w[2, 2] = np.inf
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "w"))
    _one_line_error(invoke("compress", _save(model, tmp_path / "m.onnx"), "-o", tmp_path / "o.onnx"), "'w'", "NaN/Inf")


def test_verify_of_models_with_different_inputs_is_one_line(tmp_path):
    other = _save(graphs.masked(), tmp_path / "other.onnx")
    _one_line_error(invoke("verify", DIGITS, other), "inputs", "differ")


def test_verify_fp32_against_fp16(tmp_path):
    half = graphs.parsed(
        graphs.MASKED.replace("float[", "float16["),
        {"w": numpy_helper.to_array(graphs.masked().graph.initializer[0]).astype(np.float16),
         "mask": np.zeros(8, np.float16)},
    )
    full = graphs.masked()
    full.graph.initializer[1].CopyFrom(numpy_helper.from_array(np.zeros(8, np.float32), "mask"))
    result = invoke("verify", _save(full, tmp_path / "fp32.onnx"), _save(half, tmp_path / "fp16.onnx"), "--json")
    assert result.exit_code == 0, result.output
    assert 0.999 < json.loads(result.output)["outputs"][0]["cosine"] <= 1.0


def test_decoder_with_kv_cache_without_calibration(tmp_path):
    # Synthetic feeds must size past, new and total lengths consistently.
    source = _save(graphs.decoder(), tmp_path / "decoder.onnx")
    out = tmp_path / "q4.onnx"
    result = invoke("compress", source, "--bits", 4, "--rounding", "optq", "-o", out, "-q")
    assert result.exit_code == 0, result.output
    checked = invoke("verify", source, out, "--json")
    assert checked.exit_code == 0, checked.output
    feeds = graphs.decoder_feeds()
    ref, got = outputs(source, feeds), outputs(out, feeds)
    assert got["present_key"].shape == (2, 2, 7, 8)
    cos = np.sum(ref["logits"] * got["logits"]) / np.linalg.norm(ref["logits"]) / np.linalg.norm(got["logits"])
    assert cos > 0.97


def test_tied_embedding_is_quantized_once(tmp_path):
    source = _save(graphs.decoder(), tmp_path / "decoder.onnx")
    out, report = tmp_path / "q8.onnx", tmp_path / "r.json"
    assert invoke("compress", source, "--bits", 8, "-o", out, "--report-json", report, "-q").exit_code == 0
    model = onnx.load(out)
    assert "embed" not in {i.name for i in model.graph.initializer}  # no float copy left
    decoders = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0].startswith("embed")]
    assert len(decoders) == 1
    readers = [n.op_type for n in model.graph.node if decoders[0].output[0] in n.input]
    assert sorted(readers) == ["Gather", "Transpose"]
    assert "read by 2 layers" in report.read_text()
    feeds = graphs.decoder_feeds()
    ref, got = outputs(source, feeds)["logits"], outputs(out, feeds)["logits"]
    assert np.abs(ref - got).max() < 0.02 * np.abs(ref).max()


def test_weight_read_along_different_axes_stays_float(tmp_path):
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 16] x) => (float[N, 16] y) {
        a = MatMul(x, w)
        wt = Transpose<perm = [1, 0]>(w)
        y = MatMul(a, wt)
    }
    """
    source = _save(graphs.parsed(text, {"w": (16, 16)}), tmp_path / "m.onnx")
    out, report = tmp_path / "q.onnx", tmp_path / "r.json"
    assert invoke("compress", source, "-o", out, "--report-json", report, "-q").exit_code == 0
    assert "different axes" in report.read_text() and op_count(out, "DequantizeLinear") == 0


def test_already_quantized_input_is_refused(tmp_path):
    q4 = tmp_path / "q4.onnx"
    assert invoke("compress", DIGITS, "--bits", 4, "-o", q4, "-q").exit_code == 0
    _one_line_error(invoke("compress", q4, "-o", tmp_path / "again.onnx"), "already quantized", "DequantizeLinear", "pack")
    assert not (tmp_path / "again.onnx").exists()


def test_entropy_code_refuses_an_onnx_name(tmp_path):
    _one_line_error(invoke("compress", DIGITS, "--entropy-code", "-o", tmp_path / "y.onnx"), "y.onnx", ".onnxc")
    assert not (tmp_path / "y.onnx").exists()
    q = tmp_path / "q.onnx"
    invoke("compress", DIGITS, "-o", q, "-q")
    _one_line_error(invoke("pack", q, "-o", tmp_path / "z.onnx"), ".onnxc")


def test_magr_alpha_must_be_finite(tmp_path):
    _one_line_error(invoke("compress", DIGITS, "--magr", "--magr-alpha", "inf", "-o", tmp_path / "o.onnx"), "--magr-alpha inf")


@pytest.mark.parametrize("free", [-1, 0])
def test_batch_declared_as_minus_one_or_zero_is_free(tmp_path, free):
    model = onnx.load(DIGITS)
    model.graph.input[0].type.tensor_type.shape.dim[0].Clear()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = free
    source = _save(model, tmp_path / "m.onnx")
    out = tmp_path / "q.onnx"
    result = invoke("compress", source, "--bits", 4, "--rounding", "optq", "--calib", MODELS / "digits_calib.npz",
                    "--calib-batch", 6, "-o", out, "-q")
    assert result.exit_code == 0, result.output
    assert invoke("verify", source, out).exit_code == 0


@pytest.mark.parametrize("op, gates", [("LSTM", 4), ("GRU", 3), ("RNN", 1)])
@pytest.mark.parametrize("bits, tolerance", [(8, 0.01), (4, 0.2)])
def test_recurrent_weights_are_quantized_per_gate_unit_and_direction(tmp_path, op, gates, bits, tolerance):
    rng = np.random.default_rng(0)
    inputs, hidden = 12, 16
    weights = {"W": (rng.normal(size=(2, gates * hidden, inputs)) * 0.3).astype(np.float32),
               "R": (rng.normal(size=(2, gates * hidden, hidden)) * 0.3).astype(np.float32),
               "B": (rng.normal(size=(2, 2 * gates * hidden)) * 0.1).astype(np.float32)}
    weights["W"][1] *= 4  # the second direction's range is four times the first's: it needs its own scales
    node = onnx.helper.make_node(op, ["x", "W", "R", "B"], ["y"], hidden_size=hidden, direction="bidirectional", name="rnn")
    graph = onnx.helper.make_graph(
        [node], "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["T", "N", inputs])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["T", 2, "N", hidden])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()])
    source = _save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 14)], ir_version=8),
                   tmp_path / "rnn.onnx")
    out, report = tmp_path / "q.onnx", tmp_path / "r.json"
    assert invoke("compress", source, "--bits", bits, "-o", out, "--report-json", report, "-q").exit_code == 0
    model = onnx.load(out)
    stored = {i.name: i for i in model.graph.initializer}
    assert {"W", "R"}.isdisjoint(stored) and "B" in stored  # biases stay float
    scales = [numpy_helper.to_array(stored[n]) for n in ("W_scale", "R_scale")]
    assert scales[0].shape == (2, gates * hidden, 1)  # per gate unit and direction
    assert abs(scales[0][1]).mean() > 3 * abs(scales[0][0]).mean()
    rows = json.loads(report.read_text())["layers"]
    assert [r["bits"] for r in rows] == [bits, bits]
    assert all(r["bytes_after"] < r["bytes_before"] * (0.35 if bits == 8 else 0.22) for r in rows)
    x = {"x": rng.normal(size=(7, 3, inputs)).astype(np.float32)}
    ref, got = outputs(source, x)["y"], outputs(out, x)["y"]
    assert np.linalg.norm(ref - got) < tolerance * np.linalg.norm(ref)  # relative L2 error


def _bidirectional(op: str, gates: int, rng, inputs: int = 12, hidden: int = 16, **attrs) -> onnx.ModelProto:
    weights = {"W": (rng.normal(size=(2, gates * hidden, inputs)) * 0.3).astype(np.float32),
               "R": (rng.normal(size=(2, gates * hidden, hidden)) * 0.3).astype(np.float32),
               "B": (rng.normal(size=(2, 2 * gates * hidden)) * 0.1).astype(np.float32)}
    node = onnx.helper.make_node(op, ["x", "W", "R", "B"], ["y"], hidden_size=hidden, direction="bidirectional",
                                 name="rnn", **attrs)
    graph = onnx.helper.make_graph(
        [node], "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["T", "N", inputs])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["T", 2, "N", hidden])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()])
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 14)], ir_version=8)


@pytest.mark.parametrize("op, gates, attrs, with_r", [("LSTM", 4, {}, True), ("GRU", 3, {"linear_before_reset": 1}, True),
                                                      ("GRU", 3, {}, False), ("RNN", 1, {}, True)])
def test_recurrent_weights_get_statistics_for_optq_magr_and_bias_correction(tmp_path, op, gates, attrs, with_r):
    """W sees the input sequence, R the hidden states (GRU's R only with linear_before_reset:
    otherwise it multiplies r⊙h, which the node does not output)."""
    rng = np.random.default_rng(1)
    source = _save(_bidirectional(op, gates, rng, **attrs), tmp_path / "rnn.onnx")
    calib = tmp_path / "calib.npz"
    # Correlated features (as real inputs are) give OPTQ something to balance; the first
    # axis is time: 4 runs of 9 steps.
    x = rng.normal(size=(36, 16, 4)) @ rng.normal(size=(4, 12)) + 0.1 * rng.normal(size=(36, 16, 12))
    np.savez(calib, x=x.astype(np.float32))
    rows = {}
    for name, args in (("rtn", []), ("optq", ["--rounding", "optq"]), ("magr", ["--magr"])):
        report = tmp_path / f"{name}.json"
        result = invoke("compress", source, "--bits", 3, *args, "--calib", calib, "--calib-batch", 9,
                        "-o", tmp_path / f"{name}.onnx", "--report-json", report, "-q")
        assert result.exit_code == 0, result.output
        rows[name] = json.loads(report.read_text())
    names = [r["name"] for r in rows["rtn"]["layers"]]
    assert names == ["rnn:W", "rnn:R"]
    measured = names if with_r else names[:1]
    for row in rows["rtn"]["layers"]:
        assert (row["output_error"] is not None) == (row["name"] in measured)
    for rtn, optq in zip(rows["rtn"]["layers"], rows["optq"]["layers"]):
        if rtn["name"] in measured:
            assert optq["output_error"] < 0.8 * rtn["output_error"], (rtn["name"], optq["output_error"], rtn["output_error"])
        else:
            assert "no input statistics" in optq["note"]
    assert [m["name"] for m in rows["magr"]["magr"]] == measured
    assert all(m["max_after"] < m["max_before"] for m in rows["magr"]["magr"])


def test_recurrent_bias_correction_cancels_the_mean_shift_of_each_half(tmp_path):
    """W's mean output shift goes to Wb, R's to Rb (B is [directions, Wb | Rb])."""
    rng = np.random.default_rng(2)
    source = _save(_bidirectional("RNN", 1, rng), tmp_path / "rnn.onnx")
    x = rng.normal(loc=0.5, size=(36, 16, 12)).astype(np.float32)  # an offset mean makes the shift visible
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=x)  # the first axis is time: 4 runs of 9 steps
    out = tmp_path / "q.onnx"
    result = invoke("compress", source, "--bits", 3, "--bias-correction", "--calib", calib, "--calib-batch", 9,
                    "-o", out, "-q")
    assert result.exit_code == 0, result.output
    before = {t.name: numpy_helper.to_array(t) for t in onnx.load(source).graph.initializer}
    model = ir.load(out)
    w_hat = [s.weight for s in stored_weights(model.graph) if s.name.startswith("W_")][0]
    b_hat = model.graph.initializers["B"].const_value.numpy()
    mean_x = x.reshape(-1, 12).astype(np.float64).mean(axis=0)
    for d in range(2):  # E[x]·Ŵᵀ + Ŵb equals E[x]·Wᵀ + Wb
        np.testing.assert_allclose(mean_x @ w_hat[d].T + b_hat[d, :16], mean_x @ before["W"][d].T + before["B"][d, :16],
                                   atol=1e-4)
    assert np.abs(b_hat - before["B"]).max() > 1e-3  # something was corrected
    assert np.abs(b_hat[:, 16:] - before["B"][:, 16:]).max() > 1e-3  # R's half too


def test_act_bits_with_calibration_images_of_three_widths(tmp_path):
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 3, 32, W] image) => (float[N, 10] logits) {
        a = Conv<pads = [1, 1, 1, 1]>(image, w1)
        b = Relu(a)
        c = Conv<pads = [1, 1, 1, 1], strides = [2, 2]>(b, w2)
        d = Relu(c)
        e = GlobalAveragePool(d)
        f = Flatten(e)
        logits = Gemm<transB = 1>(f, w3)
    }
    """
    source = _save(graphs.parsed(text, {"w1": (16, 3, 3, 3), "w2": (32, 16, 3, 3), "w3": (10, 32)}), tmp_path / "m.onnx")
    calib = tmp_path / "calib"
    calib.mkdir()
    rng = np.random.default_rng(0)
    for i, width in enumerate((40, 57, 96)):  # recognizer crops of different widths
        np.savez(calib / f"{i}.npz", image=rng.normal(size=(4, 3, 32, width)).astype(np.float32))
    out = tmp_path / "q.onnx"
    result = invoke("compress", source, "--act-bits", 8, "--calib", calib, "-o", out, "-q")
    assert result.exit_code == 0, result.output
    assert op_count(out, "QuantizeLinear") >= 3
    x = {"image": rng.normal(size=(2, 3, 32, 71)).astype(np.float32)}
    ref, got = outputs(source, x)["logits"], outputs(out, x)["logits"]
    assert np.linalg.norm(ref - got) < 0.05 * np.linalg.norm(ref)
