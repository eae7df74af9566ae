"""Compression within a budget: an average number of bits per weight, a size of the output
file, or a fidelity floor on evaluation data. Each layer's bit width (or float) is chosen
by the allocator from the layers' measured sensitivity, written as the configuration's bit
plan, and the result checked end to end: a size target is corrected with the size the file
really has, a fidelity floor by bisection on the budget.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from onnxcomp.allocate import Choice, allocate, choices, totals
from onnxcomp.calibration.analysis import Calibration
from onnxcomp.config import QuantConfig
from onnxcomp.errors import ConfigError
from onnxcomp.modelio import input_files, load_model
from onnxcomp.report import Report
from onnxcomp.sensitivity import ROUNDING_OPTIONS, SensitivityTable, measure_sensitivity, rounding_options

log = logging.getLogger(__name__)

SIZE_TOLERANCE = 0.02  # a size target is met when the file is within 2% below it
SIZE_ROUNDS = 5  # corrections of the size target at most
FIDELITY_ROUNDS = 8  # bisection steps of a fidelity floor

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str) -> int:
    """Bytes from '123456', '9.5MB' (10^6) or '20MiB' (2^20)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = match and match.group(2).lower()
    if not match or unit not in _UNITS:
        raise ConfigError(f"--target-size {text!r} is not a size; write bytes or a number with kB, MB, GB, KiB, MiB or GiB")
    return int(float(match.group(1)) * _UNITS[unit])


@dataclass(frozen=True)
class Budget:
    """One of the three targets, and the bit widths a layer may get."""

    bits_per_weight: float | None = None  # codes, scales and zero points per weight of the allocated layers
    size: int | None = None  # bytes of the output file (the container with --entropy-code)
    min_fidelity: float | None = None  # lowest mean output cosine to FP32 on `evaluation`
    evaluation: str | os.PathLike | None = None
    widths: tuple[int, ...] = (2, 3, 4, 8)
    block_sizes: tuple[int, ...] = ()  # block sizes to choose from besides --block-size, for layers in blocks
    coded: bool = False  # sizes as the .onnxc container stores them (--entropy-code)
    sensitivity: str | os.PathLike | None = None  # a table from `onnxcomp sensitivity --json`, instead of measuring

    def __post_init__(self) -> None:
        given = [name for name, value in (("--target-bits", self.bits_per_weight), ("--target-size", self.size),
                                          ("--min-fidelity", self.min_fidelity)) if value is not None]
        if len(given) != 1:
            raise ConfigError(f"give one of --target-bits, --target-size and --min-fidelity, not {' and '.join(given)}")
        if self.bits_per_weight is not None and not 1.0 < self.bits_per_weight <= 32.0:
            raise ConfigError(f"--target-bits {self.bits_per_weight} must be in (1, 32], for example 3.5")
        if self.size is not None and self.size <= 0:
            raise ConfigError(f"--target-size {self.size} must be positive")
        if self.min_fidelity is not None:
            if not 0.0 < self.min_fidelity < 1.0:
                raise ConfigError(f"--min-fidelity {self.min_fidelity} must be in (0, 1), for example 0.99")
            if self.evaluation is None:
                raise ConfigError("--min-fidelity needs --eval FEEDS.npz: evaluation inputs, apart from the calibration data")
        for size in self.block_sizes:
            if size < 2 or size & (size - 1):
                raise ConfigError(f"--alloc-blocks {size} is not a power of two >= 2 (for example 32,128)")
        if not self.widths or not set(self.widths) <= {2, 3, 4, 8}:
            raise ConfigError(f"--alloc-bits {','.join(map(str, self.widths))}: each bit width must be 2, 3, 4 or 8")


Write = Callable[[QuantConfig, Path], tuple[Report, int]]  # compress to a path; (report, bytes written)


