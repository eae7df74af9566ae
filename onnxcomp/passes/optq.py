"""OPTQ rounding of layers under the scales quantize-weights chose (kernel:
onnxcomp/kernels/optq.py), mapped between the ONNX weight layout and the matrix form.

Layers whose matrices have one shape, one grid and one block layout (the repeated blocks of
a transformer) go through the kernel together, stacked as groups: the sweep's per-row steps,
whose cost is mostly fixed, then serve all of them at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnxcomp.config import QuantConfig
from onnxcomp.kernels.optq import DynamicBlocks, OptqResult, RateTerm, optq
from onnxcomp.kernels.quantize import Grid, Quantized, collapse, expand
from onnxcomp.kernels.rate import code_costs
from onnxcomp.layer_matrix import weight_from_matrix, weight_matrix
from onnxcomp.layers import WeightLayer

# One kernel call stacks layers up to these sizes: Gram matrices (float64 bytes) and weights
# (elements; each costs a few float64 copies in the matrix form).
STACK_GRAM_BYTES = 1 << 28
STACK_ELEMENTS = 1 << 20


@dataclass
class OptqJob:
    """One layer to round: its weight, the round-to-nearest result whose scales OPTQ keeps
    (or, for blocks, re-chooses with the same clip ratios), and its input Gram matrix."""

    layer: WeightLayer
    w: np.ndarray
    qt: Quantized
    grid: Grid
    gram: np.ndarray  # (1 or groups, reduction, reduction)
    ratio_high: np.ndarray | float = 1.0
    ratio_low: np.ndarray | float = 1.0
    rate_lambda: float = 0.0  # > 0: codes rate-aware, `qt` holding rate-aware round to nearest's


@dataclass
class OptqOutcome:
    qt: Quantized
    output_error: float  # tr(ΔWᵀHΔW)/tr(WᵀHW) after rounding
    note: str


@dataclass
class _Problem:
    """A job in the kernel's matrix form."""

    matrix: np.ndarray  # (groups, reduction, outputs)
    gram: np.ndarray  # (groups, reduction, reduction)
    scale: np.ndarray
    zero_point: np.ndarray | None
    dynamic: DynamicBlocks | None
    rate: RateTerm | None = None


def _as_matrix(layer: WeightLayer, param, qt: Quantized, shape) -> np.ndarray:
    """A scale-layout parameter as one value per element of the layer's matrix form."""
    full = expand(np.asarray(param, dtype=np.float64), shape, qt.axis, qt.block_size)
    return np.ascontiguousarray(weight_matrix(layer, np.ascontiguousarray(full)))


def _row_blocks(job: OptqJob, config: QuantConfig) -> np.ndarray | None:
    """The block of each matrix row, where blockwise scales are re-chosen as each block is
    reached: blocks must be sets of rows within one group (for ConvTranspose, blocks of
    input channels could cross groups). None where the scales stay as given."""
    layer, qt, shape = job.layer, job.qt, job.w.shape
    if config.optq_act_order or qt.block_size is None:
        return None
    if layer.node.op_type == "ConvTranspose" and (shape[0] // layer.groups) % qt.block_size:
        return None
    ids = np.arange(qt.scale.size, dtype=np.float64).reshape(qt.scale.shape)
    return _as_matrix(layer, ids, qt, shape)[0, :, 0].astype(np.int64)


def _key(job: OptqJob, row_blocks: np.ndarray | None) -> tuple:
    """Jobs with equal keys can share one kernel call."""
    shape = weight_matrix(job.layer, job.w).shape[1:]
    blocks = None if row_blocks is None else row_blocks.tobytes()
    return (shape, job.grid, job.qt.scale.dtype.str, job.qt.zero_point is None, blocks, job.rate_lambda)


def _problem(job: OptqJob, row_blocks: np.ndarray | None) -> _Problem:
    layer, qt, shape = job.layer, job.qt, job.w.shape
    matrix = weight_matrix(layer, job.w.astype(np.float64))
    dynamic = None
    if row_blocks is not None:
        ratios = [r if np.ndim(r) == 0 else _as_matrix(layer, r, qt, shape) for r in (job.ratio_high, job.ratio_low)]
        dynamic = DynamicBlocks(row_blocks, *ratios)
    rate = None
    if job.rate_lambda:  # one code histogram per layer, the same for each of its groups
        fallback = weight_matrix(layer, job.qt.q.astype(np.float64))
        costs = np.tile(code_costs(job.qt.q, job.grid), (fallback.shape[0], 1))
        rate = RateTerm(job.rate_lambda, costs, fallback)
    return _Problem(
        matrix=matrix,
        gram=np.broadcast_to(job.gram, (matrix.shape[0],) + job.gram.shape[1:]),
        scale=_as_matrix(layer, qt.scale, qt, shape),
        zero_point=None if qt.zero_point is None else _as_matrix(layer, qt.zero_point, qt, shape),
        dynamic=dynamic,
        rate=rate,
    )


def _stack(problems: list[_Problem]) -> _Problem:
    first = problems[0]

    def cat(arrays):
        return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)

    def ratios(which):
        values = [getattr(p.dynamic, which) for p in problems]
        if all(np.ndim(v) == 0 and v == values[0] for v in values):
            return values[0]  # one clip ratio for all (1.0 without range search): no copies
        return cat([np.broadcast_to(v, p.matrix.shape) for v, p in zip(values, problems)])

    dynamic = None
    if first.dynamic is not None:
        dynamic = DynamicBlocks(first.dynamic.row_block, ratios("ratio_high"), ratios("ratio_low"))
    rate = None
    if first.rate is not None:
        rate = RateTerm(first.rate.lam, cat([p.rate.costs for p in problems]), cat([p.rate.fallback for p in problems]))
    return _Problem(
        matrix=cat([p.matrix for p in problems]),
        gram=cat([p.gram for p in problems]),
        scale=cat([p.scale for p in problems]),
        zero_point=None if first.zero_point is None else cat([p.zero_point for p in problems]),
        dynamic=dynamic,
        rate=rate,
    )


