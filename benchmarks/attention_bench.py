"""Attention kernels alone, forward and backward, on one layer's causal attention at a config's shape: which kernel
would make the training step faster? On an H100, cuDNN's attention took 10.6 ms of GPT-2 small's 61.7 ms step at B=32,
8.3 ms of it backward (benchmarks/RESULTS.md).

    python benchmarks/attention_bench.py -cn default batch_size=32   # GPT-2 small (the default config: B=64), every kernel
    python benchmarks/attention_bench.py batch_size=32 --impls cudnn,pallas --rounds 9
    python benchmarks/attention_bench.py --pallas 'bq=128,bk=64,bq_dkv=64,bkv_dkv=64,bkv_dq=64,warps=4,stages=3'
    python benchmarks/attention_bench.py batch_size=32 --impls cudnn,tokamax --tokamax bq=64 bq=128 'bq=128,stages=3' wgs=1
    python benchmarks/attention_bench.py batch_size=32 --compile-for h100   # no GPU: which kernels and blocks compile for one
    python benchmarks/attention_bench.py --tiny                            # a smoke run on a CPU (Pallas in interpret mode)

Kernels (--impls): `cudnn` and `xla` (jax.nn.dot_product_attention, as model.attn_impl picks them), `cudnn-bnth` (cuDNN
on [B, H, T, K] inputs, through JAX's internal cuDNN API: does the layout matter?), `chunked` (model.chunked_attention),
`pallas` (jax.experimental.pallas.ops.gpu.attention.mha: Triton, forward and backward; one row per --pallas block
setting), `mgpu` (Pallas's Mosaic GPU kernel for Hopper, attention_mgpu: forward only, its causal backward is not
written), `mgpu+pallas` (Mosaic GPU's forward with the Triton backward, through both modules' internals) and
`pallas-tpu` (jax.experimental.pallas.ops.tpu.flash_attention, on [B, H, T, K]; T a multiple of 128); from tokamax
(Google's kernel library, pip install tokamax, not in requirements.txt), `tokamax` (Mosaic GPU's flash attention with
its backward, for Hopper and Blackwell GPUs; or Mosaic TPU's, v5e and later; one row per --tokamax block setting for
Hopper, else its heuristics' blocks) and `tokamax-triton` (its Triton kernel). With
JAX 0.10.2 JAX's Mosaic GPU kernel (mgpu) takes float16 only (its shared-memory buffers are fp16; bf16 fails with 'Mixed
input dtypes'): time its rows with model.dtype=float16, beside the others in float16 (tokamax's compiles in bf16).
A kernel that cannot run here (no CUDA GPU or TPU, an API missing from this JAX, a block setting that does not compile)
gets a row that says why; the others still run. On a CPU Pallas's kernels run interpreted (slowly: the times mean
nothing, the errors do). On a mesh of several devices (--compile-for a TPU slice) Pallas's kernels run per device in a
shard_map over the batch: XLA cannot split them.

Each kernel is compiled twice, forward alone and forward + backward (jax.vjp), and timed in rounds that take turns;
medians are reported, the backward's time as the difference (a little high: the forward alone skips writing what the
backward keeps, such as the log-sum-exp). Each kernel's check is printed to stderr as it ends, and a kernel that fails
while timed ends only its own row. FLOP/s count the causal work (half of the T×T scores;
the backward 2.5× the forward), which is what a kernel that skips the masked blocks does. rel_err: the largest
difference from XLA's attention in fp32 on the same inputs, over the output and the three gradients, relative to
each one's largest value; a row above 1e-4 (fp32) or 5e-2 (bf16, fp16) is flagged, and is never `fastest`. `per step` is the
forward + backward times the number of layers. The last line is JSON.
"""
import argparse, contextlib, functools, inspect, os, statistics, sys, time, unittest.mock, warnings
if __name__ == '__main__' and any(a.startswith('--compile-for') for a in sys.argv):  # as deviceless.py: the GPU or TPU is a target
    os.environ.update(JAX_PLATFORMS='cpu', JAX_ENABLE_COMPILATION_CACHE='false')  # only, and libtpu is told there is no TPU VM
    for key, value in dict(TPU_WORKER_HOSTNAMES='localhost', TPU_ACCELERATOR_TYPE='none', ALLOW_MULTIPLE_LIBTPU_LOAD='1').items():
        os.environ.setdefault(key, value)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402 (puts the repo on sys.path)
