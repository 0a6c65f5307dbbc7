"""Bad input never trains silently: every class of configuration or input error stops train.py
and sample.py before any work, with one line that names the key or file, the problem and the
fix, no traceback, and a non-zero exit. So does a checkpoint that cannot be written (a full
disk), keeping the last good one. A real bug still shows its traceback.

That a UserError reaches the user as that one line is checked in subprocesses, as a user runs
the scripts (one_line_error); which error each bad input raises is checked in this process
(stops_with), since a subprocess spends seconds importing torch for each."""
import ast
import os
import pickle
import re
import shutil

import numpy as np
import pytest
import torch

from conftest import ROOT, SCRIPT_ENV, TINY_TRAIN, ok, run_script, stops_with


def error_line(proc):
    """The message of a process that stopped on a UserError: exactly one `error:` line."""
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert 'Traceback' not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), proc.stderr
    return lines[0]


def one_line_error(proc):
    """The message of a process that stopped on a UserError before training."""
    line = error_line(proc)
    assert 'iter 0' not in proc.stdout # nothing trained
    return line


@pytest.mark.parametrize('flag, wanted', [
    ('--gradient_accumulation_steps=0', 'gradient_accumulation_steps=0: must be an integer >= 1'),
    ('--eval_iters=0', 'eval_iters=0: must be an integer >= 1'),
    ('--batch_size=0', 'batch_size=0: must be an integer >= 1'),
    ('--learning_rate=1e400', 'learning_rate=inf: must be a finite number >= 0'),
    ('--beta2=1.0', 'beta2=1.0: must be in [0, 1)'),
    ('--dtype=float8', "dtype='float8': must be 'auto', 'float32', 'bfloat16' or 'float16'"),
    ('--device=tpu', "device='tpu': use 'auto', 'cpu', 'cuda', 'cuda:<index>' or 'mps'"),
    ('--device=meta', "device='meta': use 'auto', 'cpu', 'cuda', 'cuda:<index>' or 'mps'"),
    pytest.param('--device=cuda', "device='cuda', but this machine has no CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason='a CUDA machine')),
    pytest.param('--device=mps', "device='mps', but MPS is not available here",
                 marks=pytest.mark.skipif(torch.backends.mps.is_available(), reason='an MPS machine')),
    ('--optimizer=sgd', "optimizer='sgd': must be 'adamw' or 'muon'"),
    ('--warmup_iters=6000', 'lr_decay_iters=5000: must be larger than warmup_iters'),
    ('--block_size=5000', 'block_size=5000: data/tiny/val.bin holds only'),
    ('--n_embd=33', 'n_embd=33 is not divisible by n_head=2'),
    ('--attn_mod=soft_cap:inf', "attn_mod='soft_cap:inf': write a cap, a positive finite number"),
    ('--attn_cls=nowhere.py:Attention', "attn_cls='nowhere.py:Attention': nowhere.py not found"),
    ('--attn_cls=model:GPT', "attn_cls='model:GPT': GPT is not a subclass of model.MuPFlexAttention"),
])
def test_bad_settings_stop_train_py_with_one_line(workdir, monkeypatch, flag, wanted):
    assert wanted in stops_with('train.py', *TINY_TRAIN, flag, cwd=workdir, monkeypatch=monkeypatch)


def test_a_bad_setting_reaches_the_user_as_one_line_and_a_nonzero_exit(workdir):
    wanted = "optimizer='sgd': must be 'adamw' or 'muon'"
    assert wanted in one_line_error(run_script('train.py', *TINY_TRAIN, '--optimizer=sgd', cwd=workdir))


def test_torchrun_without_enough_accumulation_says_what_to_pass(workdir, monkeypatch):
    line = stops_with('train.py', *TINY_TRAIN, '--gradient_accumulation_steps=3', cwd=workdir, monkeypatch=monkeypatch,
                      env={'RANK': '0', 'LOCAL_RANK': '0', 'WORLD_SIZE': '2'})
    assert 'gradient_accumulation_steps=3: must be a multiple of the number of processes (2)' in line


def test_the_docstring_torchrun_commands_pass_the_accumulation_they_need():
    """Each example would otherwise stop at once; the two-node one is shown for both nodes."""
    with open(f'{ROOT}/train.py') as f:
        docstring = ast.get_docstring(ast.parse(f.read()))
    commands = [line for line in docstring.replace('\\\n', ' ').splitlines()
                if line.startswith('$ torchrun')]
    assert len(commands) == 4 # one node, two nodes (each), FSDP
    for command in commands:
        flags = dict(re.findall(r'--(\w+)=(\S+)', command))
        processes = int(flags['nproc_per_node']) * int(flags.get('nnodes', 1))
        assert int(flags['gradient_accumulation_steps']) % processes == 0, command
    assert [dict(re.findall(r'--(\w+)=(\S+)', c)).get('node_rank') for c in commands] == [None, '0', '1', None]


def test_a_config_file_with_a_syntax_error_names_the_file_and_line(workdir, tmp_path):
    bad = tmp_path / 'bad.py'
    bad.write_text("batch_size = 8\nlearning_rate = (1e-3\n")
    line = one_line_error(run_script('train.py', str(bad), cwd=workdir))
    assert f"config file {bad}, line 2: SyntaxError" in line


def test_a_config_file_that_raises_names_the_file_and_line(workdir, tmp_path, monkeypatch):
    bad = tmp_path / 'bad.py'
    bad.write_text("import math\nbatch_size = 8\nlearning_rate = math.sqrt(-1)\n")
    line = stops_with('train.py', str(bad), cwd=workdir, monkeypatch=monkeypatch)
    assert f"config file {bad}, line 3: ValueError: math domain error" in line


def test_a_real_bug_keeps_its_traceback(workdir, tmp_path):
    """Not every exception is a configuration error: one from the code itself shows where it is."""
    sitecustomize = tmp_path / 'sitecustomize.py' # breaks the model at import time, as a bug would
    sitecustomize.write_text("import torch\ntorch.nn.functional.cross_entropy = lambda *a, **k: 1 / 0\n")
    env = {**SCRIPT_ENV, 'PYTHONPATH': str(tmp_path)}
    proc = run_script('train.py', *TINY_TRAIN, '--max_iters=1', f'--out_dir={tmp_path / "out"}', cwd=workdir, env=env)
    assert proc.returncode != 0 and 'Traceback' in proc.stderr and 'ZeroDivisionError' in proc.stderr


def tokens_of(path):
    return np.fromfile(path, dtype=np.uint16)


def odd_size(data):
    with open(data / 'train.bin', 'ab') as f:
        f.write(b'\0') # a truncated or foreign file: half a token at the end
    return f"{data / 'train.bin'} is {(data / 'train.bin').stat().st_size} bytes, an odd number"


def token_of_vocab_size(split):
    """A token id one past the last one meta.pkl's vocabulary has (an IndexError in training)."""
    def damage(data):
        with open(data / 'meta.pkl', 'rb') as f:
            vocab_size = pickle.load(f)['vocab_size']
        tokens = tokens_of(data / f'{split}.bin')
        tokens[len(tokens) // 2] = vocab_size
        tokens.tofile(data / f'{split}.bin')
        return (f"{data / f'{split}.bin'} holds token id {vocab_size}, but the vocabulary has only "
                f"{vocab_size} ids (vocab_size in {data / 'meta.pkl'})")
    return damage


def gpt2_data_with_a_token_past_50304(data):
    """Without meta.pkl the vocabulary is GPT-2's, padded: 50304 ids."""
    (data / 'meta.pkl').unlink()
    tokens = tokens_of(data / 'val.bin')
    tokens[-1] = 50304
    tokens.tofile(data / 'val.bin')
    return f"{data / 'val.bin'} holds token id 50304, but the vocabulary has only 50304 ids (GPT-2's"


def unreadable_meta(data):
    (data / 'meta.pkl').write_bytes(b'not a pickle')
    return f"{data / 'meta.pkl'} cannot be read (UnpicklingError"


@pytest.mark.parametrize('damage', [odd_size, token_of_vocab_size('train'), token_of_vocab_size('val'),
                                    gpt2_data_with_a_token_past_50304, unreadable_meta],
                         ids=['odd_size', 'train_token', 'val_token', 'gpt2_token', 'bad_meta'])
def test_a_bad_dataset_file_stops_train_py_naming_the_file(workdir, tmp_path, monkeypatch, damage):
    """Data that would crash mid-training (a memmap error, an IndexError, on CUDA a device-side
    assert) is found before training; the message names the file and how to prepare it again."""
    shutil.copytree(workdir / 'data' / 'tiny', tmp_path / 'data' / 'tiny')
    wanted = damage(tmp_path / 'data' / 'tiny').replace(f'{tmp_path}/', '') # as train.py names it
    line = stops_with('train.py', *TINY_TRAIN, '--max_iters=2', cwd=tmp_path, monkeypatch=monkeypatch)
    assert wanted in line
    assert 'python data/tiny/prepare.py' in line or 'meta.pkl holding its vocab_size' in line


@pytest.fixture(scope='module')
def trained(workdir):
    out_dir = workdir / 'out-errors'
    ok(run_script('train.py', *TINY_TRAIN, '--max_iters=5', '--eval_interval=5', f'--out_dir={out_dir}', cwd=workdir))
    return out_dir


# torch.save as it fails on a full disk when the file object's close has nothing left to flush:
# part of the file written, then the zip writer's RuntimeError raised while handling the OSError
ZIP_WRITER_FAILS = """import torch
def save(obj, f, *args, **kwargs):
    f.write(b'part of a checkpoint')
    try:
        raise OSError(28, 'No space left on device')
    except OSError: # what torch's zip writer raises on its way out of a failed write
        raise RuntimeError('[enforce fail at inline_container.cc] unexpected pos 64 vs 0')
torch.save = save
"""


@pytest.mark.parametrize('fault', ['dev_full', 'zip_writer'])
def test_a_full_disk_at_a_save_removes_the_partial_file_and_keeps_the_last_checkpoint(workdir, trained,
                                                                                      tmp_path, fault):
    """The save at iter 10 fails: the temporary file is a link to /dev/full, where every write
    fails with ENOSPC, or torch.save fails as its zip writer does after a failed write."""
    out_dir = tmp_path / 'out'
    out_dir.mkdir()
    shutil.copy(trained / 'ckpt.pt', out_dir / 'ckpt.pt') # the last good checkpoint, of iter 5
    env = SCRIPT_ENV
    if fault == 'dev_full':
        if not os.path.exists('/dev/full'):
            pytest.skip('needs /dev/full')
        os.symlink('/dev/full', out_dir / 'ckpt.pt.tmp')
    else:
        (tmp_path / 'sitecustomize.py').write_text(ZIP_WRITER_FAILS)
        env = {**SCRIPT_ENV, 'PYTHONPATH': str(tmp_path)}
    proc = run_script('train.py', *TINY_TRAIN, '--max_iters=20', '--eval_interval=5', f'--out_dir={out_dir}',
                      '--init_from=resume', cwd=workdir, env=env)
    line = error_line(proc)
    assert 'step 10:' in proc.stdout and 'iter 10:' not in proc.stdout # it stopped at that save
    assert f"saving the checkpoint of iter 10 to {out_dir}/ckpt.pt.tmp failed" in line
    assert '[Errno 28] No space left on device' in line and '--init_from=resume' in line
    assert f"{out_dir}/ckpt.pt is the last good checkpoint" in line
    assert not os.path.lexists(out_dir / 'ckpt.pt.tmp')
    assert torch.load(out_dir / 'ckpt.pt', map_location='cpu', weights_only=False)['iter_num'] == 5


@pytest.mark.parametrize('flag, wanted', [
    ('--start=FILE:no_such_prompt.txt', "the prompt file 'no_such_prompt.txt' does not exist"),
    ('--temperature=-1.0', 'temperature=-1.0: must be a finite number >= 0 (0 = greedy)'),
    ('--num_samples=0', 'num_samples=0: must be an integer >= 1'),
    ('--start=ROMEO\u00e9', 'contains characters not in the tiny vocabulary'),
])
def test_bad_settings_stop_sample_py_with_one_line(workdir, trained, monkeypatch, flag, wanted):
    assert wanted in stops_with('sample.py', f'--out_dir={trained}', '--device=cpu', flag, cwd=workdir,
                                monkeypatch=monkeypatch)


@pytest.mark.parametrize('text, wanted', [
    (b'', 'is empty: the model needs at least one token'),
    ('ROMEO\u00e9'.encode(), "contains characters not in the tiny vocabulary: ['\u00e9']"),
    ('ROMEO\u00e9 night'.encode('latin-1'), 'is not UTF-8 text (invalid continuation byte at byte 5)'),
], ids=['empty', 'unknown_character', 'not_utf8'])
def test_a_bad_prompt_file_stops_sample_py_naming_it(workdir, trained, tmp_path, monkeypatch, text, wanted):
    prompt = tmp_path / 'prompt.txt'
    prompt.write_bytes(text)
    line = stops_with('sample.py', f'--out_dir={trained}', '--device=cpu', f'--start=FILE:{prompt}', cwd=workdir,
                      monkeypatch=monkeypatch)
    assert f"the prompt file '{prompt}'" in line and wanted in line


@pytest.mark.parametrize('damage, wanted', [
    ('garbage', 'is truncated or corrupt, it cannot be loaded'),
    ('foreign', 'is not a checkpoint of train.py (missing model, model_args)'),
])
def test_a_broken_checkpoint_stops_sample_py_naming_it(workdir, tmp_path, damage, wanted):
    """In a subprocess: sample.py's one-line errors reach the user as train.py's do."""
    ckpt = tmp_path / 'out' / 'ckpt.pt'
    ckpt.parent.mkdir()
    if damage == 'garbage':
        ckpt.write_bytes(b'\x00garbage' * 100)
    else: # loadable, but not what train.py saves
        torch.save({'weights': torch.zeros(3)}, ckpt)
    line = one_line_error(run_script('sample.py', f'--out_dir={ckpt.parent}', '--device=cpu', cwd=workdir))
    assert f"{ckpt} {wanted}" in line


def test_sample_with_temperature_0_is_greedy_and_repeatable(workdir, trained):
    outputs = [ok(run_script('sample.py', f'--out_dir={trained}', '--device=cpu', '--temperature=0', '--num_samples=2',
                             '--max_new_tokens=20', f'--seed={seed}', '--start=ROMEO', cwd=workdir)) for seed in (1, 2)]
    samples = [[s.strip() for s in out.split('...\n', 1)[1].split('---------------') if s.strip()] for out in outputs]
    assert samples[0] == samples[1] and samples[0][0] == samples[0][1] # no randomness left
