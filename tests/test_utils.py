"""wandb can never block or crash a run; the peak FLOP/s table behind MFU."""
import glob, os, subprocess, sys, time
import pytest
import wandb
import utils
from conftest import REPO, make_cfg


@pytest.mark.parametrize('mode,key', [('online', 'a' * 40), ('run', 'a' * 40), ('online', None)])  # run: old name for online
def test_wandb_online_without_a_reachable_server_or_a_key_logs_offline_at_once(tmp_path, monkeypatch, mode, key):
    """An API key but no route to the server (here a host that cannot resolve): offline, not a 90 s wait and then
    nothing; no key at all: offline too, never a login prompt."""
    monkeypatch.setenv('WANDB_MODE', mode)
    monkeypatch.setenv('WANDB_BASE_URL', 'https://wandb.invalid')
    monkeypatch.setenv('NETRC', str(tmp_path / 'no-netrc'))
    if key:
        monkeypatch.setenv('WANDB_API_KEY', key)
    t0 = time.perf_counter()
    run = utils.init_wandb(make_cfg().wandb, {'x': 1}, str(tmp_path))
    run.log({'loss': 1.0}, step=1), run.finish()
    assert time.perf_counter() - t0 < 60  # wandb's own init timeout is 90 s
    assert glob.glob(str(tmp_path / 'wandb' / 'offline-run-*'))


@pytest.mark.parametrize('key', ['env', 'netrc host:port', 'netrc host', 'bad port'])
def test_wandb_online_checks_the_port_of_a_self_hosted_server(tmp_path, monkeypatch, key):
    """WANDB_BASE_URL=http://host:8080 is reached on 8080, not 443, with the key from WANDB_API_KEY or from the
    netrc entry `wandb login` writes (host:port; older wandb: host): online, not a fallback to offline. A port
    that is not a number: offline, not a crash."""
    import socket
    server, modes = socket.create_server(('127.0.0.1', 0)), []
    port = 'abc' if key == 'bad port' else server.getsockname()[1]
    monkeypatch.setenv('WANDB_BASE_URL', f'http://127.0.0.1:{port}')
    monkeypatch.delenv('WANDB_MODE', raising=False)
    monkeypatch.delenv('WANDB_API_KEY', raising=False)
    (tmp_path / 'netrc').write_text(f'machine 127.0.0.1{":" + str(port) if key != "netrc host" else ""} login user password {"a" * 40}\n')
    monkeypatch.setenv('NETRC', str(tmp_path / 'netrc'))
    if key == 'env':
        monkeypatch.setenv('WANDB_API_KEY', 'a' * 40)
        monkeypatch.setenv('NETRC', str(tmp_path / 'no-netrc'))
    monkeypatch.setattr(wandb, 'init', lambda **kwargs: modes.append(kwargs['mode']) or 'run')
    with server:
        assert utils.init_wandb(make_cfg().wandb, {}, str(tmp_path)) == 'run'
    assert modes == ['offline' if key == 'bad port' else 'online']


def test_a_dns_lookup_that_never_answers_does_not_hold_up_the_run(tmp_path, monkeypatch):
    """A socket's timeout does not cover the DNS lookup (a resolver that does not answer can take its 5 s per try, per
    server, per address family): the check runs in a thread and gives up after 5 s in all, while the lookup still hangs."""
    import socket, threading
    release, modes = threading.Event(), []
    monkeypatch.setattr(socket, 'create_connection', lambda *args, **kwargs: release.wait())  # hangs until released
    timer = threading.Timer(60, release.set)  # the old code waited here, then failed
    timer.start()
    monkeypatch.setenv('WANDB_BASE_URL', 'https://api.example.com')
    monkeypatch.setenv('WANDB_API_KEY', 'a' * 40)
    monkeypatch.delenv('WANDB_MODE', raising=False)
    monkeypatch.setattr(wandb, 'init', lambda **kwargs: modes.append(kwargs['mode']) or 'run')
    try:
        assert utils.init_wandb(make_cfg().wandb, {}, str(tmp_path)) == 'run' and modes == ['offline']
        assert not release.is_set()  # it returned while the lookup still hung
    finally:
        release.set()
        timer.cancel()  # else its thread kept pytest from exiting for the rest of the minute

