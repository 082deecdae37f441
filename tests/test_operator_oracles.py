"""Image, stencil, time and data operators checked against oracles that do not call them.

Each oracle here is either a dense matrix built entry by entry, in plain Python, from the formula in
the module's docstring (bilinear P and full weighting R, the block pair, the truncated Gaussian with
replicated edges, a 3x3 stencil's convolution matrix, bilinear resampling with half-pixel centres,
piecewise-linear interpolation in time), or an identity the mathematics fixes (a normalised symmetric
kernel keeps constants and linear images, its second moment is sigma^2 up to the stated 3-sigma
truncation; bilinear P reproduces linear functions; full weighting keeps constants with its stated
boundary rule; R = P^T / 4; normalisation statistics recomputed with math.fsum on the train split).
None of them calls the operator under test (or a sibling from the same module) to make its expected
value, so a bug that changes an operator consistently everywhere still fails here.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from msnet.config import DatasetConfig
from msnet.core import ModelSpec, StageSpec, build_model
from msnet.data import DataBundle, load_raw, prepare_data
from msnet.multigrid import (
    data_for_size, gaussian_blur, get_transfer, level_data, prolong_stencil, resample_images, restrict_images,
    restrict_stencil, transfer_resolution,
)
from msnet.multigrid.levels import level_name, restriction_count
from msnet.multigrid.time import (
    prolong_constant, prolong_in_time, prolong_linear, restrict_average, restrict_in_time, restrict_injection,
)

pytestmark = pytest.mark.usefixtures("one_thread")

D = torch.float64


# --------------------------------------------------------------------------------------------------------------
# hand-built dense operators (plain Python loops over the formulas in the docstrings)
# --------------------------------------------------------------------------------------------------------------

def linear_p1(n: int) -> torch.Tensor:
    """1D bilinear prolongation n -> 2n: fine 2k = coarse k, fine 2k+1 = (coarse k + coarse k+1) / 2 (zero past n-1)."""
    P = [[0.0] * n for _ in range(2 * n)]
    for k in range(n):
        P[2 * k][k] = 1.0
        P[2 * k + 1][k] = 0.5
        if k + 1 < n:
            P[2 * k + 1][k + 1] = 0.5
    return torch.tensor(P, dtype=D)


def linear_r1(n: int) -> torch.Tensor:
    """1D full weighting 2n -> n from its stencil (1/4, 1/2, 1/4) centred on fine 2k; fine -1 is zero padding."""
    R = [[0.0] * (2 * n) for _ in range(n)]
    for k in range(n):
        for offset, weight in ((-1, 0.25), (0, 0.5), (1, 0.25)):
            i = 2 * k + offset
            if 0 <= i < 2 * n:
                R[k][i] += weight
    return torch.tensor(R, dtype=D)


def constant_p1(n: int) -> torch.Tensor:
    """1D block copy n -> 2n: fine 2k and 2k+1 both hold coarse k."""
    P = [[0.0] * n for _ in range(2 * n)]
    for k in range(n):
        P[2 * k][k] = P[2 * k + 1][k] = 1.0
    return torch.tensor(P, dtype=D)


def constant_r1(n: int) -> torch.Tensor:
    """1D block average 2n -> n."""
    R = [[0.0] * (2 * n) for _ in range(n)]
    for k in range(n):
        R[k][2 * k] = R[k][2 * k + 1] = 0.5
    return torch.tensor(R, dtype=D)


PAIRS_1D = {"linear": (linear_p1, linear_r1), "constant": (constant_p1, constant_r1)}


def dense_2d(m1: torch.Tensor, m2: torch.Tensor) -> torch.Tensor:
    """The operator X -> m1 X m2^T on row-major vec(X), entry by entry: A[(I,J),(i,j)] = m1[I,i] m2[J,j]."""
    out = torch.zeros(m1.shape[0] * m2.shape[0], m1.shape[1] * m2.shape[1], dtype=D)
    for I in range(m1.shape[0]):
        for i in range(m1.shape[1]):
            if m1[I, i] != 0:
                out[I * m2.shape[0] : (I + 1) * m2.shape[0], i * m2.shape[1] : (i + 1) * m2.shape[1]] = m1[I, i] * m2
    return out


def apply_sep(m_rows: torch.Tensor, m_cols: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """m_rows X m_cols^T on every (B, C) image of x."""
    return torch.einsum("ia,bcaj,kj->bcik", m_rows, x, m_cols)


def gaussian_1d(n: int, sigma: float) -> torch.Tensor:
    """1D smoothing matrix of the docstring: weights exp(-t^2 / (2 sigma^2)) for |t| <= radius = max(1, round(3 sigma)),
    normalised to sum 1, the image's edge pixel standing in for every pixel beyond the edge (replicate)."""
    radius = max(1, int(round(3 * sigma)))
    raw = [math.exp(-t * t / (2.0 * sigma * sigma)) for t in range(-radius, radius + 1)]
    total = math.fsum(raw)
    G = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for t, w in zip(range(-radius, radius + 1), raw):
            G[i][min(max(i + t, 0), n - 1)] += w / total
    return torch.tensor(G, dtype=D)


