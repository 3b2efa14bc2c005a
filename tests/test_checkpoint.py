"""Checkpoints: exact resume after SIGKILL (even mid-save) and SIGTERM, any mesh, bad checkpoints."""
import glob, json, logging, logging.config, os, re, shutil, signal, subprocess, sys, time
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
import numpy as np
import pytest
import train, utils
from omegaconf import OmegaConf
from conftest import TINY, launch, make_cfg
from utils import PicodoError


def wait_for(condition, proc, timeout=240):
    end = time.time() + timeout
    while not condition():
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.time() < end, 'timed out'
        time.sleep(0.1)


def records(run_dir):
    path = os.path.join(run_dir, 'metrics.jsonl')  # read while the run writes it: complete lines only
    return [json.loads(line) for line in open(path) if line.endswith('\n')] if os.path.exists(path) else []


def wandb_ids(run_dir):
    return {p.rsplit('-', 1)[1] for p in glob.glob(os.path.join(run_dir, 'wandb', 'offline-run-*'))}


def mesh_of(n):
    return jax.make_mesh((n,), ('data',), (jax.sharding.AxisType.Auto,), devices=jax.devices()[:n])


def restore_state(ckpt_dirs, cfg, n_devices=1):
    _, state = train.create_state(cfg, mesh_of(n_devices), train.make_optimizer(cfg.opt, train.lr_schedule(cfg.opt, 1)))
    return [train.restore(*train.find_checkpoint(d), cfg, state)[0] for d in ckpt_dirs]


def test_killed_and_stopped_runs_resume_exactly(finished_run):
    """Run A (finished_run) trained 20 steps straight. Run B is SIGKILLed from outside while writing its step-10
    checkpoint, resumes from step 5, gets SIGTERM mid-run (checkpoints, exits 143), resumes again and finishes.
    Every loss logged after step 5 and the final weights and Adam moments are bitwise those of run A."""
    d, args, _ = finished_run
    b = launch(d, args + ['ckpt.dir=b', 'hydra.run.dir=run_b'], hang=10)
    wait_for(lambda: (d / 'hanging').exists(), b)
    b.kill(); b.wait()
    left = os.listdir(d / 'b')  # step 10 was fully written but never committed
    assert '5' in left and '10' not in left and any(name.startswith('10.orbax-checkpoint-tmp') for name in left), left

    b2 = launch(d, args + ['ckpt.dir=b', 'hydra.run.dir=run_b2'], delay=0.2)  # slow: stopped mid-run
    wait_for(lambda: any(r['step'] >= 8 for r in records(d / 'run_b2')), b2)
    b2.send_signal(signal.SIGTERM)
    out = b2.communicate(timeout=120)[0]
    assert b2.returncode == 128 + signal.SIGTERM, out[-3000:]  # stopped, not finished: a requeue script can tell
    assert 'resuming at step 5 of 20' in out and f'removed {d / "b" / "10.orbax-checkpoint-tmp"}' in out  # said, not silent
    stopped = int(re.search(r'stopped after step (\d+)', out).group(1))
    assert 8 <= stopped < 20 and (d / 'b' / str(stopped)).is_dir()

    b3 = launch(d, args + ['ckpt.dir=b', 'hydra.run.dir=run_b3'])
    out = b3.communicate(timeout=240)[0]
    assert b3.returncode == 0 and f'resuming at step {stopped} of 20' in out, out[-3000:]
    assert not [name for name in os.listdir(d / 'b') if 'tmp' in name]  # the unfinished step 10 went at the next start

    def after_5(*run_dirs):
        rows = [r for run in run_dirs for r in records(d / run) if r['step'] > 5]
        return [{k: r.get(k) for k in ['step', 'train_loss', 'grad_norm', 'lr', 'tokens_seen', 'eval_loss']} for r in rows]
    straight, resumed = after_5('run_a'), after_5('run_b2', 'run_b3')
    assert len(straight) == 15 + 2 and resumed == straight  # 15 steps + 2 evals, floats compared exactly

    cfg = make_cfg(*args)
    state_a, state_b = restore_state([d / 'a', d / 'b'], cfg)
    diffs = jax.tree.map(lambda x, y: float(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)).max()), state_a, state_b)
    assert max(jax.tree.leaves(diffs)) == 0.0
    assert len(wandb_ids(d / 'run_b')) == 1 and wandb_ids(d / 'run_b') == wandb_ids(d / 'run_b2') == wandb_ids(d / 'run_b3')


