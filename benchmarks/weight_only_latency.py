"""Latency of weight-only quantized models as onnxruntime runs them by default (weights
decoded on every run, or fused into MatMulNBits) and folded to float at load, as
`onnxcomp.InferenceSession` does, against FP32, side by side in one run.

    python benchmarks/weight_only_latency.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

from onnxcomp import QuantConfig, compress_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import interleaved_latency_ms  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FOLD = {"session.disable_quant_qdq": "1"}
CASES = [
    ("digits CNN", ROOT / "models" / "digits_cnn.onnx", {"image": np.load(ROOT / "models" / "digits_eval.npz")["image"]}),
    ("MiniLM", ROOT / "build" / "zoo" / "minilm" / "minilm.onnx", ROOT / "build" / "zoo" / "minilm" / "eval.npz"),
]
CONFIGS = {"4-bit per channel": {"bits": 4}, "4-bit blocks of 128": {"bits": 4, "granularity": "block", "block_size": 128}}


def main() -> None:
    print(f"{'model':11} {'weights':20} {'FP32 ms':>8} {'default x':>10} {'folded x':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, model, feeds in CASES:
            feeds = feeds if isinstance(feeds, dict) else dict(np.load(feeds))
            for label, options in CONFIGS.items():
                out = Path(tmp) / "q.onnx"
                compress_file(model, out, QuantConfig(**options))
                fp32, default, folded = interleaved_latency_ms([model, out, (out, FOLD)], feeds)
                print(f"{name:11} {label:20} {fp32:8.2f} {default / fp32:10.2f} {folded / fp32:9.2f}")


if __name__ == "__main__":
    main()
