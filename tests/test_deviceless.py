"""benchmarks/deviceless.py: its byte counts on a hand-written HLO module, its one-line error without the CUDA plugin or
libtpu, and (where they are installed) a real compile of a tiny GPT for an H100 and for a TPU v5e slice."""
import importlib.util, json, os, subprocess, sys
import pytest
from conftest import REPO
sys.path.insert(0, os.path.join(REPO, 'benchmarks'))
import deviceless
import jax, train

# A loop of 5 trips whose body gathers 8 rows of an fp32 [4096, 256] table cast to bf16 and writes them in place into a
# [5, 8, 256] buffer, its condition one kernel a trip (and one more); a scatter-add of 8 rows into the table, in place; a
# cuBLAS matmul; a reduction; a conditional whose two branches are one kernel each. Its stack frames as XLA prints them,
# each naming its caller as the caller's number + 1 (1: none): frame 2 (jax's line 99) is called from frame 1 (model.py:7).
HLO = """HloModule m

FileNames
1 "/repo/model.py"
2 "/site-packages/jax/x.py"

FunctionNames
1 "f"

FileLocations
1 {file_name_id=1 function_name_id=1 line=7 end_line=7 column=1 end_column=2}
2 {file_name_id=2 function_name_id=1 line=99 end_line=99 column=1 end_column=2}

StackFrames
1 {file_location_id=1 parent_frame_id=1}
2 {file_location_id=2 parent_frame_id=2}

%fused_gather (param_0: f32[4096,256], param_1: s32[8,1]) -> bf16[8,256] {
  %param_0 = f32[4096,256]{1,0} parameter(0)
  %param_1 = s32[8,1]{1,0} parameter(1)
  %convert.1 = bf16[4096,256]{1,0} convert(%param_0)
  ROOT %gather.1 = bf16[8,256]{1,0} gather(%convert.1, %param_1), offset_dims={1}, collapsed_slice_dims={0}, start_index_map={0}, index_vector_dim=1, slice_sizes={1,256}
}

%fused_update (param_0: bf16[5,8,256], param_1: bf16[8,256], param_2: s32[]) -> bf16[5,8,256] {
  %param_0 = bf16[5,8,256]{2,1,0} parameter(0)
  %param_1 = bf16[8,256]{1,0} parameter(1)
  %bitcast.1 = bf16[1,8,256]{2,1,0} bitcast(%param_1)
  %param_2 = s32[] parameter(2)
  %constant.1 = s32[] constant(0)
  ROOT %dynamic-update-slice.1 = bf16[5,8,256]{2,1,0} dynamic-update-slice(%param_0, %bitcast.1, %param_2, %constant.1, /*index=4*/%constant.1)
}

%fused_scatter (param_0: f32[4096,256], param_1: s32[8,1], param_2: f32[8,256]) -> f32[4096,256] {
  %param_0 = f32[4096,256]{1,0} parameter(0)
  %param_1 = s32[8,1]{1,0} parameter(1)
  %param_2 = f32[8,256]{1,0} parameter(2)
  ROOT %scatter.1 = f32[4096,256]{1,0} scatter(%param_0, %param_1, %param_2), update_window_dims={1}, inserted_window_dims={0}, scatter_dims_to_operand_dims={0}, index_vector_dim=1, to_apply=%add
}

%fused_sum (param_0: f32[64,1024]) -> f32[64] {
  %param_0 = f32[64,1024]{1,0} parameter(0)
  %constant.2 = f32[] constant(0)
  ROOT %reduce.1 = f32[64]{0} reduce(%param_0, %constant.2), dimensions={1}, to_apply=%add
}

%fused_lt (param_0: s32[]) -> pred[] {
  %param_0 = s32[] parameter(0)
  %constant.3 = s32[] constant(5)
  ROOT %lt.1 = pred[] compare(%param_0, %constant.3), direction=LT
}

%fused_neg (param_0: f32[64]) -> f32[64] {
  %param_0 = f32[64]{0} parameter(0)
  ROOT %negate.2 = f32[64]{0} negate(%param_0)
}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(%a, %b)
}

%body (p: (s32[], bf16[5,8,256], f32[4096,256], s32[8,1])) -> (s32[], bf16[5,8,256], f32[4096,256], s32[8,1]) {
  %p = (s32[], bf16[5,8,256]{2,1,0}, f32[4096,256]{1,0}, s32[8,1]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %buffer = bf16[5,8,256]{2,1,0} get-tuple-element(%p), index=1
  %table = f32[4096,256]{1,0} get-tuple-element(%p), index=2
  %ids = s32[8,1]{1,0} get-tuple-element(%p), index=3
  %rows = bf16[8,256]{1,0} fusion(%table, %ids), kind=kLoop, calls=%fused_gather, metadata={op_name="gather" stack_frame_id=2}
  %updated = bf16[5,8,256]{2,1,0} fusion(%buffer, %rows, %i), kind=kLoop, calls=%fused_update, metadata={op_name="update" stack_frame_id=1}
  ROOT %out = (s32[], bf16[5,8,256]{2,1,0}, f32[4096,256]{1,0}, s32[8,1]{1,0}) tuple(%i, %updated, %table, %ids)
}

%cond (p: (s32[], bf16[5,8,256], f32[4096,256], s32[8,1])) -> pred[] {
  %p = (s32[], bf16[5,8,256]{2,1,0}, f32[4096,256]{1,0}, s32[8,1]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %more = pred[] fusion(%i), kind=kLoop, calls=%fused_lt
}

%left (x: f32[64]) -> f32[64] {
  %x = f32[64]{0} parameter(0)
  ROOT %left_neg = f32[64]{0} fusion(%x), kind=kLoop, calls=%fused_neg
}

%right (x: f32[64]) -> f32[64] {
  %x = f32[64]{0} parameter(0)
  ROOT %right_neg = f32[64]{0} fusion(%x), kind=kLoop, calls=%fused_neg
}

ENTRY %main (init: (s32[], bf16[5,8,256], f32[4096,256], s32[8,1]), a: bf16[64,512], b: bf16[512,1024], grads: f32[8,256], which: s32[]) -> f32[64] {
  %init = (s32[], bf16[5,8,256]{2,1,0}, f32[4096,256]{1,0}, s32[8,1]{1,0}) parameter(0)
  %loop = (s32[], bf16[5,8,256]{2,1,0}, f32[4096,256]{1,0}, s32[8,1]{1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"5"}}
  %table = f32[4096,256]{1,0} get-tuple-element(%loop), index=2
  %ids = s32[8,1]{1,0} get-tuple-element(%loop), index=3
  %grads = f32[8,256]{1,0} parameter(3)
  %added = f32[4096,256]{1,0} fusion(%table, %ids, %grads), kind=kInput, calls=%fused_scatter
  %a = bf16[64,512]{1,0} parameter(1)
  %b = bf16[512,1024]{1,0} parameter(2)
  %matmul = (f32[64,1024]{1,0}, s8[4194304]{0}) custom-call(%a, %b), custom_call_target="__cublas$lt$matmul", metadata={op_name="dot" stack_frame_id=1}
  %product = f32[64,1024]{1,0} get-tuple-element(%matmul), index=0
  %sums = f32[64]{0} fusion(%product), kind=kInput, calls=%fused_sum, metadata={op_name="reduce"}
  %which = s32[] parameter(4)
  ROOT %chosen = f32[64]{0} conditional(%which, %sums, %sums), branch_computations={%left, %right}
}
"""
ROW_F32, ROW_BF16 = 8 * 256 * 4, 8 * 256 * 2  # the 8 rows


