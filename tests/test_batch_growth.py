"""``trainer.batch_growth`` / ``trainer.batch_max``: a mini-batch that grows every epoch (the hybrid
stochastic-deterministic regime), in the trainer, its records and the benchmarks' work accounting."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from msnet import MsnetError
from msnet.runs import read_metrics
from msnet.training import train
from msnet.training.fit import epoch_batch_size
from msnet.training.setup import check_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts" / "bench"))
from _harness import run  # noqa: E402
from tests.conftest import assert_same_weights  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _trainer(**kw):
    return OmegaConf.create({"batch_size": 128, "batch_growth": 1.0, "batch_max": None, **kw})


def test_the_batch_grows_geometrically_up_to_its_cap():
    sizes = lambda t, n=1000: [epoch_batch_size(t, e, n) for e in range(1, 6)]  # noqa: E731
    assert sizes(_trainer()) == [128] * 5
    assert sizes(_trainer(batch_growth=2)) == [128, 256, 512, 1000, 1000]  # the whole set at most
    assert sizes(_trainer(batch_growth=2, batch_max=300)) == [128, 256, 300, 300, 300]
    assert sizes(_trainer(batch_growth=1.5)) == [128, 192, 288, 432, 648]
    from msnet.config import upgrade_config

    saved = upgrade_config({"trainer": {"name": "single", "batch_size": 64}})  # a config saved before it existed
    assert epoch_batch_size(OmegaConf.create(saved["trainer"]), 7, 1000) == 64


def test_bad_growth_settings_fail_in_one_line(tiny_cfg):
    with pytest.raises(MsnetError, match=r"trainer.batch_growth must be at least 1 .* got 0.5"):
        check_config(tiny_cfg(["trainer.batch_growth=0.5"]))
    with pytest.raises(MsnetError, match=r"trainer.batch_max=10 is below trainer.batch_size=32; raise it"):
        check_config(tiny_cfg(["trainer.batch_size=32", "trainer.batch_max=10"]))


def test_a_growing_run_records_each_epochs_batch_and_resumes_exactly(tiny_cfg, tmp_path, cut_and_resume):
    cfg = tiny_cfg(["trainer.epochs=3", "trainer.batch_size=32", "trainer.batch_growth=2"])
    full = train(cfg, tmp_path / "full")
    assert [m["batch_size"] for m in read_metrics(tmp_path / "full")] == [32, 64, 128]
    fixed = train(tiny_cfg(["trainer.epochs=3", "trainer.batch_size=32"]), tmp_path / "fixed")
    assert "batch_size" not in read_metrics(tmp_path / "fixed")[0]  # a fixed batch adds no column
    assert full["final_test_loss"] != fixed["final_test_loss"]

    cut_and_resume(["trainer.epochs=3", "trainer.batch_size=32", "trainer.batch_growth=2"], 3)
    assert [m["batch_size"] for m in read_metrics(tmp_path / "resumed")] == [32, 64, 128]
    assert_same_weights(tmp_path / "full" / "checkpoints" / "last.pt", tmp_path / "resumed" / "checkpoints" / "last.pt")


def test_the_benchmarks_points_count_the_grown_batches(tiny_cfg):
    """scripts/bench/_harness.run: the mini-batches of each chunk follow the growing batch, and batches times
    images per batch add up to the images trained on (what bench_mgopt's work accounting relies on)."""
    from msnet.core import resolve_device, resolve_dtype
    from msnet.data import prepare_data
    cfg = tiny_cfg(["trainer.epochs=3", "trainer.batch_size=25", "trainer.batch_growth=2", "trainer.progress=false"])
    data = prepare_data(cfg.dataset, resolve_device(cfg.device), resolve_dtype(cfg.dtype))
    n = data.sizes()["train"]
    _, pts = run(cfg, data, evals_per_epoch=2)
    pts = list(pts)
    sizes = [epoch_batch_size(cfg.trainer, e, n) for e in (1, 2, 3)]
    assert sizes == [25, 50, 100]
    halves = [n // 2, n - n // 2]
    expected = [sum(-(-h // b) for h in halves) for b in sizes]  # batches per epoch, two chunks each
    ends = [p["batches"] for p in pts if p["kind"] == "epoch"]
    assert ends == [sum(expected[: i + 1]) for i in range(3)]
    images, last = 0.0, 0
    for p in pts:
        images, last = images + (p["batches"] - last) * p["batch"], p["batches"]
    assert images == pytest.approx(3 * n)