def test_a_relaunch_of_a_run_begun_from_ckpt_resume_goes_on_from_its_own_checkpoints(finished_run, tiny_cfg, tmp_path, capsys):
    """`ckpt.resume=A` starts a new run, with its own wandb run, from A's newest step; the same command again (a
    requeue) goes on from the new run's own checkpoints and wandb run (it once stopped: its dir was past A's step).
    Here A is a run dir beside the new run's step dirs (`ckpt.dir` is A's parent, as the README's example was while
    run names left ckpt.resume out): a requeue once took them for A's and stopped. A dir holding checkpoints saved
    without that ckpt.resume is another run's: refused, left as it was. A finished run relaunched says so
    (it said only 'resuming at step 25 of 25', then compiled and trained nothing), and ends there."""
    d, _, a = finished_run
    source = shutil.copytree(a, tmp_path / 'b' / 'source')
    branch = lambda *more: tiny_cfg('train_tokens=12800', 'ckpt.every=5', f'ckpt.resume={source}', *more)
    assert train.train(branch(f'ckpt.dir={tmp_path / "b"}'), str(tmp_path / 'run1'))[1]['step'] == 25
    shutil.rmtree(source)  # the source may be gone by then (its own run rotated the step out, say)
    train.train(branch(f'ckpt.dir={tmp_path / "b"}'), str(tmp_path / 'run2'))  # resumes at step 25 of 25
    assert (f'resuming at step 25 of 25 from {tmp_path / "b"}: the run is finished, nothing to train (more tokens: ckpt.resume='
            in capsys.readouterr().out)
    assert sorted(os.listdir(tmp_path / 'b')) == ['.lock.0', '25']  # the run's lock (process 0)
    assert len(wandb_ids(tmp_path / 'run1')) == 1 and wandb_ids(tmp_path / 'run1') != wandb_ids(d / 'run_a')
    assert not (tmp_path / 'run2' / 'wandb').exists()  # finished: no compile, no wandb run (it logged an empty one)
    other = shutil.copytree(a, tmp_path / 'other')
    before = {p: os.path.getmtime(p) for p in glob.glob(f'{other}/**', recursive=True)}
    with pytest.raises(PicodoError, match=re.escape(f'checkpoint {other}/20 has ckpt.resume=null but the config says \"{a}\": another run')):
        train.train(tiny_cfg('train_tokens=10240', 'ckpt.every=5', f'ckpt.resume={a}', f'ckpt.dir={other}'), str(tmp_path / 'run3'))
    assert {p: os.path.getmtime(p) for p in glob.glob(f'{other}/**', recursive=True)} == before

def test_ckpt_resume_keeps_the_batch_size_and_needs_steps_left_to_train(finished_run, tiny_cfg, tmp_path):
    """The step count goes on from the checkpoint's and counts batches (data position, tokens seen, budget): another
    batch_size would skip or repeat windows, so it is refused; so is a budget the checkpoint has already reached
    (it trained nothing and exited 0). Both before anything is written (but the new run's lock on its own dir)."""
    a = finished_run[2]  # batch_size 16, step 20 of 20
    with pytest.raises(PicodoError, match=re.escape(f'checkpoint {a}/20 has batch_size=16 but the config says 8')):
        train.train(tiny_cfg('batch_size=8', 'train_tokens=20480', f'ckpt.resume={a}', f'ckpt.dir={tmp_path}/b'), str(tmp_path))
    with pytest.raises(PicodoError, match=re.escape(f'ckpt.resume {a} is at step 20: train_tokens=10240 ends at step 20')):
        train.train(tiny_cfg('train_tokens=10240', f'ckpt.resume={a}', f'ckpt.dir={tmp_path}/c'), str(tmp_path))
    assert os.listdir(tmp_path / 'b') == os.listdir(tmp_path / 'c') == ['.lock.0']


