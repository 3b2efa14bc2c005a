"""Data tools beside the trainer: get, make and check nanoGPT .bin files (raw little-endian uint16 ids).

  python prepare.py download --out data                         # the public fineweb-edu GPT-2 sample
  python prepare.py tokenize my_texts/ --out data/mine           # text -> train.bin, val.bin (GPT-2 BPE)
  python prepare.py tokenize --hf-dataset NAME --text-field text --out data/hf
  python prepare.py bytes my_texts/ --out data/mine_bytes        # the same with byte tokens (vocab 256)
  python prepare.py inspect data/mine/train.bin --vocab 50257 --seq-len 1024

Bad input (a missing path, no text, an existing train.bin without --force, a cut-off download...) is one
line on stderr and exit code 1; a .bin file appears under its final name only once it is complete.
"""
import argparse, collections, concurrent.futures, glob, http.client, multiprocessing, os, re, signal, sys, sysconfig, tempfile, threading, urllib.error, urllib.request
import numpy as np
import utils

SAMPLE_URL = 'https://pub-e8bbdcbe8f6243b2a9933704a9b1d8bc.r2.dev/datasets/fineweb_edu_gpt2_{split}.bin'


class PrepareError(utils.PicodoError):
    """Bad input: main() (and main.py, for the default corpus) prints it as one line and exits non-zero."""


# ---------------------------------------------------------------------------------------------- download

class CutOff(Exception):
    """A transfer that ended early; the .part file keeps what arrived, so the next try resumes."""


def download(url, path, retries=5, force=False):
    """Fetch `url` to `path` through `path`.part, resuming with an HTTP Range request after a cut-off. A file already
    under its final name came complete from an earlier run: it is kept (so a rerun goes on with the other split).
    Processes sharing the directory (every worker of a TPU pod running the same command, say) fetch a file one at a
    time: each holds a lock on a hidden `.NAME.lock` beside it (removed once the file is there), so the next one finds
    the file and keeps it."""
    if not force and kept(path):
        return path
    import fcntl  # POSIX only: here, not at the top, so the other commands (and main.py's first-run corpus) need no lock
    make_dir(os.path.dirname(path))
    with open(os.path.join(os.path.dirname(path), f'.{os.path.basename(path)}.lock'), 'a') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if not force and kept(path):  # another process fetched it while this one waited
            return path
        for attempt in range(retries + 1):
            try:
                fetch(url, path)
                remove(lock.name)  # a process that comes later finds the file before it looks for the lock
                return path
            except CutOff as e:
                if attempt == retries:
                    raise PrepareError(f'{e}; run the same command again to resume') from None
                print(f'{e}; resuming (retry {attempt + 1} of {retries})', file=sys.stderr)


def kept(path):
    if os.path.exists(path):
        print(f'{path} is already there: kept (--force downloads it again)', file=sys.stderr)
        return True


def fetch(url, path):
    from tqdm import tqdm
    part, tag = path + '.part', path + '.part.etag'  # tag: the version the .part file holds (ETag or Last-Modified)
    have = os.path.getsize(part) if os.path.exists(part) else 0
    version = open(tag).read() if have and os.path.exists(tag) else None  # If-Range: the rest of that version, else all
    headers = ({'Range': f'bytes={have}-'} | ({'If-Range': version} if version else {})) if have else {}
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60)
    except urllib.error.HTTPError as e:
        if e.code == 416:  # nothing left to send: the .part file is complete, or stale
            total = re.fullmatch(r'bytes \*/(\d+)', e.headers.get('Content-Range', ''))
            if total and int(total[1]) == have:
                return finish(url, part, path, have)
            remove(part, tag)
            raise CutOff(f'{url}: stale partial file {part} removed') from None
        raise PrepareError(f'{url}: HTTP {e.code} {e.reason}') from None
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as e:  # ValueError: not a URL
        raise PrepareError(f'{url}: {getattr(e, "reason", None) or e}') from None
    with response:
        if response.status == 206:  # the rest of the file, after the `have` bytes we kept
            m = re.fullmatch(r'bytes (\d+)-\d+/(\d+)', response.headers.get('Content-Range', ''))
            if not m or int(m[1]) != have:
                raise PrepareError(f'{url}: bad Content-Range {response.headers.get("Content-Range")!r}')
            total = int(m[2])
        else:  # the whole file: a first request, a server that ignores Range, or a file changed since the .part began
            have, total = 0, int(response.headers.get('Content-Length') or -1)
            etag = response.headers.get('ETag') or ''
            version = etag if etag and not etag.startswith('W/') else response.headers.get('Last-Modified')  # strong only
            remove(tag)
            if version:
                with open(tag, 'w') as f:
                    f.write(version)
        if total < 0:
            raise PrepareError(f'{url}: the server does not say how big the file is, so it cannot be checked')
        if total % 2:
            raise PrepareError(f'{url}: {total} bytes, an odd size: not a uint16 .bin file')
        with open(part, 'ab' if have else 'wb') as f, \
                tqdm(total=total, initial=have, unit='B', unit_scale=True, desc=os.path.basename(path)) as bar:
            while True:
                try:
                    block = response.read(1 << 20)
                except (http.client.IncompleteRead, OSError):
                    break  # the connection dropped: judged by the size below
                if not block:
                    break
                f.write(block)
                bar.update(len(block))
    return finish(url, part, path, total)