def conv_matrix(s: torch.Tensor, n: int) -> torch.Tensor:
    """Dense (n^2, n^2) matrix of conv2d(., s, padding=1) for one 3x3 stencil s (cross-correlation, zero padding):
    (K y)[i, j] = sum_{a,b} s[a, b] y[i + a - 1, j + b - 1]."""
    A = torch.zeros(n * n, n * n, dtype=D)
    for i in range(n):
        for j in range(n):
            for a in range(3):
                for b in range(3):
                    ii, jj = i + a - 1, j + b - 1
                    if 0 <= ii < n and 0 <= jj < n:
                        A[i * n + j, ii * n + jj] += float(s[a, b])
    return A


def bilinear_resize_1d(n_in: int, n_out: int) -> torch.Tensor:
    """Half-pixel-centred resampling n_in -> n_out (align_corners=False): output i sits at source coordinate
    (i + 1/2) n_in / n_out - 1/2. Upsampling: the tent of half-width 1 there, edge clamped. Downsampling
    (antialiased): the tent widened to half-width n_in / n_out, weights renormalised over the pixels that exist."""
    scale = n_in / n_out
    M = [[0.0] * n_in for _ in range(n_out)]
    for i in range(n_out):
        c = (i + 0.5) * scale - 0.5
        if scale <= 1:
            c = min(max(c, 0.0), n_in - 1.0)
            lo = int(math.floor(c))
            hi = min(lo + 1, n_in - 1)
            w = c - lo
            M[i][lo] += 1 - w
            M[i][hi] += w
        else:
            ws = [max(0.0, 1 - abs(j - c) / scale) for j in range(n_in)]
            total = math.fsum(ws)
            M[i] = [w / total for w in ws]
    return torch.tensor(M, dtype=D)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D)


OPS = ("linear", "constant")


