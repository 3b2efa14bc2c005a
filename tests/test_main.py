"""The user's commands, run as a user runs them: `python main.py ...` in a fresh directory."""
import glob, importlib.util, json, os, platform, re, signal, subprocess, sys, time
from types import SimpleNamespace
import pytest
import train, utils
from conftest import REPO, TINY, make_cfg, write_tokens


def run_main(cwd, *overrides):
    env = dict(os.environ, WANDB_MODE='offline', HYDRA_FULL_ERROR='0')
    return subprocess.run([sys.executable, os.path.join(REPO, 'main.py'), *overrides],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize('name', [os.path.basename(f)[:-5] for f in glob.glob(os.path.join(REPO, 'configs', '*.yaml'))])
def test_every_config_composes_and_has_only_known_keys(name):
    cfg = make_cfg(name=name)
    train.check_config(cfg)
    c = train.model_config(cfg.model)
    assert c.d_model % c.n_heads == 0 and cfg.batch_size % cfg.grad_accum == 0


@pytest.mark.parametrize('backend,capability,dtype,impl', [
    ('gpu', '9.0', 'bfloat16', 'cudnn'), ('gpu', '8.0', 'bfloat16', 'cudnn'), ('gpu', '12.0', 'bfloat16', 'cudnn'),
    ('gpu', '7.5', 'float32', 'xla'), ('gpu', '9.0', 'float32', 'xla'), ('gpu', 'gfx90a', 'bfloat16', 'xla'),
    ('gpu', None, 'bfloat16', 'xla'), ('cpu', None, 'float32', 'chunked'), ('tpu', None, 'bfloat16', 'xla'),
    ('gpu', '8.6', 'float16', 'cudnn'), ('gpu', '7.5', 'float16', 'xla')])
def test_auto_attention_per_platform(monkeypatch, backend, capability, dtype, impl):
    """cuDNN's flash attention needs bf16 or fp16 and compute capability 8.0 or more: a Colab T4 (7.5) gets XLA's."""
    device = SimpleNamespace(**({'compute_capability': capability} if capability else {}))
    monkeypatch.setattr(train.jax, 'default_backend', lambda: backend)
    monkeypatch.setattr(train.jax, 'devices', lambda *_: [device])
    assert train.model_config(make_cfg(f'model.dtype={dtype}', name='colab').model).attn_impl == impl


@pytest.mark.parametrize('capability,override,impl', [
    ('9.0', 'model.seq_len=1023', 'xla'), ('9.0', 'model.n_heads=64', 'xla'), ('8.0', 'model.n_heads=4', 'xla'),
    ('9.0', 'model.n_heads=4', 'cudnn'), ('12.0', 'model.n_heads=2', 'xla')])
def test_auto_attention_leaves_cudnn_out_for_shapes_it_cannot_train(monkeypatch, capability, override, impl):
    """JAX's cuDNN attention trains an even seq_len only, and head widths that are multiples of 8 up to 128 (256 from
    Hopper): K=12 (64 heads), K=192 on an A100, K=384 or T=1023 anywhere get XLA's attention, not a NotImplementedError."""
    monkeypatch.setattr(train.jax, 'default_backend', lambda: 'gpu')
    monkeypatch.setattr(train.jax, 'devices', lambda *_: [SimpleNamespace(compute_capability=capability)])
    assert train.model_config(make_cfg(override, name='colab').model).attn_impl == impl


def test_default_is_gpt2_small():
    m = make_cfg(name='default').model
    assert (m.vocab_size, m.seq_len, m.d_model, m.n_layers, m.n_heads) == (50257, 1024, 768, 12, 12)


def test_colab_with_peak_lr_override():
    cfg = make_cfg('opt.peak_lr=0.004', name='colab')
    assert cfg.opt.peak_lr == 0.004 and cfg.data.train_path.startswith('/content/')
    assert max(train.lr_schedule(cfg.opt, 1000)(s) for s in range(0, 1000, 5)) == pytest.approx(0.004)


def test_processes_of_one_run_share_its_name_and_checkpoint_dir():
    """The run name (from Hydra's override_dirname) names the checkpoint dir: each process of a multi-host run, and a
    relaunch with another coordinator or peak, must find the same one; a change to the run itself must not."""
    from hydra import compose, initialize_config_dir
    def name(*overrides):
        with initialize_config_dir(os.path.join(REPO, 'configs'), version_base=None):
            return compose('local', overrides=list(overrides), return_hydra_config=True).hydra.job.override_dirname
    runs = [name('opt.peak_lr=0.01', f'dist.coordinator=10.0.0.1:{port}', 'dist.num_processes=2', f'dist.process_id={i}',
                 'peak_flops=1e12') for i, port in [(0, 1234), (1, 1234), (1, 4321)]]
    assert runs == [name('opt.peak_lr=0.01')] * 3 and name('opt.peak_lr=0.02') != runs[0]
    # a run begun from a checkpoint is a run of its own: not `python main.py`'s dir (the README's example once was)
    branch = name('ckpt.resume="checkpoints/local/train_tokens=409600"')  # as the shell passes it
    assert utils.run_name('local', branch) == 'local/ckpt.resume=checkpoints_local_train_tokens=409600' != utils.run_name('local', name())


def test_launches_in_the_same_second_get_their_own_output_dirs():
    """Hydra's default dir names the second: a job array or a shell loop launched two runs into one dir, whose
    metrics.jsonl then held both runs' records. The dirs name the microsecond."""
    from hydra import compose, initialize_config_dir
    with initialize_config_dir(os.path.join(REPO, 'configs'), version_base=None):
        runs = [compose(name, return_hydra_config=True).hydra for name in ('local', 'local', 'colab', 'default')]
    assert len({r.run.dir for r in runs}) == len({r.sweep.dir for r in runs}) == 4
    assert all(re.fullmatch(rf'{top}/\d{{4}}-\d\d-\d\d/\d\d-\d\d-\d\d\.\d{{6}}', dir)
               for r in runs for top, dir in (('outputs', r.run.dir), ('multirun', r.sweep.dir)))


def test_local_run_builds_its_data_and_trains(tmp_path):
    """`python main.py` with no data: builds the stdlib byte corpus, trains, evaluates, exits 0."""
    r = run_main(tmp_path, 'train_tokens=20480', 'eval_every=5', 'hydra.run.dir=run')  # 5 steps of 32x128
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'built byte-level corpus' in r.stdout
    assert (tmp_path / 'data' / 'stdlib_bytes_train.bin').exists()
    records = [json.loads(l) for l in open(tmp_path / 'run' / 'metrics.jsonl')]
    assert records[-1]['eval_loss'] < 5.6
    assert glob.glob(str(tmp_path / 'run' / 'wandb' / 'offline-run-*'))  # wandb offline, no prompt


@pytest.mark.parametrize('args,message', [
    (['-cn', 'colab'], 'error: data file not found: /content/fineweb_edu_gpt2_train.bin (prepare.py gets or makes .bin files: README, "Getting data")'),
    (['opt.peak_lrr=1'], 'error: unknown config key: opt.peak_lrr\n'),  # checked before Hydra's (which says 'not in struct')
    (['ckpt.resume=checkpoints/local/a=1,b=2'], "error: ckpt.resume: a value holding '=' or '~' needs quotes: "  # a run dir's name
                                                '\'ckpt.resume="checkpoints/local/a=1,b=2"\'\n'),  # (Hydra: mismatched input '=')
    (['ckpt.dir=~/ck'], "error: ckpt.dir: a value holding '=' or '~' needs quotes: 'ckpt.dir=\"~/ck\"'\n"),  # Hydra: a lexer error
    (['ckpt.dir=${oc.env:A}~${oc.env:B}'], "error: ckpt.dir: a value holding '=' or '~' needs quotes: "),  # ~ between two ${...}
    (['ckpt.resume="checkpoints/local/a=1,b=2"'], 'error: data file not found: '),  # quoted, Hydra takes it: the trainer's check
    (['model.remat=dot'], 'error: bad config value: model.remat=dot (one of none, dots, full)'),
    (['data.train_path=${oc.env:PICODO_UNSET_VAR}/t.bin'], 'error: bad config value: data.train_path: KeyError raised while '
     'resolving interpolation: "Environment variable \'PICODO_UNSET_VAR\' not found"\n'),  # was a traceback (the run name's)
    (['wandb.name=${oc.env:PICODO_UNSET_VAR}'], 'error: bad config value: wandb.name: KeyError raised while resolving'),  # so
    (['model=big'], "error: bad config value: model='big' (a group of keys: set one as model.KEY=VALUE)\n"),  # was 'model.vocab_size=None'
    (['batch_size=30'], 'error: batch_size 30 must split into grad_accum=1 micro-batches'),
    (['dist.num_processes=2', 'dist.process_id=1'], 'error: dist.* keys: cannot join the processes of the run: '),
    (['dist.process_id=1'], 'error: dist.* keys: cannot join the processes of the run: '),  # alone, it trained as one process
    (['ckpt.resume='], 'error: ckpt.resume is empty (an unset shell variable?): leave it out, or null, for its default\n'),  # ignored: from scratch
    (['ckpt.dir='], 'error: ckpt.dir is empty (an unset shell variable?): leave it out, or null, for its default\n'),  # ignored: checkpoints/...
    (['dist.coordinator=localhost:notaport', 'dist.num_processes=1', 'dist.process_id=0'],  # JAX: a segfault (exit code 139)
     "error: bad config value: dist.coordinator='localhost:notaport' (must be host:port, the port 1-65535)\n"),
])
def test_bad_input_exits_nonzero_with_a_clear_line(tmp_path, args, message):
    r = run_main(tmp_path, *TINY[:-3], 'data.build_if_missing=false', *args)
    assert r.returncode != 0
    assert message in r.stderr
    assert 'Traceback' not in r.stderr


@pytest.mark.parametrize('args,line,culprit', [
    (['-cn', 'colb'], "error: Cannot find primary config 'colb'. Check that it's in your config search path.\n", 'colb'),  # Hydra: 7 lines
    (['seed=1)'], "error: Error parsing override 'seed=1)' extraneous input ')' expecting <EOF> See https://hydra.cc/", 'seed=1)'),  # 5
    (['ckpt.dir=a,b'], "error: Ambiguous value for argument 'ckpt.dir=a,b' 1. To use it as a list, use key=[value1,value2] 2. To "
                       "use it as string, quote the value: key=\\'value1,value2\\' 3. To sweep over it, add --multirun", 'a,b'),  # 6
    (['hydra.run.dir=a_file/run'], "error: [Errno 20] Not a directory: 'a_file/run' (making the run dir: hydra.run.dir, or "
                                   "hydra.sweep.dir with -m)\n", 'a_file'),  # a 20-line traceback
    (['hydra.run.dir=${oc.env:PICODO_UNSET_VAR}/run'], 'error: KeyError raised while resolving interpolation: "Environment '
     "variable 'PICODO_UNSET_VAR' not found\" full_key: hydra.run.dir", 'hydra.run.dir'),  # 30
    (['dist.coordinator=[::1]:1234'], "error: mismatched input ':' expecting <EOF> See https://hydra.cc/",
     '(in dist.coordinator=[::1]:1234)\n'),  # the override, which Hydra's message leaves out, added
    (['hydra.job.chdir=notabool'], "error: Error merging override hydra.job.chdir=notabool: Value 'notabool' is not a valid "
     'bool (type str)\n', 'notabool'),  # the cause (OmegaConf's), which Hydra printed on a line of its own
])
def test_hydras_own_errors_are_one_line(tmp_path, args, line, culprit):
    """What Hydra refuses before the trainer runs (a config name, an override's syntax, its output dir) was several lines
    of its own, or a traceback; HYDRA_FULL_ERROR=1 still gives Hydra's traceback."""
    (tmp_path / 'a_file').write_text('')
    r = run_main(tmp_path, *args)
    assert r.returncode == 1 and r.stderr.startswith(line) and r.stderr.count('\n') == 1 and culprit in r.stderr, r.stderr
    assert os.listdir(tmp_path) == ['a_file']  # no outputs/
    if culprit not in ('colb', 'a_file'):  # Hydra's traceback asked for: checked for one of its errors and one OSError
        return
    r = subprocess.run([sys.executable, os.path.join(REPO, 'main.py'), *args], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, HYDRA_FULL_ERROR='1', WANDB_MODE='disabled'), stdin=subprocess.DEVNULL)
    assert r.returncode == 1 and 'Traceback' in r.stderr and not r.stderr.startswith('error: ')


