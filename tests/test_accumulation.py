"""Every accumulation over chunks or ranks equals the one-chunk / one-process result, on inputs of several chunks
with a last chunk of unequal size (so that weighting by count matters), in float64.

- :func:`msnet.training.evaluation.evaluate`: loss and accuracy summed over ``eval_batch_size`` chunks = one pass;
- :func:`msnet.training.loop.train_epoch`: the epoch's loss and accuracy over mini-batches (read back every
  ``log_every``) = the mean over every image, each image once;
- :func:`msnet.training.fit.fit_level` with ``evals_per_epoch`` > 1: the epoch's chunks combined by their counts
  (also on a level's last, partial epoch);
- the stencil fit's normal equations (:func:`msnet.multigrid.datafit._fit_conv`) accumulated over chunks of
  images = one chunk;
- the Gauss-Newton product of :mod:`msnet.methods.newton` (BCD's normal equations) on a batch = the
  count-weighted mean of the products on its chunks, in both Jacobian modes;
- data-parallel training (:mod:`msnet.training.distributed`): two gloo ranks with unequal shards (3/4 images,
  and a last batch of one image that leaves rank 0 empty) = one process: weights, epoch loss, accuracy, count.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from omegaconf import OmegaConf

from msnet.core import ModelSpec, StageSpec, build_model
from msnet.data import DataBundle
from msnet.multigrid.datafit import _fit_conv
from msnet.multigrid.space import get_transfer
from msnet.training import distributed
from msnet.training.fit import fit_level
from msnet.training.evaluation import evaluate
from msnet.training.loop import train_epoch
from msnet.methods.newton import GaussNewton
from msnet.training.schedule import Level
from msnet.training.state import RunState
from msnet.methods.first_order import FirstOrder
from msnet.methods.base import StepOutput, UpdateRule

pytestmark = pytest.mark.usefixtures("one_thread")

RTOL = 1e-13  # float64 sums in another order


def tiny_net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(ModelSpec(1, 3, (6, 6), [StageSpec(3, 2, 1.0)])).double()


def data(n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def one_pass(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> Dict[str, float]:
    """Mean cross-entropy and accuracy of ``net`` on all of ``(x, y)`` in one forward pass."""
    with torch.no_grad():
        logits = net(x)
    return {"loss": float(F.cross_entropy(logits, y)), "acc": float((logits.argmax(1) == y).double().mean())}


# ------------------------------------------------------------------ evaluation over eval_batch_size chunks


@pytest.mark.parametrize("batch_size", [1000, 64, 7, 1])
def test_evaluation_over_chunks_equals_one_pass(batch_size):
    """203 images: one chunk, 64+64+64+11, 29 x 7, 203 x 1."""
    net = tiny_net()
    x, y = data(203)
    ref = one_pass(net.eval(), x, y)
    got = evaluate(net, x, y, batch_size)
    assert got["loss"] == pytest.approx(ref["loss"], rel=RTOL, abs=0)
    assert got["acc"] == ref["acc"] and 0 < got["acc"] < 1


# ------------------------------------------------------------------ an epoch over mini-batches, and over chunks


class Watching(UpdateRule):
    """Changes nothing; reports each batch's mean cross-entropy and remembers the images it was handed."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.seen = model, []

    @classmethod
    def from_config(cls, model, cfg, opt_cfg, epochs, penalty):  # pragma: no cover - built by hand here
        return cls(model)

    def step(self, xb: torch.Tensor, yb: torch.Tensor) -> StepOutput:
        self.seen.append((xb, yb))
        with torch.no_grad():
            logits = self.model(xb)
        return StepOutput(F.cross_entropy(logits, yb), logits)

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, ckpt: Dict[str, Any]) -> None:
        pass

    def images(self):
        return torch.cat([s[0] for s in self.seen]), torch.cat([s[1] for s in self.seen])


def assert_each_image_once(seen_x: torch.Tensor, x: torch.Tensor) -> None:
    keys = sorted(tuple(r.tolist()) for r in seen_x.flatten(1))
    assert len(set(keys)) == len(keys)  # no image twice
    assert set(keys) <= {tuple(r.tolist()) for r in x.flatten(1)}


