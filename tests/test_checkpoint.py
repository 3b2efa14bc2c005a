"""Checkpoints: exact resume after SIGKILL (even mid-save) and SIGTERM, any mesh, bad checkpoints."""
import glob, json, os, re, shutil, signal, subprocess, sys, time
import jax
import numpy as np
import pytest
import train, utils
from conftest import REPO, TINY, make_cfg
from utils import PicodoError

# `python main.py ARGS` with two test hooks: the save of step HANG never commits (it hangs just before
# orbax's atomic rename, having written everything else), and each batch takes DELAY seconds longer.
HOOKED_MAIN = '''
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
'''


TWO_DEVICES = '--xla_force_host_platform_device_count=2'  # compiles faster than 8; still a sharded run


def launch(cwd, args, hang=None, delay=0):
    code = HOOKED_MAIN.format(repo=REPO, main=os.path.join(REPO, 'main.py'), args=args, hang=str(hang), delay=delay)
    return subprocess.Popen([sys.executable, '-c', code], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=dict(os.environ, WANDB_MODE='offline', XLA_FLAGS=TWO_DEVICES), stdin=subprocess.DEVNULL)


def wait_for(condition, proc, timeout=240):
    end = time.time() + timeout
    while not condition():
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.time() < end, 'timed out'
        time.sleep(0.1)


def records(run_dir):
    path = os.path.join(run_dir, 'metrics.jsonl')
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def wandb_ids(run_dir):
    return {p.rsplit('-', 1)[1] for p in glob.glob(os.path.join(run_dir, 'wandb', 'offline-run-*'))}


def restore_params(ckpt_dir, cfg, n_devices=1):
    mesh = jax.make_mesh((n_devices,), ('data',), (jax.sharding.AxisType.Auto,), devices=jax.devices()[:n_devices])
    _, state = train.create_state(cfg, mesh, train.make_optimizer(cfg.opt, train.lr_schedule(cfg.opt, 1)))
    return train.restore(*train.find_checkpoint(ckpt_dir), cfg, state)[0]


def test_killed_and_stopped_runs_resume_exactly(tmp_path, stdlib_data):
    """Run A trains 20 steps straight. Run B is SIGKILLed from outside while writing its step-10 checkpoint,
    resumes from step 5, gets SIGTERM mid-run (checkpoints, exits 0), resumes again and finishes. Every loss
    logged after step 5 and the final weights and Adam moments are bitwise those of run A."""
    args = [a for a in TINY if not a.startswith('log_every')] + [
        f'data.train_path={stdlib_data[0]}', f'data.val_path={stdlib_data[1]}', 'train_tokens=10240',  # 20 steps
        'log_every=1', 'ckpt.every=5', 'eval_every=10', 'sample_tokens=8']
    a = launch(tmp_path, args + ['ckpt.dir=a', 'hydra.run.dir=run_a'])
    b = launch(tmp_path, args + ['ckpt.dir=b', 'hydra.run.dir=run_b'], hang=10)
    wait_for(lambda: (tmp_path / 'hanging').exists(), b)
    b.kill(); b.wait()
    left = os.listdir(tmp_path / 'b')  # step 10 was fully written but never committed
    assert '5' in left and '10' not in left and any(name.startswith('10.orbax-checkpoint-tmp') for name in left), left

    b2 = launch(tmp_path, args + ['ckpt.dir=b', 'hydra.run.dir=run_b2'], delay=0.3)  # slow, to be stopped mid-run
    wait_for(lambda: any(r['step'] >= 8 for r in records(tmp_path / 'run_b2')), b2)
    b2.send_signal(signal.SIGTERM)
    out = b2.communicate(timeout=120)[0]
    assert b2.returncode == 0, out[-3000:]
    assert 'resuming at step 5 of 20' in out
    stopped = int(re.search(r'stopped after step (\d+)', out).group(1))
    assert 8 <= stopped < 20 and (tmp_path / 'b' / str(stopped)).is_dir()

    b3 = launch(tmp_path, args + ['ckpt.dir=b', 'hydra.run.dir=run_b3'])
    out = b3.communicate(timeout=240)[0]
    assert b3.returncode == 0 and f'resuming at step {stopped} of 20' in out, out[-3000:]
    assert a.wait(timeout=240) == 0, a.communicate()[0][-3000:]
    assert 'sample: ' in out

    def after_5(*run_dirs):
        rows = [r for d in run_dirs for r in records(tmp_path / d) if r['step'] > 5]
        return [{k: r.get(k) for k in ['step', 'train_loss', 'grad_norm', 'lr', 'eval_loss']} for r in rows]
    straight, resumed = after_5('run_a'), after_5('run_b2', 'run_b3')
    assert len(straight) == 15 + 2 and resumed == straight  # 15 steps + 2 evals, floats compared exactly

    cfg = make_cfg(*args)
    params_a, params_b = restore_params(tmp_path / 'a', cfg), restore_params(tmp_path / 'b', cfg)
    diffs = jax.tree.leaves(jax.tree.map(lambda x, y: float(np.abs(np.asarray(x) - np.asarray(y)).max()), params_a, params_b))
    assert max(diffs) == 0.0
    assert len(wandb_ids(tmp_path / 'run_b')) == 1 and wandb_ids(tmp_path / 'run_b') == wandb_ids(tmp_path / 'run_b3')