def test_a_run_that_dies_during_an_eval_evaluates_that_step_when_relaunched(tiny_cfg, tmp_path, monkeypatch):
    """At a step that both saves and evaluates, the save comes after the eval: a process killed during the eval
    (here: the eval raises) leaves no checkpoint at that step, so the relaunch redoes the steps and logs the eval.
    (Saved first, the relaunch resumed at step 10 of 10 and the run never had its final eval.)"""
    compile_steps = train.compile_steps
    def dying_eval(graphdef, state):
        step, evaluate = compile_steps(graphdef, state)
        return step, lambda *args: (_ for _ in ()).throw(RuntimeError('killed during the eval'))
    cfg = tiny_cfg('train_tokens=5120', 'eval_every=10', 'ckpt.every=5', f'ckpt.dir={tmp_path}/ckpt')  # 10 steps
    with monkeypatch.context() as m:
        m.setattr(train, 'compile_steps', dying_eval)
        with pytest.raises(RuntimeError, match='killed during the eval'):
            train.train(cfg, str(tmp_path / 'run1'))
    assert sorted(os.listdir(tmp_path / 'ckpt')) == ['.lock.0', '5']
    last = train.train(cfg, str(tmp_path / 'run2'))[1]
    assert last['step'] == 10 and np.isfinite(last['eval_loss'])
    assert [r['step'] for r in records(tmp_path / 'run2') if 'eval_loss' in r] == [10]


def test_restores_onto_any_mesh(tiny_cfg, tmp_path):
    """Saved on 8 devices, restored onto 1; saved from 1, restored onto 4: same values, new layouts."""
    cfg = tiny_cfg()
    meta = {'config': OmegaConf.to_container(cfg, resolve=True)}
    _, on_8 = train.create_state(cfg, mesh_of(8), train.make_optimizer(cfg.opt, train.lr_schedule(cfg.opt, 1)))
    def save(path, state):
        with ocp.CheckpointManager(path) as manager:
            train.save(manager, 1, state, meta)
    save(tmp_path / 'from_8', on_8)
    on_1, = restore_state([tmp_path / 'from_8'], cfg, 1)
    save(tmp_path / 'from_1', on_1)
    on_4, = restore_state([tmp_path / 'from_1'], cfg, 4)
    for x, y, z in zip(*map(jax.tree.leaves, (on_8, on_1, on_4))):
        np.testing.assert_array_equal(x, y)
        np.testing.assert_array_equal(x, z)
        assert [len(a.sharding.device_set) for a in (x, y, z)] == [8, 1, 4]
    big = max(jax.tree.leaves(on_4), key=lambda x: x.size)
    assert big.addressable_shards[0].data.size * 4 == big.size  # split over the 4 devices, not copied


def test_non_finite_loss_keeps_the_last_good_checkpoint(finished_run, tiny_cfg, tmp_path):
    """Resumed at step 20 with an absurd learning rate: step 21 blows up the weights, the loss at step 22 is
    NaN; the losses are checked before the step-25 save, so the checkpoints stay exactly as they were."""
    ckpt = shutil.copytree(finished_run[2], tmp_path / 'ckpt')
    before = {p: os.path.getmtime(p) for p in glob.glob(f'{ckpt}/**', recursive=True)}
    cfg = tiny_cfg('train_tokens=15360', 'opt.peak_lr=1e30', 'opt.clip_norm=1e30', 'ckpt.every=5', f'ckpt.dir={ckpt}', f'ckpt.resume={ckpt}')
    with pytest.raises(PicodoError, match=r'non-finite loss at step 22 \(diverged, or token ids >= model.vocab_size\?\)$'):
        train.train(cfg, str(tmp_path))
    assert {p: os.path.getmtime(p) for p in glob.glob(f'{ckpt}/**', recursive=True)} == before


@pytest.mark.parametrize('change', ['opt.peak_lr=0.002', 'train_tokens=15360', 'seed=1', 'model.d_model=32'])
def test_a_checkpoint_dir_of_another_run_is_not_resumed(finished_run, tiny_cfg, tmp_path, change):
    """A relaunch into a checkpoint dir whose run had another config (a shared ckpt.dir) stops with one line naming
    the key, before training, and the checkpoints stay as they were; ckpt.resume goes on from it with the new config,
    and the message says so, except for a shape key or batch_size, which ckpt.resume cannot change either.
    Keys of how a run runs or logs (log_every, eval_every, sample_tokens here) may change between launches."""
    ckpt = shutil.copytree(finished_run[2], tmp_path / 'ckpt')
    (ckpt / '25.orbax-checkpoint-tmp-1').mkdir()  # as if the run that owns the dir were saving step 25 right now
    before = {p: os.path.getmtime(p) for p in glob.glob(f'{ckpt}/**', recursive=True)}
    key, value = change.split('=')
    saved = {'opt.peak_lr': 0.003, 'train_tokens': 10240, 'seed': 0, 'model.d_model': 64}[key]
    hint = '' if key == 'model.d_model' else ', or ckpt.resume to go on from it with this config'
    with pytest.raises(PicodoError, match=re.escape(f'checkpoint {ckpt}/20 has {key}={saved} but the config says {value}: '
                                                    f'another run (set ckpt.dir){hint}') + '$'):
        train.train(tiny_cfg('train_tokens=10240', change, f'ckpt.dir={ckpt}'), str(tmp_path))
    assert {p: os.path.getmtime(p) for p in glob.glob(f'{ckpt}/**', recursive=True)} == before
    if key == 'opt.peak_lr':
        _, last = train.train(tiny_cfg('train_tokens=12800', change, f'ckpt.dir={ckpt}', f'ckpt.resume={ckpt}'), str(tmp_path))
        assert last['step'] == 25 and (ckpt / '25').is_dir()


