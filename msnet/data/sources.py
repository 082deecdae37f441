"""Dataset sources: each loads a dataset's raw train and test images as uint8 tensors.

A source returns :class:`RawData` with images ``(n, C, H, W)`` uint8 and labels
``(n,)`` int64, on the CPU. Sources never download silently in a loop: they look
on disk first (including Debian's offline dataset packages), then try
torchvision's download once, and fail with one line that says what to install
or where to put the files.
"""

from __future__ import annotations

import gzip
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from msnet.errors import MsnetError
from msnet.registry import Registry


@dataclass
class RawData:
    """Train and test images ``(n, C, H, W)`` uint8 and labels ``(n,)`` int64."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int


Source = Callable[[Any], RawData]
DATASETS: Registry[Source] = Registry("dataset")

IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _to_nchw(images: Any) -> torch.Tensor:
    """uint8 images ``(n, H, W)`` or ``(n, H, W, C)`` -> ``(n, C, H, W)``."""
    t = torch.as_tensor(np.asarray(images))
    if t.dim() == 3:
        t = t.unsqueeze(1)
    elif t.dim() == 4:
        t = t.permute(0, 3, 1, 2)
    return t.contiguous()


def _stage_system_idx(raw_folder: Path, system_dirs: Sequence[str]) -> None:
    """Gunzip IDX files shipped by an OS package (e.g. Debian's dataset-fashion-mnist) into ``raw_folder``."""
    if all((raw_folder / f).exists() for f in IDX_FILES):
        return
    for d in system_dirs:
        src = Path(d)
        if all((src / f"{f}.gz").exists() for f in IDX_FILES):
            raw_folder.mkdir(parents=True, exist_ok=True)
            for f in IDX_FILES:
                target = raw_folder / f
                if not target.exists():
                    tmp = target.with_suffix(".part")
                    with gzip.open(src / f"{f}.gz", "rb") as fin, open(tmp, "wb") as fout:
                        shutil.copyfileobj(fin, fout)
                    tmp.replace(target)
            return


DEFAULT_ROOT = "~/.cache/msnet/data"
"""Where datasets are unpacked or downloaded unless ``MSNET_DATA`` or ``dataset.root`` says otherwise."""


def data_root(cfg: Any) -> Path:
    """``dataset.root`` as a folder, made when it is the default cache (``MSNET_DATA``, else :data:`DEFAULT_ROOT`)
    or ``dataset.create_root=true``. Any other root that does not exist is a typo until shown otherwise: one line,
    and nothing is created or copied."""
    root = Path(cfg.root).expanduser()
    default = Path(os.environ.get("MSNET_DATA", DEFAULT_ROOT)).expanduser()
    if not root.is_dir():
        if root.exists():
            raise MsnetError(f"dataset.root={cfg.root} is a file, not a folder; point dataset.root at a folder")
        if root.resolve() != default.resolve() and not cfg.get("create_root", False):
            raise MsnetError(f"dataset.root={cfg.root} does not exist; point it at the folder that holds the data, "
                             f"or add dataset.create_root=true to have msnet create it and unpack or download into it")
        root.mkdir(parents=True, exist_ok=True)
    return root


def _torchvision_idx(cfg: Any, cls_name: str, folder: str, system_dirs: Sequence[str], hint: str) -> RawData:
    import torchvision.datasets as tvd

    root = data_root(cfg)
    _stage_system_idx(root / folder / "raw", system_dirs)
    cls = getattr(tvd, cls_name)
    try:
        train = cls(str(root), train=True, download=bool(cfg.download))
        test = cls(str(root), train=False, download=bool(cfg.download))
    except Exception as err:  # torchvision raises RuntimeError / URLError / OSError offline
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise MsnetError(
            f"{cfg.name} is not in {root / folder / 'raw'} and could not be downloaded ({reason}); {hint}"
        ) from None
    return RawData(_to_nchw(train.data), train.targets.long(), _to_nchw(test.data), test.targets.long(), 10)


@DATASETS.register("fashion_mnist")
def fashion_mnist(cfg: Any) -> RawData:
    """Fashion-MNIST (Xiao et al. 2017), 28x28 grey, 10 classes, 60k/10k. Offline via Debian's package.

    The four ``*-ubyte.gz`` files are also found in ``$MSNET_FASHION_DIR`` (looked at first),
    e.g. a git-ignored ``data/fashion-mnist/`` that travels with a checkout to a machine
    without the package (``scripts/stage_gpu_check.sh``).
    """
    return _torchvision_idx(
        cfg,
        "FashionMNIST",
        "FashionMNIST",
        tuple(d for d in (os.environ.get("MSNET_FASHION_DIR"), "/usr/share/datasets/fashion-mnist") if d),
        "install it with `apt-get install -y dataset-fashion-mnist`, or put the four IDX files "
        "(.gz) in a folder named by MSNET_FASHION_DIR, or run where the network is reachable",
    )


@DATASETS.register("mnist")
def mnist(cfg: Any) -> RawData:
    """MNIST (LeCun et al. 1998), 28x28 grey, 10 classes, 60k/10k. Needs a network or local files."""
    return _torchvision_idx(
        cfg,
        "MNIST",
        "MNIST",
        ("/usr/share/datasets/mnist",),
        "run once where the network is reachable, or put the four IDX files "
        "(train-images-idx3-ubyte, ...) in that folder; offline, dataset=fashion_mnist works",
    )


@DATASETS.register("cifar10")
def cifar10(cfg: Any) -> RawData:
    """CIFAR-10 (Krizhevsky 2009), 32x32 RGB, 10 classes, 50k/10k. Needs a network or local files."""
    import torchvision.datasets as tvd

    root = data_root(cfg)
    try:
        train = tvd.CIFAR10(str(root), train=True, download=bool(cfg.download))
        test = tvd.CIFAR10(str(root), train=False, download=bool(cfg.download))
    except Exception as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise MsnetError(
            f"cifar10 is not in {root / 'cifar-10-batches-py'} and could not be downloaded ({reason}); "
            "run once where the network is reachable, or unpack cifar-10-python.tar.gz there; "
            "offline, dataset=fashion_mnist works"
        ) from None
    return RawData(
        _to_nchw(train.data), torch.as_tensor(train.targets).long(),
        _to_nchw(test.data), torch.as_tensor(test.targets).long(), 10,
    )


NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


@DATASETS.register("npz")
def npz(cfg: Any) -> RawData:
    """A user's own ``.npz`` with x_train, y_train, x_test, y_test; images uint8 (n,H,W) or (n,H,W,C)."""
    if not cfg.path:
        raise MsnetError("dataset=npz needs a file: add dataset.path=/path/to/data.npz")
    path = Path(cfg.path).expanduser()
    if not path.is_file():
        raise MsnetError(f"npz file {path} does not exist; check dataset.path")
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in NPZ_KEYS if k not in f.files]
            if missing:
                raise MsnetError(
                    f"{path} lacks {', '.join(missing)}; an npz dataset needs arrays {', '.join(NPZ_KEYS)}"
                )
            arrays = {k: f[k] for k in NPZ_KEYS}
    except MsnetError:
        raise
    except Exception as err:
        raise MsnetError(f"cannot read {path} as an npz file ({err}); write it with numpy.savez") from None
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.dtype != np.uint8 or x.ndim not in (3, 4):
            raise MsnetError(
                f"{path}: x_{split} must be uint8 images (n,H,W) or (n,H,W,C), got {x.dtype} {x.shape}"
            )
        if y.ndim != 1 or y.shape[0] != x.shape[0] or not np.issubdtype(y.dtype, np.integer):
            raise MsnetError(
                f"{path}: y_{split} must be integer labels of shape ({x.shape[0]},), got {y.dtype} {y.shape}"
            )
        if y.min() < 0:
            raise MsnetError(f"{path}: y_{split} has negative labels; labels must be 0..classes-1")
    if arrays["x_train"].shape[1:] != arrays["x_test"].shape[1:]:
        raise MsnetError(
            f"{path}: x_train images {arrays['x_train'].shape[1:]} and x_test images "
            f"{arrays['x_test'].shape[1:]} differ in size"
        )
    classes = int(max(arrays["y_train"].max(), arrays["y_test"].max())) + 1
    return RawData(
        _to_nchw(arrays["x_train"]), torch.as_tensor(arrays["y_train"]).long(),
        _to_nchw(arrays["x_test"]), torch.as_tensor(arrays["y_test"]).long(), classes,
    )


@DATASETS.register("synthetic")
def synthetic(cfg: Any) -> RawData:
    """Random but learnable images: each class is a smooth random template plus noise.

    For tests where the data does not matter. Deterministic in ``split_seed``.
    Sizes from ``n_train``, ``n_test``, ``image_size``, ``channels``, ``num_classes``.
    """
    g = torch.Generator().manual_seed(int(cfg.split_seed))
    k, c, s = int(cfg.num_classes), int(cfg.channels), int(cfg.image_size)
    coarse = torch.rand(k, c, max(2, s // 4), max(2, s // 4), generator=g)
    templates = torch.nn.functional.interpolate(coarse, size=(s, s), mode="bilinear", align_corners=False)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, k, (n,), generator=g)
        x = templates[y] + 0.35 * torch.randn(n, c, s, s, generator=g)
        return (x.clamp(0, 1) * 255).round().to(torch.uint8), y

    x_train, y_train = draw(int(cfg.n_train))
    x_test, y_test = draw(int(cfg.n_test))
    return RawData(x_train, y_train, x_test, y_test, k)
