"""The training step compiled for a GPU or TPU this machine does not have (XLA's deviceless compile): whether a batch
fits in its memory and, for NVIDIA H100/H200/T4, which kernels XLA makes (matmuls by operand type) and the bytes its
non-matmul kernels move (at the GPU's bandwidth, a floor on their time). Nothing runs: these are the compiler's figures.

    python -m venv .venv-gpu && .venv-gpu/bin/pip install -r requirements.txt   # the CUDA plugin of jaxlib's version, apart
    .venv-gpu/bin/pip install --no-deps jax-cuda12-plugin==$(python -c 'import jaxlib; print(jaxlib.__version__)') \\
        jax-cuda12-pjrt==$(python -c 'import jaxlib; print(jaxlib.__version__)') nvidia-cudnn-cu12 nvidia-cuda-runtime-cu12
        # cuDNN: attention; the CUDA runtime: without it the plugin logs 'Could not find cuda drivers' at every start
    .venv-gpu/bin/python benchmarks/deviceless.py -cn default batch_size=32              # GPT-2 small on an H100
    .venv-gpu/bin/python benchmarks/deviceless.py -cn default batch_size=128 --target h200 --hlo /tmp/step.hlo
    .venv-gpu/bin/python benchmarks/deviceless.py -cn colab model.dtype=float16 --target t4 --decode   # sampling's
    python -m venv .venv-tpu && .venv-tpu/bin/pip install -r requirements.txt   # TPUs: the libtpu that jax[tpu] pins
    .venv-tpu/bin/pip install "libtpu==0.0.42.*"         # for this jax (jax 0.10.2's; 203 MB)
    .venv-tpu/bin/python benchmarks/deviceless.py -cn colab --target v5e-1               # Colab's TPU, one v5e chip

Prints a summary and, as its last line, one JSON object. The memory is what XLA allocates per device for the step
(state, batch, activations); JAX may use 75% of a GPU's memory by default (XLA_PYTHON_CLIENT_MEM_FRACTION); a TPU batch
that does not fit fails to compile, with libtpu's figures. On a TPU slice the state is split over its devices as the
model's FSDP annotations say. `mfu_ceiling` (GPUs) is the MFU the step would reach with every matmul and attention FLOP
(as MFU counts them) at the vendor's peak and every other kernel moving its bytes at the full memory bandwidth.
Matmuls are cuBLAS's and XLA's dot merger is off, as train.compile_steps asks on GPUs, and attention what
train.model_config would pick on the target (both choices are repeated here). GPUs: one only (collectives between GPUs
are not modelled). Without the device XLA cannot autotune, and the compiler is the installed jaxlib's (or libtpu's),
not necessarily the target's.
"""
import argparse, collections, json, math, os, re, sys
if __name__ == '__main__':  # before JAX loads: the CPU is the only backend it starts; the GPU or TPU is a compile-only target
    os.environ['JAX_PLATFORMS'] = 'cpu'
    os.environ['JAX_ENABLE_COMPILATION_CACHE'] = 'false'  # a cached entry needs a device to load: a warning per entry
    os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')  # libtpu: fewer warnings about the absent TPU VM
    os.environ.setdefault('TPU_ACCELERATOR_TYPE', 'none')
    os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')  # else a second process at once fails on /tmp/libtpu_lockfile
import bench  # noqa: E402 (puts the repo on sys.path)
from omegaconf import OmegaConf  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
import model as gpt, train, utils  # noqa: E402

SM90 = dict(threads_per_block_limit=1024, threads_per_warp=32, shared_memory_per_block=49152, shared_memory_per_core=233472,
            threads_per_core_limit=2048, core_count=132, fpus_per_core=128, block_dim_limit_x=2147483647, block_dim_limit_y=65535,
            block_dim_limit_z=65535, l2_cache_size=52428800, clock_rate_ghz=1.98, shared_memory_per_block_optin=232448,
            registers_per_core_limit=65536, registers_per_block_limit=65536)  # an H100/H200 SXM (compute capability 9.0)