def test_a_full_disk_is_one_clear_error_before_writing(finished_run, tiny_cfg, tmp_path, monkeypatch):
    """With less free space than the state needs, the step-25 save stops the run with one line naming the
    checkpoint dir, before orbax's background writer could fail; the step-20 checkpoint stays as it was."""
    ckpt = shutil.copytree(finished_run[2], tmp_path / 'ckpt')
    before = {p: os.path.getmtime(p) for p in glob.glob(f'{ckpt}/**', recursive=True)}
    monkeypatch.setattr(shutil, 'disk_usage', lambda path: shutil._ntuple_diskusage(10**12, 10**12 - 4096, 4096))
    with pytest.raises(PicodoError, match=rf'^no room for checkpoint 25 in {ckpt}: \d+ MiB needed, 0 MiB free$'):
        train.train(tiny_cfg('train_tokens=15360', 'ckpt.every=5', f'ckpt.dir={ckpt}', f'ckpt.resume={ckpt}'), str(tmp_path))
    assert {p: os.path.getmtime(p) for p in glob.glob(f'{ckpt}/**', recursive=True)} == before


def test_the_disk_check_counts_a_replicated_array_once(tmp_path, monkeypatch):
    """8 devices each hold a copy of a replicated 1 MiB array, but the checkpoint stores it once: 2 MiB free is room."""
    sharding = jax.sharding.NamedSharding(jax.make_mesh((8,), ('data',)), jax.sharding.PartitionSpec())
    state = {'w': jax.device_put(np.ones(2**18, np.float32), sharding)}
    monkeypatch.setattr(shutil, 'disk_usage', lambda path: shutil._ntuple_diskusage(10**12, 10**12 - 2**21, 2**21))
    with ocp.CheckpointManager(tmp_path / 'ckpt') as manager:
        train.save(manager, 1, state, {'step': 1})
        manager.wait_until_finished()
        assert manager.latest_step() == 1
    state['w'] = jax.device_put(np.ones(2**19 + 1, np.float32), sharding)  # just over 2 MiB: no room
    with ocp.CheckpointManager(tmp_path / 'ckpt2') as manager, pytest.raises(PicodoError, match=r'2 MiB needed, 2 MiB free$'):
        train.save(manager, 1, state, {'step': 1})


@pytest.mark.parametrize('case', ['a file', 'under a file', 'read-only'])
def test_a_ckpt_dir_that_cannot_be_written_is_one_line_before_training(tiny_cfg, tmp_path, monkeypatch, case):
    """Checked before the first step: found at the first save, it would cost the steps before it."""
    (tmp_path / 'f').write_text('mine')
    ckpt = {'a file': tmp_path / 'f', 'under a file': tmp_path / 'f' / 'ckpt', 'read-only': tmp_path / 'ro'}[case]
    if case == 'read-only':  # os.access, not chmod: root (CI may run as root) writes through a chmod
        real = os.access
        monkeypatch.setattr(os, 'access', lambda p, mode: False if str(p) == str(ckpt) else real(p, mode))
    monkeypatch.setattr(train, 'create_state', lambda *_: pytest.fail('got past the check'))
    with pytest.raises(PicodoError, match=f'^ckpt.dir {ckpt} is not a writable directory$'):
        train.train(tiny_cfg(f'ckpt.dir={ckpt}'), str(tmp_path))
    assert (tmp_path / 'f').read_text() == 'mine'


def corrupt(ckpt):
    for path in glob.glob(f'{ckpt}/20/state/**/*', recursive=True):
        if os.path.isfile(path) and os.path.getsize(path) > 100:
            open(path, 'r+b').truncate(50)


def no_checkpoint(tmp_path):
    (tmp_path / 'empty').mkdir()
    return str(tmp_path / 'empty')


