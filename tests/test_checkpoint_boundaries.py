"""The edges of checkpoints, early stopping and schedules, as the user sees them in the run directory.

What a run leaves (``checkpoints/last.pt``, ``checkpoints/best.pt``, ``summary.json``), the epochs those files
store, their weights and the summary's fields, at the boundaries where an off-by-one hides: a resume or an
extension from the epoch best.pt holds, from the first and from the final epoch, early stopping at the first
epoch it may stop and a plateau that comes only at the last scheduled epoch, a schedule's level boundary at the
resume epoch, ties in the watched metric, and ``trainer.checkpoint_every`` not dividing the epochs. The oracle is
an uninterrupted run, or a run that was only ever given as many epochs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest

from msnet import MsnetError
from msnet.runs import load_checkpoint, read_metrics
from msnet.tasks.evaluate import evaluate_checkpoint
from msnet.training import train

from .conftest import assert_same_weights, strip_times

pytestmark = pytest.mark.usefixtures("one_thread")

# a constant learning rate: a run of E epochs is the first E epochs of a longer one, and an extension of it equals
# the longer run; lr 0.05 makes this tiny problem's validation accuracy go up and down (best before the last epoch)
BUMPY = ["optimizer.scheduler=constant", "optimizer.lr=0.05", "trainer.epochs=8", "threads=1"]
CONSTANT = ["optimizer.scheduler=constant", "threads=1"]
SUMMARY_KEYS = ("status", "epochs", "final_val_loss", "final_val_acc", "final_test_loss", "final_test_acc",
                "best_val_acc", "best_val_epoch", "best_val_loss", "best_checkpoint_epoch", "best_checkpoint_test_loss",
                "best_checkpoint_test_acc", "stopped_early")


def _files(run: Path) -> List[str]:
    return sorted(str(p.relative_to(run)) for p in [run / "summary.json", *(run / "checkpoints").glob("*.pt")]
                  if p.exists())


def _epoch(path: Path) -> Optional[int]:
    return int(load_checkpoint(path)["epoch"]) if path.exists() else None


def _seen(run: Path) -> Dict[str, Any]:
    """What the user reads in a run directory: which files, their epochs, the summary's fields and levels."""
    summary = json.loads((run / "summary.json").read_text())
    levels = [{k: v for k, v in lv.items() if k not in ("time_s", "stencil_fit")} for lv in summary["levels"]]
    return {"files": _files(run), "last": _epoch(run / "checkpoints" / "last.pt"),
            "best": _epoch(run / "checkpoints" / "best.pt"), "levels": levels,
            **{k: summary.get(k) for k in SUMMARY_KEYS}}


def _assert_same_run(run: Path, ref: Path) -> None:
    """``run`` ended where ``ref`` did: the same files, epochs, summary, metrics and weights (last.pt, best.pt)."""
    assert _seen(run) == _seen(ref)
    assert strip_times(read_metrics(run)) == strip_times(read_metrics(ref))
    for name in ("last.pt", "best.pt"):
        if (ref / "checkpoints" / name).exists():
            assert_same_weights(run / "checkpoints" / name, ref / "checkpoints" / name)


@pytest.fixture
def cut(tiny_cfg, fail_epoch):
    """``cut(overrides, epoch, run)``: train into ``run`` with Ctrl-C in its ``epoch``-th epoch; returns last.pt."""

    def _cut(overrides: List[str], epoch: int, run: Path) -> Path:
        handle = fail_epoch(epoch)
        with pytest.raises(MsnetError, match=f"interrupted during epoch {epoch}; continue with: msnet train resume="):
            train(tiny_cfg(overrides), run)
        handle.restore()
        return run / "checkpoints" / "last.pt"

    return _cut


@pytest.fixture
def resume(tiny_cfg):
    """``resume(ckpt, run, *overrides)``: ``msnet train resume=CKPT [overrides]`` into ``run``."""

    def _resume(ckpt: Path, run: Path, *overrides: str) -> Dict[str, Any]:
        over = [f"resume={ckpt}", *overrides]
        return train(tiny_cfg(over), run, overrides=over)

    return _resume


# --- last.pt at best.pt's epoch; the first and the final epoch ----------------------------------------------------


