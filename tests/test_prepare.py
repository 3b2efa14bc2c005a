"""prepare.py, the data tool: download, tokenize, bytes, inspect. Offline: a local HTTP server on 127.0.0.1 and a
tiktoken Encoding built here stand in for the internet and GPT-2's vocabulary."""
import concurrent.futures, glob, http.server, os, re, shutil, signal, socket, struct, subprocess, sys, threading, time
import numpy as np
import pytest
import tiktoken
import data, prepare
from conftest import REPO, write_tokens

GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
DOCS = [f'Document {i}: the {"other " * (i % 3)}thing number {i} is here.\n' for i in range(20)]


@pytest.fixture(scope='module')
def encoding():
    """A GPT-2-style tiktoken Encoding: the 256 bytes, three merges and <|endoftext|>; no download needed."""
    ranks = {bytes([i]): i for i in range(256)} | {b' t': 256, b'he': 257, b' the': 258}
    return prepare.TiktokenTokens(tiktoken.Encoding('picodo-test', pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                                                    special_tokens={'<|endoftext|>': 259}))


@pytest.fixture
def corpus(tmp_path):
    """DOCS as text files in a directory tree, plus a hidden file that is not part of the corpus."""
    root = tmp_path / 'corpus'
    for i, text in enumerate(DOCS):
        (root / f'part{i % 2}').mkdir(parents=True, exist_ok=True)
        (root / f'part{i % 2}' / f'doc{i:02}.txt').write_text(text)
    (root / '.hidden').write_text('not a document')
    return str(root)


def split_documents(path, tokenizer):
    """The documents in a .bin file, decoded: every document follows an end-of-text token."""
    tokens = np.fromfile(path, '<u2')
    assert tokens[0] == tokenizer.eot
    starts = np.flatnonzero(tokens == tokenizer.eot)
    return [tokenizer.decode(d[1:]) for d in np.split(tokens, starts[1:])]


def test_tokenize_writes_every_document_once_shuffled_after_end_of_text(corpus, tmp_path, encoding, capsys):
    out = str(tmp_path / 'out')
    assert prepare.main(['tokenize', corpus, '--out', out, '--val-fraction', '0.2', '--workers', '2'], encoding) == 0
    train, val = split_documents(f'{out}/train.bin', encoding), split_documents(f'{out}/val.bin', encoding)
    assert len(val) == 4 and sorted(train + val) == sorted(DOCS)
    assert train + val != DOCS  # shuffled
    assert 258 in np.fromfile(f'{out}/train.bin', '<u2')  # BPE merges applied: ' the' is one token
    assert f'{out}/train.bin: ' in capsys.readouterr().out
    assert sorted(os.listdir(out)) == ['train.bin', 'val.bin']


def test_tokens_are_tiktokens_encode_ordinary_special_tokens_in_the_text_included(encoding):
    text = 'the end <|endoftext|> is text here'
    assert encoding.encode([text.encode()])[0].tolist() == encoding.encoding.encode_ordinary(text)
    assert 259 not in encoding.encode([text])[0]


def test_an_encoding_with_more_ids_than_uint16_holds_is_refused():
    """cl100k_base and o200k_base have more ids than a uint16 .bin file holds: written anyway, their large ids would
    wrap around without a word. An encoding of exactly 65536 ids (0 to 65535) fits."""
    def encoding(n_vocab):  # the 256 bytes, and the end-of-text token as the last id
        return tiktoken.Encoding(f'ids-{n_vocab}', pat_str=GPT2_PATTERN, mergeable_ranks={bytes([i]): i for i in range(256)},
                                 special_tokens={'<|endoftext|>': n_vocab - 1})
    with pytest.raises(prepare.PrepareError, match='^encoding ids-65537 has 65537 ids, more than uint16 holds$'):
        prepare.TiktokenTokens(encoding(65537))
    assert prepare.TiktokenTokens(encoding(65536)).eot == 65535


def test_documents_are_the_visible_text_files_each_once_in_an_order_the_filesystem_does_not_choose(corpus, tmp_path, monkeypatch):
    """A file reached twice (through a symlink, or another spelling of its path) is one document, so it cannot land in
    both splits; a hidden directory (.git) and download leftovers (.part, .etag) are not text; and the order of the
    documents, which the seeded shuffle permutes, is the same whatever order the filesystem lists a directory in
    (else one corpus and seed would give other splits on another machine)."""
    os.symlink(os.path.join(corpus, 'part1', 'doc01.txt'), tmp_path / 'link.txt')
    os.mkdir(os.path.join(corpus, '.git'))
    open(os.path.join(corpus, '.git', 'HEAD'), 'w').write('ref: refs/heads/main\n')
    open(os.path.join(corpus, 'part0', 'x.bin.part'), 'wb').write(b'\x01\x02')
    open(os.path.join(corpus, 'part0', 'x.bin.part.etag'), 'w').write('"v1"')
    inputs = [corpus, str(tmp_path / 'link.txt'), os.path.join(corpus, 'part0', '..', 'part0', 'doc00.txt')]
    docs = prepare.FileDocs(inputs)
    assert sorted(d.decode() for d in docs.read(range(len(docs)))) == sorted(DOCS)
    walk = os.walk
    def walk_listing_backwards(root):
        for d, dirs, names in walk(root):
            dirs.reverse(), names.reverse()
            yield d, dirs, names  # the same lists: a caller that prunes dirs prunes the walk
    monkeypatch.setattr(os, 'walk', walk_listing_backwards)
    assert prepare.FileDocs(inputs).files == docs.files


def test_the_shuffle_depends_on_the_seed_only_not_on_the_workers(corpus, tmp_path, encoding):
    def run(name, *args):
        prepare.main(['tokenize', corpus, '--out', str(tmp_path / name), *args], encoding)
        return [open(tmp_path / name / f, 'rb').read() for f in ('train.bin', 'val.bin')]
    one_worker = run('a', '--workers', '1', '--seed', '3')
    assert run('b', '--workers', '2', '--seed', '3') == one_worker
    assert run('c', '--workers', '1', '--seed', '4') != one_worker


def test_bytes_command_is_what_the_trainer_builds_offline(stdlib_data, tmp_path):
    """`python main.py` with no data builds the stdlib corpus through the same code as `prepare.py bytes`."""
    import glob, sysconfig
    root = sysconfig.get_paths()['stdlib']
    files = sorted(f for f in glob.glob(os.path.join(root, '**', '*.py'), recursive=True) if 'site-packages' not in f)
    out = tmp_path / 'bytes'
    assert prepare.main(['bytes', *files, '--out', str(out), '--val-fraction', '0.1', '--seed', '0', '--workers', '2']) == 0
    for built, made in zip(stdlib_data, [out / 'train.bin', out / 'val.bin']):
        assert open(built, 'rb').read() == open(made, 'rb').read()


