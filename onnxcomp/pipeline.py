"""The ordered passes a configuration asks for, and the file-level compress entry point."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass, TopologicalSortPass

from onnxcomp.calibration.analysis import NO_DATA, Calibration
from onnxcomp.check import SAMPLES, end_to_end_check, warn_if_far
from onnxcomp.config import QuantConfig
from onnxcomp.errors import AlreadyQuantizedError
from onnxcomp.feeds import index_bounds, input_specs, synthetic_feeds
from onnxcomp.layers import quantized_parts
from onnxcomp.modelio import check_output_path, input_files, load_model, save_model
from onnxcomp.passes.finite import check_computed_finite, nonfinite_initializers
from onnxcomp.passes.fold_bn import FoldBatchNormPass
from onnxcomp.passes.gather_decode import GatherDecodePass
from onnxcomp.passes.magr import MagrPass
from onnxcomp.passes.normalize import NormalizePass
from onnxcomp.passes.quantize_activations import QuantizeActivationsPass
from onnxcomp.passes.quantize_weights import QuantizeWeightsPass
from onnxcomp.passes.smooth import SmoothActivationsPass
from onnxcomp.report import Report

log = logging.getLogger(__name__)


def build_passes(
    config: QuantConfig, report: Report, calibration: Calibration, progress: bool = False
) -> list[ir.passes.PassBase]:
    passes = [NormalizePass(config.required_opset, report), FoldBatchNormPass(report)]
    if config.act_bits and config.smooth:
        passes.append(SmoothActivationsPass(config, calibration, report))
    if config.magr:
        passes.append(MagrPass(config, calibration, report, device=calibration.device, progress=progress))
    passes.append(QuantizeWeightsPass(config, report, progress=progress, calibration=calibration))
    passes.append(GatherDecodePass(report, onnxruntime=config.target == "onnxruntime", accuracy_level=config.nbits_accuracy))
    if config.act_bits:
        passes += [TopologicalSortPass(), QuantizeActivationsPass(config, calibration, report)]
    return passes + [RemoveUnusedNodesPass(), TopologicalSortPass()]


def check_not_quantized(model: ir.Model) -> None:
    """Quantizing codes again would only lose more: refuse a model that is quantized already."""
    found = quantized_parts(model.graph)
    if found:
        parts = ", ".join(f"{count} {op}" for op, count in sorted(found.items()))
        raise AlreadyQuantizedError(
            f"the model is already quantized ({parts}); compress the float model it was made from, "
            "or entropy-code it as it is with `onnxcomp pack`"
        )


def compress_model(
    model: ir.Model, config: QuantConfig, *, calibration: Calibration | None = None, progress: bool = False
) -> tuple[ir.Model, Report]:
    """Run every pass of `config` on `model` in place; return it with the report.

    `calibration` holds the data passes that need statistics use; by default, synthetic
    inputs (with a warning) where a pass needs data at all.
    """
    check_not_quantized(model)
    calibration = calibration if calibration is not None else Calibration(progress=progress)
    report = Report()
    allowed: set[str] = set()  # NaN/Inf the input itself holds where no layer multiplies it
    for pass_ in build_passes(config, report, calibration, progress):
        start = time.perf_counter()
        result = pass_(model)
        model = result.model
        log.debug("%s: %s in %.2f s", getattr(pass_, "label", type(pass_).__name__),
                  "modified" if result.modified else "unchanged", time.perf_counter() - start)
        if isinstance(pass_, NormalizePass):
            allowed = nonfinite_initializers(model)  # the lifted constants, as the model gave them
        else:
            check_computed_finite(model, getattr(pass_, "label", type(pass_).__name__), allowed)
    if calibration.label:
        report.totals["calibration"] = calibration.label
    quantized = sum(1 for r in report.layers if r.bits)
    report.totals.update({"layers quantized": f"{quantized} of {len(report.layers)}", **_left_float(report)})
    record_provenance(model, report, config, calibration)
    return model, report


def record_provenance(model: ir.Model, report: Report, config: QuantConfig, calibration: Calibration) -> None:
    """How the file was made, in the report and in the model's metadata_props: the options
    (every field, as `onnxcomp compress --config` takes them), the versions, the data."""
    from onnxcomp import __version__
    from onnxcomp.runtime import ort

    report.options = config.as_dict()
    report.versions = {"onnxcomp": __version__, "onnxruntime": ort.__version__, "onnx": onnx.__version__}
    source = calibration.label or ("refused (--calib none)" if calibration.data == NO_DATA else "not given")
    model.metadata_props.update({
        "onnxcomp.version": __version__,
        "onnxcomp.options": json.dumps(report.options, sort_keys=True, separators=(",", ":")),
        "onnxcomp.calibration": source,
        "onnxcomp.onnxruntime": ort.__version__,
    })


def _left_float(report: Report) -> dict[str, str]:
    """The layers left in float, by kind, and their share of the layers' weight bytes (each
    one's reason is in its row of the report)."""
    left = [r for r in report.layers if not r.bits]
    if not left:
        return {}
    kinds: dict[str, int] = {}
    for record in left:
        kinds[record.op] = kinds.get(record.op, 0) + 1
    share = sum(r.bytes_before for r in left) / max(sum(r.bytes_before for r in report.layers), 1)
    by_kind = ", ".join(f"{op} {count}" for op, count in sorted(kinds.items()))
    return {"left float": f"{len(left)} layers ({by_kind}), {share:.1%} of the layers' weight bytes"}


