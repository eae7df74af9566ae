"""The `.onnxc` container: an ONNX file whose integer weights are ANS-coded near their
entropy and everything else zstd-compressed; it decodes to the original bytes exactly.

Layout (docs/format.md has the details):

    magic  b"ONNXC\\x00" + version byte (2)
    u64    length of the table of contents (little endian)
    bytes  table of contents: zstd-compressed JSON
    u32    CRC-32 of those table-of-contents bytes
    bytes  sections, in table order: for the model and then each external data file, its
           skeleton (the file with every coded payload cut out), then one section per
           integer tensor it holds (chunks of 2^20 symbols, each decodable on its own)

Every section carries a CRC-32 of its stored bytes, and the table the SHA-256 of every
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
VERSION = 2
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


def encode_symbols(symbols: np.ndarray, alphabet: int, counts: list[int] | None = None) -> tuple[bytes, list[int]]:
    """ANS-code the symbols under the order-0 model `counts` (default: their own);
    (coded bytes, counts)."""
    counts = np.bincount(symbols, minlength=alphabet).tolist() if counts is None else counts
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

CHUNK = 1 << 20  # symbols per independently decodable chunk


@dataclass
class SectionInfo:
    """What `inspect` reports of one coded tensor."""

    name: str
    bits: int
    elements: int
    stored_bytes: int  # coded payload plus its share of the table (the counts)
    entropy_bits: float  # order-0 Shannon entropy of its symbols, in bits per weight
    models: str = "tensor"  # "tensor": one model; "chunk": one per chunk of 2^20 weights


def _entropy(counts: list[int]) -> float:
    c = np.asarray(counts, dtype=np.float64)
    p = c[c > 0] / c.sum()
    return float(-(p * np.log2(p)).sum()) if c.sum() else 0.0


def _json_size(value) -> int:
    return len(json.dumps(value, separators=(",", ":")))


def _encode_tensor(symbols: np.ndarray, bits: int) -> tuple[bytes, dict]:
    """The tensor's chunks coded under one shared model, or under one model per chunk where
    that is smaller, the models' own cost (their counts) included."""
    pieces = [symbols[i : i + CHUNK] for i in range(0, len(symbols), CHUNK)] or [symbols]
    alphabet = 1 << bits
    shared = np.bincount(symbols, minlength=alphabet).tolist()
    coded = [encode_symbols(piece, alphabet, shared)[0] for piece in pieces]
    best = (b"".join(coded), {"counts": shared, "chunks": [[len(p), len(c)] for p, c in zip(pieces, coded)]})
    if len(pieces) > 1:
        own = [encode_symbols(piece, alphabet) for piece in pieces]
        meta = {"counts": None, "chunks": [[len(p), len(c), counts] for p, (c, counts) in zip(pieces, own)]}
        stored = b"".join(c for c, _ in own)
        if len(stored) + _json_size(meta) < len(best[0]) + _json_size(best[1]):
            best = (stored, meta)
    return best


def _decode_tensor(stored: bytes, section: dict) -> bytes:
    symbols, pos = [], 0
    for chunk in section["chunks"]:
        count, length = chunk[0], chunk[1]
        counts = section["counts"] if section["counts"] is not None else chunk[2]
        symbols.append(decode_symbols(stored[pos : pos + length], counts, count))
        pos += length
    return from_symbols(np.concatenate(symbols) if symbols else np.zeros(0, np.int32), section["bits"])


