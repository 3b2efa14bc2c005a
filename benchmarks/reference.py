"""The issue's reference point, measured beside Picodo: a straightforward Flax NNX GPT of the CPU benchmark model's
shape (a Python loop over layers, `nnx.MultiHeadAttention` with a causal mask, optax's cross-entropy and AdamW,
`nnx.jit`) and Picodo's own training step (configs/bench_cpu.yaml, as benchmarks/bench.py builds it), timed in the
same rounds, each round also timing bench.py's 2048² matmul, so that all three see the same machine load.

    python benchmarks/reference.py            # width 384, 6 layers, 6 heads, T=512, batch 8, vocab 256, fp32
    python benchmarks/reference.py --tiny     # a smoke run (about 15 s on 2 cores)

Prints a summary table and, as its last line, one JSON object: the reference's figures under bench.py's names,
Picodo's under `picodo_*`, and `speedup`, the median over rounds of Picodo's tokens/s over the reference's.
Both run in this one process, with the malloc setting bench.py makes (utils.keep_freed_memory).
"""
import argparse, json, os, statistics, sys, time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # puts the repo on sys.path
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from types import SimpleNamespace
import model as gpt

SHAPE = dict(vocab_size=256, seq_len=512, d_model=384, n_layers=6, n_heads=6, batch_size=8)
TINY = dict(vocab_size=256, seq_len=32, d_model=64, n_layers=2, n_heads=4, batch_size=8)


