"""The `.onnxc` container: an ONNX file whose integer weights are ANS-coded near their
entropy and everything else zstd-compressed; it decodes to the original bytes exactly.

Layout (docs/format.md has the details):

    magic  b"ONNXC\\x00" + version byte (1)
    u64    length of the table of contents (little endian)
    bytes  table of contents: zstd-compressed JSON
    u32    CRC-32 of those table-of-contents bytes
    bytes  sections, in table order: the skeleton (the file with every coded payload cut
           out), then one section per integer tensor

Every section carries a CRC-32 of its stored bytes, and the table the SHA-256 of the whole
decoded file: a corrupted, truncated or foreign file is refused, never decoded.
"""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from dataclasses import dataclass

import numpy as np

from onnxcomp.container.wire import INTEGER_BITS, WireError, integer_initializers
from onnxcomp.errors import OnnxcompError

MAGIC = b"ONNXC\x00"
VERSION = 1
ZSTD_LEVEL = 19


class ContainerError(OnnxcompError):
    """A container that cannot be decoded into the model it was made from."""


def _zstd():
    import zstandard

    return zstandard


def _constriction():
    import constriction

    return constriction


# --- symbols ----------------------------------------------------------------------------


def to_symbols(payload: bytes, bits: int, elements: int) -> np.ndarray:
    """The stored integers as symbols 0 … 2^bits − 1 (sub-byte types unpacked low bits first)."""
    raw = np.frombuffer(payload, dtype=np.uint8)
    if bits == 8:
        return raw.astype(np.int32)
    per_byte = 8 // bits
    shifts = np.arange(per_byte, dtype=np.uint8) * bits
    unpacked = (raw[:, None] >> shifts) & ((1 << bits) - 1)
    return unpacked.reshape(-1)[:elements].astype(np.int32)


