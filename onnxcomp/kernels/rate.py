"""Rate-aware rounding (entropy-constrained scalar quantization): each code is chosen to
minimize its squared error plus λ times the bits the entropy coder will spend on it,
instead of the error alone.

The coder (the .onnxc container) codes a tensor's codes under their own histogram, so a
code costs −log₂ p(q) bits. Moving a weight that lies near the midpoint between two levels
to the more frequent one costs little error and saves bits; near zero this is a dead zone,
which is how L² unifies pruning with quantization. Errors are measured in squared steps of
the weight's own scale, so λ means the same in every layer: "one bit is worth λ squared
steps" (round to nearest's error is at most 0.25). The histogram and the choices are
alternated a few times (Lloyd's iteration for ECSQ), from round to nearest.
"""

from __future__ import annotations

import numpy as np

from onnxcomp.kernels.quantize import Grid, Quantized, expand

ROUNDS = 4


def code_costs(codes: np.ndarray, grid: Grid) -> np.ndarray:
    """−log₂ p(q) for every level of the grid (index q − qmin), from the codes' histogram;
    a level no code takes costs as much as one code would (add-one smoothing)."""
    counts = np.bincount((codes.reshape(-1) - grid.qmin).astype(np.int64), minlength=grid.qmax - grid.qmin + 1)
    probabilities = (counts + 1.0) / (counts.sum() + counts.size)
    return -np.log2(probabilities)


def rate_aware(w: np.ndarray, qt: Quantized, grid: Grid, lam: float, importance: np.ndarray | None = None) -> Quantized:
    """`qt`'s codes chosen again under its scales and zero points to minimize
    importance·((w − ŵ)/s)² + λ·bits(q); `importance` (broadcast to w, mean 1) weights the
    error of inputs the layer's outputs depend on more. λ = 0 gives `qt` back."""
    if lam <= 0:
        return qt
    shape = w.shape
    s = expand(qt.scale.astype(np.float64), shape, qt.axis, qt.block_size)
    z = 0.0 if qt.zero_point is None else expand(qt.zero_point.astype(np.float64), shape, qt.axis, qt.block_size)
    position = w.astype(np.float64) / s + z  # where w lies on the code axis
    weight = 1.0 if importance is None else np.broadcast_to(importance, shape)
    nearest = qt.q.astype(np.int64)
    candidates = np.stack([np.clip(nearest + step, grid.qmin, grid.qmax) for step in (-1, 0, 1)])
    distortion = weight * (position[None] - candidates) ** 2
    codes = nearest
    for _ in range(ROUNDS):
        bits = code_costs(codes, grid)[candidates - grid.qmin]
        chosen = np.take_along_axis(candidates, np.argmin(distortion + lam * bits, axis=0)[None], axis=0)[0]
        if np.array_equal(chosen, codes):
            break
        codes = chosen
    return Quantized(codes.astype(np.int32), qt.scale, qt.zero_point, qt.axis, qt.block_size)

