"""The zoo's real pretrained models at 8 and 4 bits, against their own FP32 outputs on
evaluation data disjoint from the calibration data, with floors a broken pass would miss."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import zoo
from conftest import ZOO_TALLY
from onnxcomp import QuantConfig
from onnxcomp.pipeline import compress_model
from onnxcomp.calibration.analysis import Calibration
from onnxcomp.modelio import load_model, save_model

pytestmark = pytest.mark.slow
WINDOWS = 4  # evaluation windows of 256 tokens: 1,020 predicted tokens


def _session(path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")  # float compute
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _compressed(source, output, calib=None, **options):
    model, report = compress_model(load_model(source), QuantConfig(**options),
                             calibration=Calibration(str(calib)) if calib else None)
    save_model(model, output)
    ZOO_TALLY["compressed"] += 1
    return report


@pytest.fixture(scope="module")
def lm_eval(smollm2):
    ids = np.load(smollm2.eval)["input_ids"][:WINDOWS]
    return ids, zoo.run_batched(_session(smollm2.path), {"input_ids": ids}, 2)


@pytest.mark.parametrize("name, options, calibrated, max_ppl_rise, min_top1, max_ratio", [
    ("rtn8", {"bits": 8}, False, 0.02, 0.95, 0.27),
    ("optq4 b32 asym", {"bits": 4, "granularity": "block", "block_size": 32, "asymmetric": True, "rounding": "optq",
                        "gather_bits": 8}, True, 0.25, 0.75, 0.2),
])
def test_smollm2(tmp_path, smollm2, lm_eval, name, options, calibrated, max_ppl_rise, min_top1, max_ratio):
    ids, reference = lm_eval
    out = tmp_path / "q.onnx"
    report = _compressed(smollm2.path, out, smollm2.calib if calibrated else None, **options)
    assert sum(1 for r in report.layers if r.bits) == 1 + 30 * 7  # the tied table and every linear layer
    metrics = zoo.language_model_metrics(reference, zoo.run_batched(_session(out), {"input_ids": ids}, 2), ids)
    fp32 = zoo.language_model_metrics(reference, reference, ids)["perplexity"]
    assert metrics["perplexity"] <= fp32 * (1 + max_ppl_rise), (name, metrics, fp32)
    assert metrics["top1"] >= min_top1, (name, metrics)
    assert out.stat().st_size < smollm2.path.stat().st_size * max_ratio


def test_smollm2_tied_table_is_stored_once(tmp_path, smollm2):
    portable, packed = tmp_path / "portable.onnx", tmp_path / "packed.onnx"
    _compressed(smollm2.path, portable, bits=4, granularity="block", block_size=32, target="portable")
    graph = onnx.load(portable, load_external_data=False).graph
    assert "model.embed_tokens.weight" not in {i.name for i in graph.initializer}
    decode = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0].startswith("model.embed_tokens")]
    assert len(decode) == 1
    readers = sorted(n.op_type for n in graph.node if decode[0].output[0] in n.input)
    assert readers == ["Gather", "Transpose"]
    _compressed(smollm2.path, packed, bits=4, granularity="block", block_size=32)  # --target onnxruntime
    graph = onnx.load(packed, load_external_data=False).graph
    table = [i.name for i in graph.initializer if i.name.startswith("model.embed_tokens") and i.name.endswith("_nbits")]
    readers = [n for n in graph.node for name in table if name in n.input]
    assert sorted(n.op_type for n in readers) == ["MatMulNBits", "Reshape"]  # the codes stored once
    rows = next(n for n in readers if n.op_type == "Reshape").output[0]
    assert [n.op_type for n in graph.node if rows in n.input] == ["GatherBlockQuantized"]
    assert "model.embed_tokens.weight" not in {i.name for i in graph.initializer}
    assert packed.stat().st_size <= 1.01 * portable.stat().st_size


def test_smollm2_untied_head_quantized(tmp_path, smollm2, lm_eval):
    ids, reference = lm_eval
    out = tmp_path / "q.onnx"
    for level, least in ((None, 0.95), (4, 0.93)):  # the default float compute; int8 activations
        report = _compressed(smollm2.variant("smollm2_untied.onnx"), out, bits=8, accuracy_level=level)
        assert any(r.name == "lm_head" and r.bits == 8 for r in report.layers)
        got = zoo.run_batched(_session(out), {"input_ids": ids}, 2)
        assert zoo.language_model_metrics(reference, got, ids)["top1"] >= least


def test_smollm2_with_kv_cache_runs_prefill_and_decode(tmp_path, smollm2):
    """The cache export, compressed without calibration data (synthetic feeds size past,
    new and total lengths consistently), decodes token by token as the quantized window
    model computes the same tokens at once (the codes are the same)."""
    cached, window = tmp_path / "kv.onnx", tmp_path / "w.onnx"
    _compressed(smollm2.variant("smollm2_kv.onnx"), cached, bits=4, granularity="block", block_size=32, rounding="nearest")
    _compressed(smollm2.path, window, bits=4, granularity="block", block_size=32)
    ids = np.load(smollm2.eval)["input_ids"][0, :12]
    full = _session(window).run(None, {"input_ids": ids[None]})[0][0]
    session = _session(cached)
    names = [o.name for o in session.get_outputs()]
    prefill = 9
    feeds = {"input_ids": ids[None, :prefill], "attention_mask": np.ones((1, prefill), np.int64),
             "position_ids": np.arange(prefill)[None]}
    for layer in range(30):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{layer}.{kind}"] = np.zeros((1, 3, 0, 64), np.float32)
    out = dict(zip(names, session.run(None, feeds)))
    np.testing.assert_allclose(out["logits"][0], full[:prefill], atol=2e-3)
    for position in range(prefill, len(ids)):
        feeds = {"input_ids": ids[None, position : position + 1], "attention_mask": np.ones((1, position + 1), np.int64),
                 "position_ids": np.array([[position]])}
        feeds |= {f"past_key_values.{i}.{k}": out[f"present.{i}.{k}"] for i in range(30) for k in ("key", "value")}
        out = dict(zip(names, session.run(None, feeds)))
        np.testing.assert_allclose(out["logits"][0, 0], full[position], atol=2e-3)


@pytest.fixture(scope="module")
def image_eval(efficientnet):
    images = {"image": np.load(efficientnet.eval)["image"]}
    return images, zoo.run_batched(_session(efficientnet.path), images, 32)


@pytest.mark.parametrize("variant", ["efficientnet_lite0.onnx", "efficientnet_lite0_bn.onnx"])
def test_efficientnet_8_bits(tmp_path, efficientnet, image_eval, variant):
    images, reference = image_eval
    out = tmp_path / "q.onnx"
    report = _compressed(efficientnet.variant(variant), out, bits=8)
    assert sum(1 for r in report.layers if r.bits) == 50  # 49 Conv and the Gemm: BatchNorms folded first
    metrics = zoo.classification_metrics(reference, zoo.run_batched(_session(out), images, 32))
    # Most photographs here are no ImageNet class (textures, the moon, a page of text), so
    # the top class is often a near tie; top-5 is the steadier floor.
    assert metrics["top5"] >= 0.99 and metrics["top1"] >= 0.85, metrics


def test_efficientnet_8_bits_optq_and_4_bits(tmp_path, efficientnet, image_eval):
    images, reference = image_eval
    results = {}
    for name, options in {
        "optq8": {"bits": 8, "rounding": "optq"},
        "optq4": {"bits": 4, "rounding": "optq", "asymmetric": True, "bias_correction": True},
        "rtn4": {"bits": 4},
    }.items():
        out = tmp_path / f"{name}.onnx"
        _compressed(efficientnet.path, out, efficientnet.calib if name != "rtn4" else None, **options)
        results[name] = zoo.classification_metrics(reference, zoo.run_batched(_session(out), images, 32))
    assert results["optq8"]["top1"] >= 0.93 and results["optq8"]["top5"] >= 0.99, results
    # 4 bits per channel: OPTQ with bias correction far above round-to-nearest, which collapses.
    assert results["optq4"]["top1"] >= 0.45 and results["optq4"]["top5"] >= 0.85, results
    assert results["rtn4"]["top1"] < results["optq4"]["top1"] - 0.2, results