def finish(url, part, path, total):
    size = os.path.getsize(part)
    if size < total:
        raise CutOff(f'{url}: cut off after {size} of {total} bytes')
    if size > total:
        remove(part, part + '.etag')
        raise PrepareError(f'{url}: got {size} bytes, the server said {total}; removed {part}')
    os.replace(part, path)
    remove(part + '.etag')
    print(f'{path}: {total} bytes, {total // 2} tokens')
    return path


def remove(*paths):
    for p in paths:
        if os.path.exists(p):
            os.remove(p)


# ---------------------------------------------------------------------------------------------- tokenizers

class ByteTokens:
    """Byte-level tokens, vocab 256. The end-of-text token is the NUL byte, which text never contains."""
    name, eot, n_vocab = 'bytes', 0, 256

    def encode(self, docs):
        return [np.frombuffer(d if isinstance(d, bytes) else d.encode(), np.uint8) for d in docs]

    def decode(self, ids):
        return bytes(np.asarray(ids, np.uint8)).decode('utf-8', 'replace')


class TiktokenTokens:
    """A tiktoken Encoding: GPT-2's by name, or one built locally (GPT-2's vocabulary is a download)."""

    def __init__(self, encoding):
        if isinstance(encoding, str):
            import tiktoken
            try:
                encoding = tiktoken.get_encoding(encoding)
            except Exception as e:  # unknown name, or no network for the vocabulary download
                raise PrepareError(f'cannot load tiktoken encoding {encoding!r} (its vocabulary needs the network once, or a copy '
                                   f'in TIKTOKEN_CACHE_DIR): {(str(e).splitlines() or [type(e).__name__])[0].split(" (Caused by")[0]}') from None
        if encoding.n_vocab > 1 << 16:
            raise PrepareError(f'encoding {encoding.name} has {encoding.n_vocab} ids, more than uint16 holds')
        self.encoding, self.name, self.eot, self.n_vocab = encoding, encoding.name, encoding.eot_token, encoding.n_vocab

    def encode(self, docs):  # encode_ordinary straight into numpy (no list of Python ints): special tokens are text
        return [self.encoding.encode_to_numpy(d.decode('utf-8', 'replace') if isinstance(d, bytes) else d,
                                              disallowed_special=()) for d in docs]

    def decode(self, ids):
        return self.encoding.decode([int(i) for i in ids])


# ---------------------------------------------------------------------------------------------- documents

