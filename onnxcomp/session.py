"""`onnxcomp.InferenceSession`: an onnxruntime session straight from an `.onnxc` container,
decoded in memory (nothing is written to disk), or from a plain `.onnx` file."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np
import onnx

from onnxcomp.container.format import MAGIC, ContainerError, read_toc, unpack_files
from onnxcomp.runtime import ort, providers_for, session_options


# In-memory decoding holds the decoded files: a container that declares more than this many
# times its own size (plus a fixed allowance) is refused rather than decoded. Real models
# expand 1.1-1.5 times; `onnxcomp unpack` decodes any size to disk in bounded memory.
MAX_EXPANSION = 2
EXPANSION_ALLOWANCE = 256 << 20


def load_model_bytes(path: str | os.PathLike) -> tuple[bytes, dict[str, bytes]] | None:
    """The decoded model of a container and its external data files, or None when `path`
    is not a container."""
    path = Path(path)
    if not path.is_file():
        raise ContainerError(f"{path}: no such file; pass the path of an .onnxc container or an .onnx model")
    with path.open("rb") as handle:
        if handle.read(len(MAGIC)) != MAGIC:
            return None
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as blob:
            toc, _ = read_toc(blob, str(path))
            limit = MAX_EXPANSION * len(blob) + EXPANSION_ALLOWANCE
            if toc.decoded_bytes > limit:
                raise ContainerError(
                    f"{path}: declares {toc.decoded_bytes:,} decoded bytes, more than {MAX_EXPANSION}x its own size "
                    f"plus {EXPANSION_ALLOWANCE >> 20} MiB, too much to decode in memory; decode it to disk with "
                    "`onnxcomp unpack` and open the .onnx file"
                )
            return unpack_files(blob, str(path))


def _external_locations(graph: onnx.GraphProto):
    """The `location` of every tensor stored as external data in the graph and its subgraphs."""
    def tensors(g: onnx.GraphProto):
        yield from g.initializer
        for sparse in g.sparse_initializer:
            yield from (sparse.values, sparse.indices)
        for node in g.node:
            for attr in node.attribute:
                yield from ([attr.t] if attr.HasField("t") else []) + list(attr.tensors)
                for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    yield from tensors(sub)

    for tensor in tensors(graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            yield next((e.value for e in tensor.external_data if e.key == "location"), "")


def check_locations(model: onnx.ModelProto, external: dict[str, bytes], source: str) -> None:
    """Every external data location the decoded model names is a file the container holds:
    onnxruntime would otherwise read it from wherever the process runs."""
    for location in _external_locations(model.graph):
        if location not in external:
            raise ContainerError(
                f"{source}: the model names external data {location!r}, which the container does not hold; refused"
            )


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
    header = onnx.load_model_from_string(data) if data is not None else onnx.load(str(path), load_external_data=False)
    if data is not None:
        check_locations(header, external, str(path))
    if fold_weights is None:
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
