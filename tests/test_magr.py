"""MagR: the ℓ1-ball projection, the solver's guarantees, the pass on every layer kind, and
its effect on a real model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from onnxcomp import QuantConfig
from onnxcomp.pipeline import compress_model
from onnxcomp.calibration.analysis import Calibration, CalibrationWarning
from onnxcomp.errors import ConfigError
from onnxcomp.kernels.magr import _prox_linf, magr, project_l1_ball
from onnxcomp.layers import find_weight_layers
from onnxcomp.modelio import load_model, save_model
from onnxcomp.passes.magr import MagrPass
from onnxcomp.passes.normalize import NormalizePass
from onnxcomp.report import Report
from onnxcomp.fidelity import mean_cosine

from conftest import MODELS, outputs


def projection_by_bisection(v: np.ndarray, radius: float) -> np.ndarray:
    """An independent reference: bisection on θ in Σ max(|v| − θ, 0) = radius, in float64."""
    if np.abs(v).sum() <= radius:
        return v.copy()
    low, high = 0.0, float(np.abs(v).max())
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if np.maximum(np.abs(v) - mid, 0).sum() > radius else (low, mid)
    return np.sign(v) * np.maximum(np.abs(v) - (low + high) / 2, 0)


@settings(max_examples=150, deadline=None)
@given(arrays(np.float64, st.integers(1, 300), elements=st.floats(-10, 10)), st.floats(1e-3, 50))
def test_projection_matches_bisection(v, radius):
    got = project_l1_ball(torch.from_numpy(v)[None], radius)[0].numpy()
    np.testing.assert_allclose(got, projection_by_bisection(v, radius), atol=1e-6)
    assert np.abs(got).sum() <= radius + 1e-6 or np.array_equal(got, v)


@pytest.mark.parametrize("v,radius", [
    (np.zeros(20), 1.0),  # all zero: already inside
    (np.array([0.1, -0.2, 0.3]), 1.0),  # inside: unchanged
    (np.ones(100), 50.0),  # 100 active entries: beyond the 16 sorted first
    (np.linspace(1, 2, 64), 30.0),
])
def test_projection_edge_cases(v, radius):
    got = project_l1_ball(torch.from_numpy(v)[None], radius)[0].numpy()
    np.testing.assert_allclose(got, projection_by_bisection(v, radius), atol=1e-9)


@settings(max_examples=50, deadline=None)
@given(arrays(np.float64, st.tuples(st.integers(1, 5), st.sampled_from([8, 32, 96])), elements=st.floats(-3, 3)),
       st.floats(1e-3, 1.0), st.sampled_from([None, 8]))
def test_prox_is_the_moreau_decomposition(v, t, block):
    tensor = torch.from_numpy(v)
    got = _prox_linf(tensor, t, block).numpy()
    rows = v.reshape(v.shape[0], -1, block) if block else v[:, None]
    expected = np.stack([[r - t * projection_by_bisection(r / t, 1.0) for r in row] for row in rows]).reshape(v.shape)
    np.testing.assert_allclose(got, expected, atol=1e-7)


def low_rank_problem(seed: int, reduction: int = 64, outputs: int = 24, groups: int = 1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((groups, 500, reduction)) * np.linspace(0.01, 2.0, reduction)
    gram = np.einsum("gnr,gns->grs", x, x)
    w = (rng.standard_t(3, (groups, reduction, outputs)) * 0.05).astype(np.float32)
    return x, gram, w


@pytest.mark.parametrize("block,groups", [(None, 1), (16, 1), (None, 3)])
def test_objective_never_increases_and_magnitudes_fall(block, groups):
    x, gram, w = low_rank_problem(0, groups=groups)
    result = magr(w, gram, 1e-3, iterations=200, block=block, tolerance=0.0)
    assert result.iterations == 200
    steps = np.diff(result.objectives)
    assert np.all(steps <= 1e-9 * abs(result.objectives[0])), steps.max()
    assert result.objective_end < result.objective_start
    assert np.all(np.abs(result.matrix).max(axis=1) <= np.abs(w).max(axis=1) + 1e-7)
    assert np.abs(result.matrix).max() < np.abs(w).max()
    fit = np.sum((x @ (result.matrix - w)) ** 2) / np.sum((x @ w) ** 2)
    assert fit < 1e-2


def test_tiny_alpha_leaves_weights_in_place():
    _, gram, w = low_rank_problem(1)
    result = magr(w, gram, 1e-12, iterations=50)
    np.testing.assert_allclose(result.matrix, w, atol=1e-6)


def test_dead_input_keeps_weights_without_nan():
    _, gram, w = low_rank_problem(2, groups=2)
    gram[1] = 0.0
    result = magr(w, gram, 1e-3, iterations=20, min_eigenvalue=1e-9)
    assert result.dead.tolist() == [False, True]
    np.testing.assert_array_equal(result.matrix[1], w[1])
    assert np.isfinite(result.matrix).all()


def test_pass_on_conv_groups_depthwise_and_gemm_keeps_outputs(tmp_path):
    """digits CNN: plain, depthwise (16 groups) and pointwise Conv, and Gemm."""
    model = load_model(MODELS / "digits_cnn.onnx")
    report = Report()
    calibration = Calibration(MODELS / "digits_calib.npz")
    model = NormalizePass(13, report)(model).model
    MagrPass(QuantConfig(bits=4, magr=True), calibration, report)(model)
    assert {r.name for r in report.magr} == {l.name for l in find_weight_layers(model.graph)}
    assert all(r.max_after < r.max_before and r.output_error < 0.02 for r in report.magr)
    save_model(model, tmp_path / "magr.onnx")
    feeds = {"image": np.load(MODELS / "digits_eval.npz")["image"]}
    ref, out = outputs(MODELS / "digits_cnn.onnx", feeds)["logits"], outputs(tmp_path / "magr.onnx", feeds)["logits"]
    assert mean_cosine(ref, out) > 0.99


def test_pass_on_grouped_conv_transpose_blockwise(tmp_path):
    model = load_model(MODELS / "convtranspose_bn.onnx")
    report = Report()
    config = QuantConfig(bits=4, magr=True, granularity="block", block_size=2)
    with pytest.warns(CalibrationWarning, match="synthetic"):
        MagrPass(config, Calibration(None), report)(NormalizePass(21, report)(model).model)
    assert {r.name for r in report.magr} == {"deconv", "conv"}
    assert all(r.max_after < r.max_before and r.objective_end < r.objective_start for r in report.magr)


def relu_matmul_model(w: np.ndarray):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("MatMul", ["r", "w"], ["y"], name="dense")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", w.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", w.shape[1]])],
        [onnx.numpy_helper.from_array(w, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_dead_layer_warns_and_keeps_weights(tmp_path):
    """Calibration inputs all negative: the MatMul behind the ReLU only ever sees zeros."""
    import onnx_ir as ir

    w = np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32)
    model = ir.from_proto(relu_matmul_model(w))
    feeds = [{"x": -np.abs(np.random.default_rng(1).standard_normal((32, 16))).astype(np.float32) - 0.1}]
    report = Report()
    with pytest.warns(CalibrationWarning, match="dense: the input of 1 of 1 group"):
        MagrPass(QuantConfig(magr=True), Calibration(feeds), report)(model)
    assert any("always zero" in n.message for n in report.notes) and not report.magr
    np.testing.assert_array_equal(find_weight_layers(model.graph)[0].weight.const_value.numpy(), w)


def test_magr_beats_round_to_nearest_on_minilm(tmp_path, minilm, minilm_calib, minilm_feeds):
    """MagR's weights do not depend on the bit width (per channel), so solve once, then round."""
    model = load_model(minilm)
    report = Report()
    MagrPass(QuantConfig(magr=True), Calibration(minilm_calib), report)(model)
    assert len(report.magr) == 36 and all(r.max_after < r.max_before for r in report.magr)
    save_model(model, tmp_path / "magr.onnx")
    reference = outputs(minilm, minilm_feeds)["sentence_embedding"]
    for bits in (4, 3, 2):
        cosines = []
        for source in (minilm, tmp_path / "magr.onnx"):
            quantized, _ = compress_model(load_model(source), QuantConfig(bits=bits, granularity="channel"))
            save_model(quantized, tmp_path / "q.onnx")
            cosines.append(mean_cosine(reference, outputs(tmp_path / "q.onnx", minilm_feeds, 0)["sentence_embedding"]))
        assert cosines[1] > cosines[0] + 0.02, (bits, cosines)


def test_cuda_solver_agrees_with_cpu_or_is_refused_without_cuda():
    """On a CUDA machine MagR runs there and lands where the CPU run lands; without CUDA in
    torch, --device cuda is a clear error rather than a silent CPU run."""
    _, gram, w = low_rank_problem(2)
    cpu = magr(w, gram, 1e-3, iterations=100)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="--device cuda needs a CUDA build of torch"):
            magr(w, gram, 1e-3, iterations=100, device="cuda")
        return
    gpu = magr(w, gram, 1e-3, iterations=100, device="cuda")
    np.testing.assert_allclose(gpu.matrix, cpu.matrix, atol=1e-4 * np.abs(w).max())
    assert gpu.objective_end == pytest.approx(cpu.objective_end, rel=1e-3)