@pytest.mark.parametrize('error', ['omegaconf.errors.ConfigKeyError("a bug")', 'OSError("unreachable")'])
def test_a_bug_in_the_run_keeps_its_traceback(tmp_path, error):
    """An exception from inside the run that the trainer does not know (a bug) keeps its traceback, even of a kind main.py
    turns into one line when Hydra raises it (an OmegaConf error; an OSError from the run is one line already, by main())."""
    main_py = os.path.join(REPO, 'main.py')
    code = (f'import omegaconf, runpy, sys; sys.path.insert(0, {REPO!r}); import train\ndef bug(*args, **kwargs):\n    raise {error}\n'
            f'train.train, sys.argv = bug, [{main_py!r}]; runpy.run_path({main_py!r}, run_name="__main__")')
    r = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, WANDB_MODE='disabled'), stdin=subprocess.DEVNULL)
    assert r.returncode == 1
    if error.startswith('OSError'):
        assert r.stderr == 'error: unreachable\n'
    else:
        assert 'Traceback' in r.stderr and ', in bug\n' in r.stderr and r.stderr.endswith('ConfigKeyError: a bug\n'), r.stderr


def test_a_config_file_without_defaults_is_one_line(tmp_path):
    """A config of one's own that does not build on default.yaml: a traceback (main.py read cfg.wandb.name)."""
    (tmp_path / 'mine.yaml').write_text('batch_size: 16\n')
    r = run_main(tmp_path, '--config-dir', str(tmp_path), '-cn', 'mine')
    assert r.returncode == 1 and r.stderr == ('error: bad config value: model.vocab_size is missing (every key of default.yaml needs '
                                              'a value: a config file begins with defaults: [default, _self_])\n')


