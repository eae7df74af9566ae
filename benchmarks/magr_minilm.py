"""MagR + round-to-nearest against round-to-nearest alone on all-MiniLM-L6-v2, weight-only,
per channel, at 4, 3 and 2 bits; and how the MagR solver's time grows with a layer's width.

    python benchmarks/magr_minilm.py

Calibration: the 128 sentences of models/sentences_calib.txt; evaluation: the 48 (disjoint)
sentences of models/sentences_eval.txt. Fidelity: mean cosine of each sentence embedding to
FP32, and nearest-neighbour agreement (the share of sentences whose most similar other
sentence is the same as with FP32). onnxruntime at MatMulNBits accuracy level 0 (float compute).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from onnxcomp import QuantConfig, compress_file
from onnxcomp.calibration.analysis import Calibration
from onnxcomp.kernels.magr import magr
from onnxcomp.runtime import make_session, run
from onnxcomp.fidelity import mean_cosine

ROOT = Path(__file__).resolve().parent.parent
MINILM = ROOT / "build" / "zoo" / "minilm"


def nearest_neighbours(embeddings: np.ndarray) -> np.ndarray:
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    return similarity.argmax(axis=1)


def embed(path: Path, feeds: dict) -> np.ndarray:
    return run(make_session(path, accuracy_level=0), feeds)["sentence_embedding"]


def fidelity_table(tmp: Path) -> None:
    feeds = dict(np.load(MINILM / "eval.npz"))
    reference = embed(MINILM / "minilm.onnx", feeds)
    neighbours = nearest_neighbours(reference)
    print(f"{'bits':>4} {'method':10} {'cosine':>8} {'NN agree':>9} {'file bytes':>12} {'compress s':>10} {'max|w| fell':>12}")
    for bits in (4, 3, 2):
        for use_magr in (False, True):
            out = tmp / f"q{bits}{'m' if use_magr else ''}.onnx"
            start = time.perf_counter()
            report = compress_file(MINILM / "minilm.onnx", out, QuantConfig(bits=bits, magr=use_magr),
                                   calibration=Calibration(MINILM / "calib.npz"))
            seconds = time.perf_counter() - start
            embeddings = embed(out, feeds)
            agree = float(np.mean(nearest_neighbours(embeddings) == neighbours))
            fell = f"{sum(r.max_after < r.max_before for r in report.magr)}/{len(report.magr)}" if use_magr else "-"
            name = "MagR+RTN" if use_magr else "RTN"
            print(f"{bits:4d} {name:10} {mean_cosine(reference, embeddings):8.4f} {agree:9.3f} {out.stat().st_size:12,} {seconds:10.1f} {fell:>12}")


def scaling_table() -> None:
    """Solver seconds for 200 iterations at reduction 384 and growing output width."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4096, 384)) * np.linspace(0.05, 2.0, 384)
    gram = (x.T @ x)[None]
    print(f"\n{'outputs':>8} {'seconds':>8} {'s per 100 outputs':>18}")
    for outputs in (96, 192, 384, 768, 1536, 3072):
        w = (rng.standard_normal((1, 384, outputs)) * 0.05).astype(np.float32)
        result = magr(w, gram, 1e-3, iterations=200, tolerance=0.0)
        print(f"{outputs:8d} {result.seconds:8.2f} {100 * result.seconds / outputs:18.3f}")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        fidelity_table(Path(tmp))
    scaling_table()


if __name__ == "__main__":
    main()
