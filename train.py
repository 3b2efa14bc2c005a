"""The training loop: config in, sharded model and optimizer built, one jitted step, metrics out."""
import contextlib, functools, glob, io, json, logging, os, shutil, signal, sys, time, types, warnings
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx, traverse_util
from jax.experimental.multihost_utils import process_allgather
from omegaconf import OmegaConf
from tqdm.auto import tqdm
import data, model as gpt, utils

DEFAULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs', 'default.yaml')
# the parameter tree, and what a step counts: a checkpoint is restored only under the same values, even by ckpt.resume
FIXED_KEYS = ['model.vocab_size', 'model.seq_len', 'model.d_model', 'model.n_layers', 'model.n_heads', 'model.scan', 'batch_size']
# keys that may change between launches of one run (how it runs, logs and saves, where its data is): the others may not
FREE_KEYS = ('ckpt.', 'wandb.', 'dist.', 'data.', 'log_every', 'eval_every', 'eval_batches', 'sample_tokens', 'peak_flops',
             'grad_accum', 'model.remat', 'model.attn_impl', 'model.dtype')
AT_LEAST = {'seed': 0, 'sample_tokens': 0} | dict.fromkeys(['model.vocab_size', 'model.seq_len', 'model.d_model', 'model.n_layers',
    'model.n_heads', 'batch_size', 'grad_accum', 'train_tokens', 'log_every', 'eval_every', 'eval_batches', 'ckpt.every', 'ckpt.keep'], 1)
in_01, below_1 = ('in [0, 1]', lambda x: 0 <= x <= 1), ('in [0, 1)', lambda x: 0 <= x < 1)  # other opt.* and peak_flops: finite, >= 0
BOUNDS = {'opt.b1': below_1, 'opt.b2': below_1, 'opt.warmup_frac': in_01, 'opt.min_lr_frac': in_01, 'opt.clip_norm': ('> 0', lambda x: x > 0)}
NULL_DEFAULTS = {'peak_flops': float, 'dist.num_processes': int, 'dist.process_id': int}  # the other null defaults are text
CHOICES = {'model.dtype': ['float32', 'bfloat16', 'float16'], 'model.remat': ['none', *gpt.REMAT_POLICIES], 'model.attn_impl': ['auto', 'xla', 'cudnn', 'chunked'],
           'wandb.mode': ['online', 'offline', 'disabled', 'shared', 'dryrun']}  # WANDB_MODE, which wins, is checked in main.py
flatten = functools.partial(traverse_util.flatten_dict, sep='.')  # {'opt': {'peak_lr': 1}} -> {'opt.peak_lr': 1}


