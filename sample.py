"""Text from a checkpoint: `python sample.py checkpoints/local --prompt 'def main(' --num_samples 3`.

The model's shape comes from the config saved with the checkpoint. Tokens: raw UTF-8 bytes for a byte
vocabulary (256), GPT-2 BPE (tiktoken's `gpt2`) otherwise. Decoding runs on one device with a KV cache:
the prompt fills it in one pass, then each new token costs one position's work.
"""
import argparse, sys
from functools import partial
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from omegaconf import OmegaConf
import train, utils


def tokenizer(vocab_size, encoding='gpt2'):
    """(encode, decode): raw UTF-8 bytes for a byte vocab (invalid sequences replaced), else a tiktoken encoding (GPT-2 BPE)."""
    if vocab_size <= 256:  # a prompt's bytes as typed, invalid UTF-8 too (Python holds those as surrogates)
        return lambda text: list(text.encode(errors='surrogateescape')), lambda ids: bytes(ids).decode(errors='replace')
    import tiktoken  # its vocabulary is downloaded on first use
    try:
        bpe = tiktoken.get_encoding(encoding)
    except Exception as e:  # offline, no cached vocabulary, or no such encoding
        raise utils.PicodoError(f"cannot load tiktoken's {encoding} vocabulary ({type(e).__name__}); it needs the network "
                                'once, or a copy in TIKTOKEN_CACHE_DIR') from None
    # a vocab_size past GPT-2's 50257 (nanoGPT's 50304) lets the model sample ids tiktoken cannot decode: dropped
    return lambda text: bpe.encode(valid_text(text), allowed_special='all'), lambda ids: bpe.decode([i for i in ids if i < bpe.n_vocab])


def valid_text(text):  # BPE needs text: a prompt of invalid UTF-8 bytes (held as surrogates) is an error
    try:
        text.encode()
    except UnicodeEncodeError:
        raise utils.PicodoError(f'the prompt {text!r} is not valid UTF-8') from None
    return text


def sample_token(logits, key, temperature, top_k):  # logits [B, V] -> token ids [B]
    logits = logits.astype(jnp.float32)  # bf16 models give bf16 logits: sample from their fp32 values
    if np.float32(temperature) == 0:  # 0, or a temperature float32 rounds to 0 (1e-300: the argmax's 0 / 0 would be nan)
        return jnp.argmax(logits, -1)
    if top_k:
        logits = jnp.where(logits < jax.lax.top_k(logits, top_k)[0][:, -1:], -jnp.inf, logits)
    return jax.random.categorical(key, (logits - logits.max(-1, keepdims=True)) / temperature)  # <= 0: a tiny temperature gives no inf


@partial(nnx.jit, static_argnames=('n_new', 'temperature', 'top_k'))
def generate(model, prompt, key, n_new, temperature=1.0, top_k=0):
    """prompt [B, P] -> [B, P + n_new], with P + n_new <= seq_len. temperature 0 is greedy; top_k 0 keeps all."""
    B, P = prompt.shape
    if P + n_new > model.seq_len:  # past it, the position table and the cache would be read and written clamped
        raise ValueError(f'a prompt of {P} tokens and {n_new} new ones exceed the model\'s seq_len {model.seq_len}')
    logits, cache = model(prompt, model.init_cache(B, P + n_new))  # the prompt in one pass
    graphdef, weights = nnx.split(model)  # weights ride in the loop carry: NNX modules cannot cross into lax loops
    def step(i, carry):  # one new token: one position through the model, its keys/values added to the cache
        tokens, logits, cache, weights = carry
        token = sample_token(logits[:, -1], jax.random.fold_in(key, i), temperature, top_k)
        logits, cache = nnx.merge(graphdef, weights)(token[:, None], cache, P + i)
        return tokens.at[:, P + i].set(token), logits, cache, weights
    tokens = jnp.pad(prompt, ((0, 0), (0, n_new)))
    return jax.lax.fori_loop(0, n_new, step, (tokens, logits[:, -1:], cache, weights))[0]


def runnable_dtype(dtype, cc):
    """`dtype`, or one XLA's attention compiles in here: on NVIDIA GPUs, bf16 from compute capability 8.0 on."""
    if dtype == 'bfloat16' and cc[:1].isdigit() and float(cc) < 8:
        return 'float16' if float(cc) >= 7 else 'float32'
    return dtype


