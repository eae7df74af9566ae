"""What a range regularizer adds to a training step of the digits CNN on the CPU.

    python benchmarks/regularizer_overhead.py

One step = forward, loss, backward and an Adam update on a batch of 64 images, as in
examples/regularizers_digits.py. Each regularizer runs with the C kernel (the default on
the CPU) and with torch operations (`backend="torch"`, what runs without a C compiler).
All variants take turns step by step, so the machine's drift hits them alike; medians over
`steps` steps each.
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

KINDS = ("linf", "margin", "soft-min-max", "dsmm")
BACKENDS = ("c", "torch")


def main(steps: int = 300, batch: int = 64) -> None:
    torch.manual_seed(0)
    x, y = torch.randn(batch, 1, 8, 8), torch.randint(0, 10, (batch,))
    setups = []
    for kind, backend in [(None, None), *[(k, b) for k in KINDS for b in BACKENDS]]:
        model = digits_cnn()
        reg = RangeRegularizer(model, kind=kind, fold_bn=True, per_channel=True, backend=backend) if kind else None
        optimizer = torch.optim.Adam([*model.parameters(), *(reg.parameters() if reg else [])], lr=1e-3)
        setups.append(((kind, backend), model, reg, optimizer))
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
    base = np.median(times[(None, None)])
    print(f"digits CNN, {batch} images a step, {torch.get_num_threads()} threads: no regularizer {1000 * base:.2f} ms a step")
    print(f"{'regularizer':14} {'C kernel ms':>11} {'vs none':>8} {'torch ops ms':>12} {'vs none':>8}")
    for kind in KINDS:
        c, t = np.median(times[(kind, "c")]), np.median(times[(kind, "torch")])
        print(f"{kind:14} {1000 * c:11.2f} {c / base:8.3f} {1000 * t:12.2f} {t / base:8.3f}")


if __name__ == "__main__":
    main()
