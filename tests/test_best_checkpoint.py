"""``checkpoints/best.pt`` (``trainer.save_best``): the last level's epoch with the best validation metric of
``trainer.objective``, written atomically as it happens, carried over by a resume, and tested in the summary."""

from __future__ import annotations

import json

import pytest
import torch

from msnet.runs import load_checkpoint, read_metrics
from msnet.tasks.evaluate import evaluate_checkpoint
from msnet.training import train

from .conftest import assert_same_weights

# a constant learning rate, so that a run of E epochs is the first E epochs of a longer one; lr 0.05 makes the
# validation accuracy of this tiny problem go up and down (in this run: best at epoch 4 of 8)
BUMPY = ["optimizer.scheduler=constant", "optimizer.lr=0.05", "trainer.epochs=8"]


def _first_best(rows, key, higher):
    values = [r[key] for r in rows]
    return rows[values.index(max(values) if higher else min(values))]["epoch"]


def _weights(path):
    return load_checkpoint(path)["model"]


def test_best_checkpoint_is_the_best_validation_epoch_and_its_weights(tiny_cfg, tmp_path, compose_cfg, capsys):
    summary = train(tiny_cfg(BUMPY), tmp_path / "run")
    rows = read_metrics(tmp_path / "run")
    best = _first_best(rows, "val_acc", True)
    assert best < 8  # the check below needs a best epoch before the last
    ckpts = tmp_path / "run" / "checkpoints"
    assert load_checkpoint(ckpts / "best.pt")["epoch"] == best == summary["best_checkpoint_epoch"] == summary["best_val_epoch"]
    # the same run stopped after the best epoch has the same weights (constant lr, same seed)
    train(tiny_cfg([*BUMPY[:-1], f"trainer.epochs={best}"]), tmp_path / "short")
    short, kept = _weights(tmp_path / "short" / "checkpoints" / "last.pt"), _weights(ckpts / "best.pt")
    for k in kept:
        torch.testing.assert_close(kept[k], short[k], rtol=0, atol=0)
    assert any(not torch.equal(kept[k], v) for k, v in _weights(ckpts / "last.pt").items())
    # the summary's test accuracy of best.pt is what msnet evaluate measures on it
    records = evaluate_checkpoint(compose_cfg("evaluate", [f"ckpt={ckpts / 'best.pt'}", "device=cpu"]))
    test = next(r for r in records if r["split"] == "test")
    assert summary["best_checkpoint_test_acc"] == pytest.approx(test["acc"])
    assert summary["best_checkpoint_test_loss"] == pytest.approx(test["loss"], rel=1e-9)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["best_checkpoint"] == str(ckpts / "best.pt")
    assert "best_checkpoint" in (tmp_path / "run" / "console.txt").read_text()
    # evaluating last.pt points at best.pt, since they differ
    capsys.readouterr()
    evaluate_checkpoint(compose_cfg("evaluate", [f"ckpt={ckpts / 'last.pt'}", "device=cpu"]))
    assert (f"this run also keeps the network of its best validation epoch ({best}): msnet evaluate "
            f"ckpt={ckpts / 'best.pt'}") in capsys.readouterr().out


def test_a_loss_objective_keeps_the_lowest_validation_loss(tiny_cfg, tmp_path):
    summary = train(tiny_cfg([*BUMPY, "trainer.objective=best_val_loss"]), tmp_path / "run")
    assert summary["best_checkpoint_epoch"] == _first_best(read_metrics(tmp_path / "run"), "val_loss", False)


def test_only_the_last_level_counts(tiny_cfg, tmp_path):
    summary = train(tiny_cfg(["+pyramid=2level", "pyramid.epochs=[3,2]", "trainer.objective=best_val_loss"]),
                    tmp_path / "run")
    fine = [r for r in read_metrics(tmp_path / "run") if r["level"] == "fine"]
    assert summary["best_checkpoint_epoch"] == _first_best(fine, "val_loss", False)
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")["level"] == "fine"


@pytest.mark.parametrize("overrides", [["trainer.save_best=false"], ["dataset.val_size=0"]])
def test_no_best_checkpoint_without_save_best_or_validation(tiny_cfg, tmp_path, overrides):
    summary = train(tiny_cfg(overrides), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints" / "best.pt").exists()
    assert not any(k.startswith("best_checkpoint") for k in summary)


def test_a_resumed_run_keeps_the_best_checkpoint(tiny_cfg, tmp_path, cut_and_resume):
    train(tiny_cfg(BUMPY), tmp_path / "full")
    best = load_checkpoint(tmp_path / "full" / "checkpoints" / "best.pt")["epoch"]
    _, summary = cut_and_resume(BUMPY, best + 2)  # Ctrl-C after the best epoch: the resumed run never trains it again
    assert summary["best_checkpoint_epoch"] == best
    assert_same_weights(tmp_path / "full" / "checkpoints" / "best.pt", tmp_path / "resumed" / "checkpoints" / "best.pt")


def test_the_first_of_equal_bests_is_kept_and_only_the_last_level_counts():
    from msnet.training.schedule import Level, Schedule
    from msnet.training.state import RunState

    schedule = Schedule([Level("coarse", 1, 2), Level("fine", 0, 4)])
    state = RunState(model=None, generator=torch.Generator())
    accs = [("coarse", 0.9), ("coarse", 0.95), ("fine", 0.5), ("fine", 0.7), ("fine", 0.7), ("fine", float("nan"))]
    seen = []
    for i, (level, acc) in enumerate(accs):
        state.level_index = 0 if level == "coarse" else 1
        state.level_epoch = i + 1 if level == "coarse" else i - 1
        state.history.append({"epoch": i + 1, "level": level, "level_epoch": state.level_epoch, "val_acc": acc,
                              "val_loss": 1 - acc})
        seen.append(state.is_best(schedule, "val_acc", True))
    # coarse epochs never count; the fine level's first epoch is its best so far; a tie is not a new best; nor NaN
    assert seen == [False, False, True, True, False, False]
    assert [state.is_best(schedule, "val_loss", False)] == [False]


def test_a_best_checkpoint_at_the_final_epoch_reuses_the_final_test_pass(tiny_cfg, tmp_path, compose_cfg):
    summary = train(tiny_cfg(["trainer.epochs=1"]), tmp_path / "run")  # one epoch: best.pt is the final network
    assert summary["best_checkpoint_epoch"] == summary["epochs"] == 1
    assert summary["best_checkpoint_test_acc"] == summary["final_test_acc"]
    assert summary["best_checkpoint_test_loss"] == summary["final_test_loss"]
    records = evaluate_checkpoint(compose_cfg("evaluate", [f"ckpt={tmp_path / 'run' / 'checkpoints' / 'best.pt'}",
                                                          "device=cpu"]))
    test = next(r for r in records if r["split"] == "test")
    assert summary["best_checkpoint_test_acc"] == pytest.approx(test["acc"])
    assert summary["best_checkpoint_test_loss"] == pytest.approx(test["loss"], rel=1e-9)
