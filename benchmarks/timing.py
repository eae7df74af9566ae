"""Latency measured fairly on a noisy machine: sessions timed in turn, medians compared."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

import onnxruntime as ort

from onnxcomp.runtime import run, session_options


def _quiet_session(path: Path, entries: dict[str, str]) -> ort.InferenceSession:
    """A CPU session whose idle threads do not spin, so sessions timed in turn do not steal
    cores from each other; `entries` are further session config entries."""
    options = session_options()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    for key, value in entries.items():
        options.add_session_config_entry(key, value)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def interleaved_latency_ms(paths: list, feeds: dict, repeats: int = 30) -> list[float]:
    """Median wall time of one run per model (a path, or (path, session config entries)),
    the models taking turns so drift hits all alike."""
    sessions = [_quiet_session(*(p if isinstance(p, tuple) else (p, {}))) for p in paths]
    for session in sessions:
        run(session, feeds)
    times = [[] for _ in sessions]
    for _ in range(repeats):
        for session, bucket in zip(sessions, times):
            start = time.perf_counter()
            run(session, feeds)
            bucket.append(time.perf_counter() - start)
    return [1000 * float(np.median(bucket)) for bucket in times]