class FileDocs:
    """Documents from text files (directories are walked, hidden files skipped): one document per file,
    or per piece between occurrences of `separator`. Only (file, start, end) offsets are kept in memory."""

    def __init__(self, inputs, separator=None):
        files = {}  # each file once, however often it is named: a document in both splits would leak val into train
        for path in inputs:
            if not os.path.exists(path):
                raise PrepareError(f'input not found: {path}')
            for f in text_files(path) if os.path.isdir(path) else [path]:
                files.setdefault(os.path.realpath(f), f)
        self.files = list(files.values())
        sep = os.fsencode(separator) if separator else None  # the bytes as typed (non-UTF-8 ones too)
        spans = [(i, a, b) for i, f in enumerate(self.files) for a, b in doc_spans(f, sep)]
        self.spans = np.array(spans, np.int64).reshape(-1, 3)
        named = len({os.path.realpath(path) for path in inputs})  # a.txt a.txt: one input
        self.where = inputs[0] + (f' and {named - 1} more' if named > 1 else '')

    def __len__(self):
        return len(self.spans)

    def chunks(self, order, target=1 << 20):
        """Split `order` (document ids) into runs of about `target` bytes of text."""
        ends = np.cumsum(self.spans[order, 2] - self.spans[order, 1])
        return np.split(order, np.searchsorted(ends, np.arange(target, ends[-1], target), 'right')) if len(order) else []

    def split_end(self, fraction, search=1 << 20):
        """One document (nanoGPT's input.txt) as two: its last `fraction` of bytes, from the start of a line (the first
        at or after the cut, within `search` bytes and half the val part, and not the end of the text), else of a UTF-8
        character, and the rest. Returns where val begins ('a line start' or 'a character'), or None if one part would be empty."""
        file, start, end = self.spans[0]
        cut = start + round((1 - fraction) * (end - start))
        base = max(start, cut - 1)  # from the byte before the cut: a cut at a line's start stays there
        with open(self.files[file], 'rb') as f:
            f.seek(base)
            after = f.read(min(search, end - base))
        line = base + after.find(b'\n') + 1 if b'\n' in after else end
        at_line = line < end and line - cut <= (end - cut) // 2  # the final newline starts no line; val keeps half, at least
        cut = line if at_line else cut + next((i for i, byte in enumerate(after[cut - base:]) if byte & 0xC0 != 0x80), end - cut)
        if not start < cut < end: return None
        self.spans = np.array([[file, start, cut], [file, cut, end]], np.int64)
        return 'a line start' if at_line else 'a character'

    def read(self, ids):
        docs = []
        for i in ids:
            file, start, end = self.spans[i]
            with open(self.files[file], 'rb') as f:
                f.seek(start)
                docs.append(f.read(end - start))
        return docs


def text_files(root):
    """The files under `root`, skipping hidden ones, this tool's outputs (.bin, .tmp, .part, as when --out is inside root),
    __pycache__ dirs and binary files (a NUL byte in their first 8 KiB: for byte tokens it is the end-of-text token)."""
    files, binary = [], 0
    for d, dirs, names in os.walk(root):
        dirs[:] = sorted(x for x in dirs if not x.startswith('.') and x != '__pycache__')
        for f in sorted(os.path.join(d, f) for f in names if not f.startswith('.') and not f.endswith(('.bin', '.tmp', '.part', '.etag'))):
            with open(f, 'rb') as handle:
                is_binary = b'\0' in handle.read(8192)
            binary += is_binary
            files += [] if is_binary else [f]
    if binary:
        print(f'{root}: skipped {binary} binary file{"s" * (binary > 1)} (a NUL byte in the first 8 KiB)')
    return files


def doc_spans(path, sep, block=1 << 24):
    """(start, end) byte offsets of the non-empty documents in a file: the whole file, or the pieces between `sep`."""
    size = os.path.getsize(path)
    if not sep:
        return [(0, size)] if size else []
    cuts, offset, tail = [(0, 0)], 0, b''  # cuts: (start, end) of each separator, plus sentinels
    with open(path, 'rb') as f:
        while data := f.read(block):
            buffer, base = tail + data, offset - len(tail)
            # from the end of the last separator, as one scan of the whole file would (a separator such as
            # '\n\n' can overlap itself: a match in the carried tail must not hide the one after it)
            cuts += [(base + m.start(), base + m.end()) for m in re.compile(re.escape(sep)).finditer(buffer, max(0, cuts[-1][1] - base))]
            offset, tail = offset + len(data), buffer[-(len(sep) - 1):] if len(sep) > 1 else b''
    cuts.append((size, size))
    return [(a[1], b[0]) for a, b in zip(cuts, cuts[1:]) if b[0] > a[1]]