import jax, jax.numpy as jnp  # noqa: E402
import model as gpt, train, utils  # noqa: E402

IMPLS = ['cudnn', 'cudnn-bnth', 'xla', 'chunked', 'pallas', 'mgpu', 'mgpu+pallas', 'pallas-tpu', 'tokamax', 'tokamax-triton']
GPU_ONLY = {'cudnn', 'cudnn-bnth', 'mgpu', 'mgpu+pallas', 'pallas', 'tokamax-triton'}  # pallas (Triton) also runs on a CPU, interpreted
TPU_ONLY = {'pallas-tpu'}  # and on a CPU, interpreted
PALLAS_IMPLS = {'pallas', 'mgpu', 'mgpu+pallas', 'pallas-tpu', 'tokamax', 'tokamax-triton'}  # XLA cannot split them over devices
TINY = ['model.seq_len=256', 'model.d_model=128', 'model.n_heads=2', 'model.n_layers=2', 'model.dtype=float32', 'batch_size=2']
PALLAS_KEYS = {'bq': 128, 'bk': 128, 'bq_dkv': 32, 'bkv_dkv': 32, 'bkv_dq': 32, 'warps': 0, 'stages': 2}  # JAX's defaults
# tokamax's Mosaic GPU kernel for Hopper: forward query and key blocks and pipeline stages, then the backward's (dK and dV's
# blocks, dQ's, its stages, its compute warpgroups); the defaults are tokamax 0.0.12's heuristics for GPT-2 small's shape
TOKAMAX_KEYS = {'bq': 64, 'bkv': 128, 'stages': 2, 'bq_dkv': 64, 'bkv_dkv': 64, 'bq_dq': 64, 'bkv_dq': 64, 'bwd_stages': 2, 'wgs': 2}
BACKWARD_KEYS = ('bq_dkv', 'bkv_dkv', 'bkv_dq', 'warps')  # those the Triton backward's kernel uses (bq: only its preprocessing)
TOLERANCE = {'float32': 1e-4}  # rel_err above which a row is not counted as fastest (else 5e-2: bf16, fp16 kernels are near 1e-2)
# block settings timed by default on a GPU (the dq kernel's query block is bkv_dkv: the Triton backward requires it)
PALLAS = ['bq=128,bk=128,bq_dkv=32,bkv_dkv=32,bkv_dq=32', 'bq=128,bk=64,bq_dkv=64,bkv_dkv=64,bkv_dq=64',
          'bq=128,bk=64,bq_dkv=64,bkv_dkv=128,bkv_dq=64,warps=8', 'bq=64,bk=64,bq_dkv=64,bkv_dkv=64,bkv_dq=64,stages=3',
          'bq=128,bk=128,bq_dkv=64,bkv_dkv=128,bkv_dq=128,warps=8', 'bq=128,bk=64,bq_dkv=32,bkv_dkv=64,bkv_dq=32',
          'bq=128,bk=64,bq_dkv=32,bkv_dkv=128,bkv_dq=32,stages=3']  # the last: the blocks of Triton's own fused-attention tutorial


def tpu_interpreted():  # a context: Pallas's TPU kernels compiled under it run interpreted (on a CPU)
    from jax.experimental.pallas import tpu as pltpu
    return pltpu.force_tpu_interpret_mode()


def deviceless_targets():  # deviceless.py's GPUs and TPU slices (its import sets up nothing)
    import deviceless
    return deviceless.GPUS, deviceless.TPUS


