"""The step profiler (benchmarks/profile_step.py) attributes a real traced step; no assertion on speed."""
import json, os, sys
import pytest
from conftest import REPO
sys.path.insert(0, os.path.join(REPO, 'benchmarks'))
import profile_step
import utils


def test_ops_running_together_share_their_time():
    share = profile_step.shared_times([('a', 0, 10), ('b', 5, 15), ('c', 20, 21), ('z', 21, 21), ('d', 21, 30)])
    assert share == {'a': 7.5, 'b': 7.5, 'c': 1, 'z': 0, 'd': 9}  # 5 alone + 5 halved each; idle time goes to no one


def test_collectives_get_only_their_exposed_time():
    events = [('all-gather', 0, 10), ('dot', 4, 8), ('all-reduce', 9, 12), ('add', 12, 13)]
    share = profile_step.shared_times(events, background={'all-gather', 'all-reduce'})
    assert share == {'all-gather': 4 + 1 + 0.5, 'dot': 4, 'all-reduce': 0.5 + 2, 'add': 1}


def test_tiny_profile_on_8_devices_attributes_the_step(capsys):
    # batch 32 over 8 devices: the chunked attention loops over pairs of sequences, as on the real model
    profile_step.main(['--tiny', '--devices', '0', '--top', '1000', 'batch_size=32'])
    out = capsys.readouterr().out.strip().splitlines()
    r = json.loads(out[-1])
    assert r['n_devices'] == 8 and {'matmul', 'collective'} <= set(r['by_kind'])  # FSDP gathers and reduces
    assert not any('while' in t['hlo'] for t in r['top'])  # loops are timed op by op, not as a whole
    sources = {t['source'].split(':')[0] for t in r['top']}
    assert {'model.py', 'train.py'} <= sources  # ops traced back to the lines that made them
    # every matmul to its model.py line, those made inside nnx.Linear too (flax's line is the innermost stack frame)
    assert all(t['source'].startswith('model.py') for t in r['top'] if t['kind'] == 'matmul')
    lines = open(os.path.join(REPO, 'model.py')).read().splitlines()
    linear = {f'model.py:{i + 1}' for i, line in enumerate(lines) if 'self.attn_out(' in line or 'self.mlp_out(' in line}
    assert len(linear) == 2 and linear <= {t['source'].split(' ')[0] for t in r['top'] if t['kind'] == 'matmul'}
    scores = [t for t in r['top'] if 'hak,hbk->hab' in t['op']]  # the scores (model._scores), inside the attention's loop
    assert scores and all(t['kind'] == 'matmul' and t['source'].startswith('model.py') for t in scores)
    # XLA's matmuls are the model's FLOPs (6N + 12·L·D·T per token), plus the attention scores recomputed in
    # backward (7 attention matmuls where 6 are counted; T=32 is one chunk, so no causal blocks are skipped)
    L, D, T, B = 2, 64, 32, 32
    attention = 12 * L * D * T * B * T / 8
    assert abs(r['matmul_flops_per_step'] - (r['model_flops_per_step'] + attention / 6)) < 1e-6 * r['model_flops_per_step']
    assert 'kind' in '\n'.join(out[:-1])


def test_matmuls_faster_than_the_roofline_are_flagged_as_asynchronous():
    groups = {('matmul', 'bwd', '', 'transpose', 'f32[384,1536]'): [0.6, 6, 28e9, set()],  # 47,000 GFLOP/s: impossible
              ('matmul', 'bwd', '', 'dot_general', 'f32[4096,384]'): [380.0, 18, 58e9, set()],  # 152 GFLOP/s
              ('elementwise', 'fwd', '', 'add', 'f32[8]'): [0.0, 1, 0.0, set()]}
    assert profile_step.too_fast(groups, roofline=300e9) == ['transpose f32[384,1536]']