class HFDocs:
    """Documents from a Hugging Face dataset's text field (`datasets` is an optional import). The dataset is
    memory-mapped from its cache; workers reopen it rather than receive it."""

    def __init__(self, name, field, split='train', config=None):
        self.args, self.field, self.where = (name, config, split), field, f'dataset {name}'
        dataset = self.dataset()
        if field not in dataset.column_names:
            raise PrepareError(f'dataset {name} has no field {field!r}; its fields: {", ".join(dataset.column_names)}')
        self.n = len(dataset)

    def dataset(self):
        if getattr(self, '_dataset', None) is None:
            try:
                import datasets
            except ImportError:
                raise PrepareError('--hf-dataset needs the datasets library: pip install datasets') from None
            name, config, split = self.args
            try:  # a split or config it lacks, a config not named where it has several: datasets' ValueError
                self._dataset = datasets.load_dataset(name, config, split=split)
            except ValueError as e:
                raise PrepareError(f'dataset {name}: {(str(e).splitlines() or [type(e).__name__])[0]}') from None
        return self._dataset

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != '_dataset'}

    def __len__(self):
        return self.n

    def chunks(self, order, size=256):
        return [order[i:i + size] for i in range(0, len(order), size)]

    def read(self, ids):  # a row whose field is empty (None) is an empty document; any other non-text value is an error
        docs = self.dataset()[[int(i) for i in ids]][self.field]
        for i, d in zip(ids, docs):
            if not isinstance(d, (str, type(None))):
                raise PrepareError(f'{self.where}: row {int(i)}: field {self.field!r} holds {type(d).__name__}, not text')
        return ['' if d is None else d for d in docs]


# ---------------------------------------------------------------------------------------------- writing

_job = None  # (docs, tokenizer) of this worker process


def _start_worker(docs, tokenizer, worker=False):
    global _job
    _job = docs, tokenizer
    if worker:  # Ctrl-C reaches the whole process group: the parent alone handles it (a worker killed by it hung the pool)
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def _encode_chunk(ids):
    """Tokens of some documents in order, each after an end-of-text token: uint16 [n_tokens]."""
    docs, tokenizer = _job
    pieces = tokenizer.encode(docs.read(ids))
    out = np.empty(sum(len(p) for p in pieces) + len(pieces), '<u2')
    i = 0
    for p in pieces:
        out[i], out[i + 1:i + 1 + len(p)] = tokenizer.eot, p
        i += 1 + len(p)
    return out


def token_chunks(pool, chunks, depth):
    """Encoded chunks in order, at most `depth` in flight, so memory stays flat whatever the corpus size."""
    if pool is None:
        yield from map(_encode_chunk, chunks)
        return
    pending = collections.deque()
    for ids in chunks:
        pending.append(pool.submit(_encode_chunk, ids))
        if len(pending) >= depth:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def write_splits(docs, tokenizer, train_path, val_path, val_fraction=None, seed=0, workers=1, force=False,
                 progress=True):
    """Shuffle the documents with `seed`, hold out `val_fraction` of them (at least one; default 0.005) for validation,
    and stream each split's tokens, an end-of-text token before every document, to its .bin file. A single document
    (of files) is split instead: its end, `val_fraction` of it (default 0.1, as nanoGPT's input.txt), is val.bin. Both files
    are written to this process's own .tmp names and renamed only when both are complete, so processes building
    the same files at once do not clobber each other. Returns (train, val) token counts."""
    from tqdm import tqdm
    for path in (train_path, val_path):
        if os.path.exists(path) and not force:
            raise PrepareError(f'{path} already exists (--force replaces it)')
    one_text = len(docs) == 1 and isinstance(docs, FileDocs)
    val_fraction = (0.1 if one_text else 0.005) if val_fraction is None else val_fraction
    if not 0 < val_fraction < 1 or workers < 1:
        raise PrepareError(f'need 0 < val fraction < 1 and workers >= 1, not {val_fraction} and {workers}')
    if one_text and (begins := docs.split_end(val_fraction)):
        print(f'{docs.where}: one document: its last {val_fraction:g} (from {begins}) is val.bin, the rest train.bin')
    elif len(docs) < 2:  # no text; one dataset row; one text whose last val_fraction holds no whole character
        raise PrepareError(f'no text in {docs.where}' if not len(docs) else f'only one document in {docs.where}: need one for train and '
                           'one for val' + f' (or a --val-fraction that leaves a whole character on each side: {val_fraction:g} did not)' * one_text)
    for path in (train_path, val_path):  # after the checks: a refused input leaves no empty --out dir
        make_dir(os.path.dirname(path))
    order = np.array([1, 0]) if one_text else np.random.default_rng(seed).permutation(len(docs))  # one text: its end is val
    n_val = min(len(docs) - 1, max(1, round(val_fraction * len(docs))))
    _start_worker(docs, tokenizer)
    pool = concurrent.futures.ProcessPoolExecutor(workers, multiprocessing.get_context('spawn'), _start_worker,
                                                  (docs, tokenizer, True)) if workers > 1 else None
    counts, tmps = [], []
    try:
        with tqdm(total=len(docs), unit='doc', disable=not progress) as bar:
            for path, ids in ((train_path, order[n_val:]), (val_path, order[:n_val])):
                tmps.append(f'{path}.{os.getpid()}.tmp')
                counts.append(0)
                chunks = docs.chunks(ids)
                with open(tmps[-1], 'wb') as f:
                    for chunk, tokens in zip(chunks, token_chunks(pool, chunks, 2 * workers)):
                        f.write(tokens)  # its '<u2' bytes; numpy's tofile(f), interrupted by SIGTERM's exit, raised a TypeError
                        counts[-1] += len(tokens)
                        bar.update(len(chunk))
        for tmp, path in zip(tmps, (train_path, val_path)):
            os.replace(tmp, path)
    finally:  # the unfinished files first: a second Ctrl-C while the pool shuts down must not leave them
        remove(*tmps)
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return tuple(counts)


