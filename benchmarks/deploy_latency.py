"""What a compressed model costs where it is deployed: a plain onnxruntime.InferenceSession
(CPU provider, default options, this machine's threads), side by side in one run.

    python benchmarks/deploy_latency.py [--models minilm,smollm2,efficientnet,digits] [--repeats 10]

Per model and variant: the file's size, latency relative to FP32 (sessions timed in turn,
medians), and the memory of a fresh process that opens the session and runs it once
(VmHWM, the peak, and VmRSS after the run, both less an idle interpreter that imported
onnxruntime and numpy), relative to FP32's. Variants: FP32; onnxruntime's own MatMulNBits
quantizer (round to nearest, blocks of 32, 4 bits); onnxcomp at 4 bits in blocks of 32
with 8-bit embeddings: symmetric, with integer zero points (--target onnxruntime at the
default accuracy level and at 4, and --target portable) and real ones (--zero-point float); for the CNNs, weight-only 8 and 4 bits and W8A8.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "scripts"), str(ROOT / "benchmarks")]
import zoo  # noqa: E402
from compare import _ort_job  # noqa: E402
from timing import interleaved_latency_ms  # noqa: E402

BLOCKS = {"granularity": "block", "block_size": 32, "asymmetric": True, "gather_bits": 8}
TRANSFORMER = {
    "onnxcomp b32 symmetric": BLOCKS | {"asymmetric": False},
    "onnxcomp b32 int-zp": BLOCKS,
    "onnxcomp b32 int-zp level 4": BLOCKS | {"accuracy_level": 4},
    "onnxcomp b32 float-zp": BLOCKS | {"zero_point": "float"},
    "onnxcomp b32 int-zp portable": BLOCKS | {"target": "portable"},
}
CNN = {"onnxcomp 8-bit": {"bits": 8}, "onnxcomp 4-bit": {"bits": 4}, "onnxcomp W8A8": {"bits": 8, "act_bits": 8}}
SAMPLES = {"lm": 1, "embedding": 16, "classes": 8}

PROBE = """
import sys, numpy as np, onnxruntime as ort
def status(key):
    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith(key)) / 1024
base = status('VmRSS')
if sys.argv[1] != '-':
    session = ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])
    session.run(None, dict(np.load(sys.argv[2])))
print(status('VmHWM') - base, status('VmRSS') - base)
"""


def memory_mb(path: str, feeds_file: str) -> tuple[float, float]:
    """(peak, resident after one run) in MiB of a fresh process, less an idle one."""
    def probe(model: str) -> list[float]:
        out = subprocess.run([sys.executable, "-c", PROBE, model, feeds_file], capture_output=True, text=True, check=True)
        return [float(v) for v in out.stdout.split()]
    idle = probe("-")
    return tuple(value - base for value, base in zip(probe(path), idle))


def variants(key: str, model: zoo.ZooModel, tmp: Path) -> dict[str, Path]:
    from onnxcomp import QuantConfig, compress_file

    made = {"FP32": model.path}
    if model.metric != "classes":
        out = tmp / "ort_rtn.onnx"
        _ort_job("rtn", str(model.path), str(out), 4, 32, str(model.calib))
        made["onnxruntime rtn b32"] = out
    configs = TRANSFORMER if model.metric != "classes" else CNN
    for label, options in configs.items():
        out = tmp / f"{label.replace(' ', '_')}.onnx"
        calibration = None
        if "act_bits" in options:
            from onnxcomp.calibration.analysis import Calibration

            calibration = Calibration(str(model.calib))
        compress_file(model.path, out, QuantConfig(**({"bits": 4} | options)), calibration=calibration, check=False)
        made[label] = out
    return made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="minilm,smollm2,efficientnet,digits")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    results = {}
    print(f"{'model':13} {'variant':30} {'MB':>7} {'latency x':>10} {'peak x':>7} {'resident x':>10}")
    for key in args.models.split(","):
        model = zoo.ensure(key)
        with tempfile.TemporaryDirectory() as tmp:
            feeds = {k: v[: SAMPLES[model.metric]] for k, v in np.load(model.eval).items()}
            feeds_file = Path(tmp) / "feeds.npz"
            np.savez(feeds_file, **feeds)
            made = variants(key, model, Path(tmp))
            latency = dict(zip(made, interleaved_latency_ms(list(made.values()), feeds, args.repeats)))
            memory = {label: memory_mb(str(path), str(feeds_file)) for label, path in made.items()}
            rows = []
            for label, path in made.items():
                row = {"variant": label, "mb": path.stat().st_size / 1e6, "latency_ms": latency[label],
                       "latency_x": latency[label] / latency["FP32"], "peak_mb": memory[label][0],
                       "resident_mb": memory[label][1], "peak_x": memory[label][0] / memory["FP32"][0],
                       "resident_x": memory[label][1] / memory["FP32"][1]}
                rows.append(row)
                print(f"{key:13} {label:30} {row['mb']:7.1f} {row['latency_x']:10.2f} {row['peak_x']:7.2f} {row['resident_x']:10.2f}",
                      flush=True)
            results[key] = rows
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