@pytest.mark.parametrize('mode', ['ofline', ''])
def test_a_bad_wandb_mode_variable_is_one_line(tmp_path, mode):
    """WANDB_MODE, which wins over wandb.mode, misspelt or set empty: wandb rejected it after the data and the model
    were set up (`wandb: could not start offline (ValidationError: 1 validation error for Settings)`, naming neither)."""
    r = subprocess.run([sys.executable, os.path.join(REPO, 'main.py'), *TINY], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, WANDB_MODE=mode), stdin=subprocess.DEVNULL)
    assert r.returncode == 1 and r.stdout == '' and not os.listdir(tmp_path)
    assert r.stderr == f"error: WANDB_MODE={mode!r}: one of online, offline, disabled, shared, dryrun, or unset\n"


def test_the_wandb_mode_variable_may_be_unset_or_any_mode_wandb_takes():
    """The check in main.py lets through what wandb itself takes (its 'run' is online), and an unset WANDB_MODE, how most
    users run: each reaches main(); a mode in capitals or empty, which wandb rejects, does not. One process, main() stubbed out."""
    code = (f'import hydra, os, runpy, sys; sys.path.insert(0, {REPO!r})\n'
            'hydra.main = lambda **kwargs: lambda f: lambda: print("main", end=" ")  # main.py decorates main with it\n'
            'for mode in [None, "online", "offline", "disabled", "shared", "dryrun", "run", "OFFLINE", ""]:\n'
            '    os.environ.pop("WANDB_MODE") if mode is None else os.environ.update(WANDB_MODE=mode)\n'
            '    sys.argv = ["main.py"]\n'
            '    try:\n'
            f'        runpy.run_path({os.path.join(REPO, "main.py")!r}, run_name="__main__")\n'
            '    except SystemExit as e:\n'
            '        print(mode, e.code)\n')
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, WANDB_MODE='offline'), stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.splitlines() == [f'main {mode} 0' for mode in ['None', 'online', 'offline', 'disabled', 'shared', 'dryrun', 'run']] + [
        f"{mode} error: WANDB_MODE={mode!r}: one of online, offline, disabled, shared, dryrun, or unset" for mode in ['OFFLINE', '']]


