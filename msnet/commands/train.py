"""``msnet train``: wires the composed config to :func:`msnet.training.train`."""

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from msnet.commands import CONFIG_PATH, errors_as_lines, seed_job


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def main(cfg: DictConfig) -> None:
    hc = HydraConfig.get()
    run_dir = hc.runtime.output_dir
    with errors_as_lines(run_dir):
        from msnet.training import train
        from msnet.tasks.launch import launch, should_launch

        cfg, overrides = seed_job(cfg), list(hc.overrides.task)
        if should_launch(cfg):  # trainer.devices=K: the K ranks run this command under torchrun, into run_dir
            sweep = hc.mode == RunMode.MULTIRUN
            code = launch(cfg, run_dir, overrides + ([f"seed={cfg.seed}"] if sweep else []))
            if code and not sweep:  # the ranks printed the error; in a sweep their error.txt marks the job failed
                raise SystemExit(code)
            return
        train(cfg, run_dir, overrides=overrides)
