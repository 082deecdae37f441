"""``msnet report DIR``: wires the config to :func:`msnet.runs.report.report` and prints the table."""

import hydra
from omegaconf import DictConfig

from msnet.commands import CONFIG_PATH, errors_as_lines


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="report")
def main(cfg: DictConfig) -> None:
    with errors_as_lines():
        from msnet import MsnetError
        from msnet.runs import RunConsole
        from msnet.runs.display import records_table
        from msnet.runs.report import report

        if not cfg.dir:
            raise MsnetError("which runs? give a folder: msnet report outputs/train (or a multirun sweep folder)")
        columns, rows = report(cfg.dir, cfg.sort)
        console = RunConsole()
        console.print(records_table(f"{len(rows)} runs under {cfg.dir}", rows, columns))
        console.print(f"written: {cfg.dir}/report.csv, {cfg.dir}/report.md")