def test_bytes_are_the_utf8_bytes_with_nul_between_documents(corpus, tmp_path):
    out = tmp_path / 'out'
    assert prepare.main(['bytes', corpus, '--out', str(out), '--val-fraction', '0.1', '--workers', '1']) == 0
    tokens = np.concatenate([np.fromfile(out / f, '<u2') for f in ('train.bin', 'val.bin')])
    assert tokens.max() < 256 and (tokens == 0).sum() == len(DOCS)
    assert sorted(bytes(tokens.astype(np.uint8)).decode().split('\0')[1:]) == sorted(DOCS)


def test_each_input_file_is_one_document_once_and_outputs_are_never_inputs(corpus, tmp_path, encoding):
    """A file named twice (or inside a named dir) once landed in both splits; --out inside the input dir made a
    second run read the first one's train.bin and val.bin as text (and a stray .tmp or .part would be read too)."""
    out = os.path.join(corpus, 'out')
    args = ['bytes', corpus, os.path.join(corpus, 'part0', 'doc00.txt'), corpus, '--out', out, '--val-fraction', '0.2']
    assert prepare.main(args) == 0
    first = [open(f'{out}/{f}', 'rb').read() for f in ('train.bin', 'val.bin')]
    open(f'{out}/train.bin.123.tmp', 'wb').write(b'junk')
    assert prepare.main([*args, '--force']) == 0
    assert [open(f'{out}/{f}', 'rb').read() for f in ('train.bin', 'val.bin')] == first
    docs = split_documents(f'{out}/train.bin', prepare.ByteTokens()) + split_documents(f'{out}/val.bin', prepare.ByteTokens())
    assert sorted(docs) == sorted(DOCS)


CTRL_C = '''
import os, signal, sys, time
sys.path.insert(0, {repo!r})
import prepare
class SlowBytes(prepare.ByteTokens):  # each chunk takes 2 s: Ctrl-C comes while the workers are busy
    def encode(self, docs):
        open({out!r} + '.busy', 'w').close()
        time.sleep(2)
        return super().encode(docs)
class DyingBytes(prepare.ByteTokens):  # a worker killed, as by the out-of-memory killer
    def encode(self, docs):
        os.kill(os.getpid(), signal.SIGKILL)
if __name__ == '__main__':
    sys.exit(prepare.main(['bytes', {src!r}, '--out', {out!r}, '--workers', '2'], {tokenizer}()))
'''


@pytest.mark.parametrize('sig', ['SIGINT', 'SIGTERM'])
def test_ctrl_c_with_workers_ends_promptly_and_leaves_no_file(corpus, tmp_path, sig):
    """Ctrl-C reaches the whole process group. Workers that died of it (holding the pool's queue lock) once hung the
    parent, and a second Ctrl-C then left the .tmp file behind (2 of 2 tries on a 574 MB corpus, 4 workers; this tiny
    corpus did not hang the old code): now the workers ignore it, and the parent cleans up and exits with 130.
    SIGTERM to the parent (`timeout`, a job's time limit) does the same: it killed it, leaving its .tmp file."""
    import signal
    out, script = tmp_path / 'out', tmp_path / 'ctrl_c.py'
    script.write_text(CTRL_C.format(repo=REPO, src=corpus, out=str(out), tokenizer='SlowBytes'))
    p = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    end = time.time() + 60
    while not os.path.exists(f'{out}.busy'):  # a worker is encoding (and the parent writing its .tmp file)
        assert p.poll() is None and time.time() < end, p.communicate()[0]
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGINT) if sig == 'SIGINT' else os.kill(p.pid, signal.SIGTERM)  # a terminal's Ctrl-C; `timeout`
    output = p.communicate(timeout=60)[0]
    assert p.returncode == 130 and 'interrupted: no .bin file was left half-written' in output, output
    assert 'Traceback' not in output and os.listdir(out) == []


def test_a_worker_that_dies_is_one_error_line_not_a_hang(corpus, tmp_path):
    out, script = tmp_path / 'out', tmp_path / 'dying.py'
    script.write_text(CTRL_C.format(repo=REPO, src=corpus, out=str(out), tokenizer='DyingBytes'))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stderr.endswith(
        'error: a worker process died (out of memory? try fewer --workers); no .bin file was written\n'), result.stderr
    assert os.listdir(out) == []

@pytest.mark.parametrize('block', [1, 2, 3, 5, 8, 1 << 20])
def test_doc_separator_splits_files_into_documents(tmp_path, block):
    text = b'<|endoftext|>one<|endoftext|>two<|endoftext|><|endoftext|>three<|endoftext|>'
    path = tmp_path / 'docs.txt'
    path.write_bytes(text)
    assert [text[a:b] for a, b in prepare.doc_spans(str(path), b'<|endoftext|>', block)] == [b'one', b'two', b'three']
    assert prepare.doc_spans(str(path), b'\n\n', block) == [(0, len(text))]
    path.write_bytes(b'one\n\n\n\ntwo\n\n\nthree')  # a separator that overlaps itself: once it hid a match at block ends
    assert prepare.doc_spans(str(path), b'\n\n', block) == [(0, 3), (7, 10), (12, 18)]  # one, two, \nthree


def fake_datasets(tmp_path, monkeypatch, load_body, field='text'):
    """`datasets` is optional: a stand-in module with the same interface plays the Hub. Its load_dataset runs `load_body`
    (its lines): a Dataset of rows with fields id and `field`, made from a list of the `field` values."""
    (tmp_path / 'fake').mkdir()
    (tmp_path / 'fake' / 'datasets.py').write_text(
        'class Dataset(list):\n'
        f'    column_names = ["id", {field!r}]\n'
        '    def __getitem__(self, ids):\n'
        f'        return {{{field!r}: [list.__getitem__(self, i) for i in ids]}}\n'
        'def load_dataset(name, config=None, split="train"):\n' + load_body)
    monkeypatch.syspath_prepend(str(tmp_path / 'fake'))
    monkeypatch.delitem(sys.modules, 'datasets', raising=False)


def test_a_hugging_face_dataset_by_name_and_text_field(tmp_path, monkeypatch, encoding):
    fake_datasets(tmp_path, monkeypatch, '    assert (name, split) == ("someone/texts", "train")\n'
                  f'    return Dataset({DOCS!r})\n', field='content')
    out = str(tmp_path / 'out')
    args = ['tokenize', '--hf-dataset', 'someone/texts', '--out', out, '--val-fraction', '0.25', '--workers', '2']
    assert prepare.main(args + ['--text-field', 'content'], encoding) == 0
    assert sorted(split_documents(f'{out}/train.bin', encoding) + split_documents(f'{out}/val.bin', encoding)) == sorted(DOCS)
    with pytest.raises(prepare.PrepareError, match="no field 'text'; its fields: id, content"):
        prepare.HFDocs('someone/texts', 'text')


