"""Data-parallel training (DDP on gloo, CPU) equals one process over the same global batch; the launcher; refusals.

The 2-process runs start with torch.multiprocessing (each rank calls :func:`msnet.training.train`
with torchrun's environment variables), in float64 so the comparison can be tight.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from omegaconf import OmegaConf, open_dict

from msnet import MsnetError
from msnet.core import ModelSpec, StageSpec, build_model
from msnet.runs import load_checkpoint, read_metrics
from msnet.methods import UPDATE_RULES, FirstOrder
from msnet.training import train
from msnet.tasks import launch
from msnet.training import distributed
from msnet.training.setup import check_config
from msnet.methods import selected_rule
from msnet.training.distributed import DistEnv, Shard

MSNET = Path(sys.executable).parent / "msnet"


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ sharding arithmetic (no processes)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [1, 2, 3, 7, 29, 64])
def test_shards_partition_the_batch_and_weights_give_the_global_mean(world, n):
    losses = torch.rand(n, dtype=torch.float64, generator=torch.Generator().manual_seed(n * 10 + world))
    x, y = torch.arange(n).view(n, 1, 1, 1), torch.arange(n)
    covered, averaged = [], 0.0
    for r in range(world):
        xs, ys, w = Shard(r, world).split(x, y)
        covered += ys.tolist()
        assert abs(len(ys) - n / world) < 1
        if len(ys):
            averaged += w * losses[ys].mean().item() / world  # DDP averages the ranks' (weighted) objectives
        else:
            assert w == 0.0
    assert covered == list(range(n))  # contiguous, in order, nothing twice
    assert averaged == pytest.approx(losses.mean().item(), rel=1e-14)


def _tiny_net():
    torch.manual_seed(0)
    return build_model(ModelSpec(1, 3, (6, 6), [StageSpec(3, 2, 1.0)])).double()


@pytest.mark.parametrize("n", [1, 5, 8])
def test_weighted_first_order_gradients_average_to_the_full_batch_gradient(n):
    """What DDP computes, by hand: the mean over ranks of each rank's weighted gradient (+ penalty)."""
    g = torch.Generator().manual_seed(n)
    x, y = torch.randn(n, 1, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)

    def grads(net, xb, yb, weight):
        penalty = lambda: 0.1 * sum((p**2).sum() for p in net.parameters())  # noqa: E731
        rule = FirstOrder(net, torch.optim.SGD(net.parameters(), lr=0.0), penalty=penalty)
        rule.loss_weight = weight
        out = rule.step(xb, yb)
        assert torch.isfinite(out.loss)
        return [p.grad.clone() for p in net.parameters()]

    full = grads(_tiny_net(), x, y, 1.0)
    world = 2
    parts = [grads(_tiny_net(), *Shard(r, world).split(x, y)) for r in range(world)]
    for k, ref in enumerate(full):
        torch.testing.assert_close(sum(p[k] for p in parts) / world, ref, rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------ config checks and the launcher


def test_whole_step_update_rules_are_refused_under_ddp(tiny_cfg):
    assert UPDATE_RULES.names(), "no whole-step rule registered to check"
    for name in UPDATE_RULES.names():
        key = UPDATE_RULES.get(name).selected_by
        cfg = tiny_cfg([f"{key}={name}"])  # the rule's own preset (conf/{key}/{name}.yaml)
        rule = selected_rule(cfg)
        assert rule is UPDATE_RULES.get(name) and not rule.data_parallel
        distributed.check(cfg, DistEnv(), rule)  # one process: fine
        with pytest.raises(MsnetError, match=rf"{key}={name} does not run data-parallel \(2 processes\); "
                                              r"train it in one process \(trainer.devices=1"):
            distributed.check(cfg, DistEnv(world_size=2, local_world_size=2), rule)
        with pytest.raises(MsnetError, match=rf"{key}={name} does not run data-parallel"):
            check_config(cfg, DistEnv(world_size=2, local_world_size=2))  # the preflight asks the same rule
    assert selected_rule(tiny_cfg()) is FirstOrder and FirstOrder.data_parallel


def test_launch_decision_and_pinned_gpu(tiny_cfg):
    cfg = tiny_cfg(["trainer.devices=2"])
    assert launch.should_launch(cfg, {}) is True
    assert launch.should_launch(tiny_cfg(), {}) is False
    assert launch.should_launch(cfg, {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}) is False  # already a rank
    with pytest.raises(MsnetError, match="trainer.devices=2 but torchrun started 3 processes here"):
        launch.should_launch(cfg, {"WORLD_SIZE": "3", "LOCAL_WORLD_SIZE": "3"})
    pinned = tiny_cfg(["device=cuda:1"])
    with pytest.raises(MsnetError, match="device=cuda:1 pins every rank to one GPU; use device=cuda"):
        distributed.check(pinned, DistEnv(world_size=2, local_world_size=2), FirstOrder)
    assert launch.launch_args(2, ["a=1"], "/r") == [
        "--standalone", "--nproc_per_node=2", "-m", "msnet", "train", "a=1", "hydra.run.dir=/r"]
    assert distributed.detect({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}) == \
        DistEnv(1, 4, 1, 2)


# ------------------------------------------------------------------ 2 processes against 1


def _free_ports(k):
    socks = [socket.socket() for _ in range(k)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _rank_main(rank, world, jobs, ports, scratch):
    """One rank: torchrun's environment, then each job's train() (a fresh process group per job)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1")
    tempfile.tempdir = scratch
    torch.set_num_threads(1)
    for (cfg, run_dir, overrides), port in zip(jobs, ports):
        os.environ["MASTER_PORT"] = str(port)
        train(OmegaConf.create(cfg), run_dir, overrides=overrides)


def _container(cfg):
    return OmegaConf.to_container(cfg, resolve=True)


def _params(run_dir):
    return load_checkpoint(Path(run_dir) / "checkpoints" / "last.pt")["model"]


def _assert_same_run(ddp_dir, ref_dir, tol):
    a, b = read_metrics(ddp_dir), read_metrics(ref_dir)
    assert [r["epoch"] for r in a] == [r["epoch"] for r in b] and a
    for ra, rb in zip(a, b):
        assert ra["layers"] == rb["layers"] and ra["resolution"] == rb["resolution"]
        for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
            assert ra[key] == pytest.approx(rb[key], rel=tol, abs=tol), (ra["epoch"], key)
    pa, pb = _params(ddp_dir), _params(ref_dir)
    assert pa.keys() == pb.keys()
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=tol, atol=tol, msg=k)


@pytest.mark.slow
def test_two_processes_equal_one_process(tiny_cfg, tmp_path):
    """Loss, accuracy and weights of 2 gloo ranks = 1 process over the same global batches (float64).

    129 training images in batches of 50: the last batch (29) splits 14/15, so the loss
    weights matter. Also: reversible backprop through a pyramid + depth schedule (DDP
    rebuilt at each of its 3 levels, parameters changing shape), a resumed run, and
    stochastic depth (parameters unused on one rank).
    """
    base = ["dataset.n_train=229", "dataset.val_size=100", "dataset.n_test=100", "trainer.batch_size=50",
            "dtype=float64", "threads=1", "model.channels=4", "model.layers=2"]
    plain = tiny_cfg(base + ["optimizer=sgd", "optimizer.lr=0.1"])
    levels = tiny_cfg(base + ["model.integrator=midpoint", "model.backprop=reversible", "+depth=doubling",
                              "depth.start=2", "depth.stop=4", "+pyramid=2level", "pyramid.epochs=[1,1]"])
    cut = tiny_cfg(base + ["optimizer=sgd", "optimizer.lr=0.1", "trainer.epochs=1"])
    resume = tiny_cfg(base + ["optimizer=sgd", "optimizer.lr=0.1",
                              f"resume={tmp_path / 'ddp_cut' / 'checkpoints' / 'last.pt'}"])
    dropped = tiny_cfg(base + ["model.stochastic_depth.p_last=0.3", "trainer.epochs=1"])
    jobs = [
        (_container(plain), str(tmp_path / "ddp_plain"), None),
        (_container(levels), str(tmp_path / "ddp_levels"), None),
        (_container(cut), str(tmp_path / "ddp_cut"), None),
        (_container(resume), str(tmp_path / "ddp_resumed"), ["resume=...", "trainer.epochs=2"]),
        (_container(dropped), str(tmp_path / "ddp_dropped"), None),
    ]
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    mp.spawn(_rank_main, args=(2, jobs, _free_ports(len(jobs)), str(scratch)), nprocs=2, join=True)

    train(plain, tmp_path / "ref_plain")
    train(levels, tmp_path / "ref_levels")
    _assert_same_run(tmp_path / "ddp_plain", tmp_path / "ref_plain", 1e-10)
    _assert_same_run(tmp_path / "ddp_levels", tmp_path / "ref_levels", 1e-10)
    assert [r["resolution"] for r in read_metrics(tmp_path / "ddp_levels")] == [[4, 4], [4, 4], [8, 8]]
    _assert_same_run(tmp_path / "ddp_resumed", tmp_path / "ref_plain", 1e-10)
    summary = json.loads((tmp_path / "ddp_dropped" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["processes"] == 2
    assert json.loads((tmp_path / "ddp_plain" / "summary.json").read_text())["processes"] == 2
    assert [p for p in scratch.iterdir() if p.name.startswith("msnet")] == []  # rank 1's temporary run dirs: gone
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["scratch", "ref_plain", "ref_levels", "ddp_plain", "ddp_levels", "ddp_cut", "ddp_resumed", "ddp_dropped"])


@pytest.mark.slow
def test_cli_devices_2_writes_one_run_directory(tmp_path):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch)}
    args = ["train", "trainer.devices=2", "dataset=synthetic", "dataset.n_train=300", "dataset.val_size=100",
            "dataset.n_test=100", "dataset.image_size=8", "model.channels=4", "model.layers=2", "trainer.epochs=1",
            "trainer.progress=false", "device=cpu", "threads=1"]
    proc = subprocess.run([str(MSNET), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = [p for p in (tmp_path / "outputs").glob("*/*/*") if p.is_dir()]
    assert len(runs) == 1, runs
    summary = json.loads((runs[0] / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["processes"] == 2 and summary["final_test_acc"] > 0.25  # chance: 4 classes
    assert (runs[0] / "checkpoints" / "last.pt").exists()
    assert proc.stdout.count("msnet train ") == 1  # rank 1 printed nothing
    assert [p for p in scratch.iterdir() if p.name.startswith("msnet")] == []  # rank 1's Hydra and run dirs: gone


def test_launch_refuses_bcd_before_starting_processes(tiny_cfg, tmp_path):
    cfg = tiny_cfg(["trainer.devices=2", "optimizer=bcd"])
    with pytest.raises(MsnetError, match=r"^optimizer=bcd does not run data-parallel \(2 processes\); train it in one "
                                         r"process \(trainer.devices=1, no torchrun\) or use a first-order optimizer"):
        launch.launch(cfg, tmp_path, ["trainer.devices=2", "optimizer=bcd"])
    assert list(tmp_path.iterdir()) == []