class _Fidelity:
    """The lowest mean cosine of any float output of a candidate file against the reference
    model's, on the evaluation inputs (read, and run through the reference, once)."""

    def __init__(self, reference: str | os.PathLike, evaluation: str | os.PathLike):
        from onnxcomp.feeds import check_feeds, input_specs, load_npz
        from onnxcomp.session import InferenceSession

        self.feeds = check_feeds(load_npz(evaluation), input_specs(load_model(reference)), str(evaluation))
        self.expected = InferenceSession(reference).run(None, self.feeds)

    def __call__(self, candidate: str | os.PathLike) -> float:
        from onnxcomp.fidelity import mean_cosine
        from onnxcomp.session import InferenceSession

        got = InferenceSession(candidate).run(None, self.feeds)
        scores = [mean_cosine(e, g) for e, g in zip(self.expected, got) if e.dtype.kind == "f"]
        return min(scores) if scores else 1.0


class _Trials:
    """Writes each plan's file into a folder beside the target; the one kept is moved into
    place at the end, so a failed search leaves the target as it was. Warnings of trials (a
    far end-to-end check) are held back and shown only for the file kept."""

    def __init__(self, write: Write, config: QuantConfig, target: Path, folder: Path):
        self.write, self.config, self.target = write, config, target
        self.path = folder / target.name  # the same name: an external data file keeps its reference
        self.last: tuple[dict[str, Choice], Report, int, list] | None = None

    def __call__(self, plan: dict[str, Choice]) -> tuple[Report, int]:
        config = dataclasses.replace(self.config, bits_plan=tuple((name, c.bits) for name, c in plan.items()),
                                     block_plan=tuple((name, c.block_size) for name, c in plan.items() if c.block_size))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            report, written = self.write(config, self.path)
        unknown = sorted(set(plan) - {record.name for record in report.layers})
        if unknown:
            raise ConfigError(f"the sensitivity table names layers this model does not have ({', '.join(unknown[:3])}"
                              f"{', …' if len(unknown) > 3 else ''}); measure the table on this model")
        layers, loss = totals(plan)
        log.debug("trial: layers %d bytes, predicted loss %.3g: file %d bytes", layers, loss, written)
        self.last = (plan, report, written, caught)
        return report, written

    def keep(self, plan: dict[str, Choice]) -> tuple[Report, int]:
        """The file of `plan` moved to the target (written again if it was not the last)."""
        if self.last is None or self.last[0] is not plan:
            self(plan)
        _, report, written, caught = self.last
        data = Path(str(self.path) + ".data")
        if data.exists():
            os.replace(data, str(self.target) + ".data")
        os.replace(self.path, self.target)
        for warning in caught:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
        return report, written


def _note(report: Report, plan: dict[str, Choice], what: str) -> None:
    size, loss = totals(plan)
    counts: dict[str, int] = {}
    for choice in plan.values():
        label = "float" if choice.bits == 0 else f"{choice.bits} bits" + (f" in blocks of {choice.block_size}" if choice.block_size else "")
        counts[label] = counts.get(label, 0) + 1
    layers = ", ".join(f"{n} at {label}" for label, n in sorted(counts.items()))
    report.totals["bit allocation"] = f"{what}: {layers}; layers {size:,} bytes, predicted loss {loss:.3g}"


def compress_within(source: str | os.PathLike, target: str | os.PathLike, budget: Budget, config: QuantConfig,
                    calibration: Calibration, write: Write, progress: bool = False) -> Report:
    """Measure every layer's sensitivity, allocate bits under `budget`, write with `write`,
    and correct until the budget holds; return the report of the file left at `target`."""
    if budget.sensitivity is not None:
        table = _stored_table(budget.sensitivity, config)
    else:
        table = measure_sensitivity(load_model(source), config, calibration, budget.widths, progress=progress,
                                    block_sizes=budget.block_sizes)
        calibration.mark_stale()  # the statistics belong to the model measured, not the one compress loads
    options = choices(table, coded=budget.coded)
    target = Path(target)
    with tempfile.TemporaryDirectory(dir=target.resolve().parent, prefix=".onnxcomp-budget-") as folder:
        return _search(source, budget, table, options, _Trials(write, config, target, Path(folder)))