@pytest.mark.parametrize('case,message', [
    ('split', 'error: dataset someone/texts: Unknown split "validation". Should be one of [\'train\'].'),
    ('config', 'error: dataset someone/texts: Config name is missing.'),
    ('not_text', "error: dataset someone/texts: row 1: field 'text' holds int, not text"),
])
def test_a_hugging_face_dataset_that_does_not_load_or_holds_no_text_is_one_line(tmp_path, monkeypatch, capsys, case, message):
    """datasets' ValueErrors (a split or config it lacks, a config not named where there are several, as for wikitext)
    were tracebacks; so was a row whose text is not a string."""
    fake_datasets(tmp_path, monkeypatch,
                  f'    if {case!r} == "split": raise ValueError(\'Unknown split "validation". Should be one of [\\\'train\\\'].\\nmore\')\n'
                  f'    if {case!r} == "config": raise ValueError("Config name is missing.")\n'
                  '    return Dataset(["one", 7, "three", "four"])\n')
    args = ['bytes', '--hf-dataset', 'someone/texts', '--out', str(tmp_path / 'out'), '--workers', '1']
    assert prepare.main(args) == 1
    assert capsys.readouterr().err.splitlines()[-1] == message  # after the progress bar, if it started
    assert not os.path.exists(tmp_path / 'out') or not os.listdir(tmp_path / 'out')


def test_a_hugging_face_row_without_text_is_an_empty_document(tmp_path, monkeypatch):
    fake_datasets(tmp_path, monkeypatch, '    return Dataset(["one", None, "three", "four"])\n')
    out = tmp_path / 'out'
    assert prepare.main(['bytes', '--hf-dataset', 'someone/texts', '--out', str(out), '--workers', '1', '--val-fraction', '0.25']) == 0
    docs = split_documents(out / 'train.bin', prepare.ByteTokens()) + split_documents(out / 'val.bin', prepare.ByteTokens())
    assert sorted(docs) == ['', 'four', 'one', 'three']


def test_hugging_face_without_datasets_installed_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, 'datasets', None)  # import datasets -> ImportError
    assert prepare.main(['bytes', '--hf-dataset', 'x', '--out', str(tmp_path)]) == 1
    assert capsys.readouterr().err == 'error: --hf-dataset needs the datasets library: pip install datasets\n'


def test_an_offline_tokenize_says_where_the_vocabulary_could_come_from(corpus, tmp_path, monkeypatch, capsys):
    """tiktoken's download failing offline (some errors have no message: that was an IndexError) is one line."""
    def offline(name):
        raise ConnectionError()
    monkeypatch.setattr(tiktoken, 'get_encoding', offline)
    assert prepare.main(['tokenize', corpus, '--out', str(tmp_path / 'out')]) == 1
    assert capsys.readouterr().err == ("error: cannot load tiktoken encoding 'gpt2' (its vocabulary needs the network once, "
                                       'or a copy in TIKTOKEN_CACHE_DIR): ConnectionError\n')
    assert not os.path.exists(tmp_path / 'out' / 'train.bin')


@pytest.mark.parametrize('case,message', [
    ('missing', 'input not found: .*nowhere'),
    ('empty_dir', 'no text in'),
    ('empty_files', 'no text in'),
    ('one_document', 'only one document in .*: need one for train and one for val \\(or a --val-fraction that leaves a whole character on each side: 0.1 did not\\)'),
    ('exists', 'train.bin already exists \\(--force replaces it\\)'),
    ('val_exists', 'val.bin already exists \\(--force replaces it\\)'),
    ('unwritable', 'cannot write to output directory'),
])
def test_bad_input_is_one_line_and_leaves_no_bin_file(tmp_path, corpus, capsys, case, message):
    out, source = tmp_path / 'out', tmp_path / 'in'
    kept = {'exists': 'train.bin', 'val_exists': 'val.bin'}.get(case)  # a file from before, which must stay as it is
    source.mkdir()
    if case == 'missing':
        source = tmp_path / 'nowhere'
    elif case == 'empty_files':
        (source / 'a.txt').write_text('')
        (source / 'b.txt').write_text('')
    elif case == 'one_document':
        (source / 'a.txt').write_text('x')  # longer, its end is val.bin
    elif case in ('exists', 'val_exists'):
        source = corpus
        out.mkdir()
        (out / kept).write_bytes(b'keep')
    elif case == 'unwritable':
        source = corpus
        (tmp_path / 'file').write_text('')
        out = tmp_path / 'file' / 'out'  # a directory under a plain file cannot be made, even by root
    assert prepare.main(['bytes', str(source), '--out', str(out)]) == 1
    err = capsys.readouterr().err
    assert re.fullmatch(f'error: .*{message}.*\n', err), err
    assert sorted(os.listdir(out)) == [kept] if kept else not os.path.exists(out)  # no empty --out dir either
    if kept:
        assert (out / kept).read_bytes() == b'keep'
        assert prepare.main(['bytes', str(source), '--out', str(out), '--force']) == 0


