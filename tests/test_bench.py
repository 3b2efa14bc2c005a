"""The benchmark runs end to end in its tiny mode; no assertion on speed."""
import json, os, sys
import jax
from conftest import REPO
sys.path.insert(0, os.path.join(REPO, 'benchmarks'))
import bench

KEYS = ['tokens_per_sec', 'step_ms', 'compile_s', 'mfu', 'model_flops_per_sec', 'roofline_flops_per_sec',
        'roofline_fraction', 'peak_mem_bytes', 'device_kind', 'n_devices', 'compile_s_by_depth']


def test_tiny_benchmark_on_all_devices_ends_with_its_json(capsys):
    bench.main(['--tiny', '--devices', '0'])
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert set(KEYS) <= set(result)
    assert result['n_devices'] == jax.device_count() == 8 and result['mfu'] is None  # CPU: no vendor peak
    assert result['tokens_per_sec'] > 0 and 0 < result['roofline_fraction']
    assert sorted(result['compile_s_by_depth']) == ['1', '2'] and 'roofline fraction' in '\n'.join(lines)


def test_benchmark_measures_the_configured_model():
    args = bench.parse(['--tiny', 'model.n_layers=3', 'grad_accum=2'])
    cfg = bench.compose_config(args.config_name, args.overrides)
    assert (cfg.model.n_layers, cfg.grad_accum, cfg.model.d_model) == (3, 2, 64)
    default = bench.compose_config('bench_cpu', [])
    assert (default.model.d_model, default.model.n_layers, default.model.n_heads, default.model.seq_len,
            default.batch_size, default.model.vocab_size) == (384, 6, 6, 512, 8, 256)