def test_resume_and_extension_from_the_epoch_best_pt_holds(tiny_cfg, tmp_path, cut, resume):
    """The checkpoint resumed is also the run's best so far (last.pt's epoch == best.pt's): the resumed and the
    extended run keep that best.pt (it is not trained again), and end as the uninterrupted run did."""
    train(tiny_cfg(BUMPY), tmp_path / "full")
    full = tmp_path / "full" / "checkpoints"
    best = _epoch(full / "best.pt")
    assert 1 < best < 8  # the boundary needs a best that a later epoch does not beat, before the last epoch
    # a resume: Ctrl-C in the epoch after the best one
    ck = cut(BUMPY, best + 1, tmp_path / "cut")
    assert _epoch(ck) == _epoch(tmp_path / "cut" / "checkpoints" / "best.pt") == best
    resume(ck, tmp_path / "resumed")
    _assert_same_run(tmp_path / "resumed", tmp_path / "full")
    # an extension: a run given `best` epochs (so its final epoch is its best) extended to 8
    train(tiny_cfg([*BUMPY, f"trainer.epochs={best}"]), tmp_path / "short")
    short = tmp_path / "short" / "checkpoints"
    assert _epoch(short / "last.pt") == _epoch(short / "best.pt") == best
    assert_same_weights(short / "best.pt", full / "best.pt")
    extended = resume(short / "last.pt", tmp_path / "extended", "trainer.epochs=8")
    assert extended["best_checkpoint_epoch"] == best and extended["resumed_from"] == str(short / "last.pt")
    _assert_same_run(tmp_path / "extended", tmp_path / "full")


def test_resume_from_the_first_epochs_checkpoint(tiny_cfg, tmp_path, cut, resume):
    """Ctrl-C in epoch 2: last.pt and best.pt are epoch 1 (the first epoch of the last level is its best so far)."""
    over = [*BUMPY, "trainer.epochs=3"]
    train(tiny_cfg(over), tmp_path / "full")
    ck = cut(over, 2, tmp_path / "cut")
    assert _files(tmp_path / "cut") == ["checkpoints/best.pt", "checkpoints/last.pt", "summary.json"]
    assert _epoch(ck) == _epoch(tmp_path / "cut" / "checkpoints" / "best.pt") == 1
    interrupted = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert interrupted["status"] == "interrupted" and interrupted["best_checkpoint_epoch"] == 1
    assert len(read_metrics(tmp_path / "cut")) == 1
    resume(ck, tmp_path / "resumed")
    _assert_same_run(tmp_path / "resumed", tmp_path / "full")


def test_the_final_epochs_checkpoint_is_finished_and_extends(tiny_cfg, tmp_path, resume):
    """A finished run's last.pt (epoch == trainer.epochs) resumes only with more epochs, and the extension trains
    exactly the epochs after it: the same as a run given them all (constant learning rate)."""
    train(tiny_cfg([*CONSTANT, "trainer.epochs=2"]), tmp_path / "two")
    ck = tmp_path / "two" / "checkpoints" / "last.pt"
    assert _epoch(ck) == 2
    with pytest.raises(MsnetError, match="already finished 2 epochs; add trainer.epochs=N with N > 2"):
        resume(ck, tmp_path / "again")
    assert not (tmp_path / "again" / "checkpoints").exists()
    train(tiny_cfg([*CONSTANT, "trainer.epochs=3"]), tmp_path / "three")
    summary = resume(ck, tmp_path / "extended", "trainer.epochs=3")
    assert summary["epochs"] == 3 and [r["epoch"] for r in read_metrics(tmp_path / "extended")] == [1, 2, 3]
    _assert_same_run(tmp_path / "extended", tmp_path / "three")


# --- early stopping -----------------------------------------------------------------------------------------------

# min_delta 10: no epoch improves the monitored metric (val_acc, the default objective's) by that much, so the run
# may stop at the first epoch the patience allows, epoch patience + 1
STOP = ["trainer.epochs=5", "trainer.min_delta=10"]
STOP_AT_ONCE = [*CONSTANT, *STOP]


