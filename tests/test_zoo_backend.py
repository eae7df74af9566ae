"""The onnx wheel's own test models (pytorch-converted, pytorch-operator, simple, light):
at 8, 4, 3 and 2 bits, with and without calibration data, each either compresses with its
outputs on the model's own test inputs within a bit-width tolerance of FP32, or is left as
it is with the reason in the report. Never a traceback."""

from __future__ import annotations

import glob
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from conftest import ZOO_TALLY
from onnxcomp import QuantConfig
from onnxcomp.pipeline import compress_model
from onnxcomp.calibration.analysis import Calibration
from onnxcomp.errors import OnnxcompError
from onnxcomp.modelio import load_model, save_model

DATA = Path(onnx.__file__).parent / "backend" / "test" / "data"
MODELS = sorted(
    [Path(p) for d in ("pytorch-converted", "pytorch-operator", "simple") for p in glob.glob(f"{DATA}/{d}/*/model.onnx")]
    + [Path(p) for p in glob.glob(f"{DATA}/light/*.onnx")]
)
# Largest relative L2 error ‖y − ŷ‖/‖y‖ of any float output on the test inputs. The models
# hold random weights (uniform, as torch initializes them), the hardest case for 2 bits.
TOLERANCE = {8: 0.02, 4: 0.15, 3: 0.35, 2: 1.5}


def _name(path: Path) -> str:
    return path.parent.name if path.name == "model.onnx" else path.stem


def _test_inputs(path: Path, session: ort.InferenceSession) -> dict[str, np.ndarray] | None:
    folder = path.parent / "test_data_set_0" if path.name == "model.onnx" else None
    if folder is None or not folder.is_dir():
        return None
    files = sorted(folder.glob("input_*.pb"), key=lambda p: int(p.stem.split("_")[1]))
    arrays = [numpy_helper.to_array(onnx.load_tensor(str(f))) for f in files]
    return dict(zip((i.name for i in session.get_inputs()), arrays))


def _reference(path: Path):
    """A session on the original and its test inputs, or None where onnxruntime cannot run it
    (opset-6 operators it no longer implements)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options)
        feeds = _test_inputs(path, session)
        return (session, feeds) if feeds is not None else None
    except Exception:
        return None


@pytest.fixture(scope="module")
def references():
    return {}


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
@pytest.mark.parametrize("path", MODELS, ids=_name)
@pytest.mark.parametrize("calibrated", [False, True], ids=["rtn", "optq-calib"])
def test_backend_model_compresses_or_says_why(tmp_path, references, path, bits, calibrated):
    if path not in references:
        references[path] = _reference(path)
    reference = references[path]
    config = QuantConfig(bits=bits, rounding="optq" if calibrated else "nearest")
    calibration = None
    if calibrated:  # the model's own test inputs, or synthetic ones where it has none
        calibration = Calibration([reference[1]] if reference else None)
    try:
        model, report = compress_model(load_model(path), config, calibration=calibration)
    except OnnxcompError as err:  # refused in one line: counted, but never a traceback
        ZOO_TALLY["refused"] += 1
        pytest.skip(f"refused: {err}")
    except Exception:
        ZOO_TALLY["tracebacks"] += 1
        raise
    quantized = [r for r in report.layers if r.bits]
    if not quantized:
        ZOO_TALLY["unchanged"] += 1
        if report.layers:  # each layer says why it stays float
            assert all(r.note for r in report.layers)
        else:
            assert any("nothing to quantize" in n.message for n in report.notes)
        return
    out = tmp_path / "q.onnx"
    save_model(model, out)
    ZOO_TALLY["compressed"] += 1
    if reference is None:
        onnx.checker.check_model(str(out))
        return
    session, feeds = reference
    expected = session.run(None, feeds)
    got = ort.InferenceSession(str(out)).run(None, feeds)
    for ref, new in zip(expected, got):
        if ref.dtype.kind != "f":
            continue
        ref64 = ref.astype(np.float64)
        error = np.linalg.norm(new - ref64) / max(np.linalg.norm(ref64), 1e-12)
        assert np.isfinite(new).all() and error <= TOLERANCE[bits], f"{_name(path)} {bits} bits: relative error {error:.3f}"


def test_backend_zoo_is_not_empty():
    assert len(MODELS) > 140 and os.path.isdir(DATA / "light")
