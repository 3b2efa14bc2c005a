"""benchmarks/gpu_compile.py: its byte counts on a hand-written HLO module, its one-line error without the CUDA plugin, and
(where the plugin is installed) a real compile of a tiny GPT for an H100."""
import importlib.util, json, os, subprocess, sys
import pytest
from conftest import REPO
sys.path.insert(0, os.path.join(REPO, 'benchmarks'))
import gpu_compile

# A loop of 5 trips whose body gathers 8 rows of a [4096, 256] table (through an elementwise op) and writes them in place
# into a [5, 8, 256] buffer; then a cuBLAS matmul (its s8 workspace is not output) and a LayerNorm-like reduction.
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
1 {file_location_id=1}
2 {file_location_id=2 parent_frame_id=1}

%fused_gather (param_0: f32[4096,256], param_1: s32[8,1]) -> f32[8,256] {
  %param_0 = f32[4096,256]{1,0} parameter(0)
  %param_1 = s32[8,1]{1,0} parameter(1)
  %negate.1 = f32[4096,256]{1,0} negate(%param_0)
  ROOT %gather.1 = f32[8,256]{1,0} gather(%negate.1, %param_1), offset_dims={1}, collapsed_slice_dims={0}, start_index_map={0}, index_vector_dim=1, slice_sizes={1,256}
}

%fused_update (param_0: f32[5,8,256], param_1: f32[8,256], param_2: s32[]) -> f32[5,8,256] {
  %param_0 = f32[5,8,256]{2,1,0} parameter(0)
  %param_1 = f32[8,256]{1,0} parameter(1)
  %bitcast.1 = f32[1,8,256]{2,1,0} bitcast(%param_1)
  %param_2 = s32[] parameter(2)
  %constant.1 = s32[] constant(0)
  ROOT %dynamic-update-slice.1 = f32[5,8,256]{2,1,0} dynamic-update-slice(%param_0, %bitcast.1, %param_2, %constant.1, /*index=4*/%constant.1)
}

%fused_sum (param_0: f32[64,1024]) -> f32[64] {
  %param_0 = f32[64,1024]{1,0} parameter(0)
  %constant.2 = f32[] constant(0)
  ROOT %reduce.1 = f32[64]{0} reduce(%param_0, %constant.2), dimensions={1}, to_apply=%add
}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(%a, %b)
}

