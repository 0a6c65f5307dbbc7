"""Bad input never trains silently: every class of configuration or input error stops train.py
and sample.py before any work, with one line that names the key, the value and the fix, no
traceback, and a non-zero exit. A real bug still shows its traceback."""
import pytest

from conftest import ROOT, SCRIPT_ENV, TINY_TRAIN, ok, run_script


def one_line_error(proc):
    """The message of a process that stopped on a ConfigError: exactly one `error:` line."""
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert 'Traceback' not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), proc.stderr
    assert 'iter 0' not in proc.stdout # nothing trained
    return lines[0]


@pytest.mark.parametrize('flag, wanted', [
    ('--gradient_accumulation_steps=0', 'gradient_accumulation_steps=0: must be an integer >= 1'),
    ('--eval_iters=0', 'eval_iters=0: must be an integer >= 1'),
    ('--batch_size=0', 'batch_size=0: must be an integer >= 1'),
    ('--learning_rate=1e400', 'learning_rate=inf: must be a finite number >= 0'),
    ('--beta2=1.0', 'beta2=1.0: must be in [0, 1)'),
    ('--dtype=float8', "dtype='float8': must be 'auto', 'float32', 'bfloat16' or 'float16'"),
    ('--device=tpu', "device='tpu': use 'auto', 'cpu', 'cuda', 'cuda:<index>' or 'mps'"),
    ('--device=cuda', "device='cuda', but this machine has no CUDA device"),
    ('--optimizer=sgd', "optimizer='sgd': must be 'adamw' or 'muon'"),
    ('--warmup_iters=6000', 'lr_decay_iters=5000: must be larger than warmup_iters'),
    ('--block_size=5000', 'block_size=5000: data/tiny/val.bin holds only'),
    ('--n_embd=33', 'n_embd=33 is not divisible by n_head=2'),
    ('--attn_mod=soft_cap:inf', "attn_mod='soft_cap:inf': write a cap, a positive finite number"),
])
def test_bad_settings_stop_train_py_with_one_line(workdir, flag, wanted):
    assert wanted in one_line_error(run_script('train.py', *TINY_TRAIN, flag, cwd=workdir))


def test_torchrun_example_without_enough_accumulation_says_what_to_pass(workdir):
    # the docstring's own example must not stop at once: its flag is part of it
    proc = run_script('train.py', *TINY_TRAIN, '--gradient_accumulation_steps=3', cwd=workdir,
                      env={**SCRIPT_ENV, 'RANK': '0', 'LOCAL_RANK': '0', 'WORLD_SIZE': '2'})
    assert 'gradient_accumulation_steps=3: must be a multiple of the number of processes (2)' in one_line_error(proc)
    with open(f'{ROOT}/train.py') as f:
        assert '--nproc_per_node=4 train.py config/shakespeare_mup.py --gradient_accumulation_steps=4' in f.read()


def test_a_config_file_with_a_syntax_error_names_the_file_and_line(workdir, tmp_path):
    bad = tmp_path / 'bad.py'
    bad.write_text("batch_size = 8\nlearning_rate = (1e-3\n")
    line = one_line_error(run_script('train.py', str(bad), cwd=workdir))
    assert f"config file {bad}, line 2: SyntaxError" in line


def test_a_config_file_that_raises_names_the_file_and_line(workdir, tmp_path):
    bad = tmp_path / 'bad.py'
    bad.write_text("import math\nbatch_size = 8\nlearning_rate = math.sqrt(-1)\n")
    line = one_line_error(run_script('train.py', str(bad), cwd=workdir))
    assert f"config file {bad}, line 3: ValueError: math domain error" in line


def test_a_real_bug_keeps_its_traceback(workdir, tmp_path):
    """Not every exception is a configuration error: one from the code itself shows where it is."""
    sitecustomize = tmp_path / 'sitecustomize.py' # breaks the model at import time, as a bug would
    sitecustomize.write_text("import torch\ntorch.nn.functional.cross_entropy = lambda *a, **k: 1 / 0\n")
    env = {**SCRIPT_ENV, 'PYTHONPATH': str(tmp_path)}
    proc = run_script('train.py', *TINY_TRAIN, '--max_iters=1', f'--out_dir={tmp_path / "out"}', cwd=workdir, env=env)
    assert proc.returncode != 0 and 'Traceback' in proc.stderr and 'ZeroDivisionError' in proc.stderr


@pytest.fixture(scope='module')
def trained(workdir):
    out_dir = workdir / 'out-errors'
    ok(run_script('train.py', *TINY_TRAIN, '--max_iters=5', '--eval_interval=5', f'--out_dir={out_dir}', cwd=workdir))
    return out_dir


@pytest.mark.parametrize('flag, wanted', [
    ('--start=FILE:no_such_prompt.txt', "the prompt file 'no_such_prompt.txt' does not exist"),
    ('--temperature=-1.0', 'temperature=-1.0: must be a finite number >= 0 (0 = greedy)'),
    ('--num_samples=0', 'num_samples=0: must be an integer >= 1'),
    ('--start=ROMEO\u00e9', 'contains characters not in the tiny vocabulary'),
])
def test_bad_settings_stop_sample_py_with_one_line(workdir, trained, flag, wanted):
    proc = run_script('sample.py', f'--out_dir={trained}', '--device=cpu', flag, cwd=workdir)
    assert wanted in one_line_error(proc)


def test_sample_with_temperature_0_is_greedy_and_repeatable(workdir, trained):
    outputs = [ok(run_script('sample.py', f'--out_dir={trained}', '--device=cpu', '--temperature=0', '--num_samples=2',
                             '--max_new_tokens=20', f'--seed={seed}', '--start=ROMEO', cwd=workdir)) for seed in (1, 2)]
    samples = [[s.strip() for s in out.split('...\n', 1)[1].split('---------------') if s.strip()] for out in outputs]
    assert samples[0] == samples[1] and samples[0][0] == samples[0][1] # no randomness left
