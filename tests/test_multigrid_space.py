"""Image and stencil transfer between resolutions: exact Galerkin identities, round trips, the paper's example."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from msnet.multigrid.space import (
    TRANSFERS, galerkin_condition, galerkin_map, get_transfer, prolong_stencil, restrict_stencil, transfer_facts,
)

OPS = TRANSFERS.names()


def test_linear_is_the_default_and_full_weighting_is_p_transpose_over_4():
    op = get_transfer("linear")
    n = 6
    # dense P and R by probing unit images
    P = torch.stack([op.prolong(e.reshape(1, 1, n, n)).flatten() for e in torch.eye(n * n, dtype=torch.float64)], 1)
    R = torch.stack([op.restrict(e.reshape(1, 1, 2 * n, 2 * n)).flatten() for e in torch.eye(4 * n * n, dtype=torch.float64)], 1)
    torch.testing.assert_close(R, P.T / 4, rtol=0, atol=1e-15)


@pytest.mark.parametrize("name", OPS)
def test_rp_on_constants_and_identity(name):
    op = get_transfer(name)
    y = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    ones = torch.ones(1, 1, 8, 8, dtype=torch.float64)
    # R P keeps constants away from the boundary
    torch.testing.assert_close(op.restrict(op.prolong(ones))[..., 1:-1, 1:-1], ones[..., 1:-1, 1:-1])
    if TRANSFERS.get(name).rp_identity:
        torch.testing.assert_close(op.restrict(op.prolong(y)), y, rtol=0, atol=1e-15)
    else:
        assert (op.restrict(op.prolong(y)) - y).abs().max() > 1e-3


@settings(max_examples=40, deadline=None)
@given(
    name=st.sampled_from(OPS),
    c_out=st.integers(1, 3),
    c_in=st.integers(1, 3),
    size=st.integers(3, 8),
    seed=st.integers(0, 2**31 - 1),
)
def test_galerkin_identity_away_from_boundary(name, c_out, c_in, size, seed):
    """R K(s_h) P y_H == K(s_H) y_H in the interior, to float64 round-off."""
    g = torch.Generator().manual_seed(seed)
    op = get_transfer(name)
    K = torch.randn(c_out, c_in, 3, 3, generator=g, dtype=torch.float64)
    y = torch.randn(2, c_in, size, size, generator=g, dtype=torch.float64)
    lhs = op.restrict(F.conv2d(op.prolong(y), K, padding=1))
    rhs = F.conv2d(y, restrict_stencil(K, name), padding=1)
    scale = 1 + rhs.abs().max()
    assert ((lhs - rhs)[..., 1:-1, 1:-1].abs().max() / scale) < 1e-13


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(OPS), shape=st.lists(st.integers(1, 4), min_size=0, max_size=2), seed=st.integers(0, 2**31 - 1))
def test_restrict_prolong_round_trip(name, shape, seed):
    g = torch.Generator().manual_seed(seed)
    s_H = torch.randn(*shape, 3, 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(restrict_stencil(prolong_stencil(s_H, name), name), s_H, rtol=0, atol=1e-12)
    s_h = torch.randn(*shape, 3, 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(prolong_stencil(restrict_stencil(s_h, name), name), s_h, rtol=0, atol=1e-11)


def test_paper_example_1():
    """Haber et al. 2018, Example 1: the printed fine stencil restricts to the printed coarse one (2 decimals)."""
    s_h = torch.tensor([[-0.89, -2.03, 4.30], [-2.07, 0.00, -2.07], [4.39, -2.03, 1.28]], dtype=torch.float64)
    s_H_paper = torch.tensor([[-0.48, -0.17, 0.82], [-0.15, -0.80, 0.37], [0.84, 0.40, 0.07]], dtype=torch.float64)
    s_H = restrict_stencil(s_h, "linear")
    assert (s_H - s_H_paper).abs().max() <= 0.0101  # the printed s_h is itself rounded to 2 decimals


# The numbers of docs/methods/resolution.md ("condition number 26.9 for linear, 10.2 for constant").
STATED_CONDITION = {"linear": 26.9, "constant": 10.2}


@pytest.mark.parametrize("name", OPS)
def test_galerkin_system_is_well_posed(name):
    M = galerkin_map(name)
    assert M.shape == (9, 9)
    assert torch.linalg.matrix_rank(M) == 9
    # the stated condition number to the digit stated, from the singular values of the probed map
    sv = torch.linalg.svdvals(M)
    assert galerkin_condition(name) == pytest.approx(float(sv[0] / sv[-1]), rel=1e-12)
    assert round(galerkin_condition(name), 1) == STATED_CONDITION[name]
    assert transfer_facts(name) == {"name": name, "rp_identity": TRANSFERS.get(name).rp_identity,
                                    "cond": galerkin_condition(name)}
    # constant images: the coarse stencil sums to the fine one (R and P keep constants)
    s = torch.randn(3, 3, dtype=torch.float64)
    assert restrict_stencil(s, name).sum().item() == pytest.approx(s.sum().item(), abs=1e-12)


def test_float32_weights_keep_their_dtype():
    w = torch.randn(4, 4, 3, 3)
    assert restrict_stencil(w).dtype == torch.float32 and prolong_stencil(w).dtype == torch.float32


@pytest.mark.parametrize("name, fine_identity_checkerboard_gain", [("linear", 9.0), ("constant", 1.0)])
def test_prolonged_identity_stencil(name, fine_identity_checkerboard_gain):
    """What the transfer analysis of docs/results.md rests on: with full weighting (R P a blur) the stencil
    prolongation of the coarse identity is a sharpening stencil, gain 1 on constants and 9 on the
    finest (checkerboard) mode, and its restriction a blur; with blocks (R P = I) it stays the identity."""
    identity = torch.zeros(1, 1, 3, 3, dtype=torch.float64)
    identity[0, 0, 1, 1] = 1.0
    fine = prolong_stencil(identity, name)[0, 0]
    checkerboard = torch.tensor([[1.0, -1, 1], [-1, 1, -1], [1, -1, 1]], dtype=torch.float64)
    assert float(fine.sum()) == pytest.approx(1.0, abs=1e-12)
    assert float((fine * checkerboard).sum()) == pytest.approx(fine_identity_checkerboard_gain, abs=1e-10)
    if name == "linear":
        expected = torch.tensor([[0.25, -1, 0.25], [-1, 4, -1], [0.25, -1, 0.25]], dtype=torch.float64)
        torch.testing.assert_close(fine, expected, rtol=0, atol=1e-10)
        blur = torch.tensor([[1.0, 6, 1], [6, 36, 6], [1, 6, 1]], dtype=torch.float64) / 64  # (1/8, 3/4, 1/8)^2
        torch.testing.assert_close(restrict_stencil(identity, name)[0, 0], blur, rtol=0, atol=1e-12)
    else:
        torch.testing.assert_close(fine, identity[0, 0], rtol=0, atol=1e-10)