def test_a_bad_wandb_mode_does_not_stop_the_run(tmp_path):
    """In a fresh process, as `WANDB_MODE=offlne python main.py` (this crashed on wandb's own fallback once)."""
    code = (f'import sys, types; sys.path.insert(0, {REPO!r}); import utils; '
            f'cfg = types.SimpleNamespace(project="p", name=None, mode="offline"); '
            f'run = utils.init_wandb(cfg, {{}}, {str(tmp_path)!r}); run.log({{"a": 1}}, step=1); run.finish(); print("id", run.id)')
    r = subprocess.run([sys.executable, '-c', code], env=dict(os.environ, WANDB_MODE='offlne'), capture_output=True,
                       text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert r.returncode == 0 and r.stdout.splitlines()[-1].startswith('id '), r.stdout + r.stderr


def test_when_wandb_cannot_start_at_all_logging_goes_nowhere(tmp_path, monkeypatch, capsys):
    def init(**kwargs):
        raise RuntimeError(f'no {kwargs["mode"]} today')
    monkeypatch.setattr(wandb, 'init', init)
    run = utils.init_wandb(make_cfg().wandb, {}, str(tmp_path))
    run.log({'loss': 1.0}, step=1), run.finish()
    out = capsys.readouterr().out
    assert run.id is None and 'could not start offline (RuntimeError: no offline today)' in out


@pytest.mark.parametrize('broken', ['import', 'settings'])
def test_a_broken_wandb_install_is_one_line_and_the_run_goes_on(tmp_path, monkeypatch, capsys, broken):
    """wandb that cannot be imported (a protobuf or pydantic version it cannot use), or whose settings cannot be read:
    one line, and a run that logs nowhere (metrics.jsonl still has everything). It crashed the run at its import."""
    if broken == 'import':
        monkeypatch.setitem(sys.modules, 'wandb', None)  # `import wandb` then raises ImportError
    else:
        monkeypatch.setattr(wandb, 'Settings', lambda: {}['pydantic says no'])
    run = utils.init_wandb(make_cfg().wandb, {}, str(tmp_path))
    run.log({'loss': 1.0}, step=1), run.finish()
    out = capsys.readouterr().out
    assert run.id is None and out.startswith('wandb: unusable (') and out.endswith('): not logging to wandb\n') and out.count('\n') == 1, out
    assert utils.init_wandb(make_cfg().wandb, {}, str(tmp_path), enabled=False).id is None  # another process: silent
    assert capsys.readouterr().out == ''


def test_peak_flops_first_match_wins_and_unknown_chips_have_none():
    assert utils.peak_flops('NVIDIA H100 80GB HBM3') == 989e12
    assert utils.peak_flops('NVIDIA H100 PCIe') == 756e12  # the PCIe card's dense bf16 peak, not the SXM's
    assert utils.peak_flops('NVIDIA H100 NVL') == 835e12
    assert utils.peak_flops('NVIDIA L4') == 121e12
    assert utils.peak_flops('NVIDIA B200') == 2.25e15 and utils.peak_flops('NVIDIA GB200') == 2.5e15  # GB200's GPU: 1,200 W, not HGX's 1,000
    assert utils.peak_flops('NVIDIA L40S') == 362e12 and utils.peak_flops('NVIDIA L40') == 181e12  # not the L4's
    assert utils.peak_flops('TPU v5 lite') == utils.peak_flops('TPU v5e') == 197e12 and utils.peak_flops('TPU v5p') == 459e12
    assert utils.peak_flops('cpu') is None and utils.peak_flops('cpu', 1e12) == 1e12


def test_mfu_divides_by_the_peak_of_all_devices():
    assert utils.mfu(8e12, 8, 1e12) == 1.0 and utils.mfu(2e12, 4, 1e12) == 0.5 and utils.mfu(1e12, 8, None) is None


def test_a_peak_flops_of_0_means_look_it_up():
    """check_config takes peak_flops >= 0: 0 must not become the peak (MFU would divide by it at the first log)."""
    assert utils.peak_flops('cpu', 0) is None and utils.peak_flops('NVIDIA A100-SXM4-40GB', 0) == 312e12


@pytest.mark.parametrize('env,config', [('disabled', 'online'), (None, 'disabled')])
def test_wandb_disabled_by_wandb_mode_or_the_config_stays_disabled(tmp_path, monkeypatch, env, config):
    """WANDB_MODE wins over wandb.mode; disabled (no key here) must not become offline, which writes a run dir."""
    modes = []
    monkeypatch.setenv('NETRC', str(tmp_path / 'no-netrc'))
    monkeypatch.delenv('WANDB_API_KEY', raising=False)
    monkeypatch.delenv('WANDB_MODE', raising=False)
    if env:
        monkeypatch.setenv('WANDB_MODE', env)
    monkeypatch.setattr(wandb, 'init', lambda **kwargs: modes.append(kwargs['mode']) or 'run')
    assert utils.init_wandb(make_cfg(f'wandb.mode={config}').wandb, {}, str(tmp_path)) == 'run' and modes == ['disabled']


@pytest.mark.parametrize('url,port', [('http://wandb.example.com', 80), ('https://wandb.example.com', 443)])
def test_wandb_online_checks_the_default_port_of_the_scheme(tmp_path, monkeypatch, url, port):
    """A self-hosted server at http://host (no port) listens on 80: checked there, not on 443."""
    import socket
    tried, modes = [], []
    def connect(address, timeout=None):
        tried.append(address)
        return socket.socket()  # closed unconnected: the check passes
    monkeypatch.setattr(socket, 'create_connection', connect)
    monkeypatch.setenv('WANDB_BASE_URL', url)
    monkeypatch.setenv('WANDB_API_KEY', 'a' * 40)
    monkeypatch.delenv('WANDB_MODE', raising=False)
    monkeypatch.setattr(wandb, 'init', lambda **kwargs: modes.append(kwargs['mode']) or 'run')
    utils.init_wandb(make_cfg().wandb, {}, str(tmp_path))
    assert tried == [('wandb.example.com', port)] and modes == ['online']


def test_a_wandb_that_cannot_start_in_its_mode_logs_offline(tmp_path, monkeypatch):
    """Online with a server in reach but a key it rejects (or any other failure of wandb.init): the run logs offline."""
    modes = []
    def init(**kwargs):
        modes.append(kwargs['mode'])
        if kwargs['mode'] != 'offline':
            raise ValueError(f'bad mode {kwargs["mode"]}')
        return 'run'
    monkeypatch.setattr(wandb, 'init', init)
    monkeypatch.setattr(utils, 'online_ok', lambda url: True)
    monkeypatch.setenv('WANDB_MODE', 'online')
    assert utils.init_wandb(make_cfg().wandb, {}, str(tmp_path)) == 'run' and modes == ['online', 'offline']


def test_wandb_init_gives_up_after_15_s_and_goes_offline(tmp_path, monkeypatch):
    """A server that accepts connections and never answers held wandb.init for its default 90 s (seen with a silent local
    listener; the failed run's teardown still adds about 20 s at exit, after training): init_timeout 15 s, then offline."""
    calls = []
    def init(**kwargs):
        calls.append((kwargs['mode'], kwargs['settings'].init_timeout))
        if kwargs['mode'] != 'offline':
            raise TimeoutError('context deadline exceeded')
        return 'run'
    monkeypatch.setattr(wandb, 'init', init)
    monkeypatch.setattr(utils, 'online_ok', lambda url: True)
    monkeypatch.setenv('WANDB_MODE', 'online')
    assert utils.init_wandb(make_cfg().wandb, {}, str(tmp_path)) == 'run'
    assert calls == [('online', 15), ('offline', 15)]
    monkeypatch.setenv('WANDB_INIT_TIMEOUT', '120')  # wandb's own variable, for a slow link, still counts
    assert utils.init_wandb(make_cfg().wandb, {}, str(tmp_path)) == 'run' and calls[2:] == [('online', 120), ('offline', 120)]


def test_run_names_are_one_dir_and_long_override_lists_stay_apart():
    """The run name is the checkpoint dir under checkpoints/: a path in an override must not nest dirs, and two long
    override lists that differ only near their end must not share a dir (a shortened name keeps a hash of it all)."""
    assert utils.run_name('local', 'data.train_path=/d/train.bin') == os.path.join('local', 'data.train_path=_d_train.bin')
    # as typed, not resolved (main.py passes the unresolved names): the same name where $SCRATCH differs (a requeue)
    assert utils.run_name('local', 'data.train_path=${oc.env:SCRATCH}/t.bin') == os.path.join('local', 'data.train_path=oc.env:SCRATCH_t.bin')
    assert utils.run_name('local', 'model={d_model:64}') == os.path.join('local', 'model={d_model:64}')  # braces stay: its old name
    long = ','.join(f'data.train_path=/data/fineweb_{i}/train.bin' for i in range(3))
    a, b = (utils.run_name('local', f'{long},seed={seed}') for seed in (1, 2))
    assert a != b and a.count(os.sep) == 1 and len(os.path.basename(a)) <= 100
