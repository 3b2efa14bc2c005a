import json, os, time, types
import re
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
import data, train
from conftest import write_tokens
from utils import PicodoError


def mesh_of(n):
    return jax.make_mesh((n,), ('data',), (jax.sharding.AxisType.Auto,), devices=jax.devices()[:n])


def setup(cfg, n_devices):
    mesh = mesh_of(n_devices)
    tx = train.make_optimizer(cfg.opt, train.lr_schedule(cfg.opt, 100))
    graphdef, state = train.create_state(cfg, mesh, tx)
    step, evaluate = train.compile_steps(graphdef, state)
    return mesh, graphdef, state, in_mesh(mesh, step), in_mesh(mesh, evaluate)


def in_mesh(mesh, f):  # as train.train runs its steps
    def call(*args):
        with jax.set_mesh(mesh):
            return f(*args)
    return call


def first_batch(cfg, mesh, accum=1):
    tokens = data.open_tokens(cfg.data.train_path, 256, cfg.model.seq_len, cfg.batch_size)
    batch = data.get_batch(tokens, cfg.model.seq_len, 0, 0, cfg.batch_size)
    batch = batch.reshape(accum, -1, batch.shape[-1])
    return jax.device_put(batch, NamedSharding(mesh, P(None, 'data')))


def test_every_weight_and_adam_moment_is_split_over_8_devices(tiny_cfg):
    _, _, state, _, _ = setup(tiny_cfg(), 8)
    leaves = jax.tree_util.tree_leaves_with_path(state)
    arrays = [(p, x) for p, x in leaves if x.ndim > 0]
    assert len(arrays) > 30  # params + mu + nu
    for path, x in arrays:
        shard = x.addressable_shards[0].data
        assert len(x.sharding.device_set) == 8, path
        assert shard.size * 8 == x.size, f'{jax.tree_util.keystr(path)} is not split 8 ways'


def test_fsdp_step_on_8_devices_equals_1_device(tiny_cfg):
    """Same losses (rtol 1e-5) and same parameters after two Adam steps at lr 6e-4: atol 1e-5, under 2%
    of one step's size (Adam's first steps are ~lr * sign(g), so a gradient entry near 0 that differs in
    the last bits between reduction orders moves its weight by up to a few 1e-6). The step donates the old state
    (its buffers reused, not a second copy of weights and Adam moments)."""
    cfg = tiny_cfg('opt.warmup_frac=0')
    results = []
    for n in [1, 8]:
        mesh, _, state, step, _ = setup(cfg, n)
        batch = first_batch(cfg, mesh)
        old, (state, m1) = state, step(state, batch)
        assert all(x.is_deleted() for x in jax.tree.leaves(old))
        state, m2 = step(state, batch)
        results.append((float(m1['train_loss']), float(m2['train_loss']), jax.device_get(state[0])))
    (a1, a2, pa), (b1, b2, pb) = results
    np.testing.assert_allclose([a1, a2], [b1, b2], rtol=1e-5)
    assert a2 < a1
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5), pa, pb)


def test_8_device_step_gathers_weights_never_activations(tiny_cfg):
    """FSDP: the compiled step all-gathers weight shards (whole or one layer of the stack); the batch stays split."""
    cfg = tiny_cfg('model.attn_impl=chunked')
    mesh, graphdef, state, _, _ = setup(cfg, 8)
    step, _ = train.compile_steps(graphdef, state)
    with jax.set_mesh(mesh):
        hlo = step.lower(state, first_batch(cfg, mesh)).compile().as_text()
    weights = {tuple(sorted(s)) for x in jax.tree.leaves(state[0]) for s in (x.shape, x.shape[1:])}
    gathered = re.findall(r'= \w+\[([\d,]*)\][^ ]* all-gather\(', hlo)
    assert gathered and all(tuple(sorted(int(d) for d in g.split(',') if d)) in weights for g in gathered), gathered


def test_grad_accumulation_equals_one_big_batch(tiny_cfg):
    cfg = tiny_cfg('opt.warmup_frac=0')  # the step moves the weights (a warmup once ran it at lr 0: the weight check was void)
    out = []
    for accum in [1, 4]:
        mesh, _, state, step, _ = setup(cfg, 2)
        state, m = step(state, first_batch(cfg, mesh, accum))
        out.append((float(m['train_loss']), float(m['grad_norm']), jax.device_get(state[0])))
    np.testing.assert_allclose(out[0][:2], out[1][:2], rtol=1e-5)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5), out[0][2], out[1][2])  # Adam: ~lr * sign(g)


def step_gradients(cfg):
    """The loss and gradients train_step computes (kept as the state of an optimizer that leaves the weights as they are)."""
    keep = optax.GradientTransformation(lambda p: jax.tree.map(jnp.zeros_like, p), lambda g, s, p=None: (jax.tree.map(jnp.zeros_like, g), g))
    mesh = mesh_of(1)
    graphdef, state = train.create_state(cfg, mesh, keep)
    state, metrics = in_mesh(mesh, train.compile_steps(graphdef, state)[0])(state, first_batch(cfg, mesh))
    grads = jax.tree_util.tree_leaves_with_path(nnx.merge(graphdef, state)[1].opt_state)
    return float(metrics['train_loss']), {jax.tree_util.keystr(k): np.asarray(g) for k, g in grads}


