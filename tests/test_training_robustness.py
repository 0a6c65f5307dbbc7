"""Training that survives being killed and says what went wrong: exact resume after SIGKILL,
atomic checkpoints, graceful SIGINT/SIGTERM, the non-finite guard, clear errors, DDP equal to
gradient accumulation, wandb offline. Through the real train.py in subprocesses, as a user runs it,
on the tiny model and dataset of test_train.py."""
import glob
import json
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import time

import pytest
import torch

from conftest import MOE_TRAIN, ROOT, SCRIPT_ENV as ENV, TINY_TRAIN, ok, run_script, stops_with

TRAIN = [os.path.join(ROOT, 'train.py'), *TINY_TRAIN]
# dropout > 0: a resumed run must continue torch's RNG stream too, not just the batches
RESUMABLE = ['--dropout=0.1', '--eval_interval=10', '--keep_last_n=2']


def train(*args, cwd, env=ENV, launcher=(sys.executable,)):
    return run_script('train.py', *TINY_TRAIN, *args, cwd=cwd, env=env, launcher=launcher)


def start(*args, cwd):
    return subprocess.Popen([sys.executable, *TRAIN, *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV)


def read_until(proc, pattern):
    """Stdout lines up to the first that matches pattern (the process keeps running)."""
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if re.match(pattern, line):
            return ''.join(lines)
    raise AssertionError(f"{pattern!r} never printed:\n{''.join(lines)[-2000:]}{proc.stderr.read()[-3000:]}")


def rest_of_stdout(proc):
    """The stdout after read_until's, to the process's end, through the same buffered file: the
    lines read ahead into its buffer are there (communicate() would read the pipe beneath it and
    lose them, which a loaded machine makes likely)."""
    rest = proc.stdout.read()
    proc.wait(timeout=60)
    return rest


def iter_losses(stdout):
    """{iter: the loss exactly as printed}: comparing the strings compares the fp32 values bitwise."""
    return {int(it): loss for it, loss in re.findall(r'^iter (\d+): loss (\S+),', stdout, flags=re.M)}


def load(path):
    return torch.load(path, map_location='cpu', weights_only=False)


@pytest.fixture(scope='module')
def reference(workdir):
    """An uninterrupted run: iters 0..40, checkpoints at 10, 20, 30, 40."""
    out_dir = workdir / 'reference'
    return ok(train(*RESUMABLE, '--max_iters=40', f'--out_dir={out_dir}', cwd=workdir)), out_dir


def copy_run(reference, to):
    to.mkdir()
    shutil.copy(reference[1] / 'ckpt.pt', to / 'ckpt.pt')
    return to


def assert_resume_matches_reference(out_dir, reference, cwd, *args):
    """Resume out_dir to iter 40: every logged loss and the final weights equal the reference's bitwise."""
    k = load(out_dir / 'ckpt.pt')['iter_num']
    resumed = iter_losses(ok(train(*RESUMABLE, *args, '--max_iters=40', f'--out_dir={out_dir}', '--init_from=resume',
                                   cwd=cwd)))
    assert sorted(resumed) == list(range(k, 41))
    expected = iter_losses(reference[0])
    first_differing = next((it for it in sorted(resumed) if resumed[it] != expected[it]), None)
    assert first_differing is None, (first_differing, resumed, expected)
    final, final_reference = load(out_dir / 'ckpt.pt')['model'], load(reference[1] / 'ckpt.pt')['model']
    assert all(torch.equal(final[name], final_reference[name]) for name in final_reference)


def test_resume_after_sigkill_logs_the_same_losses_bitwise(workdir, reference):
    out_dir = workdir / 'killed'
    proc = start(*RESUMABLE, '--max_iters=1000', f'--out_dir={out_dir}', cwd=workdir)
    read_until(proc, r'iter 21:') # the checkpoint of iter 20 is written
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert 20 <= load(out_dir / 'ckpt.pt')['iter_num'] < 40
    assert_resume_matches_reference(out_dir, reference, workdir)


def test_resume_with_muon_after_sigkill_logs_the_same_losses_bitwise(workdir):
    """Muon for the hidden matrices and AdamW for the rest: both states and the schedule resume."""
    muon = ['--optimizer=muon', '--muon_lr_mult=4', '--mup_base_width=16']
    reference = ok(train(*RESUMABLE, *muon, '--max_iters=40', f'--out_dir={workdir / "muon-reference"}', cwd=workdir))
    out_dir = workdir / 'muon-killed'
    proc = start(*RESUMABLE, *muon, '--max_iters=1000', f'--out_dir={out_dir}', cwd=workdir)
    read_until(proc, r'iter 21:')
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    saved = load(out_dir / 'ckpt.pt')['optimizer']
    assert len(saved) == 2 and all(s['state'] for s in saved) # Muon's momentum and AdamW's moments
    assert_resume_matches_reference(out_dir, (reference, workdir / 'muon-reference'), workdir, *muon)
    proc = train(*RESUMABLE, '--mup_base_width=16', '--max_iters=41', f'--out_dir={out_dir}', '--init_from=resume',
                 cwd=workdir) # AdamW cannot take over Muon's state
    assert proc.returncode != 0 and "optimizer='adamw'" in proc.stderr and "optimizer='muon'" in proc.stderr


def test_sigterm_finishes_the_step_saves_and_resumes_exactly(workdir, reference):
    out_dir = workdir / 'sigterm'
    proc = start(*RESUMABLE, '--max_iters=1000', f'--out_dir={out_dir}', cwd=workdir)
    stdout = read_until(proc, r'iter 13:')
    proc.send_signal(signal.SIGTERM)
    stdout += rest_of_stdout(proc)
    assert proc.returncode == 0
    stopped = re.search(r'^SIGTERM: stopped before iter (\d+); checkpoint in (\S+),', stdout, flags=re.M)
    assert stopped and stopped[2] == str(out_dir / 'ckpt.pt'), stdout
    k = int(stopped[1])
    assert k % 10 and load(out_dir / 'ckpt.pt')['iter_num'] == k # saved by the stop, not by an eval
    assert max(iter_losses(stdout)) == k - 1 # the step it was in was finished
    assert_resume_matches_reference(out_dir, reference, workdir)


def test_sigint_finishes_the_step_saves_and_exits_0(workdir):
    out_dir = workdir / 'sigint'
    proc = start(*RESUMABLE, '--max_iters=1000', f'--out_dir={out_dir}', cwd=workdir)
    stdout = read_until(proc, r'iter 3:')
    proc.send_signal(signal.SIGINT)
    stdout += rest_of_stdout(proc)
    assert proc.returncode == 0
    k = int(re.search(r'^SIGINT: stopped before iter (\d+); checkpoint in ', stdout, flags=re.M)[1])
    assert max(iter_losses(stdout)) == k - 1 and load(out_dir / 'ckpt.pt')['iter_num'] == k


def test_sigkill_during_a_save_leaves_the_previous_checkpoint_loadable(workdir, tmp_path):
    """A checkpoint at every iter, of a model big enough that saving takes a while; killed the moment
    the directory changes after a completed save, i.e. while the next save is being written."""
    out_dir, log = tmp_path / 'out', tmp_path / 'log.txt'
    with open(log, 'w') as f:
        proc = subprocess.Popen([sys.executable, *TRAIN, '--n_layer=4', '--n_embd=256', '--eval_interval=1',
                                 '--eval_iters=1', '--max_iters=1000', f'--out_dir={out_dir}'], cwd=workdir,
                                stdout=f, stderr=subprocess.STDOUT, env=ENV)
    try:
        deadline = time.time() + 120
        while 'saved checkpoint' not in log.read_text():
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.01)
        def files():
            return {e.name: (e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(out_dir)}
        saved = files()
        while files() == saved:
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
    finally: # at once: the next save has just begun
        proc.kill()
        proc.wait()
    last_saved = [int(i) for i in re.findall(r'^step (\d+):', log.read_text(), flags=re.M)]
    assert load(out_dir / 'ckpt.pt')['iter_num'] in last_saved[-2:]


def test_keep_last_n_keeps_the_newest_numbered_checkpoints(reference):
    out_dir = reference[1]
    names = ['ckpt.pt', 'ckpt_000030.pt', 'ckpt_000040.pt'] # those of iters 10 and 20 were deleted
    assert sorted(os.listdir(out_dir)) == names
    assert [load(out_dir / name)['iter_num'] for name in names] == [40, 30, 40]


def test_nonfinite_loss_stops_naming_the_iter_and_groups_and_keeps_the_checkpoint(workdir, reference):
    out_dir = copy_run(reference, workdir / 'blowup')
    before = (out_dir / 'ckpt.pt').read_bytes()
    # lr 1e30 makes the weights ~1e30 at the step of iter 40, and the forward of iter 41 overflows
    proc = train(*RESUMABLE, '--learning_rate=1e30', '--max_iters=50', f'--out_dir={out_dir}', '--init_from=resume',
                 cwd=workdir)
    assert proc.returncode != 0
    assert re.search(r'^iter 41: non-finite loss nan or gradient norm nan \(param groups with non-finite '
                     r'gradients: embedding, hidden, vector\)\. Stopped; last good checkpoint: ', proc.stderr, re.M)
    assert '--skip_nonfinite=True' in proc.stderr
    assert (out_dir / 'ckpt.pt').read_bytes() == before and sorted(os.listdir(out_dir)) == ['ckpt.pt']


def test_skip_nonfinite_skips_counts_and_logs_and_saves_no_broken_eval(workdir, reference):
    out_dir = copy_run(reference, workdir / 'blowup-skip')
    proc = start(*RESUMABLE, '--learning_rate=1e30', '--skip_nonfinite=True', '--eval_interval=5', '--max_iters=1000',
                 f'--out_dir={out_dir}', '--init_from=resume', cwd=workdir)
    stdout = read_until(proc, r'iter 47:')
    proc.send_signal(signal.SIGTERM) # a stop saves wherever the run is: the state after the skipped steps
    stdout += rest_of_stdout(proc)
    assert proc.returncode == 0
    k = load(out_dir / 'ckpt.pt')['iter_num']
    skipped = re.findall(r'^iter (\d+): non-finite .*: step skipped \((\d+) skipped so far\)$', stdout, flags=re.M)
    assert skipped == [(str(i), str(i - 40)) for i in range(41, k)]
    # the eval at 45 was non-finite, so it did not replace the last good checkpoint; only the stop saved
    assert 'step 45: train loss nan, val loss nan' in stdout and stdout.count('saved checkpoint') == 1
    checkpoint = load(out_dir / 'ckpt.pt')
    assert checkpoint['skipped_steps'] == k - 41
    # iters 0..40 stepped, the rest did not touch the weights or AdamW's state
    assert {state['step'].item() for state in checkpoint['optimizer']['state'].values()} == {41}
    assert all(torch.isfinite(w).all() for w in checkpoint['model'].values())


def test_resume_with_other_model_settings_lists_the_differences(workdir, reference):
    proc = train(*RESUMABLE, '--n_embd=64', '--mup_base_width=16', '--attn_backend=dense', f'--out_dir={reference[1]}',
                 '--init_from=resume', cwd=workdir)
    assert proc.returncode != 0
    differences = re.findall(r'^  (\w+): checkpoint (.*) vs requested (.*)$', proc.stderr, flags=re.M)
    assert differences == [('n_embd', '32', '64'), ('mup_base_width', '0', '16')] # attn_backend may change
    assert 'config file and flags of the run that wrote it' in proc.stderr


@pytest.mark.parametrize('damage', ['truncated', 'garbage'])
def test_truncated_or_corrupt_checkpoint_says_so(workdir, reference, damage, monkeypatch):
    out_dir = workdir / damage
    out_dir.mkdir()
    data = (reference[1] / 'ckpt.pt').read_bytes()
    broken = data[:len(data) // 2] if damage == 'truncated' else random.Random(0).randbytes(len(data))
    (out_dir / 'ckpt.pt').write_bytes(broken)
    line = stops_with('train.py', *TINY_TRAIN, *RESUMABLE, f'--out_dir={out_dir}', '--init_from=resume', cwd=workdir,
                      monkeypatch=monkeypatch) # the message, not torch.load's traceback
    assert f'{out_dir}/ckpt.pt is truncated or corrupt' in line


def test_unwritable_out_dir_fails_before_training(workdir, tmp_path, monkeypatch):
    (tmp_path / 'a_file').write_text('')
    line = stops_with('train.py', *TINY_TRAIN, f'--out_dir={tmp_path / "a_file" / "out"}', cwd=workdir,
                      monkeypatch=monkeypatch)
    assert 'is not a writable directory' in line and '--out_dir=' in line


@pytest.mark.parametrize('optimizer, block', [('adamw', ()), ('muon', ()), ('muon', MOE_TRAIN)], ids=['adamw', 'muon', 'moe'])
def test_ddp_two_processes_match_one_process_with_accumulation(workdir, optimizer, block):
    # the same global batch: 2 micro-batches, accumulated in one process or one per process
    args = ['--gradient_accumulation_steps=2', '--max_iters=19', '--eval_interval=100', f'--optimizer={optimizer}', *block]
    name = optimizer + ('-moe' if block else '')
    one = iter_losses(ok(train(*args, f'--out_dir={workdir / ("one" + name)}', cwd=workdir)))
    torchrun = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']
    two = iter_losses(ok(train(*args, f'--out_dir={workdir / ("ddp" + name)}', cwd=workdir, launcher=torchrun)))
    assert sorted(one) == sorted(two) == list(range(20))
    assert max(abs(float(one[i]) - float(two[i])) for i in one) < 1e-5, (one, two)


def wandb_records(run_dir):
    """The records of an offline run's .wandb file (LevelDB log format: 32 KiB blocks of chunks
    with a 7-byte header crc32, length, type; types 1 = whole record, 2/3/4 = first/middle/last)."""
    from wandb.proto.wandb_internal_pb2 import Record
    data = open(glob.glob(os.path.join(run_dir, 'run-*.wandb'))[0], 'rb').read()
    assert data[:4] == b':W&B'
    pos, parts = 7, b''
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7: # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack('<IHB', data[pos:pos + 7])
        parts += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            yield Record.FromString(parts)
            parts = b''


def test_wandb_offline_logs_losses_lr_per_group_mup_settings_and_mfu(workdir, tmp_path):
    env = {**ENV, 'WANDB_MODE': 'offline', 'WANDB_DIR': str(tmp_path), 'WANDB_SILENT': 'true'}
    ok(train('--mup_base_width=16', '--wandb_log=True', '--max_iters=10', '--eval_interval=10',
             f'--out_dir={tmp_path / "out"}', cwd=workdir, env=env))
    run_dir, = glob.glob(str(tmp_path / 'wandb' / 'offline-run-*'))
    config, history = {}, []
    for record in wandb_records(run_dir):
        if record.WhichOneof('record_type') == 'run':
            config = {u.key: json.loads(u.value_json) for u in record.run.config.update}
        if record.WhichOneof('record_type') == 'history':
            # keys with a '/' come as nested_key
            history.append({i.key or '/'.join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    assert config['mup_base_width'] == 16 and config['width_mult'] == 2.0
    assert config['lr_scale/hidden'] == 0.5 and config['lr_scale/embedding'] == config['lr_scale/vector'] == 1.0
    evals = [h for h in history if 'val/loss' in h]
    assert [h['iter'] for h in evals] == [0, 10] and evals[1]['val/loss'] < evals[0]['val/loss']
    iters = [h for h in history if 'loss' in h]
    assert [h['iter'] for h in iters] == list(range(11))
    # muP: the hidden matrices train at lr / m, the other groups at lr
    assert all(h['lr/hidden'] == pytest.approx(h['lr/embedding'] / 2) and h['lr/embedding'] == h['lr/vector']
               for h in iters)
    assert iters[-1]['mfu'] > 0 and all(h['skipped_steps'] == 0 for h in iters)