def check_config(cfg):  # every key must exist in configs/default.yaml (catches typos in config files, not just overrides)
    OmegaConf.set_struct(defaults := OmegaConf.load(DEFAULTS), True)
    try:  # ... and every ${...} interpolation resolve (${oc.env:VAR} with VAR unset, a misspelt key)
        OmegaConf.merge(defaults, cfg)
        OmegaConf.to_container(cfg, resolve=True)  # the user's config only: not default.yaml's hydra: node (${now:...})
    except Exception as e:  # omegaconf's errors name the key: ConfigKeyError, InterpolationResolutionError and its subclasses
        raise utils.PicodoError(f'bad config value: {e.full_key}: {str(e).splitlines()[0]}' if 'Interpolation' in type(e).__name__
                                else f'unknown config key: {getattr(e, "full_key", e)}') from None
    bad = [f'{k}={cfg[k]!r} (a group of keys: set one as {k}.KEY=VALUE)' for k, v in defaults.items() if OmegaConf.is_dict(v) and not OmegaConf.is_dict(cfg.get(k, v))]
    get, defaults = lambda key: OmegaConf.select(cfg, key), flatten(OmegaConf.to_container(defaults) | {'hydra': {}})
    kind = {k: NULL_DEFAULTS.get(k, str) if v is None else type(v) for k, v in defaults.items()}  # each key's type
    bad += [f'{k} is missing (every key of default.yaml needs a value: a config file begins with defaults: [default, _self_])' for k in defaults if OmegaConf.select(cfg, k, default=KeyError) is KeyError]
    bad += [f'{k}={get(k)!r} (must be an integer >= {n})' for k, n in AT_LEAST.items() if not (isinstance(get(k), int) and get(k) >= n)]
    bad += [f'{k}={get(k)!r} (must be {t.__name__}{": quote a number" * (t is str and type(get(k)) in (int, float))})'  # 'ckpt.dir="7"'
            for k, t in kind.items()
            if not (get(k) is None is defaults[k]) and type(get(k)) not in ((int, float) if t is float else (t,))]  # null if its default is
    bad += [f'{k}={get(k)} (must be {b[0]})' for k in defaults if k.startswith(('opt.', 'peak_flops')) and type(get(k)) in (int, float)
            and not (b := BOUNDS.get(k, ('finite and >= 0', lambda x: 0 <= x < float('inf'))))[1](get(k))]
    bad += [f'{k}={get(k)} (one of {", ".join(v)})' for k, v in CHOICES.items() if get(k) not in v]
    bad = bad or ([f'model.n_heads={cfg.model.n_heads} (must divide model.d_model={cfg.model.d_model})'] if cfg.model.d_model % cfg.model.n_heads else [])
    if bad:
        raise utils.PicodoError(f'bad config value: {bad[0]}')


def model_config(c):
    c = types.SimpleNamespace(**OmegaConf.to_container(c, resolve=True) | {'dtype': jnp.dtype(c.dtype)})
    # cuDNN trains on compute capability 8.0+ (not a T4 or V100) in bf16 or fp16, with an even seq_len and a head width K that is a
    # multiple of 8, up to 128 (256 from Hopper, 9.0); JAX raises NotImplementedError for the rest
    cc, K = str(getattr(jax.devices()[0], 'compute_capability', '')), c.d_model // c.n_heads
    c.cudnn_ok = (jax.default_backend() == 'gpu' and c.dtype != jnp.float32 and cc[:1].isdigit() and float(cc) >= 8
                  and c.seq_len % 2 == 0 and K % 8 == 0 and K <= (256 if float(cc) >= 9 else 128))
    if c.dtype == jnp.bfloat16 and cc[:1].isdigit() and float(cc) < 8:  # XLA's bf16 attention does not compile there: UNIMPLEMENTED
        raise utils.PicodoError(f'model.dtype=bfloat16 needs compute capability 8.0+ (here {jax.devices()[0].device_kind}, {cc}): set model.dtype=float16 (float32 below 7.0)')
    if c.attn_impl == 'auto':  # cuDNN flash attention on NVIDIA GPUs where it can train, model.chunked_attention on CPUs, else XLA
        c.attn_impl = 'cudnn' if c.cudnn_ok else {'cpu': 'chunked'}.get(jax.default_backend(), 'xla')
    if c.dtype == jnp.float16 and c.attn_impl == 'xla' and jax.default_backend() != 'gpu':  # its F16_F16_F32 dot: GPUs only
        raise utils.PicodoError(f'model.dtype=float16 with XLA attention needs an NVIDIA GPU (here {jax.default_backend()}): use bfloat16 or float32' + ', or model.attn_impl=chunked' * (jax.default_backend() == 'cpu'))
    return c


def lr_schedule(c, total_steps):  # step s runs at its value at s - 1: peak_lr * s / (warmup + 1) up to the peak, min lr at the last
    warmup = round(c.warmup_frac * total_steps)  # not int(): 0.29 * 100 is 28.999...
    return optax.warmup_cosine_decay_schedule(c.peak_lr / (warmup + 1), c.peak_lr, warmup, max(total_steps - 1, warmup + 1), c.peak_lr * c.min_lr_frac)


