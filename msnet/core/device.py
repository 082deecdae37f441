"""Choice of compute device and floating-point type."""

from __future__ import annotations

import torch

from msnet import MsnetError


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cpu``; ``cuda`` / ``cuda:K`` (fails if absent)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise MsnetError(f"device={name} but no CUDA GPU is visible; use device=auto or device=cpu")
        return torch.device(name)
    raise MsnetError(f"unknown device {name!r}; use device=auto, device=cpu or device=cuda")


DTYPES = {"float32": torch.float32, "float64": torch.float64}


def resolve_dtype(name: str) -> torch.dtype:
    """``float32`` or ``float64``."""
    try:
        return DTYPES[name]
    except KeyError:
        raise MsnetError(f"unknown dtype {name!r}; use dtype=float32 or dtype=float64") from None
