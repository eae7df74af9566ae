"""W8A8 (int8 weights, uint8 activations from calibration) against FP32 and against
onnxruntime's own static QDQ quantizer, on the digits CNN and on all-MiniLM-L6-v2.

    python benchmarks/w8a8_latency.py

Prints, per model: accuracy (digits) or mean embedding cosine to FP32 (MiniLM), median
onnxruntime latency (sessions timed in turn) and its ratio to FP32, and the integer
kernels onnxruntime fused the QDQ graph into.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

from onnxcomp import QuantConfig, compress_file
from onnxcomp.calibration.analysis import Calibration
from onnxcomp.runtime import make_session, run
from onnxcomp.fidelity import mean_cosine

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "scripts"))
from digits_accuracy import accuracy  # noqa: E402
from timing import interleaved_latency_ms  # noqa: E402

INTEGER_KERNELS = ("QLinearConv", "MatMulIntegerToFloat", "QLinearMatMul", "QGemm")


class _Batches(CalibrationDataReader):
    def __init__(self, path: Path, batch: int = 16):
        data = dict(np.load(path))
        count = len(next(iter(data.values())))
        self.batches = iter([{k: v[i : i + batch] for k, v in data.items()} for i in range(0, count, batch)])

    def get_next(self):
        return next(self.batches, None)


def fused_kernels(path: Path, tmp: Path) -> str:
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ops = Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)
    return ", ".join(f"{ops[k]} {k}" for k in INTEGER_KERNELS if ops[k]) or "none"


def compare(name: str, model: Path, calib: Path, feeds_path: Path, tmp: Path, repeats: int) -> None:
    feeds = dict(np.load(feeds_path))
    ours, theirs = tmp / f"{name}.onnxcomp.onnx", tmp / f"{name}.ort.onnx"
    start = time.perf_counter()
    compress_file(model, ours, QuantConfig(bits=8, act_bits=8), calibration=Calibration(calib))
    ours_seconds = time.perf_counter() - start
    start = time.perf_counter()
    quantize_static(str(model), str(theirs), _Batches(calib), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    theirs_seconds = time.perf_counter() - start

    rows = [("FP32", model, None), ("onnxcomp --bits 8 --act-bits 8", ours, ours_seconds), ("ort quantize_static (QDQ)", theirs, theirs_seconds)]
    latencies = interleaved_latency_ms([path for _, path, _ in rows], feeds, repeats=repeats)
    reference = next(iter(run(make_session(model), feeds).values()))
    print(f"\n{name}: {len(next(iter(feeds.values())))} samples per run")
    print(f"{'model':32} {'compress s':>10} {'fidelity':>16} {'latency ms':>10} {'vs FP32':>8}  integer kernels")
    for (label, path, seconds), latency in zip(rows, latencies):
        if name == "digits":
            fidelity = f"acc {accuracy(path):.3f}"
        else:
            fidelity = f"cos {mean_cosine(reference, next(iter(run(make_session(path), feeds).values()))):.5f}"
        compress_time = "-" if seconds is None else f"{seconds:.2f}"
        print(f"{label:32} {compress_time:>10} {fidelity:>16} {latency:10.2f} {latency / latencies[0]:8.2f}  {fused_kernels(path, tmp)}")


def main() -> None:
    minilm = ROOT / "build" / "zoo" / "minilm"
    with tempfile.TemporaryDirectory() as tmp:
        compare("digits", ROOT / "models" / "digits_cnn.onnx", ROOT / "models" / "digits_calib.npz",
                ROOT / "models" / "digits_eval.npz", Path(tmp), repeats=300)  # 2 ms a run: more turns for a stable median
        compare("MiniLM", minilm / "minilm.onnx", minilm / "calib.npz", minilm / "eval.npz", Path(tmp), repeats=30)


if __name__ == "__main__":
    main()
