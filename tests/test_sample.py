"""Generation: the KV cache changes nothing but the cost; sampling is reproducible; sample.py end to end."""
import os, sys, types
from types import SimpleNamespace
from omegaconf import OmegaConf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
import model as gpt, sample


@pytest.fixture
def one_device_mesh():
    with jax.set_mesh(jax.make_mesh((1,), ('data',), (jax.sharding.AxisType.Auto,), devices=jax.devices()[:1])):
        yield


def random_model(scan=True):
    c = SimpleNamespace(vocab_size=300, seq_len=24, d_model=64, n_layers=2, n_heads=4, dtype=jnp.float32,
                        scan=scan, remat='none', attn_impl='xla')
    model = gpt.GPT(c, nnx.Rngs(0))
    for layer in [model.blocks] if scan else model.blocks:  # bigger weights than at init: greedy decoding varies
        for linear in [layer.qkv, layer.attn_out, layer.mlp_in, layer.mlp_out]:
            linear.kernel[...] = linear.kernel[...] * 10
    return model


@pytest.mark.parametrize('scan', [True, False])
def test_greedy_with_cache_equals_full_recomputation(one_device_mesh, scan):
    model = random_model(scan)
    prompt = jax.random.randint(jax.random.key(1), (3, 5), 0, 300)
    cached = sample.generate(model, prompt, jax.random.key(0), n_new=19, temperature=0)
    forward = nnx.jit(lambda model, tokens: model(tokens))
    tokens = jnp.pad(prompt, ((0, 0), (0, 19)))  # causal: the padding never reaches the positions read
    for t in range(5, 24):  # the whole sequence through the model again for every new token
        tokens = tokens.at[:, t].set(jnp.argmax(forward(model, tokens)[:, t - 1], -1))
    np.testing.assert_array_equal(cached, tokens)
    assert min(len(np.unique(row)) for row in tokens[:, 5:]) > 1


def test_sampling_is_reproducible_with_a_seed(one_device_mesh):
    model, prompt = random_model(), jnp.zeros((2, 3), jnp.int32)
    draw = lambda seed, **kw: sample.generate(model, prompt, jax.random.key(seed), n_new=16, **kw)
    np.testing.assert_array_equal(draw(7), draw(7))
    assert not np.array_equal(draw(7), draw(8))
    top_2 = draw(7, top_k=2)
    best_2 = jnp.argsort(model(top_2)[:, 2:-1], -1)[..., -2:]  # [B, 16, 2]: the two likeliest next tokens
    assert (top_2[:, 3:, None] == best_2).any(-1).all()


def test_byte_tokenizer_replaces_invalid_utf8():
    encode, decode = sample.tokenizer(256)
    assert encode('é!') == [0xc3, 0xa9, 0x21] and decode(encode('é!')) == 'é!'
    assert decode([0x61, 0xff, 0x62]) == 'a\ufffdb'
    # a prompt typed in Latin-1 (`--prompt $'caf\\xe9'`): Python holds the byte as a surrogate; a byte model gets the byte
    assert encode(os.fsdecode(b'caf\xe9')) == [0x63, 0x61, 0x66, 0xe9]


def test_larger_vocabularies_use_tiktoken_gpt2(monkeypatch):
    """No network in tests: a stand-in for tiktoken's gpt2 encoding (its vocabulary is a download). Ids past its
    vocabulary (a model.vocab_size of 50304 has 47 of them; tiktoken raises KeyError on them) are left out."""
    asked = []
    def decode(ids):
        assert max(ids) < 10, f'Invalid token for decoding: {max(ids)}'
        return f'<{ids}>'
    fake = SimpleNamespace(get_encoding=lambda name: asked.append(name) or SimpleNamespace(
        encode=lambda text, allowed_special: [len(text)], decode=decode, n_vocab=10))
    monkeypatch.setitem(sys.modules, 'tiktoken', fake)
    encode, decode = sample.tokenizer(50304)
    assert asked == ['gpt2'] and encode('abc') == [3] and decode([5, 10, 12, 9]) == '<[5, 9]>'
    with pytest.raises(sample.utils.PicodoError, match=r"^the prompt 'caf\\udce9' is not valid UTF-8$"):  # BPE encodes text
        encode(os.fsdecode(b'caf\xe9'))
    sample.tokenizer(50304, 'p50k_base')  # data tokenized with prepare.py tokenize --encoding p50k_base: sample.py --encoding
    assert asked == ['gpt2', 'p50k_base']


