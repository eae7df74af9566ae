"""onnxcomp: offline compression of ONNX models into quantized models stock onnxruntime runs.

The names below are imported on first use, so that `import onnxcomp` (and `onnxcomp --help`)
does not load onnx, onnxruntime and numpy before they are needed.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "Granularity": "onnxcomp.config",
    "QuantConfig": "onnxcomp.config",
    "OnnxcompError": "onnxcomp.errors",
    "compress": "onnxcomp.api",
    "Budget": "onnxcomp.budget",
    "Result": "onnxcomp.api",
    "compress_file": "onnxcomp.pipeline",
    "verify": "onnxcomp.fidelity",
    "Calibration": "onnxcomp.calibration.analysis",
    "CalibOptions": "onnxcomp.calibration.sources",
    "Report": "onnxcomp.report",
    "InferenceSession": "onnxcomp.session",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'onnxcomp' has no attribute {name!r}")
