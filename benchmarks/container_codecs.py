"""The .onnxc container against what a user would otherwise do with a quantized file:
zstd -19 and brotli -q 11 on the same QDQ .onnx bytes.

    python benchmarks/container_codecs.py

Models: all-MiniLM-L6-v2 quantized per channel at 8, 4 and 2 bits, and the digits CNN at 4
bits. For each codec: stored bytes, and encode and decode throughput in integer weights per
second (the weights the file holds, over wall time). zstd encodes on all cores (threads=-1);
zstd and brotli decode on one, as their libraries do; .onnxc decodes its chunks in worker
processes on all cores for models of 2^24 weights or more (the ANS coder holds Python's
global lock, so threads would not help). Every decode is checked byte for byte.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import brotli
import zstandard

from onnxcomp import QuantConfig, compress_file
from onnxcomp.container.format import pack, unpack
from onnxcomp.container.wire import integer_initializers

ROOT = Path(__file__).resolve().parent.parent


def _timed(function, *args):
    start = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - start


CODECS = {
    "zstd -19": (lambda d: zstandard.ZstdCompressor(level=19, threads=-1).compress(d),
                 lambda b: zstandard.ZstdDecompressor().decompress(b)),
    "brotli -q 11": (lambda d: brotli.compress(d, quality=11), brotli.decompress),
    ".onnxc": (pack, unpack),
}


def main() -> None:
    cases = [("MiniLM", ROOT / "build" / "zoo" / "minilm" / "minilm.onnx", bits) for bits in (8, 4, 2)]
    cases.append(("digits CNN", ROOT / "models" / "digits_cnn.onnx", 4))
    print(f"{'model':12} {'bits':>4} {'codec':13} {'bytes':>12} {'of QDQ':>7} {'encode Mw/s':>12} {'decode Mw/s':>12}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, source, bits in cases:
            if not source.exists():
                sys.exit(f"{source} is missing: run `make test` (or python scripts/export_minilm.py) first")
            path = Path(tmp) / f"q{bits}.onnx"
            compress_file(source, path, QuantConfig(bits=bits))
            data = path.read_bytes()
            weights = sum(t.elements for t in integer_initializers(data))
            print(f"{name:12} {bits:4d} {'QDQ .onnx':13} {len(data):12,} {1:7.3f} {'-':>12} {'-':>12}")
            for codec, (encode, decode) in CODECS.items():
                blob, encode_s = _timed(encode, data)
                back, decode_s = _timed(decode, blob)
                assert back == data, codec
                print(f"{name:12} {bits:4d} {codec:13} {len(blob):12,} {len(blob) / len(data):7.3f} "
                      f"{weights / encode_s / 1e6:12.1f} {weights / decode_s / 1e6:12.1f}")


if __name__ == "__main__":
    main()
