"""What every method trains with: the learning rate (or trust radius) per epoch and per level.

For every trainer and every ``optimizer.scheduler`` the ``lr`` that ``metrics.jsonl`` records per epoch equals
the sequence torch's own scheduler gives, built here on a dummy parameter with the settings the docs state
(``cosine``: ``CosineAnnealingLR`` over the level's epochs, ``step``: ``StepLR(step_size, gamma)``), stepped once
per epoch, compared exactly (and to a closed form to 1e-12). A hook on every ``torch.optim`` step checks that
the rate recorded is the rate the optimiser's ``param_groups`` held at each of the epoch's steps.

Levels: MG/OPT's coarse smoothers run at ``coarse_lr_factor`` times the rate under the same per-epoch schedule
(``mg_lr`` in the epoch record, coarsest first); schedule levels (``+depth``, ``+pyramid``) build a fresh rule,
so the scheduler restarts at each level from the level's rate (``depth.lr`` / ``pyramid.lr``, else
``optimizer.lr``) over the level's scheduled epochs (a level that ends at a plateau keeps that length;
``depth.carry_optimizer`` carries moments, not the rate). BCD has no schedule: its ``lr`` is the first trial
step of every line search. RMTR has no learning rate (``lr`` null); its radius starts at ``trainer.radius`` on
every schedule level, and each coarse solve starts at the room it is given over ||P||_2.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Tuple

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from msnet import MsnetError
from msnet.multigrid.time import TIME_PROLONGATIONS
from msnet.runs import read_metrics
from msnet.training import fit, train
from msnet.methods.first_order import SCHEDULERS

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = ["dataset.n_train=200", "dataset.val_size=50", "dataset.n_test=50", "threads=1"]  # 150 train: 3 batches
STEP = ["optimizer.step_size=2", "optimizer.gamma=0.5"]


# ------------------------------------------------------------------ the oracle: torch's schedulers, stepped here


def torch_lrs(scheduler: str, lr: float, epochs: int, step_size: int = 2, gamma: float = 0.5) -> List[float]:
    """The rate of each of ``epochs`` epochs under torch's scheduler for ``scheduler`` on a dummy parameter."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=lr)
    sched = {"constant": lambda: None,
             "cosine": lambda: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs),
             "step": lambda: torch.optim.lr_scheduler.StepLR(opt, step_size=step_size, gamma=gamma)}[scheduler]()
    out = []
    for _ in range(epochs):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        if sched is not None:
            sched.step()
    closed = {"constant": lambda t: lr, "cosine": lambda t: lr * (1 + math.cos(math.pi * t / epochs)) / 2,
              "step": lambda t: lr * gamma ** (t // step_size)}[scheduler]
    assert out == pytest.approx([closed(t) for t in range(epochs)], rel=1e-12, abs=0)
    return out


def test_the_oracle_covers_every_scheduler():
    """A scheduler added to msnet must be added to the oracle (and so to these tests)."""
    for name in SCHEDULERS:
        torch_lrs(name, 0.1, 4)


# ------------------------------------------------------------------ training with every optimiser step watched


Epoch = Tuple[Any, List[Tuple[torch.optim.Optimizer, Tuple[float, ...]]]]


@pytest.fixture
def watched(tiny_cfg, tmp_path, monkeypatch) -> Callable[..., Tuple[List[Dict[str, Any]], List[Epoch]]]:
    """``watched(overrides)``: train ``tiny_cfg(SMALL + overrides)``; returns its ``metrics.jsonl`` records and, per
    trained epoch, ``(the update rule, [(optimiser, lr of each param group) at every optimiser.step])``."""
    epochs: List[Epoch] = []
    live: Dict[str, Any] = {}
    real = fit.train_epoch

    def hook(opt, args, kwargs):
        if "steps" in live:
            live["steps"].append((opt, tuple(g["lr"] for g in opt.param_groups)))

    def watched_epoch(model, update, *args, **kwargs):
        live["steps"] = []
        try:
            return real(model, update, *args, **kwargs)
        finally:
            epochs.append((update, live.pop("steps")))

    monkeypatch.setattr(fit, "train_epoch", watched_epoch)
    handle = register_optimizer_step_pre_hook(hook)
    runs = iter(range(100))

    def _run(overrides: List[str]):
        del epochs[:]
        run_dir = tmp_path / f"run{next(runs)}"
        train(tiny_cfg(SMALL + overrides), run_dir)
        records = [r for r in read_metrics(run_dir) if "train_loss" in r]
        assert len(records) == len(epochs)
        return records, list(epochs)

    yield _run
    handle.remove()


def applied(steps, optimizer) -> set:
    """The distinct rates ``optimizer``'s param groups held at its steps in one epoch (it must have stepped)."""
    rates = {lr for opt, lrs in steps if opt is optimizer for lr in lrs}
    assert rates, "the optimiser never stepped in this epoch"
    return rates


def check_first_order(records, epochs, expected: List[float]) -> None:
    assert [r["lr"] for r in records] == expected
    for r, (rule, steps) in zip(records, epochs):
        assert all(opt is rule.optimizer for opt, _ in steps)  # nothing else stepped
        assert len(steps) == 3  # one step per batch: 150 images in batches of 64
        assert applied(steps, rule.optimizer) == {r["lr"]}, r["epoch"]


def check_mgopt(records, epochs, expected: List[List[float]]) -> None:
    """``expected[e]``: the rate of every level (coarsest first) in epoch e."""
    assert [r["mg_lr"] for r in records] == expected
    assert [r["lr"] for r in records] == [e[-1] for e in expected]
    for r, (rule, steps) in zip(records, epochs):
        opts = [lv.optimizer for lv in rule.levels]
        assert len({id(o) for o in opts}) == len(opts) and all(any(opt is o for o in opts) for opt, _ in steps)
        assert [applied(steps, o) for o in opts] == [{lr} for lr in r["mg_lr"]], r["epoch"]


# ------------------------------------------------------------------ one level, every trainer x every scheduler


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_first_order_trains_with_torchs_schedule(watched, scheduler):
    records, epochs = watched(["optimizer=adam", "optimizer.lr=0.01", f"optimizer.scheduler={scheduler}",
                               "trainer.epochs=4", *STEP])
    check_first_order(records, epochs, torch_lrs(scheduler, 0.01, 4))


def test_sgd_with_a_step_schedule_that_decays_twice(watched):
    records, epochs = watched(["optimizer=sgd", "optimizer.lr=0.2", "optimizer.scheduler=step",
                               "optimizer.step_size=1", "optimizer.gamma=0.3", "trainer.epochs=3"])
    check_first_order(records, epochs, torch_lrs("step", 0.2, 3, step_size=1, gamma=0.3))


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_mgopt_smoothers_train_with_the_factor_under_the_same_schedule(watched, scheduler):
    """Three levels (4, 2, 1 steps): both coarse smoothers at coarse_lr_factor x lr, all three scheduled alike."""
    records, epochs = watched(["trainer=mgopt", "trainer.levels=3", "model.layers=4", "trainer.coarse_lr_factor=0.25",
                               "optimizer=adam", "optimizer.lr=0.01", f"optimizer.scheduler={scheduler}",
                               "trainer.epochs=3", *STEP])
    fine, coarse = torch_lrs(scheduler, 0.01, 3), torch_lrs(scheduler, 0.01 * 0.25, 3)
    check_mgopt(records, epochs, [[c, c, f] for c, f in zip(coarse, fine)])


def test_bcd_lr_is_the_first_trial_step_of_every_line_search(watched, monkeypatch):
    """Constant by design (any other scheduler stops at start); every propagation line search starts at lr."""
    from msnet.methods import bcd

    trials: List[float] = []
    real = bcd.armijo

    def spy(params, direction, objective, f0, slope, step, *args):
        trials.append(step)
        return real(params, direction, objective, f0, slope, step, *args)

    monkeypatch.setattr(bcd, "armijo", spy)
    records, _ = watched(["optimizer=bcd", "optimizer.lr=0.5", "optimizer.classifier_steps=1", "trainer.epochs=2"])
    assert [r["lr"] for r in records] == [0.5, 0.5]
    assert trials == [0.5] * 6  # 3 batches x 2 epochs
    # the level's rate of a schedule replaces it, level by level
    del trials[:]
    records, _ = watched(["optimizer=bcd", "optimizer.classifier_steps=1", "+pyramid=2level", "pyramid.epochs=[1,1]",
                          "pyramid.lr=[0.5,0.25]"])
    assert [r["lr"] for r in records] == [0.5, 0.25] and trials == [0.5] * 3 + [0.25] * 3
    for scheduler in set(SCHEDULERS) - {"constant"}:
        with pytest.raises(MsnetError, match="optimizer=bcd chooses its step length by line search"):
            watched(["optimizer=bcd", f"optimizer.scheduler={scheduler}"])


def test_rmtr_has_no_lr_and_its_radius_starts_where_the_docs_say(watched, monkeypatch, tmp_path):
    """lr is null whatever optimizer.scheduler says; each schedule level's first trial has radius trainer.radius;
    every coarse solve starts at its room over ||P||_2; ``rmtr_radius`` is the finest radius after the epoch."""
    import json

    from msnet.methods.rmtr import RMTR

    entries: List[Tuple[Any, ...]] = []  # (levels, level, radius on entry, room, depths)
    real = RMTR._solve

    def spy(self, i, psi, g, room, batch, log):
        entries.append((len(self.levels), i, self.levels[i].radius, room, [lv.net.depth() for lv in self.levels]))
        return real(self, i, psi, g, room, batch, log)

    monkeypatch.setattr(RMTR, "_solve", spy)
    for scheduler in SCHEDULERS:
        records, _ = watched(["trainer=rmtr", "trainer.radius=0.05", f"optimizer.scheduler={scheduler}",
                              "+depth=doubling", "depth.start=2", "depth.stop=4", "depth.epochs=[2]", "model.layers=4"])
        assert [r["lr"] for r in records] == [None] * 4
        run_dir = sorted(tmp_path.glob("run*"), key=lambda p: int(p.name[3:]))[-1]
        steps = [json.loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines()]
        assert len(steps) == 12  # 3 batches x 4 epochs
        for level_start in (0, 6):  # a fresh rule at each depth level
            first = steps[level_start]["trials"][0]
            assert first["kind"] == "smooth" and first["radius"] == pytest.approx(0.05, rel=1e-15)
        for r in records:
            last = [s for s in steps if s["epoch"] == r["epoch"]][-1]
            assert r["rmtr_radius"] == last["radius"][-1]
    coarse = [e for e in entries if e[1] < e[0] - 1]
    assert coarse
    for _, i, radius, room, depths in coarse:
        n_c, n_f = depths[i][0], depths[i + 1][0]
        P = TIME_PROLONGATIONS.get("linear")(torch.eye(n_c, dtype=torch.float64), n_f)
        p_norm = max(1.0, float(torch.linalg.matrix_norm(P, ord=2)))
        assert radius == pytest.approx(room / p_norm, rel=1e-6)


# ------------------------------------------------------------------ schedule levels: the scheduler restarts per level


def levels_lrs(scheduler: str, levels: List[Tuple[float, int, int]], **kw) -> List[float]:
    """``levels``: (rate, scheduled epochs, epochs trained) per level; torch's sequence restarted at each."""
    return [lr for rate, scheduled, trained in levels for lr in torch_lrs(scheduler, rate, scheduled, **kw)[:trained]]


@pytest.mark.parametrize("scheduler", ["cosine", "step"])
def test_depth_levels_restart_the_schedule_from_their_rate(watched, scheduler):
    """depth.epochs [3, 1.5, 2] begins 3, 2, 2 epochs (the 1.5 level's last on half the images): each level's rate
    schedule runs over the epochs it begins, from depth.lr; carry_optimizer moves the moments, not the rate."""
    records, epochs = watched([f"optimizer.scheduler={scheduler}", "optimizer=adam", *STEP, "trainer.epochs=5",
                               "+depth=doubling", "depth.start=1", "depth.stop=4", "depth.epochs=[3,1.5,2]",
                               "depth.lr=[0.01,0.005,0.002]", "depth.carry_optimizer=true", "model.layers=4"])
    assert [r["layers"] for r in records] == [[1]] * 3 + [[2]] * 2 + [[4]] * 2
    check_first_order(records[:3], epochs[:3], levels_lrs(scheduler, [(0.01, 3, 3)]))
    expected = levels_lrs(scheduler, [(0.01, 3, 3), (0.005, 2, 2), (0.002, 2, 2)])
    assert [r["lr"] for r in records] == expected
    for r, (rule, steps) in zip(records, epochs):
        assert applied(steps, rule.optimizer) == {r["lr"]}


def test_pyramid_levels_restart_from_their_rate_and_a_plateau_keeps_the_scheduled_length(watched):
    """pyramid.epochs [4, 2] with lr [null, 0.004] (null: optimizer.lr); min_delta 10 ends the coarse level at a
    plateau after 2 of its 4 epochs: those 2 follow the cosine over 4, then the fine level's over 2."""
    records, epochs = watched(["optimizer.scheduler=cosine", "optimizer.lr=0.01", "trainer.epochs=7",
                               "+pyramid=2level", "pyramid.epochs=[4,2]", "pyramid.lr=[null,0.004]",
                               "trainer.level_patience=1", "trainer.min_delta=10"])
    assert [r["level"] for r in records] == ["coarse"] * 2 + ["fine"] * 2
    check_first_order(records, epochs, levels_lrs("cosine", [(0.01, 4, 2), (0.004, 2, 2)]))


def test_mgopt_under_a_depth_schedule_restarts_every_smoother(watched):
    records, epochs = watched(["trainer=mgopt", "trainer.coarse_lr_factor=0.5", "optimizer.scheduler=cosine",
                               "trainer.epochs=5", "+depth=doubling", "depth.start=2", "depth.stop=4",
                               "depth.epochs=[3]", "depth.lr=[0.01,0.004]", "model.layers=4"])
    assert [r["layers"] for r in records] == [[2]] * 3 + [[4]] * 3
    fine = levels_lrs("cosine", [(0.01, 3, 3), (0.004, 3, 3)])
    coarse = levels_lrs("cosine", [(0.01 * 0.5, 3, 3), (0.004 * 0.5, 3, 3)])
    check_mgopt(records, epochs, [[c, f] for c, f in zip(coarse, fine)])
