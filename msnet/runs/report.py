"""``msnet report DIR``: one table of every run under DIR, with the config keys that differ as columns.

``msnet report DIR --group-by model.layers,optimizer`` instead gives one row per group of runs
(runs that agree on those keys, e.g. the seeds of one setting): n, and mean ± std of each final metric.
"""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import yaml

from msnet.errors import MsnetError
from msnet.runs.display import typed
from msnet.runs.rundir import read_metrics

METRIC_COLUMNS = [
    "status", "epochs", "final_val_acc", "final_test_acc", "final_test_loss", "best_val_acc", "best_checkpoint_test_acc",
    "wall_time_s",
]
IGNORED_KEYS = ("resume", "dataset.root", "threads")


def _flatten(d: Any, prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = d
    return out


def collect_runs(root: str | Path) -> List[Dict[str, Any]]:
    """Every run under ``root`` (a folder holding ``summary.json``), with its flattened config and summary."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise MsnetError(f"{root} is not a folder; pass a run, sweep or outputs folder (e.g. msnet report multirun)")
    runs = []
    for summary_path in sorted(root.rglob("summary.json")):
        run_dir = summary_path.parent
        try:
            summary = json.loads(summary_path.read_text())
        except json.JSONDecodeError:
            continue
        config_path = run_dir / "config.yaml"
        config = yaml.safe_load(config_path.read_text()) if config_path.exists() else {}
        runs.append({"dir": run_dir, "summary": summary, "config": _flatten(config or {})})
    if not runs:
        raise MsnetError(f"no runs under {root} (no summary.json found); point msnet report at an outputs or multirun folder")
    return runs


def _differing_keys(runs: List[Dict[str, Any]]) -> List[str]:
    """Config keys whose value is not the same in every run (``resume``, ``threads``... left out)."""
    keys = sorted(set().union(*(r["config"].keys() for r in runs)))
    return [k for k in keys
            if not k.startswith(IGNORED_KEYS) and len({json.dumps(r["config"].get(k), sort_keys=True) for r in runs}) > 1]


def report_rows(runs: List[Dict[str, Any]], root: Path) -> Tuple[List[str], List[Dict[str, Any]]]:
    """Columns (run, differing config keys, metrics) and one row per run."""
    differing = _differing_keys(runs)
    metrics = [m for m in METRIC_COLUMNS if any(m in r["summary"] for r in runs)]
    rows = []
    for r in runs:
        row: Dict[str, Any] = {"run": str(r["dir"].relative_to(root)) if r["dir"] != root else "."}
        row.update({k: r["config"].get(k) for k in differing})
        row.update({m: r["summary"].get(m) for m in metrics})
        rows.append(row)
    return ["run", *differing, *metrics], rows


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return "" if v is None else str(v)


def setting_columns(columns: List[str]) -> List[str]:
    """The columns of ``columns`` that hold config values (everything but ``run``, ``optuna`` and the metrics):
    they are shown as typed, never rounded, so that distinct settings (lr 1.2e-4 and 1.4e-4) stay distinct."""
    from msnet.config import Objective

    metrics = {*METRIC_COLUMNS, *(o.value for o in Objective)}
    return [c for c in columns if c not in metrics and c not in ("run", "optuna")]


def write_report(root: Path, columns: List[str], rows: List[Dict[str, Any]]) -> Tuple[Path, Path]:
    """Write ``report.csv`` and ``report.md`` into ``root``."""
    csv_path, md_path = root / "report.csv", root / "report.md"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for row in rows:
            w.writerow({c: row.get(c) for c in columns})
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    settings = set(setting_columns(columns))
    lines += ["| " + " | ".join((typed if c in settings else _cell)(row.get(c)) for c in columns) + " |"
              for row in rows]
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


OPTUNA_RESULTS = "optimization_results.yaml"


def _job_overrides(run_dir: Path) -> Dict[str, str]:
    """A sweep job's overrides as typed (``.hydra/overrides.yaml``): ``{key: value text}``."""
    path = run_dir / ".hydra" / "overrides.yaml"
    items = yaml.safe_load(path.read_text()) if path.exists() else None
    return dict(str(o).split("=", 1) for o in items or [] if "=" in str(o))


def _is_trial_of(run: Dict[str, Any], params: Dict[str, Any]) -> bool:
    """The run was launched with these params (its overrides, else its config, hold every one of them)."""
    typed = _job_overrides(run["dir"])
    return all(typed[k] == str(v) if k in typed else run["config"].get(k) == v for k, v in params.items())


def optuna_studies(root: str | Path, runs: Optional[List[Dict[str, Any]]] = None) -> List[Dict[str, Any]]:
    """Every Optuna study under ``root``: a sweep folder holding the sweeper's ``optimization_results.yaml``.

    Each: ``dir``, ``objective`` (the trials' ``trainer.objective``), ``best_params``, ``best_value``,
    ``best_run`` (the run folder of the trial with those params and that value, None if not found),
    ``trials`` (job folders with a summary or an ``error.txt``) and ``failed`` (those not completed).
    A multi-objective study (``solutions``) has no single best: ``best_params`` is then None.
    """
    root = Path(root).expanduser()
    runs = collect_runs(root) if runs is None else runs
    studies = []
    for path in sorted(root.rglob(OPTUNA_RESULTS)):
        results = yaml.safe_load(path.read_text()) or {}
        folder = path.parent
        trials = [r for r in runs if folder in r["dir"].parents]
        objective = next((r["config"]["trainer.objective"] for r in trials if "trainer.objective" in r["config"]),
                         "objective")
        params, value = results.get("best_params"), results.get("best_value")
        best = [r for r in trials if params is not None and _is_trial_of(r, params)]
        best = [r for r in best if r["summary"].get(objective) == value] or best
        done = {r["dir"] for r in trials if r["summary"].get("status", "completed") == "completed"}
        jobs = {p.parent for p in folder.glob("**/error.txt")} | {r["dir"] for r in trials}
        studies.append({"dir": folder, "objective": objective, "best_params": params, "best_value": value,
                        "best_run": best[0]["dir"] if best else None, "trials": len(jobs),
                        "failed": len(jobs - done)})
    return studies


def study_line(study: Dict[str, Any], root: Path) -> str:
    """One line on an Optuna study: its best trial (value, params, run folder), trials and failures."""
    where = str(study["dir"].relative_to(root)) if study["dir"] != root else "."
    counts = f"{study['trials']} trials, {study['failed']} failed"
    if study["best_params"] is None:
        return f"optuna study {where}: multi-objective (no single best trial); {counts}"
    params = " ".join(f"{k}={v}" for k, v in study["best_params"].items())
    run = str(study["best_run"].relative_to(root)) if study["best_run"] is not None else "not found"
    return f"optuna study {where}: best {study['objective']} = {_cell(study['best_value'])} at {params} (run {run}); {counts}"


def report(root: str | Path, sort: Optional[str] = None) -> Tuple[List[str], List[Dict[str, Any]]]:
    """Collect, tabulate and write the report for ``root``; returns ``(columns, rows)``.

    Under an Optuna sweep folder the best trial's row is marked in an ``optuna`` column, and
    ``report.md`` ends with one line per study (:func:`study_line`).
    """
    root = Path(root).expanduser()
    runs = collect_runs(root)
    columns, rows = report_rows(runs, root)
    studies = optuna_studies(root, runs)
    if studies:
        best = {s["best_run"] for s in studies}
        columns.insert(1, "optuna")
        extra = [k for k in dict.fromkeys(s["objective"] for s in studies) if k not in columns and k != "objective"]
        columns += extra  # the study's objective, when it is not one of the usual metrics (best_val_loss)
        for run, row in zip(runs, rows):
            row["optuna"] = "best" if run["dir"] in best else None
            row.update({k: run["summary"].get(k) for k in extra})
    if sort:
        if sort not in columns:
            raise MsnetError(f"cannot sort by {sort!r}; columns are: {', '.join(columns)}")
        rows.sort(key=lambda r: (r.get(sort) is None, r.get(sort)))
    write_report(root, columns, rows)
    if studies:
        with open(root / "report.md", "a") as f:
            f.write("".join("\n" + study_line(study, root) + "\n" for study in studies))
    return columns, rows


GROUP_METRICS = ["final_val_acc", "final_test_acc", "final_test_loss", "best_val_acc", "best_checkpoint_test_acc",
                 "wall_time_s"]
GROUP_HEADERS = {"final_val_acc": "final val %", "final_test_acc": "final test %", "final_test_loss": "final test loss",
                 "best_val_acc": "best val %", "best_checkpoint_test_acc": "best.pt test %", "wall_time_s": "time s"}
GROUP_FILES = ("report_groups.md", "report_groups.csv", "report_groups.png")


def resolve_group_keys(keys: List[str], runs: List[Dict[str, Any]]) -> List[str]:
    """The config key behind each group key: ``model.layers`` as is, a group such as ``optimizer`` as ``optimizer.name``."""
    present = set().union(*(r["config"].keys() for r in runs))
    resolved = []
    for key in keys:
        if key in present:
            resolved.append(key)
        elif f"{key}.name" in present:
            resolved.append(f"{key}.name")
        else:
            differing = _differing_keys(runs)
            hint = (f"keys that differ between the {len(runs)} runs: {', '.join(differing)}" if differing
                    else f"the {len(runs)} runs share one config")
            raise MsnetError(
                f"cannot group by {key!r}: no run under this folder has it in config.yaml; {hint} "
                f"(any dotted key of config.yaml works; a group such as optimizer means optimizer.name)"
            )
    return resolved


def _stats(values: List[float]) -> Dict[str, Any]:
    """n, mean and sample standard deviation (None below two values)."""
    return {
        "n": len(values),
        "mean": statistics.mean(values) if values else None,
        "std": statistics.stdev(values) if len(values) > 1 else None,
    }


def _order(value: Any) -> Tuple[int, Any]:
    """Sort numbers numerically, then everything else by its text, None last."""
    if value is None:
        return (2, "")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, value)
    return (1, str(value))


