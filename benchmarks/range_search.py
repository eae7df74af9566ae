"""Range search (REQuant) against plain round-to-nearest, per channel, at 4 and 2 bits, on
the digits CNN and all-MiniLM-L6-v2; what sqrt reshaping costs in onnxruntime; and how long
the data-free search takes on MiniLM.

    python benchmarks/range_search.py

Fidelity: held-out accuracy (digits, 500 images) and mean embedding cosine to FP32 (MiniLM,
48 sentences), onnxruntime at MatMulNBits accuracy level 0. `output` and `sequential` (seq.)
use the calibration sets (models/digits_calib.npz, the 128 sentences of
models/sentences_calib.txt).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from onnxcomp import QuantConfig
from onnxcomp.pipeline import compress_model
from onnxcomp.calibration.analysis import Calibration
from onnxcomp.modelio import load_model, save_model
from onnxcomp.runtime import make_session, run, session_options
from onnxcomp.fidelity import mean_cosine

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "scripts"))
from digits_accuracy import accuracy  # noqa: E402
from timing import interleaved_latency_ms  # noqa: E402

METHODS = {  # label: (file stem, options)
    "RTN": ("rtn", {}),
    "search (mse)": ("mse", dict(range_search=True)),
    "search (output)": ("output", dict(range_search=True, range_objective="output")),
    "search (seq.)": ("sequential", dict(range_search=True, range_objective="sequential")),
    "search + sqrt": ("sqrt", dict(range_search=True, sqrt=True)),
}
MODELS = {
    "digits CNN": (ROOT / "models" / "digits_cnn.onnx", ROOT / "models" / "digits_calib.npz"),
    "MiniLM": (ROOT / "build" / "zoo" / "minilm" / "minilm.onnx", ROOT / "build" / "zoo" / "minilm" / "calib.npz"),
}


def fidelity(name: str, path: Path) -> str:
    if name == "digits CNN":
        return f"acc {accuracy(path):.3f}"
    feeds = dict(np.load(ROOT / "build" / "zoo" / "minilm" / "eval.npz"))
    reference = run(make_session(MODELS[name][0]), feeds)["sentence_embedding"]
    return f"cos {mean_cosine(reference, run(make_session(path, 0), feeds)['sentence_embedding']):.4f}"


def load_seconds(path: Path, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        ort.InferenceSession(str(path), session_options(0), providers=["CPUExecutionProvider"])
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print(f"{'model':11} {'bits':>4} {'method':16} {'fidelity':>10} {'compress s':>10} {'mean α':>7} {'file bytes':>11}")
        for name, (model, calib) in MODELS.items():
            for bits in (4, 2):
                for method, (stem, options) in METHODS.items():
                    data = calib if options.get("range_objective", "mse") != "mse" else None
                    start = time.perf_counter()
                    compressed, report = compress_model(load_model(model), QuantConfig(bits=bits, **options), calibration=Calibration(data))
                    seconds = time.perf_counter() - start
                    path = tmp / f"{name.split()[0]}-{bits}-{stem}.onnx"
                    save_model(compressed, path)
                    alphas = [r.range_search["alpha"] for r in report.layers if r.range_search]
                    alpha = f"{np.mean(alphas):.3f}" if alphas else "-"
                    print(f"{name:11} {bits:4d} {method:16} {fidelity(name, path):>10} {seconds:10.2f} {alpha:>7} {path.stat().st_size:11,}")

        # sqrt's price in onnxruntime: Abs and Mul decode every weight at every run.
        feeds = dict(np.load(ROOT / "build" / "zoo" / "minilm" / "eval.npz"))
        plain, reshaped = tmp / "MiniLM-4-mse.onnx", tmp / "MiniLM-4-sqrt.onnx"
        load = [load_seconds(p) for p in (plain, reshaped)]
        latency = interleaved_latency_ms([plain, reshaped], feeds, repeats=20)
        print(f"\nMiniLM 4-bit, session load s: search {load[0]:.3f}, search + sqrt {load[1]:.3f}; "
              f"latency ms (48 sentences): search {latency[0]:.1f}, search + sqrt {latency[1]:.1f} "
              f"({latency[1] / latency[0]:.2f}x)")


if __name__ == "__main__":
    main()