def test_float16_gradients_do_not_underflow(tiny_cfg):
    """model.dtype=float16 (for GPUs without bfloat16 matmuls: a T4, a V100): each token's share of the gradient of a
    loss averaged over 32k tokens (GPT-2 small's 32 x 1024) falls below float16's normal range unless the loss is scaled
    up. Every weight's gradient stays within 1% of float32's (unscaled: up to 4%; bfloat16: 0.5%), and the loss is the loss."""
    cfg = lambda dtype: tiny_cfg(f'model.dtype={dtype}', 'batch_size=1024')  # 1024 x 32 tokens
    (loss32, g32), (loss16, g16) = step_gradients(cfg('float32')), step_gradients(cfg('float16'))
    assert loss16 == pytest.approx(loss32, rel=1e-3)
    error = {k: np.linalg.norm(g16[k] - g32[k]) / np.linalg.norm(g32[k]) for k in g32}
    assert len(error) > 10 and max(error.values()) < 0.01, sorted(error.items(), key=lambda kv: -kv[1])[:3]


def test_float16_loss_scale_is_capped_so_large_gradients_do_not_overflow(tiny_cfg, tmp_path):
    """The loss scale stops at 2^14 (scaled weight gradients must stay under float16's 65504): with 2^17 tokens in a
    micro-batch, 90% of them one token, gradients reach 3 (that token's embedding row) and 0.53 (attention's output
    projection). Scaled by 2^17 the latter overflows to inf (checked by raising the cap); capped, every weight's gradient
    stays finite and within 1% of float32's."""
    rng = np.random.default_rng(0)
    path = write_tokens(tmp_path / 'skewed.bin', np.where(rng.random(400_000) < 0.9, 97, rng.integers(0, 256, 400_000)))
    cfg = lambda dtype: tiny_cfg(f'model.dtype={dtype}', 'batch_size=4096', f'data.train_path={path}', f'data.val_path={path}')
    (loss32, g32), (loss16, g16) = step_gradients(cfg('float32')), step_gradients(cfg('float16'))  # 4096 x 32 tokens
    assert max(np.abs(g).max() for g in g32.values()) > 2 and loss16 == pytest.approx(loss32, rel=1e-3)
    error = {k: np.linalg.norm(g16[k] - g32[k]) / np.linalg.norm(g32[k]) for k in g32}
    assert len(error) > 10 and max(error.values()) < 0.01, sorted(error.items(), key=lambda kv: -kv[1])[:3]


@pytest.mark.parametrize('scan', [False, True])  # with the scan, a model merged outside the eval loop failed to trace
def test_eval_runs_in_the_training_micro_batches(tiny_cfg, scan):
    """grad_accum is there because a whole batch does not fit: the eval step takes the same [A, B/A, T+1] batches,
    runs one micro-batch at a time (its compiled scratch memory shrinks with A) and gives the whole batch's loss."""
    cfg = tiny_cfg('model.attn_impl=xla', f'model.scan={scan}', 'batch_size=32')
    mesh, graphdef, state, _, _ = setup(cfg, 1)
    _, evaluate = train.compile_steps(graphdef, state)
    losses, scratch = [], []
    with jax.set_mesh(mesh):
        for accum in [1, 4]:
            batch = first_batch(cfg, mesh, accum)
            losses.append(float(evaluate(state, batch)))
            scratch.append(evaluate.lower(state, batch).compile().memory_analysis().temp_size_in_bytes)
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-6)
    assert 5 < losses[0] < 6 and scratch[1] < scratch[0] / 2, scratch

def test_one_micro_batch_compiles_to_a_step_without_a_loop(tiny_cfg):
    """The micro-batch scan costs nothing without accumulation: XLA drops a 1-step loop (no other loop here:
    XLA's attention, unrolled layers), and with 4 micro-batches the loop is there."""
    cfg = tiny_cfg('model.attn_impl=xla', 'model.scan=false')
    mesh, graphdef, state, _, _ = setup(cfg, 1)
    step, _ = train.compile_steps(graphdef, state)
    with jax.set_mesh(mesh):
        loops = [step.lower(state, first_batch(cfg, mesh, a)).compile().as_text().count(' while(') for a in (1, 4)]
    assert loops == [0, 1]


def test_the_gpu_compile_options_are_known_to_this_xla(tiny_cfg, monkeypatch):
    """On GPUs compile_steps passes XLA options (Triton's matmuls off). XLA rejects a name it does not know, so a
    JAX release that drops one would stop every GPU run at its first compile: build the step as on a GPU and
    compile it here (the options are XLA's, whatever the backend)."""
    monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
    cfg = tiny_cfg('model.attn_impl=xla')
    mesh, _, state, step, _ = setup(cfg, 1)
    assert np.isfinite(float(step(state, first_batch(cfg, mesh))[1]['train_loss']))


def test_peak_lr_override_reaches_the_schedule(tiny_cfg):
    """Step s runs at schedule(s - 1): a linear warmup, peak_lr * s / (warmup + 1), to the peak at step warmup + 1, then
    a cosine down to min_lr_frac at the last step, halfway at the middle of the decay (optax's decay_steps counts the
    warmup too; given total - warmup, it ended early). Step 1 once ran at lr 0 and the last step never reached the min."""
    cfg = tiny_cfg('opt.peak_lr=0.004', 'opt.warmup_frac=0.1')
    schedule = train.lr_schedule(cfg.opt, 100)  # steps 1-100
    assert np.isclose(schedule(0), 0.004 / 11) and np.isclose(schedule(5), 0.004 * 6 / 11) and np.isclose(schedule(10), 0.004)
    assert np.isclose(schedule(99), 0.0004) and schedule(98) > schedule(99)  # the last step, at the min lr
    assert np.isclose((schedule(54) + schedule(55)) / 2, (0.004 + 0.0004) / 2)  # steps 11..100: the middle is at 55.5
    schedule = train.lr_schedule(tiny_cfg('opt.peak_lr=0.004', 'opt.warmup_frac=0.29').opt, 100)  # 0.29 * 100 = 28.999...
    assert schedule(28) < 0.004 and np.isclose(schedule(29), 0.004)  # warmup over 29 steps, not 28


