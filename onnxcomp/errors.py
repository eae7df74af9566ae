"""The project's exception hierarchy: every message names the subject and what to do."""


class OnnxcompError(Exception):
    """Base of every error onnxcomp reports to a user as one line."""


class InvalidModelError(OnnxcompError):
    """The input file is missing, unreadable, truncated or not a valid ONNX model."""


class AlreadyQuantizedError(InvalidModelError):
    """The input holds quantized weights or activations already."""


class ConfigError(OnnxcompError):
    """An option value the tool cannot honour (bit width, block size, paths)."""


class NonFiniteWeightError(OnnxcompError):
    """A weight holds NaN or Inf; quantizing it would spread garbage silently."""


class OpsetConversionError(OnnxcompError):
    """onnx.version_converter could not raise the model to the opset the bits need."""


class InputMismatchError(OnnxcompError):
    """User-supplied feeds do not match the model's inputs by name, dtype or shape."""


class CalibrationError(OnnxcompError):
    """Calibration could not run: empty data, or NaN/Inf appearing inside the model."""


class RuntimeFailure(OnnxcompError):
    """onnxruntime refused to load or run a model."""


class MissingDependencyError(OnnxcompError):
    """A package onnxcomp needs for this work is not installed; the message names the extra."""
