"""GPU speed options for the network a first-order update rule calls: bf16 autocast, channels_last, torch.compile.

``trainer.precision=bf16`` runs the forward pass (and so its backward) under
``torch.autocast(dtype=torch.bfloat16)``: convolutions and matrix products in bfloat16
(8 bits of mantissa, relative rounding 2^-8 = 0.4 %), reductions and the loss in float32;
the weights, gradients and optimiser state stay float32 and the logits are returned as
float32. Needs ``dtype=float32``. CPU autocast supports it too (slowly), which is how it is
tested here.

``trainer.channels_last`` stores 4-D weights and feeds the images in NHWC order, which is
what cuDNN's tensor-core convolutions prefer; every later state inherits the layout.
``null`` (auto) turns it on on CUDA only; ``true``/``false`` force it (``true`` also works on
the CPU, tested for equal results).

``trainer.compile=true`` wraps the network (after DDP, if any) in ``torch.compile`` (inductor).
The first batches of every level pay the compilation (tens of seconds; a new level has new
shapes), and stochastic depth recompiles for each new pattern of dropped steps (the gates
are Python floats in the graph), so prefer eager mode with it.

``trainer.reversible_tf32`` (default false): reversible stages (``model.backprop=reversible``)
run their convolutions in IEEE float32 on CUDA, so that the states they rebuild, and so the
gradients, agree with stored-activation backprop to float32 round-off; ``true`` lets them use
TF32 like the rest of the network (:func:`msnet.core.network.set_reversible_tf32`). Under
bf16 a reversible stage keeps its state in float32 and its backward replays the forward's
autocast (:class:`msnet.core.reversible.PrecisionState`), so bf16 needs no special case.

Evaluation (validation, test) always runs the plain float32 network in eager mode.
A CPU run needs none of these: the defaults (fp32, no compile, auto layout) change nothing there.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn

from msnet.errors import MsnetError
from msnet.core.network import set_reversible_tf32
from msnet.training import distributed
from msnet.training.distributed import DistEnv
from msnet.methods.base import UpdateRule

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}
"""``trainer.precision`` (:class:`~msnet.config.Precision`) -> the autocast dtype of the forward pass (None: no autocast)."""


def check(cfg: Any, rule: type[UpdateRule]) -> None:
    """Fail with one line if the speed options do not fit the config and its update ``rule`` (before data is loaded)."""
    tr = cfg.trainer
    precision = tr.get("precision", "fp32")  # a Precision: the schema has refused other values
    if precision != "fp32" and cfg.dtype != "float32":
        raise MsnetError(f"trainer.precision={precision} needs dtype=float32 (got dtype={cfg.dtype})")
    wanted = [k for k, on in (("trainer.compile=true", tr.get("compile")),
                              (f"trainer.precision={precision}", precision != "fp32"),
                              ("trainer.channels_last=true", tr.get("channels_last") is True)) if on]
    if wanted and not rule.speed_options:
        raise MsnetError(
            f"{' and '.join(wanted)} apply to first-order optimizers only, not {rule.selected_by}="
            f"{cfg[rule.selected_by].name}; drop them"
        )


def use_channels_last(option: Optional[bool], device: torch.device) -> bool:
    """``trainer.channels_last``: None (auto) means on CUDA only."""
    return device.type == "cuda" if option is None else bool(option)


class Forward(nn.Module):
    """The network as the update rule calls it: images in ``memory_format``, forward under autocast.

    ``x`` ``(B, C, H, W)`` -> logits ``(B, classes)`` in float32 (the loss is then computed in
    float32 even when the network ran in bfloat16). Holds ``net``'s parameters, nothing else.
    """

    def __init__(self, net: nn.Module, device_type: str, autocast: Optional[torch.dtype], channels_last: bool):
        super().__init__()
        self.net, self.device_type, self.autocast, self.channels_last = net, device_type, autocast, channels_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.autocast is None:
            return self.net(x)
        with torch.autocast(self.device_type, dtype=self.autocast):
            out = self.net(x)
        return out.float()


def to_channels_last(model: nn.Module) -> None:
    """Give every 4-D parameter NHWC strides in place (``Module.to`` refuses the 5-D per-step stencils)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 4:
                p.data = p.data.contiguous(memory_format=torch.channels_last)


def prepare_update(update: UpdateRule, model: nn.Module, cfg: Any, env: DistEnv, device: torch.device) -> UpdateRule:
    """Point a :class:`FirstOrder` rule at ``model`` as the run wants it: layout, autocast, DDP, compile.

    Called once per level (new parameter shapes). ``model`` stays the plain network the
    trainer evaluates and checkpoints; with ``channels_last`` its 4-D weights change layout
    in place (:func:`to_channels_last`; same Parameter objects, so the optimiser still holds them). Other rules are
    returned as they are (:func:`check` and :func:`msnet.training.distributed.check` refused
    the options they cannot take). ``trainer.reversible_tf32`` reaches every rule's model.
    """
    set_reversible_tf32(model, bool(cfg.trainer.get("reversible_tf32", False)))
    if not update.speed_options:
        return update
    tr = cfg.trainer
    autocast = PRECISIONS[tr.get("precision", "fp32")]
    channels_last = use_channels_last(tr.get("channels_last"), device)
    net: nn.Module = model
    if channels_last:
        to_channels_last(model)
    if channels_last or autocast is not None:
        net = Forward(model, device.type, autocast, channels_last)
    net = distributed.wrap(net, env, device, find_unused=model.spec.stochastic_depth.p_last < 1.0)
    if tr.get("compile"):
        net = torch.compile(net)
    update.model = net
    return update
