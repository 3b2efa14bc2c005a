"""Entry point: `python main.py` (configs/local.yaml) or `python main.py -cn colab opt.peak_lr=0.004`."""
import sys
import hydra
from hydra.core.hydra_config import HydraConfig
import train, utils


@hydra.main(config_path='configs', config_name='local', version_base=None)
def main(cfg):
    try:
        job = HydraConfig.get().job  # the run's name: its config and overrides, e.g. colab/opt.peak_lr=0.004
        train.train(cfg, HydraConfig.get().runtime.output_dir, utils.run_name(job.config_name, job.override_dirname))
    except utils.PicodoError as e:
        sys.exit(f'error: {e}')


if __name__ == '__main__':
    main()
