"""Calibration memory is bounded by the statistics, not by the data: peak memory of a
process that gathers every layer's Gram matrix and activation histogram, for 128 and for
1024 calibration samples, on the digits CNN and on all-MiniLM-L6-v2.

    python benchmarks/calib_memory.py

Each measurement runs in a fresh process (peak RSS cannot be reset). The data comes from
an .npz on disk: the digits are scikit-learn's 1,797 images; MiniLM's 128 calibration
sentences are repeated to make 1,024 (memory depends on sizes, not on content).
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def measure(model: str, calib: str, samples: int) -> dict:
    """Run in a child process: load, then collect statistics; report peak RSS in MiB."""
    from onnxcomp.calibration.collect import collect
    from onnxcomp.calibration.sources import CalibOptions, open_calibration
    from onnxcomp.feeds import index_bounds, input_specs
    from onnxcomp.layers import find_weight_layers
    from onnxcomp.modelio import load_model

    loaded = load_model(model)
    layers = find_weight_layers(loaded.graph)
    dataset = open_calibration(calib, input_specs(loaded), index_bounds(loaded), CalibOptions(samples=samples, batch=16))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    stats = collect(loaded, dataset, layers, [layer.data for layer in layers if layer.data is not None])
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gram_mib = sum({id(r.gram): r.gram.matrix.nbytes for r in stats.layers.values()}.values()) / 2**20
    return {"samples": dataset.samples, "seconds": seconds, "rss_before": before, "rss_peak": peak, "gram_mib": gram_mib}


def digits_npz(path: Path) -> None:
    from sklearn.datasets import load_digits

    images = (load_digits().images / 16.0).astype(np.float32)[:, None]
    np.savez(path, image=(images - images.mean()) / images.std())


def minilm_npz(path: Path) -> None:
    data = dict(np.load(ROOT / "build" / "zoo" / "minilm" / "calib.npz"))
    np.savez(path, **{k: np.concatenate([v] * 8) for k, v in data.items()})


def main() -> None:
    if len(sys.argv) == 4:  # child
        print(json.dumps(measure(sys.argv[1], sys.argv[2], int(sys.argv[3]))))
        return
    with tempfile.TemporaryDirectory() as tmp:
        cases = [("digits CNN", ROOT / "models" / "digits_cnn.onnx", Path(tmp) / "digits.npz", digits_npz),
                 ("MiniLM", ROOT / "build" / "zoo" / "minilm" / "minilm.onnx", Path(tmp) / "minilm.npz", minilm_npz)]
        print(f"{'model':12} {'samples':>8} {'seconds':>8} {'RSS before MiB':>15} {'peak RSS MiB':>13} {'growth MiB':>11} {'Gram MiB':>9}")
        for name, model, calib, make in cases:
            make(calib)
            peaks = []
            for samples in (128, 1024):
                out = subprocess.run([sys.executable, __file__, str(model), str(calib), str(samples)],
                                     check=True, capture_output=True, text=True).stdout
                r = json.loads(out.strip().splitlines()[-1])
                peaks.append(r["rss_peak"])
                print(f"{name:12} {r['samples']:8d} {r['seconds']:8.2f} {r['rss_before']:15.0f} {r['rss_peak']:13.0f} "
                      f"{r['rss_peak'] - r['rss_before']:11.0f} {r['gram_mib']:9.1f}")
            print(f"{name:12} peak RSS 1024 / 128 samples: {peaks[1] / peaks[0]:.3f}")


if __name__ == "__main__":
    main()
