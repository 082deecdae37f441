"""Prolongation and restriction of images, and of 3x3 stencils between image resolutions.

Grid convention (both registered pairs): a fine image of n x n pixels (n even) and a
coarse one of n/2 x n/2. The operators act channel by channel on ``(B, C, H, W)``.

``linear`` (the paper's choice, the default) is vertex-centred: coarse pixel k sits on
fine pixel 2k. P is bilinear interpolation (fine 2k+1 is the mean of coarse k and k+1;
values beyond the last coarse pixel count as zero, like the convolutions' zero
padding) and R is full weighting, R = P^T / 4 in 2D (the stencil [1 2 1]^T [1 2 1] / 16).
R P is not a multiple of I: it is the coarse smoother (1/8, 3/4, 1/8) in each
direction, so R P 1 = 1 in the interior (constants are kept) and gamma = 1 on them.

``constant`` is cell-centred: coarse pixel k covers fine pixels 2k and 2k+1. P copies
each coarse value into its 2x2 block and R averages the block, R = P^T / 4 and
R P = I exactly (gamma = 1).

For both pairs the Galerkin operator K_H = R K_h P of a 3x3 convolution K_h is again a
3x3 convolution away from the boundary, so stencil restriction is a fixed linear map
s_H = M s_h on the nine stencil entries (Haber, Ruthotto, Holtham, Jun, "Learning
across scales", AAAI 2018, eq. 9; Trottenberg, Oosterlee, Schuller, *Multigrid*, 2000,
sec. 3.3 and App. A.2). M is built once per pair by probing (:func:`galerkin_map`),
and prolongation of a stencil solves the 9x9 system M s_h = s_H.
"""

from __future__ import annotations

from functools import lru_cache
from typing import ClassVar, Dict

import torch
import torch.nn.functional as F

from msnet.errors import MsnetError
from msnet.registry import Registry


class AbstractImageTransfer:
    """A prolongation/restriction pair between an n x n and an n/2 x n/2 grid."""

    name: ClassVar[str]
    rp_identity: ClassVar[bool]
    """Whether R P = I exactly (else only on constants)."""

    def restrict(self, y: torch.Tensor) -> torch.Tensor:
        """R y: ``(B, C, H, W)`` -> ``(B, C, H/2, W/2)``."""
        raise NotImplementedError

    def prolong(self, y: torch.Tensor) -> torch.Tensor:
        """P y: ``(B, C, h, w)`` -> ``(B, C, 2h, 2w)``."""
        raise NotImplementedError


TRANSFERS: Registry[type[AbstractImageTransfer]] = Registry("image transfer")


def _depthwise(kernel: torch.Tensor, channels: int, like: torch.Tensor) -> torch.Tensor:
    return kernel.to(dtype=like.dtype, device=like.device).expand(channels, 1, *kernel.shape).contiguous()


def _check_even(y: torch.Tensor) -> None:
    if y.shape[-1] % 2 or y.shape[-2] % 2:
        raise MsnetError(f"cannot restrict a {y.shape[-2]}x{y.shape[-1]} image: both sides must be even")


@TRANSFERS.register("linear")
class LinearTransfer(AbstractImageTransfer):
    """Bilinear interpolation P and full weighting R = P^T/4 (vertex-centred; see module docstring)."""

    name = "linear"
    rp_identity = False
    _w = torch.tensor([1.0, 2.0, 1.0])
    KERNEL = torch.outer(_w, _w)  # P's weights are KERNEL / 4, R's are KERNEL / 16

    def restrict(self, y: torch.Tensor) -> torch.Tensor:
        _check_even(y)
        c = y.shape[1]
        return F.conv2d(y, _depthwise(self.KERNEL / 16, c, y), stride=2, padding=1, groups=c)

    def prolong(self, y: torch.Tensor) -> torch.Tensor:
        c = y.shape[1]
        return F.conv_transpose2d(y, _depthwise(self.KERNEL / 4, c, y), stride=2, padding=1, output_padding=1, groups=c)


