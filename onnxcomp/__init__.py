"""onnxcomp: offline compression of ONNX models into quantized models stock onnxruntime runs."""

from onnxcomp.config import Granularity, QuantConfig
from onnxcomp.errors import OnnxcompError
from onnxcomp.pipeline import compress, compress_file

__all__ = ["Granularity", "OnnxcompError", "QuantConfig", "compress", "compress_file"]
__version__ = "0.1.0"
