"""train_colab.ipynb, executed headless on the tiny local config (install and download cells switched off)."""
import os, shlex, sys
import nbformat
import pytest
from nbclient import NotebookClient
from conftest import REPO, TINY


def test_notebook_trains_plots_and_samples(tmp_path, stdlib_data):
    """RUN_DIR holds a space, as Drive's 'Colab Notebooks' folder does: every command quotes it."""
    nb = nbformat.read(os.path.join(REPO, 'train_colab.ipynb'), as_version=4)
    code = [c for c in nb.cells if c.cell_type == 'code']
    assert all(not c.outputs and c.execution_count is None for c in code)  # stored without outputs
    params = next(c for c in code if 'parameters' in c.metadata.get('tags', []))
    overrides = ' '.join([*TINY, 'train_tokens=5120', 'eval_every=5'])
    (tmp_path / 'data').mkdir()  # the data files under the names the download gives them, in DATA_DIR
    for split, path in zip(['train', 'val'], stdlib_data):
        os.symlink(path, tmp_path / 'data' / f'fineweb_edu_gpt2_{split}.bin')
    params.source += (f"\nCONFIG, OVERRIDES, RUN_DIR, DATA_DIR = 'local', '{overrides}', '{tmp_path}/Colab Notebooks/run', '{tmp_path}/data'"
                      "\nINSTALL = DOWNLOAD = False\nPROMPT = 'def \"$HOME\"'")  # the prompt reaches sample.py as it is
    NotebookClient(nb, timeout=300, kernel_name='python3', resources={'metadata': {'path': REPO}}).execute()
    assert (tmp_path / 'Colab Notebooks' / 'run' / 'loss.png').stat().st_size > 1000
    assert any('image/png' in out.get('data', {}) for c in code for out in c.outputs)  # the plot is shown inline
    assert (tmp_path / 'Colab Notebooks' / 'run' / 'sample.txt').read_text().startswith('def "$HOME"')


def test_interrupting_the_notebook_passes_ctrl_c_on_to_the_trainer(capsys):
    """The stop button raises KeyboardInterrupt in the kernel, not in the command: `sh` sends the command SIGINT
    (the trainer then checkpoints and exits), waits for it and raises; the trainer once went on in the background."""
    import signal, threading, time
    nb = nbformat.read(os.path.join(REPO, 'train_colab.ipynb'), as_version=4)
    cell = next(c.source for c in nb.cells if c.cell_type == 'code' and 'def sh(' in c.source)
    scope = {}
    exec(cell.split('\nif not os.path.exists')[0], scope)  # the imports and sh
    child = ("import signal, sys, time; signal.signal(signal.SIGINT, lambda *a: (print('SIGINT: checkpoint, exit'), sys.exit(130)));"
             " print('training', flush=True); time.sleep(60)")
    threading.Thread(target=lambda: (time.sleep(3), os.kill(os.getpid(), signal.SIGINT))).start()  # as Jupyter's stop button
    try:
        scope['sh'](f'{sys.executable} -c "{child}"')
        raise AssertionError('no KeyboardInterrupt')
    except KeyboardInterrupt:
        pass
    assert capsys.readouterr().out == 'training\nSIGINT: checkpoint, exit\n'  # not the end of its 60 s sleep


def test_the_plot_keeps_one_point_per_step_after_a_resumed_run(tmp_path):
    """A run killed hard and resumed logs the steps since its checkpoint again (metrics.jsonl is appended to):
    the plot cell keeps the newest record of each step, so the curve does not double back."""
    import json, matplotlib
    matplotlib.use('Agg')
    nb = nbformat.read(os.path.join(REPO, 'train_colab.ipynb'), as_version=4)
    plot = next(c.source for c in nb.cells if c.cell_type == 'code' and 'plt.subplots' in c.source)
    steps = [5, 10, 15, 10, 15, 20]  # killed after 15, resumed from the checkpoint at 5
    with open(tmp_path / 'metrics.jsonl', 'w') as f:
        for i, step in enumerate(steps):
            print(json.dumps({'step': step, 'train_loss': 5.0 - i / 10}), file=f)
        print(json.dumps({'step': 20, 'eval_loss': 4.0}), file=f)
    scope = {'RUN_DIR': str(tmp_path), 'CONFIG': 'local', 'OVERRIDES': ''}
    exec(plot, scope)
    lines = scope['ax'].get_lines()
    assert list(lines[0].get_xdata()) == [5, 10, 15, 20] and list(lines[0].get_ydata()) == [5.0, 4.7, 4.6, 4.5]
    assert list(lines[1].get_xdata()) == [20]