SM75 = SM90 | dict(shared_memory_per_core=65536, threads_per_core_limit=1024, core_count=40, fpus_per_core=64, l2_cache_size=4194304,
                   clock_rate_ghz=1.59, shared_memory_per_block_optin=65536)  # a T4 (7.5): Colab's free GPU
# the XLA options train.compile_steps passes on GPUs (repeated: it needs the state's arrays; a test checks they are the same)
GPU_OPTIONS = {'xla_gpu_enable_triton_gemm': False, 'xla_disable_hlo_passes': 'dot-merger'}
GPUS = {'h100': ('NVIDIA H100 80GB HBM3', 3.35e12, 79.1 * 2**30, '9.0', SM90), 'h200': ('NVIDIA H200', 4.8e12, 139.8 * 2**30, '9.0', SM90),
        't4': ('Tesla T4', 320e9, 15 * 2**30, '7.5', SM75)}  # device kind, bandwidth, memory, compute capability
TPUS = {  # name: topology, libtpu's topology arguments (one chip: a host of one; v4, v5p: one device per chip)
    'v2-8': ('v2:2x2', {}), 'v3-8': ('v3:2x2', {}), 'v4-8': ('v4:2x2x1', dict(chip_config_name='megacore')),
    'v5p-8': ('v5p:2x2x1', dict(chip_config_name='megacore')), 'v5e-1': ('v5e:1x1', dict(chips_per_host_bounds=(1, 1, 1))),
    'v5e-4': ('v5e:2x2', {}), 'v5e-8': ('v5e:2x4', dict(chips_per_host_bounds=(2, 4, 1))),
    'v6e-1': ('v6e:1x1', dict(chips_per_host_bounds=(1, 1, 1))), 'v6e-8': ('v6e:2x4', dict(chips_per_host_bounds=(2, 4, 1)))}
BYTES = {'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'f16': 2, 'bf16': 2, 's32': 4, 'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8}
FREE = {'parameter', 'get-tuple-element', 'bitcast', 'tuple', 'constant', 'after-all', 'opt-barrier', 'while', 'call', 'conditional'}
PARTIAL = {'gather', 'dynamic-slice', 'slice'}  # a fusion parameter read only through these is read in part: their outputs count
IN_PLACE = {'dynamic-update-slice', 'scatter'}  # ... or updated in place through these: their updates count
ELEMENTWISE = {'select', 'bitcast', 'convert', 'copy', 'negate', 'add', 'subtract', 'multiply', 'divide', 'maximum', 'minimum',
               'exponential', 'log', 'compare', 'and', 'or', 'not'}  # ... also through these first


def target_config(gpu):
    kind, bandwidth, memory, cc, sm = GPUS[gpu]
    major, minor = cc.split('.')
    info = ''.join(f'  {k}: {v}\n' for k, v in sm.items())
    return (f'gpu_device_info {{\n{info}  memory_bandwidth: {int(bandwidth)}\n  device_memory_size: {int(memory)}\n'
            f'  cuda_compute_capability {{ major: {major} minor: {minor} }}\n}}\nplatform_name: "CUDA"\n'
            f'dnn_version_info {{ major: 9 minor: 8 }}\ndevice_description_str: "{kind}"\n')


Inst = collections.namedtuple('Inst', 'name shape op operands number attrs')  # number: a parameter's


def elements(shape):  # elements of an array shape, 'bf16[32,1024]{1,0}' (a tuple's: of its first part)
    return math.prod(int(d) for d in re.search(r'\[([\d,]*)\]', shape)[1].split(',') if d)


def nbytes(shape):  # bytes of an array or tuple shape
    return sum(BYTES.get(t, 4) * elements(f'[{d}]') for t, d in re.findall(r'\b([a-z]+\d*)\[([\d,]*)\]', shape))


def closing(text, i):  # the index of the bracket that closes the one at text[i]
    depth = 0
    for j in range(i, len(text)):
        depth += (text[j] in '([{') - (text[j] in ')]}')
        if depth == 0:
            return j