def from_symbols(symbols: np.ndarray, bits: int) -> bytes:
    """Inverse of `to_symbols` (unused high bits of a last partial byte are zero)."""
    if bits == 8:
        return symbols.astype(np.uint8).tobytes()
    per_byte = 8 // bits
    padded = np.zeros(-(-len(symbols) // per_byte) * per_byte, dtype=np.uint8)
    padded[: len(symbols)] = symbols
    shifts = np.arange(per_byte, dtype=np.uint8) * bits
    return np.bitwise_or.reduce(padded.reshape(-1, per_byte) << shifts, axis=1).astype(np.uint8).tobytes()


def _model(counts: list[int]):
    probabilities = np.asarray(counts, dtype=np.float64)
    return _constriction().stream.model.Categorical(probabilities / probabilities.sum(), perfect=False)


def encode_symbols(symbols: np.ndarray, alphabet: int) -> tuple[bytes, list[int]]:
    """ANS-code the symbols under their own order-0 distribution; (coded bytes, counts)."""
    counts = np.bincount(symbols, minlength=alphabet).tolist()
    if len(symbols) == 0:
        return b"", counts
    coder = _constriction().stream.stack.AnsCoder()
    coder.encode_reverse(symbols, _model(counts))
    return coder.get_compressed().astype("<u4").tobytes(), counts


def decode_symbols(coded: bytes, counts: list[int], count: int) -> np.ndarray:
    if count == 0:
        return np.zeros(0, dtype=np.int32)
    words = np.frombuffer(coded, dtype="<u4").astype(np.uint32)
    return _constriction().stream.stack.AnsCoder(words).decode(_model(counts), count)


# --- container ------------------------------------------------------------------------------


@dataclass
class SectionInfo:
    """What `inspect` reports of one coded tensor."""

    name: str
    bits: int
    elements: int
    stored_bytes: int  # coded payload plus its share of the table (the counts)
    entropy_bits: float  # order-0 Shannon entropy of its symbols, in bits per weight


def _entropy(counts: list[int]) -> float:
    c = np.asarray(counts, dtype=np.float64)
    p = c[c > 0] / c.sum()
    return float(-(p * np.log2(p)).sum()) if c.sum() else 0.0


def pack(data: bytes) -> bytes:
    """The container for the serialized ONNX model `data`."""
    try:
        tensors = integer_initializers(data)
    except WireError as err:
        raise ContainerError(f"not a serialized ONNX model ({err}); pack an .onnx file") from None
    sections, blobs, pieces, cursor = [], [], [], 0
    for tensor in tensors:
        payload = data[tensor.start : tensor.end]
        bits = INTEGER_BITS[tensor.data_type]
        symbols = to_symbols(payload, bits, tensor.elements)
        if from_symbols(symbols, bits) != payload:  # unusual padding bits: keep the bytes as they are
            continue
        coded, counts = encode_symbols(symbols, 1 << bits)
        pieces.append(data[cursor : tensor.start])
        cursor = tensor.end
        sections.append({"kind": "ans", "name": tensor.name, "bits": bits, "elements": tensor.elements,
                         "offset": tensor.start, "counts": counts, "length": len(coded), "crc32": zlib.crc32(coded)})
        blobs.append(coded)
    pieces.append(data[cursor:])
    skeleton = _zstd().ZstdCompressor(level=ZSTD_LEVEL).compress(b"".join(pieces))
    sections.insert(0, {"kind": "skeleton", "length": len(skeleton), "crc32": zlib.crc32(skeleton)})
    blobs.insert(0, skeleton)
    toc = {"version": VERSION, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "sections": sections}
    toc_bytes = _zstd().ZstdCompressor(level=ZSTD_LEVEL).compress(json.dumps(toc, sort_keys=True, separators=(",", ":")).encode())
    header = MAGIC + bytes([VERSION]) + struct.pack("<Q", len(toc_bytes)) + toc_bytes + struct.pack("<I", zlib.crc32(toc_bytes))
    return header + b"".join(blobs)


def read_toc(blob: bytes, source: str = "container") -> tuple[dict, int]:
    """The table of contents and where the sections start; refuses what is not a valid container."""
    if len(blob) < len(MAGIC) + 1 or blob[: len(MAGIC)] != MAGIC:
        raise ContainerError(f"{source}: not an onnxcomp container (bad magic bytes); unpack only files made by onnxcomp pack")
    version = blob[len(MAGIC)]
    if version != VERSION:
        raise ContainerError(f"{source}: container format version {version}, this onnxcomp reads version {VERSION}; upgrade onnxcomp")
    pos = len(MAGIC) + 1
    if len(blob) < pos + 8:
        raise ContainerError(f"{source}: truncated inside the header; the file is incomplete")
    (length,) = struct.unpack_from("<Q", blob, pos)
    pos += 8
    if len(blob) < pos + length + 4:
        raise ContainerError(f"{source}: truncated inside the table of contents; the file is incomplete")
    toc_bytes = blob[pos : pos + length]
    (crc,) = struct.unpack_from("<I", blob, pos + length)
    if zlib.crc32(toc_bytes) != crc:
        raise ContainerError(f"{source}: table of contents fails its checksum; the file is corrupted")
    try:
        toc = json.loads(_zstd().ZstdDecompressor().decompress(toc_bytes))
    except Exception:
        raise ContainerError(f"{source}: table of contents cannot be read; the file is corrupted") from None
    return toc, pos + length + 4


def unpack(blob: bytes, source: str = "container") -> bytes:
    """The exact bytes of the ONNX file the container was packed from."""
    toc, pos = read_toc(blob, source)
    parts = []
    for index, section in enumerate(toc["sections"]):
        stored = blob[pos : pos + section["length"]]
        pos += section["length"]
        what = "skeleton" if section["kind"] == "skeleton" else f"tensor {section.get('name')!r}"
        if len(stored) != section["length"]:
            raise ContainerError(f"{source}: truncated in section {index} ({what}); the file is incomplete")
        if zlib.crc32(stored) != section["crc32"]:
            raise ContainerError(f"{source}: section {index} ({what}) fails its checksum; the file is corrupted")
        parts.append((section, stored))
    if pos != len(blob):
        raise ContainerError(f"{source}: {len(blob) - pos} unexpected bytes after the last section; the file is corrupted")
    (_, skeleton_blob), tensors = parts[0], parts[1:]
    skeleton = _zstd().ZstdDecompressor().decompress(skeleton_blob)
    out, cursor, written = bytearray(), 0, 0
    for section, stored in tensors:
        gap = section["offset"] - written
        out += skeleton[cursor : cursor + gap]
        cursor += gap
        symbols = decode_symbols(stored, section["counts"], section["elements"])
        payload = from_symbols(np.asarray(symbols), section["bits"])
        out += payload
        written = section["offset"] + len(payload)
    out += skeleton[cursor:]
    data = bytes(out)
    if len(data) != toc["size"] or hashlib.sha256(data).hexdigest() != toc["sha256"]:
        raise ContainerError(f"{source}: decoded model fails its SHA-256; the file is corrupted")
    return data


def describe(blob: bytes) -> tuple[list[SectionInfo], dict]:
    """Per coded tensor: bits, elements, stored bytes, entropy; and the table itself."""
    toc, _ = read_toc(blob)
    infos = []
    for section in toc["sections"][1:]:
        table_share = len(json.dumps(section["counts"], separators=(",", ":")))
        infos.append(SectionInfo(section["name"], section["bits"], section["elements"],
                                 section["length"] + table_share, _entropy(section["counts"])))
    return infos, toc
