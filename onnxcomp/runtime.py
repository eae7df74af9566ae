"""onnxruntime sessions with the settings that decide fidelity, stated explicitly."""

from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort

from onnxcomp.errors import ConfigError


def session_options(accuracy_level: int | None = None) -> ort.SessionOptions:
    """Options for a CPU session.

    onnxruntime rewrites DequantizeLinear → MatMul into MatMulNBits, which by default
    (accuracy level 4) quantizes activations to int8 on the fly; level 0 keeps float compute.
    None leaves onnxruntime's default, which is what a user deploying gets.
    """
    options = ort.SessionOptions()
    if accuracy_level is not None:
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(accuracy_level))
    return options


def providers_for(device: str) -> list[str]:
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ConfigError(
                "--device cuda needs onnxruntime-gpu with CUDA; install it (pip install onnxruntime-gpu) or use --device cpu"
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    raise ConfigError(f"--device {device} is not supported; choose cpu or cuda")


def make_session(path: str | os.PathLike, accuracy_level: int | None = None, device: str = "cpu") -> ort.InferenceSession:
    return ort.InferenceSession(str(path), session_options(accuracy_level), providers=providers_for(device))


def run(session: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))
