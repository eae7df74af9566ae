"""Run the model on calibration batches in onnxruntime and accumulate, per layer, the Gram
matrix of its input rows and, per activation, its range and histogram."""

from __future__ import annotations

import itertools
import logging
import math
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass
from onnxcomp.progress import stage

from onnxcomp.calibration.sources import CalibrationSet, Feeds
from onnxcomp.calibration.statistics import ActivationStatistics, Gram, LayerStatistics
from onnxcomp.errors import CalibrationError, RuntimeFailure
from onnxcomp.layer_matrix import UnsupportedLayer, input_rows
from onnxcomp.layers import WeightLayer, attr_int, reduction_depth
from onnxcomp.runtime import ORT_ERRORS, first_line, ort, providers_for

log = logging.getLogger(__name__)

# Input rows expanded at once (im2col multiplies a convolution's input by its kernel size).
_ROWS_CHUNK_ELEMENTS = 1 << 24
DEFAULT_MEMORY_BUDGET = 1 << 30


@dataclass
class Statistics:
    """Keyed by graph objects: layers by their view (a recurrent node holds two), activations
    by their value."""

    layers: dict[WeightLayer, LayerStatistics] = field(default_factory=dict)
    activations: dict[ir.Value, ActivationStatistics] = field(default_factory=dict)
    skipped: dict[WeightLayer, str] = field(default_factory=dict)  # layer → why it has no statistics


def _gram_shape(layer: WeightLayer) -> tuple[int, int]:
    """(groups, reduction length) of the layer's rows."""
    return layer.groups, reduction_depth(layer)


def no_rows_reason(layer: WeightLayer) -> str:
    """Why a layer without `rows_source` has no input statistics."""
    if not layer.recurrent:
        return "an embedding lookup multiplies no input"
    if layer.node.op_type == "GRU":
        return "GRU's R multiplies r⊙h (linear_before_reset = 0), not the hidden states"
    return "its hidden states (output Y) are not an output of the node"


def same_rows(a: WeightLayer, b: WeightLayer) -> bool:
    """Layers reading one input as plain rows (attention's Q, K and V) share one Gram."""
    plain = ("MatMul", "Gemm")
    transposed = any(attr_int(x.node, "transA", 0) for x in (a, b))
    return a.node.op_type in plain and b.node.op_type in plain and not transposed and _gram_shape(a) == _gram_shape(b)


def fetchable(value: ir.Value | None, graph: ir.Graph) -> bool:
    """A value of the main graph that is not known to be non-float (exporters often leave
    intermediate types unset)."""
    floats = (None, ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE)
    return value is not None and value.graph is graph and value.dtype in floats


class FetchSession:
    """onnxruntime on the model with extra values exposed as outputs.

    The model is saved, with its weights as external data, to a temporary folder, and its
    graph outputs restored at once: the caller's model is not copied in memory or changed.
    With `prefix`, the session holds only the nodes the values need (onnxruntime itself runs
    every node whatever is fetched), cut from a clone that shares the model's weights, and
    decodes dequantized weights once, at load, instead of fusing them into integer kernels.
    """

    def __init__(self, model: ir.Model, values: list[ir.Value], device: str, prefix: bool = False, synthetic: bool = False):
        self.hint = (
            "; synthetic inputs are made from the input types alone and may not fit this model: pass --calib "
            "with real inputs" if synthetic else "; check the calibration inputs against what the model expects"
        )
        self.inputs = {v.name for v in values if v.is_graph_input()}
        self.fetch = [v.name for v in values if not v.is_graph_input()]
        fetched = [v for v in values if not v.is_graph_input()]
        self.session = None
        if prefix:
            if not fetched:
                return  # graph inputs only: nothing to run
            model, fetched = _prefix_model(model, [v.name for v in fetched]), []
        graph = model.graph
        outputs = list(graph.outputs)
        extra = [v for v in fetched if v not in outputs]
        with tempfile.TemporaryDirectory(prefix="onnxcomp-calib-") as tmp:
            path = Path(tmp) / "model.onnx"
            graph.outputs.extend(extra)
            try:
                ir.save(model, path, external_data="model.onnx.data")
            finally:
                graph.outputs.clear()
                graph.outputs.extend(outputs)
            options = ort.SessionOptions()
            options.log_severity_level = 3
            if prefix:  # quantized weights decoded once, at load: exact float arithmetic, float speed
                options.add_session_config_entry("session.disable_quant_qdq", "1")
                # Sessions that take turns: idle threads spinning would slow the other one.
                options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            try:
                self.session = ort.InferenceSession(str(path), options, providers=providers_for(device))
            except ORT_ERRORS as err:
                raise RuntimeFailure(f"onnxruntime cannot load the model for calibration ({first_line(err)})") from None

    def run(self, feeds: Feeds) -> dict[str, np.ndarray]:
        """The exposed values on one batch."""
        try:
            results = dict(zip(self.fetch, self.session.run(self.fetch, feeds))) if self.fetch else {}
        except ORT_ERRORS as err:
            raise CalibrationError(f"onnxruntime could not run the model on calibration inputs ({first_line(err)}){self.hint}") from None
        results.update({name: feeds[name] for name in self.inputs})
        return results


def _prefix_model(model: ir.Model, names: list[str]) -> ir.Model:
    """A clone of `model` (weights shared) whose outputs are the values `names`, without the
    nodes they do not depend on."""
    clone = model.clone()
    produced = {v.name: v for node in clone.graph for v in node.outputs}
    clone.graph.outputs.clear()
    clone.graph.outputs.extend(produced[name] for name in names)
    RemoveUnusedNodesPass()(clone)
    return clone


