"""``depth.carry_optimizer``: the optimiser's moments move with the weights at each doubling of the depth."""

from __future__ import annotations

import pytest
import torch

from msnet import MsnetError
from msnet.core import ModelSpec, StageSpec, build_model
from msnet.multigrid import transfer_depth
from msnet.multigrid.time import prolong_constant, prolong_linear, prolong_optimizer_state
from msnet.runs import read_metrics
from msnet.training import train

from .conftest import assert_same_weights

pytestmark = pytest.mark.usefixtures("one_thread")


def _trained(opt_cls, layers: int = 3, **kw):
    """A small network and its optimiser after three steps on random data (every buffer non-zero)."""
    torch.manual_seed(0)
    net = build_model(ModelSpec(in_channels=1, num_classes=3, image_size=(8, 8), stages=[StageSpec(2, layers)])).double()
    opt = opt_cls(net.parameters(), lr=1e-2, **kw)
    x, y = torch.randn(6, 1, 8, 8, dtype=torch.float64), torch.randint(0, 3, (6,))
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return net, opt


@pytest.mark.parametrize("op,prolong", [("linear", prolong_linear), ("constant", prolong_constant)])
def test_adam_moments_are_prolonged_like_the_weights_and_scaled_for_h(op, prolong):
    """Step parameters (N, ...) -> (M, ...): m -> P m * (N/M), v -> P v * (N/M)^2 (a step's gradient carries h);
    the others keep their state bit for bit; the step count goes with them."""
    net, opt = _trained(torch.optim.Adam, amsgrad=True)
    deep = transfer_depth(net, 6, op)
    new = torch.optim.Adam(deep.parameters(), lr=1e-2, amsgrad=True)
    carried = prolong_optimizer_state(opt, net, new, deep, op)
    old = dict(net.named_parameters())
    assert carried == len(list(deep.parameters()))
    for name, p in deep.named_parameters():
        q, s, t = old[name], new.state[p], opt.state[old[name]]
        assert torch.equal(s["step"], t["step"]) and s["step"] is not t["step"]
        if p.shape == q.shape:
            for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                assert torch.equal(s[key], t[key])
        else:
            assert p.shape[0] == 2 * q.shape[0]
            torch.testing.assert_close(s["exp_avg"], prolong(t["exp_avg"], 6) / 2, rtol=0, atol=0)
            torch.testing.assert_close(s["exp_avg_sq"], prolong(t["exp_avg_sq"], 6) / 4, rtol=0, atol=0)
            torch.testing.assert_close(s["max_exp_avg_sq"], prolong(t["max_exp_avg_sq"], 6) / 4, rtol=0, atol=0)
            assert (s["exp_avg_sq"] >= 0).all()
    new.step()  # the carried state is one Adam accepts (no gradients: nothing moves, nothing fails)


def test_sgd_momentum_is_carried_and_other_kinds_are_refused():
    net, opt = _trained(torch.optim.SGD, momentum=0.9)
    deep = transfer_depth(net, 6, "linear")
    new = torch.optim.SGD(deep.parameters(), lr=1e-2, momentum=0.9)
    prolong_optimizer_state(opt, net, new, deep)
    k_old = dict(net.named_parameters())["blocks.0.params.K"]
    k_new = dict(deep.named_parameters())["blocks.0.params.K"]
    torch.testing.assert_close(new.state[k_new]["momentum_buffer"],
                               prolong_linear(opt.state[k_old]["momentum_buffer"], 6) / 2, rtol=0, atol=0)
    with pytest.raises(MsnetError, match="cannot carry Adam's state into SGD"):
        adam_net, adam = _trained(torch.optim.Adam)
        prolong_optimizer_state(adam, adam_net, new, deep)


def test_a_depth_run_with_carry_differs_from_fresh_and_resumes_exactly(tiny_cfg, tmp_path, cut_and_resume):
    """Through the trainer: carrying changes the run (the deep level's first update is another one), and a run
    interrupted in its first deep epoch resumes to the same weights as the uninterrupted run: the carry is made
    from the checkpoint's optimiser state."""
    base = ["+depth=doubling", "depth.start=2", "depth.stop=4", "depth.epochs=[1,2]"]
    cfg = tiny_cfg([*base, "depth.carry_optimizer=true"])
    full = train(cfg, tmp_path / "full")
    train(tiny_cfg(base), tmp_path / "fresh")
    assert [lv["layers"] for lv in full["levels"]] == [2, 4]
    m_full, m_fresh = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "fresh")
    assert m_full[0]["train_loss"] == m_fresh[0]["train_loss"]  # the shallow level is the same run
    assert m_full[1]["train_loss"] != m_fresh[1]["train_loss"]

    cut_and_resume([*base, "depth.carry_optimizer=true"], 2)
    assert_same_weights(tmp_path / "full" / "checkpoints" / "last.pt", tmp_path / "resumed" / "checkpoints" / "last.pt")
