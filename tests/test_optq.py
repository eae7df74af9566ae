"""OPTQ rounding: the kernel's guarantees against round-to-nearest, the pass on every layer
kind and layout (checked in onnxruntime), and its effect on real models."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from onnxcomp import QuantConfig
from onnxcomp.pipeline import compress_model
from onnxcomp.calibration.analysis import Calibration, CalibrationWarning
from onnxcomp.cli import main
from onnxcomp.errors import ConfigError
from onnxcomp.kernels.optq import DynamicBlocks, optq
from onnxcomp.kernels.quantize import expand, grid_for, quantize
from onnxcomp.modelio import load_model, save_model
from onnxcomp.fidelity import mean_cosine

from conftest import MODELS, outputs


def problem(seed: int, rank: int | None, reduction: int = 96, outputs: int = 40):
    """Weights and a Gram matrix of correlated inputs; `rank` < reduction makes H singular."""
    rng = np.random.default_rng(seed)
    k = rank or reduction
    x = rng.standard_normal((4 * reduction, k)) @ rng.standard_normal((k, reduction))
    if rank is None:
        x += 0.3 * rng.standard_normal(x.shape)
    w = (rng.standard_t(4, (reduction, outputs)) * 0.05).astype(np.float32)
    return w, (x.T @ x)[None]


def given_scales(w: np.ndarray, bits: int, asymmetric: bool, block: int | None):
    """Round-to-nearest's codes and every element's scale and zero point, matrix form."""
    grid = grid_for(bits, asymmetric)
    axis = 0 if block else 1
    qt = quantize(w, grid, axis=axis, block_size=block)
    s = expand(qt.scale, w.shape, axis, block).astype(np.float64)[None]
    z = None if qt.zero_point is None else expand(qt.zero_point, w.shape, axis, block)[None]
    return grid, qt, s, z


def output_error(w, codes, s, z, gram) -> float:
    """δᵀHδ summed, with the weights decoded in float32 as DequantizeLinear decodes them."""
    decoded = ((codes - (0 if z is None else z)) * s).astype(np.float32)
    delta = w[None].astype(np.float64) - decoded
    return float(np.sum((gram @ delta) * delta))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("asymmetric", [False, True])
@pytest.mark.parametrize("block", [None, 16])
def test_identity_gram_is_round_to_nearest(bits, asymmetric, block):
    """With H = I nothing couples the rows: OPTQ must give round-to-nearest's codes exactly
    (and, for blocks chosen as reached, round-to-nearest's scales)."""
    w, _ = problem(0, None)
    grid, qt, s, z = given_scales(w, bits, asymmetric, block)
    eye = np.eye(w.shape[0])[None]
    dynamic = DynamicBlocks(np.arange(w.shape[0]) // block) if block else None
    for act_order in (False, True):
        result = optq(w[None], eye, s, z, grid, dynamic=dynamic, act_order=act_order)
        np.testing.assert_array_equal(result.codes[0], qt.q)
        np.testing.assert_array_equal(result.scale, s)
        assert result.fallback == w.shape[1]  # equal errors: round-to-nearest is kept


@pytest.mark.parametrize("rank", [None, 24])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("asymmetric", [False, True])
def test_never_worse_than_nearest_under_the_same_scales(rank, bits, asymmetric):
    for seed in range(3):
        w, gram = problem(seed, rank)
        grid, qt, s, z = given_scales(w, bits, asymmetric, None)
        nearest = output_error(w, qt.q[None], s, z, gram)
        for act_order in (False, True):
            result = optq(w[None], gram, s, z, grid, act_order=act_order)
            np.testing.assert_array_equal(result.scale, s)  # per channel: the scales stay
            got = output_error(w, result.codes, s, result.zero_point, gram)
            assert np.all(result.error <= result.error_nearest * (1 + 1e-12))
            assert got == pytest.approx(result.error.sum(), rel=1e-9)
            assert got < 0.8 * nearest, (seed, act_order, got / nearest)  # and markedly better
            assert grid.qmin <= result.codes.min() and result.codes.max() <= grid.qmax


def test_blocks_fixed_when_reached_beat_static_blocks():
    w, gram = problem(1, None, reduction=128)
    grid, qt, s, _ = given_scales(w, 4, False, 32)
    static = optq(w[None], gram, s, None, grid)
    dynamic = optq(w[None], gram, s, None, grid, dynamic=DynamicBlocks(np.arange(128) // 32))
    assert dynamic.error.sum() < static.error.sum() < static.error_nearest.sum()
    per_block = dynamic.scale[0].reshape(4, 32, -1)
    assert np.all(per_block == per_block[:, :1])  # one scale per block and output
    assert not np.array_equal(dynamic.scale, s)


def test_dead_inputs_and_zero_gram():
    w, gram = problem(2, None, reduction=32)
    gram[:, :4, :] = 0
    gram[:, :, :4] = 0
    grid, qt, s, z = given_scales(w, 2, False, None)
    result = optq(w[None], gram, s, z, grid)
    assert np.isfinite(result.error).all() and result.error.sum() <= result.error_nearest.sum()
    result = optq(w[None], np.zeros_like(gram), s, z, grid)
    np.testing.assert_array_equal(result.codes[0], qt.q)


@pytest.mark.parametrize("options", [
    {"bits": 2},
    {"bits": 3, "asymmetric": True},
    {"bits": 4, "granularity": "block", "block_size": 16},
    {"bits": 2, "granularity": "block", "block_size": 16, "asymmetric": True, "range_search": True},
    {"bits": 4, "optq_act_order": True, "granularity": "block", "block_size": 16},
])
def test_pass_on_digits_cnn_beats_nearest_in_onnxruntime(tmp_path, options):
    """Plain, depthwise and pointwise Conv and Gemm; the layer-output error of each layer on
    the calibration data is no worse than round-to-nearest's, and onnxruntime agrees."""
    feeds = {"image": np.load(MODELS / "digits_eval.npz")["image"]}
    reference = outputs(MODELS / "digits_cnn.onnx", feeds)["logits"]
    results = {}
    for rounding in ("nearest", "optq"):
        config = QuantConfig(rounding=rounding, **options)
        model, report = compress_model(load_model(MODELS / "digits_cnn.onnx"), config,
                                 calibration=Calibration(MODELS / "digits_calib.npz"))
        save_model(model, tmp_path / f"{rounding}.onnx")
        logits = outputs(tmp_path / f"{rounding}.onnx", feeds)["logits"]
        results[rounding] = ({r.name: r.output_error for r in report.layers if r.bits}, mean_cosine(reference, logits))
    (nearest, cos_nearest), (optq_errors, cos_optq) = results["nearest"], results["optq"]
    assert nearest.keys() == optq_errors.keys() and len(nearest) == 6
    assert all(optq_errors[k] <= nearest[k] * (1 + 1e-9) for k in nearest), (nearest, optq_errors)
    assert sum(optq_errors.values()) < 0.9 * sum(nearest.values())
    assert cos_optq >= cos_nearest - 1e-3


def test_pass_on_grouped_conv_transpose(tmp_path):
    """ConvTranspose with groups (blocks along input channels) and a Conv, synthetic data."""
    for options in ({"bits": 4}, {"bits": 4, "granularity": "block", "block_size": 2}):
        config = QuantConfig(rounding="optq", **options)
        with pytest.warns(CalibrationWarning, match="synthetic"):
            model, report = compress_model(load_model(MODELS / "convtranspose_bn.onnx"), config, calibration=Calibration(None))
        assert {r.name for r in report.layers if r.bits} == {"deconv", "conv"}
        save_model(model, tmp_path / "q.onnx")
        feeds = {"x": np.random.default_rng(0).standard_normal((2, 8, 5, 5)).astype(np.float32)}
        reference = outputs(MODELS / "convtranspose_bn.onnx", feeds)["y"]
        assert mean_cosine(reference, outputs(tmp_path / "q.onnx", feeds)["y"]) > 0.95


def test_optq_with_sqrt_is_refused():
    with pytest.raises(ConfigError, match="--rounding optq does not combine with --sqrt"):
        QuantConfig(rounding="optq", sqrt=True)


def test_cli_rounding_optq_reports_output_error(tmp_path):
    out, report = tmp_path / "q.onnx", tmp_path / "r.json"
    result = CliRunner().invoke(main, [
        "compress", str(MODELS / "digits_cnn.onnx"), "--bits", "3", "--rounding", "optq", "--optq-damp", "0.05",
        "--calib", str(MODELS / "digits_calib.npz"), "-o", str(out), "--report-json", str(report), "-q",
    ])
    assert result.exit_code == 0, result.output
    layers = [l for l in json.loads(report.read_text())["layers"] if l["bits"]]
    assert len(layers) == 6 and all(0 < l["output_error"] < 0.2 for l in layers)
    assert outputs(out, {"image": np.load(MODELS / "digits_eval.npz")["image"][:4]})["logits"].shape == (4, 10)


def test_optq_beats_nearest_on_minilm(tmp_path, minilm, minilm_calib, minilm_feeds):
    reference = outputs(minilm, minilm_feeds)["sentence_embedding"]
    cosines = {}
    for rounding in ("nearest", "optq"):
        model, _ = compress_model(load_model(minilm), QuantConfig(bits=4, granularity="channel", rounding=rounding),
                                  calibration=Calibration(minilm_calib))
        save_model(model, tmp_path / "q.onnx")
        cosines[rounding] = mean_cosine(reference, outputs(tmp_path / "q.onnx", minilm_feeds, 0)["sentence_embedding"])
    assert cosines["optq"] > cosines["nearest"] + 0.03, cosines


def test_stacked_layers_round_as_they_would_alone():
    """Layers stacked as groups (as the pass stacks layers of one shape) get the codes each
    would get alone; a nearly singular one raises its own dampening, not the others'."""
    problems = [problem(seed, rank) for seed, rank in ((3, None), (4, 24), (5, None))]
    grid = grid_for(3, False)
    scales = [given_scales(w, 3, False, None)[2] for w, _ in problems]
    singular = problems[1][1].copy()
    mean = np.trace(singular[0]) / singular.shape[1]
    singular[0, 5:7, :] = singular[0, :, 5:7] = 0.0
    singular[0, 5:7, 5:7] = [[mean, 1.05 * mean], [1.05 * mean, mean]]  # indefinite at 1% dampening, not at 10%
    grams = [problems[0][1], singular, problems[2][1]]
    alone = [optq(w[None], g, s, None, grid) for (w, _), g, s in zip(problems, grams, scales)]
    stacked = optq(np.stack([w for w, _ in problems]), np.concatenate(grams), np.concatenate(scales), None, grid)
    for index, result in enumerate(alone):
        np.testing.assert_array_equal(stacked.codes[index], result.codes[0])
        np.testing.assert_allclose(stacked.error[index], result.error[0], rtol=1e-9)
    assert stacked.damp[1] > 0.01 and stacked.damp[0] == stacked.damp[2] == 0.01


def test_cuda_kernel_agrees_with_cpu_or_is_refused_without_cuda():
    """On a CUDA machine the kernel runs there and rounds (nearly) as on the CPU; without
    CUDA in torch, --device cuda is a clear error rather than a silent CPU run."""
    import torch

    w, gram = problem(6, None)
    grid, _, s, z = given_scales(w, 4, True, 16)
    dynamic = DynamicBlocks(np.arange(w.shape[0]) // 16)
    cpu = optq(w[None], gram, s, z, grid, dynamic=dynamic)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="--device cuda needs a CUDA build of torch"):
            optq(w[None], gram, s, z, grid, dynamic=dynamic, device="cuda")
        return
    gpu = optq(w[None], gram, s, z, grid, dynamic=dynamic, device="cuda")
    assert np.mean(gpu.codes == cpu.codes) > 0.99  # float32 factorizations differ in the last bits
    assert gpu.error.sum() == pytest.approx(cpu.error.sum(), rel=0.02)
    assert np.all(gpu.error <= gpu.error_nearest * (1 + 1e-12))


@pytest.mark.parametrize("asymmetric", [False, True])
def test_rate_aware_optq_spends_fewer_bits_and_compensates_the_error(asymmetric):
    """With a rate term OPTQ's codes take fewer bits under their histogram, and its error
    stays below rate-aware round to nearest's at the same λ (the sweep spreads it)."""
    from onnxcomp.kernels.optq import RateTerm
    from onnxcomp.kernels.rate import code_costs, rate_aware

    from test_rate import entropy_bits

    w, gram = problem(3, None)
    grid, qt, s, z = given_scales(w, 4, asymmetric, None)
    plain = optq(w[None], gram, s, z, grid)
    for lam in (0.2, 0.6):
        rtn = rate_aware(w, qt, grid, lam)
        rate = RateTerm(lam, code_costs(rtn.q, grid)[None], rtn.q[None].astype(np.float64))
        result = optq(w[None], gram, s, z, grid, rate=rate)
        assert entropy_bits(result.codes) < entropy_bits(plain.codes) - 0.05, lam
        assert output_error(w, result.codes, s, z, gram) < 0.8 * output_error(w, rtn.q[None], s, z, gram), lam
    np.testing.assert_array_equal(optq(w[None], gram, s, z, grid, rate=None).codes, plain.codes)