def make_optimizer(c, schedule):
    # weight decay on matmul weights and embedding tables, not on LayerNorm scales and biases
    decay = lambda params: jax.tree.map_with_path(lambda path, _: any(getattr(k, 'key', None) in ('kernel', 'embedding') for k in path), params)
    return optax.chain(optax.clip_by_global_norm(c.clip_norm),
                       optax.adamw(schedule, c.b1, c.b2, weight_decay=c.weight_decay, mask=decay))


def create_state(cfg, mesh, tx):
    """Model and optimizer, each weight and its Adam moments split over the mesh's 'data' axis."""
    @nnx.jit
    def create():
        model = gpt.GPT(model_config(cfg.model), nnx.Rngs(cfg.seed))
        return model, nnx.Optimizer(model, tx, wrt=nnx.Param)
    with jax.set_mesh(mesh):
        return nnx.split(create())


def find_checkpoint(path):
    """(manager, step): the newest complete step (orbax renames each once written) in checkpoint dir `path`, or step dir `path`."""
    path = os.path.abspath(path)
    one_step = os.path.basename(path).isdigit() and os.path.isdir(os.path.join(path, 'state'))
    if not os.path.isdir(path):
        raise utils.PicodoError(f'checkpoint not found: {path}')
    manager = ocp.CheckpointManager(os.path.dirname(path) if one_step else path, options=ocp.CheckpointManagerOptions(create=False))
    step = int(os.path.basename(path)) if one_step else manager.latest_step()
    if step not in manager.all_steps():
        raise utils.PicodoError(f'no complete checkpoint in {path}')
    return manager, step


def restore(manager, step, cfg, state, same_run=False):
    """The saved state laid out like `state` (so onto the current mesh, whatever mesh saved it), and its metadata.
    The config must match the saved one in FIXED_KEYS or, to go on with the same run, in all but FREE_KEYS."""
    where = os.path.join(manager.directory, str(step))
    try:
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
        saved, now = (flatten(c) for c in (meta['config'], OmegaConf.to_container(cfg, resolve=True)))
        keys = FIXED_KEYS + [k for k in now if not k.startswith(FREE_KEYS) or k == 'ckpt.resume'] if same_run else FIXED_KEYS  # fixed first
        differ = [f'{k}={saved.get(k)} but the config says {now[k]}' for k in keys if saved.get(k) != now[k]]
        if not differ:  # a failed read: orbax closes its event loop with other reads in flight, and as they end (within ms)
            with contextlib.redirect_stderr(io.StringIO()):  # TensorStore's threads print tracebacks (event loop is closed)
                # ... here, into nothing; the failed reads' tasks log a traceback each through asyncio's logger (which writes
                logging.getLogger('asyncio').setLevel(logging.CRITICAL + 1)  # to the console, not stderr) when freed, even within the
                # restore; a level, not .disabled, which Hydra's logging set-up for a sweep's next run turns back on
                try:
                    return manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(state)))['state'], meta
                except Exception:  # and their coroutines print one each when freed (at exit, or during a sweep's next run)
                    sys.unraisablehook = warnings.filterwarnings('ignore', 'coroutine .* was never awaited') or (lambda *_: None)
                    time.sleep(0.5)  # for the reads still in flight to end while stderr goes nowhere
                    raise
    except Exception as e:  # truncated or missing files, garbled metadata, ...: TensorStore's errors name the file (the cause
        raise utils.PicodoError(f'cannot restore checkpoint {where}: {type(c := e.__cause__ or e).__name__}: {(str(c).splitlines() or [""])[0].split(" [tensorstore_spec")[0]}') from None  # of orbax's)
    raise utils.PicodoError(f'checkpoint {where} has {differ[0]}' + (': another run (set ckpt.dir)' + ', or ckpt.resume to go on from '
                            'it with this config' * (not differ[0].startswith(tuple(FIXED_KEYS))) if same_run else ''))


