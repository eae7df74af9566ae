"""What a range regularizer adds to a training step of the digits CNN on the CPU.

    python benchmarks/regularizer_overhead.py

One step = forward, loss, backward and an Adam update on a batch of 64 images. The variants
take turns step by step (so drift hits them alike); medians over 200 steps each.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from onnxcomp.torch import RangeRegularizer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
from regularizers_digits import digits_cnn  # noqa: E402

KINDS = (None, "linf", "margin", "soft-min-max", "dsmm")


def main(steps: int = 200, batch: int = 64) -> None:
    torch.manual_seed(0)
    x, y = torch.randn(batch, 1, 8, 8), torch.randint(0, 10, (batch,))
    setups = []
    for kind in KINDS:
        model = digits_cnn()
        reg = RangeRegularizer(model, kind=kind, fold_bn=True, per_channel=True) if kind else None
        optimizer = torch.optim.Adam([*model.parameters(), *(reg.parameters() if reg else [])], lr=1e-3)
        setups.append((kind or "none", model, reg, optimizer))
    times = {name: [] for name, *_ in setups}
    for step in range(steps + 10):
        for name, model, reg, optimizer in setups:
            start = time.perf_counter()
            loss = nn.functional.cross_entropy(model(x), y)
            if reg is not None:
                loss = loss + reg()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step >= 10:  # warm-up
                times[name].append(time.perf_counter() - start)
    base = np.median(times["none"])
    print(f"{'regularizer':14} {'step ms':>8} {'vs none':>8}")
    for name, samples in times.items():
        print(f"{name:14} {1000 * np.median(samples):8.2f} {np.median(samples) / base:8.3f}")


if __name__ == "__main__":
    main()
