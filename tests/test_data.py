import threading, time
import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
import data
from conftest import write_tokens
from utils import PicodoError

T, B = 8, 4


@pytest.fixture
def token_file(tmp_path):
    tokens = np.arange(T * 40 + 1) % 1000  # 40 windows, every window distinguishable by its content
    return write_tokens(tmp_path / 'x.bin', tokens), tokens


def test_batches_are_exact_slices_of_the_file(token_file):
    path, tokens = token_file
    mm = data.open_tokens(path, 1000, T, B)
    batch = data.get_batch(mm, T, seed=3, step=5, batch_size=B)
    assert batch.shape == (B, T + 1) and batch.dtype == np.int32
    for row in batch:
        start = row[0]  # tokens[i] == i here, so the first id is the offset
        assert start % T == 0
        np.testing.assert_array_equal(row, tokens[start:start + T + 1])


def test_batches_deterministic_disjoint_and_covering_an_epoch(token_file):
    path, _ = token_file
    mm = data.open_tokens(path, 1000, T, B)
    epoch = [data.get_batch(mm, T, 7, s, B) for s in range(10)]  # 10 steps x 4 = the 40 windows
    starts = np.concatenate([b[:, 0] for b in epoch])
    assert sorted(starts) == list(range(0, 40 * T, T))  # every window exactly once
    again = [data.get_batch(mm, T, 7, s, B) for s in range(10)]
    np.testing.assert_array_equal(epoch, again)
    other_seed = np.concatenate([data.get_batch(mm, T, 8, s, B)[:, 0] for s in range(10)])
    assert not np.array_equal(starts, other_seed)
    next_epoch = np.concatenate([data.get_batch(mm, T, 7, s, B)[:, 0] for s in range(10, 20)])
    assert sorted(next_epoch) == sorted(starts) and not np.array_equal(next_epoch, starts)


def test_a_file_of_whole_windows_leaves_out_the_last_one(tmp_path):
    """T*40 tokens hold 39 windows of T+1 (each shares its last token with the next): an epoch of 13 batches of 3 visits
    each once, and never a window cut short by the end of the file."""
    mm = data.open_tokens(write_tokens(tmp_path / 'x.bin', np.arange(T * 40)), 1000, T, 3)
    epoch = [data.get_batch(mm, T, 0, s, 3) for s in range(13)]
    assert all(b.shape == (3, T + 1) for b in epoch)
    assert sorted(np.concatenate([b[:, 0] for b in epoch])) == list(range(0, 39 * T, T))


def test_each_seed_and_epoch_has_its_own_order():
    """A seed's epoch e must not replay another seed's epoch (as seeding with seed + epoch would: 7, 1 = 8, 0)."""
    orders = {(s, e): tuple(data.permutation(1000, s, e)) for s in range(4) for e in range(4)}
    assert len(set(orders.values())) == len(orders)


def test_rows_are_the_process_share_of_the_global_batch(token_file):
    mm = data.open_tokens(token_file[0], 1000, T, B)
    full = data.get_batch(mm, T, 0, 3, B)
    np.testing.assert_array_equal(data.get_batch(mm, T, 0, 3, B, slice(2, 4)), full[2:4])


def test_prefetched_batches_are_sharded_and_in_order(token_file):
    mm = data.open_tokens(token_file[0], 1000, T, 8)
    mesh = jax.make_mesh((8,), ('data',), (jax.sharding.AxisType.Auto,))
    threads = set(threading.enumerate())
    batches = data.batches(mm, T, seed=1, start_step=2, batch_size=16, accum=2,
                           sharding=NamedSharding(mesh, P(None, 'data')))
    for step in [2, 3]:
        batch = next(batches)
        assert batch.shape == (2, 8, T + 1)
        assert len({s.device for s in batch.addressable_shards}) == 8
        np.testing.assert_array_equal(np.asarray(batch).reshape(16, T + 1), data.get_batch(mm, T, 1, step, 16))
    batches.close()
    assert set(threading.enumerate()) == threads  # the loader's thread has ended