def _groups_within(sizes: dict[ir.Value, int], budget: int) -> list[list[ir.Value]]:
    """Consecutive groups of values whose bytes per batch together stay within `budget`."""
    groups: list[list[ir.Value]] = [[]]
    used = 0
    for value, size in sizes.items():
        if groups[-1] and used + size > budget:
            groups.append([])
            used = 0
        groups[-1].append(value)
        used += size
    return groups


def row_chunks(
    layer: WeightLayer, x: np.ndarray, positions: int = 0, rng: np.random.Generator | None = None
) -> Iterator[np.ndarray]:
    """The layer's input rows (`input_rows`, at most `positions` per sample of a
    convolution, drawn by `rng`) for a batch, a few samples at a time, so that a
    convolution's expanded rows stay within _ROWS_CHUNK_ELEMENTS."""
    per_sample = max(1, x[:1].size * math.prod(layer.weight.shape[2:] or (1,)))
    step = max(1, _ROWS_CHUNK_ELEMENTS // per_sample)
    if layer.node.op_type in ("MatMul", "Gemm") or layer.recurrent:
        step = x.shape[0]  # already rows (a sequence's steps are read in order): no expansion
    for start in range(0, x.shape[0], step):
        yield input_rows(layer, x[start : start + step], positions, rng)


def collect(
    model: ir.Model,
    calibration: CalibrationSet,
    layers: Iterable[WeightLayer] = (),
    values: Iterable[ir.Value] = (),
    *,
    device: str = "cpu",
    progress: bool = False,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> Statistics:
    """Statistics of `layers` (Gram matrices) and `values` (ranges) over the calibration set.

    Layers whose input is not a float value of the main graph, or whose attributes cannot be
    written as rows, are listed in `skipped` with the reason.
    """
    graph = model.graph
    stats = Statistics()
    by_value: dict[ir.Value, list[WeightLayer]] = {}
    for layer in layers:
        source = layer.rows_source
        if source is None:
            stats.skipped[layer] = no_rows_reason(layer)
            continue
        if not fetchable(source, graph):
            stats.skipped[layer] = "its input is inside a subgraph or not a float tensor"
            continue
        siblings = by_value.setdefault(source, [])
        shared = next((stats.layers[s].gram for s in siblings if same_rows(s, layer)), None)
        stats.layers[layer] = LayerStatistics(shared or Gram.empty(*_gram_shape(layer)))
        siblings.append(layer)
    for value in values:
        if fetchable(value, graph):
            stats.activations[value] = ActivationStatistics(channel_axis=_channel_axis(value))
    wanted = list(dict.fromkeys([*by_value, *stats.activations]))
    if not wanted:
        return stats

    batches = calibration.batches()
    first = next(batches, None)
    if first is None:
        raise CalibrationError(f"calibration set {calibration.label} is empty; give it at least one sample")
    probe = FetchSession(model, wanted, device, synthetic=calibration.synthetic)
    one = probe.run({name: array[:1] for name, array in first.items()})
    sizes = {v: one[v.name].nbytes * _count(first) for v in wanted}
    groups = _groups_within(sizes, memory_budget)
    log.debug("calibration: %d values for %d layers in %d onnxruntime session(s), %.1f MiB per batch",
              len(wanted), len(stats.layers), len(groups), sum(sizes.values()) / 2**20)
    if len(groups) > 1:
        probe = None  # one session per group instead; do not hold two copies of the weights

    total = calibration.samples * len(groups) if calibration.samples else None
    with stage(total=total, desc="calibrate", unit="sample", enabled=progress) as bar:
        for index, group in enumerate(groups):
            session = probe if len(groups) == 1 else FetchSession(model, group, device, synthetic=calibration.synthetic)
            stream = itertools.chain([first], batches) if index == 0 else calibration.batches()
            for number, feeds in enumerate(stream):
                results = session.run(feeds)
                for value in group:
                    _update(stats, value, results[value.name], by_value.get(value, ()), number, _count(feeds), calibration)
                bar.update(_count(feeds))
    return stats


def _channel_axis(value: ir.Value) -> int:
    """Where a value's channels are: axis 1 when a convolution reads it (NCHW), else the
    last axis (a matrix product's features)."""
    convolved = any(user.op_type in ("Conv", "ConvTranspose") and index == 0 for user, index in value.uses())
    return 1 if convolved else -1


def _count(feeds: Feeds) -> int:
    return len(next(iter(feeds.values())))


def _update(
    stats: Statistics, value: ir.Value, x: np.ndarray, layers, batch_number: int, samples: int, calibration: CalibrationSet
) -> None:
    if not np.isfinite(x).all():
        raise CalibrationError(
            f"activation {value.name!r} holds NaN or Inf on calibration batch {batch_number}; "
            "check the calibration inputs (ranges, normalization) and the model"
        )
    if value in stats.activations:
        stats.activations[value].add(x)
    done: set[int] = set()  # Grams shared by several layers are accumulated once
    for layer in layers:
        record = stats.layers.get(layer)
        if record is None:
            continue
        if id(record.gram) not in done:
            try:
                for rows in row_chunks(layer, x, calibration.positions, calibration.position_rng(batch_number)):
                    record.gram.add(rows)
            except UnsupportedLayer as err:
                stats.skipped[layer] = f"no statistics: {err} is not supported"
                del stats.layers[layer]
                continue
            done.add(id(record.gram))
        record.samples += samples