def test_weight_decay_reaches_matmul_weights_and_embeddings_only(tiny_cfg):
    """With zero gradients Adam's step is 0, so what moves is weight decay: every kernel and embedding, and never
    a LayerNorm scale or bias."""
    cfg = tiny_cfg('opt.warmup_frac=0', 'opt.weight_decay=0.5')
    graphdef, state = train.create_state(cfg, mesh_of(1), tx := train.make_optimizer(cfg.opt, train.lr_schedule(cfg.opt, 100)))
    params = state[0]
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    moved = {jax.tree_util.keystr(p): bool(np.abs(np.asarray(u)).max() > 0) for p, u in jax.tree_util.tree_leaves_with_path(updates)}
    assert all(moved[k] == ('kernel' in k or 'embedding' in k) for k in moved), moved
    assert sum(moved.values()) == 2 * 4 + 2 and len(moved) == 2 * 8 + 4  # per layer 4 kernels, 2 LayerNorms; 2 embeddings, ln_f


def test_targets_are_the_next_tokens(tiny_cfg, tmp_path):
    """On uniform random tokens the next token cannot be predicted: the loss stays at ln 256 = 5.55. Targets not
    shifted (each position predicting its own input) would fall towards 0 within these 30 steps."""
    rng = np.random.default_rng(0)
    paths = [write_tokens(tmp_path / f'{s}.bin', rng.integers(0, 256, 100_000)) for s in ('train', 'val')]
    cfg = tiny_cfg('train_tokens=15360', 'opt.peak_lr=0.003', f'data.train_path={paths[0]}', f'data.val_path={paths[1]}')
    _, last = train.train(cfg, str(tmp_path))
    assert last['step'] == 30 and 5.4 < last['train_loss'] < 5.7 and 5.4 < last['eval_loss'] < 5.7


@pytest.mark.parametrize('variant', [[], ['model.scan=true', 'grad_accum=2', 'model.remat=dots'], ['model.dtype=float16', 'sample_tokens=4']])
def test_loss_falls_on_real_text(tiny_cfg, tmp_path, variant):
    """A few dozen steps on the stdlib byte corpus take the model well below its starting loss; also with the layer
    scan, micro-batches and remat, and in float16 (a sample at each eval: decoding's attention in fp16): whole runs of
    which (evals included) nothing else trains."""
    cfg = tiny_cfg('train_tokens=30720', 'opt.peak_lr=0.01', 'eval_every=10', *variant)  # 60 steps of 16x32
    state, last = train.train(cfg, str(tmp_path))
    records = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl')]
    evals = [r['eval_loss'] for r in records if 'eval_loss' in r]
    train_losses = [r['train_loss'] for r in records if 'train_loss' in r]
    assert len(evals) == 6 and len(train_losses) == 12
    assert evals[-1] < 0.65 * np.log(256)  # ln 256 = 5.55: a uniform guess over bytes
    assert train_losses[-1] < train_losses[0] - 1.0
    for key in ['train_loss', 'lr', 'grad_norm', 'tokens_seen', 'tokens_per_sec', 'step_time', 'mfu']:
        assert key in records[0]
    assert records[0]['mfu'] is None  # CPU: no peak FLOP/s unless the config gives one


def test_a_log_record_sums_up_the_steps_since_the_last_one(tiny_cfg, tmp_path, monkeypatch):
    """log_every=5, each step's own metrics kept: train_loss is the mean over the interval's 5 steps, grad_norm the
    last step's, lr the one that last step used (schedule(step - 1): step 1 runs at schedule(0))."""
    per_step, compile_steps = [], train.compile_steps
    def recording(graphdef, state):  # the compiled step, keeping each step's metrics
        step, evaluate = compile_steps(graphdef, state)
        def compile(*args):
            compiled = step.lower(*args).compile()
            return lambda *batch: (out := compiled(*batch), per_step.append(out[1]))[0]
        return types.SimpleNamespace(lower=lambda *args: types.SimpleNamespace(compile=lambda: compile(*args))), evaluate
    monkeypatch.setattr(train, 'compile_steps', recording)
    train.train(tiny_cfg('train_tokens=5120'), str(tmp_path))  # 10 steps
    logs = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl') if 'train_loss' in l]
    per_step, schedule = jax.device_get(per_step), train.lr_schedule(tiny_cfg().opt, 10)
    assert [r['step'] for r in logs] == [5, 10] and len(per_step) == 10
    for r in logs:
        steps = per_step[r['step'] - 5:r['step']]
        np.testing.assert_allclose(r['train_loss'], np.mean([s['train_loss'] for s in steps]), rtol=1e-6)
        assert r['grad_norm'] == float(steps[-1]['grad_norm']) and r['lr'] == float(schedule(r['step'] - 1))


def test_batch_not_divisible_over_devices(tiny_cfg, tmp_path):
    with pytest.raises(PicodoError, match='batch_size 12 .* divisible over 8 devices'):
        train.train(tiny_cfg('batch_size=12'), str(tmp_path))


def test_unknown_key_in_a_config_file(tiny_cfg, tmp_path):
    from omegaconf import OmegaConf
    cfg = tiny_cfg()
    OmegaConf.set_struct(cfg, False)
    cfg.opt.peak_lrr = 1.0
    with pytest.raises(PicodoError, match='unknown config key: opt.peak_lrr'):
        train.train(cfg, str(tmp_path))


