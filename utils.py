"""MFU, the peak FLOP/s table, wandb setup and small helpers."""
import concurrent.futures, contextlib, ctypes, hashlib, importlib.util, netrc, os, re, signal, socket, types, urllib.parse


class PicodoError(Exception):
    """Bad input or a failed run: main.py prints the message as one line and exits non-zero."""


# Peak dense bf16 FLOP/s per JAX device (vendor figures; fp16 on GPUs without bf16: T4, V100); first match in device_kind wins.
# TPU v2/v3 expose each core as a device (half a chip); v4 and later expose whole chips.
PEAK_FLOPS = [('GB200', 2.5e15), ('B200', 2.25e15), ('B100', 1.75e15), ('H100 PCIe', 756e12), ('H100 NVL', 835e12), ('H100', 989e12), ('H200', 989e12),
              ('A100', 312e12), ('L40S', 362e12), ('L40', 181e12), ('L4', 121e12), ('T4', 65e12), ('V100', 125e12), ('TPU v2', 22.5e12),
              ('TPU v3', 61.5e12), ('TPU v4', 275e12), ('TPU v5 lite', 197e12), ('TPU v5e', 197e12), ('TPU v5', 459e12), ('TPU v6', 918e12)]


# the config's override, else the table, else None (CPU, Apple...)
peak_flops = lambda device_kind, override=None: float(override) if override else next((f for name, f in PEAK_FLOPS if name.lower() in device_kind.lower()), None)


first_line = lambda e: (str(e).splitlines() or [''])[0]  # of an exception's message: error lines stay one line
mfu = lambda model_flops_per_sec, n_devices, peak: None if peak is None else model_flops_per_sec / (peak * n_devices)


def oom_error(e):  # XLA running out of memory (its first line names it): one error line saying what to change, else None
    if re.search('RESOURCE_EXHAUSTED|out of memory', line := first_line(e), re.I):  # also a full disk under an async save: no advice
        return f'error: {line}' + ' (lower batch_size, raise grad_accum or set model.remat=dots)' * ('No space left' not in line)


def run_name(config_name, overrides):
    """A run's directory name: the same command gets the same name (so it resumes); long override lists are hashed."""
    # ckpt.resume's path, quoted when it holds '='; ${oc.env:SCRATCH}/x as typed (not its value: the same on any node)
    overrides = re.sub(r'\$\{([^}]*)\}', r'\1', overrides.replace('/', '_').replace('"', '').replace("'", ''))
    overrides = overrides if len(overrides) <= 100 else overrides[:80] + '-' + hashlib.sha1(overrides.encode()).hexdigest()[:10]
    return os.path.join(config_name, overrides) if overrides else config_name


# XLA on CPU allocates its scratch buffers every step. glibc serves big ones from fresh mmap'd pages, whose first
# touches fault (~250k page faults a step on the benchmark model): steps run 10% faster from one never-trimmed heap
# (trim threshold -1: queued steps free more than the largest finite threshold, 2 GiB, at once).
# It must be set before JAX starts its threads, and only where JAX runs on CPU: it slows compiles by a third.
def keep_freed_memory():
    if not (importlib.util.find_spec('jax_plugins') or importlib.util.find_spec('libtpu')):  # no GPU/TPU plugin
        with contextlib.suppress(AttributeError, OSError, TypeError):  # not glibc (macOS, ...): nothing to tune
            (libc := ctypes.CDLL(None)).mallopt(-8, 1), libc.mallopt(-4, 0), libc.mallopt(-1, -1)  # M_ARENA_MAX, M_MMAP_MAX, M_TRIM_THRESHOLD (-1: never)


@contextlib.contextmanager
def stop_signals():
    """Within: SIGTERM (preemption) and SIGINT (Ctrl-C) append to the yielded list instead of killing (a second acts as usual)."""
    stop, previous = [], {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with contextlib.ExitStack() as on_exit:  # which sets each handler from before back
        for s, handler in previous.items():
            on_exit.callback(signal.signal, s, handler)
            signal.signal(s, lambda sig, _: (stop.append(sig), signal.signal(sig, previous[sig])))
        yield stop


def init_wandb(cfg, config, out_dir, run_id=None, enabled=True):
    """A wandb run that never blocks training: WANDB_MODE wins; online goes offline without a key or server; else a no-op."""
    try:
        import wandb  # here, so that the data tools can use this module without loading wandb
        url = urllib.parse.urlparse(os.environ.get('WANDB_BASE_URL') or wandb.Settings().base_url)
    except Exception as e:  # a broken install (say, protobuf or pydantic versions it cannot use): the run goes on without it
        enabled = enabled and print(f'wandb: unusable ({type(e).__name__}: {first_line(e)}): not logging to wandb')  # None: disabled
    mode = (os.environ.get('WANDB_MODE') or cfg.mode) if enabled else 'disabled'
    if mode not in ('offline', 'dryrun', 'disabled') and not online_ok(url):
        mode = print(f'wandb: no API key for {url.netloc} or no connection to it: logging offline (upload later with `wandb sync`)') or 'offline'
    for mode in dict.fromkeys([mode, 'offline']) if enabled else ():  # other processes of a multi-host run: no wandb
        try:
            # a server that accepts and never answers holds the run 15 s (WANDB_INIT_TIMEOUT if set), not wandb's 90
            return wandb.init(project=cfg.project, name=cfg.name, config=config, dir=out_dir, mode=mode, id=run_id, resume='allow',
                              settings=wandb.Settings(init_timeout=float(os.environ.get('WANDB_INIT_TIMEOUT', 15))))
        except Exception as e:  # a bad WANDB_MODE, a rejected key, a timeout, ...
            print(f'wandb: could not start {mode} ({type(e).__name__}: {first_line(e)})')
    return types.SimpleNamespace(id=None, log=lambda *args, **kwargs: None, finish=lambda: None)


def online_ok(url):  # an API key (WANDB_API_KEY, or `wandb login`'s ~/.netrc entry: host:port, or host) and a connection
    try:
        key = os.environ.get('WANDB_API_KEY') or any(netrc.netrc(os.environ.get('NETRC')).authenticators(h) for h in (url.netloc, url.hostname))
        connect = key and concurrent.futures.ThreadPoolExecutor(1).submit(socket.create_connection, (url.hostname, url.port or {'http': 80}.get(url.scheme, 443)), 3)
        return bool(key) and connect.result(timeout=5).close() is None  # in a thread: a DNS lookup ignores socket timeouts; 5 s in all
    except (OSError, ValueError, netrc.NetrcParseError, concurrent.futures.TimeoutError):  # ValueError: a port not a number
        return False
