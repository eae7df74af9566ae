"""The end-to-end check after compression: the compressed model against the original on a
few calibration samples. Per-layer errors can all be small and still compound into a model
that no longer works; this measures what the user will see, and says what to try."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import numpy as np

from onnxcomp.errors import OnnxcompError
from onnxcomp.runtime import make_session, run
from onnxcomp.fidelity import fidelity

SAMPLES = 8
WARN_BELOW = 0.9  # mean output cosine to FP32


class FidelityWarning(UserWarning):
    """The compressed model's outputs are far from the original's."""


@dataclass(frozen=True)
class CheckResult:
    cosine: float  # the lowest mean cosine of any float output
    output: str  # which output that is
    samples: int
    source: str  # where the samples came from

    def summary(self) -> str:
        return f"output {self.output!r} cosine {self.cosine:.4f} to FP32 on {self.samples} {self.source} samples"


def end_to_end_check(original: str | os.PathLike, compressed: str | os.PathLike, feeds: dict[str, np.ndarray],
                     source: str) -> CheckResult | None:
    """Run both models on `feeds`; the weakest float output's mean cosine. None when a model
    cannot be run on them (the caller has nothing to report then, not an error)."""
    try:
        expected = run(make_session(original), feeds)
        got = run(make_session(compressed), feeds)
    except OnnxcompError:
        return None
    scores = [(fidelity(name, ref, got[name]).cosine, name) for name, ref in expected.items() if ref.dtype.kind == "f"]
    if not scores:
        return None
    cosine, name = min(scores)
    return CheckResult(cosine, name, len(next(iter(feeds.values()))), source)


def warn_if_far(result: CheckResult | None) -> None:
    if result is None or result.cosine >= WARN_BELOW:
        return
    warnings.warn(
        f"the compressed model is far from the original: {result.summary()}; the layers' errors compound. "
        "Try per-block asymmetric grids with OPTQ (--granularity block --block-size 32 --asymmetric "
        "--rounding optq --calib DATA), more bits (--bits, --keep-first-last-bits 8), or leave the most "
        "sensitive layers in float (--exclude)",
        FidelityWarning,
        stacklevel=2,
    )