@pytest.mark.parametrize('raised,line', [
    ('RESOURCE_EXHAUSTED: Out of memory while trying to allocate 25.45GiB.\nBuffers:...', 'RESOURCE_EXHAUSTED: Out of '
     'memory while trying to allocate 25.45GiB. (lower batch_size, raise grad_accum or set model.remat=dots)'),
    ('INTERNAL: Error dispatching computation: Out of memory allocating 256000000000 bytes.',  # XLA CPU's words
     'INTERNAL: Error dispatching computation: Out of memory allocating 256000000000 bytes. (lower batch_size, raise '
     'grad_accum or set model.remat=dots)'),
    ('RESOURCE_EXHAUSTED: Error writing "x" in OCDBT database: No space left on device [os_error_code=\'28\']\n...',  # orbax's save
     'RESOURCE_EXHAUSTED: Error writing "x" in OCDBT database: No space left on device [os_error_code=\'28\']'),  # no batch advice
    ('INTERNAL: something else\nwhile out of memory', None)])  # any other XLA error keeps its traceback
def test_out_of_memory_is_one_line_saying_what_to_change(tmp_path, raised, line):
    """The most common failure on a GPU, a batch too big for its memory: one line, not XLA's long traceback."""
    code = (f'import runpy, sys, jax; sys.path.insert(0, {REPO!r}); import train\n'
            f'def oom(*args, **kwargs): raise jax.errors.JaxRuntimeError({raised!r})\n'
            f'train.train = oom; sys.argv = ["main.py"]; runpy.run_path({os.path.join(REPO, "main.py")!r}, run_name="__main__")')
    r = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, WANDB_MODE='disabled', HYDRA_FULL_ERROR='0'), stdin=subprocess.DEVNULL)
    assert r.returncode == 1, r.stderr[-2000:]
    if line:
        assert r.stderr.strip().splitlines() == [f'error: {line}'], r.stderr[-2000:]
    else:
        assert 'Traceback' in r.stderr and 'something else' in r.stderr, r.stderr[-2000:]