@pytest.mark.parametrize('case,message', [
    ('missing', 'checkpoint not found: '),
    ('empty', 'no complete checkpoint in '),
    ('shape', r'checkpoint .*/20 has model.d_model=64 but the config says 32'),
    ('corrupt', r'cannot restore checkpoint .*/20: '),
])
def test_bad_checkpoints_get_a_clear_error_and_nothing_is_deleted(finished_run, tiny_cfg, tmp_path, case, message):
    ckpt = str(shutil.copytree(finished_run[2], tmp_path / 'ckpt'))
    resume = {'missing': ckpt + '/nope', 'empty': no_checkpoint(tmp_path)}.get(case, ckpt)
    if case == 'corrupt':
        corrupt(ckpt)
    files = sorted(glob.glob(f'{ckpt}/**', recursive=True))
    overrides = ['model.d_model=32'] if case == 'shape' else []
    with pytest.raises(PicodoError, match=message) as e:
        train.train(tiny_cfg(f'ckpt.resume={resume}', f'ckpt.dir={tmp_path / "new"}', *overrides), str(tmp_path))
    assert '\n' not in str(e.value)
    assert sorted(glob.glob(f'{ckpt}/**', recursive=True)) == files
    assert case in ('shape', 'corrupt') or not (tmp_path / 'new').exists()  # no empty run dir (holding its lock) is left behind
    if case == 'corrupt':  # the failed reads' tasks stay silent even after logging is set up again, as for a sweep's next run
        logging.config.dictConfig({'version': 1, 'disable_existing_loggers': False})  # (it re-enabled a .disabled logger)
        assert not logging.getLogger('asyncio').isEnabledFor(logging.ERROR)


@pytest.mark.parametrize('damaged', ['**/d/*', 'ocdbt.process_0/d/*'])
def test_a_damaged_checkpoint_from_the_command_line_is_one_line_naming_the_file(finished_run, tmp_path, damaged):
    """The error names the array file orbax could not read, and nothing comes before or after it: orbax closes its
    event loop with reads still in flight, whose TensorStore threads printed a dozen 'Event loop is closed' tracebacks
    (before the error line 3 runs in 4). With the arrays' chunks damaged, not their metadata, orbax's error hid the file
    in its cause, and the failed reads, freed as the process exited, printed a traceback each (hundreds of lines)."""
    ckpt = str(shutil.copytree(finished_run[2], tmp_path / 'ckpt'))
    for path in glob.glob(f'{ckpt}/20/state/{damaged}', recursive=True):  # the arrays' data, not the checkpoint's metadata
        open(path, 'r+b').truncate(10)
    args = [a.replace('train_tokens=10240', 'train_tokens=12800') for a in finished_run[1]]  # 5 steps past the checkpoint
    p = launch(tmp_path, [*args, f'ckpt.resume={ckpt}', f'ckpt.dir={tmp_path / "new"}'])
    out = p.communicate(timeout=300)[0]
    assert p.returncode == 1 and len(out.strip().splitlines()) == 1, out[-3000:]
    assert re.fullmatch(rf'error: cannot restore checkpoint {ckpt}/20: ValueError: .*Error reading .* local file "{ckpt}/20/state/(d/\w+)?": '
                        r'Requested byte range \[\d+, \d+\) is not valid for value of size 10 \(damaged\? to go on from the step before, move this one away\)\n', out), out  # not TensorStore's spec


def test_ctrl_c_stops_a_sweep_after_checkpointing_its_current_run(tmp_path, stdlib_data):
    """Ctrl-C in `-m`: the running point checkpoints and the sweep ends there with exit code 130 (it used to go
    on with the next point, so each point took its own Ctrl-C)."""
    args = [*TINY, 'train_tokens=10240', 'log_every=1', f'data.train_path={stdlib_data[0]}',
            f'data.val_path={stdlib_data[1]}', f'hydra.sweep.dir={tmp_path}/sweep']
    p = launch(tmp_path, ['-m', 'opt.peak_lr=1e-3,2e-3', *args], delay=0.2)
    wait_for(lambda: len(records(tmp_path / 'sweep' / '0')) >= 2, p)
    p.send_signal(signal.SIGINT)
    out = p.communicate(timeout=120)[0]
    assert p.returncode == 128 + signal.SIGINT and 'stopped after step' in out, out[-3000:]
    assert sorted(os.listdir(tmp_path / 'sweep')) == ['0', 'multirun.yaml']  # the second point never started
    stopped = re.search(r'stopped after step (\d+)', out).group(1)
    assert [os.path.basename(d) for d in glob.glob(f'{tmp_path}/checkpoints/local/*/[0-9]*')] == [stopped]  # one run saved


