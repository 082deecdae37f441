"""The paper's derivative-based regularisers (Haber et al. 2018, Sec. 4; Haber & Ruthotto 2017).

* classifier smoothness: ||grad w||^2_{L2} of the classifier functions on the unit square,
  discretised with forward differences: h^d sum |(W_{i+1} - W_i) / h|^2 = sum |W_{i+1} - W_i|^2
  in 2D (h^d = h^2), summed over classes, channels and both directions;
* smoothness in time of the propagation parameters: sum_k ||theta_{k+1} - theta_k||^2 / h over
  every per-step tensor of every stage (stencils and biases), the discrete
  integral of ||d theta / dt||^2.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from msnet.errors import MsnetError
from msnet.core import ODEResNet
from msnet.core.network import FullFieldClassifier


def classifier_smoothness(model: ODEResNet) -> torch.Tensor:
    """sum |W_{i+1,j} - W_{i,j}|^2 + |W_{i,j+1} - W_{i,j}|^2 over the full-field classifier's W."""
    W = model.classifier.field_weights
    return (W[..., 1:, :] - W[..., :-1, :]).pow(2).sum() + (W[..., :, 1:] - W[..., :, :-1]).pow(2).sum()


def time_smoothness(model: ODEResNet) -> torch.Tensor:
    """sum over stages and per-step tensors of sum_k ||theta_{k+1} - theta_k||^2 / h."""
    total = torch.zeros((), device=next(model.parameters()).device, dtype=next(model.parameters()).dtype)
    for block in model.blocks:
        for p in block.step_parameters().values():
            if p.shape[0] > 1:
                total = total + (p[1:] - p[:-1]).pow(2).sum() / block.h
    return total


def build_regularizer(model: ODEResNet, cfg: Any) -> Optional[Callable[[], torch.Tensor]]:
    """The weighted penalty ``() -> scalar`` the config asks for, or None when every weight is 0."""
    a, b = float(cfg.classifier_smoothness), float(cfg.stencil_smoothness)
    if a < 0 or b < 0:
        raise MsnetError("regularizer weights must be >= 0")
    if a > 0 and not isinstance(model.classifier, FullFieldClassifier):
        raise MsnetError(
            "regularizer.classifier_smoothness needs the full-field classifier; set model.classifier=full_field"
        )
    if a == 0 and b == 0:
        return None

    def penalty() -> torch.Tensor:
        out = 0.0
        if a > 0:
            out = out + a * classifier_smoothness(model)
        if b > 0:
            out = out + b * time_smoothness(model)
        return out

    return penalty
