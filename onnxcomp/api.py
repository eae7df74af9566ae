"""The Python API: one call to compress a model, one to verify it, with the same options
and the same one-line errors as the command line.

    import onnxcomp
    result = onnxcomp.compress("model.onnx", "model.q4.onnx", bits=4, granularity="block",
                               calibration="calib.npz", rounding="optq")
    result.report.totals["ratio"], result.model   # the onnx_ir.Model, also written to the path
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnx_ir as ir

from onnxcomp.calibration.analysis import Calibration
from onnxcomp.budget import Budget, compress_within
from onnxcomp.calibration.sources import CalibOptions
from onnxcomp.config import QuantConfig
from onnxcomp.errors import ConfigError, InvalidModelError
from onnxcomp.modelio import check_output_path, check_outputs, load_model
from onnxcomp.pipeline import compress_model, compress_to_file
from onnxcomp.report import Report


@dataclass
class Result:
    model: ir.Model  # the compressed model
    report: Report
    path: Path | None = None  # where it was written, if it was


def _config(bits: int, options: dict) -> QuantConfig:
    fields = {f.name for f in dataclasses.fields(QuantConfig)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join(unknown)}; the options are {', '.join(sorted(fields - {'bits'}))}")
    return QuantConfig(bits=bits, **options)


def _reader_batches(reader) -> Iterator[dict]:
    """onnxruntime's CalibrationDataReader protocol: get_next() until it returns None."""
    while (feeds := reader.get_next()) is not None:
        yield feeds


def calibration_from(data, options: CalibOptions = CalibOptions()) -> Calibration:
    """A Calibration from a path (.npz, folder), a Calibration, any iterable of feed dicts, or
    any object with get_next() (onnxruntime's reader protocol); None: synthetic inputs."""
    if isinstance(data, Calibration):
        return data
    if data is not None and not isinstance(data, (str, os.PathLike, Iterable)) and hasattr(data, "get_next"):
        data = _reader_batches(data)
    return Calibration(data, options)


def _as_ir(model) -> ir.Model:
    """A path, an onnx.ModelProto or an onnx_ir.Model (cloned: the caller's stays as it is)."""
    if isinstance(model, (str, os.PathLike)):
        return load_model(model)
    if isinstance(model, onnx.ModelProto):
        try:
            onnx.checker.check_model(model)
        except onnx.checker.ValidationError as err:
            raise InvalidModelError(f"the ModelProto is not a valid ONNX model ({str(err).splitlines()[0]})") from None
        return ir.from_proto(model)
    if isinstance(model, ir.Model):
        return model.clone()
    raise InvalidModelError(f"cannot compress a {type(model).__name__}; pass a path, an onnx.ModelProto or an onnx_ir.Model")


def compress(model, output: str | os.PathLike | None = None, *, bits: int = 4, calibration=None,
             calib_samples: int = 128, calib_batch: int = 16, check: bool = True, budget: Budget | None = None,
             **options) -> Result:
    """Compress `model` (a path, onnx.ModelProto or onnx_ir.Model) with the options of
    `onnxcomp compress` (QuantConfig's fields: granularity, block_size, asymmetric, rounding,
    magr, range_search, act_bits, ...); write it to `output` when given.

    `calibration`: a path (.npz or folder), a Calibration, any iterable of feed dicts, or
    any object with get_next() (onnxruntime's CalibrationDataReader protocol); None for
    synthetic inputs where a pass needs data. `budget` (an `onnxcomp.Budget`: size,
    bits_per_weight or min_fidelity with evaluation) lets the bit allocator choose each
    layer's bits; it needs `model` as a path and an `output`. Errors are
    `onnxcomp.OnnxcompError`, one line each.
    """
    config = _config(bits, options)
    calib = calibration_from(calibration, CalibOptions(samples=calib_samples, batch=calib_batch))
    source = model if isinstance(model, (str, os.PathLike)) else None
    if budget is not None:
        return _compress_within(source, output, budget, config, calib, check)
    if output is None:
        compressed, report = compress_model(_as_ir(model), config, calibration=calib)
        return Result(compressed, report)
    check_outputs(source, output) if source is not None else check_output_path(output)
    compressed, report = compress_to_file(_as_ir(model), output, config, source=source, calibration=calib, check=check)
    return Result(compressed, report, Path(output))


def _compress_within(source, output, budget: Budget, config: QuantConfig, calibration: Calibration, check: bool) -> Result:
    if source is None or output is None:
        raise ConfigError("a budget needs the model as a path and an output path: the allocator writes its trial "
                          "files beside the output and measures them")
    check_outputs(source, output)
    written = {}

    def write(trial_config: QuantConfig, path: Path) -> tuple[Report, int]:
        model, report = compress_to_file(load_model(source), path, trial_config, source=source,
                                         calibration=calibration, check=check)
        written["model"] = model  # the last file written is the one kept
        return report, report.totals["file size after"]

    report = compress_within(source, output, budget, config, calibration, write)
    return Result(written["model"], report, Path(output))
