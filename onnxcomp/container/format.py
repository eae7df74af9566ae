"""The `.onnxc` container: an ONNX file whose integer weights are ANS-coded near their
entropy and everything else zstd-compressed; it decodes to the original bytes exactly.

Layout (docs/format.md has the details):

    magic  b"ONNXC\\x00" + version byte (2)
    u64    length of the table of contents (little endian)
    bytes  table of contents: zstd-compressed JSON
    u32    CRC-32 of those table-of-contents bytes
    bytes  sections, in table order: for the model and then each external data file, one
           section per integer tensor it holds (chunks of 2^20 symbols, each decodable on
           its own), then its skeleton (the file with every coded payload cut out)

Every section carries a CRC-32 of its stored bytes, and the table the SHA-256 of every
decoded file: a corrupted, truncated or foreign file is refused, never decoded.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import multiprocessing
import os
import shutil
import signal
import struct
import sys
import tempfile
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

from onnxcomp.container.toc import (
    CHUNK,
    MAX_TOC_BYTES,
    ContainerError,
    SkeletonSection,
    TableOfContents,
    TensorSection,
    parse_toc,
)
from onnxcomp.container.wire import INTEGER_BITS, WireError, integer_initializers

MAGIC = b"ONNXC\x00"
VERSION = 2
# Float bytes (scales, biases, float weights) gain nothing above level 12; 19 takes up to 40x longer.
ZSTD_LEVEL = 12


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
    """`count` symbols (at most a chunk's, as the table's check ensures) from `coded`."""
    if count == 0:
        return np.zeros(0, dtype=np.int32)
    if len(coded) % 4:
        raise ContainerError("a coded chunk is not a whole number of 32-bit words; the file is corrupted")
    words = np.frombuffer(coded, dtype="<u4").astype(np.uint32)
    try:
        return _constriction().stream.stack.AnsCoder(words).decode(_model(counts), count)
    except Exception as err:  # the coder's own refusal of words it cannot have written
        raise ContainerError(f"a coded chunk cannot be decoded ({type(err).__name__}); the file is corrupted") from None


# --- container ------------------------------------------------------------------------------


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


def coded_bytes(symbols: np.ndarray) -> int:
    """About what the container's coder stores for an integer tensor: its order-0 entropy
    (what the bit allocator plans with; the file itself is measured after)."""
    _, counts = np.unique(np.asarray(symbols).reshape(-1), return_counts=True)
    return int(np.ceil(_entropy(counts.tolist()) * symbols.size / 8))


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


def _chunk_jobs(blob, tensors: list[tuple[TensorSection, int]]):
    """(coded bytes, counts, symbol count) of every chunk, tensor after tensor."""
    for section, pos in tensors:
        for chunk in section.chunks:
            yield bytes(blob[pos : pos + chunk.length]), list(section.chunk_counts(chunk)), chunk.symbols
            pos += chunk.length


def _decode_chunk(job: tuple[bytes, list[int], int]) -> np.ndarray:
    return np.asarray(decode_symbols(*job), dtype=np.uint8)


def _die_with_parent(parent: int) -> None:
    """A decoder worker ends when the process that forked it does, however that ends (the
    kernel signals it on Linux), and never holds the caller's terminal or pipes."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent was gone before that took effect
        os._exit(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    devnull = os.open(os.devnull, os.O_RDWR)
    for stream in (0, 1, 2):
        os.dup2(devnull, stream)


PARALLEL_MIN = 1 << 24  # symbols: below this, starting worker processes costs more than it saves


class _ChunkDecoder:
    """Decodes chunks in order, in worker processes when the container is large and the
    machine has cores to spare (the ANS coder holds Python's global lock, so threads would
    not help), with a bounded number of chunks in flight."""

    def __init__(self, symbols: int):
        cores = os.cpu_count() or 1
        forkable = "fork" in multiprocessing.get_all_start_methods()
        self.workers = cores if symbols >= PARALLEL_MIN and cores > 1 and forkable else 1
        self.pool = None

    def __enter__(self):
        if self.workers > 1:
            self.pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("fork"),
                                            initializer=_die_with_parent, initargs=(os.getpid(),))
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)

    def decode(self, jobs):
        if self.pool is None:
            yield from map(_decode_chunk, jobs)
            return
        window = collections.deque()
        for job in jobs:
            window.append(self.pool.submit(_decode_chunk, job))
            if len(window) >= 4 * self.workers:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()


