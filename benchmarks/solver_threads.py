"""What running OPTQ and MagR on one CPU thread costs (they do, so that their codes do not
depend on the machine's core count): each solver on MiniLM-sized layers, on 1 thread and on
every core, timed in turn, medians.

    python benchmarks/solver_threads.py
"""

from __future__ import annotations

import os
import time

import numpy as np

from onnxcomp.kernels.magr import magr
from onnxcomp.kernels.optq import optq
from onnxcomp.kernels.quantize import expand, grid_for, quantize
from onnxcomp.kernels.torch_backend import load_torch

SHAPES = [(384, 1536), (1536, 384)]  # MiniLM's feed-forward layers (reduction, outputs)


def _problem(rows: int, outputs: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(rows, outputs)).astype(np.float32)
    x = rng.normal(size=(4 * rows, rows))
    return w, (x.T @ x)[None]


def _solvers(w, gram):
    grid = grid_for(4, True)
    qt = quantize(w, grid, axis=0, block_size=32)
    scale = expand(qt.scale.astype(np.float64), w.shape, 0, 32)[None]
    zero = expand(qt.zero_point.astype(np.float64), w.shape, 0, 32)[None]
    matrix = w[None].astype(np.float64)
    return {
        "optq": lambda: optq.__wrapped__(matrix, gram, scale, zero, grid),
        "magr": lambda: magr.__wrapped__(matrix, gram, 1e-3, iterations=100),
    }


def main() -> None:
    torch = load_torch()
    cores = os.cpu_count() or 1
    print(f"{'solver':6} {'layer':>10} {'1 thread s':>11} {f'{cores} threads s':>12} {'cost':>6}")
    for rows, outputs in SHAPES:
        for name, solve in _solvers(*_problem(rows, outputs)).items():
            times = {1: [], cores: []}
            for _ in range(3):
                for threads in times:
                    torch.set_num_threads(threads)
                    start = time.perf_counter()
                    solve()
                    times[threads].append(time.perf_counter() - start)
            one, many = (float(np.median(times[t])) for t in (1, cores))
            print(f"{name:6} {f'{rows}x{outputs}':>10} {one:11.3f} {many:12.3f} {one / many:6.2f}x")


if __name__ == "__main__":
    main()
