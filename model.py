"""GPT decoder in Flax NNX, its loss, its parameter count and its FLOPs per token.

Dims: B batch, T sequence, D model width, H heads, K head width (D/H), V vocab, L layers.
Parameters are fp32; activations, matmuls and logits run in `dtype`; cross_entropy computes the loss in fp32.
Every weight carries an FSDP sharding annotation over the mesh axis 'data'."""
import functools, math
import jax, jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

cp = jax.checkpoint_policies  # 'dots' keeps matmul outputs and attention's: the chunked loop's (named 'attn'), cuDNN's
keep_attention = lambda prim, *_, **kw: prim.name == 'name' and kw['name'] == 'attn' or prim.name.startswith('dot_product_attention_fwd')
REMAT_POLICIES = {'dots': cp.save_from_both_policies(cp.dots_with_no_batch_dims_saveable, keep_attention), 'full': cp.nothing_saveable}


gelu = jax.checkpoint(jax.nn.gelu)  # backward recomputes tanh from the input instead of storing 5 intermediates


def _scores(q, k, i, C, keys_first=False):  # query chunk i [H, C, K] (pre-scaled), keys 0..(i+1)C: causal fp32 [H, C, S] or [H, S, C]
    a, b, mask = q, k[:, :(i + 1) * C], jnp.arange((i + 1) * C) <= i * C + jnp.arange(C)[:, None]
    a, b, mask = (b, a, mask.T) if keys_first else (a, b, mask)
    return jnp.where(mask, jnp.einsum('hak,hbk->hab', a, b, preferred_element_type=jnp.float32), -jnp.inf)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def chunked_attention(q, k, v, C=128):
    """Causal attention over query chunks of C, each skipping the keys after it (about half the T×T work); backward keeps
    the log-sum-exp and recomputes the probabilities. A loop over pairs of sequences keeps its scores in the CPU's cache."""
    return chunked_fwd(q, k, v, C)[0]


