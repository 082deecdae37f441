"""Reversible backprop under reduced precision: the TF32 policy and bf16 autocast.

A reversible stage rebuilds each state by subtracting the F value its forward added, so
its backward must evaluate F in the forward's arithmetic (:class:`PrecisionState`). What
the CPU can check is checked here: the TF32 switch's bookkeeping, that forward and
backward both run under it, and bf16 autocast end to end. Whether a GPU's TF32 and bf16
kernels keep the promised agreement is measured by ``scripts/bench/reversible_precision.py``
(``scripts/gpu_check.sh``) and by the ``cuda``-marked tests below.
"""

from __future__ import annotations

import pytest
import torch

from msnet.core import INTEGRATORS, ModelSpec, StageSpec, build_model
from msnet.core.device import ieee_fp32_convolutions
from msnet.core.network import ODEBlock, set_reversible_tf32
from msnet.core.reversible import PrecisionState
from msnet.methods import FirstOrder
from msnet.training import train
from msnet.training import speed
from msnet.training.distributed import DistEnv

from .test_reversible import REVERSIBLE, random_block, residual_for

pytestmark = pytest.mark.usefixtures("one_thread")

CONV = torch.backends.cudnn.conv
# float32, one stage of up to 64 steps (random_block's weights): max |g_rev - g_store| / max |g_store|.
# Measured on the CPU: <= 1.1e-6 (leapfrog, whose inverse cancels; the others ~1e-7).
FP32_TOL = 1e-5
# bf16 autocast, same blocks: rev and store evaluate the same bf16 F on float32 states, so they
# differ only where a rebuilt state's last float32 bit flips a bf16 rounding. Measured on the CPU:
# 0 to 2e-5 at 64 steps (3e-3 for leapfrog at 256). Each is within bf16's own error of float32 (~5e-3).
BF16_TOL = 1e-3
BF16_VS_FP32 = 3e-2


@pytest.fixture
def restore_conv_flag():
    saved = CONV.fp32_precision
    yield
    CONV.fp32_precision = saved


@pytest.mark.parametrize("before", ["tf32", "ieee", "none"])
def test_ieee_convolutions_restore_the_flag_they_found(before, restore_conv_flag):
    CONV.fp32_precision = before
    with ieee_fp32_convolutions():
        assert CONV.fp32_precision == "ieee"
    assert CONV.fp32_precision == before
    with pytest.raises(ValueError, match="boom"):
        with ieee_fp32_convolutions():
            assert CONV.fp32_precision == "ieee"
            raise ValueError("boom")
    assert CONV.fp32_precision == before
    with ieee_fp32_convolutions(enabled=False):
        assert CONV.fp32_precision == before


def test_policy_turns_tf32_off_on_cuda_only_unless_allowed():
    assert PrecisionState.capture(torch.device("cuda", 0)).ieee_fp32
    assert not PrecisionState.capture(torch.device("cuda", 0), tf32=True).ieee_fp32
    assert not PrecisionState.capture(torch.device("cpu")).ieee_fp32  # no TF32 on the CPU
    with torch.autocast("cpu", dtype=torch.bfloat16):
        state = PrecisionState.capture(torch.device("cpu"))
    assert state.autocast and state.autocast_dtype == torch.bfloat16
    assert not PrecisionState.capture(torch.device("cpu")).autocast


@pytest.mark.parametrize("name", REVERSIBLE)
def test_forward_and_backward_evaluate_every_F_with_tf32_off(name, monkeypatch, restore_conv_flag):
    """With the policy on (forced here on the CPU), every residual evaluation of the reversible
    forward and of the rebuilding backward sees IEEE convolutions; the global flag is back after."""
    CONV.fp32_precision = "tf32"
    monkeypatch.setattr(PrecisionState, "capture", classmethod(lambda cls, device, tf32=False: cls(
        device.type, torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type), not tf32)))
    block = random_block(name, 6, 1.0, dtype=torch.float32)
    block.backprop = "reversible"
    seen = []
    residual = block.residual
    for attr in ("__call__", "part"):
        if hasattr(type(residual), attr):
            real = getattr(type(residual), attr)
            monkeypatch.setattr(type(residual), attr, lambda self, *a, _real=real: (
                seen.append(CONV.fp32_precision), _real(self, *a))[1])
    y0 = torch.randn(2, 4, 5, 5, requires_grad=True)
    out = block(y0)
    n_forward = len(seen)
    assert n_forward > 0 and CONV.fp32_precision == "tf32"
    out.square().sum().backward()
    assert len(seen) > n_forward  # backward evaluated F again ...
    assert set(seen) == {"ieee"}  # ... and every evaluation, forward and backward, ran without TF32
    assert CONV.fp32_precision == "tf32"