@pytest.mark.parametrize('args,message', [
    (['bytes', 'x', '--out', 'o', '--workers', '0'], 'argument --workers: 0 is not >= 1'),
    (['bytes', 'x', '--out', 'o', '--val-fraction', '1.5'], 'argument --val-fraction: 1.5 is not in [1e-09, 1)'),
    (['bytes', 'x', '--out', 'o', '--val-fraction', '1'], 'argument --val-fraction: 1 is not in [1e-09, 1)'),  # val only
    (['inspect', 'f.bin', '--seq-len', '0'], 'argument --seq-len: 0 is not >= 1'),
    (['inspect', 'f.bin', '--vocab', '0'], 'argument --vocab: 0 is not >= 1'),
    (['inspect', 'f.bin', '--show', '-5'], 'argument --show: -5 is not >= 0'),
    (['bytes', 'x', '--out', 'o', '--seed', '-1'], 'argument --seed: -1 is not >= 0'),  # numpy's shuffle refuses it (a traceback)
])
def test_bad_numbers_are_a_usage_error_before_anything_is_made(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        prepare.main(args)
    assert e.value.code == 2 and message in capsys.readouterr().err and not os.listdir(tmp_path)


@pytest.mark.parametrize('n_docs,fraction,sizes', [(20, '1e-9', [19, 1]), (3, '0.99', [1, 2])])
def test_train_and_val_each_get_at_least_one_document_whatever_the_fraction(tmp_path, n_docs, fraction, sizes):
    """An empty val.bin or train.bin is of no use to the trainer: a fraction that rounds to no documents, or to all
    of them, still leaves one on each side."""
    (tmp_path / 'src').mkdir()
    for i in range(n_docs):
        (tmp_path / 'src' / f'{i:02}.txt').write_text(DOCS[i])
    out = tmp_path / 'out'
    assert prepare.main(['bytes', str(tmp_path / 'src'), '--out', str(out), '--val-fraction', fraction, '--workers', '1']) == 0
    assert [len(split_documents(out / f, prepare.ByteTokens())) for f in ('train.bin', 'val.bin')] == sizes


@pytest.mark.parametrize('text,val_start,begins', [
    (''.join(f'line {i}: to be or not\n' for i in range(300)), 'line 271: ', 'a line start'),  # the line after the cut's
    ('123456789\n' * 100, '123456789\n' * 10, 'a line start'),  # a cut at a line start stays there
    ('é' * 1000, 'é' * 100, 'a character'),
    ('é' * 1000 + '\n', 'é' * 99 + '\n', 'a character'),  # the text's final newline starts no line
    ('a' * 2000 + '\ntail\n', 'a' * 195 + '\ntail\n', 'a character')],  # a line start past half the val part: not used
    ids=['lines', 'equal lines', 'one line of 2-byte characters', 'the same ending in a newline', 'a long line'])
def test_a_single_text_is_split_with_its_end_for_val(tmp_path, capsys, text, val_start, begins):
    """One file, one document (nanoGPT's input.txt): its last tenth, from a line's start (else a character's), is
    val.bin and the rest train.bin, each after an end-of-text token; it used to be refused ('only one document')."""
    (tmp_path / 'input.txt').write_text(text)
    assert prepare.main(['bytes', str(tmp_path / 'input.txt'), '--out', str(tmp_path / 'out'), '--workers', '1']) == 0
    assert f'input.txt: one document: its last 0.1 (from {begins}) is val.bin' in capsys.readouterr().out
    train, val = (split_documents(tmp_path / 'out' / f, prepare.ByteTokens()) for f in ('train.bin', 'val.bin'))
    assert len(train) == len(val) == 1 and train[0] + val[0] == text and val[0].startswith(val_start), val[0][:20]


def test_a_text_named_twice_is_one_input_in_the_messages(tmp_path, capsys):
    """`prepare.py bytes input.txt input.txt` is one text, split as one; its line said 'input.txt and 1 more'."""
    (tmp_path / 'input.txt').write_text('to be or not\n' * 100)
    path = str(tmp_path / 'input.txt')
    assert prepare.main(['bytes', path, path, '--out', str(tmp_path / 'out'), '--workers', '1']) == 0
    assert f'{path}: one document: its last 0.1 (from a line start) is val.bin' in capsys.readouterr().out


def test_output_paths_without_a_directory_are_written_in_the_current_one(corpus):
    """`python main.py data.train_path=train.bin data.val_path=val.bin` builds its first-run corpus under those bare
    names: their directory is '', the current one."""
    assert prepare.write_splits(prepare.FileDocs([corpus]), prepare.ByteTokens(), 'train.bin', 'val.bin', progress=False)
    assert sorted(os.listdir('.')) == ['corpus', 'train.bin', 'val.bin'] and os.path.getsize('val.bin') > 0


def test_at_most_depth_chunks_are_in_flight_at_once():
    """Memory stays flat whatever the corpus size: the workers get a chunk only while fewer than `depth` wait to be
    written, not the whole corpus at once; the chunks come back in order."""
    class Pool:  # hands each chunk back as its own result at once, and counts the chunks it was given
        submitted = 0
        def submit(self, fn, ids):
            Pool.submitted += 1
            future = concurrent.futures.Future()
            future.set_result(ids)
            return future
    chunks = [[i] for i in range(10)]
    for written, tokens in enumerate(prepare.token_chunks(Pool(), chunks, 3)):
        assert tokens == chunks[written] and Pool.submitted - written <= 3
    assert Pool.submitted == 10


def test_a_full_disk_while_tokenizing_is_one_line_and_leaves_no_file(corpus, tmp_path, capsys):
    """The OSError of a full disk (or a vanished input file) from `prepare.py tokenize`: one line and exit code 1, not a
    traceback, and no half-written file."""
    class Full(prepare.ByteTokens):
        def encode(self, docs):
            raise OSError(28, 'No space left on device')
    out = tmp_path / 'out'
    assert prepare.main(['bytes', corpus, '--out', str(out), '--workers', '1'], Full()) == 1
    assert capsys.readouterr().err.endswith('\nerror: [Errno 28] No space left on device\n')  # after the progress bar
    assert os.listdir(out) == []


def test_worker_processes_leave_ctrl_c_to_the_parent():
    """Ctrl-C reaches the whole process group: a worker killed by it could hang the pool (2 of 2 tries on a 574 MB
    corpus), so each worker ignores SIGINT as it starts; the parent keeps its handler and cleans up."""
    before = signal.getsignal(signal.SIGINT)
    try:
        prepare._start_worker(None, None)  # the parent, which encodes itself when there is one worker
        assert signal.getsignal(signal.SIGINT) is before
        prepare._start_worker(None, None, worker=True)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)
        prepare._job = None


def test_the_first_run_corpus_build_replaces_files_another_process_just_finished(stdlib_data, tmp_path):
    """The processes of a multi-process first run each check that neither data file exists, then build: one that
    checked just before another finished must build too (the same bytes, renamed over them), not stop with
    'already exists'."""
    train, val = tmp_path / 'train.bin', tmp_path / 'val.bin'
    shutil.copy(stdlib_data[0], train), shutil.copy(stdlib_data[1], val)
    prepare.build_stdlib_bytes(str(train), str(val))
    assert [train.read_bytes(), val.read_bytes()] == [open(p, 'rb').read() for p in stdlib_data]


def test_a_failure_midway_leaves_neither_bin_nor_tmp(corpus, tmp_path):
    class Failing(prepare.ByteTokens):
        def encode(self, docs):
            raise RuntimeError('tokenizer broke')
    with pytest.raises(RuntimeError, match='tokenizer broke'):
        prepare.write_splits(prepare.FileDocs([corpus]), Failing(), str(tmp_path / 'train.bin'), str(tmp_path / 'val.bin'))
    assert os.listdir(tmp_path) == ['corpus']


def test_the_trainers_first_run_corpus_build_on_a_full_disk_is_one_error(tmp_path, monkeypatch):
    """`python main.py` on a disk short of the corpus's 63 MB: main.py's one line (it was a 14-line traceback,
    'OSError: 1038103 requested and 307200 written'), and no file left."""
    class Full(prepare.ByteTokens):
        def encode(self, docs):
            raise OSError(28, 'No space left on device')
    monkeypatch.setattr(prepare, 'ByteTokens', Full)
    train, val = str(tmp_path / 'train.bin'), str(tmp_path / 'val.bin')
    with pytest.raises(prepare.PrepareError, match=re.escape(f'cannot build the byte corpus {train}, {val}: [Errno 28] No space left on device') + '$'):
        prepare.build_stdlib_bytes(train, val)
    assert os.listdir(tmp_path) == []


