"""The ``msnet`` dispatcher: picks the subcommand and hands the rest of argv to its Hydra main.

Hydra owns argv, so the dispatcher only rewrites it: ``msnet train a=1 -m`` runs
the train app with ``a=1 -m``; positional conveniences become overrides
(``msnet report DIR`` -> ``dir=DIR``, ``msnet evaluate PATH`` -> ``ckpt=PATH``).
``-m``, ``--cfg job`` and ``--help`` keep working because Hydra sees them as usual.
"""

from __future__ import annotations

import importlib
import os
import shutil
import sys
import tempfile
from typing import List, Optional

COMMANDS = {
    "train": ("msnet.commands.train", "train an ODE-ResNet (Hydra overrides; -m for sweeps)"),
    "evaluate": ("msnet.commands.evaluate", "evaluate a checkpoint: msnet evaluate ckpt=PATH"),
    "transfer": ("msnet.commands.transfer", "move a network between resolutions: msnet transfer --from coarse --to fine ckpt=PATH"),
    "report": ("msnet.commands.report", "tabulate every run under a folder: msnet report DIR [--group-by KEYS]"),
}
POSITIONAL = {"report": "dir", "evaluate": "ckpt", "transfer": "ckpt"}
OPTIONS = {
    "transfer": {"--from": "source", "--to": "target", "--from-depth": "source_depth", "--to-depth": "target_depth"},
    "report": {"--group-by": "group_by"},
}
"""Flags that become overrides: ``--from coarse`` / ``--from=coarse`` -> ``source=coarse`` (``from`` is a keyword)."""
LISTS = {"report": {"group_by"}}
"""List options that also take a bare comma list: ``--group-by a,b`` / ``group_by=a,b`` -> ``group_by=[a,b]``."""
FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                    "--config-dir", "-cd", "--experimental-rerun", "--info", "-i"}


def usage() -> str:
    lines = ["usage: msnet COMMAND [overrides...]", "", "commands:"]
    lines += [f"  {name:<10} {text}" for name, (_, text) in COMMANDS.items()]
    lines += [
        "",
        "examples:",
        "  msnet train                                   # Fashion-MNIST, paper-style ODE-ResNet",
        "  msnet train model.layers=8 optimizer=sgd optimizer.lr=0.1 dataset=mnist",
        "  msnet train -m model.layers=2,4 seed=0,1       # a sweep: one run directory per job",
        "  msnet train --cfg job                         # show the composed config",
        "  msnet evaluate ckpt=outputs/train/DATE/TIME/checkpoints/last.pt",
        "  msnet report multirun/train/DATE/TIME",
        "  msnet train -m hydra/launcher=joblib seed=0,1,2 model.layers=2,4 threads=1   # jobs in parallel",
        "  msnet report multirun/train/DATE/TIME --group-by model.layers   # mean ± std over seeds",
        "  msnet train -m hydra/sweeper=optuna 'optimizer.lr=tag(log, interval(1e-4, 1e-1))' hydra.sweeper.n_trials=20",
        "                                                # an Optuna study of trainer.objective (best_val_acc)",
        "  msnet train level=coarse                      # train on 14x14 Fashion-MNIST",
        "  msnet train +pyramid=2level                   # coarse-to-fine: 14x14, then 28x28",
        "  msnet transfer --from coarse --to fine ckpt=PATH [native=PATH]",
        "  msnet train +depth=doubling                   # shallow-to-deep: 2, 4, 8, 16 layers",
        "  msnet transfer --from-depth 8 --to-depth 16 ckpt=PATH",
        "",
        "msnet COMMAND --help lists the config groups and options of a command.",
        "From Python: import msnet; msnet.train(['model.layers=8', 'trainer.epochs=1']) returns the run's summary.",
    ]
    return "\n".join(lines)


def quote(value: str) -> str:
    """Quote a path for Hydra's override grammar (``'a b'``; a path holding ``'`` goes in double quotes)."""
    if "'" not in value:
        return f"'{value}'"
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def rewrite(command: str, args: List[str]) -> List[str]:
    """Turn the subcommand's flags and positional argument (if it has them) into overrides."""
    options = OPTIONS.get(command, {})
    args = list(args)
    converted: List[str] = []
    i = 0
    while i < len(args):
        flag, _, inline = args[i].partition("=")
        if flag in options:
            if inline:
                value = inline
            elif i + 1 < len(args):
                i += 1
                value = args[i]
            else:
                example = "model.layers,optimizer" if flag == "--group-by" else "coarse"
                raise SystemExit(f"error: {flag} needs a value, e.g. {flag} {example}")
            converted.append(f"{options[flag]}={value}")
        else:
            converted.append(args[i])
        key, eq, value = converted[-1].partition("=")
        if eq and key in LISTS.get(command, ()) and not value.startswith("["):
            converted[-1] = f"{key}=[{value}]"
        i += 1
    args = converted
    key = POSITIONAL.get(command)
    if key is None:
        return args
    out, skip = [], False
    for a in args:
        if skip:
            out.append(a)
            skip = False
            continue
        if a in FLAGS_WITH_VALUE:
            skip = True
            out.append(a)
        elif not a.startswith("-") and "=" not in a:
            out.append(f"{key}={quote(a)}")
        else:
            out.append(a)
    return out


def main(argv: Optional[List[str]] = None) -> None:
    """Entry point of the ``msnet`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}; choose one of: {', '.join(COMMANDS)} (msnet --help)", file=sys.stderr)
        raise SystemExit(2)
    module = importlib.import_module(COMMANDS[command][0])
    sys.argv = [f"msnet {command}", *rewrite(command, rest)]
    scratch = rank_scratch(command)
    if scratch:
        sys.argv += [f"hydra.run.dir={scratch}", "hydra.output_subdir=null"]
    from msnet.commands import composition_errors_as_lines

    try:
        with composition_errors_as_lines():
            module.main()
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)


def rank_scratch(command: str) -> Optional[str]:
    """Under torchrun, a temporary output directory for ranks > 0 of ``msnet train`` (None otherwise).

    Hydra makes a run directory per process; rank 0's is the run's (msnet/training/distributed.py),
    the others' go here and are removed when the rank exits, so no stray run folders are left.
    """
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if command != "train" or world < 2 or rank == 0:
        return None
    return tempfile.mkdtemp(prefix=f"msnet-rank{rank}-hydra-")


if __name__ == "__main__":
    main()
