"""The container's table of contents, typed, and checked against a schema with bounds
before anything is allocated or written.

A container is data from anywhere: every count, length and offset in its table is checked
to be of the right type, within a fixed cap, and consistent with the others (chunk symbols
add up to the tensor's elements, chunk lengths to the section's, payloads lie inside their
file and do not overlap, symbol counts add up to what they count), so that a decoder
driven by it allocates and writes no more than the table declares, and the table declares
no more than the caps.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from onnxcomp.errors import OnnxcompError

CHUNK = 1 << 20  # symbols per independently decodable chunk
BITS = (2, 4, 8)
MAX_FILE_BYTES = 1 << 42  # 4 TiB: any one decoded file
MAX_FILES = 4096  # external data files
MAX_SECTIONS = 1 << 22
MAX_TOC_BYTES = 1 << 26  # the table's JSON, decompressed
MAX_NAME_BYTES = 255
_SHA256 = re.compile(r"[0-9a-f]{64}")


class ContainerError(OnnxcompError):
    """A container that cannot be decoded into the model it was made from."""


@dataclass(frozen=True)
class Chunk:
    symbols: int
    length: int  # stored bytes
    counts: tuple[int, ...] | None  # its own model, or None for the tensor's


@dataclass(frozen=True)
class TensorSection:
    file: int
    name: str
    bits: int
    elements: int
    offset: int  # where the payload starts in its file
    counts: tuple[int, ...] | None  # the model every chunk shares, or None: one per chunk
    chunks: tuple[Chunk, ...]
    length: int
    crc32: int

    @property
    def payload_bytes(self) -> int:
        return -(-self.elements * self.bits // 8)

    def chunk_counts(self, chunk: Chunk) -> tuple[int, ...]:
        return chunk.counts if chunk.counts is not None else self.counts


@dataclass(frozen=True)
class SkeletonSection:
    file: int
    length: int
    crc32: int


@dataclass(frozen=True)
class FileDigest:
    name: str | None  # None: the model; else the location the model gives the data file
    size: int
    sha256: str


@dataclass(frozen=True)
class TableOfContents:
    version: int
    files: tuple[FileDigest, ...]  # the model first, then its external data files
    sections: tuple[TensorSection | SkeletonSection, ...]

    def tensors(self, file: int) -> list[TensorSection]:
        """The file's coded tensors, by offset."""
        return sorted((s for s in self.sections if isinstance(s, TensorSection) and s.file == file), key=lambda s: s.offset)

    def skeleton(self, file: int) -> SkeletonSection:
        return next(s for s in self.sections if isinstance(s, SkeletonSection) and s.file == file)

    def skeleton_bytes(self, file: int) -> int:
        """What the file's skeleton must decompress to: the file without its coded payloads."""
        return self.files[file].size - sum(t.payload_bytes for t in self.tensors(file))

    @property
    def decoded_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def symbols(self) -> int:
        return sum(s.elements for s in self.sections if isinstance(s, TensorSection))


def _fail(source: str, what: str) -> ContainerError:
    return ContainerError(f"{source}: table of contents {what}; the file is corrupted or was not made by onnxcomp")


def _int(value, source: str, what: str, cap: int) -> int:
    if type(value) is not int or not 0 <= value <= cap:
        raise _fail(source, f"has {what} {value!r}, not an integer in [0, {cap}]")
    return value


def _counts(value, bits: int, total: int, source: str, what: str) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) != 1 << bits:
        raise _fail(source, f"has {what} that are not {1 << bits} symbol counts")
    counts = tuple(_int(c, source, what, CHUNK * MAX_SECTIONS) for c in value)
    if sum(counts) != total:
        raise _fail(source, f"has {what} adding up to {sum(counts)}, not {total}")
    return counts


def safe_name(name, source: str) -> str:
    """An external data file's location: a relative path inside the model's folder, of
    plain components (no '..', '.', empty part, NUL or backslash), each a usable file name."""
    if not isinstance(name, str) or not name or "\x00" in name or "\\" in name:
        raise ContainerError(f"{source}: external data location {name!r} is not a usable file name; refused")
    parts = name.split("/")
    if name.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ContainerError(f"{source}: external data location {name!r} is outside the model's folder; refused")
    if any(len(p.encode("utf-8")) > MAX_NAME_BYTES for p in parts):
        raise ContainerError(f"{source}: external data location {name[:40]!r}… is longer than a file name can be; refused")
    return name


def _digest(entry, source: str, model: bool) -> FileDigest:
    keys = {"size", "sha256"} | (set() if model else {"name"})
    if not isinstance(entry, dict) or set(entry) != keys:
        raise _fail(source, "has a file entry of the wrong form")
    if not isinstance(entry["sha256"], str) or not _SHA256.fullmatch(entry["sha256"]):
        raise _fail(source, "has a SHA-256 that is not 64 hex digits")
    name = None if model else safe_name(entry["name"], source)
    return FileDigest(name, _int(entry["size"], source, "a file size", MAX_FILE_BYTES), entry["sha256"])