def make_dir(path):
    try:
        os.makedirs(path or '.', exist_ok=True)
        tempfile.TemporaryFile(dir=path or '.').close()  # can this process write there? (a unique name, removed)
    except OSError as e:
        raise PrepareError(f'cannot write to output directory {path or "."}: {e.strerror}') from None


def build_stdlib_bytes(train_path, val_path):
    """The trainer's offline default corpus (`python main.py` on a first run): this Python's standard-library .py
    sources as byte tokens (vocab 256), one document per file, 10% of them (seed 0) for validation."""
    root = sysconfig.get_paths()['stdlib']
    files = sorted(f for f in glob.glob(os.path.join(root, '**', '*.py'), recursive=True) if 'site-packages' not in f)
    if len(files) < 2:  # a Python installed without its sources (.pyc only)
        raise PrepareError(f'no byte corpus to build: {root} holds {len(files)} .py source files; set data.train_path and data.val_path '
                           f'to .bin files (prepare.py makes them)')
    # SIGTERM (`timeout`, a scheduler) unwinds as exit code 143, so the .tmp files go, as prepare.main does (it killed the trainer mid-file)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = main_thread and signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        write_splits(FileDocs(files), ByteTokens(), train_path, val_path, val_fraction=0.1, force=True, progress=False)
    except OSError as e:  # a full disk: the trainer's one line (its .tmp files are gone)
        raise PrepareError(f'cannot build the byte corpus {train_path}, {val_path}: {e}') from None
    finally:
        main_thread and signal.signal(signal.SIGTERM, previous)
    print(f'built byte-level corpus from {len(files)} stdlib files in {root}: {train_path}, {val_path}')


# ---------------------------------------------------------------------------------------------- inspect

