"""A resumed run equals the uninterrupted one with every source of randomness drawing after the restore.

The plain resume tests (tests/test_train.py and the trainers' own) train runs where, after a restore, only the
data order draws from an RNG stream. Here every stochastic feature is on at once: stochastic depth (the global
torch RNG draws each forward pass's gates; BCD draws a seed per iteration from it), a batch that grows every
epoch (``trainer.batch_growth``: the shuffled permutation is cut differently each epoch), data shuffling (the
data-order generator), for every trainer, in one process and on two DDP ranks, and across a schedule level.
Equality is exact: every ``metrics.jsonl`` row bar the clock readings, the final test numbers, and the weights
bit for bit. The last tests prove the check has teeth: a resume that forgets either RNG stream differs.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from omegaconf import OmegaConf

from msnet import MsnetError
from msnet.runs import load_checkpoint, read_metrics
from msnet.training import state as state_module
from msnet.training import train
from tests.test_distributed import _free_ports as free_ports

from .conftest import assert_same_weights, strip_times

pytestmark = pytest.mark.usefixtures("one_thread")

STOCHASTIC_DEPTH = "model.stochastic_depth.p_last=0.5"
# a batch of 32 that doubles each epoch (32, 64, 128) over 400 shuffled training images, three epochs
RANDOM = ["trainer.batch_size=32", "trainer.batch_growth=2", "trainer.epochs=3", "threads=1"]

TRAINERS = {
    "first-order": [STOCHASTIC_DEPTH],
    "bcd": [STOCHASTIC_DEPTH, "optimizer=bcd", "optimizer.cg_iters=2", "optimizer.classifier_steps=1"],
    "mgopt": [STOCHASTIC_DEPTH, "trainer=mgopt"],
    # trainer=rmtr refuses stochastic depth (its ratio test needs a deterministic objective): the data order and
    # the growing batch are its randomness, and its sample window and radius come back from the checkpoint
    "rmtr": ["trainer=rmtr", "trainer.window_max=2", "trainer.grow_patience=1"],
}


def _assert_same_run(a: Path, b: Path) -> None:
    """Two run directories hold the same training: every metrics row (clocks aside), the test numbers of the
    summary, and the last (and best) checkpoint's weights bit for bit."""
    ra, rb = strip_times(read_metrics(a)), strip_times(read_metrics(b))
    assert ra == rb and ra
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    for key in ("final_val_loss", "final_test_loss", "final_test_acc", "best_checkpoint_epoch",
                "best_checkpoint_test_loss"):
        assert sa.get(key) == sb.get(key), key
    assert_same_weights(a / "checkpoints" / "last.pt", b / "checkpoints" / "last.pt")
    if (a / "checkpoints" / "best.pt").exists() or (b / "checkpoints" / "best.pt").exists():
        assert_same_weights(a / "checkpoints" / "best.pt", b / "checkpoints" / "best.pt")


@pytest.mark.parametrize("trainer", TRAINERS.values(), ids=TRAINERS.keys())
def test_resume_with_every_source_of_randomness_equals_the_uninterrupted_run(tiny_cfg, tmp_path, cut_and_resume,
                                                                            trainer):
    """Ctrl-C in epoch 2 of 3: two epochs, each with a batch of its own size, are trained after the restore."""
    overrides = [*RANDOM, *trainer]
    train(tiny_cfg(overrides), tmp_path / "full")
    rows = read_metrics(tmp_path / "full")
    assert [r["batch_size"] for r in rows] == [32, 64, 128]  # the batch grows across the resume point
    saved, _ = cut_and_resume(overrides, 2)
    assert saved["epoch"] == 1
    _assert_same_run(tmp_path / "resumed", tmp_path / "full")


def test_stochastic_depth_draws_from_the_global_rng_that_a_checkpoint_restores(tiny_cfg, tmp_path):
    """What the resume tests above rely on: with stochastic depth the global torch RNG moves during training
    (so a resume has something to restore), and the checkpoint holds where it stood, not where the seed left it."""
    train(tiny_cfg([*RANDOM, STOCHASTIC_DEPTH, "trainer.epochs=1"]), tmp_path / "dropped")
    train(tiny_cfg([*RANDOM, "trainer.epochs=1"]), tmp_path / "kept")
    dropped, kept = (load_checkpoint(tmp_path / d / "checkpoints" / "last.pt")["rng"] for d in ("dropped", "kept"))
    assert torch.equal(dropped["data"], kept["data"])  # the same batches ...
    assert not torch.equal(dropped["torch"], kept["torch"])  # ... but the gates drew from the torch stream


# --- the check has teeth: a resume that forgets an RNG stream does not equal the uninterrupted run --------------


def _forgetful_restore(forget: str):
    real = state_module.restore_rng

    def restore(saved, generator):
        real({**saved, forget: (torch.get_rng_state() if forget == "torch" else generator.get_state())}, generator)

    return restore