def load(path, dtype=None):
    """(model, config, step) from a checkpoint dir (its newest complete step) or one step dir; `dtype`: the model's
    compute dtype (default: the checkpoint's, if it runs here; the parameters are fp32 either way)."""
    manager, step = train.find_checkpoint(path)
    try:
        cfg = OmegaConf.create(manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']['config'])
    except Exception as e:
        raise utils.PicodoError(f'cannot read the config saved in {path}: {type(e).__name__}') from None
    if dtype is None:  # an A100's bf16 checkpoint on a T4
        dtype = runnable_dtype(cfg.model.dtype, str(getattr(jax.devices()[0], 'compute_capability', '')))
        dtype != cfg.model.dtype and print(f'note: sampling in {dtype}: {cfg.model.dtype} does not run on {jax.devices()[0].device_kind} '
                                           '(--dtype chooses)', file=sys.stderr)
    cfg.model.dtype, cfg.model.attn_impl = dtype, 'chunked'  # decoding never reads attn_impl: no refusal of fp16 with xla off GPUs
    mesh = jax.make_mesh((1,), ('data',), (jax.sharding.AxisType.Auto,), devices=jax.devices()[:1])
    tx = train.make_optimizer(cfg.opt, train.lr_schedule(cfg.opt, 1))  # restoring needs the optimizer's tree too
    graphdef, state = train.create_state(cfg, mesh, tx)
    state, _ = train.restore(manager, step, cfg, state)
    return nnx.merge(graphdef, state)[0], cfg, step


def sample(model, encode, decode, prompt, max_new_tokens, num_samples=1, temperature=0.8, top_k=0, seed=0):
    """num_samples continuations of `prompt`. Learned positions stop at seq_len: when the window is full,
    the newest half of it refills the cache in one pass and decoding goes on from there."""
    T, ids = model.seq_len, encode(prompt)
    if not ids or T < 2:
        raise utils.PicodoError('empty prompt' if not ids else f'model.seq_len {T} leaves no room for a prompt and a new token')
    if not 0 <= temperature < float('inf'):  # nan too; inf would make every logit nan
        raise utils.PicodoError(f'temperature {temperature}: must be finite and >= 0')
    if max(ids) >= model.vocab_size:  # a non-ASCII byte for a vocab under 256, a BPE id for a small vocab: garbage logits
        raise utils.PicodoError(f'prompt token id {max(ids)} >= model.vocab_size {model.vocab_size}')
    if not 0 <= top_k <= model.vocab_size:
        raise utils.PicodoError(f'top_k {top_k} is not in 0..{model.vocab_size} (the vocabulary size; 0 keeps all)')
    if not -2 ** 63 <= seed < 2 ** 63:
        raise utils.PicodoError(f'seed {seed} is not a 64-bit integer')
    if num_samples < 1 or max_new_tokens < 0:
        raise utils.PicodoError(f'num_samples {num_samples} < 1' if num_samples < 1 else f'max_new_tokens {max_new_tokens} < 0')
    if len(ids) > T - 1:
        print(f'warning: prompt of {len(ids)} tokens cut to its last {T - 1} (model.seq_len {T} leaves room '
              f'for one new token)', file=sys.stderr)
        ids = ids[-(T - 1):]
    tokens, new, key = np.tile(np.array(ids, np.int32), (num_samples, 1)), 0, jax.random.key(seed)
    while new < max_new_tokens:
        context = tokens[:, -(T // 2):] if tokens.shape[1] >= T else tokens
        n = min(max_new_tokens - new, T - context.shape[1])
        out = generate(model, context, jax.random.fold_in(key, new), n, temperature, top_k)
        tokens, new = np.concatenate([tokens, np.asarray(out[:, -n:])], axis=1), new + n
    return [decode(row[len(ids):].tolist()) for row in tokens]


def eval_sample(model, tokens, max_new_tokens, seed):
    """The trainer's optional sample at each eval: a continuation of the first quarter window of `tokens`."""
    P = max(1, model.seq_len // 4)  # at least one token of prompt
    out = generate(model, np.asarray(tokens[None, :P], np.int32), jax.random.key(seed), min(max_new_tokens, model.seq_len - P))
    ids = np.asarray(out[0, P:]).tolist()
    try:
        return tokenizer(model.vocab_size)[1](ids)
    except utils.PicodoError as e:  # a missing vocabulary must not stop training: show the ids
        return f'token ids {ids} ({e})'


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('checkpoint', help='a checkpoint dir (its newest step is used) or one step dir inside it')
    p.add_argument('--prompt', default='\n')
    p.add_argument('--max_new_tokens', type=int, default=200)
    p.add_argument('--temperature', type=float, default=0.8, help='0 = greedy')
    p.add_argument('--top_k', type=int, default=0, help='sample among the k likeliest tokens; 0 = all')
    p.add_argument('--num_samples', type=int, default=1)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--encoding', default='gpt2', help="the tiktoken encoding the data was tokenized with (prepare.py tokenize "
                   "--encoding); a vocab of 256 is bytes")
    p.add_argument('--dtype', choices=train.CHOICES['model.dtype'], help="compute dtype (default: the checkpoint's, if it runs here: "
                   'else float16 on a GPU without bfloat16 matmuls such as a T4, float32 below compute capability 7.0)')
    a = p.parse_args(argv)
    try:
        model, cfg, step = load(a.checkpoint, a.dtype)
        encode, decode = tokenizer(cfg.model.vocab_size, a.encoding)
        texts = sample(model, encode, decode, a.prompt, a.max_new_tokens, a.num_samples, a.temperature, a.top_k, a.seed)
    except utils.PicodoError as e:
        sys.exit(f'error: {e}')
    print(f'# {a.num_samples} sample(s) from step {step} of {a.checkpoint}', file=sys.stderr)
    prompt = decode(encode(a.prompt))  # printable: invalid UTF-8 shown as U+FFFD
    for text in texts:
        print(prompt + text, end='\n---------------\n')


if __name__ == '__main__':
    main()