def val_acc_curve(run_dir: Path) -> Dict[int, float]:
    """``{epoch: validation accuracy}`` from a run's ``metrics.jsonl`` (the last record of an epoch wins)."""
    return {int(r["epoch"]): float(r["val_acc"]) for r in read_metrics(run_dir)
            if r.get("val_acc") is not None and r.get("epoch") is not None}


def group_runs(runs: List[Dict[str, Any]], keys: List[str]) -> List[Dict[str, Any]]:
    """Runs grouped by their values of ``keys`` (config keys), in sorted order.

    Each group: ``values`` (one per key), ``runs``, ``failed`` (runs whose status is not
    completed, left out of the numbers), ``metrics`` (``{name: {n, mean, std}}`` over the
    completed runs) and ``curve`` (``{epoch: {n, mean, std}}`` of validation accuracy).
    """
    groups: Dict[str, Dict[str, Any]] = {}
    for r in runs:
        values = [r["config"].get(k) for k in keys]
        g = groups.setdefault(json.dumps(values, sort_keys=True, default=str), {"values": values, "runs": []})
        g["runs"].append(r)
    out = []
    for g in groups.values():
        done = [r for r in g["runs"] if r["summary"].get("status", "completed") == "completed"]
        g["failed"] = len(g["runs"]) - len(done)
        g["n"] = len(done)
        g["metrics"] = {m: _stats([float(r["summary"][m]) for r in done if r["summary"].get(m) is not None])
                        for m in GROUP_METRICS}
        curves = [val_acc_curve(r["dir"]) for r in done]
        epochs = sorted(set().union(*curves)) if curves else []
        g["curve"] = {e: _stats([c[e] for c in curves if e in c]) for e in epochs}
        out.append(g)
    out.sort(key=lambda g: [_order(v) for v in g["values"]])
    return out