def test_missing_gpt2_vocabulary_is_one_clear_error_and_does_not_stop_training(monkeypatch, one_device_mesh):
    def offline(name):
        raise ConnectionError('no network')
    monkeypatch.setitem(sys.modules, 'tiktoken', SimpleNamespace(get_encoding=offline))
    with pytest.raises(sample.utils.PicodoError, match="cannot load tiktoken's gpt2 vocabulary"):
        sample.tokenizer(50257)
    with pytest.raises(sample.utils.PicodoError, match="cannot load tiktoken's p50k_base vocabulary"):
        sample.tokenizer(50257, 'p50k_base')  # sample.py --encoding p50k_base: the one it could not load
    text = sample.eval_sample(random_model(), np.arange(24) % 300, 4, 0)  # what the trainer prints at an eval
    assert text.startswith('token ids [') and 'gpt2 vocabulary' in text


def test_sample_py_decodes_with_gpt2_unless_told_otherwise(monkeypatch, capsys):
    asked = []
    monkeypatch.setattr(sample, 'load', lambda checkpoint, dtype: (None, OmegaConf.create({'model': {'vocab_size': 50304}}), 7))
    monkeypatch.setattr(sample, 'tokenizer', lambda *args: asked.append(args) or (list, ''.join))  # (encode, decode) of characters
    monkeypatch.setattr(sample, 'sample', lambda *args: ['x'])
    sample.main(['ck'])
    assert asked == [(50304, 'gpt2')] and capsys.readouterr().out == '\nx\n---------------\n'


def test_long_prompt_is_cut_with_a_warning_and_generation_runs_past_the_window(one_device_mesh, capsys):
    model = random_model()  # seq_len 24
    encode, decode = sample.tokenizer(256)
    texts = sample.sample(model, encode, lambda ids: ids, 'x' * 40, 50, num_samples=2, seed=3)
    assert 'prompt of 40 tokens cut to its last 23' in capsys.readouterr().err
    assert [len(t) for t in texts] == [50, 50] and texts[0] != texts[1]
    assert texts == sample.sample(model, encode, lambda ids: ids, 'x' * 40, 50, num_samples=2, seed=3)


@pytest.mark.parametrize('T', [1, 2, 3])
def test_tiny_windows_sample_or_say_why_not(one_device_mesh, T):
    """seq_len under 4 once gave the eval sample an empty prompt (an IndexError that stopped training); seq_len 1
    leaves no room for a prompt and a new token."""
    c = SimpleNamespace(vocab_size=256, seq_len=T, d_model=32, n_layers=1, n_heads=2, dtype=jnp.float32, scan=False,
                        remat='none', attn_impl='chunked')
    model = gpt.GPT(c, nnx.Rngs(0))
    assert len(sample.eval_sample(model, np.arange(10, dtype=np.uint16), 4, 0)) <= T - 1
    if T == 1:
        with pytest.raises(sample.utils.PicodoError, match='^model.seq_len 1 leaves no room for a prompt and a new token$'):
            sample.sample(model, *sample.tokenizer(256), 'ab', 4)
    else:
        assert len(sample.sample(model, *sample.tokenizer(256), 'ab', 4)[0]) > 0

def test_sample_py_from_a_trained_checkpoint(finished_run, capsys, monkeypatch):
    ckpt, tokenizer, asked = finished_run[2], sample.tokenizer, []
    monkeypatch.setattr(sample, 'tokenizer', lambda *args: asked.append(args) or tokenizer(*args))
    sample.main([ckpt, '--prompt', 'def ', '--max_new_tokens', '20', '--num_samples', '2', '--top_k', '20', '--encoding', 'p50k_base'])
    out, err = capsys.readouterr()
    assert out.startswith('def ') and out.count('\n---------------\n') == 2 and 'from step 20 of' in err
    assert asked == [(256, 'p50k_base')]  # the checkpoint's vocab (bytes: the encoding goes unused) and --encoding
    with pytest.raises(SystemExit, match='error: checkpoint not found: .*nope'):
        sample.main([ckpt + '/nope'])
    for args, message in [(['--top_k', '100000'], 'top_k 100000 is not in 0..256'), (['--top_k', '-3'], 'top_k -3 is not in'),
                          (['--temperature', '-1'], 'temperature -1.0: must be finite and >= 0'),
                          (['--temperature', 'nan'], 'temperature nan: must be finite and >= 0'),
                          (['--temperature', 'inf'], 'temperature inf: must be finite and >= 0'), (['--num_samples', '0'], 'num_samples 0 < 1'),
                          (['--seed', str(2 ** 64)], f'seed {2 ** 64} is not a 64-bit integer')]:
        with pytest.raises(SystemExit, match=f'^error: {message}'):
            sample.main([ckpt, *args])