class Block(nnx.Module):
    def __init__(self, D, H, rngs):
        self.ln1, self.ln2 = nnx.LayerNorm(D, rngs=rngs), nnx.LayerNorm(D, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(H, D, decode=False, rngs=rngs)
        self.fc, self.proj = nnx.Linear(D, 4 * D, rngs=rngs), nnx.Linear(4 * D, D, rngs=rngs)

    def __call__(self, x, mask):
        x = x + self.attn(self.ln1(x), mask=mask)
        return x + self.proj(jax.nn.gelu(self.fc(self.ln2(x))))


class GPT(nnx.Module):
    def __init__(self, c, rngs):
        self.tokens, self.positions = nnx.Embed(c.vocab_size, c.d_model, rngs=rngs), nnx.Embed(c.seq_len, c.d_model, rngs=rngs)
        self.blocks = nnx.List([Block(c.d_model, c.n_heads, rngs) for _ in range(c.n_layers)])
        self.ln_f = nnx.LayerNorm(c.d_model, rngs=rngs)

    def __call__(self, tokens):
        x = self.tokens(tokens) + self.positions(jnp.arange(tokens.shape[1]))
        mask = nnx.make_causal_mask(tokens)
        for block in self.blocks:
            x = block(x, mask)
        return self.tokens.attend(self.ln_f(x))  # tied head


@nnx.jit(donate_argnums=(0, 1))
def train_step(model, optimizer, batch):
    def loss_fn(model):
        logits = model(batch[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--warmup', type=bench.at_least(0), default=2, help='untimed steps after compiling')
    p.add_argument('--rounds', type=bench.at_least(1), default=5, help='timed rounds; medians are reported')
    p.add_argument('--steps', type=bench.at_least(1), default=2, help='training steps per timed round')
    p.add_argument('--tiny', action='store_true', help='a tiny model and a 128² matmul, for smoke tests')
    return p.parse_args(argv)


def run(args):
    c = SimpleNamespace(**(TINY if args.tiny else SHAPE))
    B, T = c.batch_size, c.seq_len
    model = GPT(c, nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adamw(1e-3, weight_decay=0.1), wrt=nnx.Param)
    batch = jnp.asarray(bench.zipf_tokens((B, T + 1), c.vocab_size))  # the ids bench.build gives Picodo's step
    t0 = time.perf_counter()
    jax.block_until_ready(train_step(model, optimizer, batch))  # the first call compiles
    compile_s = time.perf_counter() - t0  # and runs one step
    mesh = jax.make_mesh((1,), ('data',), (jax.sharding.AxisType.Auto,), devices=jax.devices()[:1])
    cfg = bench.compose_config('bench_cpu', [f'model.{k}={v}' for k, v in vars(c).items() if k != 'batch_size'] + [f'batch_size={B}'])
    picodo, state, picodo_batch = bench.build(cfg, mesh)[:3]  # Picodo's step on the same shape, for the same rounds
    def steps(n):  # n steps of each: seconds per step (reference, Picodo)
        nonlocal state
        t0 = time.perf_counter()
        for _ in range(n):
            loss = train_step(model, optimizer, batch)
        jax.block_until_ready(loss)
        t1 = time.perf_counter()
        for _ in range(n):
            state, metrics = picodo(state, picodo_batch)
        jax.block_until_ready(metrics)
        return (t1 - t0) / n, (time.perf_counter() - t1) / n, float(loss)
    args.warmup and steps(args.warmup)  # --warmup 0: none (steps(0) has no loss to return)
    matmul_time, matmul_flops = bench.matmul_roofline(mesh, 128 if args.tiny else 2048, jnp.float32)
    rounds = [(matmul_time(), *steps(args.steps)) for _ in range(args.rounds)]  # interleaved: all three see the same load
    matmul_s, ref_s, picodo_s = (statistics.median(r[i] for r in rounds) for i in range(3))
    flops = gpt.flops_per_token(c) * B * T  # per step, the same count for both (biases not counted)
    fraction = lambda step_s, mm_s: flops / step_s / (matmul_flops / mm_s)
    return dict(tokens_per_sec=B * T / ref_s, step_ms=1e3 * ref_s, compile_s=compile_s, model_flops_per_sec=flops / ref_s,
                roofline_flops_per_sec=matmul_flops / matmul_s, roofline_fraction=fraction(ref_s, matmul_s),
                roofline_fraction_rounds=[fraction(r[1], r[0]) for r in rounds],
                picodo_tokens_per_sec=B * T / picodo_s, picodo_step_ms=1e3 * picodo_s, picodo_roofline_fraction=fraction(picodo_s, matmul_s),
                picodo_roofline_fraction_rounds=[fraction(r[2], r[0]) for r in rounds],
                speedup=statistics.median(r[1] / r[2] for r in rounds),  # Picodo's tokens/s over the reference's, round by round
                device_kind=jax.devices()[0].device_kind, n_devices=1, host_cpu=bench.host_cpu(), loss=rounds[-1][3],
                batch_size=B, seq_len=T, d_model=c.d_model, n_layers=c.n_layers,
                n_params=sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


def table(r):
    rows = [('device', f"1 x {r['device_kind']}"), ('host', r['host_cpu']),
            ('model', f"reference NNX GPT, L={r['n_layers']} D={r['d_model']} T={r['seq_len']} B={r['batch_size']} "
                      f"float32, {r['n_params'] / 1e6:.2f}M params"),
            ('tokens/s', f"{r['tokens_per_sec']:,.0f}"), ('step', f"{r['step_ms']:,.1f} ms"),
            ('compile (and one step)', f"{r['compile_s']:.1f} s"), ('model FLOP/s', f"{r['model_flops_per_sec'] / 1e9:,.1f} GFLOP/s"),
            ('matmul FLOP/s', f"{r['roofline_flops_per_sec'] / 1e9:,.1f} GFLOP/s"),
            ('roofline fraction', f"{r['roofline_fraction']:.3f} (rounds {min(r['roofline_fraction_rounds']):.3f}"
                                  f"-{max(r['roofline_fraction_rounds']):.3f})"),
            ('Picodo, same rounds', f"{r['picodo_tokens_per_sec']:,.0f} tokens/s, {r['picodo_step_ms']:,.1f} ms, fraction "
                                    f"{r['picodo_roofline_fraction']:.3f} (rounds {min(r['picodo_roofline_fraction_rounds']):.3f}"
                                    f"-{max(r['picodo_roofline_fraction_rounds']):.3f})"),
            ('Picodo / reference', f"{r['speedup']:.2f}x tokens/s (median of the rounds' ratios)")]
    return '\n'.join(f'{k:<28} {v}' for k, v in rows)


if __name__ == '__main__':
    bench.cli(lambda: bench.main(sys.argv[1:], parse, run, table))