def test_an_os_error_in_a_run_is_one_line(tmp_path):
    """A disk that fills mid-run under metrics.jsonl (seen: OSError from log()'s print): one line, exit 1 (it was a 20-line
    traceback, printed twice)."""
    code = (f'import runpy, sys; sys.path.insert(0, {REPO!r}); import train\n'
            f'def full(*args, **kwargs): raise OSError(28, "No space left on device")\n'
            f'train.train = full; sys.argv = ["main.py"]; runpy.run_path({os.path.join(REPO, "main.py")!r}, run_name="__main__")')
    r = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, WANDB_MODE='disabled', HYDRA_FULL_ERROR='0'), stdin=subprocess.DEVNULL)
    assert r.returncode == 1 and r.stderr == 'error: [Errno 28] No space left on device\n', r.stderr[-3000:]


def test_wandb_name_names_the_run_and_its_checkpoint_dir(tmp_path):
    """wandb.name, if set, replaces the config's name in the run name (checkpoints/NAME/overrides)."""
    code = (f'import runpy, sys; sys.path.insert(0, {REPO!r}); import train\n'
            f'train.train = lambda cfg, out_dir, name, **kwargs: print("name:", name) or (None, {{}})\n'
            f'sys.argv = ["main.py", "wandb.name=mine", "seed=3"]; runpy.run_path({os.path.join(REPO, "main.py")!r}, run_name="__main__")')
    r = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, WANDB_MODE='disabled', HYDRA_FULL_ERROR='0'), stdin=subprocess.DEVNULL)
    assert r.returncode == 0 and r.stdout.splitlines()[-1] == f'name: {os.path.join("mine", "seed=3")}', r.stdout + r.stderr[-3000:]


