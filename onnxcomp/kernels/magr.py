"""MagR: per layer, the weights closest in output to the original ones with the smallest
largest magnitude, by proximal gradient descent (arrays in, arrays out; torch inside).

For each output channel w (a column of the layer's reduction × output matrix) and the
layer's input Gram matrix H = XᵀX, MagR solves

    min over w′ of  ½ (w′ − w)ᵀ Ĥ (w′ − w) + α ‖w′‖∞,    Ĥ = H / λmax(H),

so the gradient's Lipschitz constant is 1 and the step is 1:

    w′ ← prox_α‖·‖∞ (w′ − Ĥ (w′ − w)),   prox_t‖·‖∞(v) = v − t · P₁(v / t)

(Moreau decomposition; P₁ is the Euclidean projection onto the unit ℓ1 ball). With blocks,
‖·‖∞ is taken per block of the reduction axis, and the prox is applied per block.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from onnxcomp.kernels.torch_backend import load_torch, one_thread_on_cpu, torch_device


def _threshold(ordered, radius: float):
    """θ and the active count ρ from magnitudes sorted in descending order (last axis): the
    θ with Σ max(|v| − θ, 0) = radius, from cumulative sums."""
    torch = load_torch()
    cumulative = ordered.cumsum(dim=-1)
    counts = torch.arange(1, ordered.shape[-1] + 1, device=ordered.device, dtype=ordered.dtype)
    active = ordered * counts > cumulative - radius  # true on a prefix of the sorted entries
    rho = active.sum(dim=-1, keepdim=True).clamp(min=1)
    return (cumulative.gather(-1, rho - 1) - radius) / rho.to(ordered.dtype), rho


def _shrink_threshold(magnitude, radius: float, candidates: int):
    """θ per row (see _threshold). Only the `candidates` largest magnitudes are sorted: when
    fewer than that many stay active, θ is already exact (the active entries are a prefix
    of the sorted order); rows that need more are redone with a full sort."""
    torch = load_torch()
    k = min(candidates, magnitude.shape[-1])
    top, _ = torch.topk(magnitude, k, dim=-1, sorted=True)
    theta, rho = _threshold(top, radius)
    if k < magnitude.shape[-1]:
        redo = (rho == k).squeeze(-1)
        if redo.any():
            ordered, _ = torch.sort(magnitude[redo], dim=-1, descending=True)
            theta[redo] = _threshold(ordered, radius)[0]
    return theta


def project_l1_ball(v, radius: float = 1.0, candidates: int = 16):
    """Euclidean projection of each row of `v` (a torch tensor, last axis) onto the ℓ1 ball
    of `radius`: shrink every magnitude by θ (Duchi et al., 2008). Rows already inside the
    ball are returned unchanged."""
    torch = load_torch()
    magnitude = v.abs()
    inside = magnitude.sum(dim=-1, keepdim=True) <= radius
    theta = _shrink_threshold(magnitude, radius, candidates)
    return torch.where(inside, v, torch.sign(v) * (magnitude - theta).clamp(min=0))


def _prox_linf(v, t: float, block: int | None, candidates: int = 16):
    """prox of t‖·‖∞ per row (or per block of `block` entries along the last axis).

    By Moreau, v − t·P(v / t) with P the projection onto the unit ℓ1 ball; entry by entry
    that is v clipped to [−τ, τ], where Σ max(|v| − τ, 0) = t (τ = 0 when ‖v‖₁ ≤ t)."""
    torch = load_torch()
    shape = v.shape
    rows = v.reshape(*shape[:-1], shape[-1] // block, block) if block else v
    tau = _shrink_threshold(rows.abs(), t, candidates).clamp(min=0)
    return torch.minimum(torch.maximum(rows, -tau), tau).reshape(shape)


def _linf(w, block: int | None):
    """‖w‖∞ per row, or the sum over its blocks of each block's ‖·‖∞."""
    rows = w.reshape(*w.shape[:-1], w.shape[-1] // block, block) if block else w.unsqueeze(-2)
    return rows.abs().amax(dim=-1).sum(dim=-1)


@dataclass
class MagrResult:
    matrix: np.ndarray  # (groups, reduction, outputs): the new weights, in the input's layout
    objective_start: float
    objective_end: float
    objectives: list[float]  # at the start and after each step, float64
    channel_start: np.ndarray  # (groups, outputs): each output channel's share of the objective
    channel_end: np.ndarray
    iterations: int
    seconds: float
    dead: np.ndarray  # per group: True where the input carried no signal and nothing moved


@one_thread_on_cpu
def magr(
    matrix: np.ndarray,
    gram: np.ndarray,
    alpha: float,
    iterations: int = 200,
    block: int | None = None,
    tolerance: float = 1e-7,
    device: str = "cpu",
    min_eigenvalue: float = 0.0,
) -> MagrResult:
    """Reduce the largest magnitude of every output channel of `matrix` (groups, reduction,
    outputs) while keeping X·matrix, for H = `gram` (groups, reduction, reduction).

    Iterates in float32 on `device` (CUDA when asked and present); the objective is summed in
    float64 after every step, and the loop stops when it improves by less than `tolerance`
    relative. A group whose λmax(H) is not above `min_eigenvalue` (an input that is always
    zero) keeps its weights, and is flagged in `dead`.
    """
    torch = load_torch()
    start_time = time.perf_counter()
    dev = torch_device(device)
    largest = np.linalg.eigvalsh(gram)[:, -1]
    dead = ~(largest > min_eigenvalue)
    scale = np.where(dead, 0.0, 1.0 / np.where(dead, 1.0, largest))  # a dead group's weights do not move
    h = torch.tensor(gram * scale[:, None, None], dtype=torch.float32, device=dev)
    w0 = torch.tensor(matrix, dtype=torch.float32, device=dev).transpose(1, 2).contiguous()  # (g, out, red)
    w = w0.clone()

    def channel_objective(w, delta, grad):
        return 0.5 * torch.sum(delta * grad, dim=-1, dtype=torch.float64) + alpha * _linf(w, block).double()

    frozen = torch.tensor(dead, device=dev)[:, None, None]
    objectives: list[float] = []
    steps = 0
    while True:
        delta = w - w0
        grad = torch.bmm(delta, h)  # Ĥ symmetric: row by row, (w − w0) Ĥ; also the objective's fit term
        per_channel = channel_objective(w, delta, grad)
        objectives.append(float(per_channel.sum()))
        if steps == 0:
            channel_start = per_channel.cpu().numpy()
        converged = len(objectives) > 1 and objectives[-2] - objectives[-1] <= tolerance * abs(objectives[-2])
        if converged or steps == iterations:
            break
        w = torch.where(frozen, w0, _prox_linf(w - grad, alpha, block))
        steps += 1
    result = w.transpose(1, 2).cpu().numpy().astype(matrix.dtype)
    return MagrResult(
        result, objectives[0], objectives[-1], objectives, channel_start, per_channel.cpu().numpy(),
        steps, time.perf_counter() - start_time, dead,
    )
