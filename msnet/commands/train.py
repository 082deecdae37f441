"""``msnet train``: wires the composed config to :func:`msnet.train.train`."""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from msnet.commands import CONFIG_PATH, errors_as_lines, seed_job


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def main(cfg: DictConfig) -> None:
    hc = HydraConfig.get()
    run_dir = hc.runtime.output_dir
    with errors_as_lines(run_dir):
        from msnet.train import train

        train(seed_job(cfg), run_dir, overrides=list(hc.overrides.task))
