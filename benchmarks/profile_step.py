"""Where the training step's time goes: a few steps of the real step (as benchmarks/bench.py builds it) traced
with jax.profiler, each XLA op's time summed (ops running at the same moment share it), grouped by the line of
model.py or train.py that made the op.

    python benchmarks/profile_step.py                                # the CPU benchmark model (configs/bench_cpu.yaml)
    python benchmarks/profile_step.py -cn default batch_size=32      # GPT-2 small on a GPU, any Hydra override
    python benchmarks/profile_step.py --trace-dir /tmp/trace         # also keep the trace, for TensorBoard or Perfetto
    python benchmarks/profile_step.py -cn default batch_size=32 --attention tokamax --layernorm tokamax   # other kernels in it

Prints the step time; the matmul FLOPs executed per step against the model's (recomputation shows here) and
their rate against one large matmul's (bench.py's roofline); the time by kind of op (matmul, attention kernel,
collective, data movement: copies, transposes, slices; elementwise: fused elementwise ops and reductions); the
op groups that take the most time (kind, forward or backward, source line, JAX op, shape); and, as its last
line, one JSON object.
"""
import argparse, collections, glob, gzip, json, math, os, re, statistics, sys, tempfile, time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # puts the repo on sys.path
import jax
import model as gpt, train, utils

MOVES = {'parameter', 'constant', 'bitcast', 'copy', 'transpose', 'reshape', 'broadcast', 'slice', 'dynamic-slice',
         'dynamic-update-slice', 'concatenate', 'pad', 'tuple', 'get-tuple-element', 'iota', 'copy-start', 'copy-done'}
COLLECTIVE = re.compile(r'^(all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)')
CONTROL = {'while', 'conditional', 'call'}  # their bodies' ops are timed one by one
TRAINING_PATH = ('main.py', 'model.py', 'data.py', 'train.py', 'utils.py')


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('overrides', nargs='*', help='Hydra overrides, e.g. model.remat=dots batch_size=16')
    p.add_argument('-cn', '--config-name', default='bench_cpu')
    p.add_argument('--steps', type=bench.at_least(1), default=2, help='steps traced (after 2x`steps` untimed and `steps` timed ones)')
    p.add_argument('--top', type=bench.at_least(0), default=25, help='op groups listed')
    p.add_argument('--devices', type=bench.at_least(0), default=1, help='devices in the mesh (0 = all); device 0 is profiled')
    p.add_argument('--trace-dir', help='where to write the trace (default: a temporary directory, deleted)')
    p.add_argument('--attention', metavar='KERNEL', help="the step with one of attention_bench.py's kernels in place of "
                   "jax.nn.dot_product_attention, as bench.py --vs-attention (tokamax, 'pallas[bk=64]', ...)")
    p.add_argument('--layernorm', choices=['tokamax'], help="the step with tokamax's LayerNorm, as bench.py --vs-layernorm")
    p.add_argument('--loss', choices=['online'], help="the step with the loss's one-pass log-sum-exp, as bench.py --vs-loss")
    p.add_argument('--tiny', action='store_true', help='the tiny model of bench.py --tiny')
    args = p.parse_args(argv)
    if args.devices > jax.device_count():
        p.error(f'--devices {args.devices}: this machine has {jax.device_count()}')
    args.overrides = (bench.TINY if args.tiny else []) + args.overrides
    return args