def test_the_next_batch_loads_while_the_current_one_trains(token_file, monkeypatch):
    """Once next() has handed out step 2's batch, step 3's is loading in the background before anyone asks for it."""
    mm, started, load_batch = data.open_tokens(token_file[0], 1000, T, 8), [], data.load_batch
    monkeypatch.setattr(data, 'load_batch', lambda tokens, T, seed, step, *a: started.append(step) or load_batch(tokens, T, seed, step, *a))
    batches = data.batches(mm, T, seed=1, start_step=2, batch_size=8, accum=1,
                           sharding=NamedSharding(jax.make_mesh((8,), ('data',), (jax.sharding.AxisType.Auto,)), P(None, 'data')))
    next(batches)
    for _ in range(1000):  # up to 10 s
        if started == [2, 3]:
            break
        time.sleep(0.01)
    assert started == [2, 3]
    batches.close()


def test_a_failure_in_the_loader_thread_reaches_the_training_loop(token_file, monkeypatch):
    mm = data.open_tokens(token_file[0], 1000, T, 8)
    sharding = NamedSharding(jax.make_mesh((8,), ('data',), (jax.sharding.AxisType.Auto,)), P(None, 'data'))
    get_batch = data.get_batch
    monkeypatch.setattr(data, 'get_batch', lambda *a: get_batch(*a) if a[3] < 3 else 1 / 0)  # fails from step 3 on
    batches = data.batches(mm, T, seed=1, start_step=2, batch_size=16, accum=1, sharding=sharding)
    assert next(batches).shape == (1, 16, T + 1)
    with pytest.raises(ZeroDivisionError):
        next(batches)
    batches.close()


def test_stdlib_corpus_is_byte_tokens(stdlib_data):
    train = np.memmap(stdlib_data[0], dtype='<u2', mode='r')
    val = np.memmap(stdlib_data[1], dtype='<u2', mode='r')
    assert len(train) > 10 * 2**20 and len(val) > 2**20 and train.max() < 256
    assert b'def ' in train[:100_000].astype(np.uint8).tobytes()


@pytest.mark.parametrize('case', ['vocab 2', 'all zeros', 'padded', 'zeros at the end', 'byte text'])
def test_uint16_files_with_many_zeros_or_small_ids_are_token_files(tmp_path, case):
    """The uint32/text check looks at the uint32 structure (every high half tiny, the low halves not), on a sample that
    covers a small file evenly: a first version refused a binary task's random ids or a padded file (half its ids 0), and
    weighted a small file's end up to 16 times."""
    rng = np.random.default_rng(0)
    tokens = {'vocab 2': rng.integers(0, 2, 100_000), 'all zeros': np.zeros(1000),
              'padded': np.concatenate([np.pad(rng.integers(1, 50257, k), (0, 64 - k)) for k in rng.integers(8, 40, 2000)]),
              'zeros at the end': np.r_[rng.integers(1, 256, 60_000), np.zeros(30_000)],
              'byte text': np.frombuffer(b'def f(x):\n\treturn x + 1\n' * 4000, np.uint8)}[case]
    assert len(data.open_tokens(write_tokens(tmp_path / 'x.bin', tokens), 50257, T, B)) == len(tokens)