def per_sequence(f, *xs):  # f on one sequence ([T, H, K] arrays given as [H, T, K]), 2 per device at a time
    B, n_dev = xs[0].shape[0], max(1, jax.sharding.get_abstract_mesh().size)  # n_dev devices split the batch
    n, n_dev = (B // (2 * n_dev), n_dev) if B % (2 * n_dev) == 0 else (1, 1)  # loop step j: each device's sequences 2j, 2j+1
    one = jax.vmap(lambda *x: f(*(a.swapaxes(0, 1) if a.ndim == 3 else a for a in x)))
    split = lambda x: x.reshape(n_dev, n, -1, *x.shape[1:]).swapaxes(0, 1).reshape(n, B // n, *x.shape[1:])  # a bitcast
    out = jax.lax.map(lambda x: one(*x), [split(x) for x in xs])
    return jax.tree.map(lambda y: y.reshape(n, n_dev, -1, *y.shape[2:]).swapaxes(0, 1).reshape(B, *y.shape[2:]), out)


def chunked_fwd(q, k, v, C):  # [B, T, H, K] each
    assert q.shape[1] % C == 0, f'sequence length {q.shape[1]} is not a multiple of the query chunk {C}'
    def one(q, k, v):
        q, outs, lses = q * (q.shape[-1] ** -0.5), [], []
        for i in range(q.shape[1] // C):
            s = _scores(q[:, i * C:(i + 1) * C], k, i, C)
            m = s.max(-1, keepdims=True)
            p = jnp.exp(s - m)
            l = p.sum(-1, keepdims=True)
            o = jnp.einsum('hqs,hsk->hqk', p.astype(v.dtype), v[:, :(i + 1) * C], preferred_element_type=jnp.float32)
            outs.append((o / l).astype(q.dtype)), lses.append(m + jnp.log(l))
        return jnp.concatenate(outs, 1).swapaxes(0, 1), jnp.concatenate(lses, 1)[..., 0]  # [T, H, K], [H, T]
    o, lse = (checkpoint_name(x, 'attn') for x in per_sequence(one, q, k, v))  # kept under model.remat=dots
    return o, (q, k, v, o, lse)


def chunked_bwd(C, res, do):
    def one(q, k, v, o, lse, do):
        T, K, f32 = q.shape[1], q.shape[-1], jnp.float32
        q, dot = q * K ** -0.5, lambda spec, a, b: jnp.einsum(spec, a, b, preferred_element_type=f32)
        delta = dot('htk,htk->ht', do, o)[:, None]
        dq, dk, dv = [], jnp.zeros(k.shape, f32), jnp.zeros(v.shape, f32)
        for i in range(T // C):  # probabilities and their gradient keys first, [H, S, C]: dV and dK are then plain (NN) matmuls
            rows, n, pad = slice(i * C, (i + 1) * C), (i + 1) * C, ((0, 0), (0, T - (i + 1) * C), (0, 0))
            p = jnp.exp(_scores(q[:, rows], k, i, C, keys_first=True) - lse[:, None, rows])
            ds = (p * (dot('hsk,hqk->hsq', v[:, :n], do[:, rows]) - delta[..., rows])).astype(q.dtype)
            dv += jnp.pad(dot('hsq,hqk->hsk', p.astype(do.dtype), do[:, rows]), pad)
            dk += jnp.pad(dot('hsq,hqk->hsk', ds, q[:, rows]), pad)
            dq.append(dot('hqs,hsk->hqk', jax.lax.optimization_barrier(ds.swapaxes(1, 2)), k[:, :n]) * K ** -0.5)  # copied: NN beats TN
        return tuple(x.swapaxes(0, 1).astype(q.dtype) for x in (jnp.concatenate(dq, 1), dk, dv))
    return per_sequence(one, *res, do)


chunked_attention.defvjp(chunked_fwd, chunked_bwd)


init = lambda std, sharding: nnx.with_partitioning(nnx.initializers.normal(std), sharding)


layer_norm = lambda c, rngs: nnx.LayerNorm(c.d_model, epsilon=1e-5, dtype=c.dtype, rngs=rngs, scale_init=nnx.with_partitioning(
    nnx.initializers.ones, ('data',)), bias_init=nnx.with_partitioning(nnx.initializers.zeros, ('data',)))


padded_vocab = lambda vocab_size: -(-vocab_size // 128) * 128  # round up: matmuls and softmax run faster on multiples of 128


class Block(nnx.Module):
    def __init__(self, c, rngs):
        D, std, proj_std = c.d_model, 0.02, 0.02 / math.sqrt(2 * c.n_layers)  # GPT-2: residual projections shrink with depth
        dense = lambda n_in, n_out, s: nnx.Linear(n_in, n_out, use_bias=False, dtype=c.dtype, rngs=rngs, kernel_init=init(s, ('data', None)))
        self.ln1, self.ln2 = layer_norm(c, rngs), layer_norm(c, rngs)
        self.qkv, self.attn_out = dense(D, 3 * D, std), dense(D, D, proj_std)
        self.mlp_in, self.mlp_out = dense(D, 4 * D, std), dense(4 * D, D, proj_std)
        self.n_heads, self.attn_impl = c.n_heads, c.attn_impl

    def __call__(self, x, cache=None, pos=0):  # x [B, T, D] -> (x, cache); cache: this layer's (keys, values) [B, C, H, K] when decoding
        # the block works on tokens flattened to [B·T, D]: on [B, T, D] a weight gradient xᵀg contracts 2 dims, which
        # XLA CPU canonicalizes with a transposed copy of g; on [B·T, D] it reads g in place
        B, T, D = x.shape
        x = x.reshape(B * T, D)
        # [B·T, ...] split over 'data': XLA then gathers the weights (FSDP) instead of splitting heads
        x = x if jax.sharding.get_abstract_mesh().empty else jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec('data'))
        # q, k, v from thirds of the packed qkv weight, no split copies (one nnx.Linear: one kernel in parameters and checkpoints)
        h, w = self.ln1(x), self.qkv.kernel[...].astype(x.dtype)
        q, k, v = ((h @ w[:, i * D:(i + 1) * D]).reshape(B, T, self.n_heads, -1) for i in range(3))  # [B, T, H, K]
        if cache is None:
            y = (chunked_attention(q, k, v, 128 if T % 128 == 0 else T) if self.attn_impl == 'chunked' else
                 jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=self.attn_impl))
        else:  # write this chunk's keys/values at positions pos.., attend to everything up to each query
            cache = tuple(jax.lax.dynamic_update_slice_in_dim(c, new, pos, axis=1) for c, new in zip(cache, (k, v)))
            visible = jnp.arange(cache[0].shape[1]) <= pos + jnp.arange(T)[:, None]  # [T, C]
            # fp16 in fp32: XLA has no fp16 algorithm for these dots (INVALID_ARGUMENT on GPUs for one query, none on CPUs)
            y = jax.nn.dot_product_attention(*(a.astype(jnp.float32) if a.dtype == jnp.float16 else a for a in (q, *cache)), mask=visible).astype(q.dtype)
        x = x + self.attn_out(y.reshape(B * T, D))
        x = (x + self.mlp_out(gelu(self.mlp_in(self.ln2(x))))).reshape(B, T, D)
        return x, cache


class GPT(nnx.Module):
    def __init__(self, c, rngs):
        D, L = c.d_model, c.n_layers
        self.vocab_size, self.scan, self.remat, self.seq_len, self.cache_shape = c.vocab_size, c.scan, c.remat, c.seq_len, (L, c.n_heads, D // c.n_heads)
        self.token_embed = nnx.Embed(padded_vocab(c.vocab_size), D, dtype=c.dtype, rngs=rngs, embedding_init=init(0.02, ('data', None)))
        self.pos_embed = nnx.Embed(c.seq_len, D, dtype=c.dtype, rngs=rngs, embedding_init=init(0.01, (None, 'data')))
        # with model.scan, one stacked Block with a leading [L] axis, so compile time is flat in depth
        self.blocks = (nnx.vmap(lambda r: Block(c, r), transform_metadata={nnx.PARTITION_NAME: None})(rngs.split(L)) if c.scan
                       else nnx.List([Block(c, rngs) for _ in range(L)]))
        self.ln_f = layer_norm(c, rngs)

    def init_cache(self, batch_size, length):  # (keys, values), each [L, B, C, H, K]
        L, H, K = self.cache_shape
        return tuple(jnp.zeros((L, batch_size, length, H, K), self.token_embed.dtype) for _ in 'kv')

    def __call__(self, tokens, cache=None, pos=0):  # [B, T] int -> logits [B, T, V_padded] in the model's dtype
        """With a cache (init_cache), tokens sit at positions pos.. and the updated cache is returned too."""
        positions = jax.lax.dynamic_slice_in_dim(self.pos_embed.embedding[...], pos, tokens.shape[1])
        # gathered in fp32, then cast: the gradient's scatter-add is then fp32 atomics; in bf16 (CAS loops) repeated ids of
        # real text made an H100 step 54% slower (95.5 against 62 ms on byte text; random ids hid it)
        x = (jnp.take(self.token_embed.embedding[...], tokens, axis=0) + positions).astype(self.token_embed.dtype)
        # remat only without a cache: decoding has no backward pass
        block_fn = Block.__call__ if self.remat == 'none' or cache is not None else nnx.remat(Block.__call__, policy=REMAT_POLICIES[self.remat])
        if self.scan:  # without a cache (training), each layer's is None
            x, cache = nnx.scan(lambda x, block, kv: block_fn(block, x, kv, pos), in_axes=(nnx.Carry, 0, 0), out_axes=(nnx.Carry, 0))(x, self.blocks, cache)
        else:  # layer by layer, each reading and updating its slice of the cache, if any
            for i, block in enumerate(self.blocks):
                x, kv = block_fn(block, x, cache and (cache[0][i], cache[1][i]), pos)
                cache = cache and tuple(c.at[i].set(new) for c, new in zip(cache, kv))
        x = self.ln_f(x)
        # weight tying: the head is the token embedding. Logits in x's dtype (bf16: 2 bytes each, 3.3 GB for GPT-2 small
        # at B=32, written once and read twice), so the backward's matmuls run on x's dtype too
        logits = jnp.einsum('btd,vd->btv', x, self.token_embed.embedding[...].astype(x.dtype))
        logits = jnp.where(jnp.arange(logits.shape[-1]) < self.vocab_size, logits, -jnp.inf)  # never predict padding
        return logits if cache is None else (logits, cache)


def _ce_fwd(logits, labels):  # [..., V] in any dtype, integer [...]: the mean over tokens, in fp32
    lse = jax.nn.logsumexp(logits.astype(jnp.float32), -1)
    return (lse - jnp.take_along_axis(logits, labels[..., None], -1)[..., 0]).mean(), (logits, labels, lse)


def _ce_bwd(res, g):  # softmax minus one-hot in one pass over the logits, written in their dtype (JAX differentiating log_softmax: 3)
    logits, labels, lse = res
    d = jnp.exp(logits.astype(jnp.float32) - lse[..., None]) - (labels[..., None] == jnp.arange(logits.shape[-1]))
    return (d * (g / labels.size)).astype(logits.dtype), None


cross_entropy = jax.custom_vjp(lambda logits, labels: _ce_fwd(logits, labels)[0])  # an H200 step 4.4% faster than optax's
cross_entropy.defvjp(_ce_fwd, _ce_bwd)


# training FLOPs per token (PaLM appendix B): 6N + 12·L·D·T, N the matmul weights: tied embedding (unpadded) + 12·D²/block
flops_per_token = lambda c: 6 * (c.vocab_size * c.d_model + 12 * c.n_layers * c.d_model ** 2) + 12 * c.n_layers * c.d_model * c.seq_len