def _digest(data: bytes) -> dict:
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def pack(data: bytes, external: dict[str, bytes] | None = None) -> bytes:
    """The container for the serialized ONNX model `data` and its external data files
    (`external`: location as the model names it → the file's bytes)."""
    external = dict(sorted((external or {}).items()))
    try:
        tensors = integer_initializers(data)
    except WireError as err:
        raise ContainerError(f"not a serialized ONNX model ({err}); pack an .onnx file") from None
    names = [None, *external]
    files = [data, *external.values()]
    missing = sorted({t.location for t in tensors if t.location is not None and t.location not in external})
    if missing:
        raise ContainerError(f"external data file {missing[0]!r} is missing; keep it next to the model")
    sections, blobs = [], []
    for index, (name, content) in enumerate(zip(names, files)):
        pieces, cursor, coded = [], 0, []
        for tensor in sorted((t for t in tensors if t.location == name), key=lambda t: t.start):
            if tensor.start < cursor or tensor.end > len(content):
                continue  # overlapping or out-of-file spans stay in the skeleton as bytes
            payload = content[tensor.start : tensor.end]
            bits = INTEGER_BITS[tensor.data_type]
            symbols = to_symbols(payload, bits, tensor.elements)
            if from_symbols(symbols, bits) != payload:  # unusual padding bits: keep the bytes as they are
                continue
            stored, meta = _encode_tensor(symbols, bits)
            pieces.append(content[cursor : tensor.start])
            cursor = tensor.end
            coded.append(({"kind": "ans", "file": index, "name": tensor.name, "bits": bits, "elements": tensor.elements,
                           "offset": tensor.start, **meta, "length": len(stored), "crc32": zlib.crc32(stored)}, stored))
        pieces.append(content[cursor:])
        skeleton = _zstd().ZstdCompressor(level=ZSTD_LEVEL).compress(b"".join(pieces))
        sections.append({"kind": "skeleton", "file": index, "length": len(skeleton), "crc32": zlib.crc32(skeleton)})
        blobs.append(skeleton)
        for section, stored in coded:
            sections.append(section)
            blobs.append(stored)
    toc = {"version": VERSION, **_digest(data), "files": [{"name": n, **_digest(c)} for n, c in zip(names[1:], files[1:])],
           "sections": sections}
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


def _checked_sections(blob: bytes, toc: dict, pos: int, source: str) -> list[tuple[dict, bytes]]:
    parts = []
    for index, section in enumerate(toc["sections"]):
        stored = blob[pos : pos + section["length"]]
        pos += section["length"]
        what = f"skeleton of file {section['file']}" if section["kind"] == "skeleton" else f"tensor {section.get('name')!r}"
        if len(stored) != section["length"]:
            raise ContainerError(f"{source}: truncated in section {index} ({what}); the file is incomplete")
        if zlib.crc32(stored) != section["crc32"]:
            raise ContainerError(f"{source}: section {index} ({what}) fails its checksum; the file is corrupted")
        parts.append((section, stored))
    if pos != len(blob):
        raise ContainerError(f"{source}: {len(blob) - pos} unexpected bytes after the last section; the file is corrupted")
    return parts


def _rebuild(skeleton: bytes, tensors: list[tuple[dict, bytes]]) -> bytes:
    out, cursor, written = bytearray(), 0, 0
    for section, stored in tensors:
        gap = section["offset"] - written
        out += skeleton[cursor : cursor + gap]
        cursor += gap
        payload = _decode_tensor(stored, section)
        out += payload
        written = section["offset"] + len(payload)
    out += skeleton[cursor:]
    return bytes(out)


def unpack_files(blob: bytes, source: str = "container") -> tuple[bytes, dict[str, bytes]]:
    """The exact bytes of the ONNX file the container was packed from, and of each of its
    external data files (by the location the model names it with)."""
    toc, pos = read_toc(blob, source)
    parts = _checked_sections(blob, toc, pos, source)
    expected = [{"name": None, "size": toc["size"], "sha256": toc["sha256"]}, *toc["files"]]
    decoded = []
    for index, digest in enumerate(expected):
        mine = [(section, stored) for section, stored in parts if section["file"] == index]
        skeleton = _zstd().ZstdDecompressor().decompress(mine[0][1])
        data = _rebuild(skeleton, mine[1:])
        if _digest(data) != {"size": digest["size"], "sha256": digest["sha256"]}:
            what = "model" if digest["name"] is None else f"external data file {digest['name']!r}"
            raise ContainerError(f"{source}: decoded {what} fails its SHA-256; the file is corrupted")
        decoded.append(data)
    return decoded[0], {digest["name"]: data for digest, data in zip(expected[1:], decoded[1:])}


def unpack(blob: bytes, source: str = "container") -> bytes:
    """The exact bytes of the ONNX file the container was packed from."""
    return unpack_files(blob, source)[0]


def describe(blob: bytes) -> tuple[list[SectionInfo], dict]:
    """Per coded tensor: bits, elements, stored bytes, entropy; and the table itself."""
    toc, _ = read_toc(blob)
    infos = []
    for section in toc["sections"]:
        if section["kind"] != "ans":
            continue
        per_chunk = section["counts"] is None
        counts = np.sum([c[2] for c in section["chunks"]], axis=0).tolist() if per_chunk else section["counts"]
        table_share = _json_size(section["chunks"]) + _json_size(section["counts"])
        infos.append(SectionInfo(section["name"], section["bits"], section["elements"], section["length"] + table_share,
                                 _entropy(counts), "chunk" if per_chunk else "tensor"))
    return infos, toc