@pytest.mark.parametrize('case,message', [
    ('missing', 'data file not found'),
    ('odd', 'odd byte size'),
    ('big_id', 'token id 5000 >= model.vocab_size 1000'),
    ('id_is_vocab', 'token id 1000 >= model.vocab_size 1000'),  # the boundary: ids run 0..vocab_size-1
    ('short', 'fewer than one batch of 4: a smaller batch_size or model.seq_len, or more tokens'),
    ('empty', '0 tokens give 0 windows'),  # np.memmap cannot map an empty file: checked before it
    ('a dir', 'data file not found'),  # its size (4096) would pass the checks after: np.memmap's IsADirectoryError
    # once trained on, exit 0: uint32 ids are (id, 0) pairs, all < vocab; text's byte pairs are ids < 32639 < GPT-2's 50257
    ('uint32', r'not uint16 token ids \(uint32 ids, or text\?\): write .bin files with prepare.py'),
    ('uint32 ids > 65535', r'not uint16 token ids \(uint32 ids, or text\?\)'),
    ('text', r'not uint16 token ids \(uint32 ids, or text\?\)'),  # nanoGPT's input.txt as data.train_path
    ('uint32 ids < 4 << 16', r'not uint16 token ids \(uint32 ids, or text\?\)'),  # o200k's 200k ids: high halves up to 3
    ('utf-8 text', r'not uint16 token ids \(uint32 ids, or text\?\)'),  # a few non-ASCII bytes: 94% printable
    ('tabbed text', r'not uint16 token ids \(uint32 ids, or text\?\)'),  # tabs and newlines are text: 88% without them
])
def test_bad_files_get_a_clear_error(tmp_path, case, message):
    path = tmp_path / 'bad.bin'
    if case == 'odd':
        path.write_bytes(b'\x01\x00' * 100 + b'\x01')
    elif case in ('big_id', 'id_is_vocab'):
        write_tokens(path, [1] * 500 + [5000 if case == 'big_id' else 1000] + [1] * 500)
    elif case == 'short':
        write_tokens(path, [1] * (B * T))  # one token short of B windows of T+1
    elif case == 'empty':
        path.write_bytes(b'')
    elif case == 'a dir':
        path.mkdir()
    elif case == 'uint32':
        np.arange(1, 200, dtype='<u4').tofile(path)
    elif case == 'uint32 ids > 65535':  # cl100k's: their high halves are 0 or 1
        (np.arange(200, dtype='<u4') * 503 + 7).tofile(path)
    elif case == 'text':
        path.write_bytes(b'The quick brown fox jumps over the lazy dog.\n' * 10)
    elif case == 'uint32 ids < 4 << 16':
        (np.arange(200, dtype='<u4') * 1000 + 7).tofile(path)
    elif case == 'utf-8 text':
        path.write_bytes('The quick brown fox jumps over the lazy dog \u2014 again!\n'.encode() * 10)
    elif case == 'tabbed text':
        path.write_bytes(b'def f(x):\n\treturn x + 1\n' * 10)
    with pytest.raises(PicodoError, match=message) as e:
        vocab = {'text': 50257, 'utf-8 text': 50257, 'tabbed text': 50257, 'uint32 ids > 65535': 100277, 'uint32 ids < 4 << 16': 200019}
        data.open_tokens(str(path), vocab.get(case, 1000), T, B)
    assert str(path) in str(e.value) and '\n' not in str(e.value)


def test_a_file_up_to_16m_tokens_is_checked_whole(tmp_path):
    """Past 1M tokens too, with an odd count: its last token (out of the sampled chunks' reach) is checked."""
    tokens = np.ones((1 << 20) + 2001, np.uint16)
    tokens[-1] = 5000
    with pytest.raises(PicodoError, match='token id 5000 >= model.vocab_size 1000'):
        data.open_tokens(write_tokens(tmp_path / 'x.bin', tokens), 1000, T, B)


@pytest.mark.parametrize('case', ['uint32 ids', 'a bad id near its end'])
def test_a_file_past_16m_tokens_is_checked_in_even_chunks_that_reach_its_end(tmp_path, case):
    """A file of more than 16M tokens is checked in 16 chunks of 1M: each starts at an even place (uint32 ids come
    in pairs) and the last ends at the file's end."""
    n = (17 << 20) + 2
    if case == 'uint32 ids':
        path = tmp_path / 'x.bin'
        (np.arange(n // 2, dtype='<u4') % 900 + 4).tofile(path)
        message = 'not uint16 token ids'
    else:
        tokens = np.ones(n, np.uint16)
        tokens[n - 1000] = 5000
        path, message = write_tokens(tmp_path / 'x.bin', tokens), 'token id 5000 >= model.vocab_size 1000'
    with pytest.raises(PicodoError, match=message):
        data.open_tokens(str(path), 1000, T, B)


def test_a_file_of_exactly_one_batch_of_windows_is_enough(tmp_path):
    mm = data.open_tokens(write_tokens(tmp_path / 'x.bin', np.arange(B * T + 1)), 1000, T, B)
    assert sorted(data.get_batch(mm, T, 0, 0, B)[:, 0]) == list(range(0, B * T, T))