def parse(hlo):
    """{computation: [Inst]} from optimized HLO text, {computation: its ROOT's name}, and the ENTRY computation's name."""
    comps, roots, entry, current = {}, {}, None, None
    for line in hlo.split('\n'):
        if m := re.match(r'(ENTRY )?%([\w.\-]+) .*\{$', line):
            computation, current, entry = m[2], comps.setdefault(m[2], []), m[2] if m[1] else entry
        elif current is not None and (m := re.match(r'\s+(ROOT )?%([\w.\-]+) = (.*)$', line)):
            rest, roots[computation] = m[3], m[2] if m[1] else roots.get(computation)
            end = closing(rest, 0) + 1 if rest[0] == '(' else rest.index(' ')
            shape, rest = rest[:end], rest[end:].lstrip()
            op, start = re.match(r'([\w\-]+)\(', rest)[1], rest.index('(')
            args = rest[start + 1:closing(rest, start)]  # operands (%names), or a parameter's number
            current.append(Inst(m[2], shape, op, re.findall(r'%([\w.\-]+)', args), int(args) if op == 'parameter' else None,
                                rest[closing(rest, start) + 1:]))
    return comps, roots, entry


def source_lines(hlo, root):
    """{stack_frame_id: 'file.py:line'}: the innermost frame in a file under `root` (this repo's code), or '?'."""
    return {f: f'{os.path.relpath(w[0], root)}:{w[1]}' if w else '?' for f, w in bench.hlo_frames(hlo, lambda p: p.startswith(root)).items()}