def test_kernels_count_the_bytes_each_reads_and_writes_and_how_often_it_runs():
    ks = {k['name']: k for k in deviceless.kernels(HLO, root='/repo')}
    assert sorted(ks) == ['added', 'left_neg', 'matmul', 'more', 'right_neg', 'rows', 'sums', 'updated']
    assert [ks[n]['times'] for n in ('rows', 'updated', 'more', 'added', 'sums')] == [5, 5, 6, 1, 1]  # the condition: once more
    assert ks['rows']['read'] == ROW_F32 + 8 * 4  # 8 gathered rows, in the table's fp32 (through the cast): not the 4 MB table
    assert ks['rows']['written'] == ROW_BF16
    assert ks['updated']['read'] == ROW_BF16 + 4 and ks['updated']['written'] == ROW_BF16  # in place: not the whole buffer
    assert ks['added']['read'] == ROW_F32 + 8 * 4 + ROW_F32 and ks['added']['written'] == ROW_F32  # the scatter-add: its rows
    assert (ks['sums']['read'], ks['sums']['written']) == (64 * 1024 * 4, 64 * 4)
    assert ks['matmul']['kind'] == 'matmul' and ks['sums']['kind'] == 'fusion'
    assert all(k['exact'] for n, k in ks.items() if not n.endswith('_neg')) and not ks['left_neg']['exact']
    assert ks['rows']['source'] == ks['updated']['source'] == 'model.py:7'  # the innermost frame in the repo, not site-packages
    assert ks['sums']['source'] == '?'


