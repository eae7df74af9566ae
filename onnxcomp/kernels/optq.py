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

from onnxcomp.kernels.torch_backend import load_torch, one_thread_on_cpu, torch_device
from onnxcomp.kernels.quantize import Grid


@dataclass(frozen=True)
class DynamicBlocks:
    """Blockwise scales chosen during rounding: `row_block[r]` is the block of reduction row
    r, and each block's range is shrunk by its clip ratios ((groups, reduction, outputs), the
    same on every row of a block; 1.0 for the full range)."""

    row_block: np.ndarray
    ratio_high: np.ndarray | float = 1.0
    ratio_low: np.ndarray | float = 1.0


@dataclass(frozen=True)
class RateTerm:
    """Rate-aware rounding inside the sweep: each row's code minimizes its error, in squared
    steps weighted by what an error in that row costs the outputs (1/U_rr², relative to the
    row mean), plus `lam` times its bits under `costs` (groups, levels: −log₂ p per level,
    index q − qmin). `fallback`: the codes a column falls back to where OPTQ's error is no
    smaller (rate-aware round to nearest), (groups, reduction, outputs)."""

    lam: float
    costs: np.ndarray
    fallback: np.ndarray


@dataclass
class OptqResult:
    codes: np.ndarray  # (groups, reduction, outputs) int32
    scale: np.ndarray  # (groups, reduction, outputs): every element's scale, float64
    zero_point: np.ndarray | None  # same shape, or None on a symmetric grid
    error: np.ndarray  # (groups, outputs): δᵀHδ of the rounding kept
    error_nearest: np.ndarray  # (groups, outputs): δᵀHδ of round-to-nearest under the given scales
    energy: np.ndarray  # (groups, outputs): mᵀHm, the outputs' own energy
    kept_nearest: np.ndarray  # (groups, outputs): where round-to-nearest was kept, being no worse
    damp: np.ndarray  # (groups,): the dampening that made H positive definite (a fraction of mean(diag H))

    @property
    def fallback(self) -> int:
        return int(self.kept_nearest.sum())


def _inverse_cholesky(h, damp: float, dtype):
    """Upper Cholesky factor of (H + λ·mean(diag H)·I)⁻¹ per group, and λ per group: `damp`,
    raised tenfold (up to 3 times) for the groups whose H is too close to singular.

    With J the reversal of rows and columns, JHJ = LLᵀ gives H⁻¹ = (J L⁻¹ J)ᵀ(J L⁻¹ J), and
    J L⁻¹ J is upper triangular: one factorization and one triangular inverse, instead of
    factoring H, inverting, and factoring the inverse again. Computed in `dtype`."""
    torch = load_torch()
    diag = torch.diagonal(h, dim1=-2, dim2=-1)
    mean = diag.mean(dim=-1)
    mean = torch.where(mean > 0, mean, torch.ones_like(mean))  # H = 0: no rounding costs anything
    dead = diag <= 0  # inputs that are always zero: any rounding of their rows is exact
    lam = torch.full_like(mean, damp)
    lower = torch.empty(h.shape, dtype=dtype, device=h.device)
    todo = torch.arange(h.shape[0], device=h.device)
    for _ in range(4):
        shift = (lam[todo, None] + dead[todo].to(h.dtype)) * mean[todo, None]  # a diagonal added to H
        dampened = (h if len(todo) == h.shape[0] else h[todo]).flip(-2, -1).to(dtype)
        torch.diagonal(dampened, dim1=-2, dim2=-1).add_(shift.flip(-1).to(dtype))
        factor, info = torch.linalg.cholesky_ex(dampened)
        lower[todo] = factor
        todo = todo[info != 0]
        if not len(todo):
            eye = torch.eye(h.shape[-1], dtype=dtype, device=h.device)
            return torch.linalg.solve_triangular(lower, eye, upper=False).flip(-2, -1), lam.cpu().numpy()
        lam[todo] *= 10
    raise np.linalg.LinAlgError("H is not positive definite even with 1000x the dampening")


def _torch_dtype(dtype):
    torch = load_torch()
    name = np.dtype(dtype).name
    return torch.bfloat16 if name == "bfloat16" else getattr(torch, name)


def _block_params(values, grid: Grid, ratio_high, ratio_low, dtype):
    """Scale and zero point of one block per output, from its current weights (rows axis 1),
    rounded to the stored scale dtype as quantize() does (from float64, as quantize() computes)."""
    torch = load_torch()
    sweep_dtype, values = values.dtype, values.double()
    ratio_high, ratio_low = ratio_high.double(), ratio_low.double()
    if grid.float_zero:
        lo, hi = values.amin(dim=1), values.amax(dim=1)
        scale = (hi - lo) / (grid.qmax - grid.qmin)
    elif grid.asymmetric:
        lo = values.amin(dim=1).clamp(max=0.0) * ratio_low
        hi = values.amax(dim=1).clamp(min=0.0) * ratio_high
        scale = (hi - lo) / (grid.qmax - grid.qmin)
    else:
        peak = values.abs().argmax(dim=1, keepdim=True)
        scale = values.gather(1, peak).squeeze(1) * ratio_high / grid.qmin
    scale = scale.to(_torch_dtype(dtype)).to(values.dtype)
    scale = torch.where(torch.isfinite(scale) & (scale != 0), scale, torch.ones_like(scale))
    if grid.float_zero:
        zero = (grid.qmin - lo / scale).to(_torch_dtype(dtype)).to(values.dtype)
    else:
        zero = torch.clamp(torch.round(grid.qmin - lo / scale), grid.qmin, grid.qmax) if grid.asymmetric else None
    return scale.to(sweep_dtype), None if zero is None else zero.to(sweep_dtype)