def pallas_setting(text, keys=PALLAS_KEYS):  # an argparse type: 'bq=128,bk=64,...' -> dict, the defaults for the keys not given
    try:
        given = {k: int(v) for k, v in (kv.split('=') for kv in text.split(','))}
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r}: key=integer pairs separated by commas, keys {", ".join(keys)}')
    if set(given) - set(keys):
        raise argparse.ArgumentTypeError(f'{text!r}: unknown key {sorted(set(given) - set(keys))[0]}; keys: {", ".join(keys)}')
    return keys | given


tokamax_setting = functools.partial(pallas_setting, keys=TOKAMAX_KEYS)


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('overrides', nargs='*', help='Hydra overrides: batch_size, model.seq_len, model.n_heads, model.d_model, model.dtype')
    p.add_argument('-cn', '--config-name', default='default')
    p.add_argument('--impls', default=','.join(IMPLS), help=f'kernels to time, separated by commas (default all: {",".join(IMPLS)})')
    p.add_argument('--pallas', nargs='+', type=pallas_setting, default=None,
                   help=f'block settings for pallas and mgpu+pallas (default: {len(PALLAS)} on a GPU, the first on a CPU)')
    p.add_argument('--tokamax', nargs='+', type=tokamax_setting, default=None, help="block settings for tokamax's Mosaic GPU "
                   f"kernel, a row each (default: its heuristics alone; keys {', '.join(TOKAMAX_KEYS)})")
    p.add_argument('--mgpu-block-kv', type=bench.at_least(64), default=128, help="Mosaic GPU's key block (its query block is 64)")
    p.add_argument('--rounds', type=bench.at_least(1), default=None, help='timed rounds, medians reported (default 5; --tiny 1)')
    p.add_argument('--seconds', type=float, default=None, help='about how long each timing runs (default 0.1; --tiny 0)')
    p.add_argument('--compile-for', choices=[*deviceless_targets()[0], *deviceless_targets()[1]], help='compile each kernel for that GPU '
                   'or TPU slice, run nothing (needs the CUDA plugin or libtpu: see benchmarks/deviceless.py): which compile, their memory')
    p.add_argument('--tiny', action='store_true', help='B=2, T=256, H=2, K=64 in fp32, one round: a smoke run')
    args = p.parse_args(argv)
    args.overrides = (TINY if args.tiny else []) + args.overrides
    args.rounds = args.rounds or (1 if args.tiny else 5)
    args.seconds = (0 if args.tiny else 0.1) if args.seconds is None else args.seconds
    args.impls = args.impls.split(',')
    if bad := [i for i in args.impls if i not in IMPLS]:
        p.error(f'--impls: unknown kernel {bad[0]!r}; known: {", ".join(IMPLS)}')
    args.platform = ('gpu' if args.compile_for in deviceless_targets()[0] else 'tpu') if args.compile_for else jax.devices()[0].platform
    args.pallas = args.pallas or [pallas_setting(s) for s in (PALLAS if args.platform == 'gpu' else PALLAS[:1])]
    return args


def name_of(setting, keys=PALLAS_KEYS):  # the settings that differ from the defaults, as typed
    return ','.join(f'{k}={v}' for k, v in setting.items() if v != keys[k]) or 'defaults'


