"""Data-fitted stencil transfer: the Galerkin stencils refitted so both networks agree on data.

The Galerkin prolongation (:func:`msnet.multigrid.space.prolong_stencil`) is exact on coarse
grid functions, before the activation: R K(s_h) P = K(s_H). But a 3x3 fine stencil reaches
half as far as a 3x3 coarse one, so the unique solution oscillates (for the block pair the box
stencil prolongs to [[4, -2, 4], [-2, 1, -2], [4, -2, 4]], gain 25 on the checkerboard against
the box's 1) and amplifies everything the fine states hold that is not of the form P y_H:
the images' detail below the coarse grid, and what each tanh layer makes of it.

:func:`fit_transfer` starts from the Galerkin network and refits every 3x3 stencil and its
bias, layer by layer in the order the forward pass meets them, by ridge-regularised least
squares, so that on sample images the two networks' pre-activations agree on the coarse grid:

* prolongation (target finer):  min ||R (K(s) y_h + b) - (K(s_H) y_H + b_H)||^2 + reg
* restriction (target coarser): min ||(K(s) y_H + b) - R (K(s_h) y_h + b_h)||^2 + reg

with reg = ridge * mean(diag(A^T A)) * ||(s, b) - (s_G, b_G)||^2 pulling towards the Galerkin
values (s_G, b_G). y_h are the fine network's states on the fine images and y_H the coarse
network's on their coarse versions (the images the coarse network is trained on), each
network's own at that layer, the target's computed with its layers fitted so far; so errors
made early are corrected later. R is the transfer pair's restriction. No labels and no
gradient steps: one forward pass of each network over the sample and one
(9 C_in + 1)-square solve per layer. The classifier keeps its P / R transfer (h^d W^T y is
then consistent whenever R y_h = y_H), connectives and per-step scalars move unchanged.

It needs the paper's residual F(y) = sigma(K y + b) (``model.residual=conv_act``) under an
explicit integrator; each step's stencil is fitted at its first residual evaluation (the
only one for Euler and the linear multistep schemes).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F

from msnet.errors import MsnetError
from msnet.core import ODEResNet
from msnet.core.reversible import uses_scheme
from msnet.multigrid.space import get_transfer

STENCIL_TRANSFERS = ("galerkin", "fit")


@dataclass
class FitReport:
    """What :func:`fit_transfer` did: sample size, time, and the final-state mismatch before and after.

    ``mismatch_*`` is ||R y_h(T) - y_H(T)|| / ||y_H(T)|| over the sample (R applied to the finer
    network's final states), for the Galerkin network and for the fitted one.
    """

    images: int
    stencils: int
    seconds: float
    mismatch_galerkin: float
    mismatch_fit: float

    def to_dict(self) -> Dict[str, float]:
        return asdict(self)


def check_stencil_transfer(name: str) -> str:
    """``name`` if it is a stencil transfer msnet knows, else one clear error."""
    if name not in STENCIL_TRANSFERS:
        raise MsnetError(f"unknown stencil transfer {name!r}; choose one of: {', '.join(STENCIL_TRANSFERS)}")
    return name


def check_fittable(model: ODEResNet, key: str = "stencils") -> None:
    """Raise :class:`MsnetError` unless ``model`` has the residual and integrator the fit needs.

    ``key`` is the config key the error names as the fix (``pyramid.stencils`` for training).
    """
    spec = model.spec
    if spec.residual != "conv_act" or any(uses_scheme(b.integrator) for b in model.blocks):
        raise MsnetError(
            f"the data-fitted stencil transfer needs model.residual=conv_act with an explicit integrator, got "
            f"{spec.residual} with {spec.integrator}; use {key}=galerkin for this model"
        )


def _fit_conv(
    y: torch.Tensor, target: torch.Tensor, restrict: Callable[[torch.Tensor], torch.Tensor],
    weight: torch.Tensor, bias: torch.Tensor, ridge: float, chunk: int = 128,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """min_{w,b} ||restrict(conv3x3(y, w) + b) - target||^2 + ridge-term towards (weight, bias)."""
    cin = y.shape[1]
    k = cin * 9 + 1
    ata = torch.zeros(k, k, dtype=torch.float64, device=y.device)
    atz = torch.zeros(k, target.shape[1], dtype=torch.float64, device=y.device)
    for i in range(0, y.shape[0], chunk):
        part = y[i : i + chunk]
        b, _, h, w = part.shape
        # im2col in conv2d's order (c_in, a, b): column (c, q) is y_c shifted by stencil entry q; then the bias's 1
        cols = F.unfold(part, 3, padding=1).reshape(b, cin * 9, h, w)
        cols = restrict(torch.cat([cols, torch.ones_like(cols[:, :1])], 1))
        a = cols.permute(0, 2, 3, 1).reshape(-1, k).double()
        z = target[i : i + chunk].permute(0, 2, 3, 1).reshape(-1, target.shape[1]).double()
        ata += a.T @ a
        atz += a.T @ z
    prior = torch.cat([weight.reshape(weight.shape[0], -1), bias[:, None]], 1).double().T  # (k, c_out)
    reg = ridge * ata.diagonal().mean()
    sol = torch.linalg.solve(ata + reg * torch.eye(k, dtype=torch.float64, device=y.device), atz + reg * prior)
    return sol[:-1].T.reshape(weight.shape).to(weight.dtype), sol[-1].to(bias.dtype)


def _first_inputs(model: ODEResNet, x: torch.Tensor) -> Tuple[Dict[Tuple[int, int], torch.Tensor], torch.Tensor]:
    """Each step's first residual input ``{(stage, step): state}`` and the final features, for ``x``."""
    seen: Dict[Tuple[int, int], torch.Tensor] = {}
    with model.step_hook(lambda s: lambda j, state: seen.setdefault((s, j), state)):
        out = model.features(x)
    return seen, out


def fit_transfer(
    source: ODEResNet, target: ODEResNet, x_source: torch.Tensor, x_target: torch.Tensor,
    op: str = "linear", ridge: float = 1e-3,
) -> FitReport:
    """Refit ``target``'s stencils and biases in place (see the module docstring); ``source`` is unchanged.

    ``target`` is ``source`` moved one level by :func:`~msnet.multigrid.transfer_resolution`
    (its Galerkin values are the ridge's prior); ``x_source`` and ``x_target`` are the same
    sample images at each network's resolution.
    """
    check_fittable(source)
    check_fittable(target)
    hs, ht = source.spec.image_size[0], target.spec.image_size[0]
    if ht not in (2 * hs, hs // 2) or x_source.shape[0] != x_target.shape[0]:
        raise MsnetError("fit_transfer moves one level at a time, with the same sample images at both resolutions")
    restrict = get_transfer(op).restrict

    def ident(t: torch.Tensor) -> torch.Tensor:
        return t

    finer = ht > hs
    on_target, on_source = (restrict, ident) if finer else (ident, restrict)

    def mismatch(src_feat: torch.Tensor, tgt_feat: torch.Tensor) -> float:
        fine_f, coarse_f = (tgt_feat, src_feat) if finer else (src_feat, tgt_feat)
        return float((restrict(fine_f) - coarse_f).norm() / coarse_f.norm().clamp_min(1e-30))

    modes = (source.training, target.training)
    source.eval()
    target.eval()
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            src_inputs, src_feat = _first_inputs(source, x_source)
            before = mismatch(src_feat, target.features(x_target))
            z = on_source(source.opening(x_source))
            w, b = _fit_conv(x_target, z, on_target, target.opening.weight, target.opening.bias, ridge)
            target.opening.weight.copy_(w)
            target.opening.bias.copy_(b)
            fitted: List[Tuple[int, int]] = []

            def probe_for(s: int) -> Callable[[int, torch.Tensor], None]:
                src_block, tgt_block = source.blocks[s], target.blocks[s]

                def probe(j: int, state: torch.Tensor) -> None:
                    if (s, j) in fitted:
                        return  # a later stage of the same step (Runge-Kutta): fitted at the first
                    z = on_source(F.conv2d(src_inputs[(s, j)], src_block.params["K"][j], src_block.params["b"][j],
                                           padding=1))
                    w, b = _fit_conv(state, z, on_target, tgt_block.params["K"][j], tgt_block.params["b"][j], ridge)
                    tgt_block.params["K"][j].copy_(w)
                    tgt_block.params["b"][j].copy_(b)
                    fitted.append((s, j))

                return probe

            with target.step_hook(probe_for):
                # each step is fitted before it is evaluated, so this is the fitted network's output
                after = mismatch(src_feat, target.features(x_target))
    finally:
        source.train(modes[0])
        target.train(modes[1])
    return FitReport(images=int(x_source.shape[0]), stencils=1 + len(fitted), seconds=time.perf_counter() - t0,
                     mismatch_galerkin=before, mismatch_fit=after)


def fit_sample(n_train: int, settings: Any, seed: int) -> torch.Tensor:
    """Indices of the ``settings.fit_images`` training images the stencil fit uses (all, if fewer), drawn with ``seed``."""
    n = min(int(settings.get("fit_images", 256)), n_train)
    return torch.randperm(n_train, generator=torch.Generator().manual_seed(seed))[:n]
