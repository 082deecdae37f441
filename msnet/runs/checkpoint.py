"""The checkpoint format, and its one owner: written atomically, read with ``torch.load(weights_only=True)``.

A checkpoint is a dict of plain data and tensors. :func:`make_payload` is the only function
that builds one (training, ``msnet transfer``); :data:`KEYS` lists every key it can hold
(a test compares it with what the trainer and transfer write); :func:`load_network` rebuilds
the network from the file alone and :func:`restore` does the whole preamble a command needs
(file, config, device, dtype, threads, network).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from msnet.config import upgrade_config
from msnet.errors import MsnetError
from msnet.version import __version__
from msnet.core import ModelSpec, build_model, resolve_device, resolve_dtype

FORMAT = "msnet-checkpoint/1"
REQUIRED = ("format", "model_spec", "model", "config", "epoch")

KEYS: Dict[str, str] = {
    "format": f'"{FORMAT}"',
    "msnet_version": "the msnet version that wrote the file",
    "model_spec": "ModelSpec.to_dict(): enough to rebuild the network from the file alone",
    "model": "the network's state_dict",
    "config": "the resolved run config (plain dict); a transferred network's has its new level / layers",
    "epoch": "epochs completed, over all levels",
    "optimizer": "the (finest) optimiser's state_dict, or None (BCD, transferred networks)",
    "scheduler": "the learning-rate scheduler's state_dict, or None",
    "bcd": "optimizer=bcd only: {damping, iterations}",
    "mgopt": "trainer=mgopt only: the coarse levels' optimiser/scheduler states and the hierarchy's depths",
    "rmtr": "trainer=rmtr only: per level its trust-region radius, L-SR1 pairs and counters; the sample window k "
            "and the growth rule's counters; the hierarchy's depths",
    "rng": '{"torch": ByteTensor, "data": ByteTensor, "cuda": [ByteTensor]} (cuda only where a GPU was seen); '
           'DDP runs add "ranks": [{"torch", "cuda"}] per rank, each rank\'s own stream',
    "history": "the metrics records written so far (list of dicts; [] for a transferred network)",
    "resolution": "[H, W] of the images the network works on",
    "depth": "layers per stage",
    "level": 'the schedule level the network is at: "fine" (native resolution), "coarse", "coarser", "downK"',
    "level_index": "training only: index of that level in the schedule",
    "level_epoch": "training only: epochs completed within that level",
    "levels": "training only: the summaries of the levels finished so far",
    "schedule": "training only: every level of the run's schedule (Level.to_dict())",
    "transferred_from": "msnet transfer only: {checkpoint, level or depth, operator[, stencils]}",
}
"""Every key :func:`make_payload` may write, with what it holds."""

RULE_KEYS = ("optimizer", "scheduler", "bcd", "mgopt", "rmtr")
"""The keys an update rule's ``state_dict()`` may fill."""


def make_payload(
    model: torch.nn.Module,
    config: Mapping[str, Any] | DictConfig,
    *,
    epoch: int,
    level: str,
    rule_state: Optional[Mapping[str, Any]] = None,
    rng: Optional[Mapping[str, Any]] = None,
    history: Sequence[Mapping[str, Any]] = (),
    position: Optional[tuple[int, int]] = None,
    levels: Optional[Iterable[Mapping[str, Any]]] = None,
    schedule: Optional[Iterable[Mapping[str, Any]]] = None,
    transferred_from: Optional[Mapping[str, Any]] = None,
) -> Dict[str, Any]:
    """The checkpoint of ``model`` (an ``ODEResNet``): the one place that builds one.

    ``rule_state``: the update rule's ``state_dict()`` (keys from :data:`RULE_KEYS`; None:
    no optimiser state); ``position``: ``(level_index, level_epoch)`` within a training
    schedule; ``levels`` / ``schedule``: the finished levels' summaries and the schedule;
    ``transferred_from``: where ``msnet transfer`` moved the network from.
    """
    state = dict(rule_state) if rule_state is not None else {"optimizer": None, "scheduler": None}
    unknown = sorted(set(state) - set(RULE_KEYS))
    if unknown:
        raise ValueError(f"update-rule state keys {unknown} are not in the checkpoint format (RULE_KEYS)")
    payload: Dict[str, Any] = {
        "model_spec": model.spec.to_dict(),
        "model": model.state_dict(),
        "config": (OmegaConf.to_container(config, resolve=True, enum_to_str=True) if isinstance(config, DictConfig)
                   else dict(config)),
        "epoch": int(epoch),
        **state,
        "rng": dict(rng) if rng is not None else {},
        "history": list(history),
        "resolution": list(model.spec.image_size),
        "depth": model.depth(),
        "level": level,
    }
    if position is not None:
        payload["level_index"], payload["level_epoch"] = int(position[0]), int(position[1])
    if levels is not None:
        payload["levels"] = list(levels)
    if schedule is not None:
        payload["schedule"] = list(schedule)
    if transferred_from is not None:
        payload["transferred_from"] = dict(transferred_from)
    return payload