@TRANSFERS.register("constant")
class ConstantTransfer(AbstractImageTransfer):
    """Piecewise-constant P (2x2 blocks) and block averaging R = P^T/4; R P = I (cell-centred)."""

    name = "constant"
    rp_identity = True

    def restrict(self, y: torch.Tensor) -> torch.Tensor:
        _check_even(y)
        return F.avg_pool2d(y, 2)

    def prolong(self, y: torch.Tensor) -> torch.Tensor:
        return y.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)


def get_transfer(name: str) -> AbstractImageTransfer:
    """An instance of the registered image transfer ``name``."""
    return TRANSFERS.get(name)()


@lru_cache(maxsize=None)
def _galerkin_map(name: str) -> torch.Tensor:
    op = get_transfer(name)
    m = 8  # coarse probe grid; the centre is far enough from the boundary
    c = m // 2
    delta = torch.zeros(1, 1, m, m, dtype=torch.float64)
    delta[0, 0, c, c] = 1.0
    fine = op.prolong(delta)
    M = torch.zeros(9, 9, dtype=torch.float64)
    for q in range(9):
        s = torch.zeros(1, 1, 3, 3, dtype=torch.float64)
        s.view(-1)[q] = 1.0
        coarse = op.restrict(F.conv2d(fine, s, padding=1))[0, 0]
        window = coarse[c - 1 : c + 2, c - 1 : c + 2]
        if abs(coarse.abs().sum() - window.abs().sum()) > 1e-12:
            raise AssertionError(f"Galerkin operator of {name!r} is not a 3x3 stencil")
        # K_H delta_c = sum_a s_H[a] delta_{c - (a - 1)}: read the window flipped.
        M[:, q] = window.flip(0, 1).reshape(-1)
    return M


def galerkin_map(name: str = "linear") -> torch.Tensor:
    """The 9x9 float64 matrix M with vec(s_H) = M vec(s_h) for K_H = R K(s_h) P (row-major stencils).

    Stencils follow PyTorch's ``conv2d`` (cross-correlation): (K(s) y)[i, j] =
    sum_{a,b} s[a, b] y[i + a - 1, j + b - 1].
    """
    return _galerkin_map(name).clone()


def galerkin_condition(name: str = "linear") -> float:
    """2-norm condition number of the 9x9 system solved by :func:`prolong_stencil`."""
    return float(torch.linalg.cond(_galerkin_map(name)))


def restrict_stencil(weight: torch.Tensor, op: str = "linear") -> torch.Tensor:
    """Coarse stencils s_H = M s_h for a weight tensor ``(..., 3, 3)`` (any leading shape)."""
    if weight.shape[-2:] != (3, 3):
        raise MsnetError(f"stencil transfer needs 3x3 kernels, got {tuple(weight.shape[-2:])}")
    M = _galerkin_map(op).to(device=weight.device, dtype=weight.dtype)
    return (weight.reshape(-1, 9) @ M.T).reshape(weight.shape)


def prolong_stencil(weight: torch.Tensor, op: str = "linear") -> torch.Tensor:
    """The unique fine stencils s_h whose Galerkin restriction is ``weight`` ``(..., 3, 3)``."""
    if weight.shape[-2:] != (3, 3):
        raise MsnetError(f"stencil transfer needs 3x3 kernels, got {tuple(weight.shape[-2:])}")
    M = _galerkin_map(op)
    flat = weight.reshape(-1, 9).to(torch.float64)
    fine = torch.linalg.solve(M.to(flat.device), flat.T).T
    return fine.to(weight.dtype).reshape(weight.shape)


def transfer_facts(name: str) -> Dict[str, object]:
    """Name, whether R P = I, and the condition number of the stencil system."""
    cls = TRANSFERS.get(name)
    return {"name": name, "rp_identity": cls.rp_identity, "cond": galerkin_condition(name)}
