"""The depth cascade sized by cost (``depth.sizing=cost``) and fractional epochs per depth level (issue 22)."""

from __future__ import annotations

import pytest
import torch
from hydra.errors import HydraException

from msnet import MsnetError
from msnet.runs import read_metrics
from msnet.training import train
from msnet.training.fit import epoch_parts
from msnet.training.schedule import build_schedule


@pytest.mark.parametrize("sizing", ["cost", "epochs"])
def test_cost_sizing_gives_each_level_its_share_of_the_deepest_levels_epochs(compose_cfg, sizing):
    entries = [0.1, 0.3, 0.5, 2]
    cfg = compose_cfg("train", ["+depth=doubling", "depth.stop=16", f"depth.sizing={sizing}",
                                f"depth.epochs=[{','.join(map(str, entries))}]"])
    levels = build_schedule(cfg, (28, 28), 1)
    assert [lv.layers for lv in levels] == [2, 4, 8, 16]
    for lv, e in zip(levels, entries):
        want = e * 16 / lv.layers if sizing == "cost" else e
        assert lv.trained_epochs() == pytest.approx(want, abs=1e-6), lv
        assert lv.epochs - 1 < want <= lv.epochs and 0 < lv.share <= 1, lv  # epochs begun, share of the last
    # the cost sizing gives every shallow level the same work: epochs x layers is constant
    if sizing == "cost":
        work = [lv.trained_epochs() * lv.layers / e for lv, e in zip(levels, entries)]
        assert max(work) == pytest.approx(min(work))


def test_whole_epochs_keep_share_one_and_zero_epochs_stay_zero(compose_cfg):
    levels = build_schedule(compose_cfg("train", ["+depth=doubling", "depth.stop=8", "depth.epochs=[0,1,2]"]), (28, 28), 1)
    assert [(lv.epochs, lv.share) for lv in levels] == [(0, 1.0), (1, 1.0), (2, 1.0)]
    assert [lv.trained_epochs() for lv in levels] == [0.0, 1.0, 2.0]


def test_bad_depth_sizing_and_epochs_fail_in_one_line(compose_cfg):
    with pytest.raises(MsnetError, match="depth.epochs must be >= 0"):
        build_schedule(compose_cfg("train", ["+depth=doubling", "depth.epochs=[-0.5]"]), (28, 28), 1)
    with pytest.raises(HydraException, match="sizing"):
        compose_cfg("train", ["+depth=doubling", "depth.sizing=work"])


@pytest.mark.parametrize("share,evals", [(1.0, 1), (0.3, 1), (0.3, 3), (1.0, 4)])
def test_epoch_parts_cover_the_share_of_the_images_once(share, evals):
    n = 101
    parts = epoch_parts(n, share, evals, torch.Generator().manual_seed(0))
    if share >= 1 and evals == 1:
        assert parts == [None]  # the whole set, shuffled by the epoch itself
        return
    idx = torch.cat(parts)
    assert len(parts) == evals
    assert idx.numel() == round(share * n if share < 1 else n)
    assert idx.unique().numel() == idx.numel() and int(idx.min()) >= 0 and int(idx.max()) < n


def test_cost_sized_cascade_trains_the_share_of_its_last_epoch(tiny_cfg, tmp_path):
    """2 -> 4 layers with 0.25 deep-epoch equivalents at 2 layers: 0.5 epoch there (half the images, one
    partial epoch), then one epoch at 4 layers; the metrics rows count the images each epoch trained."""
    cfg = tiny_cfg(["+depth=doubling", "depth.stop=4", "depth.sizing=cost", "depth.epochs=[0.25,1]"])
    summary = train(cfg, tmp_path / "run")
    assert [(lv["layers"], lv["epochs"]) for lv in summary["levels"]] == [(2, 0.5), (4, 1.0)]
    rows = read_metrics(tmp_path / "run")
    n = int(cfg.dataset.n_train) - int(cfg.dataset.val_size)
    assert [m["layers"] for m in rows] == [[2], [4]]
    trained = [round(m["samples_per_s"] * m["epoch_time_s"]) for m in rows]
    assert trained == [round(0.5 * n), n]
    assert summary["status"] == "completed"