def hlo_ops(text):
    """{instruction: (opcode, shape, source line, JAX op, fwd|bwd|-, matmul FLOPs)} from the compiled HLO, and {instruction: kind}.
    The source is the training path's line that made the op, or that called the library code that did (nnx.Linear,
    jax.nn.gelu, optax: '' where none did; ops of a custom_vjp's backward carry the line that called the function)."""
    short = lambda f: '.'.join(f.replace('.<locals>', '').split('.')[-2:])  # Block.__init__.<locals>.<lambda> -> __init__.<lambda>
    sources = {str(f): f'{os.path.basename(where[0])}:{where[1]} {short(where[2])}' for f, where in
               bench.hlo_frames(text, lambda path: os.path.basename(path) in TRAINING_PATH).items() if where}
    ops, members, computation = {}, collections.defaultdict(list), None
    for line in text.splitlines():
        if m := re.match(r'^(?:ENTRY )?%([\w.\-]+) .*\{$', line):
            computation = m.group(1)
        elif m := re.match(r'^\s+(?:ROOT )?%([\w.\-]+) = (\(.*?\)|\S+) ([\w\-]+)\(', line):
            name, shape, opcode = m.groups()
            target, op_name, frame = (re.search(p, line) for p in (r'custom_call_target="([^"]+)"', r'op_name="((?:[^"\\]|\\.)*)"', r'stack_frame_id=(\d+)'))
            members[computation].append(name)
            # tokamax names its ops by their arguments, as JSON: tokamax:{\"op\":{\"__type\":\"...PallasMosaicGpuFlashAttention\", ...}}
            op_name = op_name and re.sub(r'tokamax:\{.*?__type\\":\\"[\w.]*?(\w+)\\".*?\}\}(?=/|$)', r'tokamax:\1', op_name.group(1))
            ops[name] = dict(opcode=target.group(1) if target else opcode, custom=bool(target), shape=shape, op_name=op_name,
                             frame=frame and frame.group(1), calls=re.findall(r'(?:calls|to_apply|body|condition)=%([\w.\-]+)', line),
                             operands=re.findall(r'%([\w.\-]+)', line[m.end():].split(')')[0]),
                             contracting=re.search(r'lhs_contracting_dim\w*["=:\s{\[]*([\d",\s]*)', line),
                             conv=re.search(r'dim_labels=\w+_(\w+)->', line))
    def inside(name):  # the instructions of the computations an instruction calls, recursively
        seen, todo, found = set(), list(ops[name]['calls']), []
        while todo:
            if (c := todo.pop()) not in seen:
                seen.add(c)
                found += members[c]
                todo += [d for n in members[c] for d in ops[n]['calls']]
        return found
    dims = lambda shape: [int(d) for d in re.search(r'\[([\d,]*)\]', shape).group(1).split(',') if d]  # a tuple's first array
    def flops(op):  # a matmul's: 2 x output size x contracted size
        known = [ops[o]['shape'] for o in op['operands'] if o in ops]
        if not re.search(r'\[', op['shape']) or len(known) < 2:
            return 0
        if op['contracting']:  # dot, or a GPU gemm custom call: the lhs's contracting dims
            lhs = dims(known[0])
            return 2 * math.prod(dims(op['shape'])) * math.prod(lhs[int(d)] for d in re.findall(r'\d+', op['contracting'].group(1)) if int(d) < len(lhs))
        if op['conv']:  # a convolution: each output takes all of the kernel but its output features
            kernel, labels = dims(known[1]), op['conv'].group(1)
            return 2 * math.prod(dims(op['shape'])) * math.prod(kernel) // kernel[labels.index('o')] if 'o' in labels else 0
        return 0
    result, kinds = {}, {}
    for name, op in ops.items():
        within = inside(name)
        # what decides the kind: the ops on arrays (not a dynamic slice's scalar offsets)
        codes = {op['opcode']} | {ops[n]['opcode'] for n in within if not re.match(r'\w+\[\]', ops[n]['shape'])}
        kinds[name] = ('control' if op['opcode'] in CONTROL else
                       # cuDNN's; or a Pallas kernel (Triton, Mosaic GPU, tokamax's) made by attention code
                       'attention kernel' if any(re.search('fmha|flash|attention', o, re.I) for o in codes)
                       or op['custom'] and re.search('attention|mha', op['op_name'] or '', re.I) else
                       'matmul' if codes & {'dot', 'convolution'} or any(re.search('gemm|matmul|cublas', o, re.I) for o in codes) else
                       'collective' if any(COLLECTIVE.match(o) for o in codes) else
                       'data movement' if codes <= MOVES | {'fusion'} else 'elementwise')
        # a fusion without metadata takes its matmul's, else its first op's that has some
        meta = [op] + sorted((ops[n] for n in within if ops[n]['op_name']), key=lambda o: o['opcode'] not in ('dot', 'convolution'))
        meta = next((o for o in meta if o['op_name']), op)
        op_name = meta['op_name'] or ''
        spec = re.findall(r'\(([\w,]+->\w+)\)', op_name)  # an einsum's subscripts
        what = next((o for o in sorted(codes) if COLLECTIVE.match(o)), '') if kinds[name] == 'collective' else (
            ' '.join([re.sub(r'\)+$', '', op_name.split('/')[-1])] + spec[-1:]) if op_name else meta['opcode'])
        result[name] = (op['opcode'], op['shape'], sources.get(meta['frame'], ''), what,
                        'bwd' if 'transpose(' in op_name else 'fwd' if 'jvp(' in op_name else '-',  # '-': the optimizer, ...
                        0 if op['opcode'] in CONTROL else flops(op) + sum(flops(ops[n]) for n in within))
    return result, kinds