def _tensor(entry: dict, files: tuple[FileDigest, ...], source: str) -> TensorSection:
    keys = {"kind", "file", "name", "bits", "elements", "offset", "counts", "chunks", "length", "crc32"}
    if set(entry) != keys:
        raise _fail(source, "has a tensor section of the wrong form")
    file = _int(entry["file"], source, "a file index", len(files) - 1)
    if entry["bits"] not in BITS or type(entry["bits"]) is not int:
        raise _fail(source, f"has a tensor of {entry['bits']!r} bits")
    bits = entry["bits"]
    elements = _int(entry["elements"], source, "an element count", files[file].size * (8 // bits))
    if not isinstance(entry["name"], str):
        raise _fail(source, "has a tensor name that is not text")
    chunks_in = entry["chunks"]
    expected_chunks = max(1, -(-elements // CHUNK))
    if not isinstance(chunks_in, list) or len(chunks_in) != expected_chunks:
        raise _fail(source, f"splits {elements} symbols into other than {expected_chunks} chunk(s)")
    shared = None if entry["counts"] is None else _counts(entry["counts"], bits, elements, source, "tensor counts")
    chunks = []
    for index, chunk in enumerate(chunks_in):
        if not isinstance(chunk, list) or len(chunk) != (2 if shared is not None else 3):
            raise _fail(source, "has a chunk of the wrong form")
        want = min(CHUNK, elements - index * CHUNK)
        symbols = _int(chunk[0], source, "a chunk's symbol count", CHUNK)
        if symbols != want:
            raise _fail(source, f"has a chunk of {symbols} symbols where {want} belong")
        own = None if shared is not None else _counts(chunk[2], bits, symbols, source, "chunk counts")
        chunks.append(Chunk(symbols, _int(chunk[1], source, "a chunk length", MAX_FILE_BYTES), own))
    length = _int(entry["length"], source, "a section length", MAX_FILE_BYTES)
    if sum(c.length for c in chunks) != length:
        raise _fail(source, "has chunk lengths that do not add up to their section's")
    section = TensorSection(file, entry["name"], bits, elements, _int(entry["offset"], source, "an offset", MAX_FILE_BYTES),
                            shared, tuple(chunks), length, _int(entry["crc32"], source, "a CRC-32", 0xFFFFFFFF))
    if section.offset + section.payload_bytes > files[file].size:
        raise _fail(source, f"places tensor {section.name!r} beyond the end of its file")
    return section


def parse_toc(data, source: str = "container") -> TableOfContents:
    """The validated table of the decoded JSON `data`; ContainerError on anything off."""
    if not isinstance(data, dict) or set(data) != {"version", "size", "sha256", "files", "sections"}:
        raise _fail(source, "is not of the container's form")
    if not isinstance(data["files"], list) or len(data["files"]) > MAX_FILES:
        raise _fail(source, "lists its external data files wrongly")
    files = (_digest({"size": data["size"], "sha256": data["sha256"]}, source, True),
             *(_digest(entry, source, False) for entry in data["files"]))
    names = [f.name for f in files[1:]]
    if len(set(names)) != len(names):
        raise _fail(source, "names one external data file twice")
    if not isinstance(data["sections"], list) or len(data["sections"]) > MAX_SECTIONS:
        raise _fail(source, "has too many sections")
    sections = []
    for entry in data["sections"]:
        kind = entry.get("kind") if isinstance(entry, dict) else None
        if kind == "ans":
            sections.append(_tensor(entry, files, source))
        elif kind == "skeleton" and set(entry) == {"kind", "file", "length", "crc32"}:
            sections.append(SkeletonSection(_int(entry["file"], source, "a file index", len(files) - 1),
                                            _int(entry["length"], source, "a section length", MAX_FILE_BYTES),
                                            _int(entry["crc32"], source, "a CRC-32", 0xFFFFFFFF)))
        else:
            raise _fail(source, "has a section of an unknown kind")
    toc = TableOfContents(_int(data["version"], source, "a version", 255), files, tuple(sections))
    for index in range(len(files)):
        if sum(1 for s in sections if isinstance(s, SkeletonSection) and s.file == index) != 1:
            raise _fail(source, f"does not give file {index} exactly one skeleton")
        end = 0
        for tensor in toc.tensors(index):
            if tensor.offset < end:
                raise _fail(source, f"overlaps tensor {tensor.name!r} with the one before")
            end = tensor.offset + tensor.payload_bytes
    return toc