def _outcome(job: OptqJob, result: OptqResult, groups: slice, config: QuantConfig) -> OptqOutcome:
    """One layer's share of a (possibly stacked) kernel result, back in the ONNX layout."""
    layer, qt, shape = job.layer, job.qt, job.w.shape
    codes = weight_from_matrix(layer, result.codes[groups], shape)
    scale = collapse(weight_from_matrix(layer, result.scale[groups], shape), qt.axis, qt.block_size).astype(qt.scale.dtype)
    zero_point = None
    if result.zero_point is not None:
        zero_point = collapse(weight_from_matrix(layer, result.zero_point[groups], shape), qt.axis, qt.block_size)
        zero_point = zero_point.astype(qt.scale.dtype if job.grid.float_zero else np.int32)
    notes = []
    kept = int(result.kept_nearest[groups].sum())
    if kept:
        notes.append(f"optq: round-to-nearest kept on {kept} of {result.kept_nearest[groups].size} channels")
    damp = float(result.damp[groups].max())
    if damp > config.optq_damp:
        notes.append(f"optq: dampening raised to {damp:g}")
    energy = float(result.energy[groups].sum())
    relative_error = float(result.error[groups].sum()) / energy if energy > 0 else 0.0
    quantized = Quantized(np.ascontiguousarray(codes), scale, zero_point, qt.axis, qt.block_size)
    return OptqOutcome(quantized, relative_error, "; ".join(notes))


def _batches(jobs: list[OptqJob], row_blocks: list[np.ndarray | None]):
    """Indices of jobs sharing a key, in runs within the stacking limits."""
    by_key: dict[tuple, list[int]] = {}
    for index, (job, blocks) in enumerate(zip(jobs, row_blocks)):
        by_key.setdefault(_key(job, blocks), []).append(index)
    for members in by_key.values():
        batch, gram_bytes, elements = [], 0, 0
        for index in members:
            job = jobs[index]
            job_gram = 8 * job.layer.groups * job.gram.shape[-1] ** 2
            if batch and (gram_bytes + job_gram > STACK_GRAM_BYTES or elements + job.w.size > STACK_ELEMENTS):
                yield batch
                batch, gram_bytes, elements = [], 0, 0
            batch.append(index)
            gram_bytes += job_gram
            elements += job.w.size
        yield batch


def optq_quantize_all(jobs: list[OptqJob], config: QuantConfig, *, device: str = "cpu", done=None) -> list[OptqOutcome]:
    """Each job's codes rounded by OPTQ, its output error and its report note, in job order.
    `done(n)` is called as n more layers are finished (a progress bar's update)."""
    outcomes: list[OptqOutcome | None] = [None] * len(jobs)
    row_blocks = [_row_blocks(job, config) for job in jobs]
    for batch in _batches(jobs, row_blocks):
        problems = [_problem(jobs[index], row_blocks[index]) for index in batch]
        stacked, sizes = _stack(problems), [p.matrix.shape[0] for p in problems]
        del problems  # the stacked copy is all the kernel needs
        first = jobs[batch[0]]
        result = optq(
            stacked.matrix,
            stacked.gram,
            stacked.scale,
            stacked.zero_point,
            first.grid,
            damp=config.optq_damp,
            act_order=config.optq_act_order,
            dynamic=stacked.dynamic,
            scale_dtype=first.qt.scale.dtype,
            device=device,
            rate=stacked.rate,
        )
        start = 0
        for index, size in zip(batch, sizes):
            groups = slice(start, start + size)
            outcomes[index] = _outcome(jobs[index], result, groups, config)
            start = groups.stop
        if done is not None:
            done(len(batch))
    return outcomes
