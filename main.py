"""Entry point: `python main.py` (configs/local.yaml) or `python main.py -cn colab opt.peak_lr=0.004`."""
import os, re, signal, sys
# Ctrl-C while the libraries load: exit at once, without a traceback (in main(), it unwinds; in the loop, it checkpoints)
signal.signal(signal.SIGINT, lambda *_: (sys.stdout.flush(), os._exit(130)))
import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf
import train, utils

FAILED = []  # runs that stopped on an error: a sweep (-m) goes on with its next run, then exits 1


@hydra.main(config_path='configs', config_name='local', version_base=None)
def main(cfg):
    utils.keep_freed_memory()  # before XLA starts its threads
    os.chdir(hydra.utils.get_original_cwd())  # under hydra.job.chdir=true too, relative paths and checkpoints/ are the launch dir's
    signal.signal(signal.SIGINT, signal.default_int_handler)  # KeyboardInterrupt: a first run's corpus build removes its files
    # ... but one raised in a gc callback (JAX has one), Python only prints and drops, and the run went on: exit there as below
    sys.unraisablehook = lambda u, hook=sys.unraisablehook: (sys.stdout.flush(), os._exit(130)) if u.exc_type is KeyboardInterrupt else hook(u)
    try:
        # the run's name: wandb.name (unresolvable: check_config says so) or its config, and its overrides as typed: colab/opt.peak_lr=0.004
        job, name = HydraConfig.get().job, OmegaConf.select(cfg, 'wandb.name', throw_on_resolution_failure=False)
        last = train.train(cfg, HydraConfig.get().runtime.output_dir, utils.run_name(str(name or job.config_name), OmegaConf.to_container(job)['override_dirname']))[1]
        last.get('signal') and sys.exit(128 + last['signal'])  # stopped by a signal, as if killed by it: a sweep ends too
    except (Exception, KeyboardInterrupt) as e:  # bad input, or XLA out of memory: one line; Ctrl-C before the loop, or twice
        'wandb' in sys.modules and sys.modules['wandb'].finish(exit_code=1)  # failed: a sweep's next run starts its own
        isinstance(e, KeyboardInterrupt) and (sys.stdout.flush(), os._exit(130))  # no traceback; no teardown (crashed in XLA's threads)
        if not (isinstance(e, (utils.PicodoError, OSError)) or utils.oom_error(e)): raise  # anything else keeps its traceback
        print(f'error: {e}' if isinstance(e, (utils.PicodoError, OSError)) else utils.oom_error(e), file=sys.stderr)  # OSError: a full disk...
        FAILED.append(str(e))  # not e: its traceback would keep this run's arrays alive through the sweep


if __name__ == '__main__':  # a misspelt key on the command line: one line (Hydra's own message takes six)
    defaults, absent = OmegaConf.load(train.DEFAULTS), object()
    for key, value in (a.split('=', 1) for a in sys.argv[1:] if '=' in a and not a.startswith(('-', '+', '~', 'hydra'))):
        OmegaConf.select(defaults, key, default=absent) is absent and sys.exit(f'error: unknown config key: {key}')
        set('=~') & set(re.sub(r'\$\{[^}]*\}|"[^"]*"|\'[^\']*\'', '', value)) and sys.exit(f"error: {key}: a value holding '=' or '~' needs quotes: '{key}=\"{value}\"'")
    # WANDB_MODE wins over wandb.mode: misspelt or empty, wandb failed after the start-up ('run': online)
    os.environ.get('WANDB_MODE', 'online') in [*(modes := train.CHOICES['wandb.mode']), 'run'] or sys.exit(f"error: WANDB_MODE={os.environ['WANDB_MODE']!r}: one of {', '.join(modes)}, or unset")
    main()
    sys.exit(1 if FAILED else 0)