@pytest.mark.parametrize("log_every", [1, 2, 25])
def test_an_epoch_weights_its_batches_by_count(log_every):
    """203 images in batches of 64 (the last one 11): the epoch's loss and accuracy are those of all 203 images
    (whenever the sums are read back), and the count is 203."""
    net = tiny_net()
    x, y = data(203)
    rule = Watching(net)
    out = train_epoch(net, rule, x, y, 64, torch.Generator().manual_seed(0), log_every=log_every)
    assert [len(b) for _, b in rule.seen] == [64, 64, 64, 11]
    seen_x, _ = rule.images()
    assert_each_image_once(seen_x, x)
    ref = one_pass(net, x, y)
    assert out.samples == 203
    assert out.loss == pytest.approx(ref["loss"], rel=RTOL, abs=0)
    assert out.acc == pytest.approx(ref["acc"], rel=1e-15, abs=0)


def bundle(n_train: int) -> DataBundle:
    x, y = data(n_train + 40)
    return DataBundle("synthetic", x[:n_train], y[:n_train], x[n_train:], y[n_train:], x[:0], y[:0], 3,
                      torch.zeros(1), torch.ones(1))


def test_chunked_epochs_weight_chunks_by_count():
    """fit_level with evals_per_epoch=3 on 200 images: chunks of 67, 67, 66 (batches of 32, each chunk's last one
    smaller); the level's second, last epoch covers share 0.5 (100 images: 34, 34, 32). Each epoch's train_loss and
    train_acc are those of every image it trained on (each once), and a validation pass follows every chunk."""
    net = tiny_net()
    d = bundle(200)
    state = RunState(model=net, generator=torch.Generator().manual_seed(0))
    state.started = time.perf_counter()
    rule = Watching(net)
    state.rule = rule
    from msnet.config import TrainerConfig

    trainer = OmegaConf.structured(TrainerConfig(batch_size=32, log_every=25, eval_batch_size=16))
    steps = list(fit_level(state, d, Level("fine", 0, 2, share=0.5), trainer, evals_per_epoch=3))
    assert [s.kind for s in steps] == ["chunk", "chunk", "epoch"] * 2
    def batches_of(m):  # each of the epoch's three chunks in batches of 32
        return [min(32, len(c) - s) for c in torch.arange(m).chunk(3) for s in range(0, len(c), 32)]

    assert batches_of(200) == [32, 32, 3, 32, 32, 3, 32, 32, 2] and batches_of(100) == [32, 2, 32, 2, 32]
    assert [len(b) for _, b in rule.seen] == batches_of(200) + batches_of(100)
    ref_val = one_pass(net, d.x_val, d.y_val)
    for s in steps:
        assert s.record["val_loss"] == pytest.approx(ref_val["loss"], rel=RTOL, abs=0)
    for epoch, (start, stop, n) in enumerate([(0, 9, 200), (9, 14, 100)]):
        xs = torch.cat([b[0] for b in rule.seen[start:stop]])
        ys = torch.cat([b[1] for b in rule.seen[start:stop]])
        assert len(ys) == n
        assert_each_image_once(xs, d.x_train)
        ref = one_pass(net, xs, ys)
        record = [s.record for s in steps if s.kind == "epoch"][epoch]
        assert record["train_loss"] == pytest.approx(ref["loss"], rel=RTOL, abs=0), epoch
        assert record["train_acc"] == pytest.approx(ref["acc"], rel=1e-15, abs=0), epoch


# ------------------------------------------------------------------ normal equations and Gauss-Newton products


