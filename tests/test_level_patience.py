"""``trainer.level_patience``: a level of a schedule (+pyramid, +depth) before the last ends once its validation
loss has plateaued, the next level starts from there, and a resume from that point agrees with the whole run;
``trainer.patience``: the same rule at the last level, early stopping of the run."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from msnet import MsnetError
from msnet.runs import read_metrics
from msnet.training import train
from msnet.training.schedule import plateaued
from msnet.training.setup import check_config

from .conftest import strip_times

# on the tiny synthetic problem the coarse validation loss falls 0.045 then 0.029 then 0.015 per epoch from epoch 8:
# with min_delta 0.05 and patience 2 the coarse level of 12 epochs ends after 10 (seen in a run of this config)
# these runs watch the validation loss (trainer.objective=best_val_loss); the default objective watches val_acc
LOSS = "trainer.objective=best_val_loss"
PYRAMID = ["+pyramid=2level", "pyramid.epochs=[12,2]", "trainer.level_patience=2", "trainer.min_delta=0.05", LOSS]


def test_plateau_rule():
    assert not plateaued([1.0, 1.0], patience=2)  # not more than patience losses yet
    assert plateaued([1.0, 1.0, 1.0], patience=2)  # no drop at all
    assert not plateaued([1.0, 1.0, 0.9], patience=2)  # the last one improved on the best before the window
    assert plateaued([1.0, 0.9, 0.95, 0.92], patience=2)  # the window's best (0.92) is above 0.9
    assert plateaued([1.0, 0.96, 0.97], patience=2, min_delta=0.05)  # 0.96 is not 0.05 below 1.0
    assert not plateaued([1.0, 0.94, 0.97], patience=2, min_delta=0.05)
    assert not plateaued([1.0, None, 1.0], patience=1) and not plateaued([1.0, math.nan, 1.0], patience=1)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0.01, 10.0), min_size=1, max_size=12), st.integers(1, 4), st.floats(0.0, 0.5))
def test_plateau_rule_properties(losses, patience, delta):
    # a plateau means exactly: no loss in the window is more than delta below every loss before it
    window, before = losses[-patience:], losses[:-patience]
    expected = len(losses) > patience and all(v >= min(before) - delta for v in window)
    assert plateaued(losses, patience, delta) == expected
    # a new best by more than delta at the end is never a plateau; a longer patience never stops sooner
    if len(losses) > 1:
        assert not plateaued(losses + [min(losses) - delta - 1e-3], patience, delta)
    if plateaued(losses, patience + 1, delta):
        assert plateaued(losses, patience, delta)


def test_a_pyramid_level_ends_at_a_plateau_and_the_next_starts(tiny_cfg, tmp_path):
    summary = train(tiny_cfg(PYRAMID), tmp_path / "run")
    rows = read_metrics(tmp_path / "run")
    coarse = [r for r in rows if r["level"] == "coarse"]
    assert 2 < len(coarse) < 12 and [r["level_epoch"] for r in coarse] == list(range(1, len(coarse) + 1))
    assert plateaued([r["val_loss"] for r in coarse], 2, 0.05)  # it ended at a plateau ...
    assert not plateaued([r["val_loss"] for r in coarse[:-1]], 2, 0.05)  # ... the first one
    assert [r["level"] for r in rows[len(coarse):]] == ["fine", "fine"]  # the last level trains its epochs
    levels = summary["levels"]
    assert levels[0]["epochs"] == len(coarse) and levels[0]["ended"] == "plateau" and "ended" not in levels[1]
    assert summary["epochs"] == len(coarse) + 2
    console = (tmp_path / "run" / "console.txt").read_text()
    assert (f"coarse 4x4 ends after {len(coarse)} of 12 epochs: its validation loss has not improved by more than "
            f"0.05 for 2 epochs (trainer.level_patience)") in console
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["levels"][0]["ended"] == "plateau"


def test_without_patience_every_level_trains_its_epochs(tiny_cfg, tmp_path):
    summary = train(tiny_cfg(PYRAMID[:2]), tmp_path / "run")
    assert [lv["epochs"] for lv in summary["levels"]] == [12, 2] and "ended" not in summary["levels"][0]


def test_resume_from_the_plateau_checkpoint_equals_the_whole_run(tiny_cfg, tmp_path, cut_and_resume):
    train(tiny_cfg(PYRAMID), tmp_path / "full")
    full = read_metrics(tmp_path / "full")
    stop = sum(r["level"] == "coarse" for r in full)
    saved, _ = cut_and_resume(PYRAMID, stop + 1)  # Ctrl-C in the fine level's first epoch: the plateau epoch's checkpoint
    assert saved["level"] == "coarse" and saved["epoch"] == stop
    assert strip_times(read_metrics(tmp_path / "resumed")) == strip_times(full)


def test_a_depth_level_ends_at_a_plateau(tiny_cfg, tmp_path):
    cfg = tiny_cfg(["+depth=doubling", "depth.start=1", "depth.stop=2", "depth.epochs=[12,1]",
                    "trainer.level_patience=1", "trainer.min_delta=0.05", LOSS])
    summary = train(cfg, tmp_path / "run")
    shallow = summary["levels"][0]
    assert shallow["layers"] == 1 and shallow["ended"] == "plateau" and shallow["epochs"] < 12
    assert summary["levels"][1]["layers"] == 2 and summary["levels"][1]["epochs"] == 1


EARLY = ["trainer.epochs=12", "trainer.patience=2", "trainer.min_delta=0.05", LOSS]


def test_early_stopping_ends_the_run_at_a_plateau(tiny_cfg, tmp_path):
    summary = train(tiny_cfg(EARLY), tmp_path / "run")
    rows = read_metrics(tmp_path / "run")
    assert 2 < len(rows) < 12 and summary["epochs"] == len(rows) and summary["status"] == "completed"
    losses = [r["val_loss"] for r in rows]
    assert plateaued(losses, 2, 0.05) and not plateaued(losses[:-1], 2, 0.05)  # the first plateau
    assert summary["stopped_early"] == f"after {len(rows)} of 12 epochs (trainer.patience)"
    assert summary["final_test_acc"] is not None and summary["levels"][0]["ended"] == "plateau"
    console = (tmp_path / "run" / "console.txt").read_text()
    assert (f"the run stops after {len(rows)} of 12 epochs: its validation loss has not improved by more than 0.05 "
            f"for 2 epochs (trainer.patience)") in console
    # its last checkpoint is a finished run: a resume says how to train on
    ck = tmp_path / "run" / "checkpoints" / "last.pt"
    with pytest.raises(MsnetError) as err:
        train(tiny_cfg([*EARLY, f"resume={ck}"]), tmp_path / "again", overrides=[f"resume={ck}"])
    assert str(err.value) == (f"checkpoint {ck} stopped early after {len(rows)} epochs (trainer.patience=2: its "
                              f"validation loss had stopped improving); raise trainer.patience or set "
                              f"trainer.patience=null to train further")
    longer = train(tiny_cfg([*EARLY[:1], "trainer.patience=null", f"resume={ck}"]), tmp_path / "longer",
                   overrides=[f"resume={ck}", "trainer.patience=null"])
    assert longer["epochs"] == 12 and "stopped_early" not in longer


def test_early_stopping_and_level_patience_each_watch_their_levels(tiny_cfg, tmp_path):
    # level_patience alone never stops the last level; patience alone never ends the coarse level early
    levels_only = train(tiny_cfg(PYRAMID[:2] + ["pyramid.epochs=[12,12]", "trainer.level_patience=2",
                                                "trainer.min_delta=0.05", LOSS]), tmp_path / "levels")
    assert levels_only["levels"][0]["ended"] == "plateau" and levels_only["levels"][1]["epochs"] == 12
    run_only = train(tiny_cfg(PYRAMID[:2] + ["pyramid.epochs=[12,12]", "trainer.patience=2",
                                             "trainer.min_delta=0.05", LOSS]), tmp_path / "run")
    assert run_only["levels"][0]["epochs"] == 12 and "ended" not in run_only["levels"][0]
    assert run_only["levels"][1]["ended"] == "plateau" and run_only["levels"][1]["epochs"] < 12


@pytest.mark.parametrize("overrides,message", [
    (["trainer.level_patience=2"], "trainer.level_patience=2 ends a level early, but this run has one level; "
                                   "add +pyramid=2level or +depth=doubling, or drop it"),
    (["+pyramid=2level", "trainer.level_patience=0"], "trainer.level_patience must be at least 1"),
    (["+depth=doubling", "trainer.level_patience=1", "dataset.val_size=0"],
     "trainer.level_patience=1 watches val_acc (trainer.objective=best_val_acc), but dataset.val_size=0 holds out "
     "no validation images"),
    (["+pyramid=2level", "trainer.min_delta=-0.1"], "trainer.min_delta must be >= 0, got -0.1"),
    (["trainer.patience=0"], "trainer.patience must be at least 1 (or null: no early stopping), got 0"),
    (["trainer.patience=3", "dataset.val_size=0", LOSS],
     "trainer.patience=3 watches val_loss (trainer.objective=best_val_loss), but dataset.val_size=0 holds out no "
     "validation images"),
])
def test_bad_patience_settings_are_one_line(tiny_cfg, overrides, message):
    with pytest.raises(MsnetError) as err:
        check_config(tiny_cfg(overrides))
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_plateau_of_an_accuracy_mirrors_that_of_a_loss():
    assert plateaued([0.5, 0.6, 0.6], patience=1, higher=True)  # no rise above the best before
    assert not plateaued([0.5, 0.6, 0.61], patience=1, higher=True)
    assert plateaued([0.5, 0.6, 0.64], patience=1, min_delta=0.05, higher=True)  # not 0.05 above 0.6
    assert not plateaued([0.5, 0.6, 0.66], patience=1, min_delta=0.05, higher=True)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-5, 5), min_size=1, max_size=9), st.integers(1, 4), st.floats(0, 1))
def test_an_accuracy_plateau_is_the_plateau_of_its_negative(values, patience, delta):
    assert plateaued(values, patience, delta, higher=True) == plateaued([-v for v in values], patience, delta)


def test_the_objective_drives_early_stopping_and_best_pt_alike(tiny_cfg, tmp_path):
    """The default objective (best_val_acc) watches val_acc for patience and best.pt; best_val_loss watches val_loss.
    A huge min_delta makes the first allowed epoch a plateau; the summary and the console line name the metric."""
    for objective, key, line in (("best_val_acc", "val_acc (max)", "its validation accuracy has not improved"),
                                 ("best_val_loss", "val_loss (min)", "its validation loss has not improved")):
        summary = train(tiny_cfg(["trainer.epochs=6", "trainer.patience=1", "trainer.min_delta=100",
                                  f"trainer.objective={objective}"]), tmp_path / objective)
        assert summary["monitor"] == key and summary["epochs"] == 2 and "stopped_early" in summary
        assert line in (tmp_path / objective / "console.txt").read_text()
        rows = read_metrics(tmp_path / objective)
        metric, higher = key.split()[0], key.endswith("(max)")
        values = [r[metric] for r in rows]
        best = values.index(max(values) if higher else min(values)) + 1
        assert summary["best_checkpoint_epoch"] == best  # best.pt follows the same metric
