"""End to end: prepare a tiny dataset, train (SP and muP), resume, sample — through the real
scripts, as a user runs them."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_MODEL = ['--device=cpu', '--compile=False', '--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=32',
              '--batch_size=8', '--eval_iters=5', '--log_interval=1', '--warmup_iters=5', '--learning_rate=3e-3',
              '--dataset=tiny']


def run(script, *args, cwd):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
    """A working directory with data/tiny prepared from a small local text."""
    work = tmp_path_factory.mktemp('work')
    text = "".join(f"{name}: the {thing} is {state}.\n" for name in ('ROMEO', 'JULIET', 'NURSE')
                   for thing in ('night', 'moon', 'rose', 'sword') for state in ('fair', 'dark', 'sweet', 'cold'))
    (work / 'input.txt').write_text(text * 30)
    run('data/shakespeare_char/prepare.py', f'--input={work / "input.txt"}', f'--out_dir={work / "data" / "tiny"}',
        cwd=work)
    return work


def losses(stdout):
    return {int(it): float(val) for it, val in re.findall(r'step (\d+): train loss [\d.]+, val loss ([\d.]+)', stdout)}


@pytest.mark.parametrize('param', [[], ['--mup_base_width=16']])
def test_train_loss_falls_and_resume_continues(workdir, param):
    out_dir = workdir / ('out-mup' if param else 'out-sp')
    out = run('train.py', *TINY_MODEL, *param, '--max_iters=60', '--eval_interval=30', f'--out_dir={out_dir}',
              cwd=workdir)
    val = losses(out)
    assert set(val) == {0, 30, 60}
    assert val[60] < val[0] - 0.8, val # from ~ln(vocab) down to the easy structure of the text
    assert re.search(r'iter 59: loss [\d.]+, time [\d.]+ms, mfu', out)
    assert (out_dir / 'ckpt.pt').exists() and not (out_dir / 'ckpt.pt.tmp').exists()
    if param:
        assert 'muP, base width 16, m = 2' in out

    resumed = run('train.py', *TINY_MODEL, *param, '--max_iters=90', '--eval_interval=30', f'--out_dir={out_dir}',
                  '--init_from=resume', cwd=workdir)
    iters = [int(i) for i in re.findall(r'^iter (\d+):', resumed, flags=re.M)]
    assert iters[0] == 60 and iters[-1] == 90 # continues from the saved iter_num, not from 0
    assert losses(resumed)[90] < val[0] - 0.8


def test_sample_writes_text(workdir):
    out_dir = workdir / 'out-sample'
    run('train.py', *TINY_MODEL, '--max_iters=30', '--eval_interval=30', f'--out_dir={out_dir}', cwd=workdir)
    out = run('sample.py', f'--out_dir={out_dir}', '--start=ROMEO', '--num_samples=2', '--max_new_tokens=40',
              '--device=cpu', cwd=workdir)
    assert 'Loading meta from' in out # char-level decoding from the dataset's meta.pkl
    samples = [s for s in out.split('...\n', 1)[1].split('---------------') if s.strip()]
    assert len(samples) == 2 and all(s.strip().startswith('ROMEO') for s in samples)
    assert all(len(s.strip()) == len('ROMEO') + 40 for s in samples)


def test_missing_dataset_names_the_prepare_command(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'train.py'), '--dataset=nowhere', '--device=cpu'],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert 'python data/nowhere/prepare.py' in proc.stderr


def test_unknown_config_key_is_an_error(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'train.py'), '--learning_rat=1e-3'],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and 'learning_rate' in proc.stderr
