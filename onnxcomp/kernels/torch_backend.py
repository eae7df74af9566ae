"""torch for the solvers that need it (MagR, OPTQ): imported on first use, so that the rest
of onnxcomp runs without it, and the device they run on."""

from __future__ import annotations

import functools

from onnxcomp.errors import ConfigError


def load_torch():
    try:
        import torch
    except ImportError:
        raise ConfigError("--magr and --rounding optq need torch; install it with pip install 'onnxcomp[torch]'") from None
    return torch


def torch_device(device: str):
    """The torch device the solvers run on; --device cuda without CUDA in torch is an error,
    not a silent fall back to the CPU."""
    torch = load_torch()
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "--device cuda needs a CUDA build of torch for MagR and OPTQ (this one has no CUDA device); "
            "install one from pytorch.org or use --device cpu"
        )
    return torch.device(device)


def one_thread_on_cpu(solver):
    """Run `solver` (which takes `device=`) on one thread when on the CPU: torch's BLAS
    splits its sums differently for different thread counts, and the codes must not depend
    on how many cores a machine has (the same input and options give the same bytes
    anywhere). On a GPU it runs as it is."""

    @functools.wraps(solver)
    def run(*args, device: str = "cpu", **kwargs):
        torch = load_torch()
        if torch_device(device).type != "cpu":
            return solver(*args, device=device, **kwargs)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return solver(*args, device=device, **kwargs)
        finally:
            torch.set_num_threads(threads)

    return run
