"""OPTQ (GPTQ) rounding: quantize a layer's reduction axis one row at a time and spread
each row's rounding error over the rows not yet quantized, so the layer's outputs on the
calibration data move as little as possible (arrays in, arrays out; torch inside).

In the matrix form of `onnxcomp.layer_matrix` (output = X @ M, M of shape (reduction,
outputs) per group, H = XᵀX), rounding row r to q_r leaves the error e_r = (m_r − q̂_r)/U_rr,
and the best correction of the later rows is m_{r+1:} −= U_{r,r+1:}ᵀ e_r, where U is the upper
Cholesky factor of H⁻¹ (dampened: H + λ·mean(diag H)·I). Updates are applied lazily: within a
batch of rows at once, and to the rows after it with one matrix product.

Scales either stay as given (per channel, per tensor, or blockwise from the original
weights), or, for blocks, are fixed when the block's first row is reached, from the block's
weights as the earlier rows' corrections left them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnxcomp.kernels.quantize import Grid


@dataclass(frozen=True)
class DynamicBlocks:
    """Blockwise scales chosen during rounding: `row_block[r]` is the block of reduction row
    r, and each block's range is shrunk by its clip ratios ((groups, reduction, outputs), the
    same on every row of a block; 1.0 for the full range)."""

    row_block: np.ndarray
    ratio_high: np.ndarray | float = 1.0
    ratio_low: np.ndarray | float = 1.0


@dataclass
class OptqResult:
    codes: np.ndarray  # (groups, reduction, outputs) int32
    scale: np.ndarray  # (groups, reduction, outputs): every element's scale, float64
    zero_point: np.ndarray | None  # same shape, or None on a symmetric grid
    error: np.ndarray  # (groups, outputs): δᵀHδ of the rounding kept
    error_nearest: np.ndarray  # (groups, outputs): δᵀHδ of round-to-nearest under the given scales
    fallback: int  # output channels where round-to-nearest was kept, being no worse
    damp: float  # the dampening that made H positive definite (a fraction of mean(diag H))


def _torch():
    from onnxcomp.kernels.magr import _torch as load

    return load()


def _inverse_cholesky(h, damp: float):
    """Upper Cholesky factor of (H + damp·mean(diag H)·I)⁻¹ per group, raising the
    dampening tenfold (up to 3 times) where H is too close to singular."""
    torch = _torch()
    diag = torch.diagonal(h, dim1=-2, dim2=-1)
    mean = diag.mean(dim=-1).clamp(min=torch.finfo(h.dtype).tiny)
    eye = torch.eye(h.shape[-1], dtype=h.dtype, device=h.device)
    dead = diag <= 0  # inputs that are always zero: any rounding of their rows is exact
    for attempt in range(4):
        lam = damp * 10**attempt
        dampened = h + torch.diag_embed(dead.to(h.dtype)) * mean[:, None, None] + eye * (lam * mean)[:, None, None]
        lower, info = torch.linalg.cholesky_ex(dampened)
        if not info.any():
            inverse = torch.cholesky_inverse(lower)
            return torch.linalg.cholesky(inverse, upper=True), lam
    raise np.linalg.LinAlgError("H is not positive definite even with 1000x the dampening")


def _torch_dtype(dtype):
    torch = _torch()
    name = np.dtype(dtype).name
    return torch.bfloat16 if name == "bfloat16" else getattr(torch, name)


def _block_params(values, grid: Grid, ratio_high, ratio_low, dtype):
    """Scale and zero point of one block per output, from its current weights (rows axis 1),
    rounded to the stored scale dtype as quantize() does."""
    torch = _torch()
    if grid.asymmetric:
        lo = values.amin(dim=1).clamp(max=0.0) * ratio_low
        hi = values.amax(dim=1).clamp(min=0.0) * ratio_high
        scale = (hi - lo) / (grid.qmax - grid.qmin)
    else:
        peak = values.abs().argmax(dim=1, keepdim=True)
        scale = values.gather(1, peak).squeeze(1) * ratio_high / grid.qmin
    scale = scale.to(_torch_dtype(dtype)).to(values.dtype)
    scale = torch.where(torch.isfinite(scale) & (scale != 0), scale, torch.ones_like(scale))
    zero = torch.clamp(torch.round(grid.qmin - lo / scale), grid.qmin, grid.qmax) if grid.asymmetric else None
    return scale, zero


def _round(w, scale, zero, grid: Grid):
    """Codes and their decoded values, as QuantizeLinear/DequantizeLinear compute them."""
    torch = _torch()
    offset = 0.0 if zero is None else zero
    q = torch.clamp(torch.round(w / scale) + offset, grid.qmin, grid.qmax)
    return q, (q - offset) * scale


def _output_error(delta, h):
    """δᵀHδ per output column: (groups, outputs)."""
    return (h @ delta * delta).sum(dim=1)


def _block_starts(dynamic: DynamicBlocks | None) -> dict[int, np.ndarray]:
    """First row of each block → all its rows."""
    starts: dict[int, np.ndarray] = {}
    if dynamic is not None:
        for block in np.unique(dynamic.row_block):
            members = np.flatnonzero(dynamic.row_block == block)
            starts[int(members[0])] = members
    return starts


def _round_rows(m, s, z, upper, grid: Grid, dynamic: DynamicBlocks | None, batch_rows: int, scale_dtype):
    """The OPTQ sweep over the rows of m (updated in place, as are s and z for dynamic
    blocks); the codes."""
    torch = _torch()
    starts = _block_starts(dynamic)
    if starts:
        high = torch.tensor(np.broadcast_to(dynamic.ratio_high, m.shape), dtype=m.dtype, device=m.device)
        low = torch.tensor(np.broadcast_to(dynamic.ratio_low, m.shape), dtype=m.dtype, device=m.device)
    # Lazy batches also end where a block starts, so its scale sees every earlier correction.
    bounds = sorted(set(range(0, m.shape[1], batch_rows)) | set(starts) | {m.shape[1]})
    codes = torch.empty_like(m)
    for start, end in zip(bounds[:-1], bounds[1:]):
        if start in starts:
            members = torch.tensor(starts[start], device=m.device)
            block_s, block_z = _block_params(m[:, members], grid, high[:, start], low[:, start], scale_dtype)
            s[:, members] = block_s[:, None]
            if z is not None:
                z[:, members] = block_z[:, None]
        part = m[:, start:end].clone()
        errors = torch.empty_like(part)
        u = upper[:, start:end, start:end]
        for i in range(end - start):
            q, decoded = _round(part[:, i], s[:, start + i], None if z is None else z[:, start + i], grid)
            codes[:, start + i] = q
            err = (part[:, i] - decoded) / u[:, i, i, None]
            part[:, i:] -= u[:, i, i:, None] * err[:, None, :]
            errors[:, i] = err
        m[:, end:] -= upper[:, start:end, end:].transpose(1, 2) @ errors
    return codes


def optq(
    matrix: np.ndarray,
    gram: np.ndarray,
    scale: np.ndarray,
    zero_point: np.ndarray | None,
    grid: Grid,
    *,
    damp: float = 0.01,
    act_order: bool = False,
    dynamic: DynamicBlocks | None = None,
    batch_rows: int = 128,
    scale_dtype=np.float32,
    device: str = "cpu",
) -> OptqResult:
    """Round `matrix` (groups, reduction, outputs) onto `grid` under `scale`/`zero_point`
    (that shape, every element's own), compensating errors through H = `gram` (groups or 1,
    reduction, reduction).

    `act_order` rounds rows in order of decreasing H diagonal (the most used inputs first);
    with `dynamic` blocks it keeps the given scales instead (blocks would be visited out of
    order). Each output channel keeps whichever of OPTQ and round-to-nearest (under the given
    scales) has the smaller δᵀHδ: OPTQ is never worse, even where dampening hurts.
    """
    torch = _torch()
    dev = torch.device("cuda" if device == "cuda" and torch.cuda.is_available() else "cpu")
    f64 = torch.float64
    m0 = torch.tensor(matrix, dtype=f64, device=dev)
    groups, rows, outputs = m0.shape
    h = torch.tensor(np.broadcast_to(gram, (groups, rows, rows)), dtype=f64, device=dev)
    given_s = torch.tensor(scale, dtype=f64, device=dev)
    given_z = None if zero_point is None else torch.tensor(zero_point, dtype=f64, device=dev)

    if act_order:
        dynamic = None
        order = torch.argsort(-torch.diagonal(h, dim1=-2, dim2=-1), dim=-1, stable=True)  # (g, R)
    else:
        order = torch.arange(rows, device=dev).expand(groups, rows)
    by_row = order[:, :, None].expand(groups, rows, outputs)
    m, s = m0.gather(1, by_row), given_s.gather(1, by_row)
    z = None if given_z is None else given_z.gather(1, by_row)
    h_ordered = h.gather(1, order[:, :, None].expand(groups, rows, rows)).gather(2, order[:, None, :].expand(groups, rows, rows))
    upper, lam = _inverse_cholesky(h_ordered, damp)
    codes = _round_rows(m, s, z, upper, grid, dynamic, batch_rows, scale_dtype)

    back = torch.argsort(order, dim=-1)[:, :, None].expand(groups, rows, outputs)
    codes, s = codes.gather(1, back), s.gather(1, back)
    z = None if z is None else z.gather(1, back)
    error = _output_error(m0 - (codes - (0.0 if z is None else z)) * s, h)
    nearest, decoded = _round(m0, given_s, given_z, grid)
    error_nearest = _output_error(m0 - decoded, h)
    keep_nearest = error_nearest <= error  # (g, N)
    pick = keep_nearest[:, None, :]
    codes, s = torch.where(pick, nearest, codes), torch.where(pick, given_s, s)
    z = None if z is None else torch.where(pick, given_z, z)
    return OptqResult(
        codes=codes.cpu().numpy().astype(np.int32),
        scale=s.cpu().numpy(),
        zero_point=None if z is None else z.cpu().numpy().astype(np.int32),
        error=torch.minimum(error, error_nearest).cpu().numpy(),
        error_nearest=error_nearest.cpu().numpy(),
        fallback=int(keep_nearest.sum()),
        damp=lam,
    )