@pytest.mark.parametrize("patience", [1, 2])
def test_early_stopping_at_the_first_epoch_it_may_stop(tiny_cfg, tmp_path, compose_cfg, patience):
    stop = patience + 1
    summary = train(tiny_cfg([*STOP_AT_ONCE, f"trainer.patience={patience}"]), tmp_path / "run")
    run = tmp_path / "run"
    rows = read_metrics(run)
    assert [r["epoch"] for r in rows] == list(range(1, stop + 1))
    assert summary["status"] == "completed" and summary["epochs"] == stop
    assert summary["stopped_early"] == f"after {stop} of 5 epochs (trainer.patience)"
    assert summary["levels"][0]["ended"] == "plateau" and summary["levels"][0]["epochs"] == stop
    assert _files(run) == ["checkpoints/best.pt", "checkpoints/last.pt", "summary.json"]
    last = load_checkpoint(run / "checkpoints" / "last.pt")
    assert last["epoch"] == stop and last["level_epoch"] == stop
    accs = [r["val_acc"] for r in rows]
    assert summary["best_checkpoint_epoch"] == _epoch(run / "checkpoints" / "best.pt") == accs.index(max(accs)) + 1
    assert (f"the run stops after {stop} of 5 epochs: its validation accuracy has not improved by more than 10 for "
            f"{patience} epoch") in (run / "console.txt").read_text()
    # its weights are those of a run only ever given `stop` epochs
    train(tiny_cfg([*STOP_AT_ONCE, f"trainer.epochs={stop}"]), tmp_path / "short")
    assert_same_weights(run / "checkpoints" / "last.pt", tmp_path / "short" / "checkpoints" / "last.pt")
    assert summary["final_test_acc"] == json.loads((tmp_path / "short" / "summary.json").read_text())["final_test_acc"]
    # the summary's test numbers of best.pt are what msnet evaluate measures on it
    test = next(r for r in evaluate_checkpoint(compose_cfg("evaluate", [f"ckpt={run / 'checkpoints' / 'best.pt'}",
                                                                       "device=cpu"])) if r["split"] == "test")
    assert summary["best_checkpoint_test_acc"] == pytest.approx(test["acc"])
    assert summary["best_checkpoint_test_loss"] == pytest.approx(test["loss"], rel=1e-9)


def test_a_resume_before_the_stop_stops_at_the_same_epoch(tiny_cfg, tmp_path, cut, resume):
    """Patience counts the epochs before the checkpoint too (they are in its history): resumed after epoch 1, a
    run with patience 1 stops after epoch 2 as the uninterrupted one did, not after epoch 3."""
    over = [*STOP_AT_ONCE, "trainer.patience=1"]
    train(tiny_cfg(over), tmp_path / "full")
    ck = cut(over, 2, tmp_path / "cut")
    assert "stopped_early" not in json.loads((tmp_path / "cut" / "summary.json").read_text())
    summary = resume(ck, tmp_path / "resumed")
    assert summary["stopped_early"] == "after 2 of 5 epochs (trainer.patience)"
    _assert_same_run(tmp_path / "resumed", tmp_path / "full")


def test_a_plateau_at_the_last_scheduled_epoch_is_not_an_early_stop(tiny_cfg, tmp_path, resume):
    """The plateau rule fires at epoch 2 of 2: the run trained every epoch it was given, so it did not stop early
    (no ``stopped_early``, no ``ended`` level, no "the run stops" line). Extended to 3 epochs it stops at once,
    as a run given 3 epochs stops after 2."""
    over = [*CONSTANT, "trainer.patience=1", "trainer.min_delta=10"]
    summary = train(tiny_cfg([*over, "trainer.epochs=2"]), tmp_path / "two")
    assert summary["status"] == "completed" and summary["epochs"] == 2
    assert "stopped_early" not in summary and "ended" not in summary["levels"][0]
    assert summary["levels"][0]["epochs"] == 2
    assert "the run stops" not in (tmp_path / "two" / "console.txt").read_text()
    three = train(tiny_cfg([*over, "trainer.epochs=3"]), tmp_path / "three")
    assert three["stopped_early"] == "after 2 of 3 epochs (trainer.patience)"
    assert_same_weights(tmp_path / "two" / "checkpoints" / "last.pt", tmp_path / "three" / "checkpoints" / "last.pt")
    ck = tmp_path / "two" / "checkpoints" / "last.pt"
    with pytest.raises(MsnetError, match=r"stopped early after 2 epochs \(trainer.patience=1"):
        resume(ck, tmp_path / "extended", "trainer.epochs=3")
    with pytest.raises(MsnetError, match="already finished 2 epochs"):
        resume(ck, tmp_path / "again")


# --- a schedule's level boundary at the resume epoch ----------------------------------------------------------------

SCHEDULES = {
    "pyramid": ["+pyramid=2level", "pyramid.epochs=[2,2]"],
    "depth": ["+depth=doubling", "depth.start=1", "depth.stop=2", "depth.epochs=[2,2]"],
}


