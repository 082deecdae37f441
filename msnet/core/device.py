"""Choice of compute device and floating-point type, and the float32 convolution precision reversible stages
need on a GPU."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from msnet.errors import MsnetError


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


@contextmanager
def ieee_fp32_convolutions(enabled: bool = True) -> Iterator[None]:
    """cuDNN convolutions in full IEEE float32 (TensorFloat-32 off) inside the block.

    PyTorch lets cuDNN run float32 convolutions in TF32 (10 bits of mantissa, relative
    rounding ~5e-4) on Ampere and later GPUs by default. This sets the per-operator flag
    ``torch.backends.cudnn.conv.fp32_precision`` to ``"ieee"`` and restores the value it
    found on exit, also when the block raises. Only the convolution flag is touched (the
    API PyTorch recommends; matrix products and cuDNN RNNs keep theirs), so while the
    block runs the legacy aggregate getter ``torch.backends.cudnn.allow_tf32`` may raise
    that conv and RNN flags differ. ``enabled=False``: does nothing. A no-op on the CPU,
    which has no TF32 convolutions.
    """
    if not enabled:
        yield
        return
    conv = torch.backends.cudnn.conv
    saved = conv.fp32_precision
    conv.fp32_precision = "ieee"
    try:
        yield
    finally:
        conv.fp32_precision = saved
