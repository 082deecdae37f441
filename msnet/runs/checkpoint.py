"""Self-describing checkpoints: written atomically, read with ``torch.load(weights_only=True)``.

A checkpoint is a dict of plain data and tensors:

    format        "msnet-checkpoint/1"
    model_spec    ModelSpec.to_dict(): enough to rebuild the network from the file alone
    model         the network's state_dict
    config        the resolved run config (plain dict)
    epoch         epochs completed
    optimizer     the optimiser's state_dict (or None)
    scheduler     the LR scheduler's state_dict (or None)
    rng           {"torch": ByteTensor, "cuda": [ByteTensor] , "data": ByteTensor}
    history       the metrics records written so far (list of dicts)
    resolution    [H, W] of the images the model was trained at
    depth         layers per stage
    level         name of the level in a schedule ("single" for plain training)
    msnet_version
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Dict

import torch

from msnet import MsnetError, __version__

FORMAT = "msnet-checkpoint/1"
REQUIRED = ("format", "model_spec", "model", "config", "epoch")


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
    ckpt["path"] = str(p)
    return ckpt