def test_restores_onto_any_mesh(trained_ckpt, tiny_cfg, tmp_path):
    """Saved on 8 devices, restored onto 1; saved from 1, restored onto 4: same values, new layouts."""
    cfg = tiny_cfg()
    on_1 = restore_params(trained_ckpt, cfg, 1)
    with train.ocp.CheckpointManager(str(tmp_path / 'from_1')) as manager:
        train.save(manager, 10, on_1, {'config': train.OmegaConf.to_container(cfg)})
    on_4 = restore_params(str(tmp_path / 'from_1'), cfg, 4)
    for x, y in zip(jax.tree.leaves(on_1), jax.tree.leaves(on_4)):
        np.testing.assert_array_equal(x, y)
        assert len(x.sharding.device_set) == 1 and len(y.sharding.device_set) == 4
    big = max(jax.tree.leaves(on_4), key=lambda x: x.size)
    assert big.addressable_shards[0].data.size * 4 == big.size  # split over the 4 devices, not copied


def test_non_finite_loss_keeps_the_last_good_checkpoint(trained_ckpt, tiny_cfg, tmp_path):
    ckpt = shutil.copytree(trained_ckpt, tmp_path / 'ckpt')
    before = {p: os.path.getmtime(p) for p in glob.glob(f'{ckpt}/**', recursive=True)}
    cfg = tiny_cfg('train_tokens=10240', 'opt.peak_lr=1e30', 'opt.clip_norm=1e30', f'ckpt.dir={ckpt}')
    with pytest.raises(PicodoError, match=r'non-finite loss at step 12$'):  # step 11 blows up the weights
        train.train(cfg, str(tmp_path))  # and no checkpoint at 15: the losses are checked before saving
    assert {p: os.path.getmtime(p) for p in glob.glob(f'{ckpt}/**', recursive=True)} == before


def corrupt(ckpt):
    for path in glob.glob(f'{ckpt}/10/state/**/*', recursive=True):
        if os.path.isfile(path) and os.path.getsize(path) > 100:
            open(path, 'r+b').truncate(50)


def no_checkpoint(tmp_path):
    (tmp_path / 'empty').mkdir()
    return str(tmp_path / 'empty')


@pytest.mark.parametrize('case,message', [
    ('missing', 'checkpoint not found: '),
    ('empty', 'no complete checkpoint in '),
    ('shape', r'checkpoint .*/10 has model.d_model=64 but the config says 32'),
    ('corrupt', r'cannot restore checkpoint .*/10: '),
])
def test_bad_checkpoints_get_a_clear_error_and_nothing_is_deleted(trained_ckpt, tiny_cfg, tmp_path, case, message):
    ckpt = str(shutil.copytree(trained_ckpt, tmp_path / 'ckpt'))
    resume = {'missing': ckpt + '/nope', 'empty': no_checkpoint(tmp_path)}.get(case, ckpt)
    if case == 'corrupt':
        corrupt(ckpt)
    files = sorted(glob.glob(f'{ckpt}/**', recursive=True))
    overrides = ['model.d_model=32'] if case == 'shape' else []
    with pytest.raises(PicodoError, match=message) as e:
        train.train(tiny_cfg(f'ckpt.resume={resume}', f'ckpt.dir={tmp_path / "new"}', *overrides), str(tmp_path))
    assert '\n' not in str(e.value)
    assert sorted(glob.glob(f'{ckpt}/**', recursive=True)) == files


def test_a_signal_sets_the_stop_flag_instead_of_killing():
    previous = signal.getsignal(signal.SIGINT)
    with utils.stop_signals() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        assert stop == [signal.SIGINT]
    assert signal.getsignal(signal.SIGINT) is previous