def test_trainer_option_reaches_the_blocks(tiny_cfg):
    model = build_model(ModelSpec(1, 3, (8, 8), [StageSpec(4, 2), StageSpec(8, 2)], integrator="hamiltonian",
                                  residual="hamiltonian", backprop="reversible"))
    blocks = [m for m in model.modules() if isinstance(m, ODEBlock)]
    assert blocks and not any(b.reversible_tf32 for b in blocks)  # the default: exact
    rule = FirstOrder(model, torch.optim.SGD(model.parameters(), lr=0.1))
    speed.prepare_update(rule, model, tiny_cfg(["trainer.reversible_tf32=true"]), DistEnv(), torch.device("cpu"))
    assert all(b.reversible_tf32 for b in blocks)
    set_reversible_tf32(model, False)
    assert not any(b.reversible_tf32 for b in blocks)


def _stage_grads(name: str, depth: int, backprop: str, precision: str, dtype=torch.float32, device="cpu"):
    """Gradients of every parameter of a one-stage net (8 channels, 12x12, batch 16) after one loss."""
    torch.manual_seed(0)
    spec = ModelSpec(1, 10, (12, 12), [StageSpec(8, depth, 1.0)], residual=residual_for(name), integrator=name,
                     backprop=backprop)
    model = build_model(spec).to(device=device, dtype=dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 1, 12, 12, generator=g).to(device=device, dtype=dtype)
    y = torch.randint(0, 10, (16,), generator=g).to(device)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        logits = model(x)
    torch.nn.functional.cross_entropy(logits.float(), y).backward()
    return torch.cat([p.grad.flatten().double() for p in model.parameters()])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("name", REVERSIBLE)
def test_float32_reversible_gradients_agree_with_store(name):
    """The documented float32 tolerance, at 64 steps: reversible within 1e-5 of store (max-relative)."""
    store, rev = (_stage_grads(name, 64, bp, "fp32") for bp in ("store", "reversible"))
    assert _rel(rev, store) < FP32_TOL


@pytest.mark.parametrize("name", REVERSIBLE)
def test_bf16_reversible_gradients_agree_with_store(name):
    """Under bf16 autocast (which crashed in the reversible backward before the replay): reversible
    equals store to BF16_TOL, and both stay within bf16's error of the float32 gradients."""
    ref = _stage_grads(name, 32, "store", "fp32")
    store, rev = (_stage_grads(name, 32, bp, "bf16") for bp in ("store", "reversible"))
    assert _rel(rev, store) < BF16_TOL
    assert _rel(store, ref) < BF16_VS_FP32 and _rel(rev, ref) < BF16_VS_FP32
    assert _rel(store, ref) > 1e-4  # it really ran in bf16


@pytest.mark.parametrize("backprop", ["store", "reversible"])
def test_bf16_keeps_the_stage_state_in_float32(backprop):
    """Autocast hands the stage a bf16 y_0; the state and its sub-steps run in float32, F in bf16."""
    block = random_block("leapfrog", 8, 1.0, dtype=torch.float32)
    block.backprop = backprop
    y0 = torch.randn(2, 4, 5, 5).bfloat16().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(y0)
    assert out.dtype == torch.float32
    out.sum().backward()
    assert y0.grad.dtype == torch.bfloat16 and all(p.grad.dtype == torch.float32 for p in block.parameters())


EXPLICIT = [n for n in INTEGRATORS.names() if n not in REVERSIBLE]
BF16_STORE_TOL = 8e-3  # a float32 state: 4.2e-3 to 5.7e-3 at 16 and 64 steps; a bf16 state gave 1.1e-2 to 4.6e-2