def kernels(args, K, platform):
    """[(row name, impl, f(q, k, v) -> o, or the reason it cannot run, whether f takes [B, H, T, K] instead of [B, T, H, K])],
    for `platform` (gpu, tpu, cpu: Pallas's kernels interpreted)."""
    scale, rows = K ** -0.5, []
    for impl in args.impls:
        if impl in GPU_ONLY - ({'pallas'} if platform == 'cpu' else set()) and platform != 'gpu' or impl in TPU_ONLY and platform == 'gpu':
            rows.append((impl, impl, f"needs {'an NVIDIA GPU' if impl in GPU_ONLY else 'a TPU'}", False))
        elif impl in ('tokamax', 'tokamax-triton'):  # its heuristics' blocks, or each --tokamax setting (Mosaic GPU's kernel)
            for s in (getattr(args, 'tokamax', None) or [None]) if impl == 'tokamax' else [None]:
                f = 'needs an NVIDIA GPU or a TPU' if platform == 'cpu' else tokamax_kernel(impl, platform, s)
                rows.append((f'{impl}[{name_of(s, TOKAMAX_KEYS)}]' if s else impl, impl, f, False))
        elif impl == 'pallas-tpu':  # Pallas's flash attention for TPUs, on [B, H, T, K]; interpreted on a CPU (run() sees to it)
            try:
                from jax.experimental.pallas.ops.tpu import flash_attention as fa
                def tpu_flash(q, k, v):  # [B, H, T, K]
                    if q.shape[2] % 128:  # its blocks, JAX's default, keep 128 lanes (at T=32: 'incompatible shapes for broadcasting')
                        raise ValueError(f'pallas-tpu needs a sequence length that is a multiple of 128, not {q.shape[2]}')
                    return fa.flash_attention(q, k, v, causal=True, sm_scale=scale)
                rows.append((impl, impl, tpu_flash, True))
            except Exception as e:
                rows.append((impl, impl, f'{type(e).__name__}: {utils.first_line(e)}', True))
        elif impl in ('cudnn', 'xla'):
            rows.append((impl, impl, functools.partial(jax.nn.dot_product_attention, is_causal=True, implementation=impl), False))
        elif impl == 'chunked':
            rows.append((impl, impl, lambda q, k, v: gpt.chunked_attention(q, k, v, 128 if q.shape[1] % 128 == 0 else q.shape[1]), False))
        elif impl == 'cudnn-bnth':  # inputs made [B, H, T, K] before timing: the kernel alone, as if the matmuls wrote that layout
            try:
                from jax._src.cudnn.fused_attention_stablehlo import dot_product_attention, MaskType
                rows.append((impl, impl, functools.partial(dot_product_attention, scale=scale, mask_type=MaskType.CAUSAL, qkv_layout='BNTH'), True))
            except ImportError as e:
                rows.append((impl, impl, f'{type(e).__name__}: {e}', True))
        elif impl == 'mgpu':
            try:
                from jax.experimental.pallas.ops.gpu import attention_mgpu as mg
                config = mg.TuningConfig(block_q=64, block_kv=args.mgpu_block_kv, max_concurrent_steps=2, causal=True)
                rows.append((impl, impl, lambda q, k, v: mg.attention((q * scale).astype(q.dtype), k, v, config), False))
            except Exception as e:  # no Mosaic GPU in this JAX, or a block it refuses
                rows.append((impl, impl, f'{type(e).__name__}: {utils.first_line(e)}', False))
        else:  # pallas, mgpu+pallas: one row per block setting (Pallas runs in interpret mode without a GPU); mgpu+pallas
            # uses only the backward's blocks, so settings that differ elsewhere are one row
            settings = args.pallas if impl == 'pallas' else {tuple(s[k] for k in BACKWARD_KEYS): s for s in args.pallas}.values()
            rows += [(f'{impl}[{name_of(s)}]', impl, pallas_kernel(impl, s, scale, platform == 'cpu', args.mgpu_block_kv), False)
                     for s in settings]
    # Pallas's kernels are not split by XLA's partitioner ('Mosaic kernels cannot be automatically partitioned'): on a
    # mesh of several devices, each device runs its share of the batch (axis 0 in both layouts), as the training step has it
    return [(name, impl, sharded(f) if impl in PALLAS_IMPLS and not isinstance(f, str) else f, bhtk) for name, impl, f, bhtk in rows]


