"""Sensitivity: what quantizing one layer alone does to the model's outputs, for every layer
and bit width, beside the layer-wise estimate tr(ΔWᵀHΔW)/tr(WᵀHW) the passes optimize.

The layer-wise estimate does not see how an error travels to the outputs; this measures it.
Every layer's weight becomes an input of one onnxruntime session that keeps its float value
as the default, so each (layer, bits) point is one run over the calibration batches with
that one weight fed decoded (rounded as compress rounds it): one session for the whole
table, nothing recompiled per point. The bit allocator plans with these points.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from onnxcomp.calibration.analysis import Calibration
from onnxcomp.config import QuantConfig
from onnxcomp.container.format import coded_bytes
from onnxcomp.errors import ConfigError
from onnxcomp.fidelity import mean_cosine
from onnxcomp.kernels.quantize import Quantized, dequantize, grid_for, quantize
from onnxcomp.kernels.rate import rate_aware
from onnxcomp.layer_matrix import relative_output_error
from onnxcomp.layers import WeightLayer, find_weight_layers, shared
from onnxcomp.passes.fold_bn import FoldBatchNormPass
from onnxcomp.passes.normalize import NormalizePass, default_opset
from onnxcomp.passes.optq import OptqJob, optq_quantize_all
from onnxcomp.policy import layout, one_per_weight, packed_bytes, skip_reason
from onnxcomp.progress import stage
from onnxcomp.report import Report, format_table
from onnxcomp.runtime import make_session, run

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Point:
    """One layer quantized alone at one bit width."""

    bits: int
    granularity: str  # the layout it used: channel, block32, ...
    block_size: int | None  # its blocks, None when not blockwise
    size: int  # bytes of the layer's codes, scales and zero points at these bits
    coded_size: int  # the same with the codes and zero points at their entropy (the .onnxc container)
    cosine: float  # the lowest mean output cosine to FP32 over the float outputs
    kl: float | None  # mean KL(FP32 ‖ quantized) of the softmax over the last axis, for outputs named *logits*
    estimate: float | None  # tr(ΔWᵀHΔW)/tr(WᵀHW) on the calibration data; None without input statistics


@dataclass
class LayerSensitivity:
    name: str
    op: str
    weights: int
    float_size: int  # bytes of the weight as stored (kept float)
    points: list[Point] = field(default_factory=list)


# The options a table's points depend on: a table is reused only under the same ones.
ROUNDING_OPTIONS = ("granularity", "block_size", "asymmetric", "rounding", "rate_lambda")


def rounding_options(config: QuantConfig) -> dict:
    """The ROUNDING_OPTIONS of `config`, as a table records them."""
    return {name: value for name, value in config.as_dict().items() if name in ROUNDING_OPTIONS}


@dataclass
class SensitivityTable:
    layers: list[LayerSensitivity]
    bits: tuple[int, ...]
    samples: int
    source: str  # where the calibration samples came from
    options: dict = field(default_factory=dict)  # ROUNDING_OPTIONS as measured

    def to_dict(self) -> dict:
        return {"bits": list(self.bits), "samples": self.samples, "calibration": self.source,
                "options": self.options, "layers": [asdict(layer) for layer in self.layers]}

    @classmethod
    def from_dict(cls, data: dict, where: str) -> SensitivityTable:
        """A table as `to_dict` (onnxcomp sensitivity --json) wrote it."""
        try:
            layers = [LayerSensitivity(**{**layer, "points": [Point(**p) for p in layer["points"]]}) for layer in data["layers"]]
            return cls(layers, tuple(data["bits"]), int(data["samples"]), str(data["calibration"]), dict(data["options"]))
        except (KeyError, TypeError, ValueError) as err:
            raise ConfigError(f"{where} is not a sensitivity table written by `onnxcomp sensitivity --json` "
                              f"({type(err).__name__}: {err}); measure it again") from None

    def to_table(self) -> str:
        """One row per layer: 1 − cosine at each bit width (the end-to-end loss) and the estimate."""
        header = ["layer", "op", "weights"]
        for bits in self.bits:
            header += [f"{bits}b 1-cos", f"{bits}b KL", f"{bits}b est."]
        rows = []
        for layer in self.layers:
            row = [layer.name, layer.op, f"{layer.weights:,}"]
            by_bits = {}
            for p in layer.points:  # the first layout measured at each width (several with block sizes to choose from)
                by_bits.setdefault(p.bits, p)
            for bits in self.bits:
                p = by_bits.get(bits)
                row += ["-", "-", "-"] if p is None else [
                    f"{1 - p.cosine:.2e}", "-" if p.kl is None else f"{p.kl:.2e}", "-" if p.estimate is None else f"{p.estimate:.2e}"]
            rows.append(row)
        return format_table([tuple(header), *map(tuple, rows)]) + f"\ncalibration: {self.source}"


def _logits(name: str) -> bool:
    return "logit" in name.lower()


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log softmax along the last axis, in float64."""
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def mean_kl(reference: np.ndarray, quantized: np.ndarray) -> float:
    """Mean over positions of KL(softmax(reference) ‖ softmax(quantized)) along the last axis."""
    log_p, log_q = log_softmax(reference), log_softmax(quantized)
    return float(np.mean(np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)))