def save(manager, step, state, meta):  # asynchronous: the arrays are copied off the devices, then written in the background
    need, free = sum(x.nbytes for x in jax.tree.leaves(state)), shutil.disk_usage(manager.directory).free  # each array once
    if need > free:  # a full disk would fail later, in orbax's writer thread: say so now; older checkpoints stay
        raise utils.PicodoError(f'no room for checkpoint {step} in {manager.directory}: {need / 2**20:.0f} MiB needed, {free / 2**20:.0f} MiB free')
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))


loss_fn = lambda model, tokens: gpt.cross_entropy(model(tokens[:, :-1]), tokens[:, 1:])  # tokens [B, T+1]


def train_step(graphdef, state, batch):  # batch [A, B/A, T+1]: A micro-batches whose gradients add up
    model, optimizer = nnx.merge(graphdef, state)
    model_def, params, rest = nnx.split(model, nnx.Param, ...)
    # float16: the loss scaled by about its micro-batch's token count (a power of 2, so exactly undone; at most 2^14, since
    # fp16 weight gradients come out near scale x their mean), so that each token's share of the gradient does not underflow
    scale = 2. ** min(round(np.log2(batch[0, :, 1:].size)), 14) if model.token_embed.dtype == jnp.float16 else 1.
    grad_fn = jax.value_and_grad(lambda params, tokens: scale * loss_fn(nnx.merge(model_def, params, rest), tokens))
    add_micro_batch = lambda acc, tokens: (jax.tree.map(jnp.add, acc, grad_fn(params, tokens)), None)  # XLA drops a 1-step loop
    zeros = jax.tree.map(jnp.zeros_like, (jnp.zeros(()), params))
    loss, grads = jax.tree.map(lambda x: x / (scale * batch.shape[0]), jax.lax.scan(add_micro_batch, zeros, batch)[0])
    optimizer.update(model, grads)
    return nnx.state((model, optimizer)), {'train_loss': loss, 'grad_norm': optax.tree.norm(grads)}


def compile_steps(graphdef, state):
    """Jitted train and eval steps on batches [A, B/A, T+1], the state donated and kept in its FSDP layout; call under `jax.set_mesh`."""
    # cuBLAS, not Triton, for matmuls on GPUs: an H200 step 1.5% faster (cuBLAS also fuses GELU), compiles in half the time
    opts = {'xla_gpu_enable_triton_gemm': False} if jax.default_backend() == 'gpu' else None
    train = jax.jit(functools.partial(train_step, graphdef), donate_argnums=0, out_shardings=(jax.tree.map(lambda x: x.sharding, state), None), compiler_options=opts)
    # the state passes through the loop as its carry: a model merged outside (or closed over) fails inside nnx.scan's layers
    return train, jax.jit(lambda state, tokens: jax.lax.scan(lambda s, t: (s, loss_fn(nnx.merge(graphdef, s)[0], t)), state, tokens)[1].mean())


@functools.cache  # once per process: a Hydra sweep calls train() again in the same process
def init_distributed(coordinator, num_processes, process_id):
    """Join JAX's multi-controller runtime, by the dist.* keys or as JAX detects it (TPU pod slice, SLURM, Open MPI), or stay alone."""
    try:
        jax.distributed.initialize(coordinator, num_processes, process_id)
    except (ValueError, RuntimeError) as e:  # no cluster found (fine if no dist.* key asked for one), or JAX already running
        if coordinator or num_processes is not None or process_id is not None or not any(m in str(e) for m in ('coordinator_address', 'must be called before')):
            raise utils.PicodoError(f'dist.* keys: cannot join the processes of the run: {(str(e).splitlines() or [""])[0]}') from None


