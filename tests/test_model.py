import math, re
from types import SimpleNamespace
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
import model as gpt


@pytest.fixture(autouse=True)
def one_device_mesh():  # weights carry FSDP annotations, so they are created under a mesh
    with jax.set_mesh(jax.make_mesh((1,), ('data',), (jax.sharding.AxisType.Auto,), devices=jax.devices()[:1])):
        yield


def config(**kw):
    c = dict(vocab_size=300, seq_len=16, d_model=64, n_layers=3, n_heads=4, dtype=jnp.float32,
             scan=True, remat='none', attn_impl='xla')
    return SimpleNamespace(**(c | kw))


def tokens(B=2, T=16, V=300, seed=0):
    return jax.random.randint(jax.random.key(seed), (B, T), 0, V)


@pytest.mark.parametrize('scan', [True, False])
def test_shapes(scan):
    c = config(scan=scan)
    logits = gpt.GPT(c, nnx.Rngs(0))(tokens())
    assert logits.shape == (2, 16, gpt.padded_vocab(300)) == (2, 16, 384)
    assert logits.dtype == jnp.float32


def test_bf16_activations_keep_fp32_params_and_loss():
    model = gpt.GPT(config(dtype=jnp.bfloat16), nnx.Rngs(0))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    logits = model(tokens())
    assert logits.dtype == jnp.bfloat16 and gpt.cross_entropy(logits, tokens()).dtype == jnp.float32


@pytest.mark.parametrize('scan', [True, False])
def test_bf16_blocks_take_and_return_bf16_activations(monkeypatch, scan):
    """The token row and its position are summed in fp32 and rounded once to the model's dtype before the first block:
    left in fp32, the whole residual stream would stay fp32 (bf16 + fp32 is fp32), doubling the activations it keeps."""
    seen, inputs, call = [], [], gpt.Block.__call__
    def spy(self, x, *args, **kwargs):
        out = call(self, x, *args, **kwargs)
        seen.append((x.dtype, (out[0] if isinstance(out, tuple) else out).dtype)), inputs.append(x)
        return out
    monkeypatch.setattr(gpt.Block, '__call__', spy)
    model = gpt.GPT(config(dtype=jnp.bfloat16, scan=scan), nnx.Rngs(0))
    model(tokens())
    model(tokens(T=4), model.init_cache(2, 16), 3)  # sampling's path too: a chunk at positions 3..6 with a KV cache
    assert seen == [(jnp.bfloat16, jnp.bfloat16)] * (2 if scan else 6), seen
    if not scan:  # the loop runs eagerly: the first block's input is concrete
        E, P = np.asarray(model.token_embed.embedding[...]), np.asarray(model.pos_embed.embedding[...])
        np.testing.assert_array_equal(np.asarray(inputs[0], np.float32), np.asarray((E[tokens()] + P[:16]).astype(jnp.bfloat16), np.float32))


def reference_cross_entropy(logits, labels):  # the textbook formula, in fp32, through JAX's own gradient rules
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    return -jnp.take_along_axis(logp, labels[..., None], -1).mean()


