"""``evaluate_checkpoint``: rebuild a network from its checkpoint alone and measure it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig

from msnet.errors import MsnetError
from msnet.config import check_known_keys
from msnet.data import prepare_data
from msnet.multigrid import data_for_size
from msnet.runs import RunConsole, RunDir, load_checkpoint, restore
from msnet.runs.display import records_table
from msnet.training.evaluation import evaluate


def evaluate_checkpoint(cfg: DictConfig, run_dir: Optional[str | Path] = None, console: Optional[RunConsole] = None) -> List[Dict[str, Any]]:
    """Evaluate ``cfg.ckpt`` on ``cfg.splits``; returns one record per split (loss, acc, n).

    The dataset config comes from the checkpoint; every non-null ``cfg.dataset.<key>``
    replaces the saved value. Results go to ``run_dir/evaluation.json`` when given.
    """
    console = console or RunConsole()
    check_known_keys(cfg)
    restored = restore(cfg.ckpt, cfg.device, cfg.get("threads"))
    ckpt, saved, model = restored.ckpt, restored.config, restored.model
    data_cfg = saved.dataset
    for key, value in (cfg.dataset or {}).items():
        if value is not None:
            data_cfg[key] = value
    spec = model.spec
    data = prepare_data(data_cfg, restored.device, restored.dtype)
    if data.in_channels != spec.in_channels:
        raise MsnetError(
            f"checkpoint {ckpt['path']} expects {spec.in_channels}-channel images but {data.name} has "
            f"{data.in_channels}; evaluate on the dataset it was trained on"
        )
    data = data_for_size(data, tuple(spec.image_size), saved, f"checkpoint {ckpt['path']}")
    records = []
    for split in cfg.splits:
        x, y = data.split(str(split))
        m = evaluate(model, x, y, int(cfg.batch_size))
        records.append({"split": str(split), "loss": m["loss"], "acc": m["acc"], "n": int(len(y))})
    console.print(
        f"[bold]msnet evaluate[/bold]  {ckpt['path']}  (epoch {ckpt['epoch']}, {data.name} "
        f"{data.image_size[0]}x{data.image_size[1]}, depth {ckpt.get('depth')})"
    )
    shown = [{**r, "acc": f"{r['acc']:.2%}"} for r in records]
    console.print(records_table("evaluation", shown, ["split", "loss", "acc", "n"]))
    best = Path(ckpt["path"]).with_name("best.pt")
    if Path(ckpt["path"]).name == "last.pt" and best.is_file():
        epoch = load_checkpoint(best)["epoch"]
        if epoch != ckpt["epoch"]:
            console.print(f"this run also keeps the network of its best validation epoch ({epoch}): "
                          f"msnet evaluate ckpt={best}")
    if run_dir is not None:
        run = RunDir(run_dir)
        run.write_config(cfg)
        run.write_command()
        run.write_json("evaluation.json", {"checkpoint": ckpt["path"], "epoch": ckpt["epoch"], "results": records})
        console.save(run.path / "console.txt")
    return records
