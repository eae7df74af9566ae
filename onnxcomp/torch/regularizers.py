"""Training-time range regularizers: losses that pull each layer's weights into a narrow
range, so that the trained model quantizes with less error.

Add `reg()` to the training loss and the regularizer's own parameters (DSMM's temperatures,
the margins) to the optimizer. Every loss is computed in at least float32 whatever the
autocast dtype (float64 weights stay float64), with log-sum-exp style softmaxes, so large
temperatures and large tensors neither overflow nor underflow.

Each kind writes its loss *and* its gradient per row in closed form; `reg()` is a single
autograd node. On a small CNN, autograd's own bookkeeping for the few dozen tiny ops a
regularizer needs per layer would cost more than a third of the training step; this way it
costs what the arithmetic costs (gradients checked against finite differences in the tests).
"""

from __future__ import annotations

import re

import torch
from torch import nn

LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _wide(t: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 → float32; float32 and float64 unchanged."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


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


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


class _Loss(torch.autograd.Function):
    """reg() as one autograd node: forward computes the loss and every gradient at once."""

    @staticmethod
    def forward(ctx, reg, *inputs):
        loss, grads = reg._loss_and_grads(inputs)
        ctx.grads = grads
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        return (None, *[g * _cast(grad_output, g.dtype) for g in ctx.grads])


class RangeRegularizerBase(nn.Module):
    """Which weights are covered, how strongly, and the per-layer statistics.

    `fold_bn=True` regularizes W·γ/√(σ²+ε) per output channel for layers followed by a
    BatchNorm: the ONNX passes fold the BatchNorm first and quantize *that* weight, whose
    range can differ a lot from W's (γ gets its share of the gradient). `per_channel=True`
    penalizes each output channel's range (what per-channel quantization sees) instead of
    the whole layer's; the layer's loss is then the mean over its channels.

    Subclasses give, for a layer's rows (R, n), each row's loss, its gradient (R, n) and
    the gradient for the layer's own learnable scalar (or None).
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

    # --- layout -------------------------------------------------------------------------

    def _output_first(self, index: int, w: torch.Tensor) -> torch.Tensor:
        """(output channels, everything else) view of a weight in the layer's layout."""
        layer = self._layers[index]
        if isinstance(layer, nn.modules.conv._ConvTransposeNd):  # (C_in, C_out/g, k...) → outputs first
            g = layer.groups
            w = w.reshape(g, w.shape[0] // g, *w.shape[1:]).transpose(1, 2).reshape(-1, w.shape[0] // g, *w.shape[2:])
        return w.reshape(w.shape[0], -1)

    def _layer_layout(self, index: int, rows: torch.Tensor) -> torch.Tensor:
        """Inverse of `_output_first`: a gradient back in the weight's own shape."""
        layer = self._layers[index]
        shape = layer.weight.shape
        if isinstance(layer, nn.modules.conv._ConvTransposeNd):
            g = layer.groups
            per_group = rows.reshape(g, shape[1], shape[0] // g, *shape[2:]).transpose(1, 2)
            return per_group.reshape(shape)
        return rows.reshape(shape)

    def _fold(self, index: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """γ/√(σ²+ε) as a column, and 1/√(σ²+ε), of the BatchNorm folded into the layer
        (None, None without one)."""
        norm = self._norms[index]
        if norm is None:
            return None, None
        inverse_std = torch.rsqrt(_wide(norm.running_var) + norm.eps)
        return (_wide(norm.weight) * inverse_std).unsqueeze(1), inverse_std

    def effective_weight(self, index: int) -> torch.Tensor:
        """The weight the quantizer will see, as (output channels, everything else)."""
        w = self._output_first(index, _wide(self._layers[index].weight))
        factor, _ = self._fold(index)
        return w if factor is None else w * factor

    # --- loss ---------------------------------------------------------------------------

    def layer_params(self) -> list[torch.Tensor]:
        """The learnable per-layer scalars, as one tensor (or nothing)."""
        return []

    def row_loss_and_grads(self, index: int, rows: torch.Tensor, scalar: torch.Tensor | None):
        """Each row's loss, its gradient and the gradient for the layer's learnable scalar
        (`scalar`, a 0-d tensor, or None); scalars stay tensors, so no step waits on a GPU."""
        raise NotImplementedError

    def _inputs(self) -> list[torch.Tensor]:
        weights = [layer.weight for layer in self._layers]
        gammas = [norm.weight for norm in self._norms if norm is not None]
        return [*weights, *gammas, *self.layer_params()]

    def forward(self) -> torch.Tensor:
        return _Loss.apply(self, *self._inputs())

    @torch.no_grad()
    def _loss_and_grads(self, inputs) -> tuple[torch.Tensor, list[torch.Tensor]]:
        params = self.layer_params()
        scalars = _wide(params[0].detach()) if params else None
        total, weight_grads, gamma_grads, param_grads = None, [], [], []
        for index, (layer, norm) in enumerate(zip(self._layers, self._norms)):
            raw = self._output_first(index, _wide(layer.weight))
            factor, inverse_std = self._fold(index)
            w = raw if factor is None else raw * factor
            rows = w if self.per_channel else w.reshape(1, -1)
            losses, grad_rows, grad_param = self.row_loss_and_grads(index, rows, None if scalars is None else scalars[index])
            share = self.strength / rows.shape[0]  # the layer's loss is the mean over its rows
            layer_loss = losses.sum() * share
            total = layer_loss if total is None else total + layer_loss
            grad_w = grad_rows.reshape(w.shape) * share
            if norm is not None:
                gamma_grads.append(_cast((grad_w * raw).sum(dim=1).mul_(inverse_std), norm.weight.dtype))
                grad_w.mul_(factor)
            weight_grads.append(_cast(self._layer_layout(index, grad_w), layer.weight.dtype))
            if grad_param is not None:
                param_grads.append(grad_param * share)
        grads = [*weight_grads, *gamma_grads]
        if params:
            grads.append(_cast(torch.stack(param_grads), params[0].dtype))
        return total, grads

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
    """R2 L-inf (R2-Loss, arXiv 2303.08253): L = max|w| of the layer (or of each channel);
    its gradient is sign(w) at the largest magnitude."""

    def row_loss_and_grads(self, index, rows, scalar):
        magnitude = rows.abs()
        peak, where = magnitude.max(dim=1, keepdim=True)
        grad = torch.zeros_like(rows).scatter_(1, where, torch.sign(rows.gather(1, where)))
        return peak.squeeze(1), grad, None


class MarginRegularizer(RangeRegularizerBase):
    """R2 Margin: a learnable margin M per layer, L = mean(max(|w| − |M|, 0)²) + |M|.
    The first term pulls weights inside the margin, the second shrinks the margin."""

    def __init__(self, model, strength=0.01, **options):
        super().__init__(model, strength, **options)
        with torch.no_grad():
            start = [0.5 * self.effective_weight(i).abs().max() for i in range(len(self._layers))]
        self.margins = nn.Parameter(torch.stack(start).float())

    def layer_params(self):
        return [self.margins]

    def row_loss_and_grads(self, index, rows, scalar):
        m = _cast(scalar, rows.dtype)
        margin = m.abs()
        excess = torch.relu(rows.abs() - margin)
        n = rows.shape[1]
        losses = (excess * excess).sum(dim=1) / n + margin
        grad = 2.0 * excess * torch.sign(rows) / n
        grad_margin = (1.0 - 2.0 * excess.sum(dim=1) / n).sum() * torch.sign(m)
        return losses, grad, grad_margin

    def learned(self, index):
        return {"margin": float(self.margins[index].abs())}


def soft_range_and_grads(rows: torch.Tensor, alpha: torch.Tensor):
    """s_max − s_min per row (DSMM's Eq. 1): the softmax(α·w)- and softmax(−α·w)-weighted
    means of w (softmax subtracts the row's max: the paper's W_max and W_min shifts), with
    d/dw = p(1 + α(w − s_max)) − q(1 − α(w − s_min)) and d/dα = Var_p(w) + Var_q(w)."""
    scaled = rows * alpha
    p = torch.softmax(scaled, dim=1)
    q = torch.softmax(scaled.neg_(), dim=1)
    above = rows - (p * rows).sum(dim=1, keepdim=True)  # w − s_max
    below = rows - (q * rows).sum(dim=1, keepdim=True)  # w − s_min
    p_above, q_below = p * above, q * below
    grad = (p - q).add_(p_above.add(q_below).mul_(alpha))
    grad_alpha = (p_above.mul_(above).add_(q_below.mul_(below))).sum(dim=1)
    return (below - above)[:, 0], grad, grad_alpha


class SoftMinMaxRegularizer(RangeRegularizerBase):
    """R2 Soft-Min-Max: L = s_max − s_min (as in DSMM) with a fixed temperature per layer,
    set so that α·std(w) = `sharpness` (the temperature is in units of the weights)."""

    def __init__(self, model, strength=0.01, sharpness: float = 5.0, **options):
        super().__init__(model, strength, **options)
        with torch.no_grad():
            temps = [sharpness / self.effective_weight(i).std().clamp(min=1e-8) for i in range(len(self._layers))]
        self.register_buffer("temperatures", torch.stack(temps).float())

    def row_loss_and_grads(self, index, rows, scalar):
        losses, grad, _ = soft_range_and_grads(rows, _cast(self.temperatures[index], rows.dtype))
        return losses, grad, None

    def learned(self, index):
        return {"temperature": float(self.temperatures[index])}


class DSMMRegularizer(RangeRegularizerBase):
    """DSMM (Differentiable Soft Min-Max, Eq. 1): L = (s_max − s_min) + e^(−α), the
    temperature α learnable per layer (initially 0.1); the e^(−α) term keeps α growing
    towards a hard min-max instead of collapsing to the mean."""

    def __init__(self, model, strength=0.01, initial_temperature: float = 0.1, **options):
        super().__init__(model, strength, **options)
        self.temperatures = nn.Parameter(torch.full((len(self._layers),), float(initial_temperature)))

    def layer_params(self):
        return [self.temperatures]

    def row_loss_and_grads(self, index, rows, scalar):
        alpha = _cast(scalar, rows.dtype)
        losses, grad, grad_alpha = soft_range_and_grads(rows, alpha)
        decay = torch.exp(-alpha)
        return losses + decay, grad, grad_alpha.sum() - decay * rows.shape[0]

    def learned(self, index):
        return {"temperature": float(self.temperatures[index])}


KINDS = {"linf": LInfRegularizer, "margin": MarginRegularizer, "soft-min-max": SoftMinMaxRegularizer, "dsmm": DSMMRegularizer}


def RangeRegularizer(model: nn.Module, kind: str = "dsmm", strength: float = 0.01, **options) -> RangeRegularizerBase:
    """The regularizer of `kind` (linf, margin, soft-min-max, dsmm) over `model`'s layers."""
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r} is not one of {', '.join(KINDS)}")
    return KINDS[kind](model, strength=strength, **options)
