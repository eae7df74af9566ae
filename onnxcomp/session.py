"""`onnxcomp.InferenceSession`: an onnxruntime session straight from an `.onnxc` container,
decoded in memory (nothing is written to disk), or from a plain `.onnx` file."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
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


def InferenceSession(  # noqa: N802 - named after the onnxruntime class it stands in for
    path: str | os.PathLike,
    sess_options: ort.SessionOptions | None = None,
    providers: list[str] | None = None,
    **kwargs,
) -> ort.InferenceSession:
    """onnxruntime.InferenceSession on `path`; a container is checked (CRCs, SHA-256) and
    decoded in memory first. Default: CPU, onnxruntime's default session options."""
    options = sess_options or session_options()
    providers = providers or providers_for("cpu")
    decoded = load_model_bytes(path)
    if decoded is None:
        return ort.InferenceSession(str(path), options, providers=providers, **kwargs)
    data, external = decoded
    if external:
        names = list(external)
        buffers = [np.frombuffer(external[name], dtype=np.uint8) for name in names]
        options.add_external_initializers_from_files_in_memory(names, buffers, [len(b) for b in buffers])
    return ort.InferenceSession(data, options, providers=providers, **kwargs)