@pytest.mark.parametrize('override,message', [
    ('model.dtype=bf16', 'model.dtype=bf16 (one of float32, bfloat16, float16)'), ('model.dtype=float64', 'model.dtype=float64 (one of float32, bfloat16, float16)'),
    ('model.attn_impl=flash', 'model.attn_impl=flash (one of auto, xla, cudnn, chunked)'),
    ('wandb.mode=ofline', 'wandb.mode=ofline (one of online, offline, disabled, shared, dryrun)'),  # once logged offline, saying it had no API key
    ('model.n_heads=3', 'model.n_heads=3 (must divide model.d_model=64)'),
    ('model.n_heads=0', 'model.n_heads=0 (must be an integer >= 1)'),
    ('eval_every=0', 'eval_every=0 (must be an integer >= 1)'),
    ('ckpt.every=-5', 'ckpt.every=-5 (must be an integer >= 1)'),
    ('grad_accum=1.5', 'grad_accum=1.5 (must be an integer >= 1)'),
    ('batch_size="32"', "batch_size='32' (must be an integer >= 1)"),  # quoted: text, which read as 32 looked like a contradiction
    ('model.d_model=null', 'model.d_model=None (must be an integer >= 1)'),  # not a TypeError from the n_heads check
    ('seed=-1', 'seed=-1 (must be an integer >= 0)'),
    ('sample_tokens=-5', 'sample_tokens=-5 (must be an integer >= 0)'),  # once a crash at the first eval
    ('opt.peak_lr=abc', "opt.peak_lr='abc' (must be float)"),
    ('opt.b1=true', 'opt.b1=True (must be float)'),
    ('opt.peak_lr=-0.001', 'opt.peak_lr=-0.001 (must be finite and >= 0)'),  # once accepted: gradient ascent
    ('opt.peak_lr=inf', 'opt.peak_lr=inf (must be finite and >= 0)'),  # once a non-finite loss at step 2
    ('opt.weight_decay=nan', 'opt.weight_decay=nan (must be finite and >= 0)'),
    ('opt.clip_norm=0', 'opt.clip_norm=0 (must be > 0)'),  # once accepted: every update clipped to zero
    ('opt.b1=1.0', 'opt.b1=1.0 (must be in [0, 1))'),  # once a non-finite loss at step 2
    ('opt.b2=1.5', 'opt.b2=1.5 (must be in [0, 1))'),
    ('opt.warmup_frac=3.0', 'opt.warmup_frac=3.0 (must be in [0, 1])'),  # once a run that never reached its peak lr
    ('opt.min_lr_frac=-0.1', 'opt.min_lr_frac=-0.1 (must be in [0, 1])'),
    ('opt.weight_decay=-1', 'opt.weight_decay=-1 (must be finite and >= 0)'),
    ('model.scan=1', 'model.scan=1 (must be bool)'),
    ('data.train_path=null', 'data.train_path=None (must be str)'),  # keys whose default is text or null: once tracebacks
    ('ckpt.dir=[a]', "ckpt.dir=['a'] (must be str)"),
    ('peak_flops=abc', "peak_flops='abc' (must be float)"),
    ('peak_flops=-1', 'peak_flops=-1 (must be finite and > 0, or null for the table)'),
    ('peak_flops=0', 'peak_flops=0 (must be finite and > 0, or null for the table)'),  # was null's table: an MFU where none was asked for
    ('dist.process_id=x', "dist.process_id='x' (must be int)"),
    ('opt=3', 'opt=3 (a group of keys: set one as opt.KEY=VALUE)'),  # a whole group replaced: once 'opt.peak_lr=None'
    ('model=null', 'model=None (a group of keys: set one as model.KEY=VALUE)'),
    ('~opt.b1', 'opt.b1 is missing (every key of default.yaml needs a value: a config file begins with defaults: [default, _self_])'),
    ('ckpt.dir=${oc.env:PICODO_UNSET}/ck', 'ckpt.dir: KeyError raised while resolving interpolation: "Environment variable '
                                           "'PICODO_UNSET' not found\""),  # once a traceback
    ('wandb.name=${wandb.nme}', "wandb.name: Interpolation key 'wandb.nme' not found"),
    ('opt.peak_lr="0.001"', "opt.peak_lr='0.001' (must be float)"),  # quoted: text, not the float it reads as
    ('dist.coordinator=localhost:notaport', "dist.coordinator='localhost:notaport' (must be host:port, the port 1-65535)"),  # JAX: a segfault
    ('dist.coordinator=notahost', "dist.coordinator='notahost' (must be host:port, the port 1-65535)"),  # JAX: an IndexError
    ('dist.coordinator=localhost:0', "dist.coordinator='localhost:0' (must be host:port, the port 1-65535)"),  # JAX: 5 minutes, then abort
    ('dist.coordinator=localhost:65536', "dist.coordinator='localhost:65536' (must be host:port, the port 1-65535)"),  # JAX: a hang
])
def test_bad_config_values_are_one_line_naming_the_key(tiny_cfg, override, message, monkeypatch):
    monkeypatch.delenv('PICODO_UNSET', raising=False)
    with pytest.raises(PicodoError, match=re.escape(f'bad config value: {message}') + '$'):
        train.check_config(tiny_cfg(override))


def test_a_config_built_without_hydra_passes_the_check():
    """A config loaded without Hydra (OmegaConf.load, as a script calling train.train may): check_config resolves the
    interpolations of that config only, not those of default.yaml's hydra: node, whose ${now:...} only Hydra resolves."""
    import subprocess, sys
    code = (f'import sys; sys.path.insert(0, {os.path.dirname(train.__file__)!r}); import train; from omegaconf import OmegaConf; '
            'cfg = OmegaConf.load(train.DEFAULTS); cfg.pop("hydra"); train.check_config(cfg); print("ok", "hydra" in sys.modules)')
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    assert r.stdout == 'ok False\n', r.stderr[-2000:]


