"""From a trained torch model to what the ONNX passes take: an ONNX file, checked."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def export_onnx(model: torch.nn.Module, example_input: torch.Tensor, path: str | os.PathLike, opset: int = 17,
                input_name: str = "input", output_name: str = "output") -> Path:
    """Export in eval mode with a free batch dimension, then load it back through onnxcomp's
    own checks so a bad export fails here, not at compress time."""
    from onnxcomp.modelio import load_model

    path = Path(path)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            torch.onnx.export(
                model, (example_input,), str(path), dynamo=False, opset_version=opset,
                input_names=[input_name], output_names=[output_name],
                dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}},
            )
    finally:
        model.train(was_training)
    load_model(path)
    return path
