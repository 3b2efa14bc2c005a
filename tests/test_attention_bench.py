"""benchmarks/attention_bench.py: its tiny run on the CPU checks each kernel that can run here (Pallas's in interpret mode)
against XLA's attention in fp32; bad flags are argparse's one line; where the CUDA plugin is installed, --compile-for h100
tells a Pallas block setting that fits an H100's shared memory from one that does not. No assertion on speed."""
import importlib.util, json, os, re, subprocess, sys
import pytest
from conftest import REPO
sys.path.insert(0, os.path.join(REPO, 'benchmarks'))
import attention_bench as ab
import bench
import jax

HAS_PLUGIN = importlib.util.find_spec('jax_plugins') is not None and importlib.util.find_spec('jax_plugins.xla_cuda12') is not None
HAS_LIBTPU = importlib.util.find_spec('libtpu') is not None
HAS_TOKAMAX = importlib.util.find_spec('tokamax') is not None


def test_tiny_run_checks_every_kernel_against_xla_in_fp32_and_ends_with_its_json(capsys):
    bench.main(['--tiny', '--pallas', 'bq=64,bk=64,bq_dkv=32,bkv_dkv=64,bkv_dq=32'], parse=ab.parse, run=ab.run, table=ab.table)
    lines = capsys.readouterr().out.strip().splitlines()
    r = json.loads(lines[-1])
    k = r['kernels']
    assert (r['batch_size'], r['seq_len'], r['n_heads'], r['head_dim'], r['dtype']) == (2, 256, 2, 64, 'float32')
    assert list(k) == ['cudnn', 'cudnn-bnth', 'xla', 'chunked', 'pallas[bq=64,bk=64,bkv_dkv=64]', 'mgpu', 'mgpu+pallas', 'pallas-tpu',
                       'tokamax', 'tokamax-triton']
    ran = ['xla', 'chunked', 'pallas[bq=64,bk=64,bkv_dkv=64]', 'pallas-tpu']  # Pallas's GPU and TPU kernels interpreted
    for name in ran:  # forward and backward timed; the output and the three gradients within fp32 rounding of XLA's
        assert k[name]['error'] is None and k[name]['rel_err'] < 1e-5, (name, k[name])
        assert None not in (k[name]['fwd_ms'], k[name]['bwd_ms'], k[name]['step_ms'], k[name]['fwd_tflops'])
    assert k['tokamax']['error'] == 'needs an NVIDIA GPU or a TPU'  # tokamax's kernels have no CPU interpreter
    assert all(k[name]['error'].startswith('needs an NVIDIA GPU') and k[name]['fwd_ms'] is None for name in k if name not in ran)
    assert r['fastest'] in ran and r['interpret'] and 'interpret mode' in lines[-3] and not any(k[n]['suspect'] for n in ran)


def test_the_fp32_reference_captures_no_arrays_as_constants(recwarn):
    """The reference's gradients came from a vjp closure jitted on its own: its residuals (GBs at GPT-2 small's shape) went
    into the program as constants, and an H100 spent the run's 170 s constant-folding them. Any array the size of an input
    (here 256 KiB) captured now warns, and no such warning may come."""
    before = jax.config.jax_captured_constants_warn_bytes
    jax.config.update('jax_captured_constants_warn_bytes', 64 * 1024)
    try:
        bench.main(['--tiny', '--impls', 'xla', '--rounds', '1'], parse=ab.parse, run=ab.run, table=ab.table)
    finally:
        jax.config.update('jax_captured_constants_warn_bytes', before)
    # the warning as JAX 0.10-0.11 words it; with jax_use_simplified_jaxpr_constants, one per constant
    assert not [w for w in recwarn if re.search('constants were captured|Closed-over constant', str(w.message))]


def test_a_wrong_pallas_call_shows_in_rel_err(monkeypatch, capsys):
    """The check can fail: Pallas's kernel without the 1/sqrt(K) scale is far from XLA's attention."""
    real = ab.pallas_kernel
    monkeypatch.setattr(ab, 'pallas_kernel', lambda impl, s, scale, *a: real(impl, s, 1.0, *a))
    r = ab.run(ab.parse(['--tiny', '--impls', 'xla,pallas']))
    assert r['kernels']['xla']['rel_err'] < 1e-5 < 1e-2 < r['kernels']['pallas[defaults]']['rel_err']
    assert r['kernels']['pallas[defaults]']['suspect'] and r['fastest'] == 'xla'  # however fast, not the fastest


