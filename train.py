"""The training loop: config in, sharded model and optimizer built, one jitted step, metrics out."""
import contextlib, functools, glob, io, json, logging, os, re, shutil, signal, sys, time, types, warnings
import jax, jax.numpy as jnp, numpy as np, optax, orbax.checkpoint as ocp
from flax import nnx, traverse_util
from jax.experimental.multihost_utils import process_allgather
from omegaconf import OmegaConf
from tqdm.auto import tqdm
import data, model as gpt, utils

DEFAULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs', 'default.yaml')
# the parameter tree, and what a step counts: a checkpoint is restored only under the same values, even by ckpt.resume
FIXED_KEYS = ['model.vocab_size', 'model.seq_len', 'model.d_model', 'model.n_layers', 'model.n_heads', 'model.scan', 'batch_size']
# keys that may change between launches of one run (how it runs, logs and saves, where its data is): the others, and ckpt.resume, may not
FREE_KEYS = ('ckpt.', 'wandb.', 'dist.', 'data.', 'log_every', 'eval_every', 'eval_batches', 'sample_tokens', 'peak_flops',
             'grad_accum', 'model.remat', 'model.attn_impl', 'model.dtype')
AT_LEAST = {'seed': 0, 'sample_tokens': 0} | dict.fromkeys(['model.vocab_size', 'model.seq_len', 'model.d_model', 'model.n_layers',
    'model.n_heads', 'batch_size', 'grad_accum', 'train_tokens', 'log_every', 'eval_every', 'eval_batches', 'ckpt.every', 'ckpt.keep'], 1)
in_01, below_1 = ('in [0, 1]', lambda x: 0 <= x <= 1), ('in [0, 1)', lambda x: 0 <= x < 1)  # other opt.*: finite, >= 0
BOUNDS = {'opt.b1': below_1, 'opt.b2': below_1, 'opt.warmup_frac': in_01, 'opt.min_lr_frac': in_01, 'opt.clip_norm': ('> 0', lambda x: x > 0),
          'peak_flops': ('finite and > 0, or null for the table', lambda x: 0 < x < float('inf'))}
NULL_DEFAULTS = {'peak_flops': float, 'dist.num_processes': int, 'dist.process_id': int}  # the other null defaults are text
CHOICES = {'model.dtype': ['float32', 'bfloat16', 'float16'], 'model.remat': ['none', *gpt.REMAT_POLICIES], 'model.attn_impl': ['auto', 'xla', 'cudnn', 'chunked'],
           'wandb.mode': ['online', 'offline', 'disabled', 'shared', 'dryrun']}  # WANDB_MODE, which wins, is checked in main.py
flatten = functools.partial(traverse_util.flatten_dict, sep='.')  # {'opt': {'peak_lr': 1}} -> {'opt.peak_lr': 1}


