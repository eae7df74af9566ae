"""Fidelity of a compressed model against its reference, output by output."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxcomp import feeds as feeds_mod
from onnxcomp.errors import InputMismatchError
from onnxcomp.modelio import load_model
from onnxcomp.runtime import make_session, run


@dataclass(frozen=True)
class OutputFidelity:
    name: str
    cosine: float  # mean over samples (first axis) of the cosine of flattened outputs
    snr_db: float  # 10·log10(‖ref‖² / ‖ref − out‖²); inf when identical
    max_abs_error: float


def mean_cosine(ref: np.ndarray, out: np.ndarray) -> float:
    """Mean per-sample cosine similarity; samples along the first axis."""
    a = ref.astype(np.float64).reshape(ref.shape[0] if ref.ndim > 1 else 1, -1)
    b = out.astype(np.float64).reshape(a.shape)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    dots = np.sum(a * b, axis=1)
    both_zero = (na == 0) & (nb == 0)
    cos = np.where(both_zero, 1.0, dots / np.maximum(na * nb, 1e-300))
    return float(np.mean(cos))


def fidelity(name: str, ref: np.ndarray, out: np.ndarray) -> OutputFidelity:
    if ref.dtype.kind not in "fc":
        same = np.array_equal(ref, out)
        largest = float(np.max(np.abs(ref.astype(np.float64) - out))) if ref.size else 0.0
        return OutputFidelity(name, 1.0 if same else 0.0, float("inf") if same else 0.0, largest)
    r, o = ref.astype(np.float64), out.astype(np.float64)
    err = float(np.sum((r - o) ** 2))
    signal = float(np.sum(r * r))
    snr = float("inf") if err == 0 else 10 * np.log10(max(signal, 1e-300) / err)
    return OutputFidelity(name, mean_cosine(ref, out), snr, float(np.max(np.abs(r - o))) if r.size else 0.0)


def feeds_for(reference: ir.Model, inputs: str | os.PathLike | None) -> tuple[dict[str, np.ndarray], str]:
    """The user's feeds, checked against the model, or synthetic ones; and where they came from."""
    specs = feeds_mod.input_specs(reference)
    if inputs is not None:
        return feeds_mod.check_feeds(feeds_mod.load_npz(inputs), specs, str(inputs)), str(inputs)
    return feeds_mod.synthetic_feeds(specs, feeds_mod.index_bounds(reference)), "synthetic"


def candidate_feeds(feeds: dict[str, np.ndarray], reference: ir.Model, candidate: ir.Model, path) -> dict[str, np.ndarray]:
    """The reference's feeds as the candidate takes them: the same names and kinds, float
    inputs cast to the candidate's float type (an FP16 model checked against FP32)."""
    want, have = feeds_mod.input_specs(reference), feeds_mod.input_specs(candidate)
    if set(want) != set(have):
        raise InputMismatchError(
            f"{path}: its inputs {sorted(have)} differ from the reference's {sorted(want)}; "
            "verify compares two versions of one model"
        )
    cast = {}
    for name, array in feeds.items():
        dtype = have[name][0]
        if dtype != array.dtype and not (np.issubdtype(dtype, np.floating) and np.issubdtype(array.dtype, np.floating)):
            raise InputMismatchError(f"{path}: input {name!r} is {dtype}, the reference's is {array.dtype}")
        cast[name] = array.astype(dtype, copy=False)
    return cast


def verify(
    reference: str | os.PathLike,
    candidate: str | os.PathLike,
    inputs: str | os.PathLike | None = None,
    accuracy_level: int | None = None,
    device: str = "cpu",
) -> tuple[list[OutputFidelity], str]:
    """Run both models on the same feeds; fidelity per output of the reference."""
    reference_model = load_model(reference)
    candidate_model = load_model(candidate)  # a clear error for a bad file before onnxruntime's own
    feeds, source = feeds_for(reference_model, inputs)
    cand_feeds = candidate_feeds(feeds, reference_model, candidate_model, candidate)
    ref_session = make_session(reference, accuracy_level, device)
    cand_session = make_session(candidate, accuracy_level, device)
    missing = sorted({o.name for o in ref_session.get_outputs()} - {o.name for o in cand_session.get_outputs()})
    if missing:
        raise InputMismatchError(f"{candidate}: has no output {', '.join(map(repr, missing))} that the reference has")
    hint = "; pass --inputs with real inputs" if source == "synthetic" else ""
    ref_out = run(ref_session, feeds, f"{reference} on {source} inputs{hint}")
    cand_out = run(cand_session, cand_feeds, f"{candidate} on {source} inputs{hint}")
    return [fidelity(name, ref_out[name], cand_out[name]) for name in ref_out], source
