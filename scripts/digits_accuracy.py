"""Held-out accuracy of digits CNN models on models/digits_eval.npz.

    python scripts/digits_accuracy.py MODEL.onnx [MODEL.onnx ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

MODELS = Path(__file__).resolve().parent.parent / "models"


def accuracy(path: str | Path) -> float:
    images = np.load(MODELS / "digits_eval.npz")["image"]
    labels = np.load(MODELS / "digits_eval_labels.npy")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"image": images})[0]
    return float(np.mean(logits.argmax(axis=1) == labels))


if __name__ == "__main__":
    for model in sys.argv[1:]:
        print(f"{model}: held-out accuracy {accuracy(model):.4f} ({Path(model).stat().st_size:,} bytes)")
