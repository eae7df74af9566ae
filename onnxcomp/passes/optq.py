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
from onnxcomp.kernels.optq import DynamicBlocks, OptqResult, optq
from onnxcomp.kernels.quantize import Grid, Quantized, collapse, expand
from onnxcomp.layer_matrix import weight_from_matrix, weight_matrix
from onnxcomp.layers import WeightLayer

# Gram matrices stacked into one kernel call, at most (float64 bytes).
STACK_BYTES = 1 << 28


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

    def key(self, job: OptqJob) -> tuple:
        """Problems with equal keys can share one kernel call."""
        blocks = None if self.dynamic is None else self.dynamic.row_block.tobytes()
        return (self.matrix.shape[1:], job.grid, job.qt.scale.dtype.str, self.zero_point is None, blocks)


def _as_matrix(layer: WeightLayer, param, qt: Quantized, shape) -> np.ndarray:
    """A scale-layout parameter as one value per element of the layer's matrix form."""
    full = expand(np.asarray(param, dtype=np.float64), shape, qt.axis, qt.block_size)
    return np.ascontiguousarray(weight_matrix(layer, np.ascontiguousarray(full)))


def _dynamic_blocks(job: OptqJob) -> DynamicBlocks | None:
    """Which matrix row belongs to which block, when blocks are sets of rows that lie within
    one group (for ConvTranspose, blocks of input channels could cross groups: None)."""
    layer, qt, shape = job.layer, job.qt, job.w.shape
    if qt.block_size is None:
        return None
    if layer.node.op_type == "ConvTranspose" and (shape[0] // layer.groups) % qt.block_size:
        return None
    ids = np.arange(qt.scale.size, dtype=np.float64).reshape(qt.scale.shape)
    row_block = _as_matrix(layer, ids, qt, shape)[0, :, 0].astype(np.int64)
    high = _as_matrix(layer, np.broadcast_to(job.ratio_high, qt.scale.shape), qt, shape)
    low = _as_matrix(layer, np.broadcast_to(job.ratio_low, qt.scale.shape), qt, shape)
    return DynamicBlocks(row_block, high, low)


def _problem(job: OptqJob, config: QuantConfig) -> _Problem:
    layer, qt, shape = job.layer, job.qt, job.w.shape
    matrix = weight_matrix(layer, job.w.astype(np.float64))
    return _Problem(
        matrix=matrix,
        gram=np.broadcast_to(job.gram, (matrix.shape[0],) + job.gram.shape[1:]),
        scale=_as_matrix(layer, qt.scale, qt, shape),
        zero_point=None if qt.zero_point is None else _as_matrix(layer, qt.zero_point, qt, shape),
        dynamic=None if config.optq_act_order else _dynamic_blocks(job),
    )


def _stack(problems: list[_Problem]) -> _Problem:
    first = problems[0]

    def cat(arrays):
        return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)

    dynamic = None
    if first.dynamic is not None:
        dynamic = DynamicBlocks(
            first.dynamic.row_block,
            cat([np.broadcast_to(p.dynamic.ratio_high, p.matrix.shape) for p in problems]),
            cat([np.broadcast_to(p.dynamic.ratio_low, p.matrix.shape) for p in problems]),
        )
    return _Problem(
        matrix=cat([p.matrix for p in problems]),
        gram=cat([p.gram for p in problems]),
        scale=cat([p.scale for p in problems]),
        zero_point=None if first.zero_point is None else cat([p.zero_point for p in problems]),
        dynamic=dynamic,
    )


def _outcome(job: OptqJob, result: OptqResult, groups: slice, config: QuantConfig) -> OptqOutcome:
    """One layer's share of a (possibly stacked) kernel result, back in the ONNX layout."""
    layer, qt, shape = job.layer, job.qt, job.w.shape
    codes = weight_from_matrix(layer, result.codes[groups], shape)
    scale = collapse(weight_from_matrix(layer, result.scale[groups], shape), qt.axis, qt.block_size).astype(qt.scale.dtype)
    zero_point = None
    if result.zero_point is not None:
        zero_point = collapse(weight_from_matrix(layer, result.zero_point[groups], shape), qt.axis, qt.block_size).astype(np.int32)
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


def _batches(keyed: list[tuple[tuple, int, _Problem]]):
    """Job indices sharing a key, in runs whose Gram matrices fit in STACK_BYTES."""
    by_key: dict[tuple, list[tuple[int, _Problem]]] = {}
    for key, index, problem in keyed:
        by_key.setdefault(key, []).append((index, problem))
    for members in by_key.values():
        batch, size = [], 0
        for index, problem in members:
            if batch and size + problem.gram.nbytes > STACK_BYTES:
                yield batch
                batch, size = [], 0
            batch.append((index, problem))
            size += problem.gram.nbytes
        yield batch


def optq_quantize_all(jobs: list[OptqJob], config: QuantConfig, *, device: str = "cpu", done=None) -> list[OptqOutcome]:
    """Each job's codes rounded by OPTQ, its output error and its report note, in job order.
    `done(n)` is called as n more layers are finished (a progress bar's update)."""
    problems = [_problem(job, config) for job in jobs]
    outcomes: list[OptqOutcome | None] = [None] * len(jobs)
    for batch in _batches([(p.key(job), i, p) for i, (job, p) in enumerate(zip(jobs, problems))]):
        stacked = _stack([p for _, p in batch])
        result = optq(
            stacked.matrix,
            stacked.gram,
            stacked.scale,
            stacked.zero_point,
            jobs[batch[0][0]].grid,
            damp=config.optq_damp,
            act_order=config.optq_act_order,
            dynamic=stacked.dynamic,
            scale_dtype=jobs[batch[0][0]].qt.scale.dtype,
            device=device,
        )
        start = 0
        for index, problem in batch:
            groups = slice(start, start + problem.matrix.shape[0])
            outcomes[index] = _outcome(jobs[index], result, groups, config)
            start = groups.stop
        if done is not None:
            done(len(batch))
    return outcomes
