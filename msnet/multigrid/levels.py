"""Levels of a resolution hierarchy: their names, and data restricted to them.

Level names: ``fine`` = the data's native resolution, ``coarse`` = one restriction,
``coarser`` = two; ``downK`` beyond. A level can also be named by its pixel size.
Training schedules (:mod:`msnet.training.schedule`), ``msnet evaluate`` and ``msnet transfer``
all name levels and restrict data through these functions.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Optional, Tuple

import torch

from msnet.errors import MsnetError
from msnet.data import DataBundle
from msnet.multigrid.network import restrict_images

LEVEL_NAMES = ("fine", "coarse", "coarser")


def level_name(down: int) -> str:
    """``fine``, ``coarse``, ``coarser``, then ``down3``, ..."""
    return LEVEL_NAMES[down] if down < len(LEVEL_NAMES) else f"down{down}"


def parse_level(level: Any, native: Tuple[int, int]) -> int:
    """Number of restrictions below ``native`` that a level name or pixel size means."""
    text = str(level).strip()
    if text in LEVEL_NAMES:
        return LEVEL_NAMES.index(text)
    if text.startswith("down") and text[4:].isdigit():
        return int(text[4:])
    if text.isdigit():
        size, down = int(text), 0
        h = native[0]
        while h > size and h % 2 == 0:
            h //= 2
            down += 1
        if h != size:
            raise MsnetError(
                f"level {text}: no level of {native[0]}x{native[1]} images is {text} pixels wide; "
                f"use fine, coarse, coarser or one of {_sizes(native)}"
            )
        return down
    raise MsnetError(f"unknown level {text!r}; use fine, coarse, coarser or a pixel size such as {native[0] // 2}")


def _sizes(native: Tuple[int, int]) -> str:
    sizes, h = [], native[0]
    while h >= 2:
        sizes.append(str(h))
        if h % 2:
            break
        h //= 2
    return ", ".join(sizes)


def level_data(data: DataBundle, down: int, op: str = "linear", sigma: float = 1.0) -> DataBundle:
    """``data`` with every split's images restricted ``down`` times (Gaussian smoothing, then R)."""
    if down == 0:
        return data
    with torch.no_grad():
        return replace(
            data,
            x_train=restrict_images(data.x_train, down, op, sigma),
            x_val=restrict_images(data.x_val, down, op, sigma),
            x_test=restrict_images(data.x_test, down, op, sigma),
        )


def restriction_count(native: Tuple[int, int], size: Tuple[int, int]) -> Optional[int]:
    """k with native / 2**k == size (both sides), or None if no level of ``native`` has that size."""
    h, w = native
    k = 0
    while (h, w) != tuple(size):
        if h % 2 or w % 2 or h < size[0]:
            return None
        h, w, k = h // 2, w // 2, k + 1
    return k


def transfer_settings(config: Any) -> Tuple[str, float]:
    """The image operator and smoothing a run used (its pyramid's, else the defaults)."""
    pyramid = (config or {}).get("pyramid") if hasattr(config, "get") else None
    if pyramid:
        return str(pyramid.get("operator", "linear")), float(pyramid.get("sigma", 1.0))
    return "linear", 1.0


def data_for_size(data: DataBundle, size: Tuple[int, int], config: Any, what: str) -> DataBundle:
    """``data`` restricted to ``size`` the way the run described by ``config`` restricted it."""
    k = restriction_count(data.image_size, tuple(size))
    if k is None:
        raise MsnetError(
            f"{what} expects {size[0]}x{size[1]} images, which no level of {data.name} "
            f"({data.image_size[0]}x{data.image_size[1]}) has; use the dataset it was trained on"
        )
    op, sigma = transfer_settings(config)
    return level_data(data, k, op, sigma)