def test_the_trainers_first_run_corpus_build_without_stdlib_sources_is_one_error(tmp_path, monkeypatch):
    """A Python installed without its .py sources (.pyc only): one line saying what to set (it was an IndexError)."""
    (tmp_path / 'lib').mkdir()
    (tmp_path / 'lib' / 'os.pyc').write_bytes(b'\0compiled')
    monkeypatch.setattr(prepare.sysconfig, 'get_paths', lambda: {'stdlib': str(tmp_path / 'lib')})
    with pytest.raises(prepare.PrepareError, match='no byte corpus to build: .*/lib holds 0 .py source files; set data.train_path'):
        prepare.build_stdlib_bytes(str(tmp_path / 'train.bin'), str(tmp_path / 'val.bin'))
    assert sorted(os.listdir(tmp_path)) == ['lib']


def test_binary_files_and_pycache_in_a_directory_are_skipped_with_a_note(tmp_path, capsys):
    """Byte tokens use the NUL byte as end-of-text: a .pyc or an image among the texts put NULs inside documents."""
    src = tmp_path / 'src'
    (src / '__pycache__').mkdir(parents=True)
    (src / 'a.py').write_text('alpha')
    (src / 'b.txt').write_text('beta')
    (src / '__pycache__' / 'a.cpython-311.pyc').write_bytes(b'\x00\x01compiled')
    (src / 'logo.png').write_bytes(b'\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR')
    assert prepare.main(['bytes', str(src), '--out', str(tmp_path / 'out'), '--workers', '1', '--val-fraction', '0.5']) == 0
    assert f'{src}: skipped 1 binary file (a NUL byte in the first 8 KiB)' in capsys.readouterr().out
    docs = [split_documents(tmp_path / 'out' / f, prepare.ByteTokens()) for f in ('train.bin', 'val.bin')]
    assert sorted(docs[0] + docs[1]) == ['alpha', 'beta']


def test_a_doc_separator_of_non_utf8_bytes_splits_at_those_bytes(tmp_path):
    """Python holds a command-line argument's invalid UTF-8 bytes as surrogates ('\\xff' as '\\udcff'): the separator
    is those bytes (str.encode raised on them)."""
    path = tmp_path / 'a.txt'
    path.write_bytes(b'one\xfftwo\xffthree')
    docs = prepare.FileDocs([str(path)], os.fsdecode(b'\xff'))
    assert [bytes(d) for d in docs.read(range(len(docs)))] == [b'one', b'two', b'three']


def test_sigterm_during_the_trainers_first_run_corpus_build_leaves_no_file(tmp_path):
    """`timeout` or a scheduler's SIGTERM while main.py builds its corpus: exit code 143 and no half-written .tmp file (the
    default action killed the process mid-file, leaving it for good)."""
    code = f'import sys; sys.path.insert(0, {REPO!r}); import prepare; prepare.build_stdlib_bytes("train.bin", "val.bin")'
    p = subprocess.Popen([sys.executable, '-c', code], cwd=tmp_path, stdin=subprocess.DEVNULL)
    for _ in range(600):  # until a .tmp file is being written (or the build is over)
        if glob.glob(str(tmp_path / '*.tmp')) or p.poll() is not None:
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=120) == 143 and os.listdir(tmp_path) == []


def test_prepare_main_runs_off_the_main_thread(tmp_path):
    """Its SIGTERM handler is set only in the main thread (signal.signal raises ValueError elsewhere)."""
    path, result = write_tokens(tmp_path / 'x.bin', np.arange(1, 300)), []
    thread = threading.Thread(target=lambda: result.append(prepare.main(['inspect', path, '--show', '0'])))
    (thread.start(), thread.join())
    assert result == [0]


def test_prepare_main_puts_the_sigterm_handler_back(tmp_path):
    """SIGTERM is Ctrl-C only while prepare.main runs: a caller's own handler (or the default) is back after it. The
    caller's handler here is one of its own, so a handler left behind by an earlier prepare.main in this process
    cannot pass for it."""
    def callers_handler(*args):
        pass
    previous = signal.signal(signal.SIGTERM, callers_handler)
    try:
        assert prepare.main(['inspect', write_tokens(tmp_path / 'x.bin', np.arange(1, 300)), '--show', '0']) == 0
        assert signal.getsignal(signal.SIGTERM) is callers_handler
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_an_offline_encoding_is_one_short_line(monkeypatch):
    """requests' ConnectionError holds urllib3's whole cause, ' (Caused by NameResolutionError(...))': left out."""
    def offline(name):
        raise ConnectionError("HTTPSConnectionPool(host='openaipublic.blob.core.windows.net', port=443): Max retries exceeded "
                              "with url: /encodings/p50k_base.tiktoken (Caused by NameResolutionError(\"<urllib3.connection."
                              "HTTPSConnection object at 0x7f>: Failed to resolve 'openaipublic.blob.core.windows.net'\"))")
    monkeypatch.setattr(tiktoken, 'get_encoding', offline)
    with pytest.raises(prepare.PrepareError) as e:
        prepare.TiktokenTokens('p50k_base')
    assert str(e.value).endswith('Max retries exceeded with url: /encodings/p50k_base.tiktoken'), str(e.value)


def test_help_shows_each_options_default(capsys):
    with pytest.raises(SystemExit):
        prepare.main(['tokenize', '--help'])
    out = ' '.join(capsys.readouterr().out.split())  # argparse wraps lines
    assert '(default: 0.005; of a single document, its end: 0.1 of its bytes)' in out and '(default: train)' in out and '(default: gpt2)' in out  # none shown before
    assert '(default: None)' not in out and '(default: False)' not in out


# ---------------------------------------------------------------------------------------------- download

CONTENT = np.arange(50_000, dtype='<u2').tobytes()  # 100 kB


class Server(http.server.BaseHTTPRequestHandler):
    """Serves CONTENT at any path; honours `Range: bytes=N-`. Test knobs (class attributes): `cut_after`
    bytes for the next response only (`reset`: cut by a connection reset, not a clean close), `ignore_range`,
    `extra_length` claimed but never sent, `status`, the `content` served, its `etag` and `last_modified` (an If-Range
    naming neither gets the whole content; a weak ETag never matches, RFC 9110), `length` (False: no Content-Length),
    `answer` (a broken server's reply to a Range request: the start its Content-Range claims, the start of what it
    sends). `ranges` records each request's Range, `served` counts the body bytes sent."""
    cut_after, ignore_range, extra_length, status, ranges, content, etag, delay = None, False, 0, 200, [], CONTENT, None, 0
    last_modified, length, answer, reset, served = None, True, None, False, 0

    def do_GET(self):
        if self.status != 200:
            return self.send_error(self.status)
        m = re.fullmatch(r'bytes=(\d+)-', self.headers.get('Range') or '')
        Server.ranges.append(self.headers.get('Range'))
        strong = [v for v in (self.etag, self.last_modified) if v and not v.startswith('W/')]
        changed = self.headers.get('If-Range') not in (None, *strong)  # RFC 9110: then the whole (new) file
        start = int(m[1]) if m and not self.ignore_range and not changed else 0
        if start >= len(self.content) and m and not self.ignore_range:
            self.send_response(416)
            self.send_header('Content-Range', f'bytes */{len(self.content)}')
            self.end_headers()
            return
        claimed, sent = self.answer if start and self.answer else (start, start)
        body = self.content[sent:]
        self.send_response(206 if start else 200)
        if start:
            self.send_header('Content-Range', f'bytes {claimed}-{len(self.content) - 1}/{len(self.content) + self.extra_length}')
        if self.length:
            self.send_header('Content-Length', str(len(body) + self.extra_length))
        if self.etag:
            self.send_header('ETag', self.etag)
        if self.last_modified:
            self.send_header('Last-Modified', self.last_modified)
        self.end_headers()
        time.sleep(self.delay)
        if Server.cut_after is not None:
            body, Server.cut_after = body[:Server.cut_after], None
        Server.served += len(body)  # before the write: the client can finish reading (and the test assert) before the line after it runs
        self.wfile.write(body)
        self.close_connection = True
        if Server.reset:  # close at once, discarding what is unsent: the client reads a reset, not the end of the body
            Server.reset = False
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))
            self.connection.close()

    def log_message(self, *args):
        pass