def tokamax_kernel(impl, platform, setting=None):
    """tokamax's attention (Google's kernel library, pip install tokamax): Mosaic GPU's flash attention with its backward
    (Hopper, Blackwell) or Mosaic TPU's; or its Triton kernel. setting: Mosaic GPU's blocks for Hopper (TOKAMAX_KEYS), else
    tokamax's heuristics pick them."""
    if setting and platform != 'gpu':
        return "block settings are for tokamax's Mosaic GPU kernel: on a TPU, tokamax without them"
    try:  # not in requirements.txt; a version that does not import with this JAX: this row's error
        tokamax = import_tokamax()
    except Exception as e:
        return f'{type(e).__name__}: {utils.first_line(e)} (pip install tokamax)'
    which = 'triton' if impl == 'tokamax-triton' else 'mosaic_gpu' if platform == 'gpu' else 'mosaic_tpu'
    if setting:  # its op with these configs (tokamax's internals: tokamax.autotune would pick them, but fails on JAX 0.10's MLIR)
        try:
            from tokamax._src.ops.attention import pallas_mosaic_gpu as fwd, pallas_mosaic_gpu_vjp as bwd
            s = setting
            which = fwd.PallasMosaicGpuFlashAttention(config=fwd.ConfigSM90(block_q=s['bq'], block_kv=s['bkv'], num_stages=s['stages']),
                vjp=bwd.PallasMosaicGpuFlashAttentionVjp(config=bwd.Config(block_q_dkv=s['bq_dkv'], block_kv_dkv=s['bkv_dkv'], block_q_dq=s['bq_dq'],
                                                                           block_kv_dq=s['bkv_dq'], num_stages=s['bwd_stages'], compute_wgs=s['wgs'])))
        except Exception as e:  # a block size its configs refuse (multiples of 64), or internals that moved
            return f'{type(e).__name__}: {utils.first_line(e)}'
    return lambda q, k, v: tokamax.dot_product_attention(q, k, v, is_causal=True, implementation=which)


def import_tokamax():
    """tokamax, once its absl flags are marked parsed (else it parses this command line as its flags, and fails on ours)
    and the names it uses that a newer JAX lacks are put back (tokamax_compat)."""
    import tokamax
    from absl import flags
    flags.FLAGS.mark_as_parsed()
    tokamax_compat()
    return tokamax


def tokamax_compat():
    """tokamax 0.0.12 uses two names JAX 0.10 deprecates: plgpu.kernel's out_shape= and scratch_shapes= (now out_type=,
    scratch_types=: renamed on the way wherever JAX takes those), and pallas.dot (now pallas.triton.dot: put back where
    this JAX has dropped it)."""
    from jax.experimental import pallas as pl
    try:
        with warnings.catch_warnings():  # JAX 0.10's DeprecationWarning, where it still has it
            warnings.simplefilter('ignore')
            pl.dot
    except AttributeError:
        with contextlib.suppress(ImportError, AttributeError):
            from jax.experimental.pallas import triton
            pl.dot = triton.dot
    try:
        from jax.experimental.pallas import mosaic_gpu as plgpu
        new = plgpu.kernel
    except (ImportError, AttributeError):  # no Mosaic GPU in this JAX: tokamax's kernel will say so in its row
        return
    # renamed whenever this JAX takes the new names: one that still lists the old may refuse them (an accelerated
    # deprecation raises ValueError); not again once renamed (our wrapper does not list out_type)
    if 'out_type' not in inspect.signature(new, follow_wrapped=False).parameters:
        return
    @functools.wraps(new)
    def kernel(*args, out_shape=None, scratch_shapes=None, **kwargs):
        renamed = {k: v for k, v in (('out_type', out_shape), ('scratch_types', scratch_shapes)) if v is not None}
        return new(*args, **renamed, **kwargs)
    plgpu.kernel = kernel


def compiling_for(device):
    """A context in which JAX's default device, to libraries that ask it which kernel they may use (tokamax does, while
    tracing), is `device`: a GPU or TPU compiled for (--compile-for), not this machine's CPU."""
    from jax.extend import backend
    return unittest.mock.patch.object(backend, 'get_default_device', lambda: device)


