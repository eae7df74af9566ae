"""onnxcomp: offline compression of ONNX models into quantized models stock onnxruntime runs."""

from onnxcomp.config import Granularity, QuantConfig
from onnxcomp.errors import OnnxcompError
from onnxcomp.pipeline import compress, compress_file
from onnxcomp.session import InferenceSession

__all__ = ["Granularity", "InferenceSession", "OnnxcompError", "QuantConfig", "compress", "compress_file"]
__version__ = "0.1.0"