@pytest.mark.parametrize('when', ['import', 'start-up', 'gc'])
def test_ctrl_c_before_the_first_step_exits_130_without_a_traceback(tmp_path, stdlib_data, when):
    """Ctrl-C while main.py imports its libraries or builds the model (a GPU compile can take a minute): exit code 130 at
    once, nothing saved, no traceback (it printed a KeyboardInterrupt traceback, and once crashed in XLA's threads).
    gc: the Ctrl-C lands while a garbage collection runs JAX's gc callback, where Python drops the KeyboardInterrupt
    (it printed 'Exception ignored ... KeyboardInterrupt' and the run trained to its end, exit 0; seen once unforced).
    What the run printed before the Ctrl-C reaches its log (stdout a file or a pipe, so buffered, unless PYTHONUNBUFFERED
    is set): the exit skips Python's teardown, which would have written it out."""
    said = 'print("said before the Ctrl-C")'
    interrupt = f'{said}; os.kill(os.getpid(), signal.SIGINT); time.sleep(60)'
    in_gc = f'{said}; gc.callbacks.insert(0, lambda phase, info: phase == "stop" and gc.callbacks.pop(0) and os.kill(os.getpid(), signal.SIGINT)); gc.collect()'
    hook = {'start-up': f'import train\ndef create_state(*args):\n    {interrupt}\ntrain.create_state = create_state\n',
            'gc': f'import gc, train\nreal = train.create_state\ndef create_state(*args):\n    {in_gc}\n    return real(*args)\n'
                  'train.create_state = create_state\n',
            'import': f'import hydra\ndef main(**kwargs):  # called as main.py runs, as its decorator\n    {interrupt}\nhydra.main = main\n'}[when]
    code = (f'import os, runpy, signal, sys, time; sys.path.insert(0, {REPO!r})\n{hook}'
            f'sys.argv = ["main.py", *{TINY!r}, "data.train_path={stdlib_data[0]}", "data.val_path={stdlib_data[1]}", "train_tokens=2560"]\n'
            f'runpy.run_path({os.path.join(REPO, "main.py")!r}, run_name="__main__")')
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONUNBUFFERED'} | {'WANDB_MODE': 'disabled'}  # stdout buffered
    r = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, capture_output=True, text=True, timeout=50,
                       env=env, stdin=subprocess.DEVNULL)
    assert r.returncode == 130 and 'Traceback' not in r.stdout + r.stderr, r.stderr[-2000:]
    assert 'said before the Ctrl-C\n' in r.stdout, r.stdout[-2000:]
    assert not os.path.exists(tmp_path / 'checkpoints') or not glob.glob(f'{tmp_path}/checkpoints/*/*/[0-9]*')


def test_a_failed_sweep_point_ends_its_wandb_run_and_the_next_starts_its_own(tmp_path, stdlib_data):
    """`-m`: a point that fails after wandb.init (here its loader) finishes its wandb run, so the next point's
    wandb.init starts a run of its own instead of returning the failed one and logging into it."""
    code = (f'import runpy, sys; sys.path.insert(0, {REPO!r})\nimport data, utils\n'
            f'def fail(*args): raise utils.PicodoError("the loader failed")\ndata.batches = fail\n'
            f'sys.argv = ["main.py", "-m", "seed=1,2", *{TINY!r}, "data.train_path={stdlib_data[0]}", "data.val_path={stdlib_data[1]}", '
            f'"hydra.sweep.dir=sweep"]\nrunpy.run_path({os.path.join(REPO, "main.py")!r}, run_name="__main__")')
    r = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, WANDB_MODE='offline'), stdin=subprocess.DEVNULL)
    assert r.returncode == 1 and r.stderr.count('error: the loader failed') == 2, r.stderr[-2000:]
    runs = [glob.glob(f'{tmp_path}/sweep/{i}/wandb/offline-run-*/run-*.wandb') for i in (0, 1)]  # a run's records
    assert [len(r) for r in runs] == [1, 1] and os.path.basename(runs[0][0]) != os.path.basename(runs[1][0]), runs