def op_events(trace_dir, module, ops):
    """(op, start, end) in microseconds for device 0's ops of `module`, from the device's own timeline where the
    trace has one (GPU: its 'Stream #' kernel lines; TPU: its 'XLA Ops' line), else from the host threads that ran
    them (CPU); and how many times each op ran."""
    path = max(glob.glob(os.path.join(trace_dir, '**', '*.trace.json.gz'), recursive=True), key=os.path.getmtime)
    events = [e for e in json.load(gzip.open(path))['traceEvents'] if e.get('ph') in ('X', 'M')]
    names = lambda kind: {e['pid'] if kind == 'process_name' else (e['pid'], e['tid']): e['args']['name']
                          for e in events if e['ph'] == 'M' and e.get('name') == kind}
    pids, threads = names('process_name'), names('thread_name')
    devices = sorted(name for name in pids.values() if name.startswith('/device:'))
    if devices:  # the device's lines: not the module, step and framework summaries also drawn there
        lines = {t: name for t, name in threads.items() if pids.get(t[0]) == devices[0]}
        lines = {t for t, name in lines.items() if name.startswith('Stream')} or {t for t, name in lines.items() if name == 'XLA Ops'}
        on_device0 = lambda e: (e['pid'], e['tid']) in lines
    else:
        on_device0 = lambda e: e['args'].get('device_ordinal', '0') == '0'
    # GPU kernels name their module 'hlo_module' (JAX 0.11; earlier 'hlo module'), as the CPU runtime does
    ours = [e for e in events if e['ph'] == 'X' and e.get('args', {}).get('hlo_op') in ops and on_device0(e)
            and e['args'].get('hlo_module', e['args'].get('hlo module', module)) == module]
    if not ours and any(e.get('args', {}).get('hlo_op', '').startswith('command_buffer') and on_device0(e) for e in events if e['ph'] == 'X'):
        raise utils.PicodoError(f'the ops of {module} ran inside CUDA graphs, which hide them from the trace: run with '
                                'XLA_FLAGS=--xla_gpu_enable_command_buffer= (set by profile_step.py unless XLA_FLAGS names it)')
    if not ours:
        raise utils.PicodoError(f'no op of {module} found on {devices[0] if devices else "the host"} in {path}')
    if devices:  # how much of the device's busy time the ops account for
        busy = union([(e['ts'], e['ts'] + e['dur']) for e in events if e['ph'] == 'X' and on_device0(e)])
        if (covered := union([(e['ts'], e['ts'] + e['dur']) for e in ours]) / busy) < 0.9:
            print(f'warning: ops of {module} cover only {covered:.0%} of the time {devices[0]} was busy')
    kernels = collections.Counter((e['args']['hlo_op'], e['name']) for e in ours)  # one op may launch several kernels
    runs = collections.Counter()
    for (op, _), n in kernels.items():
        runs[op] = max(runs[op], n)
    return [(e['args']['hlo_op'], e['ts'], e['ts'] + e['dur']) for e in ours], runs