def inspect(path, vocab=None, seq_len=1024, decoder=None, show=200, chunk=1 << 26):
    """Print what a .bin file holds; return 0 if it is good, 1 (with a `bad:` line) if not."""
    if not os.path.isfile(path):
        raise PrepareError(f'file not found: {path}')
    size = os.path.getsize(path)
    if size % 2 or size == 0:
        print(f'bad: {path}: {f"odd byte size {size}" if size else "empty file"}, not a uint16 .bin file', file=sys.stderr)
        return 1
    tokens = np.memmap(path, '<u2', mode='r')
    counts, first_over = np.zeros(1 << 16, np.int64), None  # how often each id occurs
    odd_max, even_big = 0, 0  # as uint32 ids (pairs of uint16): the largest high half, how many low halves are >= 4
    for start in range(0, len(tokens), chunk):  # one pass in 128 MB pieces (an even count): flat memory for any size
        part = np.bincount(tokens[start:start + chunk], minlength=1 << 16)
        odd_max = max(odd_max, int(tokens[start + 1:start + chunk:2].max(initial=0)))
        even_big += int((tokens[start:start + chunk:2] >= 4).sum())
        if vocab and first_over is None and part[vocab:].any():
            first_over = start + int(np.argmax(tokens[start:start + chunk] >= vocab))
        counts += part
    seen = np.flatnonzero(counts)
    lo, hi, over = int(seen[0]), int(seen[-1]), int(counts[vocab:].sum()) if vocab else 0
    implied = 'bytes (256)' if hi < 256 else 'GPT-2 (50257)' if hi < 50257 else f'at least {hi + 1}'
    if decoder is None:
        decoder = ByteTokens() if hi < 256 else 'gpt2'
    print(f'file:      {path}\ntokens:    {len(tokens):,} ({size:,} bytes)\nids:       min {lo}, max {hi}'
          f'\nvocab:     {implied}{f", checked against {vocab}" if vocab else ""}'
          f'\nwindows:   {max(0, (len(tokens) - 1) // seq_len):,} of T+1 = {seq_len + 1} tokens')
    name, eot = ('gpt2', 50256) if decoder == 'gpt2' else (decoder.name, decoder.eot)  # known without GPT-2's vocabulary (offline)
    print(f'documents: {counts[eot]:,} end-of-text tokens ({name} id {eot})')
    try:
        decoder = TiktokenTokens(decoder) if isinstance(decoder, str) else decoder
        print(f'first {min(show, len(tokens))} tokens, decoded with {decoder.name}:\n{decoder.decode(tokens[:show])!r}')
    except (PrepareError, KeyError, ValueError) as e:  # KeyError: an id the encoding does not have (the bad: line says)
        print(f'(not decoded: {e})')
    text = np.isin(np.arange(256), [9, 10, 13, *range(32, 127)])  # printable ASCII bytes; per id, its low and high byte:
    printable = counts @ text[np.arange(1 << 16) & 255] + counts @ text[np.arange(1 << 16) >> 8]
    if odd_max < 4 and even_big > len(tokens) // 4 or printable > 0.9 * 2 * len(tokens):  # the trainer's checks (data.py)
        print(f'bad: {path}: not uint16 token ids (uint32 ids: every other uint16 is 0 or tiny; or text: its bytes printable)', file=sys.stderr)
        return 1
    if over:
        print(f'bad: {path}: {over:,} ids >= vocab {vocab}, the first at token {first_over:,} (id {tokens[first_over]})',
              file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------------------------------------- command line

def run_download(args):
    if '{split}' not in args.url or re.search('[{}]', args.url.replace('{split}', '')):
        raise PrepareError(f'--url {args.url}: needs one placeholder, {{split}}, and no other braces')
    for split in args.splits:
        download(args.url.format(split=split), os.path.join(args.out, os.path.basename(args.url.format(split=split))),
                 args.retries, args.force)


def run_tokenize(args, tokenizer=None):
    if args.hf_dataset:
        docs = HFDocs(args.hf_dataset, args.text_field, args.hf_split, args.hf_config)
    elif args.inputs:
        docs = FileDocs(args.inputs, args.doc_separator)
    else:
        raise PrepareError('give text files or directories, or --hf-dataset NAME')
    tokenizer = tokenizer or (ByteTokens() if args.command == 'bytes' else TiktokenTokens(args.encoding))
    paths = os.path.join(args.out, 'train.bin'), os.path.join(args.out, 'val.bin')
    counts = write_splits(docs, tokenizer, *paths, args.val_fraction, args.seed, args.workers, args.force)
    for path, count in zip(paths, counts):
        print(f'{path}: {count:,} tokens ({tokenizer.name})')


def run_inspect(args):
    decoder = {'auto': None, 'bytes': ByteTokens(), 'gpt2': 'gpt2'}[args.decode]
    return inspect(args.path, args.vocab, args.seq_len, decoder, args.show)


def at_least(n, kind=int, below=None):  # an argparse type: a number >= n (and < below)
    def parse(text):
        value = kind(text)
        if not (value >= n and (below is None or value < below)):
            raise argparse.ArgumentTypeError(f'{text} is not {">= " + str(n) if below is None else f"in [{n}, {below})"}')
        return value
    return parse


class DefaultsHelp(argparse.HelpFormatter):
    """--help shows each option's default, where it has one (not None or off)."""
    def _get_help_string(self, action):
        shown = action.default is not None and action.default is not False and action.default != argparse.SUPPRESS
        return action.help and action.help + ' (default: %(default)s)' * shown


def parser():
    p = argparse.ArgumentParser(prog='prepare.py', description='Get, make and check nanoGPT .bin files.')
    commands = p.add_subparsers(dest='command', required=True)
    command = lambda *a, **k: commands.add_parser(*a, **k, formatter_class=DefaultsHelp)
    d = command('download', help='fetch the fineweb-edu GPT-2 sample (resumable)')
    d.add_argument('--out', default='data', help='directory for the files')
    d.add_argument('--splits', nargs='+', default=['train', 'val'], choices=['train', 'val'], help='which files')
    d.add_argument('--url', default=SAMPLE_URL, help='URL with a {split} placeholder')
    d.add_argument('--retries', type=at_least(0), default=5, help='resumes after a cut-off before giving up')
    d.add_argument('--force', action='store_true', help='replace existing files')
    d.set_defaults(run=run_download)
    for name, what in (('tokenize', 'GPT-2 BPE tokens (tiktoken)'), ('bytes', 'byte tokens (vocab 256)')):
        t = command(name, help=f'text files, directories or a HF dataset -> train.bin, val.bin of {what}')
        t.add_argument('inputs', nargs='*', help='text files or directories (each file is a document)')
        t.add_argument('--out', required=True, help='directory for train.bin and val.bin')
        t.add_argument('--doc-separator', help='split files into documents at this string, e.g. "<|endoftext|>"')
        t.add_argument('--hf-dataset', help='a Hugging Face dataset name instead of files (pip install datasets)')
        t.add_argument('--hf-config', help='the dataset configuration, if it has several')
        t.add_argument('--hf-split', default='train', help="the dataset's split")
        t.add_argument('--text-field', default='text', help='the field holding the text')
        t.add_argument('--val-fraction', type=at_least(1e-9, float, 1), help='share of documents for val.bin '
                       '(default: 0.005; of a single document, its end: 0.1 of its bytes)')
        t.add_argument('--seed', type=at_least(0), default=0, help='seed of the document shuffle')
        t.add_argument('--workers', type=at_least(1), default=os.cpu_count(), help='processes (all cores)')
        t.add_argument('--force', action='store_true', help='replace existing train.bin / val.bin')
        if name == 'tokenize':
            t.add_argument('--encoding', default='gpt2', help='tiktoken encoding name')
        t.set_defaults(run=run_tokenize)
    i = command('inspect', help='token count, id range, vocab, windows, decoded start; exit 1 if bad')
    i.add_argument('path')
    i.add_argument('--vocab', type=at_least(1), help='fail if any id is >= this')
    i.add_argument('--seq-len', type=at_least(1), default=1024, help='T, for the count of windows of T+1 tokens')
    i.add_argument('--decode', default='auto', choices=['auto', 'bytes', 'gpt2'], help='how to show the first tokens (auto: by the largest id)')
    i.add_argument('--show', type=at_least(0), default=200, help='how many tokens to decode')
    i.set_defaults(run=run_inspect)
    return p


def main(argv=None, tokenizer=None):
    """The command line; `tokenizer` replaces the named tiktoken encoding (tests build one locally)."""
    args = parser().parse_args(argv)
    main_thread = threading.current_thread() is threading.main_thread()  # (signal handlers can only be set there)
    previous = main_thread and signal.signal(signal.SIGTERM, signal.default_int_handler)  # `timeout`, a job's time limit: as
    try:  # Ctrl-C (it killed the process, leaving its GB-sized .tmp file for good)
        return (run_tokenize(args, tokenizer) if args.run is run_tokenize else args.run(args)) or 0
    except (PrepareError, OSError, concurrent.futures.BrokenExecutor) as e:  # OSError: a full disk, a vanished file...
        print(f'error: {e}' if not isinstance(e, concurrent.futures.BrokenExecutor) else
              'error: a worker process died (out of memory? try fewer --workers); no .bin file was written', file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print('interrupted: no .bin file was left half-written' + ' (a download resumes from its .part file)' * (args.command == 'download'), file=sys.stderr)
        return 130
    finally:
        main_thread and signal.signal(signal.SIGTERM, previous)


if __name__ == '__main__':
    sys.exit(main())
