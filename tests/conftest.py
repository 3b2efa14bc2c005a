"""Tests run on the CPU with 8 simulated devices; nothing needs the network or a wandb account."""
import atexit, logging, os, shutil, subprocess, sys, tempfile
os.environ['XLA_FLAGS'] = os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
# One compiled-program cache for the session (JAX's persistent cache, in a fresh dir, made by the first process that
# loads this file: pytest-xdist's workers inherit it): tests, and the `python main.py` runs they start, that build
# the same program load it instead of compiling it again (about a fifth of the suite's time)
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
    os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='picodo-test-jax-cache-')
    atexit.register(shutil.rmtree, os.environ['JAX_COMPILATION_CACHE_DIR'], True)
os.environ.update(JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0', JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
os.environ['JAX_PLATFORMS'] = 'cpu'
os.environ['WANDB_MODE'] = 'offline'
os.environ.pop('WANDB_API_KEY', None)

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['model.vocab_size=256', 'model.seq_len=32', 'model.d_model=64', 'model.n_layers=2', 'model.n_heads=4',
        'batch_size=16', 'eval_batches=2', 'log_every=5', 'eval_every=1000']


def make_cfg(*overrides, name='local'):
    """A config composed exactly as `python main.py -cn NAME OVERRIDES...` would compose it."""
    with initialize_config_dir(os.path.join(REPO, 'configs'), version_base=None):
        return compose(name, overrides=list(overrides))


@pytest.fixture(autouse=True)
def in_tmp_dir(tmp_path, monkeypatch):
    """Each test runs in its own directory, so default checkpoint dirs (checkpoints/...) never collide. A failed
    checkpoint restore silences unraisable exceptions and asyncio's log for good: undone for the next test."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, 'unraisablehook', sys.unraisablehook)
    asyncio_level = logging.getLogger('asyncio').level
    yield
    logging.getLogger('asyncio').setLevel(asyncio_level)  # setLevel: it also clears the loggers' cached levels
    # wandb.init in this process exports WANDB_SERVICE; a later `python main.py` subprocess would inherit it and
    # talk to this process's wandb service (its run id then no longer comes from the checkpoint)
    os.environ.pop('WANDB_SERVICE', None)


@pytest.fixture(scope='session')
def stdlib_data(tmp_path_factory):
    """The byte-level stdlib corpus that `python main.py` builds on first run."""
    import prepare
    d = tmp_path_factory.mktemp('stdlib')
    prepare.build_stdlib_bytes(str(d / 'train.bin'), str(d / 'val.bin'))
    return str(d / 'train.bin'), str(d / 'val.bin')


@pytest.fixture
def tiny_cfg(stdlib_data):
    def make(*overrides):
        return make_cfg(*TINY, f'data.train_path={stdlib_data[0]}', f'data.val_path={stdlib_data[1]}', *overrides)
    return make


def write_tokens(path, tokens):
    np.asarray(tokens, dtype='<u2').tofile(path)
    return str(path)



# `python main.py ARGS` with two test hooks: the save of step HANG never commits (it hangs just before
# orbax's atomic rename, with everything else written), and each batch takes DELAY seconds longer.
HOOKED_MAIN = """
import asyncio, runpy, sys, time
sys.path.insert(0, {repo!r})
from orbax.checkpoint._src.path import atomicity
import data
commit = atomicity.AtomicRenameTemporaryPath.finalize
async def commit_or_hang(self):
    if self.get_final().name == {hang!r}:
        open('hanging', 'w').close()
        await asyncio.sleep(3600)
    return await commit(self)
atomicity.AtomicRenameTemporaryPath.finalize = commit_or_hang
get_batch = data.get_batch
data.get_batch = lambda *args: (time.sleep({delay}), get_batch(*args))[1]
sys.argv = [{main!r}] + {args!r}
runpy.run_path({main!r}, run_name='__main__')
"""


def launch(cwd, args, hang=None, delay=0):
    """Start `python main.py ARGS` on 2 CPU devices (compiles faster than 8; still a sharded run); it loads the
    programs earlier runs compiled from the session's cache."""
    code = HOOKED_MAIN.format(repo=REPO, main=os.path.join(REPO, 'main.py'), args=list(args), hang=str(hang), delay=delay)
    env = dict(os.environ, WANDB_MODE='offline', XLA_FLAGS='--xla_force_host_platform_device_count=2')
    return subprocess.Popen([sys.executable, '-c', code], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, stdin=subprocess.DEVNULL)


@pytest.fixture(scope='session')
def finished_run(stdlib_data, tmp_path_factory):
    """`python main.py` on a tiny byte-level model, 20 steps straight, printing a sample at each eval: its dir,
    overrides and checkpoint dir (steps 10, 15, 20 kept). Launched with hydra.job.chdir=true, which must not move the
    relative ckpt.dir into the run dir (Hydra changes to it before main() runs)."""
    d = tmp_path_factory.mktemp('finished')
    args = [a for a in TINY if not a.startswith('log_every')] + [
        f'data.train_path={stdlib_data[0]}', f'data.val_path={stdlib_data[1]}', 'train_tokens=10240',  # 20 steps
        'log_every=1', 'ckpt.every=5', 'eval_every=10']
    out = launch(d, args + ['ckpt.dir=a', 'hydra.run.dir=run_a', 'hydra.job.chdir=true', 'sample_tokens=8']).communicate(timeout=300)[0]
    assert 'sample: ' in out and (d / 'a' / '20').is_dir(), out[-3000:]
    return d, args, str(d / 'a')