@pytest.mark.parametrize('smi,overrides,config,float16', [('Tesla T4, 7.5', '', 'colab', True), ('Tesla V100-SXM2-16GB, 7.0', '', 'default', True),
    ('Tesla T4, 7.5', 'model.dtype=float32', 'colab', False), ('Tesla T4, 7.5', '', 'local', False), ('NVIDIA A100-SXM4-40GB, 8.0', '', 'colab', False),
    ('NVIDIA L4, 8.9', '', 'colab', False), ('Field "compute_cap" is not a valid field to query.', '', 'colab', False), ('', '', 'colab', False)])
def test_a_gpu_without_bfloat16_matmuls_trains_in_float16(tmp_path, monkeypatch, capsys, smi, overrides, config, float16):
    """Colab's free T4 (compute capability 7.5) has no bf16 matmuls, and the trainer refuses bf16 there: the notebook
    asks for float16 on GPUs before 8.0 (nvidia-smi's name and compute_cap) for a bf16 config, unless OVERRIDES sets
    model.dtype; the float32 local config stays float32 (it was switched to float16 too)."""
    (tmp_path / 'nvidia-smi').write_text(f'#!/bin/sh\n[ -n "$1" ] && echo {shlex.quote(smi)}\nexit 0\n')
    (tmp_path / 'nvidia-smi').chmod(0o755)
    monkeypatch.setenv('PATH', f'{tmp_path}:{os.environ["PATH"]}')
    monkeypatch.chdir(REPO)  # main.py is there: the cell clones nothing
    nb = nbformat.read(os.path.join(REPO, 'train_colab.ipynb'), as_version=4)
    scope = {'OVERRIDES': overrides, 'CONFIG': config}
    exec(next(c.source for c in nb.cells if c.cell_type == 'code' and 'FLOAT16 =' in c.source), scope)
    assert scope['ACCELERATOR'] == 'gpu' and scope['FLOAT16'] is float16
    assert ('training in float16' in capsys.readouterr().out) is float16


@pytest.mark.parametrize('float16', [False, True])
def test_the_commands_pass_each_path_whole_to_the_shell_and_to_hydra(tmp_path, float16):
    """DATA_DIR and RUN_DIR may hold what the shell splits (a space, as in Drive's 'Colab Notebooks') and what Hydra's
    override grammar reads as its own ('(', ',', '=', '~'): the download, training and sample commands each pass a
    path as one argument, and each override's value reaches Hydra as the path. The commands are recorded, not run."""
    import shlex
    from hydra.core.override_parser.overrides_parser import OverridesParser
    nb = nbformat.read(os.path.join(REPO, 'train_colab.ipynb'), as_version=4)
    cells = [c.source for c in nb.cells if c.cell_type == 'code' and any(s in c.source for s in ('prepare.py', 'main.py -cn', 'sample.py'))]
    d = f'{tmp_path}/Colab Notebooks/run (2),a=b~'
    os.makedirs(f'{d}/run')
    open(f'{d}/run/sample.txt', 'w').close()  # the sample cell prints it
    commands = []
    scope = {'os': os, 'shlex': shlex, 'sys': sys, 'sh': commands.append, 'CONFIG': 'local', 'OVERRIDES': 'opt.peak_lr=0.004',
             'DATA_DIR': f'{d}/data', 'RUN_DIR': f'{d}/run', 'DOWNLOAD': True, 'PROMPT': 'def', 'FLOAT16': float16}
    for cell in cells:
        exec(cell, scope)
    download, training, sampling = (shlex.split(c) for c in commands)
    assert download[-2:] == ['--out', f'{d}/data']
    assert training[1:4] == ['main.py', '-cn', 'local']
    overrides = {o.key_or_group: o.value() for o in OverridesParser.create().parse_overrides(training[4:])}
    assert overrides == {'data.train_path': f'{d}/data/fineweb_edu_gpt2_train.bin', 'data.val_path': f'{d}/data/fineweb_edu_gpt2_val.bin',
                         'opt.peak_lr': 0.004, 'hydra.run.dir': f'{d}/run', 'ckpt.dir': f'{d}/run/checkpoints'} | ({'model.dtype': 'float16'} if float16 else {})
    assert sampling[1:3] == ['sample.py', f'{d}/run/checkpoints'] and sampling[-2:] == ['>', f'{d}/run/sample.txt']