PIECE = 1 << 26  # bytes read, hashed or compressed at a time: memory stays bounded


def _pieces(buffer, start: int, end: int):
    for pos in range(start, end, PIECE):
        yield buffer[pos : min(pos + PIECE, end)]


def _canonical(payload: bytes, bits: int, elements: int) -> bool:
    """Whether from_symbols(to_symbols(payload)) gives payload back: the exact length, and
    zero high bits after the last element of a partly used final byte."""
    if len(payload) != -(-elements * bits // 8):
        return False
    used = elements * bits % 8
    return used == 0 or payload[-1] >> used == 0


def _encode_file(index: int, content, tensors, spool) -> list[dict]:
    """Code `content`'s integer tensors one at a time, then zstd its remaining bytes (the
    skeleton), appending all to `spool`; the sections' table entries, in that order."""
    sections, gaps, cursor = [], [], 0
    for tensor in sorted(tensors, key=lambda t: t.start):
        if tensor.start < cursor or tensor.end > len(content):
            continue  # overlapping or out-of-file spans stay in the skeleton as bytes
        payload = bytes(content[tensor.start : tensor.end])
        bits = INTEGER_BITS[tensor.data_type]
        if not _canonical(payload, bits, tensor.elements):  # unusual padding: keep the bytes as they are
            continue
        symbols = to_symbols(payload, bits, tensor.elements)
        stored, meta = _encode_tensor(symbols, bits)
        spool.write(stored)
        sections.append({"kind": "ans", "file": index, "name": tensor.name, "bits": bits, "elements": tensor.elements,
                         "offset": tensor.start, **meta, "length": len(stored), "crc32": zlib.crc32(stored)})
        gaps.append((cursor, tensor.start))
        cursor = tensor.end
    gaps.append((cursor, len(content)))
    start, crc = spool.tell(), 0
    with _zstd().ZstdCompressor(level=ZSTD_LEVEL).stream_writer(spool, closefd=False) as writer:
        for begin, end in gaps:
            for piece in _pieces(content, begin, end):
                writer.write(piece)
    spool.seek(start)
    for piece in iter(lambda: spool.read(PIECE), b""):
        crc = zlib.crc32(piece, crc)
    sections.append({"kind": "skeleton", "file": index, "length": spool.tell() - start, "crc32": crc})
    return sections


def _stream_digest(buffer) -> dict:
    sha = hashlib.sha256()
    for piece in _pieces(buffer, 0, len(buffer)):
        sha.update(piece)
    return {"size": len(buffer), "sha256": sha.hexdigest()}


def pack_to(out: BinaryIO, data, external: dict | None = None) -> None:
    """Write the container for the serialized ONNX model `data` and its external data files
    (`external`: location as the model names it → the file's bytes) to `out`. Inputs may be
    bytes or memory maps: one tensor at a time is held in memory."""
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
    sections = []
    with tempfile.TemporaryFile() as spool:
        for index, (name, content) in enumerate(zip(names, files)):
            sections += _encode_file(index, content, [t for t in tensors if t.location == name], spool)
        toc = {"version": VERSION, **_stream_digest(data),
               "files": [{"name": n, **_stream_digest(c)} for n, c in zip(names[1:], files[1:])], "sections": sections}
        toc_bytes = _zstd().ZstdCompressor(level=ZSTD_LEVEL).compress(json.dumps(toc, sort_keys=True, separators=(",", ":")).encode())
        out.write(MAGIC + bytes([VERSION]) + struct.pack("<Q", len(toc_bytes)) + toc_bytes + struct.pack("<I", zlib.crc32(toc_bytes)))
        spool.seek(0)
        shutil.copyfileobj(spool, out, PIECE)


def pack(data: bytes, external: dict[str, bytes] | None = None) -> bytes:
    """The container for `data` (and its external data files), in memory."""
    out = io.BytesIO()
    pack_to(out, data, external)
    return out.getvalue()


def read_toc(blob, source: str = "container") -> tuple[TableOfContents, int]:
    """The validated table of contents and where the sections start; refuses what is not a
    valid container before anything is allocated for it."""
    if len(blob) < len(MAGIC) + 1 or blob[: len(MAGIC)] != MAGIC:
        raise ContainerError(f"{source}: not an onnxcomp container (bad magic bytes); unpack only files made by onnxcomp pack")
    version = blob[len(MAGIC)]
    if version != VERSION:
        raise ContainerError(
            f"{source}: container format version {version}, this onnxcomp reads version {VERSION} only; "
            "unpack it with the onnxcomp that made it, or pack the model again"
        )
    pos = len(MAGIC) + 1
    if len(blob) < pos + 8:
        raise ContainerError(f"{source}: truncated inside the header; the file is incomplete")
    (length,) = struct.unpack_from("<Q", blob, pos)
    pos += 8
    if len(blob) < pos + length + 4:
        raise ContainerError(f"{source}: truncated inside the table of contents; the file is incomplete")
    toc_bytes = bytes(blob[pos : pos + length])
    (crc,) = struct.unpack_from("<I", blob, pos + length)
    if zlib.crc32(toc_bytes) != crc:
        raise ContainerError(f"{source}: table of contents fails its checksum; the file is corrupted")
    try:
        with _zstd().ZstdDecompressor().stream_reader(io.BytesIO(toc_bytes)) as reader:
            text = reader.read(MAX_TOC_BYTES + 1)
        data = json.loads(text) if len(text) <= MAX_TOC_BYTES else None
    except Exception:
        raise ContainerError(f"{source}: table of contents cannot be read; the file is corrupted") from None
    if data is None:
        raise ContainerError(f"{source}: table of contents expands beyond {MAX_TOC_BYTES >> 20} MiB; refused")
    return parse_toc(data, source), pos + length + 4


def _checked_sections(blob, toc: TableOfContents, pos: int, source: str) -> list[tuple[TensorSection | SkeletonSection, int]]:
    """Each section with where its bytes start, after checking lengths and CRC-32s."""
    total = pos + sum(section.length for section in toc.sections)
    if len(blob) > total:
        raise ContainerError(f"{source}: {len(blob) - total} unexpected bytes after the last section; the file is corrupted")
    located = []
    for index, section in enumerate(toc.sections):
        what = f"skeleton of file {section.file}" if isinstance(section, SkeletonSection) else f"tensor {section.name!r}"
        end = pos + section.length
        if end > len(blob):
            raise ContainerError(f"{source}: truncated in section {index} ({what}); the file is incomplete")
        crc = 0
        for piece in _pieces(blob, pos, end):
            crc = zlib.crc32(piece, crc)
        if crc != section.crc32:
            raise ContainerError(f"{source}: section {index} ({what}) fails its checksum; the file is corrupted")
        located.append((section, pos))
        pos = end
    return located


class _Window(io.RawIOBase):
    """A read-only stream over blob[start:end] (bytes or a memory map), copying nothing else."""

    def __init__(self, blob, start: int, end: int):
        self.blob, self.pos, self.end = blob, start, end

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        count = min(len(buffer), self.end - self.pos)
        buffer[:count] = self.blob[self.pos : self.pos + count]
        self.pos += count
        return count


def _decode_file(blob, toc: TableOfContents, index: int, starts: dict, out: BinaryIO, decoder: _ChunkDecoder,
                 source: str) -> dict:
    """Rebuild file `index` into `out`, tensor by tensor, writing no byte more than the table
    declares for it; its size and SHA-256."""
    tensors = [(t, starts[id(t)]) for t in toc.tensors(index)]
    skeleton_section = toc.skeleton(index)
    left = toc.skeleton_bytes(index)
    sha, written = hashlib.sha256(), 0

    def emit(data: bytes) -> None:
        nonlocal written
        sha.update(data)
        out.write(data)
        written += len(data)

    def copy(skeleton, count: int) -> None:
        nonlocal left
        while count:
            piece = skeleton.read(min(PIECE, count))
            if not piece:
                raise ContainerError(f"{source}: a skeleton holds fewer bytes than its table declares; the file is corrupted")
            emit(piece)
            count -= len(piece)
            left -= len(piece)

    chunks = decoder.decode(_chunk_jobs(blob, tensors))
    start = starts[id(skeleton_section)]
    window = _Window(blob, start, start + skeleton_section.length)
    try:
        with _zstd().ZstdDecompressor().stream_reader(window) as skeleton:
            for section, _ in tensors:
                copy(skeleton, section.offset - written)
                symbols = [next(chunks) for _ in section.chunks]
                emit(from_symbols(np.concatenate(symbols) if symbols else np.zeros(0, np.uint8), section.bits))
            copy(skeleton, left)
            if skeleton.read(1):
                raise ContainerError(f"{source}: a skeleton holds more bytes than its table declares; the file is corrupted")
    except _zstd().ZstdError:
        raise ContainerError(f"{source}: a skeleton cannot be decompressed; the file is corrupted") from None
    return {"size": written, "sha256": sha.hexdigest()}


def unpack_to(blob, open_output, source: str = "container") -> None:
    """Decode every file of the container `blob` (bytes or a memory map) into
    `open_output(name)` (name None for the model, else the external file's location),
    refusing a damaged container before writing and a wrong decode after."""
    toc, pos = read_toc(blob, source)
    located = _checked_sections(blob, toc, pos, source)
    starts = {id(section): start for section, start in located}
    try:
        with _ChunkDecoder(toc.symbols) as decoder:
            for index, digest in enumerate(toc.files):
                decoded = _decode_file(blob, toc, index, starts, open_output(digest.name), decoder, source)
                if decoded != {"size": digest.size, "sha256": digest.sha256}:
                    what = "model" if digest.name is None else f"external data file {digest.name!r}"
                    raise ContainerError(f"{source}: decoded {what} fails its SHA-256; the file is corrupted")
    except MemoryError:
        raise ContainerError(f"{source}: decoding ran out of memory; unpack it on a machine with more memory") from None


def unpack_files(blob, source: str = "container") -> tuple[bytes, dict[str, bytes]]:
    """The exact bytes of the ONNX file the container was packed from, and of each of its
    external data files (by the location the model names it with), in memory."""
    outputs: dict = {}

    def open_output(name):
        outputs[name] = io.BytesIO()
        return outputs[name]

    unpack_to(blob, open_output, source)
    model = outputs.pop(None).getvalue()
    return model, {name: buffer.getvalue() for name, buffer in outputs.items()}


def unpack(blob, source: str = "container") -> bytes:
    """The exact bytes of the ONNX file the container was packed from."""
    return unpack_files(blob, source)[0]


def describe(blob) -> tuple[list[SectionInfo], TableOfContents]:
    """Per coded tensor: bits, elements, stored bytes, entropy; and the table itself.
    The sections are checked as for decoding: a damaged container is refused, not listed."""
    toc, pos = read_toc(blob)
    _checked_sections(blob, toc, pos, "container")
    infos = []
    for section in toc.sections:
        if not isinstance(section, TensorSection):
            continue
        per_chunk = section.counts is None
        counts = np.sum([c.counts for c in section.chunks], axis=0).tolist() if per_chunk else list(section.counts)
        chunks_json = [[c.symbols, c.length] + ([list(c.counts)] if per_chunk else []) for c in section.chunks]
        table_share = _json_size(chunks_json) + _json_size(None if per_chunk else list(section.counts))
        infos.append(SectionInfo(section.name, section.bits, section.elements, section.length + table_share,
                                 _entropy(counts), "chunk" if per_chunk else "tensor"))
    return infos, toc
