"""Shared fixtures: compose the real configs, shrink them, write into tmp_path."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

from msnet.config import register_configs

FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
DATA_ROOT = Path(os.environ.get("MSNET_DATA", "~/.cache/msnet/data")).expanduser()


def fashion_available() -> bool:
    """Fashion-MNIST is on disk (Debian's package, $MSNET_FASHION_DIR, or already staged under the data root)."""
    staged = DATA_ROOT / "FashionMNIST" / "raw" / "train-images-idx3-ubyte"
    dirs = [FASHION_SYSTEM_DIR] + ([Path(os.environ["MSNET_FASHION_DIR"])] if os.environ.get("MSNET_FASHION_DIR") else [])
    return staged.exists() or any((d / "train-images-idx3-ubyte.gz").exists() for d in dirs)


def loglog_slope(hs, errors) -> float:
    """Least-squares slope of log(error) against log(h): the observed order of convergence."""
    import math

    x, y = [math.log(h) for h in hs], [math.log(e) for e in errors]
    mx, my = sum(x) / len(x), sum(y) / len(y)
    return sum((a - mx) * (b - my) for a, b in zip(x, y)) / sum((a - mx) ** 2 for a in x)


FASHION_MISSING = "Fashion-MNIST not on disk (apt-get install -y dataset-fashion-mnist)"

needs_fashion = pytest.mark.needs_fashion
"""Marks a test that trains on real Fashion-MNIST. Without the data it is skipped on a workstation and
fails in CI (``CI=true``, which GitHub Actions and GitLab CI set), so that a CI machine without the
data cannot pass without these tests."""


def pytest_configure(config):
    config.addinivalue_line("markers", "needs_fashion: trains on real Fashion-MNIST (skipped without it; "
                                       "a failure when CI=true)")


def pytest_runtest_setup(item):
    if item.get_closest_marker("needs_fashion") is None or fashion_available():
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{FASHION_MISSING}; CI=true, so this real-data test may not be skipped", pytrace=False)
    pytest.skip(FASHION_MISSING)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` skip where no GPU is visible (``pytest -m cuda`` selects them on a GPU machine)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def one_thread():
    """Tiny tensors: one torch thread is faster than two fighting for a shared core.

    Modules of small numerical tests use it with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fail_epoch(monkeypatch):
    """``fail_epoch(n, error)``: the n-th epoch the level loop (:mod:`msnet.training.fit`) trains raises ``error``
    (default ``KeyboardInterrupt``: Ctrl-C in that epoch); ``restore()`` on the returned handle
    puts the real loop back for a resume in the same test."""
    from msnet.training import fit

    real = fit.train_epoch

    class Handle:
        def restore(self) -> None:
            monkeypatch.setattr(fit, "train_epoch", real)

    def arm(n: int, error: BaseException | type = KeyboardInterrupt) -> Handle:
        calls = {"n": 0}

        def failing(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == n:
                raise error
            return real(*args, **kwargs)

        monkeypatch.setattr(fit, "train_epoch", failing)
        return Handle()

    return arm


TIMES = ("epoch_time_s", "samples_per_s", "wall_time_s")


def strip_times(records: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """``metrics.jsonl`` rows without their clock readings: what two runs of the same work share exactly."""
    return [{k: v for k, v in r.items() if k not in TIMES} for r in records]


def assert_same_weights(a: Path, b: Path) -> None:
    """The checkpoints ``a`` and ``b`` hold bit-identical weights."""
    from msnet.runs import load_checkpoint

    wa, wb = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0)


@pytest.fixture
def cut_and_resume(tiny_cfg, tmp_path, fail_epoch) -> Callable[..., Tuple[Dict[str, Any], Dict[str, Any]]]:
    """``cut_and_resume(overrides, epoch)``: train ``tiny_cfg(overrides)`` into ``tmp_path / "cut"`` with Ctrl-C in
    its ``epoch``-th epoch, then resume that run's ``checkpoints/last.pt`` into ``tmp_path / "resumed"`` as a user
    would (``resume=PATH`` among the overrides). Returns the cut run's checkpoint and the resumed run's summary."""
    from msnet import MsnetError
    from msnet.runs import load_checkpoint
    from msnet.training import train

    def _run(overrides: List[str], epoch: int) -> Tuple[Dict[str, Any], Dict[str, Any]]:
        cut = fail_epoch(epoch)
        with pytest.raises(MsnetError, match=f"interrupted during epoch {epoch}; continue with: msnet train resume="):
            train(tiny_cfg(overrides), tmp_path / "cut")
        cut.restore()
        ck = tmp_path / "cut" / "checkpoints" / "last.pt"
        summary = train(tiny_cfg([*overrides, f"resume={ck}"]), tmp_path / "resumed", overrides=[f"resume={ck}"])
        return load_checkpoint(ck), summary

    return _run


@pytest.fixture(autouse=True)
def _clear_hydra():
    GlobalHydra.instance().clear()
    yield
    GlobalHydra.instance().clear()


@pytest.fixture
def compose_cfg() -> Callable[..., DictConfig]:
    """``compose_cfg(name, overrides)``: the real config ``name`` composed with ``overrides``."""
    register_configs()

    def _compose(name: str = "train", overrides: List[str] | None = None) -> DictConfig:
        GlobalHydra.instance().clear()
        with initialize_config_module(config_module="msnet.conf", version_base="1.3"):
            return compose(config_name=name, overrides=list(overrides or []))

    return _compose


@pytest.fixture
def tiny_cfg(compose_cfg) -> Callable[..., DictConfig]:
    """A train config shrunk to seconds: synthetic 8x8 data, 4 channels, 2 layers, CPU, no progress bar."""

    def _tiny(overrides: List[str] | None = None) -> DictConfig:
        base = [
            "dataset=synthetic", "dataset.n_train=600", "dataset.n_test=200", "dataset.val_size=200",
            "dataset.image_size=8", "model.channels=4", "model.layers=2", "trainer.epochs=2",
            "trainer.batch_size=64", "trainer.progress=false", "device=cpu",
        ]
        return compose_cfg("train", base + list(overrides or []))

    return _tiny


@pytest.fixture
def fashion_cfg(compose_cfg) -> Callable[..., DictConfig]:
    """A train config on a small real Fashion-MNIST subset."""

    def _fashion(overrides: List[str] | None = None) -> DictConfig:
        base = [
            "dataset.train_subset=3000", "dataset.val_size=1000", "dataset.test_subset=2000",
            "model.channels=8", "trainer.epochs=2", "trainer.progress=false", "device=cpu",
        ]
        cfg = compose_cfg("train", base + list(overrides or []))
        with open_dict(cfg):
            cfg.dataset.root = str(DATA_ROOT)
        return cfg

    return _fashion


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
