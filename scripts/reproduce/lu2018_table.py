#!/usr/bin/env python
"""Tabulate a scripts/reproduce/lu2018.sh output folder beside Lu et al. 2018's CIFAR-10 numbers; plot the learned k_n.

    .venv/bin/python scripts/reproduce/lu2018_table.py OUT

Reads OUT/{resnet,lm,resnet_half,lm_half}/JOB/{config.yaml,summary.json,checkpoints/last.pt}
(JOB 0: stochastic depth off, JOB 1: on), prints (1) every run's test error, parameters and
time beside the paper's analogous CIFAR-10 model, (2) the three comparisons (LM vs ResNet at
equal depth, LM at half depth vs the full ResNet), and writes OUT/table.md, OUT/table.json and
OUT/k_n.png (k_n across the network's depth for every LM run).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml
from rich.console import Console
from rich.table import Table

from msnet.core import ModelSpec
from msnet.runs import load_checkpoint

ROLES = {  # role -> (label, integrator)
    "resnet": ("ResNet", "euler"),
    "lm": ("LM-ResNet", "lm"),
    "resnet_half": ("ResNet, half depth", "euler"),
    "lm_half": ("LM-ResNet, half depth", "lm"),
}

# CIFAR-10 test error (%) of the paper's models in the --full setting (n = 18 and n/2 = 9), keyed by
# (role, stochastic depth on). ResNet rows: He et al. 2016a (CVPR), Table 6 (ResNet-56 6.97,
# ResNet-110 6.43), and Huang et al. 2016 (ECCV), Table 1 (ResNet-110 with stochastic depth 5.25),
# as quoted by Lu et al. LM-ResNet rows: Lu et al. 2018, Table 1 (LM-ResNet-56, pre-activation, 6.31)
# and the stochastic-depth table (LM-ResNet-56 5.14, LM-ResNet-110 4.80), as we recall them; the
# paper's text could not be checked when this was written. None: no such CIFAR-10 number in the paper.
PAPER = {
    ("resnet", False): ("ResNet-110", 6.43),
    ("resnet", True): ("ResNet-110 + SD", 5.25),
    ("lm", False): ("LM-ResNet-110", None),
    ("lm", True): ("LM-ResNet-110 + SD", 4.80),
    ("resnet_half", False): ("ResNet-56", 6.97),
    ("resnet_half", True): ("ResNet-56 + SD", None),
    ("lm_half", False): ("LM-ResNet-56", 6.31),
    ("lm_half", True): ("LM-ResNet-56 + SD", 5.14),
}

COMPARISONS = [  # (what, role a, role b)
    ("equal depth", "resnet", "lm"),
    ("equal depth, n/2", "resnet_half", "lm_half"),
    ("LM at half depth vs full ResNet", "resnet", "lm_half"),
]


def load_runs(out: Path) -> List[Dict[str, Any]]:
    """One record per finished run: role, stochastic depth, test error, parameters, depth, k_n per stage."""
    runs = []
    for role in ROLES:
        for job in sorted((out / role).glob("*/summary.json")):
            run_dir = job.parent
            summary = json.loads(job.read_text())
            config = yaml.safe_load((run_dir / "config.yaml").read_text())
            record: Dict[str, Any] = {
                "role": role,
                "dir": str(run_dir),
                "p_last": float(config["model"]["stochastic_depth"]["p_last"]),
                "status": summary.get("status"),
                "test_err": None if summary.get("final_test_acc") is None else 100 * (1 - summary["final_test_acc"]),
                "params": summary.get("parameters"),
                "wall_s": summary.get("wall_time_s"),
                "dataset": summary.get("dataset"),
                "k": None,
            }
            ckpt_path = run_dir / "checkpoints" / "last.pt"
            if ckpt_path.exists():
                ckpt = load_checkpoint(ckpt_path)
                spec = ModelSpec.from_dict(ckpt["model_spec"])
                record["layers"] = [s.layers for s in spec.stages]
                record["depth"] = 2 * sum(record["layers"]) + 2  # 6n + 2 as He et al. count
                if spec.integrator == "lm":
                    record["k"] = [ckpt["model"][f"blocks.{s}.params.k"].tolist() for s in range(len(spec.stages))]
            runs.append(record)
    return runs


def find(runs: List[Dict[str, Any]], role: str, sd: bool) -> Optional[Dict[str, Any]]:
    """The run of ``role`` with stochastic depth on (``sd``) or off."""
    for r in runs:
        if r["role"] == role and (r["p_last"] < 1.0) == sd:
            return r
    return None


def fmt(x: Optional[float], spec: str = ".2f") -> str:
    """``x`` formatted with ``spec``, or a dash for a missing number."""
    return "—" if x is None else format(x, spec)


def plot_k(runs: List[Dict[str, Any]], path: Path) -> Optional[Path]:
    """k_n of every LM run against its position in the network, s + (j + 1/2)/N_s for step j of stage s.

    On that axis (each stage's time t/T, stages side by side) networks of different depth line up;
    stage boundaries are dashed. Returns None without LM runs.
    """
    lm_runs = [r for r in runs if r["k"]]
    if not lm_runs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in lm_runs:
        xs: List[float] = []
        ks: List[float] = []
        for s, stage in enumerate(r["k"]):  # a NaN between stages breaks the line at the boundary
            xs += [s + (j + 0.5) / len(stage) for j in range(len(stage))] + [float("nan")]
            ks += list(stage) + [float("nan")]
        label = f"{ROLES[r['role']][0]} ({r.get('depth')} layers{', SD' if r['p_last'] < 1 else ''})"
        ax.plot(xs, ks, marker="o", ms=3, label=label)
    for edge in range(1, max(len(r["k"]) for r in lm_runs)):
        ax.axvline(edge, color="grey", ls="--", lw=0.8)
    ax.axhspan(-0.1, 0.0, color="grey", alpha=0.15, label="initial range U[-0.1, 0]")
    ax.axhline(0.0, color="black", lw=0.6)
    ax.set_xlabel("position in the network: stage + t/T (dashed: stage boundaries)")
    ax.set_ylabel("learned $k_n$  ($k_n = 0$: ResNet step)")
    ax.set_title("LM-architecture: learned $k_n$ across depth")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(out: Path) -> None:
    runs = load_runs(out)
    if not runs:
        sys.exit(f"lu2018_table: no runs under {out}; run scripts/reproduce/lu2018.sh first")
    dataset = runs[0]["dataset"]
    console = Console(record=True, width=130)

    t = Table(title=f"msnet on {dataset} (test error %) beside Lu et al. 2018's CIFAR-10 models (--full setting)")
    for col in ("model", "SD", "depth", "params", "test err %", "time s", "paper model", "paper CIFAR-10 err %"):
        t.add_column(col, justify="left" if col in ("model", "paper model") else "right")
    rows = []
    for role, (label, _) in ROLES.items():
        for sd in (False, True):
            r = find(runs, role, sd)
            paper_model, paper_err = PAPER[(role, sd)]
            row = {
                "model": label, "stochastic_depth": sd, "depth": r.get("depth") if r else None,
                "params": r["params"] if r else None, "test_err": r["test_err"] if r else None,
                "wall_s": r["wall_s"] if r else None, "paper_model": paper_model, "paper_err": paper_err,
            }
            rows.append(row)
            t.add_row(label, "on" if sd else "off", fmt(row["depth"], "d"), fmt(row["params"], "d"),
                      fmt(row["test_err"]), fmt(row["wall_s"], ".0f"), paper_model, fmt(paper_err))
    console.print(t)

    c = Table(title="comparisons: test error difference (b - a), percentage points; negative: b is better")
    for col in ("comparison", "SD", "a", "b", "params b / a", "msnet", "paper (CIFAR-10)"):
        c.add_column(col)
    comparisons = []
    for what, a, b in COMPARISONS:
        for sd in (False, True):
            ra, rb = find(runs, a, sd), find(runs, b, sd)
            diff = None if not (ra and rb and ra["test_err"] is not None and rb["test_err"] is not None) else rb["test_err"] - ra["test_err"]
            ratio = None if not (ra and rb and ra["params"] and rb["params"]) else rb["params"] / ra["params"]
            pa, pb = PAPER[(a, sd)][1], PAPER[(b, sd)][1]
            pdiff = None if pa is None or pb is None else pb - pa
            comparisons.append({"comparison": what, "stochastic_depth": sd, "a": a, "b": b,
                                "param_ratio": ratio, "msnet_diff": diff, "paper_diff": pdiff})
            c.add_row(what, "on" if sd else "off", f"{ROLES[a][0]} {ra.get('depth') if ra else ''}",
                      f"{ROLES[b][0]} {rb.get('depth') if rb else ''}", fmt(ratio), fmt(diff, "+.2f"), fmt(pdiff, "+.2f"))
    console.print(c)

    png = plot_k(runs, out / "k_n.png")
    for r in runs:
        if r["k"]:
            flat = [k for s in r["k"] for k in s]
            console.print(f"k_n {r['role']:8s} SD {'on ' if r['p_last'] < 1 else 'off'}: "
                          f"mean {sum(flat) / len(flat):+.3f}, min {min(flat):+.3f}, max {max(flat):+.3f}")
    if png:
        console.print(f"k_n plot: {png}")
    console.print("paper: ResNet rows He et al. 2016a Table 6 and Huang et al. 2016 Table 1; LM-ResNet rows "
                  "Lu et al. 2018 Table 1 and its stochastic-depth table (from recollection, not checked against the paper here).")

    (out / "table.md").write_text(console.export_text())
    (out / "table.json").write_text(json.dumps({"rows": rows, "comparisons": comparisons, "runs": runs}, indent=2))
    print(f"wrote {out / 'table.md'}, {out / 'table.json'}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(Path(sys.argv[1]))