def _stored_table(path: str | os.PathLike, config: QuantConfig) -> SensitivityTable:
    """A table measured earlier, checked against the options that decide its points."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"--sensitivity {path}: cannot read it ({err})") from None
    table = SensitivityTable.from_dict(data, f"--sensitivity {path}")
    now = rounding_options(config)
    differ = sorted(name for name in ROUNDING_OPTIONS if table.options.get(name) != now[name])
    if differ:
        raise ConfigError(f"--sensitivity {path} was measured with other {', '.join(differ)} "
                          f"({', '.join(f'{n}={table.options.get(n)!r}' for n in differ)}); measure it with these options")
    return table


def _search(source, budget: Budget, table, options: dict[str, list[Choice]], trials: _Trials) -> Report:
    """The plan for the budget's one target, its file kept, and a line in the report."""
    if budget.bits_per_weight is not None:
        weights = sum(layer.weights for layer in table.layers)
        plan = allocate(options, budget.bits_per_weight * weights / 8)
        report, _ = trials.keep(plan)
        if budget.coded:  # the container codes tensors whole: each layer's share is the plan's estimate
            achieved, how = 8 * totals(plan)[0] / max(weights, 1), " (codes at their entropy)"
        else:
            achieved, how = 8 * sum(r.bytes_after for r in report.layers if r.name in plan) / max(weights, 1), ""
        what = f"{achieved:.3f} bits per weight{how} for --target-bits {budget.bits_per_weight:g}"
    elif budget.size is not None:
        plan = _within_size(source, budget.size, options, trials)
        report, written = trials.keep(plan)
        what = f"{written:,} bytes for --target-size {budget.size:,}"
        if written < (1 - SIZE_TOLERANCE) * budget.size:
            what += " (the closest below it that the layers' options allow)"
    else:
        plan, cosine = _within_fidelity(source, budget, options, trials)
        report, _ = trials.keep(plan)
        what = f"cosine {cosine:.4f} on {budget.evaluation} for --min-fidelity {budget.min_fidelity}"
    _note(report, plan, what)
    return report


def _within_size(source, size: int, options: dict[str, list[Choice]], trials: _Trials) -> dict[str, Choice]:
    """The layers' budget is the target less what the rest of the file takes, learnt from the
    files written: each round replaces the estimate with what the last file really held."""
    float_bytes = sum(next(c.size for c in layer if c.bits == 0) for layer in options.values())
    rest = sum(path.stat().st_size for path in input_files(source)) - float_bytes  # graph and float parts, first guess
    smallest = sum(min(c.size for c in layer) for layer in options.values())
    best = None  # (plan, bytes) of the largest file within the target
    for _ in range(SIZE_ROUNDS):
        plan = allocate(options, max(size - rest, smallest))
        _, written = trials(plan)
        if written <= size and (best is None or written > best[1]):
            best = (plan, written)
        if (1 - SIZE_TOLERANCE) * size <= written <= size:
            break
        if written > size and totals(plan)[0] == smallest:
            break  # every layer at its fewest bits is still too large
        rest = written - totals(plan)[0]
    if best is None:
        raise ConfigError(f"--target-size {size:,} bytes cannot be met: the file of the smallest plan tried takes "
                          f"{written:,} bytes; raise it, or allow fewer bits (--alloc-bits)")
    return best[0]


def _within_fidelity(source, budget: Budget, options: dict[str, list[Choice]],
                     trials: _Trials) -> tuple[dict[str, Choice], float]:
    """The smallest layers' budget whose file keeps the fidelity floor on the evaluation
    inputs, by bisection between the smallest plan and every layer in float (which holds)."""
    low = float(sum(min(c.size for c in layer) for layer in options.values()))
    high = float(sum(max(c.size for c in layer) for layer in options.values()))
    best = (allocate(options, high), 1.0)  # (plan, cosine) of the smallest budget known to hold
    fidelity = _Fidelity(source, budget.evaluation)
    for _ in range(FIDELITY_ROUNDS):
        if high - low <= 0.01 * high:
            break
        middle = (low + high) / 2
        plan = allocate(options, middle)
        trials(plan)
        cosine = fidelity(trials.path)
        log.debug("fidelity: layers' budget %.0f bytes: cosine %.5f", middle, cosine)
        if cosine >= budget.min_fidelity:
            best, high = (plan, cosine), float(totals(plan)[0])
        else:
            low = middle
    return best
