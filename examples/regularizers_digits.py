"""Train the digits CNN with and without each range regularizer, export each to ONNX,
compress it with onnxcomp at 4, 3 and 2 bits per channel, and compare.

    python examples/regularizers_digits.py [--epochs 30] [--strength 0.01] [--seeds 5]

The CNN and the data split are those of models/make_models.py (scikit-learn's 8x8 digits,
500 held-out images). Accuracies are means over `--seeds` training runs (seeds 0, 1, …,
the same for every variant): single runs of this small model differ by a few points at 2
bits, more than most of the effects measured, and a regularizer too strong for one run can
collapse it (the last column: the worst seed's FP32 accuracy). The regularizers see the weights
as the ONNX passes will (BatchNorm folded, fold_bn=True) and per output channel
(per_channel=True), matching per-channel quantization.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from onnxcomp import QuantConfig, compress_file
from onnxcomp.torch import RangeRegularizer, export_onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "models"))
from make_models import digits_split  # noqa: E402

KINDS = (None, "linf", "margin", "soft-min-max", "dsmm")


def digits_cnn() -> nn.Module:
    def block(cin, cout, k, groups=1):
        return [nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(
        *block(1, 16, 3), *block(16, 16, 3, groups=16), *block(16, 32, 1), nn.MaxPool2d(2),
        *block(32, 32, 3), nn.Flatten(), nn.Linear(512, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 10),
    )


def train(kind: str | None, epochs: int, strength: float, x: torch.Tensor, y: torch.Tensor, seed: int):
    torch.manual_seed(seed)
    model = digits_cnn()
    reg = RangeRegularizer(model, kind=kind, strength=strength, fold_bn=True, per_channel=True) if kind else None
    params = [*model.parameters(), *(reg.parameters() if reg else [])]
    optimizer = torch.optim.Adam(params, lr=3e-3)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            idx = order[i : i + 64]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            if reg is not None:
                loss = loss + reg()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    return model


def accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    import onnxruntime as ort

    logits = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    return float(np.mean(logits.argmax(axis=1) == y))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--strength", type=float, default=0.01)
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    x_train, x_eval, y_train, y_eval = digits_split()
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train).long()
    rows, spreads = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in KINDS:
            runs = []
            for seed in range(args.seeds):
                model = train(kind, args.epochs, args.strength, xt, yt, seed)
                if seed == 0:
                    spreads[kind or "none"] = [s["max_over_std"] for s in RangeRegularizer(model, kind="linf", fold_bn=True).stats()]
                fp32 = export_onnx(model, xt[:2], Path(tmp) / f"{kind}.onnx")
                run = [accuracy(fp32, x_eval, y_eval)]
                for bits in (4, 3, 2):
                    out = Path(tmp) / f"{kind}.q{bits}.onnx"
                    compress_file(fp32, out, QuantConfig(bits=bits))
                    run.append(accuracy(out, x_eval, y_eval))
                runs.append(run)
            runs = np.array(runs)
            rows.append([kind or "none", *runs.mean(axis=0), runs[:, 0].min()])
    print(f"held-out accuracy ({len(y_eval)} images, mean of {args.seeds} seeds), per-channel weights, round-to-nearest, strength {args.strength}")
    print(f"{'regularizer':14} {'FP32':>6} {'4-bit':>6} {'3-bit':>6} {'2-bit':>6} {'FP32 worst seed':>16}")
    for name, *accs in rows:
        print(f"{name:14} " + " ".join(f"{a:6.3f}" for a in accs[:-1]) + f" {accs[-1]:16.3f}")
    names = RangeRegularizer(digits_cnn(), kind="linf").names
    print("\nmax|w| / std per layer (weights as quantized: BatchNorm folded; seed 0)")
    print(f"{'layer':6} " + " ".join(f"{k:>12}" for k in spreads))
    for i, name in enumerate(names):
        print(f"{name:6} " + " ".join(f"{spreads[k][i]:12.2f}" for k in spreads))


if __name__ == "__main__":
    main()