@pytest.mark.parametrize('dtype,V', [(jnp.float32, 300), (jnp.bfloat16, 300), (jnp.float32, 256)])
def test_cross_entropy_matches_the_textbook_formula_and_its_gradient(dtype, V):
    """model.cross_entropy's own backward (softmax minus one-hot, in one pass) against JAX differentiating log_softmax;
    the padded vocab (-inf logits) gets zero gradient, and the gradient comes back in the logits' dtype. V=256 has no
    padding: every column, the last one too, is a real logit."""
    k1, k2 = jax.random.split(jax.random.key(1))
    Vp = gpt.padded_vocab(V)
    logits = jnp.where(jnp.arange(Vp) < V, 4 * jax.random.normal(k1, (3, 16, Vp)), -jnp.inf).astype(dtype)
    labels = jax.random.randint(k2, (3, 16), 0, V)
    (loss, grad), (ref, ref_grad) = (jax.value_and_grad(f)(logits, labels) for f in (gpt.cross_entropy, reference_cross_entropy))
    assert loss.dtype == jnp.float32 and grad.dtype == dtype
    np.testing.assert_allclose(loss, ref, rtol=1e-6)
    tol = 1e-7 if dtype == jnp.float32 else 2 ** -9 * float(jnp.abs(ref_grad).max())  # bf16: the gradient's rounding
    np.testing.assert_allclose(grad.astype(jnp.float32), ref_grad.astype(jnp.float32), atol=tol)
    assert jnp.all(grad[..., V:] == 0) and jnp.all(jnp.isfinite(grad))
    grad_sum = 5 * jax.grad(lambda l: 5 * gpt.cross_entropy(l, labels))(logits.astype(jnp.float32))  # scales with the cotangent
    np.testing.assert_allclose(grad_sum, 25 * jax.grad(reference_cross_entropy)(logits.astype(jnp.float32), labels), rtol=1e-5, atol=1e-8)


def test_padded_vocab_is_never_predicted():
    logits = gpt.GPT(config(), nnx.Rngs(0))(tokens())
    assert jnp.all(logits[..., 300:] == -jnp.inf) and jnp.all(jnp.isfinite(logits[..., :300]))


@pytest.mark.parametrize('scan,attn_impl', [(True, 'xla'), (False, 'xla'), (True, 'chunked')])
def test_causal(scan, attn_impl):
    """Changing token t+1 leaves the logits at positions <= t unchanged."""
    model = gpt.GPT(config(scan=scan, attn_impl=attn_impl), nnx.Rngs(0))
    x = tokens()
    for t in [0, 7, 14]:
        y = x.at[:, t + 1].set((x[:, t + 1] + 1) % 300)
        a, b = model(x), model(y)
        np.testing.assert_array_equal(a[:, :t + 1], b[:, :t + 1])
        assert not np.allclose(a[:, t + 1:], b[:, t + 1:])


def n_params(model):
    return sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_param_count_matches_formula():
    c = config()
    V, T, D, L = gpt.padded_vocab(c.vocab_size), c.seq_len, c.d_model, c.n_layers
    per_block = 3 * D * D + D * D + 4 * D * D + 4 * D * D + 2 * 2 * D  # qkv, out, mlp in/out, 2 LayerNorms
    expected = V * D + T * D + L * per_block + 2 * D
    assert n_params(gpt.GPT(c, nnx.Rngs(0))) == expected


def test_gpt2_small_param_count():
    c = config(vocab_size=50257, seq_len=1024, d_model=768, n_layers=12, n_heads=12)
    n = n_params(nnx.eval_shape(lambda: gpt.GPT(c, nnx.Rngs(0))))
    assert 124e6 < n < 125e6, n


def test_flops_formula_by_hand():
    # L=2, D=8, T=4, V=10. Forward matmul FLOPs per token = 2 x (weights touched):
    # per block qkv 8*24 + out 8*8 + mlp 8*32 + 32*8 = 768 weights; head 10*8 = 80 weights;
    # attention scores and weighted sum: 2 * T * D per layer per token in multiply-adds.
    c = config(vocab_size=10, seq_len=4, d_model=8, n_layers=2, n_heads=2)
    weights = 2 * 768 + 80
    attention_macs = 2 * (2 * 4 * 8)  # layers * (QK^T + AV) * T * D
    forward = 2 * weights + 2 * attention_macs
    assert gpt.flops_per_token(c) == 3 * forward  # backward = 2x forward