class _OverridableWeights:
    """One onnxruntime session of `model` in which each layer's weight is an input that
    defaults to its stored value."""

    def __init__(self, model: ir.Model, layers: list[WeightLayer], device: str):
        graph = model.graph
        added = [layer.weight for layer in layers if not layer.weight.is_graph_input()]
        graph.inputs.extend(added)
        try:
            with tempfile.TemporaryDirectory(prefix="onnxcomp-sensitivity-") as tmp:
                path = Path(tmp) / "model.onnx"
                ir.save(model, path, external_data="model.onnx.data")
                self.session = make_session(path, accuracy_level=0, device=device, quiet=True)
        finally:
            for value in added:
                graph.inputs.remove(value)

    def run(self, feeds: dict[str, np.ndarray], what: str) -> dict[str, np.ndarray]:
        return run(self.session, feeds, what)


def _rounded(layers: list[WeightLayer], grams: dict, config: QuantConfig, bits: int) -> dict[WeightLayer, tuple[Quantized, str]]:
    """Each layer's codes at `bits`, rounded as compress would round it (to nearest, rate-aware
    with --rate-lambda, or by OPTQ where the layer has input statistics), and its layout."""
    found, jobs = {}, []
    for layer in layers:
        w = layer.weight.const_value.numpy()
        axis, block_size, granularity, _ = layout(layer, config, bits)
        grid = grid_for(bits, config.asymmetric)
        qt = quantize(w, grid, axis=axis, block_size=block_size)
        qt = rate_aware(w, qt, grid, config.rate_lambda)
        gram = grams.get(layer)  # none for an embedding table: it has no inputs to balance
        if config.rounding == "optq" and gram is not None:
            jobs.append(OptqJob(layer, w, qt, grid, gram.matrix, rate_lambda=config.rate_lambda))
        found[layer] = (qt, granularity)
    for job, outcome in zip(jobs, optq_quantize_all(jobs, config) if jobs else ()):
        found[job.layer] = (outcome.qt, found[job.layer][1])
    return found


def _point(layer: WeightLayer, qt: Quantized, bits: int, granularity: str, gram, session, batches, reference) -> Point:
    w = layer.weight.const_value.numpy()
    w_hat = dequantize(qt).astype(w.dtype)
    outputs: dict[str, list[np.ndarray]] = {}
    for feeds in batches:
        got = session.run({**feeds, layer.weight.name: w_hat}, f"the model with {layer.name} at {bits} bits")
        for name, value in got.items():
            outputs.setdefault(name, []).append(value)
    cosines, kls = [], []
    for name, parts in outputs.items():
        expected = reference[name]
        if expected[0].dtype.kind != "f":
            continue
        cosines.append(np.mean([mean_cosine(r, q) for r, q in zip(expected, parts)]))
        if _logits(name):
            kls.append(np.mean([mean_kl(r, q) for r, q in zip(expected, parts)]))
    estimate = None if gram is None else relative_output_error(layer, gram.matrix, w, w_hat)
    zero_points = 0 if qt.zero_point is None else qt.zero_point.nbytes if qt.zero_point.dtype.kind == "f" else coded_bytes(qt.zero_point)
    coded = coded_bytes(qt.q) + qt.scale.nbytes + zero_points
    cosine, kl = float(min(cosines)) if cosines else 1.0, float(max(kls)) if kls else None
    block_size = qt.block_size if granularity.startswith("block") else None  # a recurrent row's one "block" is per channel
    return Point(bits, granularity, block_size, packed_bytes(qt, bits), coded, cosine, kl, estimate)


