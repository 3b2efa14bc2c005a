"""Token windows from nanoGPT .bin files (raw little-endian uint16 ids, no header), read via np.memmap.

A training example is a window of T+1 consecutive tokens: inputs w[:-1], targets w[1:].
Windows start every T tokens (each shares its last token with the next); each epoch visits them in a fresh permutation, so
the batch at any step is a pure function of (seed, step) — what makes resume exact."""
import concurrent.futures, functools, itertools, os
import jax, numpy as np
from utils import PicodoError


def open_tokens(path, vocab_size, seq_len, batch_size):
    """Memory-map a .bin file after checking it can feed batches of windows for this model."""
    if not os.path.isfile(path): raise PicodoError(f'data file not found: {path} (prepare.py gets or makes .bin files: README, "Getting data")')
    if (size := os.path.getsize(path)) % 2: raise PicodoError(f'{path}: odd byte size {size}, not a uint16 .bin file')
    if (n_windows := max(size // 2 - 1, 0) // seq_len) < batch_size:  # checked before np.memmap, which fails on empty files
        raise PicodoError(f'{path}: {size // 2} tokens give {n_windows} windows of {seq_len + 1}, fewer than one batch of {batch_size}: a smaller batch_size or model.seq_len, or more tokens (for val.bin, prepare.py --val-fraction)')
    tokens = np.memmap(path, dtype='<u2', mode='r')
    # checked whole up to 16M tokens, else 16 evenly spaced 1M-token chunks (cheap even for a 5 GB file), each starting at
    # an even index, so that `pairs` lines up with the 4-byte ids of a uint32 file
    sample = tokens if len(tokens) <= 16 << 20 else np.concatenate([tokens[i:i + (1 << 20)] for i in np.linspace(0, len(tokens) - (1 << 20), 16, dtype=np.int64) // 2 * 2])
    pairs = sample[:len(sample) // 2 * 2].reshape(-1, 2)
    # uint32 ids read as uint16: high halves (ids >> 16) all tiny, most low halves not; text: its bytes printable ASCII
    if (pairs[:, 1] < 4).all() and (pairs[:, 0] >= 4).mean() > 0.5 or np.isin(pairs[::8].view(np.uint8), [9, 10, 13, *range(32, 127)], kind='table').mean() > 0.9:
        raise PicodoError(f'{path}: not uint16 token ids (uint32 ids, or text?): write .bin files with prepare.py')
    if (max_id := int(sample.max())) >= vocab_size: raise PicodoError(f'{path}: token id {max_id} >= model.vocab_size {vocab_size}')
    return tokens


# the order of an epoch's windows (cached: each step reads one or two epochs')
permutation = functools.lru_cache(maxsize=4)(lambda n_windows, seed, epoch: np.random.default_rng([seed, epoch]).permutation(n_windows))


def get_batch(tokens, seq_len, seed, step, batch_size, rows=slice(None)):
    """Rows `rows` of the global batch at `step`: int32 [rows, T+1], exact slices of the file."""
    n_windows = (len(tokens) - 1) // seq_len
    epoch, i = np.divmod(step * batch_size + np.arange(batch_size), n_windows)  # epoch after epoch of permutations
    windows = np.concatenate([permutation(n_windows, seed, int(e))[i[epoch == e]] for e in np.unique(epoch)])  # epochs ascend
    return np.stack([tokens[s:s + seq_len + 1] for s in windows[rows] * seq_len]).astype(np.int32)


def load_batch(tokens, seq_len, seed, step, batch_size, accum, sharding):
    # the global batch [A, B/A, T+1], of which each process loads only its rows: its share of each micro-batch (so a
    # micro-batch holds the same rows on any process count)
    n, i = jax.process_count(), jax.process_index()
    rows = get_batch(tokens, seq_len, seed, step, batch_size, np.arange(batch_size).reshape(accum, n, -1)[:, i].ravel())
    return jax.make_array_from_process_local_data(sharding, rows.reshape(accum, -1, seq_len + 1))


def batches(tokens, seq_len, seed, start_step, batch_size, accum, sharding):
    """Global batches [A, B/A, T+1] from `start_step` on, each process reading its rows, the next loaded while one trains."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # closed, it waits for the thread: one killed in XLA's C++ aborts the process
        load = lambda step: pool.submit(load_batch, tokens, seq_len, seed, step, batch_size, accum, sharding)
        # pairs of futures: `ahead` is submitted before `current` is waited on; one thread: it starts once `current` is loaded
        for current, ahead in itertools.pairwise(map(load, itertools.count(start_step))):
            yield current.result()  # the thread's failure, if any, is raised here
