"""Training-step benchmark: the real jitted step (train.py) on synthetic token windows (ids drawn as in text).

    python benchmarks/bench.py                                   # the CPU benchmark model (configs/bench_cpu.yaml)
    python benchmarks/bench.py -cn default batch_size=32         # GPT-2 small, any Hydra override
    python benchmarks/bench.py --tiny                            # a smoke run (about 20 s on 2 cores)
    python benchmarks/bench.py -cn default --vs 'model.remat=dots'   # and a variant, timed in the same rounds

Prints a summary table and, as its last line, one JSON object. Besides MFU against the vendor peak
(null where unknown), it reports `roofline_fraction`: model FLOP/s divided by the FLOP/s of a large dense
matmul in the model's dtype, measured on the same devices in the same run, interleaved with the training
rounds so both see the same machine noise. A depth sweep reports compile time at 2, 12 and 24 layers
with the layer scan on (the configs turn it off: unrolled layers step faster on CPUs and on an H200).
With --vs, a second step (the same overrides plus the variant's) runs in the same rounds, so the two are compared
under the same machine noise: its figures and `speedup` under the JSON's `vs` (its tokens/s over the first's, the median of the rounds' ratios).
--vs-xla compiles the --vs step with more XLA options; --vs-attention traces it with one of attention_bench.py's kernels,
--vs-layernorm with tokamax's LayerNorm (pip install tokamax; Triton's kernel on GPUs), --vs-loss online with the loss's
log-sum-exp in one pass over the logits instead of XLA's two.
"""
import argparse, contextlib, functools, json, os, platform, re, shlex, statistics, sys, time, unittest.mock
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import jax
import jax.numpy as jnp
import numpy as np
from hydra import compose, initialize_config_dir
from jax.sharding import NamedSharding, PartitionSpec as P
import model as gpt, train, utils

TINY = ['model.vocab_size=256', 'model.seq_len=32', 'model.d_model=64', 'model.n_layers=2', 'model.n_heads=4',
        'model.dtype=float32', 'batch_size=8']


def at_least(n):  # an argparse type: an integer >= n
    def parse(text):
        if not (text.lstrip('-').isdigit() and int(text) >= n):
            raise argparse.ArgumentTypeError(f'{text} is not an integer >= {n}')
        return int(text)
    return parse


def xla_options(text):  # an argparse type: a JSON object of XLA compile options ({"name": value, ...})
    try:
        options = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f'{text!r} is not JSON: {e}')
    if not isinstance(options, dict) or not all(type(v) in (str, bool, int, float) for v in options.values()):
        raise argparse.ArgumentTypeError(f'{text!r}: a JSON object of text, numbers and true/false, {{"xla_option_name": value, ...}}')
    return options


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('overrides', nargs='*', help='Hydra overrides, e.g. model.dtype=bfloat16 batch_size=16')
    p.add_argument('-cn', '--config-name', default='bench_cpu')
    p.add_argument('--warmup', type=at_least(0), default=None, help='untimed steps after compiling (default 2)')
    p.add_argument('--rounds', type=at_least(1), default=None, help='timed rounds; medians are reported (default 5)')
    p.add_argument('--steps', type=at_least(1), default=None, help='training steps per timed round (default 2)')
    p.add_argument('--devices', type=at_least(0), default=1, help='devices in the mesh; 0 = all')
    p.add_argument('--matmul-size', type=at_least(1), default=None, help='roofline matmul side (default 2048 on CPU, 8192 else)')
    p.add_argument('--depths', default=None, help="layer counts for the compile-time sweep (default 2,12,24); '' skips it")
    p.add_argument('--vs', type=shlex.split, default=None, help="a variant's overrides, timed in the same rounds: --vs 'model.remat=dots'")
    p.add_argument('--vs-xla', type=xla_options, default=None, metavar='JSON',
                   help="XLA options for the --vs step on top of the trainer's: --vs '' --vs-xla '{\"xla_gpu_enable_command_buffer\": \"\"}'")
    p.add_argument('--vs-attention', metavar='KERNEL', help="the --vs step's attention: a kernel of attention_bench.py "
                   "(pallas, 'pallas[bk=64,bkv_dkv=64]', mgpu+pallas, tokamax, ...) in place of jax.nn.dot_product_attention")
    p.add_argument('--vs-layernorm', choices=['tokamax'], help="the --vs step's LayerNorm: tokamax's (Triton's kernel on "
                   "GPUs, XLA's elsewhere) in place of flax's")
    p.add_argument('--vs-loss', choices=['online'], help="the --vs step's loss: its log-sum-exp in one pass over the logits "
                   "(a running max and sum), not XLA's two (the max, then the sum)")
    p.add_argument('--tiny', action='store_true', help='a tiny model, one short round, for smoke tests (flags given still count)')
    args = p.parse_args(argv)
    for flag, given in (('--vs-xla', args.vs_xla), ('--vs-attention', args.vs_attention), ('--vs-layernorm', args.vs_layernorm),
                        ('--vs-loss', args.vs_loss)):
        if given and args.vs is None:
            p.error(f"{flag} is for the --vs step: add --vs '' to compare the same step with and without it")
    defaults = dict(warmup=1, rounds=1, steps=1, matmul_size=128, depths='1,2') if args.tiny else dict(warmup=2, rounds=5, steps=2, depths='2,12,24')
    for key, value in defaults.items():
        setattr(args, key, value if getattr(args, key) is None else getattr(args, key))
    args.overrides = (TINY if args.tiny else []) + args.overrides
    if args.devices > jax.device_count():
        p.error(f'--devices {args.devices}: this machine has {jax.device_count()}')
    if not all(d.isdigit() and int(d) > 0 for d in filter(None, args.depths.split(','))):
        p.error(f'--depths {args.depths!r}: layer counts >= 1, separated by commas')
    return args


