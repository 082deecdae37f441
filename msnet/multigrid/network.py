"""Whole-network transfer between image resolutions (Haber et al. 2018, Sec. 3 and Alg. 1).

Every 3x3 kernel of the network (the opening layer and every per-step stencil of every
stage) is a discretised operator on the image grid, so it moves by Galerkin
restriction s_H = M s_h or by the stencil prolongation that inverts it. Biases,
per-step scalars and 1x1 connectives are constant in space and move unchanged. The
full-field classifier's W (function samples on the last stage's grid) moves like an
image: W_H = R W_h, W_h = P W_H, which keeps h^d W^T y the same L2 inner product
(with R = P^T / 4 and y_h = P y_H, h_h^d W_h^T P y_H = h_H^d (R W_h)^T y_H).
A global-average-pool classifier does not depend on the grid and moves unchanged.

Transposed convolutions with a stencil (K^T) move with the same map, since for
R = P^T/4 the Galerkin operator of K^T is the transpose of the Galerkin operator of K.
"""

from __future__ import annotations

import copy
from typing import Tuple

import torch

from msnet.errors import MsnetError
from msnet.core import ODEResNet, build_model
from msnet.core.network import FullFieldClassifier
from msnet.multigrid.space import get_transfer, prolong_stencil, restrict_stencil


def _is_stencil(name: str, tensor: torch.Tensor) -> bool:
    return tensor.dim() >= 2 and tuple(tensor.shape[-2:]) == (3, 3) and not name.startswith("classifier.")


def transfer_resolution(model: ODEResNet, levels: int, op: str = "linear") -> ODEResNet:
    """A new network for images ``2**levels`` times finer (levels > 0) or coarser (levels < 0).

    ``model`` is left untouched. Raises :class:`MsnetError` if the image (or the last
    stage's grid) cannot be halved that often.
    """
    if levels == 0:
        return copy.deepcopy(model)
    spec = copy.deepcopy(model.spec)
    h, w = spec.image_size
    factor = 2 ** abs(levels)
    if levels < 0:
        shrink = factor * 2 ** (len(spec.stages) - 1)
        if h % shrink or w % shrink:
            raise MsnetError(
                f"cannot restrict a {h}x{w} network {abs(levels)} time(s) with {len(spec.stages)} stage(s): "
                f"{h}x{w} must be divisible by {shrink}; use fewer levels"
            )
        spec.image_size = (h // factor, w // factor)
    else:
        spec.image_size = (h * factor, w * factor)
    target = build_model(spec).to(device=next(model.parameters()).device, dtype=next(model.parameters()).dtype)
    move = prolong_stencil if levels > 0 else restrict_stencil
    state = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("classifier."):
            continue
        t = tensor
        if _is_stencil(name, tensor):
            for _ in range(abs(levels)):
                t = move(t, op)
        state[name] = t
    src_clf, dst_clf = model.classifier, target.classifier
    if isinstance(src_clf, FullFieldClassifier):
        W = src_clf.field_weights.detach()
        image_op = get_transfer(op)
        for _ in range(abs(levels)):
            W = image_op.prolong(W) if levels > 0 else image_op.restrict(W)
        dst_clf.set_field_weights(W)
        state["classifier.mu"] = src_clf.mu.detach()
        state["classifier.V"] = dst_clf.V.detach()
    else:
        state.update({k: v for k, v in model.state_dict().items() if k.startswith("classifier.")})
    target.load_state_dict(state)
    return target


def restrict_images(x: torch.Tensor, levels: int, op: str = "linear", sigma: float = 1.0) -> torch.Tensor:
    """Coarse images as the paper makes them: Gaussian smoothing (std ``sigma`` fine pixels), then R.

    ``x`` is ``(B, C, H, W)``; each level halves H and W. ``sigma = 0`` skips the smoothing.
    """
    transfer = get_transfer(op)
    for _ in range(levels):
        if sigma > 0:
            x = gaussian_blur(x, sigma)
        x = transfer.restrict(x)
    return x


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian smoothing of ``(B, C, H, W)`` images, radius 3 sigma, edge values replicated."""
    radius = max(1, int(round(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    padded = torch.nn.functional.pad(x, (radius, radius, radius, radius), mode="replicate")
    y = torch.nn.functional.conv2d(padded, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return torch.nn.functional.conv2d(y, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def resample_images(x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Bilinear resampling of ``(B, C, H, W)`` images to ``size`` (the baseline a user would reach for)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    antialias = size[0] < x.shape[-2]
    return torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=antialias)


def transfer_depth(model: ODEResNet, layers: "int | list[int]", prolongation: str = "linear",
                   restriction: str = "injection") -> ODEResNet:
    """A new network whose stages have ``layers`` steps each (an int for all, or one per stage), same T.

    Deeper stages get their per-step parameters by ``prolongation`` in time, shallower
    ones by ``restriction`` (see :mod:`msnet.multigrid.time`); everything else is copied.
    Fails with one line if the integrator has no per-step parameters to move.
    """
    from msnet.core import INTEGRATORS
    from msnet.multigrid.time import prolong_in_time, restrict_in_time

    targets = [int(layers)] * len(model.blocks) if isinstance(layers, int) else [int(x) for x in layers]
    if len(targets) != len(model.blocks) or min(targets) < 1:
        raise MsnetError(f"need one positive depth per stage ({len(model.blocks)} stages), got {layers}")
    integrator = INTEGRATORS.get(model.spec.integrator)
    if not integrator.per_step_params:
        raise MsnetError(
            f"integrator {model.spec.integrator!r} has no per-step parameters to move in time; "
            "depth schedules need an integrator with per_step_params"
        )
    out = copy.deepcopy(model)
    for block, m in zip(out.blocks, targets):
        n = block.layers
        params = block.step_parameters()
        if m > n:
            block.set_step_parameters(prolong_in_time(params, m, prolongation))
        elif m < n:
            block.set_step_parameters(restrict_in_time(params, m, restriction))
    out.sync_spec()
    return out