@pytest.mark.parametrize("name", EXPLICIT)
def test_bf16_keeps_every_integrators_state_in_float32(name):
    """Euler, Runge-Kutta and LM stages under bf16 autocast: float32 state and output, and
    gradients within bf16's own error of float32's at 64 steps, without the error growing with depth
    (a bf16 state dropped every update below 2^-9 |y|: 1.7e-2 for euler, 4.6e-2 for rk4 at 64 steps)."""
    block = random_block(name, 8, 1.0, dtype=torch.float32)
    seen = []
    block.probe = lambda j, state: seen.append(state.dtype)  # the state each evaluation of F gets
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(torch.randn(2, 4, 5, 5).bfloat16())
    assert out.dtype == torch.float32 and len(seen) >= 8 and set(seen) == {torch.float32}
    ref = _stage_grads(name, 64, "store", "fp32")
    errors = [_rel(_stage_grads(name, depth, "store", "bf16"), ref if depth == 64 else
                   _stage_grads(name, depth, "store", "fp32")) for depth in (16, 64)]
    assert max(errors) < BF16_STORE_TOL and errors[1] < 2 * errors[0], errors
    assert min(errors) > 1e-4  # it really ran in bf16


def test_bf16_reversible_training_run(tiny_cfg, tmp_path):
    """trainer.precision=bf16 with model.backprop=reversible trains through the trainer like store does."""
    runs = {}
    for backprop in ("store", "reversible"):
        cfg = tiny_cfg(["threads=1", "trainer.precision=bf16", "model.integrator=hamiltonian",
                        "model.residual=hamiltonian", "model.layers=6", f"model.backprop={backprop}"])
        runs[backprop] = train(cfg, tmp_path / backprop)
    assert runs["store"]["status"] == runs["reversible"]["status"] == "completed"
    assert runs["reversible"]["final_test_loss"] == pytest.approx(runs["store"]["final_test_loss"], rel=1e-2)


def _cuda_grads(name: str, depth: int, backprop: str, conv_precision: str, tf32: bool = False, bf16: bool = False):
    """Gradients of one reversible block alone on CUDA (no opening conv), with the global conv flag set."""
    saved = CONV.fp32_precision
    CONV.fp32_precision = conv_precision
    try:
        block = random_block(name, depth, 1.0, c=16, dtype=torch.float32).cuda()
        block.backprop, block.reversible_tf32 = backprop, tf32
        g = torch.Generator().manual_seed(2)
        y0 = torch.randn(8, 16, 16, 16, generator=g).cuda().requires_grad_(True)
        w = torch.randn(8, 16, 16, 16, generator=g).cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            out = block(y0)
        (out.float() * w).sum().backward()
        return torch.cat([y0.grad.flatten()] + [p.grad.flatten() for p in block.parameters()]).double().cpu()
    finally:
        CONV.fp32_precision = saved


@pytest.mark.cuda
@pytest.mark.parametrize("name", REVERSIBLE)
def test_cuda_reversible_ignores_global_tf32_by_default(name):
    """With TF32 on globally, the reversible block's gradients equal IEEE store gradients to float32 round-off."""
    exact = _cuda_grads(name, 64, "store", "ieee")
    assert _rel(_cuda_grads(name, 64, "reversible", "tf32"), exact) < FP32_TOL
    assert _rel(_cuda_grads(name, 64, "reversible", "ieee"), exact) < FP32_TOL


@pytest.mark.cuda
@pytest.mark.parametrize("name", REVERSIBLE)
def test_cuda_bf16_reversible_agrees_with_store(name):
    exact = _cuda_grads(name, 32, "store", "ieee")
    store, rev = (_cuda_grads(name, 32, bp, "ieee", bf16=True) for bp in ("store", "reversible"))
    assert _rel(rev, store) < BF16_TOL
    assert _rel(rev, exact) < BF16_VS_FP32


@pytest.mark.cuda
@pytest.mark.parametrize("name", EXPLICIT)
def test_cuda_bf16_keeps_explicit_stages_within_bf16_error(name):
    """On CUDA too, an Euler/RK/LM stage under bf16 (float32 state) stays within BF16_STORE_TOL of the IEEE float32
    gradients at 64 steps, with the rest of the network in bf16 (opening layer, classifier)."""
    with ieee_fp32_convolutions():
        ref = _stage_grads(name, 64, "store", "fp32", device="cuda")
    assert _rel(_stage_grads(name, 64, "store", "bf16", device="cuda"), ref) < BF16_STORE_TOL