def test_hand_built_pairs_are_what_the_docstring_says():
    """The oracles themselves: R = P^T / 4 in 2D (P^T / 2 in 1D) for both pairs; the block pair has R P = I."""
    for p1, r1 in PAIRS_1D.values():
        torch.testing.assert_close(r1(5), p1(5).T / 2, rtol=0, atol=0)
    torch.testing.assert_close(constant_r1(4) @ constant_p1(4), torch.eye(4, dtype=D), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------------------
# image transfer pairs (space.py)
# --------------------------------------------------------------------------------------------------------------

@settings(max_examples=20, deadline=None)
@given(name=st.sampled_from(OPS), h=st.integers(1, 6), w=st.integers(1, 6), seed=st.integers(0, 2**31 - 1))
def test_transfer_pair_is_the_hand_built_dense_operator(name, h, w, seed):
    """P and R on (B, C, h, w) images equal the matrices built from the docstring's formulas, non-square included."""
    op = get_transfer(name)
    p1, r1 = PAIRS_1D[name]
    y = rand(2, 3, h, w, seed=seed)
    torch.testing.assert_close(op.prolong(y), apply_sep(p1(h), p1(w), y), rtol=0, atol=1e-14)
    x = rand(2, 3, 2 * h, 2 * w, seed=seed + 1)
    torch.testing.assert_close(op.restrict(x), apply_sep(r1(h), r1(w), x), rtol=0, atol=1e-14)
    # R = P^T / 4 as dense 2D matrices: <R x, y> = <x, P y> / 4
    lhs = (op.restrict(x) * y).sum()
    rhs = (x * op.prolong(y)).sum() / 4
    assert float(lhs - rhs) == pytest.approx(0.0, abs=1e-12 * (1 + float(lhs.abs())))


def test_full_weighting_keeps_constants_with_its_boundary_rule():
    """R 1 = 1 except on the first row and column (the zero-padded fine pixel -1 is missing): 3/4 there, 9/16 at
    the corner. The block average keeps constants everywhere."""
    ones = torch.ones(1, 1, 12, 10, dtype=D)
    want = torch.ones(1, 1, 6, 5, dtype=D)
    want[..., 0, :] *= 0.75
    want[..., :, 0] *= 0.75
    torch.testing.assert_close(get_transfer("linear").restrict(ones), want, rtol=0, atol=1e-15)
    torch.testing.assert_close(get_transfer("constant").restrict(ones), torch.ones(1, 1, 6, 5, dtype=D), rtol=0, atol=0)


@settings(max_examples=15, deadline=None)
@given(a=st.floats(-3, 3), b=st.floats(-3, 3), c=st.floats(-3, 3), n=st.integers(3, 7))
def test_bilinear_prolongation_reproduces_linear_functions(a, b, c, n):
    """Coarse samples of f(X, Y) = a + b X + c Y on the vertex grid X = 2k go to f at every fine pixel, except the
    last row and column (the fine pixel past the last coarse one interpolates towards zero)."""
    k = torch.arange(n, dtype=D)
    coarse = (a + b * 2 * k[:, None] + c * 2 * k[None, :]).expand(1, 1, n, n)
    i = torch.arange(2 * n, dtype=D)
    fine = a + b * i[:, None] + c * i[None, :]
    got = get_transfer("linear").prolong(coarse)[0, 0]
    torch.testing.assert_close(got[:-1, :-1], fine[:-1, :-1], rtol=0, atol=1e-12)
    # and the block pair copies: piecewise constant on 2x2 blocks
    blocks = get_transfer("constant").prolong(coarse)[0, 0]
    torch.testing.assert_close(blocks, coarse[0, 0].repeat_interleave(2, 0).repeat_interleave(2, 1), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------------------
# Galerkin stencil map (space.py): R A_h P from the stencil's convolution matrix
# --------------------------------------------------------------------------------------------------------------

@settings(max_examples=12, deadline=None)
@given(name=st.sampled_from(OPS), n=st.integers(3, 6), seed=st.integers(0, 2**31 - 1))
def test_galerkin_stencil_is_the_dense_product_r_a_p(name, n, seed):
    """K_H = R A_h P with A_h the fine stencil's convolution matrix and R, P built by hand: its rows for coarse
    pixels away from the boundary are the rows of the coarse stencil's convolution matrix. Both directions: for
    the restricted stencil of a random fine one, and for the prolonged stencil of a random coarse one."""
    p1, r1 = PAIRS_1D[name]
    P, R = dense_2d(p1(n), p1(n)), dense_2d(r1(n), r1(n))
    interior = [i * n + j for i in range(1, n - 1) for j in range(1, n - 1)]
    s_h = rand(3, 3, seed=seed)
    galerkin = R @ conv_matrix(s_h, 2 * n) @ P
    A_H = conv_matrix(restrict_stencil(s_h, name), n)
    torch.testing.assert_close(A_H[interior], galerkin[interior], rtol=0, atol=1e-12)
    s_H = rand(3, 3, seed=seed + 1)
    galerkin = R @ conv_matrix(prolong_stencil(s_H, name), 2 * n) @ P
    torch.testing.assert_close(galerkin[interior], conv_matrix(s_H, n)[interior], rtol=0, atol=1e-10)


def test_stencil_map_acts_on_every_leading_index():
    """Weights (c_out, c_in, 3, 3): each 3x3 slice moves on its own (the dense oracle, slice by slice)."""
    n = 4
    P, R = dense_2d(linear_p1(n), linear_p1(n)), dense_2d(linear_r1(n), linear_r1(n))
    interior = [i * n + j for i in range(1, n - 1) for j in range(1, n - 1)]
    w = rand(2, 3, 3, 3, seed=5)
    moved = restrict_stencil(w, "linear")
    for o in range(2):
        for c in range(3):
            want = (R @ conv_matrix(w[o, c], 2 * n) @ P)[interior]
            torch.testing.assert_close(conv_matrix(moved[o, c], n)[interior], want, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------------------------------------------
# Gaussian smoothing before restriction (network.py)
# --------------------------------------------------------------------------------------------------------------

SIGMAS = (0.6, 0.8, 1.0, 1.3, 1.7, 2.2)  # 3 sigma never a half-integer: round() is unambiguous


@settings(max_examples=20, deadline=None)
@given(sigma=st.sampled_from(SIGMAS), h=st.integers(1, 14), w=st.integers(1, 14), seed=st.integers(0, 2**31 - 1))
def test_gaussian_blur_is_the_hand_built_truncated_gaussian(sigma, h, w, seed):
    """Separable, weights exp(-t^2 / 2 sigma^2) normalised over |t| <= round(3 sigma), edges replicated: the dense
    matrix built from that sentence, down to images smaller than the kernel."""
    x = rand(2, 2, h, w, seed=seed)
    torch.testing.assert_close(gaussian_blur(x, sigma), apply_sep(gaussian_1d(h, sigma), gaussian_1d(w, sigma), x),
                               rtol=0, atol=1e-13)


@pytest.mark.parametrize("sigma", SIGMAS)
def test_gaussian_blur_moments(sigma):
    """Zeroth moment 1 (constants kept everywhere, replicate padding), first 0 (linear images kept in the interior),
    second sigma^2 up to the 3-sigma truncation and the sampling (between 0.97 and 1.0 sigma^2 for these sigmas:
    the continuous Gaussian cut at 3 sigma keeps 0.973 of it), read off the blur of X^2 and Y^2 in the interior."""
    n = 40
    r = max(1, int(round(3 * sigma)))
    inner = (slice(None), slice(None), slice(r, n - r), slice(r, n - r))
    const = torch.full((1, 1, n, n), 2.5, dtype=D)
    torch.testing.assert_close(gaussian_blur(const, sigma), const, rtol=0, atol=1e-14)
    i = torch.arange(n, dtype=D)
    X, Y = i[:, None].expand(n, n), i[None, :].expand(n, n)
    lin = (1.0 + 0.5 * X - 0.25 * Y)[None, None]
    torch.testing.assert_close(gaussian_blur(lin, sigma)[inner], lin[inner], rtol=0, atol=1e-12)
    for f in (X, Y):
        q = (f ** 2)[None, None]
        m2 = gaussian_blur(q, sigma)[inner] - q[inner]
        assert float(m2.std()) < 1e-9  # the same kernel everywhere in the interior
        assert 0.97 * sigma**2 <= float(m2.mean()) <= 1.0 * sigma**2, (sigma, float(m2.mean()) / sigma**2)
    # smoothing both directions the same way: it commutes with transposing the image
    x = rand(1, 1, 16, 16, seed=1)
    torch.testing.assert_close(gaussian_blur(x.transpose(-1, -2), sigma), gaussian_blur(x, sigma).transpose(-1, -2),
                               rtol=0, atol=1e-14)


def test_source_smoothing_is_the_gaussians_of_the_finer_grids():
    """msnet transfer's smoothing of images `levels` finer than the source level: Gaussians of std sigma * 2^i fine
    pixels (i = 0 .. levels-1), each the hand-built matrix."""
    from msnet.tasks.transfer import source_smoothing

    x = rand(2, 1, 24, 24, seed=3)
    want = x
    for s in (0.8, 1.6):
        want = apply_sep(gaussian_1d(24, s), gaussian_1d(24, s), want)
    torch.testing.assert_close(source_smoothing(2, 0.8)(x), want, rtol=0, atol=1e-13)


@pytest.mark.parametrize("name,sigma", [("linear", 1.0), ("linear", 0.6), ("linear", 0.0), ("constant", 0.8)])
def test_restrict_images_is_blur_then_r_on_each_level(name, sigma):
    """The paper's coarse images: on every level, the Gaussian of std sigma pixels of that level's grid, then R
    (both hand-built); two levels 16 -> 8 -> 4, non-square 16x12 -> 8x6 -> 4x3."""
    _, r1 = PAIRS_1D[name]
    x = rand(2, 3, 16, 12, seed=7)
    want = x
    for h, w in ((16, 12), (8, 6)):
        if sigma > 0:
            want = apply_sep(gaussian_1d(h, sigma), gaussian_1d(w, sigma), want)
        want = apply_sep(r1(h // 2), r1(w // 2), want)
    torch.testing.assert_close(restrict_images(x, 2, name, sigma), want, rtol=0, atol=1e-13)


# --------------------------------------------------------------------------------------------------------------
# levels.py: every split restricted the same way; sizes and names
# --------------------------------------------------------------------------------------------------------------

def _bundle(size=8, channels=2):
    return DataBundle("hand", rand(5, channels, size, size, seed=1), torch.arange(5), rand(3, channels, size, size, seed=2),
                      torch.arange(3), rand(4, channels, size, size, seed=3), torch.arange(4), 5,
                      torch.zeros(channels), torch.ones(channels))


@pytest.mark.parametrize("name,sigma,down", [("linear", 0.8, 1), ("constant", 0.0, 2), ("linear", 0.0, 1)])
def test_level_data_restricts_every_split_alike(name, sigma, down):
    data = _bundle()
    out = level_data(data, down, name, sigma)
    _, r1 = PAIRS_1D[name]
    for split in ("train", "val", "test"):
        want, n = getattr(data, f"x_{split}"), 8
        for _ in range(down):
            if sigma > 0:
                want = apply_sep(gaussian_1d(n, sigma), gaussian_1d(n, sigma), want)
            n //= 2
            want = apply_sep(r1(n), r1(n), want)
        torch.testing.assert_close(getattr(out, f"x_{split}"), want, rtol=0, atol=1e-13, msg=split)
        assert torch.equal(getattr(out, f"y_{split}"), getattr(data, f"y_{split}"))


def test_data_for_size_uses_the_runs_operator_and_smoothing():
    """A run trained with +pyramid=2level_block (constant pair, no smoothing) evaluates on 2x2 block averages."""
    data = _bundle()
    cfg = OmegaConf.create({"pyramid": {"operator": "constant", "sigma": 0.0}})
    out = data_for_size(data, (4, 4), cfg, "test")
    torch.testing.assert_close(out.x_test, data.x_test.reshape(4, 2, 4, 2, 4, 2).mean(dim=(3, 5)), rtol=0, atol=1e-15)
    default = data_for_size(data, (4, 4), None, "test")  # no pyramid: linear, sigma 1
    want = apply_sep(linear_r1(4), linear_r1(4), apply_sep(gaussian_1d(8, 1.0), gaussian_1d(8, 1.0), data.x_val))
    torch.testing.assert_close(default.x_val, want, rtol=0, atol=1e-13)
    assert restriction_count((28, 28), (7, 7)) == 2 and restriction_count((28, 28), (6, 6)) is None
    assert restriction_count((16, 8), (16, 8)) == 0 and restriction_count((16, 8), (4, 2)) == 2
    assert [level_name(k) for k in range(5)] == ["fine", "coarse", "coarser", "down3", "down4"]


# --------------------------------------------------------------------------------------------------------------
# resample_images (network.py): the bilinear baseline
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size_in,size_out", [((8, 8), (16, 16)), ((16, 12), (8, 6)), ((16, 16), (4, 4)),
                                              ((6, 6), (9, 9))])
def test_resample_images_is_half_pixel_bilinear(size_in, size_out):
    x = rand(2, 1, *size_in, seed=4)
    want = apply_sep(bilinear_resize_1d(size_in[0], size_out[0]), bilinear_resize_1d(size_in[1], size_out[1]), x)
    torch.testing.assert_close(resample_images(x, size_out), want, rtol=0, atol=1e-12)
    assert resample_images(x, size_in) is x


# --------------------------------------------------------------------------------------------------------------
# whole-network transfer (network.py) against the dense Galerkin product
# --------------------------------------------------------------------------------------------------------------

def test_network_restriction_is_dense_galerkin_and_classifier_moves_by_dense_r():
    torch.manual_seed(0)
    fine = build_model(ModelSpec(1, 3, (8, 8), [StageSpec(2, 2, 1.0)])).double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in fine.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=D))
    coarse = transfer_resolution(fine, -1, "linear")
    n = 4
    P, R = dense_2d(linear_p1(n), linear_p1(n)), dense_2d(linear_r1(n), linear_r1(n))
    interior = [i * n + j for i in range(1, n - 1) for j in range(1, n - 1)]
    pairs = [(fine.opening.weight, coarse.opening.weight)]
    pairs += list(zip(fine.blocks[0].params["K"], coarse.blocks[0].params["K"]))
    for K_h, K_H in pairs:
        for o in range(K_h.shape[0]):
            for c in range(K_h.shape[1]):
                want = (R @ conv_matrix(K_h[o, c].detach(), 2 * n) @ P)[interior]
                torch.testing.assert_close(conv_matrix(K_H[o, c].detach(), n)[interior], want, rtol=0, atol=1e-12)
    W_h, W_H = fine.classifier.field_weights.detach(), coarse.classifier.field_weights.detach()
    torch.testing.assert_close(W_H, apply_sep(linear_r1(n), linear_r1(n), W_h), rtol=0, atol=1e-12)
    torch.testing.assert_close(coarse.classifier.mu, fine.classifier.mu, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------------------
# time.py: per-step parameters as functions of t, against exact rational interpolation
# --------------------------------------------------------------------------------------------------------------

def linear_in_time_oracle(theta, m):
    """The docstring's rule in exact arithmetic: theta'(t'_i), t'_i = i T/m, piecewise linear through (j T/n, theta_j),
    held at theta_{n-1} past t_{n-1}."""
    n = len(theta)
    out = []
    for i in range(m):
        pos = Fraction(i * n, m)  # t'_i in units of the old step
        j = math.floor(pos)
        if j >= n - 1:
            out.append(theta[n - 1])
        else:
            w = pos - j
            out.append(theta[j] * (1 - w) + theta[j + 1] * w)
    return out


@settings(max_examples=40, deadline=None)
@given(theta=st.lists(st.integers(-50, 50), min_size=1, max_size=7), m=st.integers(1, 20))
def test_time_prolongations_match_exact_interpolation_for_every_depth(theta, m):
    """Any N -> M, not only doubling (a depth schedule may go 3 -> 4 or 3 -> 8 steps)."""
    n = len(theta)
    exact = [Fraction(v) for v in theta]
    t = torch.tensor(theta, dtype=D)
    want = torch.tensor([float(v) for v in linear_in_time_oracle(exact, m)], dtype=D)
    torch.testing.assert_close(prolong_linear(t, m), want, rtol=0, atol=1e-12)
    consts = [theta[math.floor(Fraction(i * n, m))] for i in range(m)]
    assert prolong_constant(t, m).tolist() == [float(v) for v in consts]


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 7), m=st.integers(1, 24), a=st.floats(-2, 2), b=st.floats(-2, 2), T=st.floats(0.5, 3))
def test_linear_prolongation_reproduces_linear_in_time_controls(n, m, a, b, T):
    """theta_j = a + b t_j on the old left ends goes to a + b t'_i on the new ones up to t_{N-1}, and to its last
    value after (with a trailing (2, 3) parameter shape)."""
    tj = torch.arange(n, dtype=D) * T / n
    theta = (a + b * tj).view(n, 1, 1).expand(n, 2, 3)
    ti = torch.arange(m, dtype=D) * T / m
    want = a + b * torch.minimum(ti, torch.tensor((n - 1) * T / n, dtype=D))
    got = prolong_linear(theta, m)
    assert got.shape == (m, 2, 3)
    torch.testing.assert_close(got, want.view(m, 1, 1).expand(m, 2, 3), rtol=0, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 6), r=st.integers(1, 4), seed=st.integers(0, 2**31 - 1))
