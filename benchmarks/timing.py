"""Latency measured fairly on a noisy machine: sessions timed in turn, medians compared."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from onnxcomp.runtime import make_session, run


def interleaved_latency_ms(paths: list[Path], feeds: dict, repeats: int = 30) -> list[float]:
    """Median wall time of one run per model, the models taking turns so drift hits all alike."""
    sessions = [make_session(path) for path in paths]
    for session in sessions:
        run(session, feeds)
    times = [[] for _ in sessions]
    for _ in range(repeats):
        for session, bucket in zip(sessions, times):
            start = time.perf_counter()
            run(session, feeds)
            bucket.append(time.perf_counter() - start)
    return [1000 * float(np.median(bucket)) for bucket in times]