def test_matmul_and_convolution_flops_from_the_hlo():
    import jax, jax.numpy as jnp
    x, w = jnp.ones((8, 16)), jnp.ones((16, 32))
    ops, kinds = profile_step.hlo_ops(jax.jit(lambda x, w: x @ w + 1).lower(x, w).compile().as_text())
    assert max(op[5] for op in ops.values()) == 2 * 8 * 16 * 32 and 'matmul' in kinds.values()
    image, kernel = jnp.ones((1, 3, 32, 32)), jnp.ones((8, 3, 3, 3))  # NCHW, OIHW: output [1, 8, 30, 30]
    conv = jax.jit(lambda a, b: jax.lax.conv(a, b, (1, 1), 'VALID')).lower(image, kernel).compile().as_text()
    ops, _ = profile_step.hlo_ops(conv)
    assert max(op[5] for op in ops.values()) == 2 * 8 * 30 * 30 * 3 * 3 * 3


def test_device_timelines_count_kernels_not_summary_lines(tmp_path, capsys):
    """A GPU trace's layout (as the profiler writes it; no GPU here, so a synthetic one): kernels on 'Stream #' lines
    name their op and module in args; the 'XLA Ops'/'XLA Modules' summary lines on the same device and the host's
    launch events are not counted again; an op that launches two kernels ran once."""
    import gzip
    M = lambda kind, pid, name, tid=0: dict(ph='M', name=kind, pid=pid, tid=tid, args=dict(name=name))
    X = lambda pid, tid, name, ts, dur, op: dict(ph='X', pid=pid, tid=tid, name=name, ts=ts, dur=dur,
                                                 args={'hlo_op': op, 'hlo_module': 'jit_train_step'})  # as JAX 0.11.2 wrote it
    events = [M('process_name', 1, '/device:GPU:0'), M('process_name', 701, '/host:CPU'),
              M('thread_name', 1, 'Stream #7(Compute)', 7), M('thread_name', 1, 'XLA Ops', 200), M('thread_name', 1, 'XLA Modules', 201),
              X(1, 7, 'gemm_kernel', 0, 10, 'dot.1'), X(1, 7, 'splitk_reduce', 10, 1, 'dot.1'), X(1, 7, 'loop_add', 12, 3, 'fusion.2'),
              X(1, 200, 'dot.1', 0, 11, 'dot.1'), X(1, 201, 'jit_train_step', 0, 15, 'jit_train_step'), X(701, 3, 'launch', 0, 1, 'dot.1')]
    (tmp_path / 'plugins').mkdir()
    with gzip.open(tmp_path / 'plugins' / 'host.trace.json.gz', 'wt') as f:
        json.dump({'traceEvents': events}, f)
    found, runs = profile_step.op_events(str(tmp_path), 'jit_train_step', {'dot.1': None, 'fusion.2': None})
    assert sorted(found) == [('dot.1', 0, 10), ('dot.1', 10, 11), ('fusion.2', 12, 15)]
    assert runs == {'dot.1': 1, 'fusion.2': 1} and 'warning' not in capsys.readouterr().out
    # CUDA graphs (on by default; seen on an H200): each kernel names only its command buffer, not its op
    events = events[:5] + [X(1, 7, 'loop_add', 0, 3, 'command_buffer_1')]
    with gzip.open(tmp_path / 'plugins' / 'host.trace.json.gz', 'wt') as f:
        json.dump({'traceEvents': events}, f)
    with pytest.raises(utils.PicodoError, match='inside CUDA graphs.*xla_gpu_enable_command_buffer='):
        profile_step.op_events(str(tmp_path), 'jit_train_step', {'dot.1': None, 'fusion.2': None})
    # a host-only (CPU) trace without our ops, with events that carry no args: the plain error, not a KeyError
    events = [M('process_name', 701, '/host:CPU'), dict(ph='X', pid=701, tid=3, name='python', ts=0, dur=5)]
    with gzip.open(tmp_path / 'plugins' / 'host.trace.json.gz', 'wt') as f:
        json.dump({'traceEvents': events}, f)
    with pytest.raises(utils.PicodoError, match='no op of jit_train_step found on the host'):
        profile_step.op_events(str(tmp_path), 'jit_train_step', {'dot.1': None})