def test_time_restrictions_against_loops(n, r, seed):
    """Injection keeps fine slice j r; average is the mean of slices j r .. j r + r - 1 (loops); both keep constants,
    and average restriction of a linear-in-t control is its value at the mean of the fine left ends."""
    fine = rand(n * r, 2, seed=seed)
    inj = torch.stack([fine[j * r] for j in range(n)])
    avg = torch.stack([sum(fine[j * r + q] for q in range(r)) / r for j in range(n)])
    assert torch.equal(restrict_injection(fine, n), inj)
    torch.testing.assert_close(restrict_average(fine, n), avg, rtol=0, atol=1e-14)
    const = torch.full((n * r, 3), 1.25, dtype=D)
    torch.testing.assert_close(restrict_average(const, n), torch.full((n, 3), 1.25, dtype=D), rtol=0, atol=1e-15)
    assert torch.equal(restrict_injection(const, n), torch.full((n, 3), 1.25, dtype=D))
    i = torch.arange(n * r, dtype=D)
    lin = 0.5 + 2.0 * i
    want = 0.5 + 2.0 * (torch.arange(n, dtype=D) * r + (r - 1) / 2)
    torch.testing.assert_close(restrict_average(lin, n), want, rtol=0, atol=1e-12)
    # the dict wrappers a network move uses apply the same operators to every per-step tensor
    params = {"K": fine, "b": const}
    moved = restrict_in_time(params, n, "average")
    torch.testing.assert_close(moved["K"], avg, rtol=0, atol=1e-14)
    up = prolong_in_time({"K": fine}, 2 * n * r + 1, "linear")["K"]
    want_up = [linear_in_time_oracle([fine[j, c].item() for j in range(n * r)], 2 * n * r + 1) for c in range(2)]
    torch.testing.assert_close(up, torch.tensor(want_up, dtype=D).T, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------------------------------------------
# data/: normalisation with train statistics, pixel order of loaded images
# --------------------------------------------------------------------------------------------------------------

def dcfg(**kw):
    return OmegaConf.structured(DatasetConfig(**kw))


def _stats(values):
    """Mean and sample (n - 1) standard deviation with math.fsum."""
    mean = math.fsum(values) / len(values)
    var = math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var)