def test_cudnn_attention_where_cudnn_cannot_train_is_one_line(tiny_cfg, tmp_path, monkeypatch):
    """model.attn_impl=cudnn without an NVIDIA GPU of compute capability 8.0+, without bf16, or with a shape cuDNN cannot
    train (an odd seq_len; a head width not a multiple of 8, or over 128 before Hopper): one line before the model is
    built, not JAX's NotImplementedError traceback at the first compile."""
    monkeypatch.setattr(train, 'create_state', lambda *args: pytest.fail('got past the check'))
    message = lambda device, dtype, T, K: re.escape(f'model.attn_impl=cudnn needs an NVIDIA GPU of compute capability 8.0+ and model.dtype=bfloat16 or float16 '
                                                    f'(here {device}, {dtype}), an even seq_len and a head width d_model/n_heads that is a multiple '
                                                    f'of 8 up to 128, 256 from 9.0 (here {T} and {K})') + '$'
    with pytest.raises(PicodoError, match='^' + message('cpu', 'float32', 32, 16)):
        train.train(tiny_cfg('model.attn_impl=cudnn'), str(tmp_path))
    gpu = lambda cc: lambda *_: [types.SimpleNamespace(compute_capability=cc, device_kind='NVIDIA GPU')] * 8
    monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
    bf16 = 'model.dtype=bfloat16'
    for cc, overrides, (dtype, T, K) in [('9.0', (), ('float32', 32, 16)), ('9.0', (bf16, 'model.seq_len=31'), ('bfloat16', 31, 16)),
                                         ('9.0', (bf16, 'model.d_model=48'), ('bfloat16', 32, 12)),  # K not a multiple of 8
                                         ('8.0', (bf16, 'model.d_model=768', 'model.n_heads=4'), ('bfloat16', 32, 192)),  # over 128 on an A100
                                         ('7.5', ('model.dtype=float16',), ('float16', 32, 16))]:  # a T4
        monkeypatch.setattr(jax, 'devices', gpu(cc))
        with pytest.raises(PicodoError, match='^' + message('NVIDIA GPU', dtype, T, K)):
            train.train(tiny_cfg('model.attn_impl=cudnn', *overrides), str(tmp_path))
    monkeypatch.setattr(jax, 'devices', gpu('9.0'))  # what cuDNN can train gets past the check: K=16, and K=192 on Hopper
    for overrides in [(bf16,), ('model.dtype=float16',), (bf16, 'model.d_model=768', 'model.n_heads=4')]:
        with pytest.raises(pytest.fail.Exception, match='got past the check'):
            train.train(tiny_cfg('model.attn_impl=cudnn', *overrides), str(tmp_path))


def test_a_dtype_xla_cannot_compile_here_is_one_line(tiny_cfg, tmp_path, monkeypatch):
    """A T4 (Colab's free GPU, compute capability 7.5) or a V100 (7.0) has no bf16 matmuls, and XLA cannot compile
    jax.nn.dot_product_attention's bf16 algorithm there (UNIMPLEMENTED, at the first compile): one line saying to use
    float16, before the model is built. float16 there, bfloat16 on an A100 and on AMD GPUs (no compute capability) go on;
    float16 with XLA's attention (TPUs, or forced on a CPU) does not compile off NVIDIA GPUs: one line too."""
    monkeypatch.setattr(train, 'create_state', lambda *args: pytest.fail('got past the check'))
    monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
    for cc, kind in [('7.5', 'Tesla T4'), ('7.0', 'Tesla V100-SXM2-16GB')]:
        monkeypatch.setattr(jax, 'devices', lambda *_: [types.SimpleNamespace(compute_capability=cc, device_kind=kind)] * 8)
        with pytest.raises(PicodoError, match=re.escape(f'model.dtype=bfloat16 needs compute capability 8.0+ (here {kind}, {cc}): set model.dtype=float16 (float32 below 7.0)') + '$'):
            train.train(tiny_cfg('model.dtype=bfloat16'), str(tmp_path))
    monkeypatch.setattr(jax, 'devices', lambda *_: [types.SimpleNamespace(device_kind='TPU v5 lite')] * 8)
    for backend, overrides in [('tpu', ()), ('cpu', ('model.attn_impl=xla',))]:  # XLA's F16_F16_F32 dot: NVIDIA GPUs only
        monkeypatch.setattr(jax, 'default_backend', lambda: backend)
        with pytest.raises(PicodoError, match=re.escape(f'model.dtype=float16 with XLA attention needs an NVIDIA GPU (here {backend}): '
                                                        'use bfloat16 or float32' + ', or model.attn_impl=chunked' * (backend == 'cpu')) + '$'):
            train.train(tiny_cfg('model.dtype=float16', *overrides), str(tmp_path))
    monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
    for cc, dtype in [('7.5', 'float16'), ('8.0', 'bfloat16'), ('gfx90a', 'bfloat16')]:
        monkeypatch.setattr(jax, 'devices', lambda *_: [types.SimpleNamespace(compute_capability=cc, device_kind='GPU')] * 8)
        with pytest.raises(pytest.fail.Exception, match='got past the check'):
            train.train(tiny_cfg(f'model.dtype={dtype}'), str(tmp_path))


def test_a_number_for_a_name_or_path_needs_quotes(tiny_cfg):
    """Hydra reads ckpt.dir=2024.10 as the number 2024.1: turned back into text it would name another directory."""
    with pytest.raises(PicodoError, match=re.escape('ckpt.dir=2024.1 (must be str: quote a number)')):
        train.check_config(tiny_cfg('ckpt.dir=2024.10'))
    train.check_config(cfg := tiny_cfg('ckpt.dir="2024.10"', "wandb.name='007'"))
    assert (cfg.ckpt.dir, cfg.wandb.name) == ('2024.10', '007')