def union(intervals):  # total length covered
    total, end = 0, -math.inf
    for a, b in sorted(intervals):
        total, end = total + max(0, b - max(a, end)), max(end, b)
    return total


def shared_times(events, background=()):
    """Each op's time, where ops that run at the same moment (several threads or streams) share it equally; ops in
    `background` (collectives) get only the time when nothing else runs: their exposed time."""
    points = sorted([(start, -1, i) for i, (_, start, _) in enumerate(events)] + [(end, 1, i) for i, (_, _, end) in enumerate(events)])
    share, active, last = collections.Counter(), set(), None
    for t, d, i in points:  # at equal times starts come first, so an op of zero length enters and leaves at once
        front = [j for j in active if events[j][0] not in background] or list(active)
        for j in front:
            share[events[j][0]] += (t - last) / len(front)
        last = t
        active.add(i) if d == -1 else active.discard(i)
    return share


def too_fast(groups, roofline):
    """Matmul groups at a rate far above one large matmul's: ops XLA ran asynchronously (the trace event ends when
    the op is started), whose time lands on the ops running beside them. Totals stay right; per-op rates do not."""
    return sorted(f'{op} {shape}'.strip() for (_, _, _, op, shape), (ms, _, flops, _) in groups.items()
                  if flops and flops / (ms or 1e-9) * 1e3 > 1.5 * roofline)


def run(args):
    cfg = bench.compose_config(args.config_name, args.overrides)
    devices = jax.devices()[:args.devices or None]
    mesh = jax.make_mesh((len(devices),), ('data',), (jax.sharding.AxisType.Auto,), devices=devices)
    with bench.attention(args.attention, cfg, devices[0].platform, flag='--attention', devices=len(devices)), \
            bench.layer_norm(args.layernorm, devices[0].platform), bench.loss(args.loss):
        step, state, batch, compile_s = bench.build(cfg, mesh)
    ops, kinds = hlo_ops(step.as_text())
    module = re.match(r'HloModule (\S+?),', step.as_text()).group(1)
    def timed(state):
        for _ in range(args.steps):
            state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        return state
    state = timed(timed(state))  # warm-up, untimed
    t0 = time.perf_counter()
    state = timed(state)
    step_s = (time.perf_counter() - t0) / args.steps
    matmul_time, flops = bench.matmul_roofline(mesh, 2048 if devices[0].platform == 'cpu' else 8192, train.model_config(cfg.model).dtype)
    roofline = flops / len(devices) / statistics.median(matmul_time() for _ in range(3))  # per device
    with tempfile.TemporaryDirectory() as tmp:
        trace_dir = args.trace_dir or tmp
        t0 = time.perf_counter()
        with jax.profiler.trace(trace_dir):
            state = timed(state)
        traced_s = (time.perf_counter() - t0) / args.steps
        events, counts = op_events(trace_dir, module, ops)
    events = [e for e in events if kinds[e[0]] != 'control']
    share = shared_times(events, background={name for name, kind in kinds.items() if kind == 'collective'})
    groups, by_kind = collections.defaultdict(lambda: [0.0, 0, 0, set()]), collections.Counter()
    for name in {name for name, *_ in events}:
        us, (opcode, shape, source, op, pass_, flops) = share[name], ops[name]
        g = groups[(kinds[name], pass_, source, op, shape)]
        g[0] += us / 1e3 / args.steps; g[1] += counts[name] / args.steps; g[2] += flops * counts[name] / args.steps; g[3].add(opcode)
        by_kind[kinds[name]] += us / 1e3 / args.steps
    top = sorted(groups.items(), key=lambda kv: -kv[1][0])[:args.top]
    op_ms, matmul_flops = sum(by_kind.values()), sum(g[2] for g in groups.values())
    model_flops = gpt.flops_per_token(train.model_config(cfg.model)) * cfg.batch_size * cfg.model.seq_len / len(devices)
    return dict(config=args.config_name, overrides=args.overrides, attention=args.attention, layernorm=args.layernorm, loss=args.loss,
                device_kind=devices[0].device_kind, n_devices=len(devices), host_cpu=bench.host_cpu(),
                step_ms=1e3 * step_s, traced_step_ms=1e3 * traced_s, op_ms_per_step=op_ms, compile_s=compile_s,
                model_flops_per_step=model_flops, matmul_flops_per_step=matmul_flops,  # device 0's
                matmul_flops_per_sec=matmul_flops / by_kind['matmul'] * 1e3 if by_kind['matmul'] else None, roofline_flops_per_sec=roofline,
                by_kind={k: v for k, v in by_kind.most_common()}, too_fast=too_fast(groups, roofline),
                top=[{'ms': ms, 'kind': kind, 'pass': pass_, 'source': source, 'op': op, 'shape': shape, 'n': n,
                      'flops_per_sec': flops / ms * 1e3 if flops else None, 'hlo': sorted(hlo)}
                     for (kind, pass_, source, op, shape), (ms, n, flops, hlo) in top])


