"""Data speed figures: random batch windows/s from a >= 1 GB .bin file, and `prepare.py tokenize` MB/s against
tiktoken's own encode_ordinary_batch on the same text (its ceiling).

  python benchmarks/data_bench.py [--gb 1.0] [--steps 300] [--workers N]

The tokenizer is a tiktoken Encoding built here with GPT-2's split pattern (GPT-2's vocabulary cannot be
downloaded on offline machines; pass --encoding gpt2 where it can). The text is this Python's stdlib sources, --copies times.
"""
import argparse, collections, glob, os, sys, sysconfig, tempfile, time
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
import numpy as np
import regex
import tiktoken
import data, prepare

GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# GPT-2 small at 50% MFU on one H100: 6N + 12LDT FLOPs per token, N = 124M matmul weights
GPT2_FLOPS_PER_TOKEN = 6 * (50257 * 768 + 12 * (4 * 768 * 768 + 2 * 768 * 3072)) + 12 * 12 * 768 * 1024
NEEDED_TOKENS_PER_SEC = 0.5 * 989e12 / GPT2_FLOPS_PER_TOKEN


def loader(gb, steps, B=32, T=1024):
    path = os.path.join(tempfile.gettempdir(), f'picodo_loader_bench_{os.getpid()}.bin')
    rng = np.random.default_rng(0)
    try:
        with open(path, 'wb') as f:
            for _ in range(int(np.ceil(gb * 2**30 / 2**26))):  # 64 MB pieces of random GPT-2 ids
                rng.integers(0, 50257, 2**25, dtype=np.uint16).tofile(f)
        tokens = data.open_tokens(path, 50257, T, B)
        data.get_batch(tokens, T, 0, 0, B)
        start = time.perf_counter()
        for step in range(1, steps + 1):
            data.get_batch(tokens, T, 0, step, B)
        windows = steps * B / (time.perf_counter() - start)
        print(f'loader: {os.path.getsize(path) / 1e9:.2f} GB file, B={B} T={T}: {windows:,.0f} windows/s = '
              f'{windows * T:,.0f} tokens/s; GPT-2 small at 50% MFU on one H100 needs {NEEDED_TOKENS_PER_SEC:,.0f} '
              f'tokens/s: {windows * T / NEEDED_TOKENS_PER_SEC:.0f}x (goal >= 10x)')
    finally:
        if os.path.exists(path):
            os.remove(path)


def local_encoding(texts=(), n_words=0):
    """The tests' encoding (bytes, three merges, <|endoftext|>); with n_words, also every prefix of the
    n_words most frequent pre-tokenized words, shorter first: a GPT-2-sized vocabulary whose tokens are
    about as long as GPT-2's."""
    ranks = {bytes([i]): i for i in range(256)} | {b' t': 256, b'he': 257, b' the': 258}
    if n_words:
        words = collections.Counter(w for t in texts[:2000] for w in regex.findall(GPT2_PATTERN, t))
        prefixes = {w.encode()[:k] for w, _ in words.most_common(n_words) for k in range(2, len(w.encode()) + 1)}
        for token in sorted(prefixes - ranks.keys(), key=len)[:50000 - len(ranks)]:
            ranks[token] = len(ranks)
    return tiktoken.Encoding(f'picodo-test-{len(ranks)}', pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={'<|endoftext|>': len(ranks)})


def tokenizer(workers, encoding_name, copies, threads, n_words, repeats=3):
    """Best of `repeats` interleaved runs of each, so both see the same load on a shared machine."""
    root = sysconfig.get_paths()['stdlib']
    files = copies * sorted(f for f in glob.glob(os.path.join(root, '**', '*.py'), recursive=True) if 'site-packages' not in f)
    texts = [open(f, 'rb').read().decode('utf-8', 'replace') for f in files]
    mb = sum(len(t.encode()) for t in texts) / 1e6
    encoding = tiktoken.get_encoding(encoding_name) if encoding_name else local_encoding(texts, n_words)
    ceiling, ours = 0, 0
    with tempfile.TemporaryDirectory() as out:
        def run():
            prepare.write_splits(prepare.FileDocs(files), prepare.TiktokenTokens(encoding), f'{out}/train.bin',
                                 f'{out}/val.bin', 0.005, 0, workers, force=True, progress=False)
        for _ in range(repeats):
            ceiling = max(ceiling, mb / timed(lambda: encoding.encode_ordinary_batch(texts, num_threads=threads)))
            ours = max(ours, mb / timed(run))
    tokens = sum(len(t) for t in encoding.encode_ordinary_batch(texts[:len(texts) // copies]))
    print(f'tokenize: {len(files)} files, {mb:.1f} MB of text, encoding {encoding.name} '
          f'({tokens * copies / mb / 1e6:.2f} tokens/byte), {workers} workers on '
          f'{os.cpu_count()} cores: prepare.py {ours:.2f} MB/s, tiktoken encode_ordinary_batch ({threads} threads) {ceiling:.2f} MB/s, '
          f'ratio {ours / ceiling:.2f} (goal >= 0.8)')


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == '__main__':
    p = argparse.ArgumentParser(description=' '.join(__doc__.split('\n\n')[0].split()))
    at_least = prepare.at_least
    p.add_argument('--gb', type=at_least(1e-6, float), default=1.0, help='size in GiB of the random .bin file for the loader (rounded up to 64 MiB pieces)')
    p.add_argument('--steps', type=at_least(1), default=300)
    p.add_argument('--workers', type=at_least(1), default=os.cpu_count())
    p.add_argument('--copies', type=at_least(1), default=3, help='times the stdlib sources appear in the text corpus')
    p.add_argument('--threads', type=at_least(1), default=8, help="encode_ordinary_batch's num_threads (its default: 8)")
    p.add_argument('--words', type=at_least(0), default=0, help='grow the test encoding with the prefixes of this many words')
    p.add_argument('--encoding', help='a tiktoken encoding name (default: a local GPT-2-style test encoding)')
    p.add_argument('--only', choices=['loader', 'tokenizer'])
    args = p.parse_args()
    if args.only != 'tokenizer':
        loader(args.gb, args.steps)
    if args.only != 'loader':
        tokenizer(args.workers, args.encoding, args.copies, args.threads, args.words)