def test_the_step_profiled_with_another_attention_kernel(capsys):
    """--attention: the step with one of attention_bench.py's kernels, as bench.py --vs-attention has it (here Pallas's
    Triton kernel, interpreted on a CPU); one that cannot run here is one line."""
    r = profile_step.main(['--tiny', '--top', '1000', 'model.attn_impl=xla', '--attention', 'pallas[bq=16,bk=16,bq_dkv=16,bkv_dkv=16,bkv_dq=16]'])
    assert r['attention'] == 'pallas[bq=16,bk=16,bq_dkv=16,bkv_dkv=16,bkv_dq=16]' and r['layernorm'] is None
    assert any('mha' in t['op'] for t in r['top'])  # Pallas's mha in the profiled step (without --attention: none)
    assert ', attention pallas[bq=16' in capsys.readouterr().out
    with pytest.raises(utils.PicodoError, match=r"^--attention 'tokamax': needs an NVIDIA GPU or a TPU$"):
        profile_step.main(['--tiny', 'model.attn_impl=xla', '--attention', 'tokamax'])


@pytest.mark.parametrize('args,message', [(['--devices', '-1'], 'argument --devices: -1 is not an integer >= 0'),
                                          (['--devices', '9'], '--devices 9: this machine has 8'),
                                          (['--top', '-3'], 'argument --top: -3 is not an integer >= 0'),
                                          (['--steps', '0'], 'argument --steps: 0 is not an integer >= 1')])
def test_bad_arguments_are_one_usage_line(capsys, args, message):
    with pytest.raises(SystemExit):
        profile_step.parse(args)
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(message)


def test_the_attribution_arithmetic_from_known_ops_and_times(monkeypatch, capsys):
    """profile_step.run with its trace, HLO and clock replaced by known ones: per-step times (2 steps traced) by kind
    and by group, counts and FLOPs per step, the matmul rate against the per-device roofline, and the table's shares."""
    import contextlib, itertools
    import bench
    from test_bench import FakeClock, fake_step  # the benchmark tests' fake clock and step
    clock = FakeClock()
    monkeypatch.setattr(profile_step, 'time', clock)
    monkeypatch.setattr(bench, 'build', lambda cfg, mesh: (fake_step(clock, itertools.repeat(10)), (), None, 1.5))  # 10 s a step
    matmul_s = iter([1.0, 2.0, 4.0])
    monkeypatch.setattr(bench, 'matmul_roofline', lambda mesh, n, dtype: (lambda: next(matmul_s), 8e9))
    ops = {'dot.1': ('dot', 'f32[8,8]', 'model.py:1 f', 'dot_general', 'fwd', 1000),
           'dot.2': ('dot', 'f32[8,8]', 'model.py:1 f', 'dot_general', 'fwd', 1000),  # the same group as dot.1
           'add.3': ('add', 'f32[8]', '', 'add', '-', 0), 'ag.4': ('all-gather', 'f32[8]', '', 'all-gather', '-', 0),
           'while.5': ('while', '()', '', 'while', '-', 0)}
    kinds = {'dot.1': 'matmul', 'dot.2': 'matmul', 'add.3': 'elementwise', 'ag.4': 'collective', 'while.5': 'control'}
    monkeypatch.setattr(profile_step, 'hlo_ops', lambda text: (ops, kinds))
    events = [('while.5', 0, 10000), ('dot.1', 0, 4000), ('dot.2', 4000, 6000), ('add.3', 6000, 7000), ('ag.4', 6500, 9000)]  # µs, 2 steps
    monkeypatch.setattr(profile_step, 'op_events', lambda trace_dir, module, ops: (events, {name: 2 for name in ops}))
    monkeypatch.setattr(profile_step.jax.profiler, 'trace', lambda d: contextlib.nullcontext())
    r = profile_step.main(['--tiny', '--devices', '2', '--steps', '2'])
    assert r['step_ms'] == r['traced_step_ms'] == 10000 and r['op_ms_per_step'] == 4.5
    assert r['by_kind'] == {'matmul': 3.0, 'collective': 1.0, 'elementwise': 0.5}  # the all-gather: only its exposed 2 ms
    assert r['roofline_flops_per_sec'] == 8e9 / 2 / 2.0  # per device, the median matmul
    assert r['matmul_flops_per_step'] == 2000 and r['matmul_flops_per_sec'] == 2000 / 3.0 * 1e3
    F = profile_step.gpt.flops_per_token(profile_step.train.model_config(bench.compose_config('bench_cpu', bench.TINY).model))
    assert r['model_flops_per_step'] == F * 8 * 32 / 2  # device 0's share
    assert [(t['kind'], t['ms'], t['n'], t['flops_per_sec']) for t in r['top']] == [
        ('matmul', 3.0, 2, 2000 / 3.0 * 1e3), ('collective', 1.0, 1, None), ('elementwise', 0.5, 1, None)]
    out = capsys.readouterr().out
    assert '      3.0  66.7%  matmul\n' in out and '      0.5  11.1%  elementwise' in out and r['too_fast'] == []