def table(r):
    lines = [f"{r['n_devices']} x {r['device_kind']} (host: {r['host_cpu']}), {r['config']} {' '.join(r['overrides'])}"
             + (f", attention {r['attention']}" if r['attention'] else '') + (f", LayerNorm {r['layernorm']}" if r['layernorm'] else '') + (f", the {r['loss']} log-sum-exp" if r['loss'] else ''),
             f"step {r['step_ms']:.1f} ms ({r['traced_step_ms']:.1f} ms while traced); ops on device 0: "
             f"{r['op_ms_per_step']:.1f} ms per step",
             f"matmuls: {r['matmul_flops_per_step'] / 1e9:,.1f} GFLOP per step (model FLOPs: {r['model_flops_per_step'] / 1e9:,.1f}), "
             f"at {(r['matmul_flops_per_sec'] or 0) / 1e9:,.1f} GFLOP/s (one large matmul alone: {r['roofline_flops_per_sec'] / 1e9:,.1f})"
             + (", attention kernels' FLOPs not counted" if 'attention kernel' in r['by_kind'] else '')]
    if r['too_fast']:
        lines.append(f"warning: {len(r['too_fast'])} matmul groups ({', '.join(r['too_fast'][:3])}{', ...' * (len(r['too_fast']) > 3)}) beat one large matmul by 1.5x or "
                     'more: XLA ran them asynchronously and their time lands on the ops beside them (totals stay right)')
    lines += ['', f"{'ms/step':>9} {'share':>6}  kind"]
    exposed = {'collective': 'collective (exposed: the time nothing else ran)'}
    lines += [f'{ms:9.1f} {ms / r["op_ms_per_step"]:6.1%}  {exposed.get(kind, kind)}' for kind, ms in r['by_kind'].items()]
    lines += ['', f"{'ms/step':>9} {'share':>6} {'GFLOP/s':>8} {'n/step':>6}  {'kind':<14} pass {'source':<30} {'op':<26} shape"]
    lines += [f"{t['ms']:9.1f} {t['ms'] / r['op_ms_per_step']:6.1%} {(t['flops_per_sec'] or 0) / 1e9:8.1f} {t['n']:6g}  {t['kind']:<14} "
              f"{t['pass']:<4} {t['source'][:30]:<30} {t['op'][:26]:<26} {t['shape'][:40]}" for t in r['top']]
    return '\n'.join(lines)


def main(argv=None):
    return bench.main(argv, parse, run, table)


if __name__ == '__main__':
    if 'xla_gpu_enable_command_buffer' not in os.environ.get('XLA_FLAGS', ''):  # no CUDA graphs: their kernels name no op
        os.environ['XLA_FLAGS'] = os.environ.get('XLA_FLAGS', '') + ' --xla_gpu_enable_command_buffer='
    bench.cli(main)
