"""quantize-weights: round-to-nearest, each constant weight stored as a packed integer
initializer feeding DequantizeLinear (per-tensor, per-channel or blockwise)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
from onnxcomp.progress import stage

from onnxcomp.calibration.analysis import Calibration
from onnxcomp.calibration.sequential import PairedGram, SequentialStatistics
from onnxcomp.calibration.statistics import Gram
from onnxcomp.config import QuantConfig
from onnxcomp.kernels.quantize import Grid, Quantized, dequantize, grid_for, positive_scales, quantize, relative_mse
from onnxcomp.kernels.rate import rate_aware
from onnxcomp.layer_matrix import relative_output_error
from onnxcomp.layers import WeightLayer, computed_weight_sources, find_weight_layers, shared, weight_consumers
from onnxcomp.passes.bias_correction import correct_bias
from onnxcomp.passes import matmul_nbits
from onnxcomp.passes.graph_edit import NameAllocator, add_initializer
from onnxcomp.passes.optq import OptqJob, optq_quantize_all
from onnxcomp.passes.range_search import InputStatistics, choose_range
from onnxcomp.policy import STORAGE, check_block_size, layout, one_per_weight, packed_bytes, skip_reason, storage_bits
from onnxcomp.report import LayerRecord, Report

def emit_dequantize(graph: ir.Graph, names: NameAllocator, layer: WeightLayer, qt: Quantized, bits: int) -> ir.Value:
    """Add the packed codes, scale, zero point and a DequantizeLinear; return its output."""
    signed = qt.zero_point is None or bool((qt.zero_point < 0).any())  # see positive_scales
    onnx_type, np_type = STORAGE[(storage_bits(bits), signed)]
    base = layer.weight.name
    inputs = [
        add_initializer(graph, names, base + "_q", qt.q.astype(np_type), onnx_type),
        add_initializer(graph, names, base + "_scale", qt.scale),
    ]
    if qt.zero_point is not None:
        inputs.append(add_initializer(graph, names, base + "_zero_point", qt.zero_point.astype(np_type), onnx_type))
    attributes = {}
    if qt.axis is not None:
        attributes["axis"] = qt.axis
    if qt.block_size is not None:
        attributes["block_size"] = qt.block_size
    node = ir.node("DequantizeLinear", inputs, attributes=attributes, name=names.fresh(base + "_DequantizeLinear"))
    out = node.outputs[0]
    out.name = names.fresh(base + "_dequantized")
    out.type = layer.weight.type
    out.shape = layer.weight.shape
    # DequantizeLinear reads initializers only, so it can run first; the sort pass orders them.
    if graph.num_nodes():
        graph.insert_before(graph.node(0), node)
    else:
        graph.append(node)
    return out


def emit_sqrt_decode(graph: ir.Graph, names: NameAllocator, layer: WeightLayer, y: ir.Value) -> ir.Value:
    """y → y·|y| with Abs and Mul: the inverse of sqrt reshaping, in standard ONNX ops."""
    base = layer.weight.name
    magnitude = ir.node("Abs", [y], name=names.fresh(base + "_Abs"))
    magnitude.outputs[0].name = names.fresh(base + "_abs")
    decode = ir.node("Mul", [y, magnitude.outputs[0]], name=names.fresh(base + "_SqrtDecode"))
    out = decode.outputs[0]
    out.name = names.fresh(base + "_decoded")
    for value in (magnitude.outputs[0], out):
        value.type, value.shape = layer.weight.type, layer.weight.shape
    graph.insert_after(y.producer(), [magnitude, decode])  # kept in order: the sequential objective runs the graph mid-pass
    return out


@dataclass
class _Planned:
    """A layer on its way through the pass: its record, and what it will be replaced by."""

    layer: WeightLayer
    record: LayerRecord
    bits: int = 0
    w: np.ndarray | None = None
    qt: Quantized | None = None
    w_hat: np.ndarray | None = None  # what the graph will decode
    grid: Grid | None = None
    sqrt: bool = False
    ratios: dict = field(default_factory=dict)
    gram: Gram | None = None
    paired: PairedGram | None = None  # the sequential objective's statistics
    note: str = ""
    output_error: float | None = None


def _joined(*notes: str) -> str:
    """Report notes, the empty ones left out."""
    return "; ".join(filter(None, notes))


# Weight elements of the layers held back for OPTQ before they are rounded together.
OPTQ_WINDOW_ELEMENTS = 1 << 25


class QuantizeWeightsPass(ir.passes.InPlacePass):
    """Replace each quantizable weight W of a layer by DequantizeLinear(Q(W))."""

    label = "quantize-weights"

    def __init__(self, config: QuantConfig, report: Report, progress: bool = False, calibration: Calibration | None = None):
        super().__init__()
        self.config = config
        self.report = report
        self.progress = progress
        self.calibration = calibration

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        layers = one_per_weight(find_weight_layers(graph))
        computed = computed_weight_sources(graph)
        if computed:
            sources = ", ".join(f"{count} from {source}" for source, count in sorted(computed.items()))
            self.report.note("quantize-weights", "layers", f"left float: weights the graph computes ({sources})")
        if not layers:
            self.report.note("quantize-weights", "model", "nothing to quantize: no Conv, ConvTranspose, Gemm, MatMul or "
                                                          "Gather reads a stored float weight; the model is left as it is")
        check_block_size(layers, self.config)
        alone = [layer for layer in layers if not shared(layer)]  # a shared weight has no one input to measure
        grams = {}
        real_data = self.calibration is not None and self.calibration.user_data
        objective = self.config.range_objective
        # One rule for data: what needs statistics takes real inputs when given, synthetic ones
        # (with a warning) otherwise, and stops where --calib none forbids them.
        needs = [name for name, needed in (("--rounding optq", self.config.rounding == "optq"),
                                           (f"--range-objective {objective}", objective != "mse"),
                                           ("--bias-correction", self.config.bias_correction)) if needed]
        sequential = objective == "sequential" and (self.config.range_search or self.config.sqrt)
        if sequential:  # measured layer by layer, as the layers before are quantized
            calibration = self.calibration
            dataset = calibration.dataset(model, "--range-objective sequential")
            measure = SequentialStatistics(model, dataset, alone, calibration.device, calibration.progress)
        elif self.calibration is not None and (real_data or needs):
            purpose = needs[0] if needs else "the output error of each layer"
            stats = self.calibration.statistics(model, purpose, layers=[l for l in alone if l.rows_source is not None])
            grams = {layer: record.gram for layer, record in stats.layers.items()}
        names = NameAllocator(graph)
        edge = {id(layers[0]), id(layers[-1])} if layers and self.config.keep_first_last_bits else set()
        bar = stage(total=len(layers), desc="quantize", unit="layer", enabled=self.progress and len(layers) >= 8)
        window, held = [], 0  # layers held back so that OPTQ can round those of one shape together
        modified = False
        for layer in layers:
            bits = self.config.layer_bits(layer.name, layer.node.op_type, id(layer) in edge)
            paired = None
            if sequential and not skip_reason(layer, self.config) and not shared(layer):
                if window:  # the layers before this one must be quantized in the graph first
                    self._round_together(graph, names, window, bar)
                    window, held = [], 0
                paired = measure(model, layer)
            planned = self._plan(layer, bits, paired.current if paired else grams.get(layer), paired)
            self.report.layers.append(planned.record)  # filled in as the layer is replaced
            if self._needs_optq(planned) and planned.gram is not None:
                planned.w_hat = None  # OPTQ's codes replace round-to-nearest's
                window.append(planned)
                held += planned.w.size
                if held >= OPTQ_WINDOW_ELEMENTS:
                    self._round_together(graph, names, window, bar)
                    window, held = [], 0
                continue
            if self._needs_optq(planned):
                planned.note = _joined(planned.note, "optq: no input statistics, rounded to nearest")
            if planned.qt is not None:
                self._replace(graph, names, planned)
                modified = True
            bar.update(1)
        if window:
            self._round_together(graph, names, window, bar)
            modified = True
        bar.close()
        if any(node.domain == "com.microsoft" for node in graph):
            model.opset_imports.setdefault("com.microsoft", 1)
        if modified and self.calibration is not None:
            self.calibration.mark_stale()
        return ir.passes.PassResult(model, modified=modified)

    def _needs_optq(self, planned: _Planned) -> bool:
        # An embedding table has no inputs to balance.
        return self.config.rounding == "optq" and planned.qt is not None and planned.layer.node.op_type != "Gather"

    def _plan(self, layer: WeightLayer, bits: int, gram: Gram | None, paired: PairedGram | None = None) -> _Planned:
        """The record, and round-to-nearest (or the range search's) codes under the chosen
        scales; OPTQ, where asked for, rounds them again in `_round_together`. `gram`: the
        statistics of the inputs the layer receives; `paired` adds those of the reference."""
        w = layer.weight.const_value.numpy()
        record = LayerRecord(
            name=layer.name,
            op=layer.node.op_type,
            weight=layer.weight.name,
            shape=tuple(int(d) for d in w.shape),
            range_before=(float(w.min()), float(w.max())) if w.size else (0.0, 0.0),
            bytes_before=int(w.nbytes),
            bytes_after=int(w.nbytes),
        )
        planned = _Planned(layer, record, bits, w, gram=gram, paired=paired)
        reason = skip_reason(layer, self.config)
        if reason:
            record.note = reason
            return planned
        axis, block_size, record.granularity, planned.note = layout(layer, self.config, bits)
        float_zero = self.config.zero_point == "float" and matmul_nbits.usable(layer, block_size, bits, real_zero=True)
        if self.config.zero_point == "float" and not float_zero:
            planned.note = _joined(planned.note, "integer zero point: real ones need a blockwise MatMul at 2-4 bits")
        planned.grid = grid_for(bits, self.config.asymmetric, float_zero)
        if self.config.range_search or self.config.sqrt:
            inputs = None if gram is None else InputStatistics(gram.matrix)
            if paired is not None:
                inputs = InputStatistics(gram.matrix, paired.cross, paired.reference.matrix)
            choice = choose_range(layer, w, planned.grid, axis, block_size, self.config, inputs)
            planned.qt, planned.w_hat, planned.sqrt = choice.qt, choice.w_hat, choice.sqrt
            planned.ratios = {"ratio_high": choice.ratio_high, "ratio_low": choice.ratio_low}
            record.range_search = choice.summary
        else:
            planned.qt = quantize(w, planned.grid, axis=axis, block_size=block_size)
            planned.w_hat = dequantize(planned.qt)
        if self.config.rate_lambda:  # OPTQ falls back to these codes, and plans its rate with their histogram
            planned.qt = rate_aware(w, planned.qt, planned.grid, self.config.rate_lambda)
            planned.w_hat = dequantize(planned.qt)
        return planned

    def _round_together(self, graph: ir.Graph, names: NameAllocator, window: list[_Planned], bar) -> None:
        """OPTQ over the window's layers in as few kernel calls as their shapes allow, then
        each weight replaced."""
        jobs = [OptqJob(p.layer, p.w, p.qt, p.grid, p.gram.matrix, **p.ratios, rate_lambda=self.config.rate_lambda)
                for p in window]
        device = self.calibration.device if self.calibration is not None else "cpu"
        outcomes = optq_quantize_all(jobs, self.config, device=device, done=bar.update)
        for planned, outcome in zip(window, outcomes):
            planned.qt, planned.output_error = outcome.qt, outcome.output_error
            planned.w_hat = dequantize(outcome.qt)
            planned.note = _joined(planned.note, outcome.note)
            self._replace(graph, names, planned)

    def _lay_out_for_target(self, planned: _Planned) -> bool:
        """Put planned.qt in the form the target runs (the same decoded values); whether the
        layer becomes a MatMulNBits."""
        layer, qt = planned.layer, planned.qt
        if self.config.target == "portable":
            positive = positive_scales(qt)
            if positive is not qt:
                flipped = int((positive.zero_point < 0).sum())
                planned.note = _joined(planned.note, f"positive scales: {flipped} of {positive.scale.size} groups take a "
                                                     "zero point of -1 (same values)")
            planned.qt = positive
            return False
        packed = self.config.act_bits is None and not planned.sqrt  # W8A8 and sqrt decoding keep DequantizeLinear
        blocked = matmul_nbits.as_blocks(layer, qt) if packed and qt.block_size is None else None
        if blocked is not None and matmul_nbits.usable(layer, blocked.block_size, planned.bits):
            planned.qt = blocked  # per channel as MatMulNBits takes it: a scale repeated per block
            planned.note = _joined(planned.note, f"scales repeated per block of {blocked.block_size} for MatMulNBits")
        return planned.grid.float_zero or (packed and matmul_nbits.usable(layer, planned.qt.block_size, planned.bits))

    def _replace(self, graph: ir.Graph, names: NameAllocator, planned: _Planned) -> None:
        nbits = self._lay_out_for_target(planned)
        layer, record, qt, w, w_hat, gram = planned.layer, planned.record, planned.qt, planned.w, planned.w_hat, planned.gram
        if not nbits:  # else the MatMul itself is replaced, below, once its bias is corrected
            dq_out = emit_dequantize(graph, names, layer, qt, planned.bits)
            if planned.sqrt:
                dq_out = emit_sqrt_decode(graph, names, layer, dq_out)
            readers = weight_consumers(layer.weight)
            if len(readers) > 1:
                planned.note = _joined(planned.note, f"one DequantizeLinear read by {len(readers)} layers "
                                                     f"({', '.join(node.op_type for node, _ in readers)})")
            ir.convenience.replace_all_uses_with(layer.weight, dq_out)
            if not list(layer.weight.uses()) and layer.weight.name in graph.initializers:
                graph.initializers.pop(layer.weight.name)
        record.bits = planned.bits
        record.grid = f"{'u' if planned.grid.asymmetric else ''}int{storage_bits(planned.bits)} {planned.grid.label}"
        record.range_after = (float(w_hat.min()), float(w_hat.max()))
        record.relative_mse = relative_mse(w, w_hat)
        record.bytes_after = packed_bytes(qt, planned.bits)
        record.note = planned.note
        if gram is not None:
            if planned.output_error is None:  # OPTQ measured it already
                planned.output_error = relative_output_error(layer, gram.matrix, w, w_hat)
            record.output_error = planned.output_error
            if self.config.bias_correction:
                reference_mean = planned.paired.reference.mean if planned.paired is not None else None
                corrected = correct_bias(graph, names, layer, gram.mean, w, w_hat, reference_mean) is not None
                record.note = _joined(record.note, "bias corrected" if corrected else "no bias to correct")
        if nbits:
            level = self.config.nbits_accuracy(planned.bits)
            matmul_nbits.replace_with_matmul_nbits(graph, names, layer, qt, planned.bits, level)
            kind = ", real zero points" if planned.grid.float_zero else ""
            record.note = _joined(record.note, f"MatMulNBits (accuracy level {level}{kind})")