def test_a_signal_sets_the_stop_flag_instead_of_killing():
    previous = signal.getsignal(signal.SIGINT)
    with utils.stop_signals() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        assert stop == [signal.SIGINT]
    assert signal.getsignal(signal.SIGINT) is previous


def test_a_second_signal_acts_as_usual():
    """The first SIGINT asks the loop to stop; a second (a stop that takes too long) goes to the handler from before."""
    fired, previous = [], signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, lambda *_: fired.append(1))
    try:
        with utils.stop_signals() as stop:
            for _ in range(2):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.01)
            assert stop == [signal.SIGINT] and fired == [1]
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_step_dir_is_found_by_what_it_holds_not_by_its_name(finished_run, tmp_path):
    """`ckpt.resume=DIR/20/` (a trailing slash, as tab completion leaves it) is that step; a checkpoint dir whose
    name is a number (wandb.name=777) is a checkpoint dir, not a step."""
    assert train.find_checkpoint(finished_run[2] + '/20/')[1] == 20
    assert train.find_checkpoint(finished_run[2] + '/15')[1] == 15
    numbered = shutil.copytree(finished_run[2], tmp_path / '777')
    manager, step = train.find_checkpoint(str(numbered) + '/')
    assert step == 20 and str(manager.directory) == str(numbered)


def fake_checkpoints(path, cfg, steps):
    """Checkpoints of a one-array state ((model, optimizer) as create_state's: here ({'w': ...},)) saved with `cfg` as
    their config: what restore and train() read of them, without a model to build or compile."""
    with ocp.CheckpointManager(path) as manager:
        for step in steps:
            train.save(manager, step, ({'w': np.full(2, step, np.float32)},), {'step': step, 'config': OmegaConf.to_container(cfg, resolve=True)})
    return str(path)


def test_restore_lets_free_keys_change_and_names_a_changed_parameter_tree(tiny_cfg, tmp_path):
    """The same run relaunched may move its data, change its attention kernel, remat, dtype (bf16 on an A100, then fp16
    on a T4), grad_accum, dist.*, peak_flops, how it evaluates, logs and saves (eval_batches, wandb.*, ckpt.every);
    a checkpoint of another parameter tree (model.scan stacks the layers) is one line naming the key, not orbax's error."""
    manager, step = train.find_checkpoint(fake_checkpoints(tmp_path / 'ckpt', tiny_cfg(), [5]))
    moved = tiny_cfg('data.train_path=/elsewhere/train.bin', 'data.val_path=/elsewhere/val.bin', 'model.attn_impl=xla',
                     'model.remat=dots', 'grad_accum=2', 'peak_flops=1e12', 'dist.num_processes=1', 'sample_tokens=4', 'model.dtype=float16',
                     'eval_batches=3', 'log_every=7', 'eval_every=9', 'ckpt.every=3', 'ckpt.keep=5', 'wandb.mode=disabled', 'wandb.project=other')
    state, meta = train.restore(manager, step, moved, ({'w': np.zeros(2, np.float32)},), same_run=True)
    np.testing.assert_array_equal(state[0]['w'], [5, 5])
    assert meta['step'] == 5
    with pytest.raises(PicodoError, match=re.escape(f'checkpoint {tmp_path}/ckpt/5 has model.scan=false but the config says true')):
        train.restore(manager, step, tiny_cfg('model.scan=true'), ({'w': np.zeros(2, np.float32)},))


def test_a_changed_batch_size_is_named_first_and_without_the_ckpt_resume_hint(tiny_cfg, tmp_path):
    """A relaunch into a checkpoint dir whose run had another batch_size and another opt.peak_lr (which comes first in
    the config): the line names batch_size, which ckpt.resume cannot change either, and does not suggest it; with only
    opt.peak_lr changed, it does."""
    manager, step = train.find_checkpoint(fake_checkpoints(tmp_path / 'ckpt', tiny_cfg(), [5]))
    state = ({'w': np.zeros(2, np.float32)},)
    with pytest.raises(PicodoError, match=re.escape(f'checkpoint {tmp_path}/ckpt/5 has batch_size=16 but the config says 8: '
                                                    'another run (set ckpt.dir)') + '$'):
        train.restore(manager, step, tiny_cfg('opt.peak_lr=0.002', 'batch_size=8'), state, same_run=True)
    with pytest.raises(PicodoError, match=re.escape(f'checkpoint {tmp_path}/ckpt/5 has opt.peak_lr=0.003 but the config says '
                                                    '0.002: another run (set ckpt.dir), or ckpt.resume to go on from it with this config') + '$'):
        train.restore(manager, step, tiny_cfg('opt.peak_lr=0.002'), state, same_run=True)


