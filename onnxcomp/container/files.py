"""Files in and out of the container: atomic writes, clear errors, the inspect table."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from onnxcomp.container.format import ContainerError, describe, pack, unpack_files
from onnxcomp.modelio import check_output_path, load_model
from onnxcomp.report import format_table


def _write_atomically(path: Path, data: bytes) -> None:
    """Write beside `path`, then rename: a reader never sees a half-written file."""
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".onnxcomp-", delete=False) as tmp:
        try:
            tmp.write(data)
        except BaseException:
            tmp.close()
            os.unlink(tmp.name)
            raise
    os.replace(tmp.name, path)


def _read(path: str | os.PathLike, what: str) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise ContainerError(f"{path}: no such file; pass the path of {what}")
    return path.read_bytes()


def _safe_location(location: str, source: str | os.PathLike) -> str:
    """External data must lie beside the model: no absolute paths, no way out of its folder."""
    path = Path(location)
    if path.is_absolute() or ".." in path.parts:
        raise ContainerError(f"{source}: external data location {location!r} is outside the model's folder; refused")
    return location


def external_locations(model_path: str | os.PathLike) -> list[str]:
    """The external data files the model's initializers name, relative to its folder."""
    import onnx_ir as ir

    model = load_model(model_path)  # also: a clear error for a bad model or a missing data file
    found = {
        value.const_value.location
        for graph in model.graphs()
        for value in graph.initializers.values()
        if isinstance(value.const_value, ir.ExternalTensor)
    }
    return sorted(_safe_location(location, model_path) for location in found)


def pack_file(source: str | os.PathLike, target: str | os.PathLike) -> tuple[int, int]:
    """Check the model, pack it with its external data files, write atomically;
    (bytes before, bytes after)."""
    target = check_output_path(target, source)
    folder = Path(source).parent
    external = {location: _read(folder / location, "an external data file") for location in external_locations(source)}
    data = _read(source, "an .onnx model")
    blob = pack(data, external)
    _write_atomically(target, blob)
    return len(data) + sum(map(len, external.values())), len(blob)


def unpack_file(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Write the model to `target`, and its external data files beside it under the names
    the model gives them."""
    target = check_output_path(target, source)
    data, external = unpack_files(_read(source, "an .onnxc container"), str(source))
    for location, content in external.items():
        path = target.parent / _safe_location(location, source)
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomically(check_output_path(path, source), content)
    _write_atomically(target, data)


def container_table(path: str | os.PathLike, as_json: bool = False) -> str:
    blob = _read(path, "an .onnxc container")
    infos, toc = describe(blob)
    if as_json:
        return json.dumps({"size": toc["size"], "external_files": toc["files"], "container": len(blob),
                           "tensors": [vars(i) for i in infos]}, indent=2)
    rows = [("tensor", "bits", "weights", "models", "coded bits/weight", "entropy bits/weight", "coded / entropy")]
    for i in infos:
        coded = 8 * i.stored_bytes / max(i.elements, 1)
        rows.append((i.name, str(i.bits), f"{i.elements:,}", i.models, f"{coded:.4f}", f"{i.entropy_bits:.4f}",
                     f"{coded / i.entropy_bits:.4f}" if i.entropy_bits else "-"))
    coded_total = sum(i.stored_bytes for i in infos)
    bound = sum(i.entropy_bits * i.elements / 8 for i in infos)
    chunked = [i for i in infos if i.models == "chunk"]
    lines = [format_table(rows), ""]
    if bound:
        lines.append(f"integer payloads: {coded_total:,} bytes coded, per-tensor entropy bound {bound:,.0f} bytes "
                     f"({coded_total / bound:.4f}x)")
    if chunked:
        below = sum(i.entropy_bits * i.elements / 8 - i.stored_bytes for i in chunked)
        lines.append(f"{len(chunked)} tensor(s) coded with one model per chunk: {below:,.0f} bytes below their per-tensor bound")
    external = f" and {len(toc['files'])} external data file(s)" if toc["files"] else ""
    total = toc["size"] + sum(f["size"] for f in toc["files"])
    lines.append(f"container {len(blob):,} bytes for a {total:,}-byte model{external} ({len(blob) / total:.3f})")
    return "\n".join(lines)