def _label(value: Any) -> str:
    """A group's value as typed on the command line (``0.001``, ``adam``, ``null``)."""
    return "null" if value is None else str(value)


def _mean_std(stats: Dict[str, Any], metric: str) -> str:
    """``84.12 ± 0.35`` (accuracies in %), the mean alone for a single run, blank for none."""
    if stats["mean"] is None:
        return ""
    scale, digits = (100.0, 2) if metric.endswith("_acc") else (1.0, 1 if metric.endswith("_s") else 4)
    text = f"{scale * stats['mean']:.{digits}f}"
    return text if stats["std"] is None else f"{text} ± {scale * stats['std']:.{digits}f}"


def group_table(groups: List[Dict[str, Any]], labels: List[str]) -> Tuple[List[str], List[Dict[str, Any]]]:
    """Columns and display rows (text cells ``mean ± std``) of the grouped report."""
    metrics = [m for m in GROUP_METRICS if any(g["metrics"][m]["n"] for g in groups)]
    header = {m: GROUP_HEADERS[m] for m in metrics}
    counts = ["n", "failed"] if any(g["failed"] for g in groups) else ["n"]
    rows = []
    for g in groups:
        row: Dict[str, Any] = {label: _label(v) for label, v in zip(labels, g["values"])}
        row.update({"n": g["n"], "failed": g["failed"]})
        row.update({header[m]: _mean_std(g["metrics"][m], m) for m in metrics})
        rows.append(row)
    return [*labels, *counts, *(header[m] for m in metrics)], rows


