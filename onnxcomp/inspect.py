"""Per-layer weight statistics: what decides how well a layer quantizes."""

from __future__ import annotations

import json

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxcomp.layers import find_weight_layers
from onnxcomp.report import format_table
from onnxcomp.stored_weights import stored_weights


@dataclass(frozen=True)
class WeightStats:
    layer: str
    op: str
    storage: str  # the stored element type: float32, int4, ...
    shape: tuple[int, ...]
    min: float
    max: float
    std: float
    max_over_std: float  # max|w| / std: how far the extremes stretch the grid
    kurtosis: float  # excess kurtosis: 0 for a normal distribution, large for heavy tails


def weight_stats(layer: str, op: str, storage: str, w: np.ndarray) -> WeightStats:
    w64 = w.astype(np.float64).ravel()
    std = float(w64.std()) if w64.size else 0.0
    centred = w64 - w64.mean() if w64.size else w64
    kurt = float(np.mean(centred**4) / std**4 - 3.0) if std > 0 else 0.0
    peak = float(np.abs(w64).max()) if w64.size else 0.0
    return WeightStats(
        layer, op, storage, tuple(int(d) for d in w.shape),
        float(w64.min()) if w64.size else 0.0, float(w64.max()) if w64.size else 0.0,
        std, peak / std if std > 0 else 0.0, kurt,
    )


def model_stats(model: ir.Model) -> list[WeightStats]:
    """Stats of every float layer weight, and of every weight stored quantized (decoded)."""
    stored = stored_weights(model.graph)
    parts = {id(value) for weight in stored for value in weight.parts}
    stats = []
    for layer in find_weight_layers(model.graph):
        if id(layer.weight) in parts:  # a scale table gathered beside its codes
            continue
        w = layer.weight.const_value.numpy()
        stats.append(weight_stats(layer.name, layer.node.op_type, layer.weight.dtype.name.lower(), w))
    stats.extend(weight_stats(weight.name, weight.op, weight.storage, weight.weight) for weight in stored)
    return stats


def stats_table(stats: list[WeightStats]) -> str:
    header = ("layer", "op", "stored", "shape", "min", "max", "std", "max/std", "kurtosis")
    rows = [header] + [
        (s.layer[-48:], s.op, s.storage, "x".join(map(str, s.shape)), f"{s.min:.4g}", f"{s.max:.4g}", f"{s.std:.4g}",
         f"{s.max_over_std:.2f}", f"{s.kurtosis:.2f}")
        for s in stats
    ]
    return format_table(rows)


def provenance(model: ir.Model) -> dict | None:
    """How onnxcomp made this model (from its metadata), or None for a model it did not make."""
    props = model.metadata_props
    if "onnxcomp.version" not in props:
        return None
    return {
        "onnxcomp": props["onnxcomp.version"],
        "onnxruntime": props.get("onnxcomp.onnxruntime"),
        "calibration": props.get("onnxcomp.calibration"),
        "options": json.loads(props.get("onnxcomp.options", "{}")),
    }


def provenance_line(made: dict) -> str:
    """One line: the versions, the calibration data, and the options that differ from the defaults."""
    from onnxcomp.config import QuantConfig

    defaults = QuantConfig().as_dict()
    changed = " ".join(f"{k}={v}" for k, v in sorted(made["options"].items()) if defaults.get(k) != v)
    return (f"made by onnxcomp {made['onnxcomp']} (onnxruntime {made['onnxruntime']}), calibration: {made['calibration']}, "
            f"options: {changed or 'the defaults'}")
