"""``msnet report DIR [--group-by KEYS]``: wires the config to :mod:`msnet.runs.report` and prints the table."""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from msnet.commands import CONFIG_PATH, errors_as_lines


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="report")
def main(cfg: DictConfig) -> None:
    with errors_as_lines():
        from msnet.errors import MsnetError
        from msnet.runs import RunConsole
        from msnet.runs.display import records_table
        from msnet.runs.report import group_report, optuna_studies, report, setting_columns, study_line

        if not cfg.dir:
            raise MsnetError("which runs? give a folder: msnet report outputs/train (or a multirun sweep folder)")
        console = RunConsole()
        if cfg.group_by:
            out = group_report(cfg.dir, list(cfg.group_by))
            runs = sum(len(g["runs"]) for g in out["groups"])
            title = f"{runs} runs under {cfg.dir}, {len(out['groups'])} groups: mean ± std over each group's runs"
            console.print(records_table(title, out["rows"], out["columns"]))
            if out["plot_error"]:
                console.print(out["plot_error"])
            console.print(f"written: {', '.join(str(p) for p in out['written'])}")
            return
        columns, rows = report(cfg.dir, cfg.sort)
        console.print(records_table(f"{len(rows)} runs under {cfg.dir}", rows, columns, exact=setting_columns(columns)))
        for study in optuna_studies(cfg.dir):
            console.print(study_line(study, Path(cfg.dir).expanduser()), soft_wrap=True, markup=False)  # one line, to grep
        console.print(f"written: {cfg.dir}/report.csv, {cfg.dir}/report.md")