def test_a_run_trains_where_wandb_is_installed_but_broken(tmp_path, stdlib_data):
    """`import wandb` failing (here a stand-in package, as when its protobuf or pydantic is a version it cannot use)
    crashed `python main.py` with a traceback; now one line says so and the run trains and logs to metrics.jsonl."""
    (tmp_path / 'site' / 'wandb').mkdir(parents=True)
    (tmp_path / 'site' / 'wandb' / '__init__.py').write_text("raise ImportError(\"cannot import name 'runtime_version' from 'google.protobuf'\")\n")
    env = dict(os.environ, WANDB_MODE='online', PYTHONPATH=os.pathsep.join([str(tmp_path / 'site'), os.environ.get('PYTHONPATH', '')]))
    r = subprocess.run([sys.executable, os.path.join(REPO, 'main.py'), *TINY, f'data.train_path={stdlib_data[0]}',
                        f'data.val_path={stdlib_data[1]}', 'train_tokens=1024', 'hydra.run.dir=run'], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert r.returncode == 0 and 'Traceback' not in r.stdout + r.stderr, r.stderr[-2000:]
    assert "wandb: unusable (ImportError: cannot import name 'runtime_version' from 'google.protobuf'): not logging to wandb\n" in r.stdout
    assert 'eval_loss' in (tmp_path / 'run' / 'metrics.jsonl').read_text() and not (tmp_path / 'run' / 'wandb').exists()


def test_ctrl_c_while_a_first_run_builds_its_corpus_leaves_no_file(tmp_path):
    """`python main.py` builds the stdlib corpus on its first run: a Ctrl-C then exits 130 without a traceback and
    removes the half-written .tmp file (an os._exit from the signal handler had skipped the build's cleanup)."""
    p = subprocess.Popen([sys.executable, os.path.join(REPO, 'main.py')], cwd=tmp_path, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, env=dict(os.environ, WANDB_MODE='disabled'))
    while not glob.glob(f'{tmp_path}/data/*.tmp'):
        assert p.poll() is None, p.communicate()[0][-2000:]
        time.sleep(0.01)
    p.send_signal(signal.SIGINT)
    out = p.communicate(timeout=120)[0]
    assert p.returncode == 130 and 'Traceback' not in out, out[-2000:]
    assert os.listdir(tmp_path / 'data') == [], os.listdir(tmp_path / 'data')


def test_odd_sized_file_from_the_command_line(tmp_path):
    write_tokens(tmp_path / 'train.bin', [1] * 10_000)
    (tmp_path / 'val.bin').write_bytes(b'\x01' * 20001)
    r = run_main(tmp_path, *TINY, 'data.train_path=train.bin', 'data.val_path=val.bin')
    assert r.returncode == 1 and 'error: val.bin: odd byte size 20001' in r.stderr, r.stderr[-2000:]


FAULTS = '''
import resource, sys, threading, numpy as np
sys.path.insert(0, {repo!r})
import utils
{tune}
(getattr(np, '_core', None) or np.core).multiarray._set_madvise_hugepage(False)  # 4 KiB pages, as XLA's buffers get
def step():  # what XLA's worker threads do each step: allocate big scratch buffers, write them, free them
    for _ in range({rounds}):
        buffers = [np.empty({size}) for _ in range({alive})]  # several at once when steps are queued ahead
        [b.fill(1.0) for b in buffers]
        del buffers
for _ in range(2):  # the second thread runs on a warm heap
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = threading.Thread(target=step); t.start(); t.join()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
'''


@pytest.mark.skipif(platform.libc_ver()[0] != 'glibc' or importlib.util.find_spec('jax_plugins') or importlib.util.find_spec('libtpu'),
                    reason='tunes glibc malloc, and only where JAX runs on CPU')
def test_big_buffers_reuse_their_pages_instead_of_faulting_every_step():
    def faults(tune, rounds=5, alive=1, size=2**24):
        script = FAULTS.format(repo=REPO, tune=tune, rounds=rounds, alive=alive, size=size)
        return int(subprocess.run([sys.executable, '-c', script], check=True, capture_output=True, text=True).stdout)
    assert faults('') > 100_000  # 5 x 128 MiB of fresh pages: one fault per 4 KiB page
    assert faults('utils.keep_freed_memory()') < 1000  # as main.py runs: the pages stay mapped between steps
    # 3 x 768 MiB alive at once (the training loop queues steps ahead): freeing them leaves a free top of the heap over
    # 2 GiB, more than the largest finite trim threshold mallopt takes (2^31 - 1), so only -1 (never trim) keeps it
    assert faults('utils.keep_freed_memory()', rounds=1, alive=3, size=3 * 2**25) < 1000


@pytest.mark.parametrize('arg', ["ckpt.resume='checkpoints/local/a=1,b=2'", 'hydra.job.chdir=true', '+hydra.verbose=true',
                                 'ckpt.dir=${oc.env:SCRATCH,"~/ck"}', 'ckpt.dir=${oc.env:SCRATCH,~/ck}', 'ckpt.dir=a,"~/b"',
                                 '--config-name=colab', '--config-dir=/some/where'])
def test_overrides_that_hydra_takes_get_past_the_command_line_check(monkeypatch, arg):
    """main.py's own check of `key=value` arguments (before Hydra's) lets through a value in single quotes, Hydra's
    own keys, which configs/default.yaml does not list, and Hydra's options in their --name=value form. Hydra itself
    is stubbed out: only the check runs."""
    import hydra, runpy, signal
    monkeypatch.setattr(hydra, 'main', lambda **kwargs: lambda f: lambda: None)
    monkeypatch.setattr(sys, 'argv', ['main.py', arg])
    monkeypatch.setattr(signal, 'signal', lambda *args: None)  # main.py's Ctrl-C handler: not in this process
    with pytest.raises(SystemExit) as e:
        runpy.run_path(os.path.join(REPO, 'main.py'), run_name='__main__')
    assert e.value.code == 0
