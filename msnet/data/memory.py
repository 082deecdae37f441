"""Datasets held as tensors on the compute device, split and normalised once, batched by index."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Optional, Tuple

import torch

from msnet.errors import MsnetError
from msnet.data.sources import DATASETS, RawData


@dataclass
class DataBundle:
    """Normalised float images ``(n, C, H, W)`` and int64 labels ``(n,)`` for each split, on one device."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    mean: torch.Tensor
    std: torch.Tensor

    @property
    def in_channels(self) -> int:
        return self.x_train.shape[1]

    @property
    def image_size(self) -> Tuple[int, int]:
        return (self.x_train.shape[2], self.x_train.shape[3])

    def split(self, name: str) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)`` of the ``train``, ``val`` or ``test`` split."""
        if name not in ("train", "val", "test"):
            raise MsnetError(f"unknown split {name!r}; use train, val or test")
        return getattr(self, f"x_{name}"), getattr(self, f"y_{name}")

    def sizes(self) -> dict:
        return {"train": len(self.y_train), "val": len(self.y_val), "test": len(self.y_test)}


def load_raw(cfg: Any) -> RawData:
    """Look up ``cfg.name`` in the dataset registry and load it (CPU, uint8)."""
    return DATASETS.get(cfg.name)(cfg)


def prepare_data(cfg: Any, device: torch.device, dtype: torch.dtype = torch.float32) -> DataBundle:
    """Load, split off a deterministic validation set, normalise with train statistics, move to ``device``.

    The validation set is ``cfg.val_size`` images drawn from the training set by a
    permutation seeded with ``cfg.split_seed`` (independent of the run's seed, so
    every run of a sweep sees the same split). ``cfg.train_subset`` and
    ``cfg.test_subset`` keep only the first n images of those splits (quick runs, tests).
    """
    raw = load_raw(cfg)
    n = raw.x_train.shape[0]
    val_size = int(cfg.val_size)
    if not 0 <= val_size < n:
        raise MsnetError(f"dataset.val_size={val_size} must be between 0 and {n - 1} (training images: {n})")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(cfg.split_seed)))
    val_idx, train_idx = perm[:val_size], perm[val_size:]
    if cfg.train_subset is not None:
        train_idx = train_idx[: int(cfg.train_subset)]
    x_test, y_test = raw.x_test, raw.y_test
    if cfg.test_subset is not None:
        x_test, y_test = x_test[: int(cfg.test_subset)], y_test[: int(cfg.test_subset)]

    x_tr = raw.x_train[train_idx].to(dtype) / 255.0
    mean = x_tr.mean(dim=(0, 2, 3))
    std = x_tr.std(dim=(0, 2, 3)).clamp_min(1e-6)

    def norm(x: torch.Tensor) -> torch.Tensor:
        x = x.to(dtype) / 255.0 if x.dtype == torch.uint8 else x
        return ((x - mean[None, :, None, None]) / std[None, :, None, None]).to(device)

    return DataBundle(
        name=str(cfg.name),
        x_train=norm(x_tr),
        y_train=raw.y_train[train_idx].to(device),
        x_val=norm(raw.x_train[val_idx]),
        y_val=raw.y_train[val_idx].to(device),
        x_test=norm(x_test),
        y_test=y_test.to(device),
        num_classes=raw.num_classes,
        mean=mean,
        std=std,
    )


def batches(
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    generator: Optional[torch.Generator] = None,
    shuffle: bool = False,
) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(x_b, y_b)`` mini-batches; shuffled by a permutation drawn from ``generator``.

    The permutation is drawn on the CPU (so the same seed gives the same batches
    on every device) and the last batch may be smaller.
    """
    n = x.shape[0]
    if shuffle:
        idx = torch.randperm(n, generator=generator).to(x.device)
        for start in range(0, n, batch_size):
            sel = idx[start : start + batch_size]
            yield x[sel], y[sel]
    else:
        for start in range(0, n, batch_size):
            yield x[start : start + batch_size], y[start : start + batch_size]


def num_batches(n: int, batch_size: int) -> int:
    """Number of mini-batches :func:`batches` yields for n samples."""
    return (n + batch_size - 1) // batch_size