def test_sample_py_in_another_compute_dtype(finished_run, capsys):
    """--dtype: a checkpoint trained in bf16 samples on a T4 with --dtype float16 (no bf16 matmuls there); the weights are
    fp32 either way. Here an fp32 checkpoint in bf16: XLA on CPUs has no fp16 attention (float16 is for GPUs)."""
    model, cfg, _ = sample.load(finished_run[2], 'bfloat16')
    assert model.token_embed.dtype == jnp.bfloat16 and cfg.model.dtype == 'bfloat16' and model.token_embed.embedding.dtype == jnp.float32
    sample.main([finished_run[2], '--dtype', 'bfloat16', '--prompt', 'def ', '--max_new_tokens', '8', '--temperature', '0'])
    out, err = capsys.readouterr()
    assert out.startswith('def ') and out.count('\n---------------\n') == 1 and 'from step 20 of' in err


@pytest.mark.parametrize('dtype,cc,runs', [('bfloat16', '7.5', 'float16'), ('bfloat16', '6.1', 'float32'), ('bfloat16', '8.0', 'bfloat16'),
    ('bfloat16', 'gfx90a', 'bfloat16'), ('bfloat16', '', 'bfloat16'), ('float16', '7.5', 'float16'), ('float16', '', 'float16'),
    ('float32', '7.5', 'float32')])
def test_sampling_runs_in_a_dtype_this_machine_has(dtype, cc, runs):
    """XLA has no bf16 attention algorithm below compute capability 8.0 (a T4: float16; before 7.0 fp16 is slow: float32)."""
    assert sample.runnable_dtype(dtype, cc) == runs


def test_a_float16_checkpoint_samples_on_a_cpu(tiny_cfg, tmp_path, capsys, monkeypatch):
    """A T4 run's checkpoint (fp16) sampled on a laptop: decoding's attention runs fp16 inputs in fp32 (XLA has no fp16
    algorithm for its dots: on CPUs none, on GPUs none for one query, INVALID_ARGUMENT on a T4 and an H100)."""
    import train
    train.train(tiny_cfg('model.dtype=float16', 'train_tokens=1024', f'ckpt.dir={tmp_path}/ck'), str(tmp_path))
    capsys.readouterr()
    sample.main([f'{tmp_path}/ck', '--prompt', 'def ', '--max_new_tokens', '4'])
    out, err = capsys.readouterr()
    assert out.startswith('def ') and 'note:' not in err
    # trained with model.attn_impl=xla (a GPU, or a TPU): decoding never uses it, so the CPU's refusal of fp16 with xla does not apply
    monkeypatch.setattr(train, 'restore', lambda manager, step, cfg, state, same_run=False: (state, {}))
    monkeypatch.setattr(train, 'find_checkpoint', lambda path: (types.SimpleNamespace(restore=lambda *a, **k: {'meta': {'config':
        OmegaConf.to_container(tiny_cfg('model.dtype=float16', 'model.attn_impl=xla'), resolve=True)}}), 1))
    sample.main([f'{tmp_path}/ck', '--prompt', 'def ', '--max_new_tokens', '4'])
    assert capsys.readouterr()[0].startswith('def ')


def test_a_tiny_temperature_is_greedy_and_prompt_ids_must_be_in_the_vocab(one_device_mesh):
    """1e-40 (denormal in fp32) made the scaled logits inf and then nan: padding or id 0 came out, not the argmax.
    A prompt id >= vocab_size (a non-ASCII byte for a vocab under 256) gave non-finite logits and garbage."""
    model = random_model()
    prompt = jax.random.randint(jax.random.key(1), (2, 5), 0, 300)
    greedy = sample.generate(model, prompt, jax.random.key(0), n_new=6, temperature=0)
    for tiny in (1e-40, 1e-300):  # 1e-300 is 0 in fp32
        np.testing.assert_array_equal(sample.generate(model, prompt, jax.random.key(0), n_new=6, temperature=tiny), greedy)
    ids = lambda text: [int(x) for x in text.split()]
    with pytest.raises(sample.utils.PicodoError, match='^prompt token id 300 >= model.vocab_size 300$'):
        sample.sample(model, ids, str, '5 300 7', 4)


def test_top_1_is_greedy():
    logits = jax.random.normal(jax.random.key(0), (4, 50))
    for seed in range(3):
        np.testing.assert_array_equal(sample.sample_token(logits, jax.random.key(seed), 1.0, 1), logits.argmax(-1))


