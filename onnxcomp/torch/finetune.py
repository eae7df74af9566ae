"""Fine-tune an existing model with a range regularizer on the user's own data loader."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from onnxcomp.torch.regularizers import RangeRegularizer, RangeRegularizerBase


def finetune(
    model: nn.Module,
    loader: Iterable,
    *,
    kind: str = "dsmm",
    strength: float = 0.01,
    epochs: int = 1,
    lr: float = 1e-3,
    criterion=None,
    **options,
) -> RangeRegularizerBase:
    """Train `model` for `epochs` on (inputs, targets) batches from `loader` with the task
    loss (cross-entropy by default) plus the regularizer; Adam over the model's and the
    regularizer's parameters. Returns the regularizer (see its `stats()`)."""
    criterion = criterion or nn.CrossEntropyLoss()
    reg = RangeRegularizer(model, kind=kind, strength=strength, **options)
    optimizer = torch.optim.Adam([*model.parameters(), *reg.parameters()], lr=lr)
    model.train()
    for _ in range(epochs):
        for inputs, targets in loader:
            loss = criterion(model(inputs), targets) + reg()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    return reg