def test_normalisation_uses_train_statistics_only_per_channel():
    """mean/std per channel over the train split only (not validation, not test), recomputed from the raw uint8
    images with math.fsum; every split normalised with them. The split is the documented one: validation = the
    first val_size of a permutation seeded with split_seed."""
    cfg = dcfg(name="synthetic", n_train=60, n_test=20, val_size=25, image_size=6, channels=3)
    data = prepare_data(cfg, torch.device("cpu"), dtype=D)
    raw = load_raw(cfg)
    perm = torch.randperm(60, generator=torch.Generator().manual_seed(0)).tolist()
    val_idx, train_idx = perm[:25], perm[25:]
    for c in range(3):
        values = [raw.x_train[i, c].double().flatten().tolist() for i in train_idx]
        mean, std = _stats([v / 255.0 for row in values for v in row])
        assert float(data.mean[c]) == pytest.approx(mean, rel=1e-12, abs=1e-12)
        assert float(data.std[c]) == pytest.approx(std, rel=1e-12)
        for split, images, idx in (("train", raw.x_train, train_idx), ("val", raw.x_train, val_idx),
                                   ("test", raw.x_test, list(range(20)))):
            want = torch.stack([(images[i, c].double() / 255.0 - mean) / std for i in idx])
            torch.testing.assert_close(getattr(data, f"x_{split}")[:, c], want, rtol=0, atol=1e-12, msg=split)
    assert data.y_train.tolist() == [int(raw.y_train[i]) for i in train_idx]
    assert data.y_val.tolist() == [int(raw.y_train[i]) for i in val_idx]