def test_ckpt_resume_of_a_step_in_its_own_ckpt_dir(tiny_cfg, tmp_path, monkeypatch):
    """ckpt.resume=DIR/20 with ckpt.dir=DIR (a longer budget for a finished run) starts a new run from step 20; its
    requeue goes on from its own step 25 (it stopped: DIR 'holds step 25, past step 20'). ckpt.resume=DIR/15 there
    would save over the steps after 15 (orbax skips them silently): refused before training."""
    ckpt = fake_checkpoints(tmp_path / 'ckpt', tiny_cfg('train_tokens=10240'), [15, 20])
    restored, branch = [], tiny_cfg('train_tokens=12800', f'ckpt.dir={ckpt}', f'ckpt.resume={ckpt}/20')
    with monkeypatch.context() as m:
        m.setattr(train, 'create_state', lambda *args: (None, ({'w': jnp.zeros(2)},)))
        m.setattr(train, 'restore', lambda manager, step, cfg, state, same_run=False: restored.append((step, same_run)) or 1 / 0)
        with pytest.raises(ZeroDivisionError):
            train.train(branch, str(tmp_path))
        assert restored == [(20, False)]  # from that step, as a new run: its config may differ
        fake_checkpoints(tmp_path / 'ckpt', branch, [25])
        with pytest.raises(ZeroDivisionError):
            train.train(branch, str(tmp_path))
        assert restored == [(20, False), (25, True)]  # its own, as the same run: restore checks the config
    # no 'or ckpt.resume to go on' hint: ckpt.resume is what changed
    with pytest.raises(PicodoError, match=re.escape(f'checkpoint {ckpt}/25 has ckpt.resume=\"{ckpt}/20\" but the config says \"{ckpt}/15\": another run (set ckpt.dir)') + '$'):
        train.train(tiny_cfg('train_tokens=12800', f'ckpt.dir={ckpt}', f'ckpt.resume={ckpt}/15'), str(tmp_path))
    assert sorted(os.listdir(ckpt)) == ['.lock.0', '15', '20', '25']


def test_a_dir_0_in_ckpt_dir_is_refused_not_deleted(tiny_cfg, tmp_path):
    """A dir named 0 (a one-point sweep's, say) is no checkpoint of this trainer (it saves from step 1): it read as 'no
    checkpoint', the run trained from scratch, and orbax, counting it as step 0, deleted it under ckpt.keep."""
    (tmp_path / 'ck' / '0').mkdir(parents=True)
    (tmp_path / 'ck' / '0' / 'notes.txt').write_text('mine')
    with pytest.raises(PicodoError, match=re.escape(f'{tmp_path / "ck"} holds a dir 0, not from this trainer (it saves from step 1): '
                                                    'orbax would delete it: set ckpt.dir') + '$'):
        train.train(tiny_cfg('train_tokens=5120', 'ckpt.every=5', 'ckpt.keep=1', f'ckpt.dir={tmp_path / "ck"}'), str(tmp_path))
    assert (tmp_path / 'ck' / '0' / 'notes.txt').read_text() == 'mine' and sorted(os.listdir(tmp_path / 'ck')) == ['.lock.0', '0']
    cfg = tiny_cfg('train_tokens=5120', 'ckpt.every=5', 'ckpt.keep=1', f'ckpt.dir={tmp_path / "ck2"}')
    (fake_checkpoints(tmp_path / 'ck2', cfg, [5]), (tmp_path / 'ck2' / '0').mkdir())  # beside the run's own steps, too
    with pytest.raises(PicodoError, match=re.escape(f'{tmp_path / "ck2"} holds a dir 0, not from this trainer')):
        train.train(cfg, str(tmp_path))
    assert sorted(os.listdir(tmp_path / 'ck2')) == ['.lock.0', '0', '5']