def sharded(f):
    def per_device(q, k, v):
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty or mesh.size == 1:
            return f(q, k, v)
        return jax.shard_map(f, in_specs=jax.P('data'), out_specs=jax.P('data'), check_vma=False)(q, k, v)
    return per_device


def pallas_kernel(impl, s, scale, interpret, mgpu_block_kv):
    """Pallas's Triton kernel with block setting `s`, or Mosaic GPU's forward with its backward; or why it cannot run."""
    try:  # JAX 0.11 deprecates the Triton backend: an import or a signature that changed is this row's error, not the run's
        from jax.experimental.pallas.ops.gpu import attention as pa
        blocks = pa.BlockSizes(block_q=s['bq'], block_k=s['bk'], block_q_dkv=s['bq_dkv'], block_kv_dkv=s['bkv_dkv'],
                               block_q_dq=s['bkv_dkv'], block_kv_dq=s['bkv_dq'])
        kw = dict(sm_scale=scale, causal=True, block_sizes=blocks, num_warps=s['warps'] or None, num_stages=s['stages'], interpret=interpret)
        if impl == 'pallas':
            return lambda q, k, v: pa.mha(q, k, v, None, **kw)
        from jax.experimental.pallas.ops.gpu import attention_mgpu as mg
        config = mg.TuningConfig(block_q=64, block_kv=mgpu_block_kv, max_concurrent_steps=2, causal=True)
        forward, backward = mg._attention_forward, pa._mha_backward
    except Exception as e:
        return f'{type(e).__name__}: {utils.first_line(e)}'

    # Mosaic GPU's forward on pre-scaled queries, then the Triton backward. Both kernels keep the log-sum-exp in base 2 of
    # the same scaled scores (log2 sum exp(scale q.k)): the Triton backward takes Mosaic GPU's as it is
    @jax.custom_vjp
    def attention(q, k, v):
        return forward((q * scale).astype(q.dtype), k, v, config)

    def fwd(q, k, v):
        o, (lse2,) = forward((q * scale).astype(q.dtype), k, v, config, save_residuals=True)
        return o, (q, k, v, o, lse2)

    def bwd(res, do):
        q, k, v, o, lse2 = res
        return backward(sm_scale=scale, causal=True, block_sizes=blocks, backward_pass_impl='triton', num_warps=kw['num_warps'],
                        num_stages=s['stages'], grid=None, interpret=interpret, debug=False, return_residuals=False,
                        res=(q, k, v, None, o, lse2), do=do)[:3]

    attention.defvjp(fwd, bwd)
    return attention


def rel_err(got, want):  # over the output and the gradients: max |got - want| / max |want|, each array on its own
    return max(float(jnp.abs(g.astype(jnp.float32) - w).max() / jnp.abs(w).max()) for g, w in zip(got, want))


def compiled(f, ins, mesh=None):
    """(forward, forward + backward, the reason one failed, the larger XLA temp bytes): a failed one is None."""
    out, temp = [], 0
    for g, xs in ((f, ins[:3]), (lambda q, k, v, do: jax.vjp(f, q, k, v)[1](do), ins)):
        try:
            with jax.set_mesh(mesh) if mesh else contextlib.nullcontext():
                out.append(jax.jit(g).lower(*xs).compile())
            temp = max(temp, out[-1].memory_analysis().temp_size_in_bytes)
        except Exception as e:  # a block setting that does not compile, a layout this cuDNN refuses, no causal backward
            return *(out + [None, None])[:2], ('backward: ' if out else '') + f'{type(e).__name__}: {utils.first_line(e)}', temp
    return *out, None, temp


