"""torch for the solvers that need it (MagR, OPTQ): imported on first use, so that the rest
of onnxcomp runs without it, and the device they run on."""

from __future__ import annotations

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