def test_npz_colour_images_keep_their_pixel_order(tmp_path):
    """An (n, H, W, C) npz image becomes (n, C, H, W) with x[i, c, h, w] = array[i, h, w, c]: checked pixel by pixel
    on square images (where a transposed image has the right shape)."""
    rng = np.random.default_rng(0)
    arrays = dict(x_train=rng.integers(0, 256, (6, 4, 4, 3), dtype=np.uint8), y_train=rng.integers(0, 3, 6),
                  x_test=rng.integers(0, 256, (2, 4, 4, 3), dtype=np.uint8), y_test=rng.integers(0, 3, 2))
    np.savez(tmp_path / "c.npz", **arrays)
    raw = load_raw(dcfg(name="npz", path=str(tmp_path / "c.npz")))
    a = arrays["x_test"]
    for i in range(2):
        for c in range(3):
            for h in range(4):
                for w in range(4):
                    assert int(raw.x_test[i, c, h, w]) == int(a[i, h, w, c])
    grey = dict(arrays, x_train=arrays["x_train"][..., 0], x_test=arrays["x_test"][..., 0])
    np.savez(tmp_path / "g.npz", **grey)
    raw = load_raw(dcfg(name="npz", path=str(tmp_path / "g.npz")))
    assert raw.x_train.shape == (6, 1, 4, 4) and torch.equal(raw.x_train[:, 0], torch.as_tensor(grey["x_train"]))