# A step's kernels as attention code other than cuDNN's makes them (their op_names as JAX writes them): tokamax's Mosaic GPU
# attention (its arguments as JSON, quotes escaped), Pallas's Triton backward and its preprocessing (sum(o * do), which
# moves bytes and does little arithmetic, as tokamax's does in XLA), and a Triton LayerNorm from tokamax.
SWAPPED = r"""HloModule m

ENTRY %main (q: bf16[2,128,2,64]) -> bf16[2,128,2,64] {
  %q = bf16[2,128,2,64]{3,2,1,0} parameter(0)
  %flash = bf16[2,128,2,64]{3,2,1,0} custom-call(%q), custom_call_target="mosaic_gpu_v2", metadata={op_name="jit(f)/jvp()/tokamax:{\"op\":{\"__type\":\"tokamax._src.ops.attention.pallas_mosaic_gpu.PallasMosaicGpuFlashAttention\",\"config\":{\"block_q\":64}}}" stack_frame_id=1}
  %grad = bf16[2,128,2,64]{3,2,1,0} custom-call(%flash), custom_call_target="__gpu$xla.gpu.triton", metadata={op_name="jit(f)/transpose(jvp(mha_backward))/pallas_call"}
  %delta = f32[2,2,128]{2,1,0} custom-call(%grad), custom_call_target="__gpu$xla.gpu.triton", metadata={op_name="jit(f)/transpose(jvp(preprocess_backward))/mha_preprocess_backward/pallas_call"}
  ROOT %norm = bf16[2,128,2,64]{3,2,1,0} custom-call(%grad), custom_call_target="__gpu$xla.gpu.triton", metadata={op_name="jit(f)/jvp()/tokamax:{\"op\":{\"__type\":\"tokamax._src.ops.normalization.pallas_triton.PallasTritonNormalization\"}}"}
}
"""


def test_kernels_made_by_attention_code_count_as_attention():
    """bench.py --vs-attention's kernels (tokamax, Pallas) count as attention, as cuDNN's do, so deviceless.py --attention's
    MFU ceiling holds; Pallas's preprocessing and a custom call from other code (tokamax's LayerNorm) stay other kernels,
    their bytes counted."""
    assert ({k['name']: k['kind'] for k in deviceless.kernels(SWAPPED, root='/repo')}
            == dict(flash='attention', grad='attention', delta='custom-call', norm='custom-call'))
    s = deviceless.summary(SWAPPED, model_flops=1e9, peak=1e12, bandwidth=1e9)
    qkv = 2 * 128 * 2 * 64 * 2  # bytes of a bf16 [2, 128, 2, 64]
    assert (s['attention'], s['other_kernels'], s['other_bytes']) == (2, 2, (qkv + 2 * 2 * 128 * 4) + 2 * qkv)


def test_summary_adds_up_the_non_matmul_kernels_and_bounds_the_mfu():
    s = deviceless.summary(HLO, model_flops=1e9, peak=1e12, bandwidth=1e9)
    loop = 5 * ((ROW_F32 + 32 + ROW_BF16) + (ROW_BF16 + 4 + ROW_BF16)) + 6 * (4 + 1)
    moved = loop + (2 * ROW_F32 + 32 + ROW_F32) + (64 * 1024 * 4 + 64 * 4) + 2 * (64 * 4 * 2)
    assert (s['kernels'], s['matmuls'], s['attention'], s['other_kernels'], s['inexact_kernels']) == (21, 1, 0, 20, 2)
    assert s['matmul_operand_dtypes'] == {'bf16': 1}  # its operands' type (its output is f32)
    assert s['other_bytes'] == moved and s['other_floor_ms'] == pytest.approx(moved / 1e9 * 1e3)
    assert s['mfu_ceiling'] == pytest.approx(1e-3 / (1e-3 + moved / 1e9))  # matmuls at the peak, the rest at full bandwidth