def test_scan_and_loop_models_agree():
    c = config()
    scanned = gpt.GPT(c, nnx.Rngs(0))
    looped = gpt.GPT(config(scan=False), nnx.Rngs(1))
    # copy the stacked [L, ...] weights of the scanned model into the per-layer blocks
    stacked = nnx.state(scanned.blocks)
    for i, block in enumerate(looped.blocks):
        nnx.update(block, jax.tree.map(lambda x: x[i], stacked))
    for name in ['token_embed', 'pos_embed', 'ln_f']:
        nnx.update(getattr(looped, name), nnx.state(getattr(scanned, name)))
    x = tokens()
    np.testing.assert_allclose(scanned(x), looped(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('remat,attn_impl', [('dots', 'xla'), ('full', 'xla'), ('dots', 'chunked')])
def test_remat_gives_same_gradients(remat, attn_impl):
    x = tokens()
    def grads(model):
        loss = lambda m: m(x)[..., :300].mean()
        return nnx.grad(loss)(model)
    ref = grads(gpt.GPT(config(), nnx.Rngs(0)))
    got = grads(gpt.GPT(config(remat=remat, attn_impl=attn_impl), nnx.Rngs(0)))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), ref, got)


@pytest.mark.parametrize('scan', [True, False])
def test_every_parameter_gets_a_gradient(scan):
    """Each weight, of each layer, moves the loss: a block that used ln1 twice (ln2 left out) fails here."""
    x = tokens(T=17)
    grads = nnx.grad(lambda m: gpt.cross_entropy(m(x[:, :-1]), x[:, 1:]))(gpt.GPT(config(scan=scan), nnx.Rngs(0)))
    for path, g in jax.tree_util.tree_leaves_with_path(nnx.state(grads, nnx.Param)):
        per_layer = np.abs(np.asarray(g)).reshape(3 if scan and 'blocks' in jax.tree_util.keystr(path) else 1, -1).max(1)
        assert (per_layer > 0).all(), jax.tree_util.keystr(path)


def operand_types(hlo):  # each matmul's two operand types in lowered StableHLO text: [('tensor<2x5x16xbf16>', ...), ...]
    return re.findall(r'stablehlo.dot_general [^:]*: \((tensor<[^>]*>), (tensor<[^>]*>)\)', hlo)


def test_bf16_training_step_runs_every_matmul_on_bf16_operands():
    """The output head's backward too: its logits are bf16, so is their cotangent (with fp32 logits JAX's rule would
    upcast both operands of the head's backward matmuls: 2/3 of the head's FLOPs, 18% of GPT-2 small's)."""
    model = gpt.GPT(config(dtype=jnp.bfloat16, attn_impl='chunked', scan=False), nnx.Rngs(0))
    loss = lambda m, x: gpt.cross_entropy(m(x[:, :-1]), x[:, 1:])
    hlo = jax.jit(nnx.grad(loss)).lower(model, tokens(T=17)).as_text()
    dots = operand_types(hlo)
    assert len(dots) > 20 and all(a.endswith('xbf16>') and b.endswith('xbf16>') for a, b in dots), dots


@pytest.mark.parametrize('scan,remat', [(False, 'none'), (True, 'dots')])
def test_bf16_step_scatters_the_embedding_gradient_in_fp32(scan, remat):
    """The token embedding's gradient is a scatter-add over the batch's ids. In bf16 a GPU runs it as compare-and-swap
    loops, which repeated ids serialize: on an H100, GPT-2 small's step took 95.5 ms on byte text against 62 ms on
    uniform random ids (which bench.py fed then); gathered from the fp32 table, the scatter is fp32 and took 62 ms on both.
    It is the step's only scatter, with or without the layer scan and remat."""
    model = gpt.GPT(config(dtype=jnp.bfloat16, attn_impl='chunked', scan=scan, remat=remat), nnx.Rngs(0))
    hlo = jax.jit(nnx.grad(lambda m, x: gpt.cross_entropy(m(x[:, :-1]), x[:, 1:]))).lower(model, tokens(T=17)).as_text()
    types = re.findall(r'"stablehlo.scatter".*?\}\) : \([^)]*\) -> (tensor<[^>]*>)', hlo, re.S)  # past the add's region
    assert types == ['tensor<384x64xf32>'] * hlo.count('"stablehlo.scatter"') != [], types