def _check_feeds(model: ir.Model, calibration: Calibration) -> tuple[dict[str, np.ndarray], str] | None:
    """A few samples for the end-to-end check: the calibration data's first, or synthetic
    inputs (silently: they only measure); none where --calib none forbids made-up inputs."""
    if isinstance(calibration.data, str) and calibration.data == NO_DATA:
        return None
    if calibration.user_data:
        batch = next(calibration.dataset(model, "the end-to-end check").batches(), None)
        return (None if batch is None else {k: v[:SAMPLES] for k, v in batch.items()}), "calibration"
    return synthetic_feeds(input_specs(model), index_bounds(model), batch=2), "synthetic"


def compress_file(
    source: str | os.PathLike,
    output: str | os.PathLike,
    config: QuantConfig,
    *,
    calibration: Calibration | None = None,
    progress: bool = False,
    check: bool = True,
) -> Report:
    """Load, compress and atomically save; the source file is only read. With `check`, the
    output is compared with the source on a few samples (the report's "end-to-end check";
    a warning when far)."""
    check_output_path(output, source)
    return compress_to_file(load_model(source), output, config, source=source, calibration=calibration,
                            progress=progress, check=check)[1]


def compress_to_file(
    model: ir.Model,
    output: str | os.PathLike,
    config: QuantConfig,
    *,
    source: str | os.PathLike | None = None,
    calibration: Calibration | None = None,
    progress: bool = False,
    check: bool = True,
) -> tuple[ir.Model, Report]:
    """Compress `model` (loaded from `source`, when it was) and save it atomically to
    `output`; the model and the report, with sizes and the end-to-end check in its totals."""
    calibration = calibration if calibration is not None else Calibration(progress=progress)
    before = sum(p.stat().st_size for p in input_files(source) if p.is_file()) if source is not None else None
    model, report = compress_model(model, config, calibration=calibration, progress=progress)
    save_model(model, output, source=source)
    feeds = _check_feeds(model, calibration) if check and source is not None else None
    if feeds is not None and feeds[0] is not None:
        result = end_to_end_check(source, output, *feeds)
        if result is not None:
            report.totals["end-to-end check"] = result.summary()
            warn_if_far(result)
    after = Path(output).stat().st_size
    data = Path(str(output) + ".data")
    if data.exists():
        after += data.stat().st_size
    if before is not None:
        report.totals.update({"file size before": before})
    report.totals["file size after"] = after
    if before:
        report.totals["ratio"] = round(after / before, 4)
    return model, report