def kernels(hlo, root=bench.REPO):
    """One dict per kernel the step launches: its kind, bytes read and written, source line, and times per step (a loop's
    kernels: once per trip, its condition's once more). Within a fusion, a parameter read only by gathers or slices (maybe
    through elementwise ops) counts what they read; a buffer updated in place (dynamic-update-slice, scatter) counts the
    update, read and written, not the whole buffer. `exact` is False in a loop of unknown trip count (counted once) and in
    a conditional's branches (each counted once: an upper bound). For one GPU: collectives across GPUs are not modelled."""
    comps, roots, entry = parse(hlo)
    insts = {i.name: i for body in comps.values() for i in body}
    where = source_lines(hlo, root)

    def written(value):  # bytes a fusion writes to produce `value` (its root)
        i = insts[value]
        if i.op == 'tuple':
            return sum(map(written, i.operands))
        return nbytes(insts[i.operands[1 if i.op == 'dynamic-update-slice' else 2]].shape) if i.op in IN_PLACE else nbytes(i.shape)

    def reads(fused):  # {parameter number: bytes} for the parameters of fusion computation `fused` read only in part
        users = collections.defaultdict(list)
        for i in comps[fused]:
            for position, o in enumerate(i.operands):
                users[o].append((i, position))
        def read(value):  # elements of `value` read if only in part, else None
            total = 0
            for i, position in users[value]:
                if i.op in IN_PLACE and position == 0:  # the buffer: only the updated elements (a scatter reads them too)
                    total += elements(insts[i.operands[2]].shape) if i.op == 'scatter' else 0
                elif i.op in PARTIAL and position == 0:
                    total += elements(i.shape)
                elif i.op in ELEMENTWISE and (part := read(i.name)) is not None:
                    total += part
                else:
                    return None
            return total if users[value] else None
        return {i.number: min(n * nbytes(i.shape) // max(elements(i.shape), 1), nbytes(i.shape))  # in the parameter's dtype
                for i in comps[fused] if i.op == 'parameter' and (n := read(i.name)) is not None}

    out = []
    def walk(comp, times, exact):
        for i in comps[comp]:
            if i.op == 'while':
                n = re.search(r'"known_trip_count":\{"n":"(\d+)"', i.attrs)
                trips = int(n[1]) if n else 1
                walk(re.search(r'body=%([\w.\-]+)', i.attrs)[1], times * trips, exact and bool(n))
                walk(re.search(r'condition=%([\w.\-]+)', i.attrs)[1], times * (trips + 1), exact and bool(n))
            if i.op == 'conditional':  # branch_computations={%a, %b}, or true_computation=%a, false_computation=%b
                listed = re.search(r'branch_computations=\{([^}]*)\}', i.attrs)
                for branch in re.findall(r'%([\w.\-]+)', listed[1] if listed else ' '.join(re.findall(r'_computation=%[\w.\-]+', i.attrs))):
                    walk(branch, times, False)
            if i.op in FREE:
                continue
            target = re.search(r'custom_call_target="([^"]+)"', i.attrs)
            op_name = re.search(r'op_name="((?:[^"\\]|\\.)*)"', i.attrs)  # tokamax's hold escaped quotes (its arguments, as JSON)
            kind = ('matmul' if (target and 'matmul' in target[1]) or i.op == 'dot' else  # cuDNN's, or a kernel made by attention code:
                    'attention' if target and ('fmha' in target[1] or op_name and re.search('attention|mha', op_name[1], re.I)
                                               and 'preprocess' not in op_name[1]) else i.op)  # Pallas's sum(o * do): memory-bound
            fused = re.search(r'calls=%([\w.\-]+)', i.attrs)[1] if i.op == 'fusion' else None
            part = reads(fused) if fused else {}
            frame = re.search(r'stack_frame_id=(\d+)', i.attrs)
            out.append(dict(name=i.name, kind=kind, times=times, exact=exact, source=where.get(int(frame[1]), '?') if frame else '?',
                            operand_dtypes='/'.join(sorted({insts[o].shape.split('[')[0] for o in i.operands[:2]})),
                            read=sum(part.get(n, nbytes(insts[o].shape)) for n, o in enumerate(i.operands)),
                            written=written(roots[fused]) if fused else nbytes(i.shape)))
    walk(entry, 1, True)
    return out


def summary(hlo, model_flops, peak, bandwidth):
    ks = kernels(hlo)
    count, by_line, dtypes = collections.Counter(), collections.Counter(), collections.Counter()
    for k in ks:
        group = k['kind'] if k['kind'] in ('matmul', 'attention') else 'other'
        count[group] += k['times']
        dtypes[k['operand_dtypes']] += k['times'] * (group == 'matmul')
        if group == 'other':
            by_line[k['source']] += k['times'] * (k['read'] + k['written'])
    moved = sum(by_line.values())
    flops_s, memory_s = model_flops / peak, moved / bandwidth
    return dict(kernels=sum(count.values()), matmuls=count['matmul'], attention=count['attention'], other_kernels=count['other'],
                matmul_operand_dtypes=dict((+dtypes).most_common()),
                inexact_kernels=sum(k['times'] for k in ks if not k['exact']), other_bytes=moved, other_floor_ms=memory_s * 1e3,
                model_flops_floor_ms=flops_s * 1e3, mfu_ceiling=flops_s / (flops_s + memory_s),
                other_bytes_top_lines=dict(by_line.most_common(12)))


def target_mesh(target):
    """A compile-only mesh of `target`'s devices (a key of GPUS or TPUS), over the axis 'data'."""
    from jax.experimental import topologies
    gpu = target in GPUS
    try:
        topology = (topologies.get_topology_desc(platform='cuda', topology='1x1x1', target_config=target_config(target)) if gpu else
                    topologies.get_topology_desc(TPUS[target][0], 'tpu', **TPUS[target][1]))
    except Exception as e:  # no CUDA plugin, or no libtpu, in this environment
        raise utils.PicodoError(f'no {"CUDA" if gpu else "TPU"} compiler here ({type(e).__name__}: {utils.first_line(e)}): install '
                                + ('jax-cuda12-plugin and jax-cuda12-pjrt of the same version as jaxlib' if gpu else
                                   "the libtpu that jax[tpu] pins for this jax") + ' (see the top of this file)') from None
    return topologies.make_mesh(topology, (len(topology.devices),), ('data',))


def target_model_config(cfg, target):
    """train.model_config as on `target`: its checks and choices are this CPU's, so its refusals are XLA's errors here."""
    c, K = train.model_config(OmegaConf.merge(cfg.model, {'attn_impl': 'auto'})), cfg.model.d_model // cfg.model.n_heads
    c.attn_impl = cfg.model.attn_impl
    if c.attn_impl == 'auto':  # what train.model_config picks there
        cc = float(GPUS[target][3]) if target in GPUS else 0
        c.attn_impl = 'cudnn' if cc >= 8 and c.dtype != jnp.float32 and c.seq_len % 2 == 0 and K % 8 == 0 and K <= (256 if cc >= 9 else 128) else 'xla'
    return c


def compile_error(target, e):  # XLA's first line: a TPU batch that does not fit (libtpu says by how much), an algorithm the GPU lacks, ...
    return utils.PicodoError(f'cannot compile for {target}: {type(e).__name__}: {utils.first_line(e)}'
                             + ' (pip install nvidia-cudnn-cu12, or model.attn_impl=xla)' * ('cuDNN' in str(e)))


def compile_decode(cfg, target, n_new=16):
    """sample.generate (one sequence, a prompt of a quarter window, n_new tokens through the KV cache) compiled for `target`."""
    import sample
    mesh, c = target_mesh(target), target_model_config(cfg, target)
    P, whole = max(1, c.seq_len // 4), jax.NamedSharding(mesh, jax.P())
    key = jax.random.key(0).dtype  # here, not under the target's mesh: it would run on it
    with jax.set_mesh(mesh):
        graphdef, state = nnx.split(nnx.eval_shape(lambda: gpt.GPT(c, nnx.Rngs(0))))
        state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=whole), state)
        decode = jax.jit(lambda s, prompt, k: sample.generate(nnx.merge(graphdef, s), prompt, k, min(n_new, c.seq_len - P)))
        try:
            return decode.lower(state, jax.ShapeDtypeStruct((1, P), jnp.int32, sharding=whole), jax.ShapeDtypeStruct((), key, sharding=whole)).compile()
        except Exception as e:
            raise compile_error(target, e) from None


