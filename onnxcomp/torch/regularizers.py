"""Training-time range regularizers: losses that pull each layer's weights into a narrow
range, so that the trained model quantizes with less error.

Add `reg()` to the training loss and the regularizer's own parameters (DSMM's temperatures,
the margins) to the optimizer. Every loss is computed in at least float32 whatever the
autocast dtype (float64 weights stay float64), with log-sum-exp style softmaxes, so large
temperatures and large tensors neither overflow nor underflow.

Each kind writes its loss *and* its gradient in closed form, and `reg()` is a single
autograd node. On the CPU one call of a C kernel (`range_kernels.c`, built on first use)
computes every layer at once; elsewhere, or without a C compiler, torch operations compute
the same per layer. On a small CNN the fixed cost of the few dozen torch operations a layer
needs, not the arithmetic, would add a quarter to a training step; the kernel adds a few
percent (`benchmarks/regularizer_overhead.py`; gradients checked against finite differences
and the two backends against each other in the tests).
"""

from __future__ import annotations

import re

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from onnxcomp.torch import native

BACKENDS = ("auto", "c", "torch")
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
        if wanted and getattr(module, "weight", None) is not None and module.weight.numel() and not (exclude is not None and matches(name, module, exclude)):
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


def _dense(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t` as a contiguous tensor of `dtype` (itself when it already is one)."""
    return t if t.dtype == dtype and t.is_contiguous() else t.to(dtype).contiguous()


class _Loss(torch.autograd.Function):
    """reg() as one autograd node: forward computes the loss and every gradient at once."""

    @staticmethod
    def forward(ctx, reg, *inputs):
        loss, grads = reg._loss_and_grads(inputs)
        ctx.grads = grads
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        grads = ctx.grads  # kept: a graph retained for a second backward needs them again
        if grad_output.device.type == "cpu" and grad_output.item() == 1.0:  # loss + reg(): nothing to scale
            return (None, *grads)
        if all(g.dtype == grad_output.dtype for g in grads):
            return (None, *torch._foreach_mul(grads, grad_output))
        return (None, *[g * _cast(grad_output, g.dtype) for g in grads])


class RangeRegularizerBase(nn.Module):
    """Which weights are covered, how strongly, and the per-layer statistics.

    `fold_bn=True` regularizes W·γ/√(σ²+ε) per output channel for layers followed by a
    BatchNorm: the ONNX passes fold the BatchNorm first and quantize *that* weight, whose
    range can differ a lot from W's (γ gets its share of the gradient). `per_channel=True`
    penalizes each output channel's range (what per-channel quantization sees) instead of
    the whole layer's; the layer's loss is then the mean over its channels.

    `backend`: "auto" computes with the C kernel when the weights are on the CPU and a C
    compiler is at hand, with torch operations otherwise; "c" insists on the kernel (an
    error without it); "torch" never uses it. Both give the same values to rounding.

    Subclasses name their C kernel and give, for a layer's (folded) rows (R, n) in torch,
    each row's loss, its gradient (R, n) and the gradient for the layer's value (or None).
    """

    kernel = ""  # the kind's function in range_kernels.c
    decay = False  # whether each layer adds e^(−value) (DSMM)

    def __init__(self, model: nn.Module, strength: float = 0.01, include=None, exclude=None,
                 fold_bn: bool = False, per_channel: bool = False, backend: str = "auto"):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
        self.strength = strength
        self.per_channel = per_channel
        self.backend = backend
        layers = _covered(model, include, exclude)
        if not layers:
            raise ValueError("the regularizer covers no layer: the model has no Conv/Linear weights matching include/exclude")
        self.names = [name for name, _ in layers]
        self._layers = [module for _, module in layers]  # plain list: not registered as submodules
        norms = _following_batch_norms(model) if fold_bn else {}
        self._norms = [norms.get(module) for module in self._layers]
        self._has_gamma = [norm is not None and norm.weight is not None for norm in self._norms]
        self._gamma_count = sum(self._has_gamma)
        self._transposed = [isinstance(layer, nn.modules.conv._ConvTransposeNd) for layer in self._layers]
        shapes = [self._output_first(i, layer.weight).shape for i, layer in enumerate(self._layers)]
        eps = [0.0 if norm is None else norm.eps for norm in self._norms]
        self._kernel_layers = native.Layers([s[0] for s in shapes], [s[1] for s in shapes], eps)

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

    @staticmethod
    def _gamma(norm: nn.Module) -> torch.Tensor:
        return norm.weight if norm.weight is not None else torch.ones_like(norm.running_var)

    def _fold(self, index: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """γ/√(σ²+ε) as a column, and 1/√(σ²+ε), of the BatchNorm folded into the layer
        (None, None without one)."""
        norm = self._norms[index]
        if norm is None:
            return None, None
        inverse_std = torch.rsqrt(_wide(norm.running_var) + norm.eps)
        return (_wide(self._gamma(norm)) * inverse_std).unsqueeze(1), inverse_std

    def effective_weight(self, index: int) -> torch.Tensor:
        """The weight the quantizer will see, as (output channels, everything else)."""
        w = self._output_first(index, _wide(self._layers[index].weight))
        factor, _ = self._fold(index)
        return w if factor is None else w * factor

    # --- loss ---------------------------------------------------------------------------

    def layer_params(self) -> list[torch.Tensor]:
        """The learnable per-layer values, as one tensor (or nothing)."""
        return []

    def layer_values(self) -> torch.Tensor | None:
        """Per layer, the value its loss takes (a margin, a temperature), or None."""
        return None

    def row_loss_and_grads(self, rows: torch.Tensor, value: torch.Tensor | None):
        """In torch: each row's loss, its gradient and the gradient for the layer's value
        (a 0-d tensor, or None); values stay tensors, so no step waits on a GPU."""
        raise NotImplementedError

    def _inputs(self) -> list[torch.Tensor]:
        weights = [layer.weight for layer in self._layers]
        gammas = [norm.weight for norm, has_gamma in zip(self._norms, self._has_gamma) if has_gamma]
        return [*weights, *gammas, *self.layer_params()]

    def forward(self) -> torch.Tensor:
        return _Loss.apply(self, *self._inputs())

    def _use_kernel(self, weights) -> bool:
        if self.backend == "torch":
            return False
        usable = all(w.device.type == "cpu" for w in weights) and native.library() is not None
        if self.backend == "c" and not usable:
            raise RuntimeError("backend='c' needs the weights on the CPU and a C compiler to build the kernel; use backend='auto' or 'torch'")
        return usable

    @torch.no_grad()
    def _loss_and_grads(self, inputs) -> tuple[torch.Tensor, list[torch.Tensor]]:
        count = len(self._layers)
        weights, gammas, params = inputs[:count], inputs[count:count + self._gamma_count], inputs[count + self._gamma_count:]
        values = self.layer_values()
        terms = self._kernel_terms if self._use_kernel(weights) else self._torch_terms
        total, weight_grads, gamma_grads, dvalues = terms(weights, gammas, values)
        grads = [_cast(g, t.dtype) for g, t in zip([*weight_grads, *gamma_grads], [*weights, *gammas])]
        if params:
            grads.append(_cast(dvalues, params[0].dtype))
        return total, grads

    def _kernel_terms(self, weights, gammas, values):
        """Loss, weight and γ gradients, d loss / d value per layer: one call of the C kernel."""
        dtype = torch.float64 if any(w.dtype == torch.float64 for w in weights) else torch.float32
        sources = [
            w if w.dtype == dtype and not transposed and w.is_contiguous() else _dense(self._output_first(i, w), dtype)
            for i, (w, transposed) in enumerate(zip(weights, self._transposed))
        ]
        given, layer_gammas, variances = iter(gammas), [], []
        for norm, has_gamma in zip(self._norms, self._has_gamma):
            variance = None if norm is None else _dense(norm.running_var, dtype)
            layer_gammas.append(None if norm is None else _dense(next(given) if has_gamma else self._gamma(norm), dtype))
            variances.append(variance)
        loss, grads, gamma_grads, dvalues = native.run(
            self.kernel, self._kernel_layers, sources, layer_gammas, variances,
            None if values is None else _dense(values, dtype), self.strength, self.per_channel, self.decay)
        weight_grads = [g if s is w else self._layer_layout(i, g) for i, (g, s, w) in enumerate(zip(grads, sources, weights))]
        gamma_grads = [g for g, has_gamma in zip(gamma_grads, self._has_gamma) if has_gamma]
        return loss, weight_grads, gamma_grads, dvalues

    def _torch_terms(self, weights, gammas, values):
        """The same as `_kernel_terms`, in torch operations, layer by layer (γ, the same
        tensors as `gammas`, read through `_fold`)."""
        total, weight_grads, gamma_grads, dvalues = None, [], [], []
        for index, (weight, norm) in enumerate(zip(weights, self._norms)):
            raw = self._output_first(index, _wide(weight))
            factor, inverse_std = self._fold(index)
            w = raw if factor is None else raw * factor
            rows = w if self.per_channel else w.reshape(1, -1)
            value = None if values is None else _cast(values[index], rows.dtype)
            losses, grad_rows, dvalue = self.row_loss_and_grads(rows, value)
            share = self.strength / rows.shape[0]  # the layer's loss is the mean over its rows
            layer_loss = losses.sum() * share
            total = layer_loss if total is None else total + layer_loss
            grad_w = grad_rows.reshape(w.shape) * share
            if norm is not None:
                if norm.weight is not None:
                    gamma_grads.append((grad_w * raw).sum(dim=1).mul_(inverse_std))
                grad_w.mul_(factor)
            weight_grads.append(self._layer_layout(index, grad_w))
            if dvalue is not None:
                dvalues.append(dvalue.sum() * share)
        dvalues = torch.stack(dvalues) if dvalues else None
        if self.decay:
            term = self.strength * torch.exp(-_cast(values, dvalues.dtype))  # the mean of e^(−α) over a layer's rows
            total, dvalues = total + term.sum(), dvalues - term
        return total, weight_grads, gamma_grads, dvalues

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

    kernel = "linf"

    def row_loss_and_grads(self, rows, value):
        magnitude = rows.abs()
        peak, where = magnitude.max(dim=1, keepdim=True)
        grad = torch.zeros_like(rows).scatter_(1, where, torch.sign(rows.gather(1, where)))
        return peak.squeeze(1), grad, None


class MarginRegularizer(RangeRegularizerBase):
    """R2 Margin: a learnable margin M per layer, L = mean(max(|w| − |M|, 0)²) + |M|.
    The first term pulls weights inside the margin, the second shrinks the margin."""

    kernel = "margin"

    def __init__(self, model, strength=0.01, **options):
        super().__init__(model, strength, **options)
        with torch.no_grad():
            start = [0.5 * self.effective_weight(i).abs().max() for i in range(len(self._layers))]
        self.margins = nn.Parameter(torch.stack(start).float())

    def layer_params(self):
        return [self.margins]

    def layer_values(self):
        return self.margins.detach()

    def row_loss_and_grads(self, rows, value):
        margin = value.abs()
        excess = torch.relu(rows.abs() - margin)
        n = rows.shape[1]
        losses = (excess * excess).sum(dim=1) / n + margin
        grad = 2.0 * excess * torch.sign(rows) / n
        return losses, grad, (1.0 - 2.0 * excess.sum(dim=1) / n) * torch.sign(value)

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

    kernel = "soft_range"

    def __init__(self, model, strength=0.01, sharpness: float = 5.0, **options):
        super().__init__(model, strength, **options)
        with torch.no_grad():
            temps = [sharpness / self.effective_weight(i).std().clamp(min=1e-8) for i in range(len(self._layers))]
        self.register_buffer("temperatures", torch.stack(temps).float())

    def layer_values(self):
        return self.temperatures

    def row_loss_and_grads(self, rows, value):
        losses, grad, _ = soft_range_and_grads(rows, value)
        return losses, grad, None

    def learned(self, index):
        return {"temperature": float(self.temperatures[index])}


class DSMMRegularizer(RangeRegularizerBase):
    """DSMM (Differentiable Soft Min-Max, Eq. 1): L = (s_max − s_min) + e^(−α), the
    temperature α learnable per layer (initially 0.1); the e^(−α) term keeps α growing
    towards a hard min-max instead of collapsing to the mean."""

    kernel = "soft_range"
    decay = True

    def __init__(self, model, strength=0.01, initial_temperature: float = 0.1, **options):
        super().__init__(model, strength, **options)
        self.temperatures = nn.Parameter(torch.full((len(self._layers),), float(initial_temperature)))

    def layer_params(self):
        return [self.temperatures]

    def layer_values(self):
        return self.temperatures.detach()

    def row_loss_and_grads(self, rows, value):
        return soft_range_and_grads(rows, value)

    def learned(self, index):
        return {"temperature": float(self.temperatures[index])}


KINDS = {"linf": LInfRegularizer, "margin": MarginRegularizer, "soft-min-max": SoftMinMaxRegularizer, "dsmm": DSMMRegularizer}


def RangeRegularizer(model: nn.Module, kind: str = "dsmm", strength: float = 0.01, **options) -> RangeRegularizerBase:
    """The regularizer of `kind` (linf, margin, soft-min-max, dsmm) over `model`'s layers;
    options: include, exclude, fold_bn, per_channel, backend, and the kind's own."""
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r} is not one of {', '.join(KINDS)}")
    return KINDS[kind](model, strength=strength, **options)
