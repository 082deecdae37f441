"""One evaluation pass: a network's mean loss and accuracy on a split, in chunks (what ``msnet evaluate``,
``msnet transfer`` and the level loop share; it loads neither the trainer nor any method)."""

from __future__ import annotations

from typing import Dict

import torch
import torch.nn as nn
import torch.nn.functional as F

from msnet.data import batches


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> Dict[str, float]:
    """Mean cross-entropy ``loss`` and accuracy ``acc`` (fraction in [0, 1]) of ``model`` on ``(x, y)``."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=x.device, dtype=torch.float64)
    correct = torch.zeros((), device=x.device, dtype=torch.int64)
    for xb, yb in batches(x, y, batch_size):
        logits = model(xb)
        loss_sum += F.cross_entropy(logits, yb, reduction="sum")
        correct += (logits.argmax(1) == yb).sum()
    model.train(was_training)
    n = max(1, y.shape[0])
    return {"loss": loss_sum.item() / n, "acc": correct.item() / n}
