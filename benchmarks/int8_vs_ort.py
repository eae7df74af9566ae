"""onnxcomp 8-bit per-channel vs onnxruntime's quantize_dynamic (int8 per-channel), side by side.

    python benchmarks/int8_vs_ort.py [--model build/zoo/minilm/minilm.onnx --feeds build/zoo/minilm/eval.npz]

Prints, for FP32 and each quantized file: compression wall time, file size, mean output
cosine to FP32, and median onnxruntime latency over the feeds (one session each, same run).
"""

from __future__ import annotations

import argparse
import tempfile
import sys
import time
from pathlib import Path

import numpy as np
from onnxruntime.quantization import QuantType, quantize_dynamic

from onnxcomp import QuantConfig, compress_file
from onnxcomp.runtime import make_session, run
from onnxcomp.fidelity import mean_cosine

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import interleaved_latency_ms  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "build" / "zoo" / "minilm" / "minilm.onnx")
    parser.add_argument("--feeds", type=Path, default=ROOT / "build" / "zoo" / "minilm" / "eval.npz")
    args = parser.parse_args()
    feeds = dict(np.load(args.feeds))
    reference = next(iter(run(make_session(args.model), feeds).values()))
    with tempfile.TemporaryDirectory() as tmp:
        ours, theirs = Path(tmp) / "onnxcomp.onnx", Path(tmp) / "ort.onnx"
        start = time.perf_counter()
        compress_file(args.model, ours, QuantConfig(bits=8))
        ours_time = time.perf_counter() - start
        start = time.perf_counter()
        quantize_dynamic(args.model, theirs, per_channel=True, weight_type=QuantType.QInt8)
        theirs_time = time.perf_counter() - start
        rows = [("FP32", args.model, 0.0), ("onnxcomp --bits 8", ours, ours_time), ("ort quantize_dynamic", theirs, theirs_time)]
        latencies = interleaved_latency_ms([path for _, path, _ in rows], feeds)
        print(f"{'model':22} {'compress s':>10} {'bytes':>12} {'cosine':>8} {'latency ms':>10}")
        for (name, path, seconds), latency in zip(rows, latencies):
            out = next(iter(run(make_session(path), feeds).values()))
            print(f"{name:22} {seconds:10.2f} {path.stat().st_size:12,} {mean_cosine(reference, out):8.5f} {latency:10.2f}")


if __name__ == "__main__":
    main()