@pytest.mark.parametrize("schedule", SCHEDULES.values(), ids=SCHEDULES.keys())
def test_resume_at_a_level_boundary(tiny_cfg, tmp_path, cut, resume, schedule):
    """Two levels of two epochs. Ctrl-C in epoch 3 resumes from the first level's last epoch (no best.pt yet: only
    the last level counts), which moves the network onto the second level; Ctrl-C in epoch 4 resumes from the
    second level's first epoch (last.pt is best.pt there). Both end as the uninterrupted run."""
    over = [*CONSTANT, *schedule]
    train(tiny_cfg(over), tmp_path / "full")
    assert [(r["level"], r["level_epoch"]) for r in read_metrics(tmp_path / "full")][1:3] == [
        (read_metrics(tmp_path / "full")[0]["level"], 2), ("fine", 1)]
    assert _epoch(tmp_path / "full" / "checkpoints" / "best.pt") >= 3

    ck = cut(over, 3, tmp_path / "cut3")
    saved = load_checkpoint(ck)
    assert (saved["epoch"], saved["level_index"], saved["level_epoch"]) == (2, 0, 2)
    assert _files(tmp_path / "cut3") == ["checkpoints/last.pt", "summary.json"]
    resume(ck, tmp_path / "resumed3")
    _assert_same_run(tmp_path / "resumed3", tmp_path / "full")

    ck = cut(over, 4, tmp_path / "cut4")
    saved = load_checkpoint(ck)
    assert (saved["epoch"], saved["level_index"], saved["level_epoch"], saved["level"]) == (3, 1, 1, "fine")
    assert _epoch(tmp_path / "cut4" / "checkpoints" / "best.pt") == 3
    assert [lv["level"] for lv in saved["levels"]] == [saved["schedule"][0]["name"]]  # the first level is summarised
    resume(ck, tmp_path / "resumed4")
    _assert_same_run(tmp_path / "resumed4", tmp_path / "full")


# --- ties in the watched metric ----------------------------------------------------------------------------------

# lr 1e-30 (0 is refused): steps below float32's resolution of the weights, so every epoch's validation loss and
# accuracy tie exactly (the test checks that they do)
STILL = ["optimizer.scheduler=constant", "optimizer.lr=1e-30", "trainer.epochs=3", "threads=1"]


@pytest.mark.parametrize("objective", ["best_val_acc", "best_val_loss"])
def test_ties_keep_the_first_best_and_are_no_improvement(tiny_cfg, tmp_path, cut, resume, objective):
    over = [*STILL, f"trainer.objective={objective}"]
    summary = train(tiny_cfg(over), tmp_path / "full")
    rows = read_metrics(tmp_path / "full")
    assert len({(r["val_loss"], r["val_acc"]) for r in rows}) == 1  # a three-way tie
    assert summary["best_checkpoint_epoch"] == _epoch(tmp_path / "full" / "checkpoints" / "best.pt") == 1
    assert summary["best_val_epoch"] == 1
    # a resume after the tie carries epoch 1's best.pt, and the tying epochs after it do not replace it
    resumed = resume(cut(over, 3, tmp_path / "cut"), tmp_path / "resumed")
    assert resumed["best_checkpoint_epoch"] == 1
    _assert_same_run(tmp_path / "resumed", tmp_path / "full")
    # a tie is no improvement: patience 1 stops at the first epoch it may
    stopped = train(tiny_cfg([*over, "trainer.patience=1"]), tmp_path / "stopped")
    assert stopped["stopped_early"] == "after 2 of 3 epochs (trainer.patience)"
    assert stopped["best_checkpoint_epoch"] == 1


# --- trainer.checkpoint_every that does not divide the epochs -----------------------------------------------------


def test_checkpoint_every_still_writes_the_final_and_level_end_epochs(tiny_cfg, tmp_path, cut, resume):
    """last.pt every 2 epochs, and at a level's end whatever its number: the run's last epoch, an early stop, and
    the first level of a schedule. Ctrl-C in epoch 4 of 5 resumes from epoch 2 (epoch 3's was never written)."""
    over = [*CONSTANT, "trainer.checkpoint_every=2"]
    train(tiny_cfg([*over, "trainer.epochs=3"]), tmp_path / "odd")
    assert _epoch(tmp_path / "odd" / "checkpoints" / "last.pt") == 3
    stopped = train(tiny_cfg([*over, *STOP, "trainer.patience=2"]), tmp_path / "stopped")
    assert stopped["epochs"] == 3 and _epoch(tmp_path / "stopped" / "checkpoints" / "last.pt") == 3
    levels = [*over, "+pyramid=2level", "pyramid.epochs=[3,2]"]
    train(tiny_cfg(levels), tmp_path / "full")
    ck = cut(levels, 4, tmp_path / "cut")
    saved = load_checkpoint(ck)
    assert (saved["epoch"], saved["level_index"], saved["level_epoch"]) == (3, 0, 3)  # the coarse level's end
    resume(ck, tmp_path / "resumed")
    _assert_same_run(tmp_path / "resumed", tmp_path / "full")
    ck = cut([*over, "trainer.epochs=5"], 4, tmp_path / "cut5")
    assert _epoch(ck) == 2