def write_group_report(root: Path, groups: List[Dict[str, Any]], labels: List[str]) -> Tuple[Path, Path]:
    """Write ``report_groups.md`` (mean ± std cells) and ``report_groups.csv`` (``*_mean``, ``*_std``, ``*_n``) into ``root``."""
    columns, rows = group_table(groups, labels)
    md_path, csv_path = root / GROUP_FILES[0], root / GROUP_FILES[1]
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows]
    md_path.write_text("\n".join(lines) + "\n")
    fields = [*labels, "n", "failed"] + [f"{m}_{s}" for m in GROUP_METRICS for s in ("mean", "std", "n")]
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for g in groups:
            row = {**dict(zip(labels, g["values"])), "n": g["n"], "failed": g["failed"]}
            row.update({f"{m}_{s}": g["metrics"][m][s] for m in GROUP_METRICS for s in ("mean", "std", "n")})
            w.writerow(row)
    return md_path, csv_path


def plot_groups(root: Path, groups: List[Dict[str, Any]], labels: List[str]) -> Path:
    """Validation accuracy against epoch: each group's mean over its runs, with a ±std band; ``report_groups.png``.

    Needs matplotlib (``pip install 'msnet[plot]'``); raises ImportError without it.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, g in enumerate(groups):
        if not g["curve"]:
            continue
        epochs = sorted(g["curve"])
        mean = [100 * g["curve"][e]["mean"] for e in epochs]
        std = [100 * (g["curve"][e]["std"] or 0.0) for e in epochs]
        name = ", ".join(f"{label}={_label(v)}" for label, v in zip(labels, g["values"])) + f" (n={g['n']})"
        color = f"C{i % 10}"
        ax.plot(epochs, mean, "-o", color=color, ms=3, label=name)
        if len(epochs) > 1:
            ax.fill_between(epochs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                            color=color, alpha=0.2, lw=0)
        else:
            ax.errorbar(epochs, mean, yerr=std, color=color, capsize=4, fmt="none")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy [%]")
    ax.set_title(f"mean ± std over runs, grouped by {', '.join(labels)}", fontsize=10)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = root / GROUP_FILES[2]
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def group_report(root: str | Path, keys: List[str]) -> Dict[str, Any]:
    """Group the runs under ``root`` by ``keys`` and write ``report_groups.{md,csv,png}`` there.

    Returns ``groups`` (see :func:`group_runs`), ``columns`` and ``rows`` (the table as
    printed) and ``written`` (paths); ``plot_error`` says why there is no plot, if there is none.
    """
    root = Path(root).expanduser()
    if not keys:
        raise MsnetError("group by what? e.g. msnet report DIR --group-by model.layers,optimizer")
    runs = collect_runs(root)
    groups = group_runs(runs, resolve_group_keys(list(keys), runs))
    labels = list(keys)
    columns, rows = group_table(groups, labels)
    written = list(write_group_report(root, groups, labels))
    plot_error = None
    try:
        written.append(plot_groups(root, groups, labels))
    except ImportError:
        plot_error = "no plot: matplotlib is not installed (pip install 'msnet[plot]')"
    return {"groups": groups, "columns": columns, "rows": rows, "written": written, "plot_error": plot_error}