def compile_step(cfg, target, attention=None, loss=None):
    """The training step compiled for `target` (a key of GPUS or TPUS): (compiled, the target's devices, attention); with
    `attention`, one of attention_bench.py's kernels in place of jax.nn.dot_product_attention (bench.py --vs-attention);
    `loss` 'online': the loss's one-pass log-sum-exp (bench.py --vs-loss)."""
    mesh = target_mesh(target)
    bench.check_batch(cfg, mesh)
    c, gpu = target_model_config(cfg, target), target in GPUS
    tx = train.make_optimizer(cfg.opt, train.lr_schedule(cfg.opt, 1000))
    A, B, T = cfg.grad_accum, cfg.batch_size, cfg.model.seq_len
    batch = jax.ShapeDtypeStruct((A, B // A, T + 1), jnp.int32, sharding=jax.NamedSharding(mesh, jax.P(None, 'data')))
    with jax.set_mesh(mesh):  # shapes only: no array is made; each weight split over the devices as the model annotates it
        graphdef, state = nnx.split(nnx.eval_shape(lambda: (m := gpt.GPT(c, nnx.Rngs(0)), nnx.Optimizer(m, tx, wrt=nnx.Param))))
        shardings = jax.tree.map(lambda spec: jax.NamedSharding(mesh, spec if isinstance(spec, jax.P) else jax.P()), nnx.get_partition_spec(state),
                                 is_leaf=lambda x: isinstance(x, jax.P) or x is None)
        state = jax.tree.map(lambda x, sharding: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state, shardings)
        step = jax.jit(lambda s, b: train.train_step(graphdef, s, b), donate_argnums=0, out_shardings=(shardings, None),
                       compiler_options=GPU_OPTIONS if gpu else None)
        try:
            with bench.attention(attention, cfg, 'gpu' if gpu else 'tpu', c.attn_impl, '--attention', target=mesh.devices.flat[0]), bench.loss(loss):
                compiled = step.lower(state, batch).compile()
        except utils.PicodoError:
            raise
        except Exception as e:
            raise compile_error(target, e) from None
    return compiled, mesh.devices.flat, attention or c.attn_impl


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('overrides', nargs='*', help='Hydra overrides, e.g. batch_size=64 model.remat=dots')
    p.add_argument('-cn', '--config-name', default='default')
    p.add_argument('--target', choices=[*GPUS, *TPUS], default='h100')
    p.add_argument('--hlo', help='also write the optimized HLO text to this file')
    p.add_argument('--decode', action='store_true', help="compile sampling's decoding (sample.generate) instead of the training step")
    p.add_argument('--attention', metavar='KERNEL', help="one of attention_bench.py's kernels in the step (pallas-tpu, pallas[bk=64], ...)")
    p.add_argument('--loss', choices=['online'], help="the loss's log-sum-exp in one pass over the logits, as bench.py --vs-loss")
    args = p.parse_args(argv)
    try:
        cfg = bench.compose_config(args.config_name, args.overrides)
        if args.decode:
            m = compile_decode(cfg, args.target).memory_analysis()
            memory = m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
            print(f'decoding compiles for {args.target} (nothing ran; jax {jax.__version__}): {memory / 2**30:.2f} GiB')
            return print(json.dumps(dict(target=args.target, decode=True, dtype=cfg.model.dtype, memory_bytes=memory)))
        compiled, devices, attn = compile_step(cfg, args.target, args.attention, args.loss)
    except utils.PicodoError as e:
        sys.exit(f'error: {e}')
    hlo, m = compiled.as_text(), compiled.memory_analysis()
    args.hlo and open(args.hlo, 'w').write(hlo)
    memory = m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes  # per device
    kind, n = devices[0].device_kind, len(devices)
    B, T, peak = cfg.batch_size, cfg.model.seq_len, utils.peak_flops(kind)
    r = dict(target=args.target, device_kind=kind, devices=n, config=args.config_name, overrides=args.overrides, batch_size=B,
             grad_accum=cfg.grad_accum, seq_len=T, attn_impl=attn, loss=args.loss, jax=jax.__version__, memory_bytes=memory)
    print(f"{kind} x {n} (a compile, nothing ran; jax {jax.__version__}): {args.config_name} {' '.join(args.overrides)}, attention {attn}"
          + f', the {args.loss} log-sum-exp' * bool(args.loss))
    if args.target in TPUS:  # it compiled, so it fits (libtpu refuses what does not)
        print(f'memory per device: {memory / 2**30:.2f} GiB: fits')
        print(json.dumps(r | dict(fits=True)))
        return
    _, bandwidth, capacity, *_ = GPUS[args.target]
    r |= dict(usable_bytes=0.75 * capacity, fits=memory <= 0.75 * capacity) | summary(hlo, gpt.flops_per_token(cfg.model) * B * T, peak, bandwidth)
    print(f"memory: {memory / 2**30:.1f} GiB of the {0.75 * capacity / 2**30:.1f} GiB JAX may use (75%): {'fits' if r['fits'] else 'does not fit'}")
    print(f"kernels per step: {r['kernels']}: {r['matmuls']} matmuls ({', '.join(f'{n} {t}' for t, n in r['matmul_operand_dtypes'].items())}), "
          f"{r['attention']} attention, {r['other_kernels']} others")
    print(f"model FLOPs at the peak ({peak / 1e12:.0f} TFLOP/s): {r['model_flops_floor_ms']:.1f} ms; the others' {r['other_bytes'] / 1e9:.1f} GB "
          f"at {bandwidth / 1e12:.2f} TB/s: {r['other_floor_ms']:.1f} ms; MFU ceiling {r['mfu_ceiling']:.3f}")
    args.attention and not r['attention'] and print(f'warning: {args.attention} is counted as other kernels, by the bytes of its operands and '
                                                    'results, its FLOPs not at all: the memory is right, the floor and the MFU ceiling are not')
    r['inexact_kernels'] and print(f"warning: {r['inexact_kernels']} kernels in loops of unknown trip count (counted once) or in a "
                                   'conditional\'s branches (each counted): the figures are estimates')
    for line, moved in r['other_bytes_top_lines'].items():
        print(f'  {moved / 1e9:7.2f} GB  {moved / bandwidth * 1e3:5.2f} ms  {line}')
    print(json.dumps(r))


if __name__ == '__main__':
    main()
