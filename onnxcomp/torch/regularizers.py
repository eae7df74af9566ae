"""Training-time range regularizers: losses that pull each layer's weights into a narrow
range, so that the trained model quantizes with less error.

Add `reg()` to the training loss and the regularizer's own parameters (DSMM's temperatures,
the margins) to the optimizer. Every loss is computed in at least float32 whatever the
autocast dtype (float64 weights stay float64), with log-sum-exp style softmaxes, so large
temperatures and large tensors neither overflow nor underflow.
"""

from __future__ import annotations

import re

import torch
from torch import nn

LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _wide(t: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 → float32; float32 and float64 unchanged."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _covered(model: nn.Module, include, exclude) -> list[tuple[str, nn.Module]]:
    """(name, module) of the layers to regularize: by default every Conv, ConvTranspose and
    Linear; `include`/`exclude` take module types, or regular expressions on module names."""

    def matches(name: str, module: nn.Module, rules) -> bool:
        rules = rules if isinstance(rules, (list, tuple)) else [rules]
        return any(isinstance(module, r) if isinstance(r, type) else re.search(r, name) for r in rules)

    chosen = []
    for name, module in model.named_modules():
        wanted = matches(name, module, include) if include is not None else isinstance(module, LAYER_TYPES)
        if wanted and getattr(module, "weight", None) is not None and not (exclude is not None and matches(name, module, exclude)):
            chosen.append((name, module))
    return chosen


def _following_batch_norms(model: nn.Module) -> dict[nn.Module, nn.Module]:
    """Layer → the BatchNorm that comes right after it in module order with as many features
    as the layer has outputs (the pattern the ONNX fold-bn pass folds)."""
    modules = list(model.modules())
    pairs = {}
    for layer, after in zip(modules, modules[1:]):
        if isinstance(layer, LAYER_TYPES) and isinstance(after, _BATCH_NORMS):
            outputs = layer.weight.shape[1] * layer.groups if isinstance(layer, nn.modules.conv._ConvTransposeNd) else layer.weight.shape[0]
            if after.num_features == outputs and after.running_var is not None:
                pairs[layer] = after
    return pairs


class RangeRegularizerBase(nn.Module):
    """Which weights are covered, how strongly, and the per-layer statistics.

    `fold_bn=True` regularizes W·γ/√(σ²+ε) per output channel for layers followed by a
    BatchNorm: the ONNX passes fold the BatchNorm first and quantize *that* weight, whose
    range can differ a lot from W's. `per_channel=True` penalizes each output channel's range
    (what per-channel quantization sees) instead of the whole layer's; the layer's loss is
    then the mean over its channels.
    """

    def __init__(self, model: nn.Module, strength: float = 0.01, include=None, exclude=None,
                 fold_bn: bool = False, per_channel: bool = False):
        super().__init__()
        self.strength = strength
        self.per_channel = per_channel
        layers = _covered(model, include, exclude)
        if not layers:
            raise ValueError("the regularizer covers no layer: the model has no Conv/Linear weights matching include/exclude")
        self.names = [name for name, _ in layers]
        self._layers = [module for _, module in layers]  # plain list: not registered as submodules
        norms = _following_batch_norms(model) if fold_bn else {}
        self._norms = [norms.get(module) for module in self._layers]

    def effective_weight(self, index: int) -> torch.Tensor:
        """The weight the quantizer will see, as (output channels, everything else), float32."""
        layer, norm = self._layers[index], self._norms[index]
        w = _wide(layer.weight)
        transposed = isinstance(layer, nn.modules.conv._ConvTransposeNd)
        if transposed:  # (C_in, C_out/g, k...) → output channels first
            g = layer.groups
            w = w.reshape(g, w.shape[0] // g, *w.shape[1:]).transpose(1, 2).reshape(-1, w.shape[0] // g, *w.shape[2:])
        w = w.reshape(w.shape[0], -1)
        if norm is not None:
            w = w * (_wide(norm.weight) / torch.sqrt(_wide(norm.running_var) + norm.eps))[:, None]
        return w

    def layer_loss(self, index: int, w: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self) -> torch.Tensor:
        total = 0.0
        for index in range(len(self._layers)):
            w = self.effective_weight(index)
            rows = w if self.per_channel else w.reshape(1, -1)
            total = total + self.layer_loss(index, rows).mean()
        return self.strength * total

    @torch.no_grad()
    def stats(self) -> list[dict]:
        """Per layer: range (max − min), max|w| / std, and the learned quantity if any."""
        out = []
        for index, name in enumerate(self.names):
            w = self.effective_weight(index)
            entry = {
                "layer": name,
                "range": float(w.max() - w.min()),
                "max_over_std": float(w.abs().max() / w.std().clamp(min=1e-12)),
            }
            entry.update(self.learned(index))
            out.append(entry)
        return out

    def learned(self, index: int) -> dict:
        return {}


class LInfRegularizer(RangeRegularizerBase):
    """R2 L-inf (R2-Loss, arXiv 2303.08253): L = max|w| of the layer (or of each channel)."""

    def layer_loss(self, index, rows):
        return rows.abs().amax(dim=1)


class MarginRegularizer(RangeRegularizerBase):
    """R2 Margin: a learnable margin M ≥ 0 per layer, L = mean(max(|w| − M, 0)²) + M.
    The first term pulls weights inside the margin, the second shrinks the margin."""

    def __init__(self, model, strength=0.01, **options):
        super().__init__(model, strength, **options)
        with torch.no_grad():
            start = [0.5 * self.effective_weight(i).abs().max() for i in range(len(self._layers))]
        self.margins = nn.Parameter(torch.stack(start).float())

    def layer_loss(self, index, rows):
        margin = self.margins[index].abs().to(rows.dtype)
        return torch.relu(rows.abs() - margin).pow(2).mean(dim=1) + margin

    def learned(self, index):
        return {"margin": float(self.margins[index].abs())}


def soft_range(rows: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """s_max − s_min per row: softmax(α·w)- and softmax(−α·w)-weighted means of w (DSMM's
    Eq. 1; softmax subtracts the row's max internally, the W_max shift of the paper)."""
    temperature = temperature.to(rows.dtype)
    s_max = (rows * torch.softmax(temperature * rows, dim=1)).sum(dim=1)
    s_min = (rows * torch.softmax(-temperature * rows, dim=1)).sum(dim=1)
    return s_max - s_min


class SoftMinMaxRegularizer(RangeRegularizerBase):
    """R2 Soft-Min-Max: L = s_max − s_min with a fixed temperature per layer, set so that
    α·std(w) = `sharpness` (the temperature is in units of the weights)."""

    def __init__(self, model, strength=0.01, sharpness: float = 5.0, **options):
        super().__init__(model, strength, **options)
        with torch.no_grad():
            temps = [sharpness / self.effective_weight(i).std().clamp(min=1e-8) for i in range(len(self._layers))]
        self.register_buffer("temperatures", torch.stack(temps).float())

    def layer_loss(self, index, rows):
        return soft_range(rows, self.temperatures[index])

    def learned(self, index):
        return {"temperature": float(self.temperatures[index])}


class DSMMRegularizer(RangeRegularizerBase):
    """DSMM (Differentiable Soft Min-Max, Eq. 1): L = (s_max − s_min) + e^(−α), the
    temperature α learnable per layer (initially 0.1); the e^(−α) term keeps α growing
    towards a hard min-max instead of collapsing to the mean."""

    def __init__(self, model, strength=0.01, initial_temperature: float = 0.1, **options):
        super().__init__(model, strength, **options)
        self.temperatures = nn.Parameter(torch.full((len(self._layers),), float(initial_temperature)))

    def layer_loss(self, index, rows):
        alpha = _wide(self.temperatures[index])
        return soft_range(rows, alpha) + torch.exp(-alpha)

    def learned(self, index):
        return {"temperature": float(self.temperatures[index])}


KINDS = {"linf": LInfRegularizer, "margin": MarginRegularizer, "soft-min-max": SoftMinMaxRegularizer, "dsmm": DSMMRegularizer}


def RangeRegularizer(model: nn.Module, kind: str = "dsmm", strength: float = 0.01, **options) -> RangeRegularizerBase:
    """The regularizer of `kind` (linf, margin, soft-min-max, dsmm) over `model`'s layers."""
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r} is not one of {', '.join(KINDS)}")
    return KINDS[kind](model, strength=strength, **options)
