import glob, json, os, subprocess, sys
import numpy as np
from conftest import REPO, TINY


def test_hydra_multirun_sweeps_peak_lr(tmp_path, stdlib_data):
    """`python main.py -m opt.peak_lr=1e-3,abc,4e-3`: two runs, two directories, two wandb runs; the bad point in
    the middle gets its one error line and the sweep goes on past it, then exits 1."""
    args = [*TINY, 'train_tokens=2560', f'data.train_path={stdlib_data[0]}', f'data.val_path={stdlib_data[1]}',
            f'hydra.sweep.dir={tmp_path}/sweep']
    env = dict(os.environ, WANDB_MODE='offline')
    r = subprocess.run([sys.executable, os.path.join(REPO, 'main.py'), '-m', 'opt.peak_lr=1e-3,abc,4e-3', *args],
                       env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    errors = [line for line in r.stderr.splitlines() if 'error' in line.lower()]
    assert r.returncode == 1 and errors == ['error: bad config value: opt.peak_lr=abc (must be float)'], r.stderr[-3000:]
    runs = sorted(glob.glob(f'{tmp_path}/sweep/*/metrics.jsonl'))
    assert len(runs) == 2
    lrs = [[json.loads(l)['lr'] for l in open(f) if '"lr"' in l] for f in runs]
    assert np.allclose(np.array(lrs[1]) / np.array(lrs[0]), 4)  # each run got its own peak_lr
    wandb_runs = glob.glob(f'{tmp_path}/sweep/*/wandb/offline-run-*')
    assert len(wandb_runs) == 2