def check_config(cfg):
    # every key must exist in configs/default.yaml (a typo in a config file too, not just in an override), and every
    # ${...} interpolation must resolve (${oc.env:VAR} with VAR unset, a misspelt key)
    OmegaConf.set_struct(defaults := OmegaConf.load(DEFAULTS), True)
    try:
        OmegaConf.merge(defaults, cfg)
        OmegaConf.to_container(cfg, resolve=True)  # the user's config only: not default.yaml's hydra: node (${now:...})
    except Exception as e:  # omegaconf's errors name the key: ConfigKeyError, InterpolationResolutionError and its subclasses
        raise utils.PicodoError(f'bad config value: {e.full_key}: {str(e).splitlines()[0]}' if 'Interpolation' in type(e).__name__
                                else f'unknown config key: {getattr(e, "full_key", e)}') from None
    bad = [f'{k}={cfg[k]!r} (a group of keys: set one as {k}.KEY=VALUE)' for k, v in defaults.items() if OmegaConf.is_dict(v) and not OmegaConf.is_dict(cfg.get(k, v))]
    # default_of: default.yaml flat ({'opt.peak_lr': 0.0006, ...}), its hydra: node dropped (flatten drops an empty dict)
    get, default_of = lambda key: OmegaConf.select(cfg, key), flatten(OmegaConf.to_container(defaults) | {'hydra': {}})
    kind = {k: NULL_DEFAULTS.get(k, str) if v is None else type(v) for k, v in default_of.items()}  # each key's type
    bad += [f'{k} is missing (every key of default.yaml needs a value: a config file begins with defaults: [default, _self_])' for k in default_of if OmegaConf.select(cfg, k, default=KeyError) is KeyError]
    bad += [f'{k}={get(k)!r} (must be an integer >= {n})' for k, n in AT_LEAST.items() if not (isinstance(get(k), int) and get(k) >= n)]
    # each key of its default's type (null where the default is null); a number for a text key: quote it, as ckpt.dir="7"
    bad += [f'{k}={get(k)!r} (must be {t.__name__}{": quote a number" * (t is str and type(get(k)) in (int, float))})' for k, t in kind.items()
            if not (get(k) is None and default_of[k] is None) and type(get(k)) not in ((int, float) if t is float else (t,))]
    bad += [f'{k}={get(k)} (must be {b[0]})' for k in default_of if k.startswith(('opt.', 'peak_flops')) and type(get(k)) in (int, float)
            and not (b := BOUNDS.get(k, ('finite and >= 0', lambda x: 0 <= x < float('inf'))))[1](get(k))]
    bad += [f'{k}={get(k)} (one of {", ".join(v)})' for k, v in CHOICES.items() if get(k) not in v]
    # JAX segfaults on a port that is not a number, has an IndexError for no port, and waits 5 minutes on port 0 or past 65535
    bad += [f'dist.coordinator={c!r} (must be host:port, the port 1-65535)' for c in [get('dist.coordinator')]
            if isinstance(c, str) and not ((m := re.fullmatch(r'.+:(\d{1,5})', c)) and 1 <= int(m[1]) <= 65535)]
    bad = bad or ([f'model.n_heads={cfg.model.n_heads} (must divide model.d_model={cfg.model.d_model})'] if cfg.model.d_model % cfg.model.n_heads else [])
    if bad: raise utils.PicodoError(f'bad config value: {bad[0]}')


def model_config(c):
    c = types.SimpleNamespace(**OmegaConf.to_container(c, resolve=True) | {'dtype': jnp.dtype(c.dtype)})
    # cuDNN trains on compute capability 8.0+ (not a T4 or V100) in bf16 or fp16, with an even seq_len and a head width K that is a
    # multiple of 8, up to 128 (256 from Hopper, 9.0); JAX raises NotImplementedError for the rest
    cc, K = str(getattr(jax.devices()[0], 'compute_capability', '')), c.d_model // c.n_heads
    cudnn_ok = (jax.default_backend() == 'gpu' and c.dtype != jnp.float32 and cc[:1].isdigit() and float(cc) >= 8
                and c.seq_len % 2 == 0 and K % 8 == 0 and K <= (256 if float(cc) >= 9 else 128))
    if c.dtype == jnp.bfloat16 and cc[:1].isdigit() and float(cc) < 8:  # XLA's bf16 attention does not compile there: UNIMPLEMENTED
        raise utils.PicodoError(f'model.dtype=bfloat16 needs compute capability 8.0+ (here {jax.devices()[0].device_kind}, {cc}): set model.dtype=float16 (float32 below 7.0)')
    if c.attn_impl == 'cudnn' and not cudnn_ok:  # else JAX's traceback at the first compile
        raise utils.PicodoError(f'model.attn_impl=cudnn needs an NVIDIA GPU of compute capability 8.0+ and model.dtype=bfloat16 or float16 (here {jax.devices()[0].device_kind}, '
                                f'{c.dtype}), an even seq_len and a head width d_model/n_heads that is a multiple of 8 up to 128, 256 from 9.0 (here {c.seq_len} and {K})')
    if c.attn_impl == 'auto':  # cuDNN flash attention on NVIDIA GPUs where it can train, model.chunked_attention on CPUs, else XLA
        c.attn_impl = 'cudnn' if cudnn_ok else {'cpu': 'chunked'}.get(jax.default_backend(), 'xla')
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
    if not os.path.isdir(path): raise utils.PicodoError(f'checkpoint not found: {path}')
    manager = ocp.CheckpointManager(os.path.dirname(path) if one_step else path, options=ocp.CheckpointManagerOptions(create=False))
    step = int(os.path.basename(path)) if one_step else manager.latest_step()
    if step not in manager.all_steps(): raise utils.PicodoError(f'no complete checkpoint in {path}')
    return manager, step