def _round(w, scale, zero, grid: Grid):
    """Codes and their decoded values, as QuantizeLinear/DequantizeLinear compute them."""
    torch = load_torch()
    offset = 0.0 if zero is None else zero
    if grid.float_zero:  # a real zero point is added before rounding
        q = torch.clamp(torch.round(w / scale + offset), grid.qmin, grid.qmax)
    else:
        q = torch.clamp(torch.round(w / scale) + offset, grid.qmin, grid.qmax)
    return q, (q - offset) * scale


def _decode_rounded(w, scale, zero, grid: Grid):
    """(round(w/scale) + zero, clamped, − zero)·scale: what _round decodes, in fewer steps
    (the inner loop of the sweep runs once per reduction row)."""
    q = w / scale
    if grid.float_zero:
        q.add_(zero).round_().clamp_(grid.qmin, grid.qmax).sub_(zero)
        return q.mul_(scale)
    q.round_()
    if zero is None:
        q.clamp_(grid.qmin, grid.qmax)
    else:
        q.add_(zero).clamp_(grid.qmin, grid.qmax).sub_(zero)
    return q.mul_(scale)


def _quadratic(delta, h):
    """δᵀHδ per output column: (groups, outputs)."""
    product = h @ delta
    return product.mul_(delta).sum(dim=1)


def _block_starts(dynamic: DynamicBlocks | None) -> dict[int, np.ndarray]:
    """First row of each block → all its rows."""
    starts: dict[int, np.ndarray] = {}
    if dynamic is not None:
        for block in np.unique(dynamic.row_block):
            members = np.flatnonzero(dynamic.row_block == block)
            starts[int(members[0])] = members
    return starts


def _rate_aware_row(row, s, z, grid: Grid, lam: float, costs, importance):
    """Codes and decoded values of one row under the rate term: of the nearest level and its
    two neighbours, the one with the least importance·(distance in steps)² + lam·bits."""
    torch = load_torch()
    position = row / s + (0.0 if z is None else z)
    nearest = position.round().clamp(grid.qmin, grid.qmax)
    candidates = torch.stack([(nearest + step).clamp(grid.qmin, grid.qmax) for step in (-1.0, 0.0, 1.0)])
    bits = torch.gather(costs.expand(3, *costs.shape), 2, (candidates - grid.qmin).long())
    cost = (position - candidates).square_().mul_(importance) + lam * bits
    q = candidates.gather(0, cost.argmin(dim=0, keepdim=True))[0]
    return q, (q - (0.0 if z is None else z)) * s


def _round_rows(m, s, z, upper, grid: Grid, dynamic: DynamicBlocks | None, batch_rows: int, scale_dtype,
                rate: RateTerm | None = None):
    """The OPTQ sweep over the rows of m (updated in place, as are s and z for dynamic
    blocks); the codes."""
    torch = load_torch()
    starts = _block_starts(dynamic)
    if starts:
        first_rows = sorted(starts)  # a block's ratios, read on its first row
        high, low = (
            dict(zip(first_rows, torch.tensor(np.broadcast_to(ratio, m.shape)[:, first_rows], device=m.device).unbind(1)))
            for ratio in (dynamic.ratio_high, dynamic.ratio_low)
        )
    # Lazy batches also end where a block starts, so its scale sees every earlier correction.
    bounds = sorted(set(range(0, m.shape[1], batch_rows)) | set(starts) | {m.shape[1]})
    inverse_diagonal = 1.0 / torch.diagonal(upper, dim1=-2, dim2=-1)[:, :, None]
    codes = torch.empty_like(m)
    if rate is not None:
        importance = inverse_diagonal.square() / inverse_diagonal.square().mean(dim=1, keepdim=True)
        costs = torch.as_tensor(rate.costs, dtype=m.dtype, device=m.device)
    for start, end in zip(bounds[:-1], bounds[1:]):
        if start in starts:
            members = torch.tensor(starts[start], device=m.device)
            block_s, block_z = _block_params(m[:, members], grid, high[start], low[start], scale_dtype)
            s[:, members] = block_s[:, None]
            if z is not None:
                z[:, members] = block_z[:, None]
        part = m[:, start:end]  # corrected in place: row i is final once reached
        errors = torch.empty_like(part)
        u = upper[:, start:end, start:end]
        for i in range(end - start):
            row, error = part[:, i], errors[:, i]
            zero = None if z is None else z[:, start + i]
            if rate is None:
                decoded = _decode_rounded(row, s[:, start + i], zero, grid)
            else:
                codes[:, start + i], decoded = _rate_aware_row(row, s[:, start + i], zero, grid, rate.lam, costs,
                                                               importance[:, start + i])
            torch.sub(row, decoded, out=error)
            error.mul_(inverse_diagonal[:, start + i])
            if i + 1 < end - start:
                part[:, i + 1 :].baddbmm_(u[:, i, i + 1 :, None], error[:, None, :], alpha=-1)
        if rate is None:
            codes[:, start:end], _ = _round(part, s[:, start:end], None if z is None else z[:, start:end], grid)
        m[:, end:].baddbmm_(upper[:, start:end, end:].transpose(1, 2), errors, alpha=-1)
    return codes