def compose_config(name, overrides):
    try:
        with initialize_config_dir(os.path.join(REPO, 'configs'), version_base=None):
            cfg = compose(name, overrides=list(overrides))
    except Exception as e:  # Hydra: a misspelt key, an unknown config name, a malformed override; said as main.py says it
        line, key = utils.first_line(e), re.match(r"Could not override '([^']+)'", str(e))
        raise utils.PicodoError(f'unknown config key: {key[1]}' if key else f'{type(e).__name__}: {line}' + (
            " (a value holding '=' or '~' needs quotes: 'key=\"value\"')" * (type(e).__name__ == 'OverrideParseException' and any(set('=~') & set(o.partition('=')[2]) for o in overrides)))) from None
    train.check_config(cfg)
    return cfg


def zipf_tokens(shape, V):
    """Synthetic ids in [0, V) drawn as in text (Zipf's law, p(id k) ~ 1/(k+1)), not uniformly: repeated ids slow a step's
    scatters, and uniform ids once hid a 54% slower H100 step (the embedding gradient scattered in bf16; see model.GPT)."""
    return np.random.default_rng(0).choice(V, shape, p=(p := 1 / np.arange(1, V + 1)) / p.sum()).astype(np.int32)


def check_batch(cfg, mesh):
    if cfg.batch_size % cfg.grad_accum or (cfg.batch_size // cfg.grad_accum) % mesh.devices.size:
        raise utils.PicodoError(f'batch_size {cfg.batch_size} must split into grad_accum={cfg.grad_accum} micro-batches, '
                                f'each divisible over {mesh.devices.size} devices')


def build(cfg, mesh, xla=None):
    """The real training step, compiled ahead of time (with XLA options `xla` on top of the trainer's), and a synthetic
    batch [A, B/A, T+1] for it."""
    check_batch(cfg, mesh)
    tx = train.make_optimizer(cfg.opt, train.lr_schedule(cfg.opt, 1000))
    graphdef, state = train.create_state(cfg, mesh, tx)
    step, _ = train.compile_steps(graphdef, state)
    A, B, T, V = cfg.grad_accum, cfg.batch_size, cfg.model.seq_len, cfg.model.vocab_size
    batch = jax.device_put(zipf_tokens((A, B // A, T + 1), V), NamedSharding(mesh, P(None, 'data')))
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):  # as in train.train: the model pins activations to batch sharding
        compiled = step.lower(state, batch).compile(xla)  # tracing + XLA compile, what a user waits for
    return compiled, state, batch, time.perf_counter() - t0


def matmul_roofline(mesh, n, dtype):
    """One [n·devices, n] @ [n, n] matmul, row-split over the mesh: returns (a timer giving seconds per matmul, its FLOPs)."""
    d = mesh.devices.size
    # random operands: on GPUs, constant ones switch fewer bits, draw less power and can hold higher clocks than real data
    a = jax.device_put(jax.random.normal(jax.random.key(0), (n * d, n), dtype), NamedSharding(mesh, P('data')))
    b = jax.device_put(jax.random.normal(jax.random.key(1), (n, n), dtype), NamedSharding(mesh, P()))
    return timer(jax.jit(lambda a, b: a @ b).lower(a, b).compile(), (a, b), 0.3, 3), 2 * d * n ** 3  # 0.3 s, even on fast chips


def timer(f, args, seconds, min_reps=1):
    """A function that times f(*args): seconds per call, over about `seconds` of calls (at least min_reps), after one untimed."""
    jax.block_until_ready(f(*args))
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))
    reps = max(min_reps, int(seconds / max(time.perf_counter() - t0, 1e-9)))
    def timed():
        t0 = time.perf_counter()
        for _ in range(reps):
            out = f(*args)
        jax.block_until_ready(out)
        return (time.perf_counter() - t0) / reps
    return timed


def hlo_frames(hlo, wanted):
    """{stack frame id: (file path, line, function) or None} from compiled HLO text: for each frame, the innermost of it and
    its callers whose file `wanted(path)` accepts (the line of our code that made an op, or called the library that did).
    XLA's text lists files, functions, locations and frames before the code; a frame names its caller as its number + 1."""
    tables, table = {t: {} for t in ('FileNames', 'FunctionNames', 'FileLocations', 'StackFrames')}, None
    for line in hlo.split('\n'):
        if line in tables:
            table = tables[line]
        elif table is not None and (m := re.match(r'(\d+) (.*)$', line)):
            table[int(m[1])] = m[2].strip('"') if m[2].startswith('"') else {k: int(v) for k, v in re.findall(r'(\w+)=(\d+)', m[2])}
        elif line.startswith(('%', 'ENTRY')):
            break
    files, funcs, locs, frames = tables.values()
    def innermost(frame, seen=()):
        if frame not in frames or frame in seen:
            return None
        loc = locs.get(frames[frame]['file_location_id'], {})
        if wanted(path := files.get(loc.get('file_name_id'), '')):
            return path, loc['line'], funcs.get(loc.get('function_name_id'), '?')
        return innermost(frames[frame].get('parent_frame_id', 1) - 1, (*seen, frame))
    return {f: innermost(f) for f in frames}


def host_cpu():  # the host's processor: device_kind says only 'cpu', and a figure on one CPU model tells little about another
    try:
        info = dict(re.findall(r'^(model name|cpu family|model)\s*: (.*)$', open('/proc/cpuinfo').read().split('\n\n')[0], re.M))
    except OSError:  # no /proc (macOS)
        return f'{platform.processor() or platform.machine()}, {os.cpu_count()} cores'
    return f"{info.get('model name', '?')} (family {info.get('cpu family', '?')}, model {info.get('model', '?')}), {os.cpu_count()} cores"


def attention(name, cfg, platform, attn_impl=None, flag='--vs-attention', devices=1, target=None):
    """A context in which jax.nn.dot_product_attention, which the model calls (but with model.attn_impl=chunked), is
    attention_bench.py's kernel `name` (as its rows are named: pallas[bk=64], mgpu+pallas, ...): that kernel in the real
    step, on `platform` (gpu, tpu, cpu); attn_impl: what the model will use (default: train.model_config's choice here);
    target: the GPU or TPU device compiled for, if not this machine's (deviceless.py). Without `name`, nothing changes."""
    if not name:
        return contextlib.nullcontext()
    import attention_bench as ab
    impl, bracket, given = name.partition('[')
    keys, given = ab.TOKAMAX_KEYS if impl == 'tokamax' else ab.PALLAS_KEYS, given.removesuffix(']')
    try:  # none: pallas with JAX's defaults, tokamax with its heuristics' blocks
        setting = (keys if given in ('', 'defaults') else ab.pallas_setting(given, keys)) if bracket else None
    except argparse.ArgumentTypeError as e:
        raise utils.PicodoError(f'{flag} {name!r}: {e}') from None
    if impl not in ab.IMPLS or impl == 'mgpu' or setting and impl not in ('pallas', 'mgpu+pallas', 'tokamax'):
        raise utils.PicodoError(f"{flag} {name!r}: one of {', '.join(i for i in ab.IMPLS if i != 'mgpu')} (mgpu has no causal backward; "
                                "pallas, mgpu+pallas and tokamax with a block setting: pallas[bk=64])")
    if (attn_impl or train.model_config(cfg.model).attn_impl) == 'chunked':  # auto on a CPU
        raise utils.PicodoError(f"{flag} {name!r} replaces jax.nn.dot_product_attention, which model.attn_impl=chunked does not "
                                "call: set model.attn_impl=xla" + ' in --vs' * (flag == '--vs-attention'))
    if impl in ab.TPU_ONLY and platform == 'cpu' and devices > 1:  # interpreted across several devices, it waits forever
        raise utils.PicodoError(f'{flag} {name!r} runs interpreted on a CPU, which hangs across {devices} devices: --devices 1')
    K = cfg.model.d_model // cfg.model.n_heads
    (_, _, kernel, bhtk), = ab.kernels(argparse.Namespace(impls=[impl], pallas=[setting or ab.PALLAS_KEYS], mgpu_block_kv=128,
                                                       tokamax=[setting] if impl == 'tokamax' and setting else None), K, platform)
    if isinstance(kernel, str):  # it cannot run here
        raise utils.PicodoError(f'{flag} {name!r}: {kernel}')
    swap = lambda x: x.swapaxes(1, 2) if bhtk else x
    def causal_attention(q, k, v, is_causal, implementation=None):  # as the model calls it in training (no mask, no bias)
        assert is_causal, 'the kernels of attention_bench.py are causal'
        return swap(kernel(*map(swap, (q, k, v))))
    @contextlib.contextmanager
    def swapped():  # entered by `with` only: the checks above run at once, the step built before it keeps its attention
        with contextlib.ExitStack() as stack:  # on a CPU, Pallas's TPU kernels compile interpreted (its GPU kernels are told so directly)
            stack.enter_context(unittest.mock.patch.object(jax.nn, 'dot_product_attention', causal_attention))
            stack.enter_context(ab.tpu_interpreted()) if platform == 'cpu' and impl in ab.TPU_ONLY else None
            stack.enter_context(ab.compiling_for(target)) if target else None
            yield
    return swapped()


def layer_norm(name, platform):
    """A context in which flax's LayerNorm, the model's, is tokamax's (name 'tokamax'): Triton's kernel, forward and
    backward, on `platform` gpu, XLA's elsewhere (the same arithmetic: a CPU checks the swap). Without `name`, nothing changes."""
    if not name:
        return contextlib.nullcontext()
    import attention_bench as ab
    from flax import nnx
    try:
        tokamax = ab.import_tokamax()
    except Exception as e:  # not installed, or a version that does not import with this JAX
        raise utils.PicodoError(f'--vs-layernorm {name}: {type(e).__name__}: {utils.first_line(e)} (pip install tokamax)') from None
    def call(self, x, *, mask=None):  # in the module's dtype, as flax's: the statistics in fp32
        assert mask is None, 'the model normalizes every token'
        ln = functools.partial(tokamax.layer_norm, epsilon=self.epsilon, implementation='triton' if platform == 'gpu' else 'xla')
        mesh = jax.sharding.get_abstract_mesh()
        if not mesh.empty and mesh.size > 1:  # XLA cannot split a Triton kernel: each device normalizes its tokens
            ln = jax.shard_map(ln, in_specs=(jax.P('data'), jax.P(), jax.P()), out_specs=jax.P('data'), check_vma=False)
        return ln(*(a.astype(self.dtype) for a in (x, self.scale[...], self.bias[...])))
    return unittest.mock.patch.object(nnx.LayerNorm, '__call__', call)


def online_lse(x):
    """log(sum(exp(x))) over the last axis in one pass: XLA reduces (max, sum of exp(x - max)) pairs together, each
    partial sum rescaled to the larger max, so the logits are read once (jax.nn.logsumexp reads them twice: the max,
    then the sum). Costs a second exp per element."""
    def combine(a, b):
        m = jnp.maximum(a[0], b[0])
        rescaled = lambda mi, si: jnp.where(mi == m, si, si * jnp.exp(mi - m))  # where both are -inf (padding): no exp(nan)
        return m, rescaled(*a) + rescaled(*b)
    x = x.astype(jnp.float32)
    m, s = jax.lax.reduce((x, jnp.ones_like(x)), (np.float32(-np.inf), np.float32(0)), combine, (x.ndim - 1,))
    return m + jnp.log(s)


def loss(name):
    """A context in which the model's loss (model.cross_entropy) takes its log-sum-exp from online_lse (name 'online');
    the backward is the model's. Without `name`, nothing changes."""
    if not name:
        return contextlib.nullcontext()
    def fwd(logits, labels):  # model._ce_fwd with the one-pass log-sum-exp
        lse = online_lse(logits)
        return (lse - jnp.take_along_axis(logits, labels[..., None], -1)[..., 0]).mean(), (logits, labels, lse)
    cross_entropy = jax.custom_vjp(lambda logits, labels: fwd(logits, labels)[0])
    cross_entropy.defvjp(fwd, gpt._ce_bwd)
    return unittest.mock.patch.object(gpt, 'cross_entropy', cross_entropy)


def compile_seconds(cfg, mesh, n_layers):  # with the layer scan, whatever the config says: the sweep is about its flat compile
    cfg = cfg.copy()
    cfg.model.n_layers, cfg.model.scan = n_layers, True
    return build(cfg, mesh)[3]


def run(args):
    cfg = compose_config(args.config_name, args.overrides)
    devices = jax.devices()[:args.devices or None]
    mesh = jax.make_mesh((len(devices),), ('data',), (jax.sharding.AxisType.Auto,), devices=devices)
    c = train.model_config(cfg.model)
    B, T = cfg.batch_size, cfg.model.seq_len
    try:  # a bad variant: one line that names --vs, before the first step is compiled
        vs_cfg = args.vs is not None and compose_config(args.config_name, args.overrides + args.vs)
        if vs_cfg:
            check_batch(vs_cfg, mesh)
            train.model_config(vs_cfg.model)  # its device refusals (cuDNN, fp16, bf16)
    except utils.PicodoError as e:
        raise utils.PicodoError(f'--vs {shlex.join(args.vs)!r}: {e}') from None
    vs_attention = attention(args.vs_attention, vs_cfg, devices[0].platform, devices=len(devices))  # its refusals, before any compile
    vs_layer_norm, vs_loss = layer_norm(args.vs_layernorm, devices[0].platform), loss(args.vs_loss)
    runs = [[*build(cfg, mesh), []]]  # [step, state, batch, compile_s, times], and the variant's
    try:
        with vs_attention, vs_layer_norm, vs_loss:
            runs += [[*build(vs_cfg, mesh, args.vs_xla), []]] if vs_cfg else []
    except Exception as e:  # an option XLA does not know, a value it cannot take; a kernel that fails in the step: one line
        if args.vs_xla and 'INVALID_ARGUMENT' in utils.first_line(e):
            raise utils.PicodoError(f'--vs-xla: {utils.first_line(e)}') from None
        if (args.vs_attention or args.vs_layernorm) and not utils.oom_error(e):
            flags = ' '.join(f'{f} {v!r}' for f, v in (('--vs-attention', args.vs_attention), ('--vs-layernorm', args.vs_layernorm)) if v)
            raise utils.PicodoError(f'{flags}: {type(e).__name__}: {utils.first_line(e)}') from None
        raise
    for r in runs:  # untimed steps, at least one: the first's loss and gradient norm (--vs '' with another kernel: the same?)
        for i in range(max(args.warmup, 1)):
            r[1], metrics = r[0](r[1], r[2])
            r += [{k: float(v) for k, v in metrics.items()}] * (i == 0)
        jax.block_until_ready(r[1])
    n = args.matmul_size or (2048 if devices[0].platform == 'cpu' else 8192)
    matmul_time, matmul_flops = matmul_roofline(mesh, n, c.dtype)
    matmul_times = []
    for i in range(args.rounds):  # interleaved, so the model(s) and the matmul see the same machine load
        matmul_times.append(matmul_time())
        for r in runs[::1 - 2 * (i % 2)]:  # with --vs, the two steps take turns going first
            t0 = time.perf_counter()
            for _ in range(args.steps):
                r[1], metrics = r[0](r[1], r[2])
            jax.block_until_ready(metrics)
            r[4].append((time.perf_counter() - t0) / args.steps)
    (step, state, batch, compile_s, step_times, first_step), matmul_s = runs[0], statistics.median(matmul_times)
    step_s, roofline = statistics.median(step_times), matmul_flops / matmul_s
    vs = vs_cfg and variant(args.vs, vs_cfg, runs[1][4], B * T, step_times, roofline, runs[1][3], devices) | {
        'xla_options': args.vs_xla, 'attention': args.vs_attention, 'layernorm': args.vs_layernorm, 'loss': args.vs_loss, 'first_step': runs[1][5]}
    model_flops = gpt.flops_per_token(c) * B * T / step_s
    peak = utils.peak_flops(devices[0].device_kind, cfg.peak_flops)
    mem = step.memory_analysis()
    stats = devices[0].memory_stats() or {}
    sweep = {L: compile_s if L == c.n_layers and c.scan else compile_seconds(cfg, mesh, L)
             for L in map(int, filter(None, args.depths.split(',')))}
    return dict(
        tokens_per_sec=B * T / step_s, step_ms=1e3 * step_s, compile_s=compile_s, first_step=first_step,
        mfu=utils.mfu(model_flops, len(devices), peak),
        model_flops_per_sec=model_flops, roofline_flops_per_sec=roofline, roofline_fraction=model_flops / roofline,
        peak_mem_bytes=stats.get('peak_bytes_in_use'),
        xla_mem_bytes=mem and mem.argument_size_in_bytes + mem.output_size_in_bytes
                      - mem.alias_size_in_bytes + mem.temp_size_in_bytes,
        device_kind=devices[0].device_kind, n_devices=len(devices), platform=devices[0].platform, host_cpu=host_cpu(),
        config=args.config_name, overrides=args.overrides, dtype=str(c.dtype), batch_size=B, seq_len=T,
        d_model=c.d_model, n_layers=c.n_layers, n_params=sum(x.size for x in jax.tree.leaves(state[0])),
        flops_per_token=gpt.flops_per_token(c), matmul_size=n,
        step_ms_rounds=[1e3 * t for t in step_times], roofline_rounds=[matmul_flops / t for t in matmul_times],
        roofline_fraction_rounds=[gpt.flops_per_token(c) * B * T / t / (matmul_flops / m)  # each round against its own matmul
                                  for t, m in zip(step_times, matmul_times)],
        compile_s_by_depth=sweep,
        compile_ratio_deep_to_shallow=sweep[max(sweep)] / sweep[min(sweep)] if sweep else None) | ({'vs': vs} if vs else {})


def variant(overrides, cfg, times, base_tokens, base_times, roofline, compile_s, devices):
    """The --vs step's figures; speedup: its tokens/s over the first step's, the median of the rounds' ratios."""
    c, tokens = train.model_config(cfg.model), cfg.batch_size * cfg.model.seq_len
    step_s, flops = statistics.median(times), gpt.flops_per_token(c) * tokens
    return dict(overrides=overrides, tokens_per_sec=tokens / step_s, step_ms=1e3 * step_s, compile_s=compile_s,
                mfu=utils.mfu(flops / step_s, len(devices), utils.peak_flops(devices[0].device_kind, cfg.peak_flops)),
                roofline_fraction=flops / step_s / roofline, step_ms_rounds=[1e3 * t for t in times],
                speedup=statistics.median(ratios := [tokens / t / (base_tokens / b) for t, b in zip(times, base_times)]),
                speedup_rounds=ratios)


def table(r):
    first = lambda m: f"loss {m['train_loss']:.5f}, gradient norm {m['grad_norm']:.5f}"
    g = lambda x: 'n/a' if x is None else f'{x / 1e9:,.1f} GFLOP/s' if x > 1e6 else f'{x:.3f}'
    rows = [('device', f"{r['n_devices']} x {r['device_kind']}"), ('host', r['host_cpu']),
            ('model', f"L={r['n_layers']} D={r['d_model']} T={r['seq_len']} B={r['batch_size']} "
                      f"{r['dtype']}, {r['n_params'] / 1e6:.2f}M params"),
            ('tokens/s', f"{r['tokens_per_sec']:,.0f}"), ('step', f"{r['step_ms']:,.1f} ms"),
            ('compile', f"{r['compile_s']:.1f} s"), ('model FLOP/s', g(r['model_flops_per_sec'])),
            (f"matmul {r['matmul_size']}² FLOP/s", g(r['roofline_flops_per_sec'])),
            ('roofline fraction', f"{r['roofline_fraction']:.3f} (rounds {min(r['roofline_fraction_rounds']):.3f}"
                                  f"-{max(r['roofline_fraction_rounds']):.3f})"), ('MFU', g(r['mfu'])),
            ('peak memory', 'n/a' if r['peak_mem_bytes'] is None else f"{r['peak_mem_bytes'] / 2**30:.2f} GiB"),
            ('XLA buffers', 'n/a' if r['xla_mem_bytes'] is None else f"{r['xla_mem_bytes'] / 2**30:.2f} GiB"),
            ('first step', first(r['first_step']))]
    if 'vs' in r:
        v = r['vs']
        rs = v['speedup_rounds']
        rows += [('vs', (shlex.join(v['overrides']) or ("''" if v['xla_options'] or v['attention'] or v['layernorm'] or v['loss'] else "'' (the same step again: the noise)"))
                        + (f" with XLA options {json.dumps(v['xla_options'])}" if v['xla_options'] else '')
                        + (f" with attention {v['attention']}" if v['attention'] else '')
                        + (f" with LayerNorm {v['layernorm']}" if v['layernorm'] else '')
                        + (f" with the {v['loss']} log-sum-exp" if v['loss'] else '')),
                 ('vs: tokens/s', f"{v['tokens_per_sec']:,.0f}, {v['step_ms']:,.1f} ms, compile {v['compile_s']:.1f} s"),
                 ('vs: roofline fraction, MFU', f"{v['roofline_fraction']:.3f}, {g(v['mfu'])}"),
                 ('vs: first step', first(v['first_step'])),
                 ('vs: speedup', f"{v['speedup']:.3f}x tokens/s (median of the rounds' ratios, "
                                 + (f"{min(rs):.3f}-{max(rs):.3f})" if len(rs) > 1 else '1 round: noise unknown, try --rounds 5)'))]
    rows += [(f'compile, {L} layers (scan)', f'{s:.1f} s') for L, s in r['compile_s_by_depth'].items()]
    if r['compile_ratio_deep_to_shallow']:
        rows.append(('compile ratio deep/shallow', f"{r['compile_ratio_deep_to_shallow']:.2f}x"))
    return '\n'.join(f'{k:<28} {v}' for k, v in rows)


def main(argv=None, parse=parse, run=run, table=table):  # profile_step.py passes its own three
    result = run(parse(argv))
    print(table(result))
    print(json.dumps(result), flush=True)
    return result


def cli(main):  # bad input: one line on stderr, non-zero exit
    utils.keep_freed_memory()  # as main.py does, before JAX starts its threads
    try:
        main()
    except utils.PicodoError as e:
        sys.exit(f'error: {e}')
    except RuntimeError as e:  # a batch too big for the device: one line, as in main.py
        if not utils.oom_error(e):
            raise
        sys.exit(utils.oom_error(e))


if __name__ == '__main__':
    cli(main)
