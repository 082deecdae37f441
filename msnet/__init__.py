"""msnet: deep residual networks read as discretised ODEs.

The numerical core lives in :mod:`msnet.core` (no Hydra, no file I/O); the
command line in :mod:`msnet.cli`; the Python entry point in :mod:`msnet.api`:

    import msnet
    summary = msnet.train(["model.layers=8", "trainer.epochs=1"])

``import msnet`` stays cheap: Hydra and torch are imported when a function is called.
"""

from os import PathLike as _OsPath
from typing import Any, Dict, List, Optional, Sequence, Union

from msnet.errors import MsnetError
from msnet.version import __version__

PathLike = Union[str, _OsPath]

__all__ = ["MsnetError", "PathLike", "__version__", "evaluate", "train", "transfer"]


def train(overrides: Sequence[str] = (), *, run_dir: Optional[PathLike] = None) -> Dict[str, Any]:
    """``msnet train OVERRIDES`` from Python: the same config, the same run folder; returns the run's summary.

    Raises :class:`MsnetError` for bad input. See :func:`msnet.api.train`.
    """
    from msnet.api import train as _train

    return _train(overrides, run_dir=run_dir)


def evaluate(overrides: Sequence[str] = (), *, ckpt: Optional[PathLike] = None,
             run_dir: Optional[PathLike] = None) -> List[Dict[str, Any]]:
    """``msnet evaluate ckpt=PATH OVERRIDES`` from Python; one record per split. See :func:`msnet.api.evaluate`."""
    from msnet.api import evaluate as _evaluate

    return _evaluate(overrides, ckpt=ckpt, run_dir=run_dir)


def transfer(overrides: Sequence[str] = (), *, ckpt: Optional[PathLike] = None, source: Optional[str] = None,
             target: Optional[str] = None, source_depth: Optional[int] = None, target_depth: Optional[int] = None,
             run_dir: Optional[PathLike] = None) -> List[Dict[str, Any]]:
    """``msnet transfer --from SOURCE --to TARGET ckpt=PATH`` from Python; the table's rows. See :func:`msnet.api.transfer`."""
    from msnet.api import transfer as _transfer

    return _transfer(overrides, ckpt=ckpt, source=source, target=target, source_depth=source_depth,
                     target_depth=target_depth, run_dir=run_dir)
