"""Tests run on the CPU with 8 simulated devices; nothing needs the network or a wandb account."""
import os
os.environ['XLA_FLAGS'] = os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
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
    """Each test runs in its own directory, so default checkpoint dirs (checkpoints/run) never collide."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope='session')
def stdlib_data(tmp_path_factory):
    """The byte-level stdlib corpus that `python main.py` builds on first run."""
    import data
    d = tmp_path_factory.mktemp('stdlib')
    data.build_stdlib_bytes(str(d / 'train.bin'), str(d / 'val.bin'))
    return str(d / 'train.bin'), str(d / 'val.bin')


@pytest.fixture
def tiny_cfg(stdlib_data):
    def make(*overrides):
        return make_cfg(*TINY, f'data.train_path={stdlib_data[0]}', f'data.val_path={stdlib_data[1]}', *overrides)
    return make


def write_tokens(path, tokens):
    np.asarray(tokens, dtype='<u2').tofile(path)
    return str(path)


@pytest.fixture(scope='session')
def trained_ckpt(stdlib_data, tmp_path_factory):
    """A checkpoint dir holding steps 5 and 10 of a tiny byte-level model trained on 8 devices."""
    import train
    d = tmp_path_factory.mktemp('trained')
    cfg = make_cfg(*TINY, f'data.train_path={stdlib_data[0]}', f'data.val_path={stdlib_data[1]}',
                   'train_tokens=5120', 'ckpt.every=5', f'ckpt.dir={d / "ckpt"}')  # 10 steps of 16x32
    train.train(cfg, str(d))
    return str(d / 'ckpt')