def save_checkpoint(path: str | os.PathLike, payload: Dict[str, Any]) -> Path:
    """Write ``payload`` to ``path`` atomically: a temp file in the same folder, fsync, ``os.replace``.

    A crash mid-write leaves the previous checkpoint intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "msnet_version": __version__, **payload}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_checkpoint(path: str | os.PathLike | None, map_location: Any = "cpu") -> Dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``; every failure is one :class:`MsnetError` line."""
    if path is None or str(path) in ("", "None", "null"):
        raise MsnetError("no checkpoint given; pass ckpt=PATH (runs keep theirs in RUN_DIR/checkpoints/last.pt)")
    p = Path(str(path)).expanduser()
    if not p.exists():
        raise MsnetError(f"checkpoint {p} does not exist; runs keep theirs in RUN_DIR/checkpoints/last.pt")
    if p.is_dir():
        candidate = p / "checkpoints" / "last.pt"
        if candidate.is_file():
            p = candidate
        else:
            raise MsnetError(f"{p} is a folder without checkpoints/last.pt; pass the .pt file itself")
    try:
        ckpt = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "Weights only load failed" in str(err):
            raise MsnetError(
                f"{p} holds Python objects that safe loading (weights_only=True) refuses; "
                "it was not written by msnet, pass a checkpoint from msnet train"
            ) from None
        raise MsnetError(
            f"checkpoint {p} is truncated or not a torch file ({first[:120]}); "
            "use another checkpoint, e.g. the run's checkpoints/last.pt"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise MsnetError(f"{p} is not an msnet checkpoint (no '{FORMAT}' header); pass a file written by msnet train")
    missing = [k for k in REQUIRED if k not in ckpt]
    if missing:
        raise MsnetError(f"checkpoint {p} lacks {', '.join(missing)}; it is damaged, use another one")
    if isinstance(ckpt.get("config"), dict):
        ckpt["config"] = upgrade_config(ckpt["config"])  # once, here: every reader sees today's keys
    ckpt["path"] = str(p)
    return ckpt


def load_model_state(model: torch.nn.Module, ckpt: Dict[str, Any]) -> None:
    """Load a checkpoint's weights into ``model``; a mismatch is one :class:`MsnetError` line."""
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        detail = " ".join(str(err).split())[:160]
        raise MsnetError(
            f"checkpoint {ckpt.get('path')} does not fit this model ({detail}); "
            "rebuild the model from the checkpoint (drop model overrides) or start a new run"
        ) from None


def saved_spec(ckpt: Dict[str, Any]) -> ModelSpec:
    """The :class:`ModelSpec` a checkpoint describes; damage is one :class:`MsnetError` line."""
    try:
        return ModelSpec.from_dict(ckpt["model_spec"])
    except TypeError as err:
        raise MsnetError(f"checkpoint {ckpt['path']} has a damaged model_spec ({err}); use another checkpoint") from None


def load_network(ckpt: Dict[str, Any], device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Rebuild the network a checkpoint describes (spec and weights) on ``device`` in ``dtype``."""
    model = build_model(saved_spec(ckpt)).to(device=device, dtype=dtype)
    load_model_state(model, ckpt)
    return model


@dataclass
class Restored:
    """A checkpoint read back for a command: the file's dict, its config, the rebuilt network."""

    ckpt: Dict[str, Any]
    config: DictConfig
    model: torch.nn.Module
    device: torch.device
    dtype: torch.dtype

    @property
    def path(self) -> str:
        return self.ckpt["path"]


def restore(path: Any, device: str = "auto", threads: Optional[int] = None) -> Restored:
    """Read ``path`` and rebuild its network on ``device`` (``auto``, ``cpu``, ``cuda[:K]``) in the saved dtype.

    ``threads``: torch CPU threads for what follows (None: torch's default). Every failure
    is one :class:`MsnetError` line.
    """
    if threads:
        torch.set_num_threads(int(threads))
    ckpt = load_checkpoint(path)
    config = OmegaConf.create(ckpt["config"])
    dev = resolve_device(device)
    dtype = resolve_dtype(config.get("dtype", "float32"))
    return Restored(ckpt, config, load_network(ckpt, dev, dtype), dev, dtype)


def checkpoint_keys(ckpt: Dict[str, Any]) -> List[str]:
    """The format keys a loaded checkpoint holds (``path``, added on loading, left out)."""
    return [k for k in ckpt if k != "path"]