def test_target_config_names_the_gpu_and_its_memory():
    text = deviceless.target_config('h200')
    assert 'device_description_str: "NVIDIA H200"' in text and 'memory_bandwidth: 4800000000000' in text
    assert 'cuda_compute_capability { major: 9 minor: 0 }' in text
    t4 = deviceless.target_config('t4')
    assert 'device_description_str: "Tesla T4"' in t4 and 'cuda_compute_capability { major: 7 minor: 5 }' in t4 and 'core_count: 40' in t4


HAS_PLUGIN = importlib.util.find_spec('jax_plugins') is not None and importlib.util.find_spec('jax_plugins.xla_cuda12') is not None
HAS_LIBTPU = importlib.util.find_spec('libtpu') is not None
TINY = ['model.vocab_size=256', 'model.seq_len=64', 'model.d_model=64', 'model.n_layers=2', 'model.n_heads=4', 'batch_size=8',
        'model.attn_impl=xla']


run = lambda *args: subprocess.run([sys.executable, os.path.join(REPO, 'benchmarks', 'deviceless.py'), *args], capture_output=True, text=True)


@pytest.mark.parametrize('target,installed,compiler,package', [('h100', HAS_PLUGIN, 'CUDA', 'jax-cuda12-plugin'), ('v5e-4', HAS_LIBTPU, 'TPU', 'libtpu')])
def test_without_the_compiler_it_is_one_line_saying_what_to_install(target, installed, compiler, package):
    if installed:
        pytest.skip(f'{package} is installed here')
    r = run(*TINY, '--target', target)
    assert r.returncode == 1 and r.stdout == ''
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and f'error: no {compiler} compiler here' in r.stderr
    assert package in r.stderr


@pytest.mark.skipif(not HAS_PLUGIN, reason='needs jax-cuda12-plugin and jax-cuda12-pjrt (see benchmarks/deviceless.py)')
def test_a_tiny_gpt_compiles_for_an_h100(tmp_path, monkeypatch):
    monkeypatch.setenv('JAX_COMPILATION_CACHE_DIR', str(tmp_path))  # a user's persistent cache: a second run reads no entry
    monkeypatch.setenv('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')  # (a cached one needs a device: a warning each)
    for _ in range(2):
        r = run(*TINY)
        assert r.returncode == 0 and 'compilation cache' not in r.stderr, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert (out['device_kind'], out['devices']) == ('NVIDIA H100 80GB HBM3', 1) and out['fits'] and 0 < out['memory_bytes'] < 2**30
    assert out['matmuls'] > 0 and out['attention'] == 0 and 0 < out['mfu_ceiling'] < 1
    # bytes by the repo's line that made them or called the library that did (LayerNorm, GELU, optax): none without one
    assert '?' not in out['other_bytes_top_lines'] and any(k.startswith('train.py') for k in out['other_bytes_top_lines'])


@pytest.mark.skipif(not HAS_PLUGIN, reason='needs jax-cuda12-plugin and jax-cuda12-pjrt (see benchmarks/deviceless.py)')
def test_the_one_pass_log_sum_exp_reads_the_logits_once_fewer():
    """--loss online (bench.py --vs-loss): the loss's log-sum-exp reads the logits once, not twice: one pass over the
    [B*T, V] logits (bf16) fewer, made by bench.py's line."""
    base, online = (json.loads(run(*TINY, *flag).stdout.strip().splitlines()[-1]) for flag in ([], ['--loss', 'online']))
    assert online['loss'] == 'online' and any(k.startswith('benchmarks/bench.py') for k in online['other_bytes_top_lines'])
    saved, logits, rows = base['other_bytes'] - online['other_bytes'], 8 * 64 * 256 * 2, 8 * 64
    assert logits <= saved <= logits + 4 * 4 * rows  # and a few float32 per row (the first pass's maxes, written, then read)