%body (p: (s32[], f32[5,8,256], f32[4096,256], s32[8,1])) -> (s32[], f32[5,8,256], f32[4096,256], s32[8,1]) {
  %p = (s32[], f32[5,8,256]{2,1,0}, f32[4096,256]{1,0}, s32[8,1]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %buffer = f32[5,8,256]{2,1,0} get-tuple-element(%p), index=1
  %table = f32[4096,256]{1,0} get-tuple-element(%p), index=2
  %ids = s32[8,1]{1,0} get-tuple-element(%p), index=3
  %rows = f32[8,256]{1,0} fusion(%table, %ids), kind=kLoop, calls=%fused_gather, metadata={op_name="gather" stack_frame_id=2}
  %updated = f32[5,8,256]{2,1,0} fusion(%buffer, %rows, %i), kind=kLoop, calls=%fused_update, metadata={op_name="update" stack_frame_id=1}
  ROOT %out = (s32[], f32[5,8,256]{2,1,0}, f32[4096,256]{1,0}, s32[8,1]{1,0}) tuple(%i, %updated, %table, %ids)
}

%cond (p: (s32[], f32[5,8,256], f32[4096,256], s32[8,1])) -> pred[] {
  %p = (s32[], f32[5,8,256]{2,1,0}, f32[4096,256]{1,0}, s32[8,1]{1,0}) parameter(0)
  ROOT %c = pred[] constant(true)
}

ENTRY %main (init: (s32[], f32[5,8,256], f32[4096,256], s32[8,1]), a: bf16[64,512], b: bf16[512,1024]) -> f32[64] {
  %init = (s32[], f32[5,8,256]{2,1,0}, f32[4096,256]{1,0}, s32[8,1]{1,0}) parameter(0)
  %loop = (s32[], f32[5,8,256]{2,1,0}, f32[4096,256]{1,0}, s32[8,1]{1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"5"}}
  %a = bf16[64,512]{1,0} parameter(1)
  %b = bf16[512,1024]{1,0} parameter(2)
  %matmul = (f32[64,1024]{1,0}, s8[4194304]{0}) custom-call(%a, %b), custom_call_target="__cublas$lt$matmul", metadata={op_name="dot" stack_frame_id=1}
  %product = f32[64,1024]{1,0} get-tuple-element(%matmul), index=0
  ROOT %sums = f32[64]{0} fusion(%product), kind=kInput, calls=%fused_sum, metadata={op_name="reduce"}
}
"""


def test_kernels_bytes_count_what_is_read_and_written_and_loops_count_each_trip():
    ks = gpu_compile.kernels(HLO, root='/repo')
    assert [k['name'] for k in ks] == ['rows'] * 5 + ['updated'] * 5 + ['matmul', 'sums']  # the loop's kernels once per trip
    rows, updated, matmul, sums = ks[0], ks[5], ks[-2], ks[-1]
    assert rows['read'] == 8 * 256 * 4 + 8 * 4  # 8 gathered rows (through the negate), and the ids: not the 4 MB table
    assert rows['written'] == 8 * 256 * 4
    assert updated['read'] == 8 * 256 * 4 + 4  # the update and the index: the buffer is updated in place, not read
    assert updated['written'] == 8 * 256 * 4  # ... nor written whole
    assert (matmul['kind'], matmul['read'], matmul['written']) == ('matmul', (64 * 512 + 512 * 1024) * 2, 64 * 1024 * 4)  # no workspace
    assert (sums['kind'], sums['read'], sums['written']) == ('fusion', 64 * 1024 * 4, 64 * 4)
    assert rows['source'] == updated['source'] == 'model.py:7'  # the innermost frame in the repo, not in site-packages
    assert sums['source'] == '?'


def test_summary_adds_up_the_non_matmul_kernels_and_bounds_the_mfu():
    s = gpu_compile.summary(HLO, model_flops=1e9, peak=1e12, bandwidth=1e9)
    rows = 8 * 256 * 4
    moved = 5 * ((rows + 8 * 4 + rows) + (rows + 4 + rows)) + 64 * 1024 * 4 + 64 * 4  # 5 x (gather, update), then the reduction
    assert (s['kernels'], s['matmuls'], s['attention'], s['other_kernels'], s['other_bytes']) == (12, 1, 0, 11, moved)
    assert s['other_floor_ms'] == pytest.approx(moved / 1e9 * 1e3)
    assert s['mfu_ceiling'] == pytest.approx(1e-3 / (1e-3 + moved / 1e9))  # matmuls at the peak, the rest at full bandwidth


def test_target_config_names_the_gpu_and_its_memory():
    text = gpu_compile.target_config('h200')
    assert 'device_description_str: "NVIDIA H200"' in text and 'memory_bandwidth: 4800000000000' in text
    assert 'cuda_compute_capability { major: 9 minor: 0 }' in text


HAS_PLUGIN = importlib.util.find_spec('jax_plugins') is not None and importlib.util.find_spec('jax_plugins.xla_cuda12') is not None
TINY = ['model.vocab_size=256', 'model.seq_len=64', 'model.d_model=64', 'model.n_layers=2', 'model.n_heads=4', 'batch_size=8',
        'model.attn_impl=xla']


run = lambda *args: subprocess.run([sys.executable, os.path.join(REPO, 'benchmarks', 'gpu_compile.py'), *args], capture_output=True, text=True)


@pytest.mark.skipif(HAS_PLUGIN, reason='the CUDA plugin is installed here')
def test_without_the_cuda_plugin_it_is_one_line_saying_what_to_install():
    r = run(*TINY)
    assert r.returncode == 1 and r.stdout == ''
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and 'error: no CUDA compiler here' in r.stderr
    assert 'jax-cuda12-plugin' in r.stderr


@pytest.mark.skipif(not HAS_PLUGIN, reason='needs jax-cuda12-plugin and jax-cuda12-pjrt (see benchmarks/gpu_compile.py)')
def test_a_tiny_gpt_compiles_for_an_h100():
    r = run(*TINY)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out['gpu'] == 'NVIDIA H100 80GB HBM3' and out['fits'] and 0 < out['memory_bytes'] < 2**30
    assert out['matmuls'] > 0 and out['attention'] == 0 and 0 < out['mfu_ceiling'] < 1
