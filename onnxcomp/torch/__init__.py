"""The torch bridge: range regularizers for training, and export to ONNX for compression.

Needs torch (`pip install 'onnxcomp[torch]'`)."""

from onnxcomp.torch.export import export_onnx
from onnxcomp.torch.finetune import finetune
from onnxcomp.torch.regularizers import (
    DSMMRegularizer,
    LInfRegularizer,
    MarginRegularizer,
    RangeRegularizer,
    RangeRegularizerBase,
    SoftMinMaxRegularizer,
)

__all__ = [
    "DSMMRegularizer", "LInfRegularizer", "MarginRegularizer", "RangeRegularizer", "RangeRegularizerBase",
    "SoftMinMaxRegularizer", "export_onnx", "finetune",
]