@pytest.mark.parametrize("chunk", [128, 7])
@pytest.mark.parametrize("op", ["linear", None])
def test_stencil_fit_normal_equations_over_chunks_equal_one_chunk(chunk, op):
    """300 images (128 + 128 + 44, or 42 x 7 + 6), with the images' restriction (op) or at the same grid."""
    g = torch.Generator().manual_seed(2)
    y = torch.randn(300, 2, 8, 8, generator=g, dtype=torch.float64)
    restrict = get_transfer(op).restrict if op else (lambda t: t)
    target = torch.randn(300, 3, *((4, 4) if op else (8, 8)), generator=g, dtype=torch.float64)
    weight = torch.randn(3, 2, 3, 3, generator=g, dtype=torch.float64)
    bias = torch.randn(3, generator=g, dtype=torch.float64)
    w1, b1 = _fit_conv(y, target, restrict, weight, bias, 1e-3, chunk=300)
    w, b = _fit_conv(y, target, restrict, weight, bias, 1e-3, chunk=chunk)
    torch.testing.assert_close(w, w1, rtol=1e-11, atol=1e-13)
    torch.testing.assert_close(b, b1, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("mode", GaussNewton.MODES)
def test_gauss_newton_product_is_the_count_weighted_mean_over_chunks(mode):
    """G v on 13 images = sum_c (n_c / 13) G_c v over chunks of 5, 5, 3 (H_CE is a per-sample mean)."""
    net = tiny_net()
    x, _ = data(13)
    params = dict(net.named_parameters())
    g = torch.Generator().manual_seed(4)
    v = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params.values()]

    def product(xs):
        gn = GaussNewton(lambda p: torch.func.functional_call(net, p, (xs,)), params, mode=mode)
        return gn(v)

    full = product(x)
    parts = [(len(c), product(c)) for c in x.split(5)]
    assert [n for n, _ in parts] == [5, 5, 3]
    for k, ref in enumerate(full):
        mixed = sum(n / 13 * out[k] for n, out in parts)
        torch.testing.assert_close(mixed, ref, rtol=1e-11, atol=1e-14)
    assert sum(float((a * b).sum()) for a, b in zip(v, full)) > 0  # G is PSD and v is not in its null space


# ------------------------------------------------------------------ two ranks with unequal shards


N_DDP, BATCH_DDP = 29, 7  # batches 7, 7, 7, 7, 1: shards 3/4 and, for the last, 0/1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _epoch(rank: Optional[int], world: int) -> Dict[str, Any]:
    """Two SGD epochs of the tiny net; under DDP when ``rank`` is given (the process group is up)."""
    net = tiny_net()
    x, y = data(N_DDP)
    env = distributed.DistEnv(rank or 0, world, rank or 0, world)
    model = distributed.wrap(net, env, torch.device("cpu")) if rank is not None else net
    rule = FirstOrder(model, torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.5))
    gen = torch.Generator().manual_seed(3)
    weights: List[float] = []
    results = []
    for epoch in (1, 2):
        out = train_epoch(net, rule, x, y, BATCH_DDP, gen, log_every=2, epoch=epoch,
                          shard=distributed.shard(env) if rank is not None else None)
        results.append((out.loss, out.acc, out.samples))
        weights.append(rule.loss_weight)
    return {"results": results, "params": {k: v.detach().clone() for k, v in net.state_dict().items()},
            "last_weight": weights}


def _rank_main(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    env = distributed.detect()
    distributed.setup(env, torch.device("cpu"), threads=1)
    try:
        torch.save(_epoch(rank, world), Path(out) / f"rank{rank}.pt")
    finally:
        distributed.cleanup()


def test_two_ranks_with_unequal_shards_equal_one_process(tmp_path):
    shards = [distributed.Shard(r, 2).bounds(n) for n in (7, 1) for r in range(2)]
    assert shards == [(0, 3), (3, 7), (0, 0), (0, 1)]  # unequal, and one empty
    mp.spawn(_rank_main, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ref = _epoch(None, 1)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["last_weight"] == [[0.0, 2.0][rank]] * 2  # the last batch's weight K n_r / n
        for (loss, acc, n), (rloss, racc, rn) in zip(got["results"], ref["results"]):
            assert n == rn == N_DDP
            assert loss == pytest.approx(rloss, rel=1e-12, abs=0)
            assert acc == pytest.approx(racc, rel=1e-15, abs=0)
        for k, v in ref["params"].items():
            torch.testing.assert_close(got["params"][k], v, rtol=1e-11, atol=1e-13, msg=k)
