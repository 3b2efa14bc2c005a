"""Entry point: `python main.py` (configs/local.yaml) or `python main.py -cn colab opt.peak_lr=0.004`."""
import sys
import hydra
from hydra.core.hydra_config import HydraConfig
import train, utils


@hydra.main(config_path='configs', config_name='local', version_base=None)
def main(cfg):
    utils.keep_freed_memory()  # before XLA starts its threads
    try:
        hydra_cfg = HydraConfig.get()  # the run's name: its config and overrides, e.g. colab/opt.peak_lr=0.004
        name = utils.run_name(hydra_cfg.job.config_name, hydra_cfg.job.override_dirname)
        train.train(cfg, hydra_cfg.runtime.output_dir, name)
    except utils.PicodoError as e:
        sys.exit(f'error: {e}')


if __name__ == '__main__':
    main()
