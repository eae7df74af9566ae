"""`onnxcomp.InferenceSession`: an onnxruntime session straight from an `.onnxc` container,
decoded in memory (nothing is written to disk), or from a plain `.onnx` file."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnxcomp.container.format import MAGIC, ContainerError, unpack_files
from onnxcomp.runtime import providers_for, session_options


def load_model_bytes(path: str | os.PathLike) -> tuple[bytes, dict[str, bytes]] | None:
    """The decoded model of a container and its external data files, or None when `path`
    is not a container."""
    path = Path(path)
    if not path.is_file():
        raise ContainerError(f"{path}: no such file; pass the path of an .onnxc container or an .onnx model")
    with path.open("rb") as handle:
        if handle.read(len(MAGIC)) != MAGIC:
            return None
    return unpack_files(path.read_bytes(), str(path))


def weight_only(model: onnx.ModelProto) -> bool:
    """True when the main graph dequantizes weights but quantizes no activations."""
    ops = {node.op_type for node in model.graph.node}
    return "DequantizeLinear" in ops and "QuantizeLinear" not in ops


def InferenceSession(  # noqa: N802 - named after the onnxruntime class it stands in for
    path: str | os.PathLike,
    sess_options: ort.SessionOptions | None = None,
    providers: list[str] | None = None,
    *,
    fold_weights: bool | None = None,
    **kwargs,
) -> ort.InferenceSession:
    """onnxruntime.InferenceSession on `path`; a container is checked (CRCs, SHA-256) and
    decoded in memory first. Default: CPU, onnxruntime's default session options.

    `fold_weights` (default: for weight-only models) lets onnxruntime decode the quantized
    weights once, at load, instead of on every run: it turns off its QDQ rewrites, so
    constant folding gives the layers float weights and their fastest float kernels. The
    file stays small; the session holds float weights in memory, as the FP32 model's does.
    """
    options = sess_options or session_options()
    providers = providers or providers_for("cpu")
    decoded = load_model_bytes(path)
    data, external = decoded if decoded is not None else (None, {})
    if fold_weights is None:
        header = onnx.load_model_from_string(data) if data is not None else onnx.load(str(path), load_external_data=False)
        fold_weights = weight_only(header)
    if fold_weights:
        options.add_session_config_entry("session.disable_quant_qdq", "1")
    if decoded is None:
        return ort.InferenceSession(str(path), options, providers=providers, **kwargs)
    if external:
        names = list(external)
        buffers = [np.frombuffer(external[name], dtype=np.uint8) for name in names]
        options.add_external_initializers_from_files_in_memory(names, buffers, [len(b) for b in buffers])
    return ort.InferenceSession(data, options, providers=providers, **kwargs)