@pytest.mark.parametrize('attn_impl,T', [('xla', 16), ('chunked', 16), ('chunked', 256)])
def test_q_k_v_are_three_matmuls_on_thirds_of_the_packed_weight(attn_impl, T):
    """Not slices of one [B·T, 3D] matmul output, whose split copies q, k, v apart and whose backward concatenates their
    gradients: on this CPU the benchmark step ran 3-4% faster without them. (This is the program JAX hands XLA; on GPUs,
    XLA's dot merger may join the matmuls again.) Nothing [..., 3D]- or [..., 3H, K]-shaped is sliced or concatenated
    but the (small) qkv weight itself."""
    model = gpt.GPT(config(dtype=jnp.bfloat16, attn_impl=attn_impl, seq_len=T), nnx.Rngs(0))
    hlo = jax.jit(nnx.grad(lambda m, x: gpt.cross_entropy(m(x[:, :-1]), x[:, 1:]))).lower(model, tokens(T=T + 1)).as_text()
    types = re.findall(r'stablehlo.slice .*?: \((tensor<[^>]*>)\)', hlo) + re.findall(r'stablehlo.concatenate .*?-> (tensor<[^>]*>)', hlo)
    assert 'tensor<64x192xbf16>' in types and not [t for t in types if t != 'tensor<64x192xbf16>' and ('x192x' in t or 'x12x16x' in t)], types


@pytest.mark.parametrize('remat,scan', [('none', True), ('dots', True), ('none', False), ('dots', False)])
def test_bf16_step_lowers_for_gpus_with_cudnn_flash_attention(monkeypatch, remat, scan):
    """No GPU here: lower the bf16 training step for CUDA instead, so the cuDNN path's shapes, layout and dtypes
    are checked before a first GPU run (JAX asks the installed cuDNN and GPU for versions while lowering: stubbed).
    With remat 'dots', the backward reuses the saved attention instead of running its forward kernel again.
    Unrolled (the GPU default since the H200 runs), one kernel each way per layer."""
    fa = pytest.importorskip('jax._src.cudnn.fused_attention_stablehlo')
    for name, stub in [('check_cudnn_version', lambda: 91000), ('check_compute_capability', lambda c: True),
                       ('is_cuda_compute_capability_equal', lambda c: False)]:
        if not hasattr(fa, name):
            pytest.skip(f'JAX internals changed: no {name}')
        monkeypatch.setattr(fa, name, stub)
    model = gpt.GPT(config(dtype=jnp.bfloat16, attn_impl='cudnn', seq_len=32, remat=remat, scan=scan), nnx.Rngs(0))
    loss = lambda m, x: m(x[:, :-1]).mean()
    hlo = jax.jit(nnx.grad(loss)).trace(model, tokens(T=33)).lower(lowering_platforms=('cuda',)).as_text()
    L = 1 if scan else 3  # the scan's body holds one layer
    assert re.findall(r'custom_call @__cudnn\$(\w+)', hlo) == ['fmhaSoftmax'] * L + ['fmhaSoftmaxBackward'] * L
    dots = operand_types(hlo)
    assert len(dots) > 10 and all(a.endswith('xbf16>') and b.endswith('xbf16>') for a, b in dots), dots


@pytest.mark.parametrize('B,T,C,dtype,D', [(6, 32, 8, jnp.float32, 1), (3, 32, 32, jnp.float32, 1), (4, 16, 4, jnp.bfloat16, 1),
                                           (12, 32, 8, jnp.float32, 2)])
def test_chunked_attention_equals_xla(B, T, C, dtype, D):
    """Values and gradients of the CPU attention (query chunks, hand-written backward, a loop over pairs of
    sequences) match XLA's causal attention; on D=2 devices, each device's sequences in 3 loop steps, put back in order."""
    with jax.set_mesh(jax.make_mesh((D,), ('data',), (jax.sharding.AxisType.Auto,), devices=jax.devices()[:D])):
        q, k, v, r = (jax.random.normal(key, (B, T, 3, 16), dtype) for key in jax.random.split(jax.random.key(0), 4))
        loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32) * r)
        xla = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation='xla')
        got = jax.value_and_grad(loss(lambda q, k, v: gpt.chunked_attention(q, k, v, C)), argnums=(0, 1, 2))(q, k, v)
        want = jax.value_and_grad(loss(xla), argnums=(0, 1, 2))(q, k, v)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == jnp.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    assert all(x.dtype == dtype for x in got[1])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.float32(a), np.float32(b), **tol), got, want)


