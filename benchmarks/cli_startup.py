"""How long the command line takes to answer before any work: `onnxcomp --help`,
`onnxcomp compress --help`, and `import onnxcomp` (the package loads onnx, onnxruntime and
numpy only when a command needs them).

    python benchmarks/cli_startup.py [--runs 11]

Each is run in a fresh process, the runs of the three taking turns; medians and the
fastest run, in seconds, beside a bare `python -c pass` for the interpreter's own start.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time

import numpy as np


def _commands() -> dict[str, list[str]]:
    onnxcomp = shutil.which("onnxcomp") or f"{sys.prefix}/bin/onnxcomp"
    return {
        "python -c pass": [sys.executable, "-c", "pass"],
        "import onnxcomp": [sys.executable, "-c", "import onnxcomp"],
        "onnxcomp --help": [onnxcomp, "--help"],
        "onnxcomp compress --help": [onnxcomp, "compress", "--help"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=11)
    args = parser.parse_args()
    commands = _commands()
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(args.runs):
        for name, command in commands.items():
            start = time.perf_counter()
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            times[name].append(time.perf_counter() - start)
    print(f"{'command':<26} {'median s':>9} {'fastest s':>10}")
    for name, values in times.items():
        print(f"{name:<26} {np.median(values):9.3f} {min(values):10.3f}")


if __name__ == "__main__":
    main()