def test_a_non_finite_eval_loss_stops_the_run(tiny_cfg, tmp_path, monkeypatch):
    """Token ids >= vocab in the validation file where the start-up sample did not look (here: the sample skipped)."""
    val = write_tokens(tmp_path / 'val.bin', np.arange(2000) % 300)
    monkeypatch.setattr(data, 'open_tokens', lambda path, *_: np.memmap(path, dtype='<u2', mode='r'))
    with pytest.raises(PicodoError, match=re.escape(f'non-finite eval loss at step 5 (diverged, or token ids >= model.vocab_size in {val}?)')):
        train.train(tiny_cfg('train_tokens=2560', 'eval_every=5', f'data.val_path={val}', f'ckpt.dir={tmp_path}/ckpt'), str(tmp_path))
    assert all(np.isfinite(v) for l in open(tmp_path / 'metrics.jsonl') for k, v in json.loads(l).items() if 'loss' in k)  # no NaN logged


def test_eval_reads_no_validation_window_twice(tiny_cfg, tmp_path, capsys):
    """A validation file with 1.5 batches of windows and eval_batches=2: one batch is evaluated, and the run says so
    (the second batch used to wrap into another epoch's order, counting windows twice)."""
    val = write_tokens(tmp_path / 'val.bin', np.random.default_rng(0).integers(0, 256, 16 * 32 * 3 // 2 + 1))
    evals = [train.train(tiny_cfg('train_tokens=2560', f'data.val_path={val}', f'eval_batches={n}', f'ckpt.dir={tmp_path}/{n}'),
                         str(tmp_path))[1]['eval_loss'] for n in (2, 1)]
    assert evals[0] == evals[1], evals
    assert "eval on 1x16 of val's 24 windows;" in capsys.readouterr().out.splitlines()[0]


def test_the_validation_batches_are_seed_0s_whatever_the_seed(tiny_cfg, tmp_path, monkeypatch):
    """Validation is seed 0's first batches whatever cfg.seed (it orders the training batches only): eval losses of runs
    with other seeds compare. Stopped once they are loaded, before the compile."""
    calls, load_batch = [], data.load_batch
    def recording(tokens, T, seed, step, *args):
        calls.append((os.path.basename(tokens.filename), seed, step))
        return load_batch(tokens, T, seed, step, *args)
    monkeypatch.setattr(data, 'load_batch', recording)
    monkeypatch.setattr(train.utils, 'init_wandb', lambda *args: 1 / 0)  # called next
    with pytest.raises(ZeroDivisionError):
        train.train(tiny_cfg('seed=1'), str(tmp_path))
    assert calls == [('val.bin', 0, 0), ('val.bin', 0, 1)]


@pytest.mark.parametrize('tokens,steps', [(500, 0), (10 ** 20, 10 ** 20 // 512)])  # past int32 steps: optax's schedule overflowed
def test_a_token_budget_below_one_step_or_beyond_int32_steps_is_an_error(tiny_cfg, tmp_path, tokens, steps):
    with pytest.raises(PicodoError, match=rf'^train_tokens={tokens} gives {steps} steps of batch_size x seq_len = 512 tokens \(must give 1 to 2\^31 - 1\)$'):
        train.train(tiny_cfg(f'train_tokens={tokens}'), str(tmp_path))


def test_token_id_beyond_vocab_is_caught_before_compiling(tiny_cfg, tmp_path):
    with pytest.raises(PicodoError, match='>= model.vocab_size 200'):
        train.train(tiny_cfg('model.vocab_size=200'), str(tmp_path))


def test_building_the_default_corpus_never_overwrites_a_data_file(tiny_cfg, tmp_path):
    """build_if_missing writes both splits, so it runs only when neither exists: a mistyped val path is an error."""
    write_tokens(tmp_path / 'mine.bin', [1, 2, 3] * 1000)
    before = (tmp_path / 'mine.bin').read_bytes()
    cfg = tiny_cfg(f'data.train_path={tmp_path / "mine.bin"}', f'data.val_path={tmp_path / "vall.bin"}', 'data.build_if_missing=true')
    with pytest.raises(PicodoError, match=re.escape(f'data file not found: {tmp_path / "vall.bin"} (prepare.py')):
        train.train(cfg, str(tmp_path))
    assert (tmp_path / 'mine.bin').read_bytes() == before and not (tmp_path / 'vall.bin').exists()


def test_step_time_counts_every_step_but_neither_the_compile_nor_evals(tiny_cfg, tmp_path, monkeypatch):
    """A clock on which each training step takes 1 s (so tokens/s is B x T and MFU follows), the compile, each eval batch and each checkpoint 1000 s: every
    logged step time is 1 s, also for intervals with an eval or a checkpoint in them (eval_every=3, log_every=5, ckpt.every=4).
    The clock is only these jumps, not the machine's: no timing enters the test (a slow CI step took 1.8 s real time)."""
    jump = [0.0]
    monkeypatch.setattr(train, 'time', types.SimpleNamespace(perf_counter=lambda: jump[0], sleep=time.sleep))
    def taking(seconds, f):
        return lambda *args: (jump.__setitem__(0, jump[0] + seconds), f(*args))[1]
    class SlowCompile:  # the jitted train step, compiled ahead of time or in its first call
        def __init__(self, jitted):
            self.jitted, self.compiled = jitted, False
        def lower(self, *args):
            return types.SimpleNamespace(compile=lambda: taking(1, taking(1000, self.jitted.lower(*args).compile)()))
        def __call__(self, *args):
            self.compiled = self.compiled or jump.__setitem__(0, jump[0] + 1000) or True
            return taking(1, self.jitted)(*args)
    compile_steps = train.compile_steps
    def slow_steps(graphdef, state):
        step, evaluate = compile_steps(graphdef, state)
        return SlowCompile(step), taking(1000, evaluate)
    monkeypatch.setattr(train, 'compile_steps', slow_steps)
    monkeypatch.setattr(train, 'save', taking(1000, train.save))
    cfg = tiny_cfg('train_tokens=10240', 'eval_every=3', 'ckpt.every=4', 'peak_flops=1e12')
    train.train(cfg, str(tmp_path))  # 20 steps, 7 evals of 2 batches
    records = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl')]
    times = [r['step_time'] for r in records if 'step_time' in r]  # logged at steps 4, 5, 8, 10, 12, 15, 16, 20
    assert len(times) == 8 and jump[0] == 1000 + 20 + 7 * 2 * 1000 + 5 * 1000
    assert times == [pytest.approx(1.0)] * 8, times
    # and so 16 x 32 tokens a second, each of flops_per_token FLOPs, over 8 devices of 1e12 FLOP/s
    assert [r['tokens_per_sec'] for r in records if 'step_time' in r] == [pytest.approx(16 * 32)] * 8
    mfu = train.gpt.flops_per_token(train.model_config(cfg.model)) * 16 * 32 / (8 * 1e12)
    assert [r['mfu'] for r in records if 'step_time' in r] == [pytest.approx(mfu)] * 8


def test_a_wandb_that_fails_mid_run_stops_neither_training_nor_checkpoints(tiny_cfg, tmp_path, monkeypatch):
    """wandb's service killed mid-run: its log and finish calls raise (ConnectionResetError, seen with a killed
    wandb-core). The run goes on, metrics.jsonl gets every record and the checkpoints are written."""
    def lost(*args, **kwargs):
        raise ConnectionResetError('Connection lost')
    monkeypatch.setattr(train.utils, 'init_wandb', lambda *args: types.SimpleNamespace(id='x', log=lost, finish=lost))
    _, last = train.train(tiny_cfg('train_tokens=5120', 'ckpt.every=5', f'ckpt.dir={tmp_path / "ckpt"}'), str(tmp_path))
    assert last['step'] == 10 and sorted(os.listdir(tmp_path / 'ckpt')) == ['.lock.0', '10', '5']
    assert [json.loads(l)['step'] for l in open(tmp_path / 'metrics.jsonl')] == [5, 10, 10]  # 2 logs, 1 eval


def test_a_resumed_wandb_run_gets_no_step_it_already_has(tiny_cfg, tmp_path, monkeypatch):
    """A run killed after logging past its last checkpoint resumes its wandb run, which starts at the step after its last
    (wandb's starting_step); the steps before it, logged again from the checkpoint (the same values), go to
    metrics.jsonl only: wandb refused each with a warning line ('Tried to log to step 5 that is less than the current step')."""
    logged = []
    run = types.SimpleNamespace(id='x', starting_step=6, log=lambda record, step: logged.append(step), finish=lambda: None)
    monkeypatch.setattr(train.utils, 'init_wandb', lambda *args: run)
    train.train(tiny_cfg('train_tokens=5120', f'ckpt.dir={tmp_path / "ckpt"}'), str(tmp_path))
    assert [json.loads(l)['step'] for l in open(tmp_path / 'metrics.jsonl')] == [5, 10, 10] and logged == [10, 10]


def test_eval_batches_stop_before_a_file_of_whole_windows_wraps(tiny_cfg, tmp_path, monkeypatch):
    """A validation file of exactly 2 batches of T tokens holds 2B-1 windows of T+1 (the last lacks its final target):
    one batch is evaluated, not a second wrapping into another epoch's order. Stopped once they are loaded."""
    val = write_tokens(tmp_path / 'val.bin', np.arange(2 * 16 * 32) % 256)
    calls, load_batch = [], data.load_batch
    monkeypatch.setattr(data, 'load_batch', lambda tokens, T, seed, step, *args: calls.append(step) or load_batch(tokens, T, seed, step, *args))
    monkeypatch.setattr(train, 'create_state', lambda *args: (None, ({'w': jnp.zeros(2)},)))  # no model needed
    monkeypatch.setattr(train.utils, 'init_wandb', lambda *args: 1 / 0)  # called next
    with pytest.raises(ZeroDivisionError):
        train.train(tiny_cfg(f'data.val_path={val}', 'eval_batches=2'), str(tmp_path))
    assert calls == [0]


def test_micro_batches_that_do_not_split_over_the_devices_are_one_line(tiny_cfg, tmp_path, monkeypatch):
    """batch_size 16 splits over 8 devices, but its 4 micro-batches of 4 do not: said before the model is built."""
    monkeypatch.setattr(train, 'create_state', lambda *args: pytest.fail('got past the check'))
    with pytest.raises(PicodoError, match='^batch_size 16 must split into grad_accum=4 micro-batches, each divisible over 8 devices$'):
        train.train(tiny_cfg('grad_accum=4'), str(tmp_path))


def test_weights_no_dimension_of_which_divides_over_the_devices_are_said_to_be_whole(tiny_cfg, tmp_path, capsys):
    """FSDP splits each weight along one dimension; where the device count does not divide that one (d_model=36 on 8 devices: the
    position table, LayerNorms, and every kernel but mlp_out [4·36, 36]), flax keeps the weight whole on every device.
    The run goes on (its numbers are right) but says so: 1,152 + 2·(3,888 + 1,296 + 5,184 + 144) + 72 = 22,248 params."""
    for d, warned in ((36, True), (64, False)):
        train.train(tiny_cfg(f'model.d_model={d}', 'model.n_heads=4' if d == 64 else 'model.n_heads=3', 'train_tokens=512',
                             f'ckpt.dir={tmp_path}/{d}'), str(tmp_path))
        lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith('warning:')]
        assert lines == (['warning: 0.02M params and their Adam moments are whole on each device (the dimension FSDP '
                          'splits them on does not divide over 8 devices)'] if warned else []), lines


def test_one_device_holds_every_weight_whole_without_a_warning(tiny_cfg, tmp_path, capsys, monkeypatch):
    """On one device every weight is whole by nature (replicated over a mesh of one), so the FSDP warning is for
    several devices only: d_model=36, which 8 devices cannot split, says nothing on 1. Stopped after the start-up lines."""
    make_mesh = jax.make_mesh
    monkeypatch.setattr(jax, 'device_count', lambda: 1)
    monkeypatch.setattr(jax, 'make_mesh', lambda *args, **kwargs: make_mesh(*args, **kwargs, devices=jax.devices()[:1]))
    monkeypatch.setattr(train.utils, 'init_wandb', lambda *args: types.SimpleNamespace(id='x'))
    monkeypatch.setattr(train, 'tqdm', lambda *args, **kwargs: 1 / 0)  # the training loop's progress bar: stop there
    with pytest.raises(ZeroDivisionError):
        train.train(tiny_cfg('model.d_model=36', 'model.n_heads=3', 'train_tokens=512'), str(tmp_path))
    out = capsys.readouterr().out
    assert 'M params, 1 step of 16x32 tokens on 1 cpu' in out and 'warning' not in out, out


def test_paths_starting_with_a_tilde_are_in_the_home_dir(tiny_cfg, stdlib_data, tmp_path, monkeypatch):
    """'ckpt.dir="~/ck"' (quoted past Hydra's parser) or `train_path: ~/data/x.bin` in a config file: the home dir's,
    not a new directory named '~' in the launch dir (which `rm -rf ~` would then be typed to clean up)."""
    home = tmp_path / 'home'
    (home / 'data').mkdir(parents=True)
    for name, path in zip(['train.bin', 'val.bin'], stdlib_data):
        os.symlink(path, home / 'data' / name)
    monkeypatch.setenv('HOME', str(home))
    monkeypatch.chdir(tmp_path)
    train.train(tiny_cfg('data.train_path="~/data/train.bin"', 'data.val_path="~/data/val.bin"', 'ckpt.dir="~/ck"',
                         'train_tokens=512'), str(tmp_path))
    assert (home / 'ck' / '1').is_dir() and not (tmp_path / '~').exists()


def test_a_ckpt_resume_starting_with_a_tilde_is_in_the_home_dir(tiny_cfg, tmp_path, monkeypatch):
    """'ckpt.resume="~/ck/20"' is looked for in the home dir, as the other paths are, not in a directory named '~'
    in the launch dir (here it is missing, and the line names where it was looked for)."""
    monkeypatch.setenv('HOME', str(tmp_path / 'home'))
    with pytest.raises(PicodoError, match=re.escape(f'checkpoint not found: {tmp_path}/home/ck/20') + '$'):
        train.train(tiny_cfg('ckpt.resume="~/ck/20"', f'ckpt.dir={tmp_path}/new'), str(tmp_path))


def test_the_optimizer_is_adamw_with_clipping_and_the_configs_values(tiny_cfg):
    """Two steps of make_optimizer against AdamW written out in numpy: gradients clipped to opt.clip_norm (global norm),
    moments with opt.b1 and opt.b2, bias-corrected, eps 1e-8, decay opt.weight_decay x the weight (kernels and embeddings
    only), times the schedule at the optimizer's step count (0 first). The two gradients' norms, 5 and 50, differ: Adam
    is blind to one scale for all steps, not to a clip that rescales each step by its own factor."""
    c = tiny_cfg('opt.b1=0.8', 'opt.b2=0.9', 'opt.weight_decay=0.5', 'opt.clip_norm=1.0').opt
    rng = np.random.default_rng(0)
    params = {'kernel': rng.normal(size=(4, 3)).astype(np.float32), 'scale': rng.normal(size=3).astype(np.float32)}
    grads = []
    for norm in (5, 50):
        g = {k: rng.normal(size=v.shape) for k, v in params.items()}
        total = np.sqrt(sum((x ** 2).sum() for x in g.values()))
        grads.append({k: (x * norm / total).astype(np.float32) for k, x in g.items()})
    lr = lambda count: 0.1 * (count + 1)
    tx = train.make_optimizer(c, lr)
    p, state = params, tx.init(params)
    for g in grads:
        updates, state = tx.update(g, state, p)
        p = optax.apply_updates(p, updates)
    want, m, v = dict(params), {k: 0. for k in params}, {k: 0. for k in params}
    for t, g in enumerate(grads, 1):
        g = {k: np.float64(x) * min(1, 1.0 / np.sqrt(sum((y.astype(np.float64) ** 2).sum() for y in g.values()))) for k, x in g.items()}
        for k in params:
            m[k], v[k] = 0.8 * m[k] + 0.2 * g[k], 0.9 * v[k] + 0.1 * g[k] ** 2
            u = (m[k] / (1 - 0.8 ** t)) / (np.sqrt(v[k] / (1 - 0.9 ** t)) + 1e-8) + 0.5 * want[k] * (k == 'kernel')
            want[k] = want[k] - lr(t - 1) * u
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), p, want)


def test_grad_norm_is_the_norm_of_the_step_gradient(tiny_cfg):
    """The logged grad_norm is the global norm of the gradient the optimizer is given (before clipping), with and
    without micro-batches."""
    for accum in (1, 2):
        keep = optax.GradientTransformation(lambda p: jax.tree.map(jnp.zeros_like, p), lambda g, s, p=None: (jax.tree.map(jnp.zeros_like, g), g))
        mesh = mesh_of(1)
        graphdef, state = train.create_state(tiny_cfg(), mesh, keep)
        state, metrics = in_mesh(mesh, train.compile_steps(graphdef, state)[0])(state, first_batch(tiny_cfg(), mesh, accum))
        grads = jax.tree.leaves(nnx.merge(graphdef, state)[1].opt_state)
        norm = np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2) for g in grads))
        assert len(grads) > 10 and float(metrics['grad_norm']) == pytest.approx(norm, rel=1e-5)