def reference_gpt(params, tokens, n_heads, vocab_size):
    """GPT-2's forward in float64 numpy, written out from the architecture: pre-LN blocks (causal attention over heads
    cut from the packed q|k|v weight, GELU MLP), residuals around both, a final LayerNorm, the token table as the head."""
    P = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    ln = lambda x, p: (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * p['scale'] + p['bias']
    gelu = lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))
    B, T = tokens.shape
    x = P['token_embed']['embedding'][tokens] + P['pos_embed']['embedding'][:T]
    for blk in P['blocks'].values():
        D = x.shape[-1]
        q, k, v = np.split(ln(x, blk['ln1']) @ blk['qkv']['kernel'], 3, -1)
        q, k, v = (a.reshape(B, T, n_heads, -1).transpose(0, 2, 1, 3) for a in (q, k, v))  # [B, H, T, K]
        s = np.where(np.tril(np.ones((T, T), bool)), q @ k.transpose(0, 1, 3, 2) / np.sqrt(D // n_heads), -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        y = ((p / p.sum(-1, keepdims=True)) @ v).transpose(0, 2, 1, 3).reshape(B, T, D)
        x = x + y @ blk['attn_out']['kernel']
        x = x + gelu(ln(x, blk['ln2']) @ blk['mlp_in']['kernel']) @ blk['mlp_out']['kernel']
    logits = ln(x, P['ln_f']) @ P['token_embed']['embedding'].T
    return np.where(np.arange(logits.shape[-1]) < vocab_size, logits, -np.inf)


@pytest.mark.parametrize('attn_impl', ['xla', 'chunked'])
def test_logits_match_a_numpy_gpt2(attn_impl):
    """The whole forward against a float64 numpy GPT-2 on random weights (LayerNorm scales and biases too): which third
    of the packed weight is q, k or v, the residuals, the LayerNorms (eps 1e-5, GPT-2's), tanh-GELU, the 1/sqrt(K) scale, the
    positions and the tied head; a model with q and k swapped trains as well, but reads no checkpoint of this one."""
    model = gpt.GPT(config(scan=False, attn_impl=attn_impl, n_layers=2), nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    keys = iter(jax.random.split(jax.random.key(1), 100))
    nnx.update(model, jax.tree.map(lambda x: x + 0.3 * jax.random.normal(next(keys), x.shape), params))
    x = tokens()
    want = reference_gpt(nnx.to_pure_dict(nnx.state(model, nnx.Param)), np.asarray(x), 4, 300)
    np.testing.assert_allclose(np.asarray(model(x), np.float64), want, rtol=1e-4, atol=1e-4)


def test_weights_start_at_gpt2s_init():
    """Normal weights, std 0.02 (the residual projections attn_out and mlp_out 0.02/sqrt(2L)), the position table 0.01;
    LayerNorms scale 1, bias 0."""
    L = 3
    model = gpt.GPT(config(seq_len=64, n_layers=L, scan=False), nnx.Rngs(0))
    for path, x in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param)):
        name, x = jax.tree_util.keystr(path), np.asarray(x)
        if 'ln' in name:
            np.testing.assert_array_equal(x, np.ones_like(x) if 'scale' in name else np.zeros_like(x), err_msg=name)
            continue
        std = 0.01 if 'pos_embed' in name else 0.02 / math.sqrt(2 * L) if ('attn_out' in name or 'mlp_out' in name) else 0.02
        assert abs(x.mean()) < 0.1 * std and abs(x.std() / std - 1) < 0.05, (name, x.std(), std)
