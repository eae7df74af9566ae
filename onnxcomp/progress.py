"""Progress of long stages: a redrawn bar on a terminal; in a log (stderr not a terminal),
one line per stage when it ends, with its count and time, instead of a redraw per update."""

from __future__ import annotations

import sys
import time


class _StageLine:
    """tqdm's interface as far as onnxcomp uses it, writing one line at the end."""

    def __init__(self, desc: str, unit: str, total: int | None):
        self.desc, self.unit, self.total, self.n = desc, unit, total, 0
        self.start = time.perf_counter()

    def update(self, count: int = 1) -> None:
        self.n += count

    def close(self) -> None:
        if self.start is None:
            return
        seconds = time.perf_counter() - self.start
        print(f"onnxcomp: {self.desc}: {self.n} {self.unit}s in {seconds:.1f} s", file=sys.stderr, flush=True)
        self.start = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Silent(_StageLine):
    def close(self) -> None:
        self.start = None


def stage(iterable=None, *, desc: str, unit: str, total: int | None = None, enabled: bool = True):
    """A progress bar for one stage (use as tqdm: update(), close(), a context or an iterable)."""
    if enabled and sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, leave=False)
    line = (_StageLine if enabled else _Silent)(desc, unit, total)
    return line if iterable is None else _counting(line, iterable)


def _counting(line: _StageLine, iterable):
    for item in iterable:
        yield item
        line.update()
    line.close()
