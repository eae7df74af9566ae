"""Containers whose checksums pass but whose tables lie, for the reliability tests and the
crafted-container memory benchmark: a valid container's table changed, its CRC recomputed."""

from __future__ import annotations

import json
import struct
import zlib

import zstandard

from onnxcomp.container.format import MAGIC, VERSION


def split(blob: bytes) -> tuple[dict, bytes]:
    (length,) = struct.unpack_from("<Q", blob, len(MAGIC) + 1)
    start = len(MAGIC) + 1 + 8
    toc = json.loads(zstandard.ZstdDecompressor().decompress(blob[start : start + length]))
    return toc, blob[start + length + 4 :]


def join(toc_bytes: bytes, sections: bytes) -> bytes:
    return MAGIC + bytes([VERSION]) + struct.pack("<Q", len(toc_bytes)) + toc_bytes + struct.pack("<I", zlib.crc32(toc_bytes)) + sections


def craft(blob: bytes, mutate) -> bytes:
    """The container with its table changed by `mutate(toc)` and the table's CRC recomputed."""
    toc, sections = split(blob)
    mutate(toc)
    return join(zstandard.ZstdCompressor().compress(json.dumps(toc).encode()), sections)


def _first_tensor(toc):
    return next(s for s in toc["sections"] if s["kind"] == "ans")


def _set(key, value):
    return lambda toc: _first_tensor(toc).__setitem__(key, value)


def _chunk_symbols(value):
    return lambda toc: _first_tensor(toc)["chunks"][0].__setitem__(0, value)


CRAFTED = {
    "chunk claims 1e9 symbols": _chunk_symbols(10**9),
    "tensor claims 1e13 elements": _set("elements", 10**13),
    "negative offset": _set("offset", -5),
    "offset past the file": _set("offset", 10**12),
    "4-bit tensor called 3-bit": _set("bits", 3),
    "counts that do not add up": lambda toc: _first_tensor(toc).__setitem__("counts", [1] * 16),
    "counts of the wrong type": lambda toc: _first_tensor(toc).__setitem__("counts", "many"),
    "model size 1 PiB": lambda toc: toc.__setitem__("size", 1 << 50),
    "file claims 4 TiB + 1": lambda toc: toc.__setitem__("size", (1 << 42) + 1),
    "sections not a list": lambda toc: toc.__setitem__("sections", {"a": 1}),
    "unknown section kind": lambda toc: toc["sections"].append({"kind": "exec", "file": 0, "length": 0, "crc32": 0}),
    "second skeleton": lambda toc: toc["sections"].append({"kind": "skeleton", "file": 0, "length": 0, "crc32": 0}),
    "extra key": lambda toc: toc.__setitem__("run", "rm -rf /"),
    "sha256 not hex": lambda toc: toc.__setitem__("sha256", "x" * 64),
    "chunk length mismatch": lambda toc: _first_tensor(toc)["chunks"][0].__setitem__(1, 10**9),
}
