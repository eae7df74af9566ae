"""onnxruntime sessions with the settings that decide fidelity, stated explicitly."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx

from onnxcomp.errors import ConfigError, MissingDependencyError, RuntimeFailure

try:  # the one place onnxruntime is imported: either wheel (onnxruntime, onnxruntime-gpu) provides it
    import onnxruntime as ort
    from onnxruntime.capi import onnxruntime_pybind11_state as _ort_state
except ImportError as err:
    raise MissingDependencyError(
        "onnxruntime is not installed; pip install 'onnxcomp[cpu]', or 'onnxcomp[gpu]' for onnxruntime-gpu "
        "(the two wheels cannot be installed side by side)") from err


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


# onnxruntime's own exceptions (Fail, InvalidArgument, InvalidGraph, ...) derive from
# Exception directly; its Python layer raises ValueError and RuntimeError as well.
ORT_ERRORS = (RuntimeError, ValueError) + tuple(
    cls for cls in vars(_ort_state).values() if isinstance(cls, type) and issubclass(cls, Exception)
)


def first_line(err: BaseException) -> str:
    """The first non-empty line of an exception's message (onnxruntime's run to pages)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _with_free_dims(path: str | os.PathLike) -> bytes | None:
    """The model at `path` with graph-input and -output dimensions declared -1 or 0 made
    free (onnxruntime takes 0 as fixed and empty), or None when it declares none."""
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # not a readable model: onnxruntime's own error says so
        return None
    dims = [d for v in (*proto.graph.input, *proto.graph.output) for d in v.type.tensor_type.shape.dim]
    unset = [d for d in dims if d.HasField("dim_value") and d.dim_value <= 0]
    for dim in unset:
        dim.Clear()
    return proto.SerializeToString() if unset else None


def make_session(path: str | os.PathLike, accuracy_level: int | None = None, device: str = "cpu",
                 quiet: bool = False) -> ort.InferenceSession:
    """A session on the file; `quiet` keeps onnxruntime's warnings (about a graph onnxcomp
    made for its own use) off the user's terminal."""
    options = session_options(accuracy_level)
    if quiet:
        options.log_severity_level = 3
    try:
        patched = _with_free_dims(path)
        if patched is not None:  # external data stays where the file's folder says
            options.add_session_config_entry(
                "session.model_external_initializers_file_folder_path", str(Path(path).resolve().parent)
            )
        return ort.InferenceSession(patched or str(path), options, providers=providers_for(device))
    except ORT_ERRORS as err:
        raise RuntimeFailure(f"{path}: onnxruntime cannot load it ({first_line(err)})") from None


def run(session: ort.InferenceSession, feeds: dict[str, np.ndarray], what: str = "the model") -> dict[str, np.ndarray]:
    """Every output of `session` on `feeds`, by name; onnxruntime's failure as one line."""
    names = [o.name for o in session.get_outputs()]
    try:
        return dict(zip(names, session.run(names, feeds)))
    except ORT_ERRORS as err:
        raise RuntimeFailure(f"onnxruntime could not run {what}: {first_line(err)}") from None
