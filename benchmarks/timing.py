"""Latency measured fairly on a noisy machine: sessions timed in turn, medians compared."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

import onnxruntime as ort

from onnxcomp.runtime import run, session_options


def _quiet_session(path: Path) -> ort.InferenceSession:
    """A CPU session whose idle threads do not spin, so sessions timed in turn do not steal
    cores from each other."""
    options = session_options()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def interleaved_latency_ms(paths: list[Path], feeds: dict, repeats: int = 30) -> list[float]:
    """Median wall time of one run per model, the models taking turns so drift hits all alike."""
    sessions = [_quiet_session(path) for path in paths]
    for session in sessions:
        run(session, feeds)
    times = [[] for _ in sessions]
    for _ in range(repeats):
        for session, bucket in zip(sessions, times):
            start = time.perf_counter()
            run(session, feeds)
            bucket.append(time.perf_counter() - start)
    return [1000 * float(np.median(bucket)) for bucket in times]