def test_mosaic_gpus_forward_with_the_triton_backward_computes_attentions_gradients(monkeypatch):
    """mgpu+pallas pairs two kernels through their internals: the Triton backward must get Mosaic GPU's log-sum-exp as it
    is (both in base 2 of the same scaled scores). Mosaic GPU's kernel has no CPU interpreter: its module's reference stands
    in for it, computing the log-sum-exp as the kernel does; the Triton backward runs in interpret mode."""
    mg = pytest.importorskip('jax.experimental.pallas.ops.gpu.attention_mgpu')
    monkeypatch.setattr(mg, '_attention_forward', lambda q, k, v, config, save_residuals=False: mg.attention_reference(
        q, k, v, causal=True, save_residuals=save_residuals))
    f = ab.pallas_kernel('mgpu+pallas', ab.pallas_setting('bq=64,bk=64'), 64 ** -0.5, True, 64)
    q, k, v, do = (jax.random.normal(key, (2, 128, 2, 64)) for key in jax.random.split(jax.random.key(1), 4))
    o, vjp = jax.vjp(f, q, k, v)
    want, want_vjp = jax.vjp(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True), q, k, v)
    assert ab.rel_err([o, *vjp(do)], [want, *want_vjp(do)]) < 1e-5


@pytest.mark.parametrize('flags,message', [
    (['--impls', 'cudnn,flash'], "--impls: unknown kernel 'flash'; known: cudnn, cudnn-bnth, xla, chunked, pallas, mgpu, mgpu+pallas, pallas-tpu, tokamax, tokamax-triton"),
    (['--pallas', 'bq=big'], "'bq=big': key=integer pairs separated by commas"),
    (['--pallas', 'bq=64,blk=32'], "'bq=64,blk=32': unknown key blk; keys: bq, bk, bq_dkv, bkv_dkv, bkv_dq, warps, stages"),
])
def test_bad_flags_are_one_line(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        ab.parse(flags)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and message in err[-1]


def test_pallas_settings_keep_jax_defaults_for_keys_not_given():
    s = ab.pallas_setting('bk=64,warps=8')
    assert s == dict(bq=128, bk=64, bq_dkv=32, bkv_dkv=32, bkv_dq=32, warps=8, stages=2) and ab.name_of(s) == 'bk=64,warps=8'
    assert ab.name_of(ab.pallas_setting('bq=128')) == 'defaults'
    assert ab.parse([]).pallas == [ab.pallas_setting(ab.PALLAS[0])]  # on a CPU: one setting (on a GPU, all of PALLAS)


def test_tokamax_settings_keep_its_heuristics_for_keys_not_given(capsys):
    s = ab.tokamax_setting('bq=128,wgs=1')
    assert s == ab.TOKAMAX_KEYS | dict(bq=128, wgs=1) and ab.name_of(s, ab.TOKAMAX_KEYS) == 'bq=128,wgs=1'
    assert ab.parse([]).tokamax is None and ab.parse(['--tokamax', 'bkv=64', 'stages=3']).tokamax == [
        ab.TOKAMAX_KEYS | {'bkv': 64}, ab.TOKAMAX_KEYS | {'stages': 3}]
    with pytest.raises(SystemExit):
        ab.parse(['--tokamax', 'bk=64'])
    assert "'bk=64': unknown key bk; keys: bq, bkv, stages, bq_dkv, bkv_dkv, bq_dq, bkv_dq, bwd_stages, wgs" in capsys.readouterr().err
    rows = ab.kernels(ab.parse(['--impls', 'tokamax', '--tokamax', 'bq=128', 'wgs=1']), 64, 'tpu')
    assert [(name, f) for name, _, f, _ in rows] == [  # settings are for the GPU kernel's blocks
        (name, "block settings are for tokamax's Mosaic GPU kernel: on a TPU, tokamax without them") for name in ('tokamax[bq=128]', 'tokamax[wgs=1]')]


@pytest.mark.skipif(not HAS_PLUGIN, reason='needs jax-cuda12-plugin and jax-cuda12-pjrt (see benchmarks/deviceless.py)')
def test_compile_for_h100_tells_a_block_setting_that_fits_from_one_that_does_not():
    r = subprocess.run([sys.executable, os.path.join(REPO, 'benchmarks', 'attention_bench.py'), '--tiny', 'model.dtype=bfloat16',
                        'model.seq_len=1024', '--compile-for', 'h100', '--impls', 'cudnn,pallas',
                        '--pallas', 'bq=64,bk=64', 'bq_dkv=256,bkv_dkv=256,bkv_dq=256'], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    k = json.loads(r.stdout.strip().splitlines()[-1])['kernels']
    assert k['cudnn']['compiled'] and k['pallas[bq=64,bk=64]']['compiled'] and k['cudnn']['fwd_ms'] is None  # nothing ran
    big = k['pallas[bq_dkv=256,bkv_dkv=256,bkv_dq=256]']
    assert big['compiled'] and big['error'].startswith('backward: ') and 'Shared memory size limit exceeded' in big['error']


def test_tokamaxs_calls_get_the_names_a_newer_jax_has(monkeypatch):
    """tokamax 0.0.12 passes plgpu.kernel out_shape= and scratch_shapes=, and calls pallas.dot, all deprecated since JAX
    0.10: wherever plgpu.kernel takes out_type= and scratch_types= (this JAX, or a later one without the old names, or one
    whose deprecation is accelerated and refuses them), tokamax_compat renames them on the way, once; where pallas.dot is
    gone it is pallas.triton.dot again."""
    plgpu = pytest.importorskip('jax.experimental.pallas.mosaic_gpu')
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton
    seen = []
    def this_jax(body=None, out_shape=None, *, out_type=None, scratch_types=None, scratch_shapes=None, grid=()):  # as 0.10.2's
        if out_shape is not None or scratch_shapes is not None:
            raise ValueError('The out_shape and scratch_shapes arguments to plgpu.kernel are deprecated')  # accelerated
        return seen.append((body, out_type, scratch_types, grid)) or 'kernel'
    def newer(body, *, out_type, scratch_types=(), grid=()):  # as a later JAX might have it
        return body, out_type, scratch_types, grid
    for kernel, out in ((this_jax, 'kernel'), (newer, (len, 'o', 's', (2,)))):
        monkeypatch.setattr(plgpu, 'kernel', kernel)
        ab.tokamax_compat()
        assert plgpu.kernel is not kernel and plgpu.kernel(len, out_shape='o', scratch_shapes='s', grid=(2,)) == out
        patched = plgpu.kernel
        ab.tokamax_compat()  # once per tokamax row: the renaming is not wrapped again
        assert plgpu.kernel is patched
    assert seen == [(len, 'o', 's', (2,))] and plgpu.kernel(len, out_type='o') == (len, 'o', (), ())
    def older(body, out_shape, *, scratch_shapes=()):  # a JAX before the new names: left alone
        return body
    monkeypatch.setattr(plgpu, 'kernel', older)
    ab.tokamax_compat()
    assert plgpu.kernel is older
    def gone(name):  # the module's __getattr__, which serves its deprecated names
        raise AttributeError(name)
    monkeypatch.setitem(pl.__dict__, 'dot', None)  # so that the one tokamax_compat sets is removed after the test
    monkeypatch.delitem(pl.__dict__, 'dot')
    monkeypatch.setitem(pl.__dict__, '__getattr__', gone)
    ab.tokamax_compat()
    assert pl.dot is triton.dot


@pytest.mark.parametrize('target,compiler,impls', [('h100', HAS_PLUGIN, ['tokamax', 'tokamax-triton']), ('v5e-1', HAS_LIBTPU, ['tokamax'])])
def test_compile_for_a_gpu_or_tpu_finds_tokamaxs_kernels_for_it(target, compiler, impls):
    """tokamax picks its kernel by asking JAX's default device, a CPU here: compiled for an H100 (Mosaic GPU's kernel for
    Hopper, and Triton's) or a TPU v5e (Mosaic TPU's), the device it is told of must be that one, forward and backward."""
    if not (compiler and HAS_TOKAMAX):
        pytest.skip(f"needs tokamax and {'the CUDA plugin' if target == 'h100' else 'libtpu'} (see benchmarks/deviceless.py)")
    r = subprocess.run([sys.executable, os.path.join(REPO, 'benchmarks', 'attention_bench.py'), '--tiny', 'model.dtype=bfloat16',
                        'model.seq_len=1024', '--compile-for', target, '--impls', ','.join(impls)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    k = json.loads(r.stdout.strip().splitlines()[-1])['kernels']
    assert all(k[i]['compiled'] and k[i]['error'] is None and k[i]['fwd_ms'] is None for i in impls), k  # both compiled, nothing ran


@pytest.mark.skipif(not (HAS_PLUGIN and HAS_TOKAMAX), reason='needs tokamax and the CUDA plugin (see benchmarks/deviceless.py)')
def test_compile_for_h100_tells_a_tokamax_block_setting_that_fits_from_ones_that_do_not():
    r = subprocess.run([sys.executable, os.path.join(REPO, 'benchmarks', 'attention_bench.py'), '--tiny', 'model.dtype=bfloat16',
                        'model.seq_len=1024', '--compile-for', 'h100', '--impls', 'tokamax',
                        '--tokamax', 'bq=128,stages=3,wgs=1', 'bq=256,bkv=256,stages=4', 'bq=96'], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    k = json.loads(r.stdout.strip().splitlines()[-1])['kernels']
    assert k['tokamax[bq=128,stages=3,wgs=1]']['compiled'] and k['tokamax[bq=128,stages=3,wgs=1]']['error'] is None
    assert 'exceeds available shared memory' in k['tokamax[bq=256,bkv=256,stages=4]']['error']
    assert k['tokamax[bq=96]']['error'].startswith('ValidationError')  # its blocks are multiples of 64