@pytest.mark.parametrize("forget", ["torch", "data"])
def test_a_resume_that_forgets_an_rng_stream_differs(tiny_cfg, tmp_path, cut_and_resume, monkeypatch, forget):
    """A resume that keeps the stream the rebuild left (the seed's, as in a new run) for the global torch RNG
    (stochastic depth's gates) or the data-order generator trains other epochs: the equality above can fail."""
    overrides = [*RANDOM, STOCHASTIC_DEPTH]
    train(tiny_cfg(overrides), tmp_path / "full")
    monkeypatch.setattr(state_module, "restore_rng", _forgetful_restore(forget))
    cut_and_resume(overrides, 2)
    full, resumed = (strip_times(read_metrics(tmp_path / d)) for d in ("full", "resumed"))
    assert resumed[0] == full[0]  # the epoch before the cut is the checkpoint's history
    assert resumed[1]["train_loss"] != full[1]["train_loss"]
    with pytest.raises(AssertionError):
        assert_same_weights(tmp_path / "full" / "checkpoints" / "last.pt",
                            tmp_path / "resumed" / "checkpoints" / "last.pt")


# --- a schedule level under randomness: the resume lands exactly where the network moves to a new level --------


@pytest.mark.parametrize("schedule", [
    ["+pyramid=2level", "pyramid.epochs=[2,2]"],
    ["+depth=doubling", "depth.start=1", "depth.stop=2", "depth.epochs=[2]"],
], ids=["pyramid", "depth"])
def test_resume_at_a_level_boundary_with_stochastic_depth(tiny_cfg, tmp_path, cut_and_resume, schedule):
    """The checkpoint of the coarse level's last epoch: the resume moves the network onto the next level (with
    every stream where the uninterrupted run had it at that move) and trains the level from its first epoch."""
    overrides = [*RANDOM[:2], "threads=1", STOCHASTIC_DEPTH, *schedule]
    train(tiny_cfg(overrides), tmp_path / "full")
    levels = [r["level_epoch"] for r in read_metrics(tmp_path / "full")]
    assert levels == [1, 2, 1, 2]
    saved, _ = cut_and_resume(overrides, 3)
    assert saved["level_index"] == 0 and saved["level_epoch"] == 2
    _assert_same_run(tmp_path / "resumed", tmp_path / "full")


# --- two DDP ranks (gloo, CPU): each rank's stochastic-depth stream comes back ------------------------------------


def _rank_main(rank, world, jobs, ports, scratch):
    """One rank: torchrun's environment, then each job's train(); a job with ``cut`` raises Ctrl-C in that epoch
    on every rank (as torchrun forwards a SIGINT to all of them)."""
    from msnet.training import fit

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1")
    tempfile.tempdir = scratch
    torch.set_num_threads(1)
    real = fit.train_epoch
    for (cfg, run_dir, overrides, cut), port in zip(jobs, ports):
        os.environ["MASTER_PORT"] = str(port)
        calls = {"n": 0}

        def failing(*args, _cut=cut, **kwargs):
            calls["n"] += 1
            if calls["n"] == _cut:
                raise KeyboardInterrupt
            return real(*args, **kwargs)

        fit.train_epoch = failing if cut else real
        try:
            train(OmegaConf.create(cfg), run_dir, overrides=overrides)
        except MsnetError as err:
            if not cut or "interrupted during epoch" not in str(err):
                raise
        finally:
            fit.train_epoch = real


@pytest.mark.slow
def test_two_ranks_resume_with_stochastic_depth_equals_the_uninterrupted_run(tiny_cfg, tmp_path):
    """Rank r > 0 draws its gates from its own stream (seed + r): a resume must give each rank back the stream
    it had, not rank 0's and not a fresh seed + r (which would repeat rank 1's first-epoch gates)."""
    overrides = [*RANDOM, STOCHASTIC_DEPTH, "dtype=float64"]
    cfg = lambda extra=(): OmegaConf.to_container(tiny_cfg([*overrides, *extra]), resolve=True)  # noqa: E731
    ck = tmp_path / "cut" / "checkpoints" / "last.pt"
    jobs = [
        (cfg(), str(tmp_path / "full"), None, 0),
        (cfg(), str(tmp_path / "cut"), None, 2),
        (cfg([f"resume={ck}"]), str(tmp_path / "resumed"), [f"resume={ck}"], 0),
    ]
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    mp.spawn(_rank_main, args=(2, jobs, free_ports(len(jobs)), str(scratch)), nprocs=2, join=True)
    assert json.loads((tmp_path / "cut" / "summary.json").read_text())["status"] == "interrupted"
    assert load_checkpoint(ck)["epoch"] == 1
    summary = json.loads((tmp_path / "resumed" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["resumed_from"] == str(ck)
    _assert_same_run(tmp_path / "resumed", tmp_path / "full")
