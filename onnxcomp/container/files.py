"""Files in and out of the container: atomic writes, clear errors, the inspect table."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from onnxcomp.container.format import ContainerError, describe, pack, unpack
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


def pack_file(source: str | os.PathLike, target: str | os.PathLike) -> tuple[int, int]:
    """Check the model, pack it, write atomically; (bytes before, bytes after)."""
    load_model(source)  # a clear error for a bad or external-data-less model before packing
    target = check_output_path(target, source)
    data = _read(source, "an .onnx model")
    blob = pack(data)
    _write_atomically(target, blob)
    return len(data), len(blob)


def unpack_file(source: str | os.PathLike, target: str | os.PathLike) -> None:
    target = check_output_path(target, source)
    _write_atomically(target, unpack(_read(source, "an .onnxc container"), str(source)))


def container_table(path: str | os.PathLike, as_json: bool = False) -> str:
    blob = _read(path, "an .onnxc container")
    infos, toc = describe(blob)
    if as_json:
        return json.dumps({"size": toc["size"], "container": len(blob), "tensors": [vars(i) for i in infos]}, indent=2)
    rows = [("tensor", "bits", "weights", "coded bits/weight", "entropy bits/weight", "coded / entropy")]
    for i in infos:
        coded = 8 * i.stored_bytes / max(i.elements, 1)
        rows.append((i.name, str(i.bits), f"{i.elements:,}", f"{coded:.4f}", f"{i.entropy_bits:.4f}",
                     f"{coded / i.entropy_bits:.4f}" if i.entropy_bits else "-"))
    coded_total = sum(i.stored_bytes for i in infos)
    bound = sum(i.entropy_bits * i.elements / 8 for i in infos)
    lines = [format_table(rows), "",
             f"integer payloads: {coded_total:,} bytes coded, entropy bound {bound:,.0f} bytes ({coded_total / bound:.4f}x)" if bound else "",
             f"container {len(blob):,} bytes for a {toc['size']:,}-byte model ({len(blob) / toc['size']:.3f})"]
    return "\n".join(line for line in lines if line is not None)
