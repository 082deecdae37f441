"""``msnet transfer --from coarse --to fine ckpt=PATH``: wires the config to :func:`msnet.tasks.transfer.transfer_checkpoint`."""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from msnet.commands import CONFIG_PATH, errors_as_lines


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="transfer")
def main(cfg: DictConfig) -> None:
    run_dir = HydraConfig.get().runtime.output_dir
    with errors_as_lines(run_dir):
        from msnet.tasks.transfer import transfer_checkpoint

        transfer_checkpoint(cfg, run_dir)