def measure_sensitivity(model: ir.Model, config: QuantConfig, calibration: Calibration, bits: tuple[int, ...],
                        progress: bool = False, block_sizes: tuple[int, ...] = ()) -> SensitivityTable:
    """Every quantizable layer of `model` (changed in place: normalized, BatchNorms folded, as
    compress sees it) quantized alone under `config`'s grid and rounding (MagR and the range
    search left out), at each of `bits`, measured end to end on the calibration batches.
    Layers in blocks are measured at `config.block_size` and at each of `block_sizes` too."""
    report = Report()
    for pass_ in (NormalizePass(default_opset(model), report), FoldBatchNormPass(report), RemoveUnusedNodesPass()):
        model = pass_(model).model
    layers = [layer for layer in one_per_weight(find_weight_layers(model.graph))
              if skip_reason(layer, config) is None and layer.weight.graph is model.graph]
    dataset = calibration.dataset(model, "sensitivity")
    batches = list(dataset.batches())
    measured = [layer for layer in layers if layer.rows_source is not None and not shared(layer)]
    stats = calibration.statistics(model, "the layer-wise estimate", layers=measured) if measured else None
    grams = {} if stats is None else {layer: record.gram for layer, record in stats.layers.items()}
    session = _OverridableWeights(model, layers, calibration.device)
    reference: dict[str, list[np.ndarray]] = {}
    for feeds in batches:
        for name, value in session.run(feeds, "the model").items():
            reference.setdefault(name, []).append(value)
    rows = {layer: LayerSensitivity(layer.name, layer.node.op_type, int(layer.weight.const_value.size),
                                    int(layer.weight.const_value.nbytes)) for layer in layers}
    extra_blocks = [size for size in dict.fromkeys(block_sizes) if size != config.block_size]
    with stage(desc="sensitivity", unit="point", enabled=progress) as bar:
        for b in bits:
            for block_size in (config.block_size, *extra_blocks):
                setting = dataclasses.replace(config, block_size=block_size)
                blocked = [l for l in layers if layout(l, setting, b)[1] == block_size]
                for layer, (qt, granularity) in _rounded(layers if block_size == config.block_size else blocked, grams,
                                                         setting, b).items():
                    point = _point(layer, qt, b, granularity, grams.get(layer), session, batches, reference)
                    rows[layer].points.append(point)
                    log.debug("%s at %d bits, %s: 1 - cosine %.3g, estimate %s", layer.name, b, granularity,
                              1 - point.cosine, point.estimate)
                    bar.update(1)
    samples = sum(len(next(iter(f.values()))) for f in batches)
    return SensitivityTable(list(rows.values()), tuple(bits), samples, dataset.label, rounding_options(config))


def plot(table: SensitivityTable, path: str | Path) -> None:
    """1 − cosine per layer (end to end, lines) and the layer-wise estimate (dots), per bit width."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from onnxcomp.errors import MissingDependencyError

        raise MissingDependencyError("--plot needs matplotlib; pip install matplotlib") from None
    figure, axes = plt.subplots(figsize=(max(6.0, 0.18 * len(table.layers) + 2), 4.5))
    x = np.arange(len(table.layers))
    for index, bits in enumerate(table.bits):
        colour = f"C{index}"
        points = [next(p for p in layer.points if p.bits == bits) for layer in table.layers]
        axes.plot(x, [max(1 - p.cosine, 1e-9) for p in points], "-", color=colour, label=f"{bits} bits: 1 − cosine")
        axes.plot(x, [p.estimate if p.estimate else np.nan for p in points], ".", color=colour,
                  label=f"{bits} bits: layer-wise estimate")
    axes.set_yscale("log")
    axes.set_xlabel("layer (graph order)")
    axes.set_ylabel("error")
    axes.set_title(f"Each layer quantized alone ({table.samples} calibration samples)")
    axes.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
