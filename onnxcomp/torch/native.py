"""Builds and loads the range regularizers' C kernels (`range_kernels.c`) for the CPU.

Compiled on first use with the system's C compiler ($CC, else `cc`) into a per-user cache
($ONNXCOMP_CACHE_DIR, else $XDG_CACHE_HOME/onnxcomp or ~/.cache/onnxcomp), under a name
that hashes the source, the flags and the CPU, so that a cache shared between machines
never hands one CPU code built for another; then loaded through ctypes. Without a
compiler the regularizers use torch operations instead: the same results, slower.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("range_kernels.c")
KERNELS = ("linf", "margin", "soft_range")
# -ffast-math lets the compiler vectorize exp(); it is left off the link, which would
# otherwise add start-up code that flushes subnormals to zero in the whole process.
COMPILE_FLAGS = ("-O3", "-march=native", "-ffast-math", "-fPIC", "-std=c99")
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}


def cache_dir() -> Path:
    if os.environ.get("ONNXCOMP_CACHE_DIR"):
        return Path(os.environ["ONNXCOMP_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "onnxcomp"


def _cpu_signature() -> str:
    """The CPU's model and feature flags (what -march=native compiles for)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    wanted = [line for line in lines if line.startswith(("model name", "flags", "Features", "CPU part"))]
    return "\n".join(sorted(set(wanted))) + platform.machine() + platform.processor()


def _build(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as work:
        objects, library = Path(work) / "kernels.o", Path(work) / "kernels.so"
        try:
            _run([compiler, "-c", *COMPILE_FLAGS, str(SOURCE), "-o", str(objects)])
        except subprocess.CalledProcessError:  # a compiler that does not know -march=native
            _run([compiler, "-c", *[f for f in COMPILE_FLAGS if f != "-march=native"], str(SOURCE), "-o", str(objects)])
        _run([compiler, "-shared", str(objects), "-o", str(library), "-lm"])
        os.replace(library, target)  # atomic: a process compiling beside this one never sees half a file


def _run(command: list[str]) -> None:
    subprocess.run(command, check=True, capture_output=True, text=True)


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None (with a warning) when they cannot be built here."""
    compiler = os.environ.get("CC") or "cc"
    if shutil.which(compiler) is None:
        warnings.warn(f"range regularizers: no C compiler ({compiler!r}); using torch operations (slower on small "
                      "models; set CC to a compiler to speed them up)", stacklevel=3)
        return None
    key = hashlib.sha256("\0".join([SOURCE.read_text(), compiler, *COMPILE_FLAGS, _cpu_signature()]).encode()).hexdigest()[:16]
    target = cache_dir() / f"range_kernels-{key}.so"
    try:
        if not target.exists():
            _build(compiler, target)
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.CalledProcessError) as error:
        detail = (getattr(error, "stderr", None) or str(error)).strip()
        reason = detail.splitlines()[-1] if detail else error
        warnings.warn(f"range regularizers: could not build the C kernels ({reason}); using torch operations", stacklevel=3)
        return None
    pointer = ctypes.c_void_p
    for kernel in KERNELS:
        for suffix in _SUFFIX.values():
            function = getattr(lib, f"{kernel}_{suffix}")
            function.restype = None
            function.argtypes = [ctypes.c_int64, *[pointer] * 7, ctypes.c_double, ctypes.c_int64, ctypes.c_int64, *[pointer] * 4]
    return lib


class Layers:
    """What the kernels need to know of the covered layers that does not change between
    steps: output channels, elements per channel and BatchNorm epsilons."""

    def __init__(self, channels: list[int], lengths: list[int], eps: list[float]):
        self.count = len(channels)
        self.channels = torch.tensor(channels, dtype=torch.int64)  # tensors, not ctypes arrays: they pickle
        self.lengths = torch.tensor(lengths, dtype=torch.int64)
        self.eps = torch.tensor(eps, dtype=torch.float64)


def _pointers(tensors: list[torch.Tensor | None]) -> ctypes.Array:
    return (ctypes.c_void_p * len(tensors))(*[None if t is None else t.data_ptr() for t in tensors])


def run(kernel: str, layers: Layers, weights: list[torch.Tensor], gammas: list, variances: list,
        values: torch.Tensor | None, strength: float, per_channel: bool, decay: bool) -> tuple:
    """Loss, gradients per weight, per gamma (None where gammas has None) and per value.

    The caller hands CPU tensors, contiguous, all of one dtype (float32 or float64): each
    weight (channels, length) in the layer's output-first order, gammas[l] and
    variances[l] None without a BatchNorm. (Checking each would cost a tenth of the call.)"""
    grads = [torch.empty_like(w) for w in weights]
    gamma_grads = [None if g is None else torch.empty_like(g) for g in gammas]
    loss = weights[0].new_empty(())
    dvalues = None if values is None else values.new_empty(layers.count)
    function = getattr(library(), f"{kernel}_{_SUFFIX[weights[0].dtype]}")
    function(layers.count, layers.channels.data_ptr(), layers.lengths.data_ptr(), _pointers(weights), _pointers(gammas),
             _pointers(variances), layers.eps.data_ptr(), None if values is None else values.data_ptr(), strength, int(per_channel), int(decay),
             _pointers(grads), _pointers(gamma_grads), loss.data_ptr(), None if dvalues is None else dvalues.data_ptr())
    return loss, grads, gamma_grads, dvalues