def restore(manager, step, cfg, state, same_run=False):
    """The saved state laid out like `state` (so onto the current mesh, whatever mesh saved it), and its metadata.
    The config must match the saved one in FIXED_KEYS or, to go on with the same run, in all but FREE_KEYS (ckpt.resume too)."""
    where = os.path.join(manager.directory, str(step))
    try:
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
        saved, now = (flatten(c) for c in (meta['config'], OmegaConf.to_container(cfg, resolve=True)))
        # the fixed keys first; to go on with the same run, also every key but the free ones (ckpt.resume is not free)
        keys = FIXED_KEYS + [k for k in now if not k.startswith(FREE_KEYS) or k == 'ckpt.resume'] if same_run else FIXED_KEYS
        differ = [f'{k}={json.dumps(saved.get(k))} but the config says {json.dumps(now[k])}' for k in keys if saved.get(k) != now[k]]  # as YAML writes true, null
        if not differ:
            # A failed read is noisy after the fact: orbax closes its event loop with other reads still in flight. As those
            # end (within ms), TensorStore's threads print tracebacks to stderr ("event loop is closed"): sent into nothing
            # here. Their asyncio tasks, freed (even within the restore), log a traceback each through asyncio's logger,
            # which writes to the console, not stderr: silenced by its level (Hydra's logging set-up for a sweep's next run
            # turns .disabled back off). Their coroutines print one each when freed, at exit or in a sweep's next run: the except
            # below silences those (a warnings filter, then a no-op unraisablehook).
            with contextlib.redirect_stderr(io.StringIO()):
                logging.getLogger('asyncio').setLevel(logging.CRITICAL + 1)
                try:
                    return manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(state)))['state'], meta
                except Exception:
                    warnings.filterwarnings('ignore', 'coroutine .* was never awaited')
                    sys.unraisablehook = lambda *_: None  # for the rest of the process (main.py's next run wraps it, Ctrl-C first)
                    time.sleep(0.5)  # for the reads still in flight to end while stderr goes nowhere
                    raise
    except Exception as e:  # truncated or missing files, garbled metadata, ...: orbax's error wraps TensorStore's, which names the file
        cause = e.__cause__ or e
        raise utils.PicodoError(f'cannot restore checkpoint {where}: {type(cause).__name__}: {utils.first_line(cause).split(" [tensorstore_spec")[0]} (damaged? to go on from the step before, move this one away)') from None
    # no hint where ckpt.resume cannot help: a fixed key, or ckpt.resume itself (an older step of this dir: it would save over the newer)
    hint = ', or ckpt.resume to go on from it with this config' * (not differ[0].startswith((*FIXED_KEYS, 'ckpt.resume=')))
    raise utils.PicodoError(f'checkpoint {where} has {differ[0]}' + (f': another run (set ckpt.dir){hint}' if same_run else ''))


def save(manager, step, state, meta):  # asynchronous: the arrays are copied off the devices, then written in the background
    need, free = sum(x.nbytes for x in jax.tree.leaves(state)), shutil.disk_usage(manager.directory).free  # each array once
    # a full disk would fail later, in orbax's writer thread: say so now; older checkpoints stay
    if need > free: raise utils.PicodoError(f'no room for checkpoint {step} in {manager.directory}: {need / 2**20:.0f} MiB needed, {free / 2**20:.0f} MiB free')
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
    # cuBLAS, not Triton, for matmuls on GPUs: an H200 step 1.5% faster (cuBLAS also fuses GELU), compiles in half the time;
    # no dot merger, which joins k's and v's matmuls, then copies the halves apart: an H100 step at B=32 2.4% faster (64, 128: same)
    opts = {'xla_gpu_enable_triton_gemm': False, 'xla_disable_hlo_passes': 'dot-merger'} if jax.default_backend() == 'gpu' else None
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
            raise utils.PicodoError(f'dist.* keys: cannot join the processes of the run: {utils.first_line(e)}') from None


