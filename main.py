"""Entry point: `python main.py` (configs/local.yaml) or `python main.py -cn colab opt.peak_lr=0.004`."""
import os, re, signal, sys, traceback
# how Ctrl-C ends the process while loading, before the loop, or a second time in it: no traceback, and no teardown (it
# crashes in XLA's threads)
exit_now = lambda *_: (sys.stdout.flush(), os._exit(130))
signal.signal(signal.SIGINT, exit_now)  # while the libraries load (in main(), Ctrl-C unwinds; in the loop, it checkpoints)
import hydra, omegaconf
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf
import train, utils

FAILED = []  # runs that stopped on an error: a sweep (-m) goes on with its next run, then exits 1


@hydra.main(config_path='configs', config_name='local', version_base=None)
def main(cfg):
    utils.keep_freed_memory()  # before XLA starts its threads
    os.chdir(hydra.utils.get_original_cwd())  # under hydra.job.chdir=true too, relative paths and checkpoints/ are the launch dir's
    # Ctrl-C raises KeyboardInterrupt again (a first run's corpus build removes its partial files) ...
    signal.signal(signal.SIGINT, signal.default_int_handler)
    # ... but one raised in a gc callback (JAX has one) Python only prints and drops, and the run would go on: exit there
    sys.unraisablehook = lambda u, previous=sys.unraisablehook: exit_now() if u.exc_type is KeyboardInterrupt else previous(u)
    try:
        # the run's name: wandb.name (unresolvable: check_config says so) or its config's, then its overrides as typed: colab/opt.peak_lr=0.004
        job, wandb_name = HydraConfig.get().job, OmegaConf.select(cfg, 'wandb.name', throw_on_resolution_failure=False)
        name = utils.run_name(str(wandb_name or job.config_name), OmegaConf.to_container(job)['override_dirname'])
        _, last = train.train(cfg, HydraConfig.get().runtime.output_dir, name, sweep=HydraConfig.get().mode.name == 'MULTIRUN')
        if last.get('signal'): sys.exit(128 + last['signal'])  # stopped by a signal, as if killed by it: a sweep ends too
    except (Exception, KeyboardInterrupt) as e:  # bad input, or XLA out of memory: one line; Ctrl-C before the loop, or twice
        if 'wandb' in sys.modules: sys.modules['wandb'].finish(exit_code=1)  # failed: a sweep's next run starts its own
        if isinstance(e, KeyboardInterrupt): exit_now()
        # OSError: a full disk, ...; anything else keeps its traceback
        if not (message := f'error: {e}' if isinstance(e, (utils.PicodoError, OSError)) else utils.oom_error(e)): raise
        print(message, file=sys.stderr)
        FAILED.append(str(e))  # not e: its traceback would keep this run's arrays alive through the sweep


if __name__ == '__main__':  # a misspelt key on the command line: one line naming it, before Hydra composes the config
    defaults, absent = OmegaConf.load(train.DEFAULTS), object()
    for key, value in (a.split('=', 1) for a in sys.argv[1:] if '=' in a and not a.startswith(('-', '+', '~', 'hydra'))):
        if OmegaConf.select(defaults, key, default=absent) is absent: sys.exit(f'error: unknown config key: {key}')
        # '=' or '~' outside ${...} and quotes: Hydra would misread the override
        if set('=~') & set(re.sub(r'\$\{[^}]*\}|"[^"]*"|\'[^\']*\'', '', value)): sys.exit(f"error: {key}: a value holding '=' or '~' needs quotes: '{key}=\"{value}\"'")
    # WANDB_MODE overrides wandb.mode; a misspelt or empty one would only fail once the run had started ('run' means online)
    if os.environ.get('WANDB_MODE', 'online') not in [*(modes := train.CHOICES['wandb.mode']), 'run']: sys.exit(f"error: WANDB_MODE={os.environ['WANDB_MODE']!r}: one of {', '.join(modes)}, or unset")
    # Hydra's own errors (-cn naming no config, an override it cannot parse, a hydra.run.dir it cannot make) raised up to here
    # and said in one line, not Hydra's several; HYDRA_FULL_ERROR=1 set by the user keeps Hydra's traceback
    hydra_errors = () if os.environ.get('HYDRA_FULL_ERROR') == '1' else (hydra.errors.HydraException, omegaconf.errors.OmegaConfBaseException, OSError)
    os.environ['HYDRA_FULL_ERROR'] = '1'
    try:
        main()
    except hydra_errors as e:  # its first paragraph on one line, with its cause's first line (OmegaConf's) and the override if it leaves it out
        if any(frame.f_code is main.__wrapped__.__code__ for frame, _ in traceback.walk_tb(e.__traceback__)): raise  # a bug in the run: its traceback
        # an OmegaConf cause's first line; an OSError with an errno here is Hydra's, making the run's output dir (a missing
        # config is an OSError too, without one)
        cause = f': {utils.first_line(e.__cause__)}' * isinstance(e.__cause__, omegaconf.errors.OmegaConfBaseException) + ' (making the run dir: hydra.run.dir, or hydra.sweep.dir with -m)' * bool(isinstance(e, OSError) and e.errno)
        sys.exit('error: ' + ' '.join(str(e).split('\n\n')[0].split()) + cause + f' (in {getattr(e, "override", "")})' * (getattr(e, 'override', '') not in str(e)))
    sys.exit(1 if FAILED else 0)