@pytest.mark.skipif(not HAS_LIBTPU, reason='needs libtpu (see benchmarks/deviceless.py)')
def test_a_tiny_gpt_compiles_for_a_tpu_slice_and_a_batch_that_does_not_divide_is_one_line():
    r = run(*TINY, '--target', 'v5e-4')
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert (out['device_kind'], out['devices'], out['fits']) == ('TPU v5 lite', 4, True) and 0 < out['memory_bytes'] < 2**30
    r = run(*TINY, 'batch_size=6', '--target', 'v5e-4')
    assert r.returncode == 1 and 'error: batch_size 6 must split into grad_accum=1 micro-batches, each divisible over 4 devices' in r.stderr


@pytest.mark.skipif(not HAS_LIBTPU, reason='needs libtpu (see benchmarks/deviceless.py)')
def test_pallas_flash_attention_for_tpus_in_a_slices_step_and_the_one_line_where_it_does_not_compile():
    """--attention pallas-tpu: the step compiled for a v5e-4 with Pallas's flash attention (run per device: XLA does not split
    Pallas's kernels over a slice); on a v2-8 its bf16 matmuls do not compile, which is one line."""
    r = run(*TINY, 'model.seq_len=128', '--target', 'v5e-4', '--attention', 'pallas-tpu')
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert (out['attn_impl'], out['devices'], out['fits']) == ('pallas-tpu', 4, True)
    r = run(*TINY, 'model.seq_len=128', '--target', 'v2-8', '--attention', 'pallas-tpu')
    assert r.returncode == 1 and r.stdout == '' and r.stderr.strip().splitlines()[-1].startswith('error: cannot compile for v2-8: MosaicError')
    assert 'Unsupported matmul RHS type' in r.stderr


@pytest.mark.skipif(not HAS_PLUGIN, reason='needs jax-cuda12-plugin and jax-cuda12-pjrt (see benchmarks/deviceless.py)')
def test_on_a_t4_bf16_attention_does_not_compile_and_fp16_matmuls_are_fp16():
    """A T4 (compute capability 7.5) has no bf16 matmuls: XLA refuses the bf16 algorithm of jax.nn.dot_product_attention
    (why train.model_config refuses bf16 there), and in fp16 every matmul takes fp16 operands (tensor cores)."""
    r = run(*TINY, '--target', 't4')
    assert r.returncode == 1 and r.stdout.count('\n') <= 1 and 'ALG_DOT_BF16_BF16_F32' in r.stderr
    r = run(*TINY, 'model.dtype=float16', '--target', 't4')
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out['device_kind'] == 'Tesla T4' and out['attn_impl'] == 'xla' and out['matmul_operand_dtypes'] == {'f16': out['matmuls']} != {'f16': 0}


@pytest.mark.skipif(not HAS_PLUGIN, reason='needs jax-cuda12-plugin and jax-cuda12-pjrt (see benchmarks/deviceless.py)')
def test_sampling_compiles_for_a_t4_in_float16():
    """Decoding with a KV cache in fp16 failed to compile for a T4 and an H100 (INVALID_ARGUMENT: Unsupported dot
    precision algorithm) until its attention took fp16 inputs in fp32; bf16 there is XLA's one-line error."""
    for target in ('t4', 'h100'):
        r = run(*TINY, 'model.dtype=float16', '--target', target, '--decode')
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout.strip().splitlines()[-1])['decode'] is True
    r = run(*TINY, '--target', 't4', '--decode')
    assert r.returncode == 1 and 'ALG_DOT_BF16_BF16_F32' in r.stderr and r.stderr.strip().count('\n') == 0


def test_it_compiles_with_the_xla_options_the_trainer_uses_on_gpus(monkeypatch):
    """deviceless.py jits its own step for a GPU target (train.compile_steps needs the state's arrays), so it repeats the XLA
    options that compile_steps passes on GPUs: cuBLAS matmuls, XLA's dot merger off. Changed in one place only, the
    tool would count the kernels of a step the GPUs no longer run."""
    options, jit = [], jax.jit
    monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
    monkeypatch.setattr(jax, 'jit', lambda *args, **kwargs: options.append(kwargs.get('compiler_options')) or jit(*args, **kwargs))
    train.compile_steps(None, {})  # jits the train and eval steps; nothing is traced
    assert options == [deviceless.GPU_OPTIONS, None]