HLO = """HloModule m, entry_computation_layout={(f32[8,16]{1,0})->f32[16,8]{1,0}}

%moves (p: f32[8,16]) -> f32[16,8] {
  %p = f32[8,16]{1,0} parameter(0)
  ROOT %t = f32[16,8]{1,0} transpose(f32[8,16]{1,0} %p), dimensions={1,0}
}

%math (q: f32[16,8]) -> f32[16,8] {
  %q = f32[16,8]{1,0} parameter(0)
  ROOT %e = f32[16,8]{1,0} exponential(f32[16,8]{1,0} %q)
}

ENTRY %main (x: f32[8,16]) -> f32[16,8] {
  %x = f32[8,16]{1,0} parameter(0)
  %fusion.1 = f32[16,8]{1,0} fusion(f32[8,16]{1,0} %x), kind=kLoop, calls=%moves
  ROOT %fusion.2 = f32[16,8]{1,0} fusion(f32[16,8]{1,0} %fusion.1), kind=kLoop, calls=%math
}
"""


def test_fusions_of_copies_and_transposes_are_data_movement_and_overlaps_count_once():
    _, kinds = profile_step.hlo_ops(HLO)
    assert (kinds['fusion.1'], kinds['fusion.2']) == ('data movement', 'elementwise')
    assert profile_step.union([(0, 10), (5, 15), (20, 21), (2, 3)]) == 16  # the busy time the coverage warning divides by


def test_pallas_kernels_from_attention_code_are_attention_kernels():
    """A custom call of Mosaic GPU or Triton is an attention kernel when attention code made it (tokamax's flash attention,
    Pallas's mha: --attention), else elementwise (tokamax's LayerNorm); cuDNN's attention is one by its name. tokamax names
    its ops by their arguments as JSON, with escaped quotes (read whole, shown by the op's class)."""
    call = lambda name, target, op_name: (f'  %{name} = bf16[2,8]{{1,0}} custom-call(bf16[2,8]{{1,0}} %x), '
                                          f'custom_call_target="{target}", metadata={{op_name="{op_name}"}}')
    tokamax = lambda cls: 'jit(step)/transpose(jvp())/tokamax:{\\"op\\":{\\"__type\\":\\"tokamax._src.ops.' + cls + '\\",\\"config\\":{\\"block_q\\":64}}}/vmap()/mpmd_map'
    hlo = '\n'.join(['HloModule m', 'ENTRY %main (x: bf16[2,8]) -> bf16[2,8] {', '  %x = bf16[2,8]{1,0} parameter(0)',
                     call('a', 'mosaic_gpu_v2', tokamax('attention.pallas_mosaic_gpu_vjp.PallasMosaicGpuFlashAttentionVjp')),
                     call('b', '__gpu$xla.gpu.triton', 'jit(step)/jvp(mha)/pallas_call'),
                     call('c', '__gpu$xla.gpu.triton', tokamax('normalization.pallas_triton.PallasTritonNormalization')),
                     call('d', '__cudnn$fmhaSoftmax', 'jit(step)/jvp(dot_product_attention)'), '  ROOT %e = bf16[2,8]{1,0} copy(%a)', '}'])
    ops, kinds = profile_step.hlo_ops(hlo)
    assert [kinds[n] for n in 'abcd'] == ['attention kernel', 'attention kernel', 'elementwise', 'attention kernel']
    assert [ops[n][3:5] for n in 'abc'] == [('mpmd_map', 'bwd'), ('pallas_call', 'fwd'), ('mpmd_map', 'bwd')]
