"""What a range regularizer adds to a training step of the digits CNN on the CPU.

    python benchmarks/regularizer_overhead.py

One step = forward, loss, backward and an Adam update on a batch of 64 images, as in
examples/regularizers_digits.py. Each regularizer runs with the C kernel (the default on
the CPU) and with torch operations (`backend="torch"`, what runs without a C compiler).
All variants take turns step by step, so the machine's drift hits them alike; medians over
`steps` steps each.

A second table times reg() and its backward alone on large layers (the linear layers of a
6-layer, 384-wide transformer encoder, 10.6M weights), where the arithmetic dominates.
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


def encoder_layers() -> nn.Module:
    """The Linear shapes of a 6-layer, 384-wide transformer encoder (MiniLM's)."""
    def block() -> nn.Module:
        return nn.Sequential(*[nn.Linear(384, 384) for _ in range(4)], nn.Linear(384, 1536), nn.Linear(1536, 384))

    return nn.Sequential(*[block() for _ in range(6)])


def large(calls: int = 20) -> None:
    torch.manual_seed(0)
    model = encoder_layers()
    regs = {(kind, backend): RangeRegularizer(model, kind=kind, per_channel=True, backend=backend) for kind in KINDS for backend in BACKENDS}
    times = {name: [] for name in regs}
    for call in range(calls + 2):
        for name, reg in regs.items():
            start = time.perf_counter()
            reg().backward()
            if call >= 2:
                times[name].append(time.perf_counter() - start)
    weights = sum(p.numel() for name, p in model.named_parameters() if name.endswith("weight"))
    print(f"\nreg() + backward alone on {weights / 1e6:.1f}M weights (encoder Linear layers, per channel), medians of {calls}")
    print(f"{'regularizer':14} {'C kernel ms':>11} {'torch ops ms':>12} {'torch / C':>9}")
    for kind in KINDS:
        c, t = np.median(times[(kind, "c")]), np.median(times[(kind, "torch")])
        print(f"{kind:14} {1000 * c:11.1f} {1000 * t:12.1f} {t / c:9.2f}")


if __name__ == "__main__":
    main()
    large()
