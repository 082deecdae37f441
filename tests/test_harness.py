"""scripts/bench/_harness.py: runs advanced in turns, the first evaluation at a target, and the level loop as points."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts" / "bench"))  # the benchmarks import it from there

from _harness import chunk_batches, first_hit, interleave, markdown_table, run, train_config  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_interleave_takes_one_step_of_each_run_in_turn_until_all_are_done():
    seen = []

    def steps(name, n):
        for i in range(n):
            seen.append(f"{name}{i}")
            yield i

    calls = []
    interleave(steps("a", 3), steps("b", 1), steps("c", 2), on_step=lambda i, item: calls.append((i, item)))
    assert seen == ["a0", "b0", "c0", "a1", "c1", "a2"]
    assert calls == [(0, 0), (1, 0), (2, 0), (0, 1), (2, 1), (0, 2)]


def test_first_hit_is_the_first_point_at_or_above_the_target():
    trace = [{"val_acc": 0.5, "t": 0}, {"val_acc": None, "t": 1}, {"val_acc": 0.8, "t": 2}, {"val_acc": 0.9, "t": 3}]
    assert first_hit(trace, 0.8)["t"] == 2
    assert first_hit(trace, 0.95) is None
    assert first_hit([{"loss": 3.0}, {"loss": 1.0}], 2.0, key="loss") == {"loss": 3.0}


def test_markdown_table_leaves_missing_values_blank():
    assert markdown_table([{"a": 1, "b": None}, {"a": "x"}]) == ["| a | b |", "|---|---|", "| 1 |  |", "| x |  |"]


def test_chunk_batches_follow_torch_chunk():
    assert chunk_batches(1000, 1, 128) == [8]
    assert chunk_batches(1000, 4, 128) == [2, 2, 2, 2]  # 250 images each
    assert chunk_batches(5, 4, 2) == [1, 1, 1]  # torch.chunk gives 3 chunks of 2, 2, 1


def test_run_yields_every_evaluation_with_the_training_clock(tmp_path):
    """A two-level pyramid with evaluations after every half epoch and after the move: the points come in
    the loop's order, the clock only grows, and epochs and batches count what was trained."""
    from msnet.data import prepare_data

    cfg = train_config(["dataset=synthetic", "dataset.n_train=96", "dataset.val_size=32", "dataset.test_subset=0",
                        "model.channels=2", "model.layers=1", "trainer.batch_size=16", "trainer.progress=false",
                        "trainer.eval_at_start=true", "+pyramid=2level", "pyramid.epochs=[1,1]"])
    data = prepare_data(cfg.dataset, *_cpu())
    n = data.sizes()["train"]
    state, points = run(cfg, data, evals_per_epoch=2)
    pts = list(points)
    assert [(p["kind"], p["level"]) for p in pts] == [
        ("level", "coarse"), ("chunk", "coarse"), ("epoch", "coarse"),
        ("level", "fine"), ("chunk", "fine"), ("epoch", "fine")]
    assert [p["epoch"] for p in pts] == [0, 0.5, 1, 1, 1.5, 2]
    assert [p["level_epoch"] for p in pts] == [0, 0.5, 1, 0, 0.5, 1]
    assert [p["down"] for p in pts] == [1, 1, 1, 0, 0, 0]
    per_epoch = sum(chunk_batches(n, 2, 16))
    assert pts[-1]["batches"] == 2 * per_epoch and pts[2]["batches"] == per_epoch
    clock = [p["train_s"] for p in pts]
    assert clock[0] < 1e-3 and all(b >= a for a, b in zip(clock, clock[1:])) and clock[-1] > 0
    assert state.epoch == 2 and pts[-1]["val_acc"] == state.history[-1]["val_acc"]


def _cpu():
    import torch

    return torch.device("cpu"), torch.float32