def run(args):
    cfg = bench.compose_config(args.config_name, args.overrides)
    c, device = train.model_config(cfg.model), jax.devices()[0]
    B, T, H, K, L = cfg.batch_size // cfg.grad_accum, c.seq_len, c.n_heads, c.d_model // c.n_heads, c.n_layers
    flops = 2 * B * H * T * T * K  # the forward's causal work: two matmuls over half the T×T scores
    rows, timed, mesh = {}, [], None
    if args.compile_for:  # nothing runs: each kernel compiled for that GPU or TPU slice, from shapes alone
        import deviceless
        mesh = deviceless.target_mesh(args.compile_for)  # a slice's devices split the batch, as in the training step
        split = jax.P('data') if B % mesh.devices.size == 0 else jax.P()
        q = k = v = do = jax.ShapeDtypeStruct((B, T, H, K), c.dtype, sharding=jax.NamedSharding(mesh, split))
    else:
        q, k, v, do = (jax.random.normal(key, (B, T, H, K), c.dtype) for key in jax.random.split(jax.random.key(0), 4))
        exact = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation='xla')
        with jax.default_matmul_precision('highest'):  # fp32 matmuls in fp32 (XLA may run them in TF32 on GPUs otherwise)
            def reference(q, k, v, do):  # one jit: a vjp closure jitted apart would capture its residuals as constants (GBs)
                o, vjp = jax.vjp(exact, q, k, v)
                return o, *vjp(do)
            want = jax.jit(reference)(*(x.astype(jnp.float32) for x in (q, k, v, do)))
    swap = lambda xs, bhtk: tuple(x.swapaxes(1, 2) if bhtk else x for x in xs)
    # Pallas's TPU kernel on a CPU: compiled in TPU interpret mode, then run without it (its GPU kernels are told directly)
    interpreted = lambda impl: tpu_interpreted() if impl in TPU_ONLY and args.platform == 'cpu' else contextlib.nullcontext()
    for name, impl, f, bhtk in kernels(args, K, args.platform):
        row = rows[name] = dict(impl=impl, compiled=False, fwd_ms=None, bwd_ms=None, fwd_bwd_ms=None, step_ms=None, fwd_tflops=None,
                                bwd_tflops=None, rel_err=None, suspect=False, temp_bytes=None, error=f if isinstance(f, str) else None)
        if row['error']:
            continue
        ins = ((jax.ShapeDtypeStruct((B, H, T, K) if bhtk else (B, T, H, K), c.dtype, sharding=q.sharding),) * 4 if mesh
               else swap((q, k, v, do), bhtk))
        with interpreted(impl), compiling_for(mesh.devices.flat[0]) if mesh else contextlib.nullcontext():
            fwd, both, row['error'], row['temp_bytes'] = compiled(f, ins, mesh)
        row['compiled'], row['temp_bytes'] = fwd is not None, row['temp_bytes'] if fwd else None
        if mesh or fwd is None:
            continue
        try:  # a kernel that compiles but fails on the device (its launch, say): a row that says so, and the others go on
            o, grads = jax.block_until_ready((swap([fwd(*ins[:3])], bhtk), both and swap(both(*ins), bhtk)))
        except Exception as e:
            row['error'] = f'running it: {type(e).__name__}: {utils.first_line(e)}'
            continue
        row['rel_err'] = rel_err([*o, *grads], want) if grads else rel_err(o, want[:1])
        row['suspect'] = row['rel_err'] > TOLERANCE.get(str(c.dtype), 5e-2)
        print(f"{name}: compiled, rel_err {row['rel_err']:.1e}" + ' (over the tolerance: wrong?)' * row['suspect']
              + (f", backward: {row['error']}" if row['error'] else ''), file=sys.stderr, flush=True)  # if a later kernel kills the run
        timed.append((row, bench.timer(fwd, ins[:3], args.seconds), both and bench.timer(both, ins, args.seconds), [], []))
    for i in range(args.rounds):  # the kernels take turns, and the order flips each round
        for t in timed[::1 - 2 * (i % 2)]:
            row, t_fwd, t_both, fwds, boths = t
            try:
                fwds.append(t_fwd()), boths.append(t_both() if t_both else None)
            except Exception as e:  # it failed on the device after all: its error, and the others' times so far
                row['error'] = f'timing it: {type(e).__name__}: {utils.first_line(e)}'
                timed.remove(t)
        print(f'round {i + 1} of {args.rounds} done', file=sys.stderr, flush=True) if timed else None
    for row, _, t_both, fwds, boths in timed:
        fwd_s = statistics.median(fwds)
        row['fwd_ms'], row['fwd_tflops'] = 1e3 * fwd_s, flops / fwd_s / 1e12
        if t_both:
            total = statistics.median(boths)
            row.update(fwd_bwd_ms=1e3 * total, bwd_ms=1e3 * (total - fwd_s), step_ms=1e3 * total * L,
                       bwd_tflops=2.5 * flops / (total - fwd_s) / 1e12 if total > fwd_s else None)  # noise can make it <= 0
    done = {n: r for n, r in rows.items() if r['fwd_bwd_ms'] and not r['suspect']}
    try:  # the CUDA runtime's version: Mosaic GPU refuses causal masks from 12.8.0 up to 12.9.1
        from jax._src.lib import cuda_versions
        cuda = cuda_versions and cuda_versions.cuda_runtime_get_version()
    except Exception:
        cuda = None
    return dict(device_kind=f'{args.compile_for} ({mesh.devices.size} devices), compiled here, nothing run' if mesh else device.device_kind,
                platform=args.platform,
                host_cpu=bench.host_cpu(), jax=jax.__version__, config=args.config_name, overrides=args.overrides,
                batch_size=B, seq_len=T, n_heads=H, head_dim=K, n_layers=L, dtype=str(c.dtype), causal_flops_fwd=flops,
                rounds=args.rounds, kernels=rows, fastest=min(done, key=lambda n: done[n]['fwd_bwd_ms']) if done else None, cuda_runtime=cuda,
                interpret=args.platform == 'cpu' and any(r['impl'] in ('pallas', 'pallas-tpu') for r in rows.values()))