@pytest.fixture
def server(monkeypatch):
    for knob, value in dict(cut_after=None, ignore_range=False, extra_length=0, status=200, ranges=[], content=CONTENT,
                            etag=None, delay=0, last_modified=None, length=True, answer=None, reset=False, served=0).items():
        monkeypatch.setattr(Server, knob, value)
    httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Server)
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    yield f'http://127.0.0.1:{httpd.server_address[1]}/fineweb_edu_gpt2_{{split}}.bin'
    httpd.shutdown()
    httpd.server_close()


def test_download_fetches_both_splits_and_checks_their_size(server, tmp_path, capsys):
    assert prepare.main(['download', '--url', server, '--out', str(tmp_path)]) == 0
    assert sorted(os.listdir(tmp_path)) == ['fineweb_edu_gpt2_train.bin', 'fineweb_edu_gpt2_val.bin']
    assert (tmp_path / 'fineweb_edu_gpt2_val.bin').read_bytes() == CONTENT
    captured = capsys.readouterr()
    assert '100k' in captured.err  # the tqdm bar counts bytes
    assert f'{tmp_path}/fineweb_edu_gpt2_val.bin: 100000 bytes, 50000 tokens\n' in captured.out


def test_an_interrupted_download_resumes_where_it_stopped(server, tmp_path, capsys):
    Server.cut_after = 30_000
    assert prepare.main(['download', '--url', server, '--out', str(tmp_path), '--splits', 'train']) == 0
    assert (tmp_path / 'fineweb_edu_gpt2_train.bin').read_bytes() == CONTENT
    assert Server.ranges == [None, 'bytes=30000-']
    assert 'cut off after 30000 of 100000 bytes; resuming' in capsys.readouterr().err


def test_a_cut_off_download_fails_keeps_its_part_and_the_next_run_resumes(server, tmp_path, capsys):
    final = tmp_path / 'fineweb_edu_gpt2_train.bin'
    Server.cut_after = 12_345
    args = ['download', '--url', server, '--out', str(tmp_path), '--splits', 'train', '--retries', '0']
    assert prepare.main(args) == 1
    assert 'cut off after 12345 of 100000 bytes; run the same command again to resume' in capsys.readouterr().err
    assert not final.exists() and os.path.getsize(f'{final}.part') == 12_345
    assert prepare.main(args) == 0
    assert final.read_bytes() == CONTENT and not os.path.exists(f'{final}.part')
    assert Server.ranges == [None, 'bytes=12345-']