def test_a_second_launch_of_a_running_run_is_one_line_and_touches_nothing(finished_run, tiny_cfg, tmp_path):
    """The same command launched twice at once: the second deleted the first's unfinished checkpoint and both saved into
    one dir (one died with ~380 lines of orbax tracebacks). A lock in the run's ckpt dir, held while it trains, refuses
    the second in one line; once the first ends (here: the process holding the lock), the relaunch resumes."""
    ckpt = shutil.copytree(finished_run[2], tmp_path / 'ckpt')  # the finished run's dir, as if it were still training
    shutil.rmtree(ckpt / '20'), (ckpt / '20.orbax-checkpoint-tmp-1').mkdir()  # and saving step 20 right now
    holder = subprocess.Popen([sys.executable, '-c', f'import os, sys; f = open({str(ckpt / ".lock.0")!r}, "a"); '
                               'os.lockf(f.fileno(), os.F_LOCK, 0); print("locked", flush=True); sys.stdin.read()'],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == 'locked\n'
        cfg = tiny_cfg('train_tokens=10240', 'ckpt.every=5', f'ckpt.dir={ckpt}')  # its 20 steps: 5 more
        with pytest.raises(PicodoError, match=f'^{re.escape(str(ckpt))} is in use by another process: the same run launched twice\\?$'):
            train.train(cfg, str(tmp_path / 'run1'))
        assert sorted(os.listdir(ckpt)) == ['.lock.0', '10', '15', '20.orbax-checkpoint-tmp-1'] and not (tmp_path / 'run1' / 'metrics.jsonl').exists()
    finally:
        holder.communicate('')  # its lock goes with it
    assert train.train(cfg, str(tmp_path / 'run2'))[1]['step'] == 20 and sorted(os.listdir(ckpt)) == ['.lock.0', '10', '15', '20']


def test_the_lock_is_held_until_the_last_save_is_written(tiny_cfg, tmp_path, monkeypatch):
    """The final (or stop) checkpoint is written while the checkpoint manager closes: released before it, the lock let a
    second launch in, which deleted that unfinished save and trained the steps again (the first then died in orbax)."""
    ckpt, free, close = tmp_path / 'ckpt', [], train.ocp.CheckpointManager.close
    def close_and_probe(self):  # another process tries the lock while this run's saver closes
        probe = f'import os; f = open({str(ckpt / ".lock.0")!r}, "a"); os.lockf(f.fileno(), os.F_TLOCK, 0)'
        free.append(subprocess.run([sys.executable, '-c', probe], capture_output=True).returncode == 0)
        return close(self)
    monkeypatch.setattr(train.ocp.CheckpointManager, 'close', close_and_probe)
    train.train(tiny_cfg('train_tokens=2560', f'ckpt.dir={ckpt}'), str(tmp_path))
    assert free == [False]


def test_a_killed_saves_unfinished_step_goes_when_its_run_resumes(tiny_cfg, tmp_path, monkeypatch):
    """A run killed while saving step 10 leaves 10.orbax-checkpoint-tmp-*, a whole state's size; its relaunch resumes
    at step 5 and removes it (orbax would only if it saved step 10 again: not with another ckpt.every, say)."""
    ckpt = fake_checkpoints(tmp_path / 'ckpt', tiny_cfg('train_tokens=10240'), [5])
    os.mkdir(f'{ckpt}/10.orbax-checkpoint-tmp-1234')
    monkeypatch.setattr(train, 'create_state', lambda *args: (None, ({'w': jnp.zeros(2)},)))
    monkeypatch.setattr(train, 'compile_steps', lambda *args: 1 / 0)  # right after the cleanup: stop there
    with pytest.raises(ZeroDivisionError):
        train.train(tiny_cfg('train_tokens=10240', f'ckpt.dir={ckpt}', 'ckpt.every=7'), str(tmp_path))
    assert sorted(os.listdir(ckpt)) == ['.lock.0', '5']


@pytest.mark.parametrize('key,value,saved', [('model.n_heads', 2, 4), ('model.vocab_size', 300, 256)])
def test_ckpt_resume_refuses_a_model_whose_weights_have_the_same_shapes_but_not_the_same_meaning(tiny_cfg, tmp_path, key, value, saved):
    """n_heads (the same weights cut into other heads) and a vocab_size within the same 128-padding (256 and 300 both
    pad to 384) leave the parameter tree as it was: orbax restores it, so only the key check stands between ckpt.resume
    and a run that goes on with the saved weights read as another model."""
    manager, step = train.find_checkpoint(fake_checkpoints(tmp_path / 'ckpt', tiny_cfg(), [5]))
    with pytest.raises(PicodoError, match=re.escape(f'checkpoint {tmp_path}/ckpt/5 has {key}={saved} but the config says {value}') + '$'):
        train.restore(manager, step, tiny_cfg(f'{key}={value}'), ({'w': np.zeros(2, np.float32)},))