def table(r):
    f = lambda x, fmt: '' if x is None else format(x, fmt)
    w = max(len(n) for n in [*r['kernels'], 'kernel'])
    lines = [f"{r['device_kind']} ({r['platform']}, jax {r['jax']}, CUDA runtime {r['cuda_runtime']}): B={r['batch_size']} T={r['seq_len']} H={r['n_heads']} "
             f"K={r['head_dim']} {r['dtype']}, causal; per step: forward + backward x {r['n_layers']} layers; TF/s: causal work",
             f"{'kernel':<{w}} {'fwd ms':>8} {'bwd ms':>8} {'per step':>10} {'fwd TF/s':>9} {'bwd TF/s':>9} {'rel_err':>8} {'temp MiB':>9}"]
    for name, k in r['kernels'].items():
        lines.append(f"{name:<{w}} {f(k['fwd_ms'], '8.3f'):>8} {f(k['bwd_ms'], '8.3f'):>8} {f(k['step_ms'], '7.2f') + ' ms' * (k['step_ms'] is not None):>10} "
                     f"{f(k['fwd_tflops'], '9.3g'):>9} {f(k['bwd_tflops'], '9.3g'):>9} {f(k['rel_err'], '8.1e'):>8} "
                     f"{f(k['temp_bytes'] and k['temp_bytes'] / 2**20, '9.0f'):>9}" + '  over the tolerance: wrong?' * k['suspect']
                     + (f"  {k['error']}" if k['error'] else '')
                     + ('  compiled' if k['compiled'] and k['fwd_ms'] is None and not k['error'] else ''))
    if r['interpret']:
        lines.append('Pallas ran in interpret mode (on a CPU): its times say nothing about a GPU or TPU')
    return '\n'.join(lines) + (f"\nfastest forward + backward (within the rel_err tolerance): {r['fastest']}" if r['fastest'] else '')


if __name__ == '__main__':
    bench.cli(functools.partial(bench.main, parse=parse, run=run, table=table))
