"""The step profiler (benchmarks/profile_step.py) attributes a real traced step; no assertion on speed."""
import json, os, sys
from conftest import REPO
sys.path.insert(0, os.path.join(REPO, 'benchmarks'))
import profile_step


def test_ops_running_together_share_their_time():
    share = profile_step.shared_times([('a', 0, 10), ('b', 5, 15), ('c', 20, 21)])
    assert share == {'a': 7.5, 'b': 7.5, 'c': 1}  # 5 alone + 5 halved each; idle time goes to no one


def test_tiny_profile_on_8_devices_attributes_the_step(capsys):
    profile_step.main(['--tiny', '--devices', '0', '--top', '1000'])
    out = capsys.readouterr().out.strip().splitlines()
    r = json.loads(out[-1])
    assert r['n_devices'] == 8 and r['op_ms_per_step'] > 0
    assert abs(sum(r['by_kind'].values()) - r['op_ms_per_step']) < 1e-6 * r['op_ms_per_step']
    assert {'matmul', 'collective'} <= set(r['by_kind'])  # FSDP: weights gathered, gradients reduce-scattered
    assert all(0 < t['ms'] <= r['op_ms_per_step'] and t['pass'] in ('fwd', 'bwd') for t in r['top'])
    sources = {t['source'].split(':')[0] for t in r['top']}
    assert {'model.py', 'train.py'} <= sources  # ops traced back to the lines that made them
    assert any(t['kind'] == 'matmul' and t['source'].startswith('model.py') for t in r['top'])
    # XLA's matmuls are the model's FLOPs (6N + 12·L·D·T per token), plus at most the attention scores recomputed in
    # backward (7 attention matmuls where 6 are counted; T=32 is one chunk, so no causal blocks are skipped), which XLA
    # may merge with the forward's
    L, D, T, B = 2, 64, 32, 8
    attention = 12 * L * D * T * B * T / 8
    assert r['model_flops_per_step'] <= r['matmul_flops_per_step'] <= r['model_flops_per_step'] + attention / 6
    assert 'kind' in '\n'.join(out[:-1])