def test_processes_downloading_the_same_file_fetch_it_once(server, tmp_path, capsys):
    """Every worker of a TPU pod running the same download into a shared dir: one fetches each file, the others
    wait for it and keep it (unlocked, each sent its own request and all wrote the same .part file)."""
    Server.delay = 0.5
    url, path = server.format(split='val'), str(tmp_path / 'val.bin')
    threads = [threading.Thread(target=prepare.download, args=(url, path)) for _ in range(3)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert Server.ranges == [None] and open(path, 'rb').read() == CONTENT
    assert capsys.readouterr().err.count('is already there: kept') == 2 and os.listdir(tmp_path) == ['val.bin']


def test_a_server_that_ignores_range_restarts_the_file(server, tmp_path):
    Server.cut_after, Server.ignore_range = 20_000, True
    assert prepare.main(['download', '--url', server, '--out', str(tmp_path), '--splits', 'val']) == 0
    assert (tmp_path / 'fineweb_edu_gpt2_val.bin').read_bytes() == CONTENT


def test_a_complete_part_file_is_finished_without_refetching(server, tmp_path):
    (tmp_path / 'fineweb_edu_gpt2_val.bin.part').write_bytes(CONTENT)
    assert prepare.main(['download', '--url', server, '--out', str(tmp_path), '--splits', 'val']) == 0
    assert (tmp_path / 'fineweb_edu_gpt2_val.bin').read_bytes() == CONTENT and Server.ranges == ['bytes=100000-']


@pytest.mark.parametrize('case,message', [
    ('short', 'cut off after 100000 of 100002 bytes; run the same command again to resume'),
    ('odd', '100001 bytes, an odd size: not a uint16 .bin file'),
    ('missing', 'HTTP 404'),
    ('no-split', '--url .*: needs one placeholder, {split}, and no other braces'),
    ('other-braces', '--url .*: needs one placeholder, {split}, and no other braces'),  # unchecked: a KeyError traceback
    ('not-a-url', "unknown url type: 'nothing/fineweb_edu_gpt2_val.bin'"),
    ('no-length', 'the server does not say how big the file is, so it cannot be checked'),
    ('shifted', "bad Content-Range 'bytes 40000-99999/100000'"),  # asked for the bytes from 30000
    ('too-long', 'got 130000 bytes, the server said 100000; removed .*fineweb_edu_gpt2_val.bin.part'),
])
def test_a_bad_download_is_one_line_and_no_bin_file(server, tmp_path, capsys, case, message):
    """Whatever goes wrong, no file under the final name; a .part file stays only where it holds the head of the file
    to resume from (a cut-off; a resume answered with a range that was not asked for adds nothing to it)."""
    final, part = tmp_path / 'fineweb_edu_gpt2_val.bin', tmp_path / 'fineweb_edu_gpt2_val.bin.part'
    if case == 'short':
        Server.extra_length = 2  # the server promises 2 bytes more than it ever sends
    elif case == 'odd':
        Server.extra_length = 1
    elif case == 'missing':
        Server.status = 404
    elif case == 'no-length':
        Server.length = False
    elif case in ('shifted', 'too-long'):  # a resume after 30000 bytes, which a broken server answers (206) with
        part.write_bytes(CONTENT[:30_000])
        Server.answer = (40_000, 40_000) if case == 'shifted' else (30_000, 0)  # another range; the whole file as the rest
    url = {'no-split': server.replace('{split}', 'val'), 'not-a-url': 'nothing/fineweb_edu_gpt2_{split}.bin',
           'other-braces': server.replace('{split}', '{size}_{split}')}.get(case, server)
    assert prepare.main(['download', '--url', url, '--out', str(tmp_path), '--splits', 'val', '--retries', '0']) == 1
    assert re.search(rf'^error: .*{message}.*\n\Z', capsys.readouterr().err, re.M)
    assert not final.exists()
    assert part.exists() == (case in ('short', 'shifted')), case
    if case == 'shifted':
        assert part.read_bytes() == CONTENT[:30_000]


def test_a_rerun_after_a_cut_off_second_split_keeps_the_first_and_resumes_the_second(server, tmp_path, capsys):
    """train done, val cut off: the same command again keeps train (once it stopped: train.bin exists) and resumes val."""
    args = ['download', '--url', server, '--out', str(tmp_path), '--retries', '0']
    (tmp_path / 'fineweb_edu_gpt2_train.bin').write_bytes(b'done')
    (tmp_path / 'fineweb_edu_gpt2_val.bin.part').write_bytes(CONTENT[:1000])
    assert prepare.main(args) == 0
    assert 'fineweb_edu_gpt2_train.bin is already there: kept (--force downloads it again)' in capsys.readouterr().err
    assert (tmp_path / 'fineweb_edu_gpt2_train.bin').read_bytes() == b'done'
    assert (tmp_path / 'fineweb_edu_gpt2_val.bin').read_bytes() == CONTENT and Server.ranges == ['bytes=1000-']


def test_a_file_changed_on_the_server_since_the_part_began_is_fetched_whole(server, tmp_path):
    """The .part keeps the first response's ETag; the resume sends it as If-Range, so a server whose file changed
    sends all of the new one instead of its tail to splice onto the old head."""
    args = ['download', '--url', server, '--out', str(tmp_path), '--splits', 'val', '--retries', '0']
    Server.cut_after, Server.etag = 30_000, '"v1"'
    assert prepare.main(args) == 1 and (tmp_path / 'fineweb_edu_gpt2_val.bin.part.etag').read_text() == '"v1"'
    Server.content, Server.etag = CONTENT[::-1], '"v2"'
    assert prepare.main(args) == 0 and (tmp_path / 'fineweb_edu_gpt2_val.bin').read_bytes() == CONTENT[::-1]
    assert sorted(os.listdir(tmp_path)) == ['fineweb_edu_gpt2_val.bin']  # no .part, no .etag
    Server.content, Server.etag, Server.cut_after = CONTENT, '"v1"', 30_000  # unchanged: resumed, not refetched
    assert prepare.main([*args, '--force']) == 1 and prepare.main([*args, '--force']) == 0
    assert (tmp_path / 'fineweb_edu_gpt2_val.bin').read_bytes() == CONTENT and Server.ranges[-1] == 'bytes=30000-'


def test_a_weak_etag_does_not_validate_a_resume_last_modified_does(server, tmp_path):
    """If-Range takes a strong validator only (RFC 9110): a server sends the whole file again for an If-Range naming a
    weak ETag (W/..., which some CDNs send). The .part keeps the Last-Modified date instead, so the resume fetches just
    the rest: every byte of the file crosses the network once."""
    args = ['download', '--url', server, '--out', str(tmp_path), '--splits', 'val', '--retries', '0']
    Server.cut_after, Server.etag, Server.last_modified = 30_000, 'W/"v1"', 'Tue, 01 Apr 2025 10:00:00 GMT'
    assert prepare.main(args) == 1 and prepare.main(args) == 0
    assert (tmp_path / 'fineweb_edu_gpt2_val.bin').read_bytes() == CONTENT
    assert Server.ranges == [None, 'bytes=30000-'] and Server.served == len(CONTENT)


def test_a_part_file_longer_than_the_servers_file_is_removed_and_the_file_fetched_whole(server, tmp_path, capsys):
    """A .part that cannot be the head of the server's file (the file was replaced by a shorter one, with no validator
    to say so): the server answers the resume with 416 and the file's real size. The .part goes and the file comes
    whole; the .part is never renamed to the final name as it is."""
    (tmp_path / 'fineweb_edu_gpt2_val.bin.part').write_bytes(CONTENT + bytes(20_000))
    assert prepare.main(['download', '--url', server, '--out', str(tmp_path), '--splits', 'val', '--retries', '1']) == 0
    assert (tmp_path / 'fineweb_edu_gpt2_val.bin').read_bytes() == CONTENT and Server.ranges == ['bytes=120000-', None]
    assert 'stale partial file' in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ['fineweb_edu_gpt2_val.bin']


def test_a_connection_reset_mid_transfer_is_a_cut_off_that_resumes(server, tmp_path, capsys):
    """A flaky network resets the connection (ECONNRESET) instead of closing it: a cut-off like any other, retried
    from what the .part file holds, not an error that ends the download."""
    Server.cut_after, Server.reset = 30_000, True
    assert prepare.main(['download', '--url', server, '--out', str(tmp_path), '--splits', 'val']) == 0
    assert (tmp_path / 'fineweb_edu_gpt2_val.bin').read_bytes() == CONTENT
    assert re.search(r'cut off after \d+ of 100000 bytes; resuming', capsys.readouterr().err)


def test_download_makes_its_out_directory(server, tmp_path):
    """`python prepare.py download --out data` in a fresh checkout, where data/ does not exist yet."""
    out = tmp_path / 'data' / 'fineweb'
    assert prepare.main(['download', '--url', server, '--out', str(out), '--splits', 'val']) == 0
    assert (out / 'fineweb_edu_gpt2_val.bin').read_bytes() == CONTENT


# ---------------------------------------------------------------------------------------------- inspect

def test_inspect_reports_counts_vocab_windows_and_decoded_text(tmp_path, capsys):
    path = write_tokens(tmp_path / 'x.bin', [0] + list(b'hello world') + [0] + list(b'bye'))
    assert prepare.main(['inspect', path, '--seq-len', '4', '--vocab', '256']) == 0
    out = capsys.readouterr().out
    for line in ['tokens:    16 (32 bytes)', 'ids:       min 0, max 121', 'vocab:     bytes (256), checked against 256',
                 'windows:   3 of T+1 = 5 tokens', 'documents: 2 end-of-text tokens', "'\\x00hello world\\x00bye'"]:
        assert line in out


def test_inspect_decodes_bpe_tokens_with_the_given_encoding(tmp_path, capsys, encoding):
    ids = [259] + encoding.encoding.encode_ordinary('the other thing') + [259]
    path = write_tokens(tmp_path / 'x.bin', ids)
    assert prepare.inspect(path, vocab=260, seq_len=2, decoder=encoding) == 0
    out = capsys.readouterr().out
    assert 'documents: 2 end-of-text tokens (picodo-test id 259)' in out and "'<|endoftext|>the other thing<|endoftext|>'" in out
    assert 'vocab:     GPT-2 (50257)' in out


def test_inspect_counts_gpt2_documents_without_its_vocabulary(tmp_path, capsys, monkeypatch):
    """Offline (an HPC node), GPT-2's vocabulary cannot load: the document count, which needs only its end-of-text id,
    went with the decoded text."""
    def offline(name):
        raise prepare.PrepareError("cannot load tiktoken encoding 'gpt2' (...)")
    monkeypatch.setattr(prepare, 'TiktokenTokens', offline)
    path = write_tokens(tmp_path / 'x.bin', [50256, 10, 20, 50256, 30] * 300)
    assert prepare.inspect(path, vocab=50257, seq_len=2) == 0
    out = capsys.readouterr().out
    assert 'documents: 600 end-of-text tokens (gpt2 id 50256)' in out and "(not decoded: cannot load tiktoken encoding 'gpt2'" in out


def test_inspect_of_ids_beyond_the_encoding_is_a_bad_line_not_a_traceback(tmp_path, capsys, encoding):
    path = write_tokens(tmp_path / 'x.bin', [259, 104, 300, 105])  # 300: no such id in the 260-id encoding
    assert prepare.inspect(path, vocab=260, seq_len=2, decoder=encoding) == 1
    captured = capsys.readouterr()
    assert '(not decoded: ' in captured.out and 'bad: ' in captured.err and 'id 300' in captured.err


def test_inspect_counts_an_id_equal_to_vocab_as_out_of_range_and_finds_the_first_across_pieces(tmp_path, capsys):
    """Ids run from 0 to vocab - 1: an id equal to vocab is already out of range (the embedding has no row for it).
    inspect reads a big file in pieces (128 MB each; 4 tokens here): the first bad id it names is the first in the
    file, not the first of the last piece that has one. The largest id, 256, is past the byte vocabulary."""
    path = write_tokens(tmp_path / 'x.bin', [5, 256, 7, 9, 11, 256, 3, 2])
    assert prepare.inspect(path, vocab=256, seq_len=2, decoder=prepare.ByteTokens(), show=0, chunk=4) == 1
    captured = capsys.readouterr()
    assert captured.err == f'bad: {path}: 2 ids >= vocab 256, the first at token 1 (id 256)\n'
    assert 'vocab:     GPT-2 (50257), checked against 256\n' in captured.out


@pytest.mark.parametrize('content,message', [
    (b'\x01\x00' * 10 + b'\x01', 'odd byte size 21'),
    (b'', 'empty file'),
    (np.array([5, 300, 7, 999, 300], '<u2').tobytes(), '3 ids >= vocab 256, the first at token 1 \\(id 300\\)'),
    (np.arange(1, 200, dtype='<u4').tobytes(), 'not uint16 token ids \\(uint32 ids: every other uint16 is 0 or tiny; or text'),  # exit 0 before
    (b'The quick brown fox jumps over the lazy dog.\n' * 10, 'not uint16 token ids'),
    ((np.arange(200, dtype='<u4') * 503 + 7).tobytes(), 'not uint16 token ids'),  # cl100k's ids as uint32: high halves 0 or 1
    ((np.arange(200, dtype='<u4') * 1000 + 7).tobytes(), 'not uint16 token ids'),  # o200k's: high halves up to 3
    ('The quick brown fox jumps over the lazy dog \u2014 again!\n'.encode() * 10, 'not uint16 token ids'),  # 94% printable
    (b'def f(x):\n\treturn x + 1\n' * 10, 'not uint16 token ids'),  # tabs and newlines are text
])
def test_inspect_calls_a_bad_file_bad_with_a_nonzero_exit(tmp_path, content, message):
    path = tmp_path / 'bad.bin'
    path.write_bytes(content)
    result = subprocess.run([sys.executable, 'prepare.py', 'inspect', str(path), '--vocab', '256'],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 1 and re.search(f'^bad: {re.escape(str(path))}: {message}', result.stderr, re.M)


@pytest.mark.parametrize('case', ['vocab 2', 'all zeros', 'padded'])
def test_inspect_takes_uint16_files_with_many_zeros_or_small_ids(tmp_path, capsys, case):
    """The trainer's uint32 check (data.open_tokens), on the whole file: every high half tiny and most low halves not."""
    rng = np.random.default_rng(0)
    tokens = {'vocab 2': rng.integers(0, 2, 10_000), 'all zeros': np.zeros(1000),
              'padded': np.concatenate([np.pad(rng.integers(1, 50257, k), (0, 64 - k)) for k in rng.integers(8, 40, 200)])}[case]
    assert prepare.inspect(write_tokens(tmp_path / 'x.bin', tokens), seq_len=8, decoder=prepare.ByteTokens(), show=0) == 0
    assert 'bad:' not in capsys.readouterr().err


@pytest.mark.parametrize('args,message', [(['inspect', 'nope.bin'], 'file not found: nope.bin'),
                                          (['bytes', 'nope', '--out', 'out'], 'input not found: nope')])
def test_an_error_from_the_command_line_is_one_line(tmp_path, args, message):
    """In a fresh process: the error handler named concurrent.futures.process, a submodule only loaded once a worker
    pool exists, so an error before any pool was an AttributeError traceback (in-process tests had it loaded)."""
    result = subprocess.run([sys.executable, os.path.join(REPO, 'prepare.py'), *args], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr == f'error: {message}\n', result.stderr[-2000:]


BUILD = '''
import os, signal, sys, time
sys.path.insert(0, {repo!r})
import prepare
class SlowBytes(prepare.ByteTokens):  # slow enough that the two builds overlap
    def encode(self, docs):
        time.sleep(0.1)
        return super().encode(docs)
prepare.write_splits(prepare.FileDocs([{src!r}]), SlowBytes(), {out!r} + '/train.bin', {out!r} + '/val.bin',
                     val_fraction=0.2, force=True, progress=False)
'''


def test_two_processes_building_the_same_files_at_once_both_succeed(tmp_path):
    # what several processes of one run do with data.build_if_missing on a shared filesystem
    src, alone, shared = tmp_path / 'src', tmp_path / 'alone', tmp_path / 'shared'
    for d in (src, alone, shared):
        d.mkdir()
    for i in range(12):  # 12 x 300 KB: several chunks per split
        (src / f'{i}.txt').write_text(f'document {i} ' * 30000)
    run = lambda out: subprocess.Popen([sys.executable, '-c', BUILD.format(repo=REPO, src=str(src), out=str(out))],
                                       stderr=subprocess.PIPE, text=True)
    assert run(alone).wait() == 0
    builds = [run(shared), run(shared)]
    assert [(p.wait(), p.stderr.read()[-500:]) for p in builds] == [(0, ''), (0, '')]
    for name in ('train.bin', 'val.bin'):
        assert (shared / name).read_bytes() == (alone / name).read_bytes()
    assert sorted(os.listdir(shared)) == ['train.bin', 'val.bin']  # no temporary file left behind