# true on every process if true on any (an all-gather when there are several), so that all processes stop, or none
any_process = lambda flag: bool(flag) if jax.process_count() == 1 else bool(process_allgather(np.int32(bool(flag))).any())


def open_checkpoints(cfg, ckpt_dir, total_steps):
    # a first launch reads ckpt.resume's checkpoint: a missing or empty one is said before ckpt_dir is made (no empty run dir)
    if cfg.ckpt.resume and not os.path.exists(ckpt_dir): find_checkpoint(cfg.ckpt.resume)
    # ckpt_dir, made if missing and locked while this run trains and saves: a second launch of the same run would delete its
    # unfinished checkpoint (see train) and save steps over its own. A POSIX lock: released when the process ends, however it ends.
    with contextlib.suppress(OSError): os.makedirs(ckpt_dir, exist_ok=True)  # a file in the way, or no write access: said below
    if not (os.path.isdir(ckpt_dir) and os.access(ckpt_dir, os.W_OK)): raise utils.PicodoError(f'ckpt.dir {ckpt_dir} is not a writable directory')
    lock = open(os.path.join(ckpt_dir, f'.lock.{jax.process_index()}'), 'a')
    try:
        refused = os.lockf(lock.fileno(), os.F_TLOCK, 0)
    except (OSError, AttributeError) as e:  # held by another process; else no locks on this filesystem (or no os.lockf): no check
        refused = isinstance(e, (BlockingIOError, PermissionError))
    if any_process(refused): raise utils.PicodoError(f'{ckpt_dir} is in use by another process: the same run launched twice?')
    # where to start: the run's own newest checkpoint (its config must match, ckpt.resume included); else ckpt.resume's (a first
    # launch, or ckpt.resume naming this run's own dir or newest step: go on with a changed config); else step 0
    saver = ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(max_to_keep=cfg.ckpt.keep))
    latest, resume = saver.latest_step(), cfg.ckpt.resume and os.path.abspath(cfg.ckpt.resume)
    own = not resume or latest and resume not in (ckpt_dir, os.path.join(ckpt_dir, str(latest)))
    source, start = (saver, latest or 0) if own else find_checkpoint(resume)
    if 0 in saver.all_steps():
        raise utils.PicodoError(f'{ckpt_dir} holds a dir 0, not from this trainer (it saves from step 1): orbax would delete it: set ckpt.dir')
    # a checkpoint past the start: orbax would silently skip saves up to its newest step
    if (latest or 0) > start: raise utils.PicodoError(f'{ckpt_dir} holds step {latest}, past step {start}: set ckpt.dir')
    # ckpt.resume's checkpoint at or past the last step: it would train nothing and exit 0
    if not own and start >= total_steps: raise utils.PicodoError(f'ckpt.resume {resume} is at step {start}: train_tokens={cfg.train_tokens} ends at step {total_steps}')
    return lock, saver, source, start