def train(cfg, out_dir, name='run'):
    check_config(cfg)
    for key in ('data.train_path', 'data.val_path', 'ckpt.dir', 'ckpt.resume'):  # '~/x' quoted, or in a config file: the home dir's
        OmegaConf.select(cfg, key) and OmegaConf.update(cfg, key, os.path.expanduser(OmegaConf.select(cfg, key)))  # x, not ./~/x
    init_distributed(cfg.dist.coordinator, cfg.dist.num_processes, cfg.dist.process_id)
    mesh = jax.make_mesh((jax.device_count(),), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
    B, A, T = cfg.batch_size, cfg.grad_accum, cfg.model.seq_len
    if not model_config(cfg.model).cudnn_ok and cfg.model.attn_impl == 'cudnn':  # else JAX's traceback at the first compile
        raise utils.PicodoError(f'model.attn_impl=cudnn needs an NVIDIA GPU of compute capability 8.0+ and model.dtype=bfloat16 or float16 (here {jax.devices()[0].device_kind}, '
                                f'{cfg.model.dtype}), an even seq_len and a head width d_model/n_heads that is a multiple of 8 up to 128, 256 from 9.0 '
                                f'(here {T} and {cfg.model.d_model // cfg.model.n_heads})')
    if B % A or (B // A) % jax.device_count():
        raise utils.PicodoError(f'batch_size {B} must split into grad_accum={A} micro-batches, each divisible over {jax.device_count()} devices')
    if cfg.data.build_if_missing and not any(os.path.exists(p) for p in (cfg.data.train_path, cfg.data.val_path)):  # it writes both
        import prepare  # the data tool beside the trainer, needed only on a first run
        prepare.build_stdlib_bytes(cfg.data.train_path, cfg.data.val_path)
    train_tokens, val_tokens = (data.open_tokens(path, cfg.model.vocab_size, T, B) for path in (cfg.data.train_path, cfg.data.val_path))

    total_steps = cfg.train_tokens // (B * T)
    if total_steps < 1:  # a run that trains nothing would otherwise end with exit code 0
        raise utils.PicodoError(f'train_tokens={cfg.train_tokens} is less than one step: batch_size x seq_len = {B * T} tokens')
    schedule = lr_schedule(cfg.opt, total_steps)
    # checkpoints live under the launch directory, not in Hydra's per-run outputs/, so a re-launch finds them
    ckpt_dir = os.path.abspath(cfg.ckpt.dir or os.path.join('checkpoints', name))
    with contextlib.suppress(OSError): os.makedirs(ckpt_dir, exist_ok=True)  # a file in the way, or no write access: said below
    if not (os.path.isdir(ckpt_dir) and os.access(ckpt_dir, os.W_OK)):
        raise utils.PicodoError(f'ckpt.dir {ckpt_dir} is not a writable directory')
    lock = open(os.path.join(ckpt_dir, f'.lock.{jax.process_index()}'), 'a')  # held while this run trains and saves: a second
    try:  # launch of it would delete its unfinished checkpoint (below) and save steps over its own
        refused = os.lockf(lock.fileno(), os.F_TLOCK, 0)  # a POSIX lock: released when the process ends, however it ends
    except (OSError, AttributeError) as e:  # held by another process; else no locks on this filesystem (or no os.lockf): no check
        refused = isinstance(e, (BlockingIOError, PermissionError))
    if refused if jax.process_count() == 1 else process_allgather(np.int32(bool(refused))).any():  # all processes stop, or none
        raise utils.PicodoError(f'{ckpt_dir} is in use by another process: the same run launched twice?')
    saver = ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(max_to_keep=cfg.ckpt.keep))
    resume = cfg.ckpt.resume and os.path.abspath(cfg.ckpt.resume)  # a relaunch of a run begun from another dir's checkpoint
    own = not resume or saver.latest_step() and resume not in (ckpt_dir, os.path.join(ckpt_dir, str(saver.latest_step())))
    source, start = (saver, saver.latest_step() or 0) if own else find_checkpoint(resume)  # goes on from its own (ckpt.resume must match)
    if 0 in saver.all_steps() or (saver.latest_step() or 0) > start:  # orbax would silently skip saves up to its newest step
        raise utils.PicodoError(f'{ckpt_dir} holds ' + ('a dir 0, not from this trainer (it saves from step 1): orbax would delete it' if 0 in saver.all_steps() else f'step {saver.latest_step()}, past step {start}') + ': set ckpt.dir')
    if not own and start >= total_steps:  # it would train nothing and exit 0
        raise utils.PicodoError(f'ckpt.resume {resume} is at step {start}: train_tokens={cfg.train_tokens} ends at step {total_steps}')
    graphdef, state = create_state(cfg, mesh, make_optimizer(cfg.opt, schedule))
    n_params, whole = map(sum, zip(*[(x.size, x.size * (jax.device_count() > 1 and x.sharding.is_fully_replicated)) for x in jax.tree.leaves(state[0])]))
    state, meta = restore(source, start, cfg, state, same_run=source is saver) if start else (state, {})
    for tmp in glob.glob(os.path.join(glob.escape(ckpt_dir), '*.orbax-checkpoint-tmp*')):  # a killed save's unfinished step, once the
        shutil.rmtree(tmp, ignore_errors=True)  # dir is this run's; here, not in orbax's thread (it fails at exit after a start-up error)
    start and print(f'resuming at step {start} of {total_steps} from {source.directory}' + ': the run is finished, nothing to train (more tokens: ckpt.resume=that dir, a larger train_tokens)' * (start >= total_steps))
    if start >= total_steps: return saver.close() or (state, {})  # finished: no compile, no wandb run; the lock goes with `lock`
    train_step_fn, eval_step_fn = compile_steps(graphdef, state)
    batch_sharding = jax.NamedSharding(mesh, jax.P(None, 'data'))  # [A, B/A, T+1]; validation: fixed (seed 0), in the same micro-batches
    val_batches = [data.load_batch(val_tokens, T, 0, i, B, A, batch_sharding)
                   for i in range(min(cfg.eval_batches, (len(val_tokens) - 1) // T // B))]  # no window twice

    flops_per_token, peak = gpt.flops_per_token(model_config(cfg.model)), utils.peak_flops(jax.devices()[0].device_kind, cfg.peak_flops)
    config, main = OmegaConf.to_container(cfg, resolve=True), jax.process_index() == 0  # only process 0 prints, logs and writes metrics
    run = utils.init_wandb(cfg.wandb, flatten(config) | {'n_params': n_params, 'flops_per_token': flops_per_token},
                           out_dir, meta.get('wandb_id') if source is saver else None, main)  # a resumed run continues its wandb run
    main and whole and print(f'warning: {whole / 1e6:.2f}M params and their Adam moments are whole on each device (the dimension FSDP splits them on does not divide over {jax.device_count()} devices)')
    main and print(f'{n_params / 1e6:.2f}M params, {total_steps} steps of {B}x{T} tokens on {jax.device_count()} {jax.devices()[0].device_kind}, '
          f'eval on {len(val_batches)}x{B} windows{" (all of val)" * (len(val_batches) < cfg.eval_batches)}; logging to {out_dir}, checkpoints in {ckpt_dir}')

    def log(record):  # metrics.jsonl first: a wandb that fails mid-run (its service killed, ...) must not stop training
        print(json.dumps(record), file=log_file, flush=True)
        with contextlib.suppress(Exception): run.log(record, step=record['step'])

    pending, t0, last, stopping = [], time.perf_counter(), {}, False
    bar = tqdm(range(start + 1, total_steps + 1), initial=start, total=total_steps, disable=not main)
    say = bar.write if main else lambda line: None
    # left in reverse: the loader's thread (it starts here, so it always stops), metrics.jsonl, the last save, then the lock
    with (jax.set_mesh(mesh), utils.stop_signals() as stop, lock, saver, open(os.path.join(out_dir, 'metrics.jsonl') if main else os.devnull, 'a') as log_file,
          contextlib.closing(data.batches(train_tokens, T, cfg.seed, start, B, A, batch_sharding)) as batches):
        train_step_fn = train_step_fn.lower(state, jax.ShapeDtypeStruct((A, B // A, T + 1), jnp.int32, sharding=batch_sharding)).compile()
        say(f'compiled the training step in {time.perf_counter() - t0:.1f} s')
        t0 = time.perf_counter()  # tokens/s counts training steps only: not the compile, not evals
        for done in bar:  # the step number once this step is done
            state, metrics = train_step_fn(state, next(batches))
            pending.append(metrics)
            # several processes agree to stop at a log step (until then `stopping` stays False: it breaks the loop)
            stopping = bool(stop) if jax.process_count() == 1 else done % cfg.log_every == 0 and process_allgather(np.int32(len(stop))).any()
            save_now = done % cfg.ckpt.every == 0 or done == total_steps or stopping
            if done % cfg.log_every == 0 or save_now:  # so a saved state has always passed the non-finite check
                values = np.array([[m['train_loss'], m['grad_norm']] for m in jax.device_get(pending)])  # [steps, 2]: the only host sync between evals
                if not np.isfinite(values).all():  # a NaN gradient would poison the state saved at this step
                    i, j = np.argwhere(~np.isfinite(values))[0] + (done - len(values) + 1, 0)  # i: the step
                    raise utils.PicodoError(f'non-finite {("loss", "gradient")[j]} at step {i} (diverged, or token ids >= model.vocab_size?)')
                dt = (time.perf_counter() - t0) / len(values)
                last = dict(step=done, train_loss=float(values[:, 0].mean()), grad_norm=float(values[-1, 1]),
                            lr=float(schedule(done - 1)), tokens_seen=done * B * T, tokens_per_sec=B * T / dt, step_time=dt,
                            mfu=utils.mfu(flops_per_token * B * T / dt, jax.device_count(), peak))
                log(last)
                bar.set_postfix(loss=f'{last["train_loss"]:.3f}', tok_s=f'{last["tokens_per_sec"]:.3g}')
                pending, t0 = [], time.perf_counter()
            t_pause = time.perf_counter()  # evals and saves are not training time
            if done % cfg.eval_every == 0 or done == total_steps:
                jax.block_until_ready(state)  # the steps queued before it count as training time, the eval does not
                t_pause = time.perf_counter()
                last['eval_loss'] = float(np.mean(jax.device_get([eval_step_fn(state, b) for b in val_batches])))
                if not np.isfinite(last['eval_loss']):  # steps since the last log step are not checked yet: either may be the cause
                    raise utils.PicodoError(f'non-finite eval loss at step {done} (diverged, or token ids >= model.vocab_size in {cfg.data.val_path}?)')
                log(dict(step=done, eval_loss=last['eval_loss']))
                say(f'step {done}: eval_loss {last["eval_loss"]:.4f}')
                if cfg.sample_tokens:
                    import sample  # the sampling tool beside the trainer, loaded only when asked for
                    say(f'sample: {sample.eval_sample(nnx.merge(graphdef, state)[0], val_tokens, cfg.sample_tokens, done)!r}')
            if save_now:  # after the eval: a process killed during it has no checkpoint past an eval it never logged
                save(saver, done, state, {'step': done, 'wandb_id': run.id, 'config': config})
            t0 += time.perf_counter() - t_pause
            if stopping:
                say(f'signal {stop[0] if stop else "on another process"}: stopped after step {done}, checkpoint in {ckpt_dir}')
                break
    last['signal'] = int(stop[0] if stop else signal.SIGTERM) if stop or stopping else None  # even during the last eval/save
    with contextlib.suppress(Exception): run.finish()
    return state, last
