"""What the passes did, per layer: a table for people and JSON for machines."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field


@dataclass
class LayerRecord:
    """One quantizable layer: what it was, what it became, and what that cost."""

    name: str
    op: str
    weight: str
    shape: tuple[int, ...]
    bits: int | None = None  # None: left in float
    granularity: str = ""
    grid: str = ""
    range_before: tuple[float, float] = (0.0, 0.0)
    range_after: tuple[float, float] = (0.0, 0.0)
    relative_mse: float = 0.0
    bytes_before: int = 0
    bytes_after: int = 0
    output_error: float | None = None  # tr(ΔWᵀHΔW) / tr(WᵀHW) on the calibration data
    act_range: tuple[float, float] | None = None  # quantized range of the layer's input
    range_search: dict | None = None  # α chosen and errors before/after the search (and with sqrt)
    note: str = ""


@dataclass
class MagrRecord:
    """What MagR did to one layer's weight."""

    name: str
    max_before: float  # max |w| over the layer
    max_after: float
    output_error: float  # ‖X(w′ − w)‖² / ‖Xw‖² on the calibration data
    objective_start: float
    objective_end: float
    iterations: int
    seconds: float


@dataclass
class Note:
    """A pass-level event that is not a quantized layer (a folded or refused BatchNorm...)."""

    pass_name: str
    subject: str
    message: str


@dataclass
class Report:
    layers: list[LayerRecord] = field(default_factory=list)
    magr: list[MagrRecord] = field(default_factory=list)
    notes: list[Note] = field(default_factory=list)
    totals: dict[str, float | int | str] = field(default_factory=dict)
    options: dict = field(default_factory=dict)  # every option of the run, as --config takes them
    versions: dict[str, str] = field(default_factory=dict)

    def note(self, pass_name: str, subject: str, message: str) -> None:
        self.notes.append(Note(pass_name, subject, message))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    def to_table(self) -> str:
        with_output = any(r.output_error is not None for r in self.layers)
        with_act = any(r.act_range is not None for r in self.layers)
        with_search = any(r.range_search is not None for r in self.layers)
        header = ("layer", "op", "shape", "bits", "gran.", "grid", "range before", "range after", "rel. MSE")
        header += ("α",) * with_search + ("out err",) * with_output + ("act range",) * with_act + ("bytes before", "bytes after")
        rows = [header]
        for r in self.layers:
            row = (
                _clip(r.name, 40),
                r.op,
                "x".join(map(str, r.shape)),
                str(r.bits) if r.bits else "float",
                r.granularity or "-",
                r.grid or "-",
                _range(r.range_before),
                _range(r.range_after) if r.bits else "-",
                f"{r.relative_mse:.2e}" if r.bits else "-",
            )
            if with_search:
                search = r.range_search
                row += ("-" if search is None else f"{search['alpha']:.3f}{' sqrt' if 'weight_mse_sqrt' in search else ''}",)
            if with_output:
                row += (f"{r.output_error:.2e}" if r.output_error is not None else "-",)
            if with_act:
                row += (_range(r.act_range) if r.act_range is not None else "-",)
            rows.append(row + (f"{r.bytes_before:,}", f"{r.bytes_after:,}"))
        lines = format_table(rows).splitlines()
        if self.magr:
            lines += ["", "MagR:"] + format_table(
                [("layer", "max|w| before", "max|w| after", "output error", "objective start", "objective end", "iters", "s")]
                + [
                    (_clip(m.name, 40), f"{m.max_before:.4g}", f"{m.max_after:.4g}", f"{m.output_error:.2e}",
                     f"{m.objective_start:.4g}", f"{m.objective_end:.4g}", str(m.iterations), f"{m.seconds:.2f}")
                    for m in self.magr
                ]
            ).splitlines()
        for r in self.layers:
            if r.note:
                lines.append(f"note: {r.name}: {r.note}")
        for n in self.notes:
            lines.append(f"{n.pass_name}: {n.subject}: {n.message}")
        if self.totals:
            lines.append("")
            lines.extend(f"{key}: {value}" for key, value in self.totals.items())
        return "\n".join(lines)


def format_table(rows: list[tuple[str, ...]]) -> str:
    """Left-aligned columns, the first row a header underlined with dashes."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else "…" + text[-(width - 1) :]


def _range(pair: tuple[float, float]) -> str:
    return f"[{pair[0]:.3g}, {pair[1]:.3g}]"