def train(cfg, out_dir, name='run', sweep=False):
    check_config(cfg)
    # '~/x' quoted, or in a config file: the home dir's x, not ./~/x; an empty path (`ckpt.resume=$CKPT`, CKPT unset) was ignored
    for key in ('data.train_path', 'data.val_path', 'ckpt.dir', 'ckpt.resume'):
        if OmegaConf.select(cfg, key) == '': raise utils.PicodoError(f'{key} is empty (an unset shell variable?): leave it out, or null, for its default')
        if OmegaConf.select(cfg, key): OmegaConf.update(cfg, key, os.path.expanduser(OmegaConf.select(cfg, key)))
    init_distributed(cfg.dist.coordinator, cfg.dist.num_processes, cfg.dist.process_id)
    mesh = jax.make_mesh((jax.device_count(),), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
    batch_sharding = jax.NamedSharding(mesh, jax.P(None, 'data'))  # batches [A, B/A, T+1]: each micro-batch split over devices
    B, A, T = cfg.batch_size, cfg.grad_accum, cfg.model.seq_len  # windows per step, micro-batches per step, tokens per sequence (a window holds T+1)
    model_cfg = model_config(cfg.model)  # refuses what this device cannot train before any data is read
    if B % A or (B // A) % jax.device_count():
        raise utils.PicodoError(f'batch_size {B} must split into grad_accum={A} micro-batches, each divisible over {jax.device_count()} devices')

    if cfg.data.build_if_missing and not any(os.path.exists(p) for p in (cfg.data.train_path, cfg.data.val_path)):  # it writes both
        import prepare  # the data tool beside the trainer, needed only on a first run
        prepare.build_stdlib_bytes(cfg.data.train_path, cfg.data.val_path)
    train_tokens, val_tokens = (data.open_tokens(path, cfg.model.vocab_size, T, B) for path in (cfg.data.train_path, cfg.data.val_path))
    total_steps = cfg.train_tokens // (B * T)
    if not 1 <= total_steps < 2 ** 31:  # no step: a run would end with exit code 0; past int32: optax's schedule overflows
        raise utils.PicodoError(f'train_tokens={cfg.train_tokens} gives {total_steps} steps of batch_size x seq_len = {B * T} tokens (must give 1 to 2^31 - 1)')
    schedule = lr_schedule(cfg.opt, total_steps)

    # checkpoints live under the launch directory, not in Hydra's per-run outputs/, so a re-launch finds them; a sweep's
    # points each under ckpt.dir by name (one ckpt.dir for all: the second point would find the first's checkpoint)
    ckpt_dir = os.path.abspath(os.path.join(cfg.ckpt.dir or 'checkpoints', name) if sweep or not cfg.ckpt.dir else cfg.ckpt.dir)
    lock, saver, source, start = open_checkpoints(cfg, ckpt_dir, total_steps)
    graphdef, state = create_state(cfg, mesh, make_optimizer(cfg.opt, schedule))
    # source is saver: this run's own checkpoint (the config must match but for FREE_KEYS; its wandb run goes on)
    state, meta = restore(source, start, cfg, state, same_run=source is saver) if start else (state, {})
    # the dir is this run's now: remove a killed save's unfinished step (here, not in orbax's thread: it fails at exit after a
    # start-up error), on process 0 only (every host sees ckpt.dir; another process removing it first, process 0 said nothing)
    for tmp in glob.glob(os.path.join(glob.escape(ckpt_dir), '*.orbax-checkpoint-tmp*')) if jax.process_index() == 0 else []:
        shutil.rmtree(tmp, ignore_errors=True)
        print(f'removed {tmp}: a checkpoint whose save never finished (its run stopped while writing it)')
    if start: print(f'resuming at step {start} of {total_steps} from {source.directory}' + (': the run is finished, nothing to train (more tokens: ckpt.resume=that dir, a larger train_tokens)' if start >= total_steps else ''))
    if start >= total_steps: return saver.close() or (state, {})  # finished: no compile, no wandb run; the lock goes with `lock`
    train_step_fn, eval_step_fn = compile_steps(graphdef, state)
    # validation: fixed windows (seed 0), in the training step's micro-batches, no window twice
    val_batches = [data.load_batch(val_tokens, T, 0, i, B, A, batch_sharding)
                   for i in range(min(cfg.eval_batches, (len(val_tokens) - 1) // T // B))]

    config, is_main = OmegaConf.to_container(cfg, resolve=True), jax.process_index() == 0  # only process 0 prints, logs and writes metrics
    flops_per_token, peak = gpt.flops_per_token(model_cfg), utils.peak_flops(jax.devices()[0].device_kind, cfg.peak_flops)
    n_params = sum(x.size for x in jax.tree.leaves(state[0]))  # state[0]: the model's; state[1]: the optimizer's
    run = utils.init_wandb(cfg.wandb, flatten(config) | {'n_params': n_params, 'flops_per_token': flops_per_token},
                           out_dir, meta.get('wandb_id') if source is saver else None, is_main)  # a resumed run continues its wandb run
    # weights FSDP could not split: no dimension of theirs divides over the devices
    whole = sum(x.size for x in jax.tree.leaves(state[0]) if x.sharding.is_fully_replicated) * (jax.device_count() > 1)
    if is_main and whole: print(f'warning: {whole / 1e6:.2f}M params and their Adam moments are whole on each device (the dimension FSDP splits them on does not divide over {jax.device_count()} devices)')
    if is_main: print(f'{n_params / 1e6:.2f}M params, {total_steps} step{"s" * (total_steps > 1)} of {B}x{T} tokens on {jax.device_count()} {jax.devices()[0].device_kind}, '
                      f'eval on {len(val_batches)}x{B} of val\'s {(len(val_tokens) - 1) // T} windows; logging to {out_dir}, checkpoints in {ckpt_dir}')

    pending, t0, last, stopping = [], time.perf_counter(), {}, False
    bar = tqdm(range(start + 1, total_steps + 1), initial=start, total=total_steps, disable=not is_main)
    say = bar.write if is_main else lambda line: None
    # left in reverse: the loader's thread (it starts here, so it always stops), metrics.jsonl, the last save, then the lock
    with (jax.set_mesh(mesh), utils.stop_signals() as stop, lock, saver, open(os.path.join(out_dir, 'metrics.jsonl') if is_main else os.devnull, 'a') as log_file,
          contextlib.closing(data.batches(train_tokens, T, cfg.seed, start, B, A, batch_sharding)) as batches):

        def log(record):  # metrics.jsonl first: a wandb that fails mid-run (its service killed, ...) must not stop training
            print(json.dumps(record), file=log_file, flush=True)
            # wandb from the step its run resumed at (starting_step): a relaunch from a checkpoint older than the last log re-logs
            # steps wandb holds (with the same values), and wandb refused each with a warning line
            with contextlib.suppress(Exception): record['step'] < getattr(run, 'starting_step', 0) or run.log(record, step=record['step'])

        train_step_fn = train_step_fn.lower(state, jax.ShapeDtypeStruct((A, B // A, T + 1), jnp.int32, sharding=batch_sharding)).compile()
        say(f'compiled the training step in {time.perf_counter() - t0:.1f} s')
        t0 = time.perf_counter()  # tokens/s counts training steps only: not the compile, not evals
        for done in bar:  # the step number once this step is done
            state, metrics = train_step_fn(state, next(batches))
            pending.append(metrics)
            # a stop signal ends the loop after this step; several processes agree on it at log steps only (an all-gather each)
            stopping = (jax.process_count() == 1 or done % cfg.log_every == 0) and any_process(stop)
            save_now = done % cfg.ckpt.every == 0 or done == total_steps or stopping
            if done % cfg.log_every == 0 or save_now:  # so a saved state has always passed the non-finite check
                values = np.array([[m['train_loss'], m['grad_norm']] for m in jax.device_get(pending)])  # [steps, 2]: one host sync per log
                if not np.isfinite(values).all():  # a NaN gradient would poison the state saved at this step
                    row, col = np.argwhere(~np.isfinite(values))[0]  # row 0 is step done - len(values) + 1
                    raise utils.PicodoError(f'non-finite {("loss", "gradient")[col]} at step {done - len(values) + 1 + row} (diverged, or token ids >= model.vocab_size?)')
                dt = (time.perf_counter() - t0) / len(values)
                last = dict(step=done, train_loss=float(values[:, 0].mean()), grad_norm=float(values[-1, 1]),
                            lr=float(schedule(done - 1)), tokens_seen=done * B * T, tokens_per_sec=B * T / dt, step_time=dt,
                            mfu=utils.mfu(flops_per_token * B * T / dt, jax.device_count(), peak))
                log(last)
                bar.set_postfix(loss=f'{last["train_loss"]:.3f}', tok_s=f'{last["tokens_per_sec"]:.3g}')
                pending, t0 = [], time.perf_counter()
            # evals and saves are not training time: t0 moves forward by their length (from t_pause, once queued steps are done)
            t_pause = time.perf_counter()
            if done % cfg.eval_every == 0 or done == total_steps:
                jax.block_until_ready(state)  # the steps queued before it count as training time, the eval does not
                t_pause = time.perf_counter()
                last['eval_loss'] = float(np.mean(jax.device_get([eval_step_fn(state, b) for b in val_batches])))
                if not np.isfinite(last['eval_loss']):  # diverged (training steps since the last log step are unchecked), or bad val ids
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
    # the signal that stopped the run, even one that came during the last eval or save (another process's: SIGTERM)
    last['signal'] = int(stop[0]) if stop else int(signal.SIGTERM) if stopping else None
    with contextlib.suppress(Exception): run.finish()
    return state, last