def test_a_prompt_of_a_whole_window_is_cut_to_leave_room_for_a_new_token(one_device_mesh, capsys):
    """seq_len 24: a prompt of 24 tokens is its last 23 (as a longer one is), not decoded from its last 12."""
    model, (encode, decode) = random_model(), sample.tokenizer(256)  # shapes as in the test above: compiled once
    texts = sample.sample(model, encode, lambda ids: ids, 'y' + 'x' * 23, 50, num_samples=2, seed=3)
    assert 'prompt of 24 tokens cut to its last 23' in capsys.readouterr().err
    assert texts == sample.sample(model, encode, lambda ids: ids, 'x' * 23, 50, num_samples=2, seed=3)


def test_each_new_token_draws_fresh_randomness(one_device_mesh):
    """From a model whose logits are all equal, every token is a fresh uniform draw: within one generate call (its
    key folded with the position) and in each refill past the window (folded with the number of tokens so far)."""
    model, (encode, decode) = random_model(), sample.tokenizer(256)
    nnx.update(model, jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param)))
    ids = sample.sample(model, encode, lambda ids: ids, 'x' * 40, 50, num_samples=2, seed=3)[0]  # 1 new, then 12 at a time
    assert len(set(ids[1:13])) > 6 and ids[1:13] != ids[13:25]


def test_top_k_may_be_the_whole_vocabulary(one_device_mesh):
    """top_k runs 0..vocab_size, as the error says: vocab_size keeps every token, as 0 does (nothing to generate here)."""
    model = random_model()
    assert sample.sample(model, lambda text: [1, 2], str, 'ab', 0, top_k=300) == ['[]']
    with pytest.raises(sample.utils.PicodoError, match=r'^top_k 301 is not in 0..300'):
        sample.sample(model, lambda text: [1, 2], str, 'ab', 0, top_k=301)


def test_generate_refuses_to_run_past_the_window(one_device_mesh):
    """generate's prompt plus new tokens must fit in seq_len (24): past it, positions would be clamped without a word
    (sample() and eval_sample() cut the prompt first; this guards direct callers)."""
    model, prompt = random_model(), jnp.zeros((1, 5), jnp.int32)
    assert sample.generate(model, prompt, jax.random.key(0), n_new=19).shape == (1, 24)
    with pytest.raises(ValueError, match="^a prompt of 5 tokens and 20 new ones exceed the model's seq_len 24($|\n)"):
        sample.generate(model, prompt, jax.random.key(0), n_new=20)


def test_top_k_samples_among_all_k_likeliest_and_nothing_else():
    """top_k 2 of logits 5, 4.9, 4.8, ...: the two likeliest both come out (about half each), the third never."""
    logits = jnp.tile(jnp.array([5., 4.9, 4.8] + [-10.] * 7), (64, 1))  # 64 independent draws in one call
    drawn = set(np.asarray(sample.sample_token(logits, jax.random.key(0), 1.0, 2)).tolist())
    assert drawn == {0, 1}


def test_the_seed_chooses_the_sample(one_device_mesh, monkeypatch):
    """sample.py --seed and the trainer's eval samples (seeded with the step): another seed, another continuation."""
    model, ids = random_model(), lambda text: [1, 2]
    assert sample.sample(model, ids, str, 'ab', 8, seed=3) != sample.sample(model, ids, str, 'ab', 8, seed=4)
    monkeypatch.setitem(sys.modules, 'tiktoken', SimpleNamespace(get_encoding=lambda name: 1 / 0))  # offline: the ids shown
    assert sample.eval_sample(model, np.arange(24) % 300, 8, 5) != sample.eval_sample(model, np.arange(24) % 300, 8, 6)


def test_a_long_prompt_keeps_its_end_and_past_the_window_decoding_goes_on_from_the_newest_half(one_device_mesh, capsys):
    """seq_len 24, a prompt of 30 distinct-ish ids: cut to its last 23; one new token fills the window; the next 12
    continue from its newest 12 tokens (greedy: each equals generate on that context)."""
    model = random_model()
    prompt = np.asarray(jax.random.randint(jax.random.key(1), (30,), 0, 256)).tolist()
    out = sample.sample(model, lambda text: prompt, lambda ids: ids, 'p', 13, temperature=0)[0]
    assert 'prompt of 30 tokens cut to its last 23' in capsys.readouterr().err
    first = sample.generate(model, np.array([prompt[-23:]], np.int32), jax.random.key(0), 1, temperature=0)[0, -1]
    window = np.array([prompt[-23:] + out[:1]], np.int32)[:, 12:]
    assert out[0] == first
    np.testing.assert_array_equal(out[1:], sample.generate(model, window, jax.random.key(0), 12, temperature=0)[0, 12:])
