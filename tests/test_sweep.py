import glob, json, os, subprocess, sys
import numpy as np
from conftest import REPO, TINY


def test_hydra_multirun_sweeps_peak_lr(tmp_path, stdlib_data):
    """`python main.py -m opt.peak_lr=1e-3,abc,1e30,4e-3`: a run, a directory and a wandb run per good point. The bad
    value (at start) and the diverging one (in the loop, its wandb run open) each print their one error line, the
    sweep goes on past them, then exits 1; the point after the diverged one logs to its own wandb run. A wandb.name
    shared by the points names their checkpoint dirs together with each point's overrides, so none resumes another; a
    ckpt.dir holds them (the same dir for each point: the second would refuse the first's checkpoint)."""
    args = [*TINY, 'train_tokens=2560', 'ckpt.dir=ck', 'opt.clip_norm=1e30', 'wandb.name=lr', f'data.train_path={stdlib_data[0]}',
            f'data.val_path={stdlib_data[1]}', f'hydra.sweep.dir={tmp_path}/sweep']
    env = dict(os.environ, WANDB_MODE='offline')
    r = subprocess.run([sys.executable, os.path.join(REPO, 'main.py'), '-m', 'opt.peak_lr=1e-3,abc,1e30,4e-3', *args],
                       env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    errors = [line for line in r.stderr.splitlines() if 'error' in line.lower()]
    assert r.returncode == 1 and errors == ["error: bad config value: opt.peak_lr='abc' (must be float)",
                                            'error: non-finite loss at step 2 (diverged, or token ids >= model.vocab_size?)'], r.stderr[-3000:]
    lrs = [[json.loads(l)['lr'] for l in open(f'{tmp_path}/sweep/{i}/metrics.jsonl') if '"lr"' in l] for i in (0, 3)]
    assert len(lrs[0]) == 1 and np.allclose(np.array(lrs[1]) / np.array(lrs[0]), 4)  # each run got its own peak_lr
    assert len(glob.glob('ck/lr/*/5')) == 2  # <ckpt.dir>/<wandb.name>/<overrides>/: each good point its own
    for i in (0, 2, 3):  # one wandb run each, with its own data file
        assert len(glob.glob(f'{tmp_path}/sweep/{i}/wandb/offline-run-*/run-*.wandb')) == 1, i