@one_thread_on_cpu
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
    rate: RateTerm | None = None,
) -> OptqResult:
    """Round `matrix` (groups, reduction, outputs) onto `grid` under `scale`/`zero_point`
    (that shape, every element's own), compensating errors through H = `gram` (groups or 1,
    reduction, reduction).

    `act_order` rounds rows in order of decreasing H diagonal (the most used inputs first);
    with `dynamic` blocks it keeps the given scales instead (blocks would be visited out of
    order). Each output channel keeps whichever of OPTQ and round-to-nearest (under the given
    scales) has the smaller δᵀHδ: OPTQ is never worse, even where dampening hurts. With `rate`, codes
    are chosen rate-aware and the fallback is `rate.fallback` instead of round-to-nearest.
    """
    torch = load_torch()
    dev = torch_device(device)
    f64, f32 = torch.float64, torch.float32

    def tensor(array):  # shares the array's memory where it can
        array = np.ascontiguousarray(array, dtype=np.float64)
        return torch.from_numpy(array if array.flags.writeable else array.copy()).to(dev)

    m0 = tensor(matrix)
    groups, rows, outputs = m0.shape
    h = tensor(gram).expand(groups, rows, rows)
    given_s = tensor(scale)
    given_z = None if zero_point is None else tensor(zero_point)

    order = None
    if act_order:
        dynamic = None
        order = torch.argsort(-torch.diagonal(h, dim1=-2, dim2=-1), dim=-1, stable=True)  # (g, R)
        by_row = order[:, :, None].expand(groups, rows, outputs)
        m, s = m0.gather(1, by_row), given_s.gather(1, by_row)
        z = None if given_z is None else given_z.gather(1, by_row)
        h_ordered = h.gather(1, order[:, :, None].expand(groups, rows, rows)).gather(2, order[:, None, :].expand(groups, rows, rows))
    else:
        m, s, z, h_ordered = m0, given_s, given_z, h
    # The factorization and the sweep in float32, as GPTQ runs them (on MiniLM, embedding
    # cosines within 2e-4 of float64 at 4 and 2 bits, in half the time; the scales are float32
    # values already); the errors that decide what is kept, in float64.
    upper, lam = _inverse_cholesky(h_ordered, damp, f32)
    s, z = s.to(f32), None if z is None else z.to(f32)
    codes = _round_rows(m.to(f32), s, z, upper, grid, dynamic, batch_rows, scale_dtype, rate).to(f64)
    s, z = s.to(f64), None if z is None else z.to(f64)
    if order is not None:
        back = torch.argsort(order, dim=-1)[:, :, None].expand(groups, rows, outputs)
        codes, s = codes.gather(1, back), s.gather(1, back)
        z = None if z is None else z.gather(1, back)

    nearest = _round(m0, given_s, given_z, grid)[0] if rate is None else tensor(rate.fallback)
    stored = _torch_dtype(scale_dtype)

    def error_of(c, zp, sc):
        """δᵀHδ per output, the weights decoded in the scale's dtype as DequantizeLinear (and
        the report) decodes them."""
        delta = m0 - ((c if zp is None else c - zp) * sc).to(stored).to(f64)
        return _quadratic(delta, h)

    energy, error, error_nearest = _quadratic(m0, h), error_of(codes, z, s), error_of(nearest, given_z, given_s)
    # Equal weights, equal errors (the products' sums may round differently).
    same = (codes == nearest).all(dim=1) & (s == given_s).all(dim=1)
    if z is not None:
        same &= (z == given_z).all(dim=1)
    error = torch.where(same, error_nearest, error)
    keep_nearest = error_nearest <= error  # (g, N)
    pick = keep_nearest[:, None, :]
    codes, s = torch.where(pick, nearest, codes), torch.where(pick, given_s, s)
    z = None if z is None else torch.where(pick, given_z, z)
    return OptqResult(
        codes=codes.cpu().numpy().astype(np.int32),
        scale=s.cpu().numpy(),
        zero_point=None if z is None else z.cpu().numpy() if grid.float_zero else z.cpu().numpy().astype(np.int32),
        error=torch.minimum(error, error_nearest).cpu().numpy(),
        error_nearest=error_nearest.cpu().numpy(),
        energy=energy.cpu().numpy(),
        kept_nearest=keep_nearest.cpu().numpy(),
        damp=lam,
    )
