"""FSDP2 (train.py --fsdp=True under torchrun): on 2 gloo processes it trains the model one
process trains with the same global batch, with AdamW and with Muon, muP on; the muP groups are
those of one process; Muon orthogonalizes whole matrices (torch's Muon, on shards, does not);
each process writes its shards of a checkpoint, which resumes exactly, resumes at another number
of processes, and is read by sample.py on one process."""
import os
import re
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

import checkpoints
from conftest import MOE_TRAIN, ROOT, SCRIPT_ENV, TINY_TRAIN, ok, run_script, stops_with

TORCHRUN = (sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2')
TORCHRUN_ONE = (*TORCHRUN[:-1], '--nproc_per_node=1')
MUP = ['--n_embd=32', '--mup_base_width=16', '--gradient_accumulation_steps=2', '--eval_interval=10']


def train(*args, cwd, launcher=(sys.executable,)):
    return ok(run_script('train.py', *TINY_TRAIN, *MUP, *args, cwd=cwd, launcher=launcher))


def iter_losses(stdout):
    return {int(it): float(loss) for it, loss in re.findall(r'^iter (\d+): loss (\S+),', stdout, flags=re.M)}


def listing(out_dir):
    """out_dir's entries, each sharded directory's random token as '*'."""
    return sorted(re.sub(r'_[0-9a-f]{8}\.dcp$', '_*.dcp', name) for name in os.listdir(out_dir))


def sharded_directory(out_dir):
    return out_dir / torch.load(out_dir / 'ckpt.pt', weights_only=False)['sharded']


def group_lines(stdout):
    return [line for line in stdout.splitlines() if line.startswith('param group ')]


@pytest.mark.parametrize('optimizer, block', [('adamw', ()), ('muon', ()), ('muon', MOE_TRAIN)], ids=['adamw', 'muon', 'moe'])
def test_two_fsdp_processes_train_the_model_of_one(workdir, optimizer, block):
    """The same global batch (2 micro-batches): accumulated in one process, or one per FSDP
    process. Losses at each of 11 iterations within 1e-4 (measured: 0, as printed); the param groups
    printed (names, sizes, lr_scale, weight decay, eps) are the same. The 2 processes' sharded
    checkpoint of iter 10 (their last) resumes on 1 FSDP process (resharded on load) to the one
    process's losses; its next save removes the directory of the old one and a half-written one.
    The mixture of experts: its experts sharded like any weight, each orthogonalised whole by Muon."""
    args = [f'--optimizer={optimizer}', '--muon_lr_mult=4', *block]
    optimizer = optimizer + ('-moe' if block else '') # names the run's out_dir
    one = train(*args, '--max_iters=19', f'--out_dir={workdir / ("fsdp-one-" + optimizer)}', cwd=workdir)
    two = train(*args, '--max_iters=10', '--fsdp=True', f'--out_dir={workdir / ("fsdp-two-" + optimizer)}',
                cwd=workdir, launcher=TORCHRUN)
    one_losses, two_losses = iter_losses(one), iter_losses(two)
    assert sorted(one_losses) == list(range(20)) and sorted(two_losses) == list(range(11))
    worst = max(abs(one_losses[i] - two_losses[i]) for i in two_losses)
    print(f"{optimizer}: max |loss difference| {worst:.3g}")
    assert worst < 1e-4, (worst, one_losses, two_losses)
    assert group_lines(two) == group_lines(one) and len(group_lines(one)) >= 3

    two_dir = workdir / ("fsdp-two-" + optimizer)
    assert listing(two_dir) == ['ckpt.pt', 'ckpt_000010_*.dcp']
    (two_dir / 'ckpt_000015_0badc0de.dcp').mkdir() # as a save killed before its metadata leaves it
    (two_dir / 'ckpt_000015_0badc0de.dcp' / '__0_0.distcp').write_bytes(b'partial')
    resumed = iter_losses(train(*args, '--max_iters=20', '--fsdp=True', '--init_from=resume',
                                '--keep_last_n=1', f'--out_dir={two_dir}', cwd=workdir, launcher=TORCHRUN_ONE))
    assert sorted(resumed) == list(range(10, 21))
    worst = max(abs(resumed[i] - one_losses[i]) for i in range(10, 20))
    print(f"{optimizer}: resumed on 1 process, max |loss difference| {worst:.3g}")
    assert worst < 1e-4, (worst, resumed, one_losses)
    assert listing(two_dir) == ['ckpt.pt', 'ckpt_000020.pt', 'ckpt_000020_*.dcp']


MUON_ON_SHARDS = textwrap.dedent('''
    import gc, sys
    import torch, torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    sys.path.insert(0, {root!r})
    from muon import Muon
    dist.init_process_group('gloo')
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 32, bias=False) # 32 x 16: each of 2 processes holds 16 rows
    start = layer.weight.detach().clone()
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    fully_shard(layer)
    optimizer = {optimizer}([layer.weight], lr=0.1, weight_decay=0.0, momentum=0.9)
    layer(x).square().sum().backward()
    optimizer.step()
    full = layer.weight.full_tensor()
    if dist.get_rank() == 0:
        torch.save(dict(start=start, after=full, x=x), {out!r})
    # Free the sharded tensors while the process group lives: left to the interpreter's exit, after
    # destroy_process_group, torch's Muon's leftovers aborted a process about 1 run in 25 on a
    # loaded 2-core machine ("terminate called without an active exception"); 0 in 70 with this.
    del optimizer, layer, full
    gc.collect()
    dist.barrier() # no process tears down while another still talks to it
    dist.destroy_process_group()
''')


@pytest.mark.parametrize('optimizer, equal', [('Muon', True), ('torch.optim.Muon', False)])
def test_muon_orthogonalizes_whole_matrices_under_fsdp(tmp_path, optimizer, equal):
    """One step on a sharded 32 x 16 Linear, 2 gloo processes, against the same step on one
    process: the project's Muon gathers each matrix (equal within 1e-6); torch's orthogonalizes
    each process's shard, which is not a shard of the orthogonal factor (off by a large part of
    the update)."""
    out = tmp_path / 'after.pt'
    script = tmp_path / 'muon_on_shards.py'
    script.write_text(MUON_ON_SHARDS.format(root=ROOT, optimizer=optimizer, out=str(out)))
    proc = subprocess.run([*TORCHRUN, str(script)], capture_output=True, text=True, timeout=120,
                          env=SCRIPT_ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = torch.load(out)
    layer = torch.nn.Linear(16, 32, bias=False)
    with torch.no_grad():
        layer.weight.copy_(saved['start'])
    reference = {'Muon': __import__('muon').Muon, 'torch.optim.Muon': torch.optim.Muon}[optimizer]
    one = reference([layer.weight], lr=0.1, weight_decay=0.0, momentum=0.9)
    layer(saved['x']).square().sum().backward()
    one.step()
    difference = (saved['after'] - layer.weight).abs().max().item()
    update = (layer.weight - saved['start']).abs().max().item()
    if equal:
        assert difference < 1e-6, difference
    else:
        assert difference > 0.1 * update, (difference, update)


def kill_every_process_of(command_line_part):
    """SIGKILL, at once, every process whose command line holds `command_line_part`."""
    for pid in filter(str.isdigit, os.listdir('/proc')):
        try:
            with open(f'/proc/{pid}/cmdline', 'rb') as f:
                command_line = f.read()
        except OSError: # gone meanwhile
            continue
        if command_line_part.encode() in command_line:
            os.kill(int(pid), signal.SIGKILL)


def test_an_fsdp_run_killed_resumes_exactly_and_samples_on_one_process(workdir):
    """Under FSDP, with Muon and dropout: killed with SIGKILL (torchrun and both workers) after
    its checkpoint at iter 10, then resumed: the same losses, to the printed bit, as the run that
    went on. Each process wrote its own shard file. sample.py and analyze_jacobian.py read the
    FSDP checkpoint on one process: the weights torch's own converter puts together."""
    args = ['--optimizer=muon', '--muon_lr_mult=4', '--dropout=0.1', '--fsdp=True']
    full_dir, cut_dir = workdir / 'fsdp-full', workdir / 'fsdp-killed'
    full = iter_losses(train(*args, '--max_iters=19', f'--out_dir={full_dir}', cwd=workdir, launcher=TORCHRUN))
    command = [*TORCHRUN, f'{ROOT}/train.py', *TINY_TRAIN, *MUP, *args, '--max_iters=1000', f'--out_dir={cut_dir}']
    proc = subprocess.Popen(command,
                            cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=SCRIPT_ENV)
    for line in proc.stdout: # up to the first iteration after the checkpoint of iter 10
        if line.startswith('iter 12:'):
            break
    kill_every_process_of(str(cut_dir)) # torchrun's workers run in process groups of their own
    proc.wait()
    saved = torch.load(cut_dir / 'ckpt.pt', weights_only=False)
    assert saved['iter_num'] == 10 and 'model' not in saved and listing(cut_dir) == ['ckpt.pt', 'ckpt_000010_*.dcp']
    shard_files = sorted(p.name for p in sharded_directory(cut_dir).glob('*.distcp'))
    assert shard_files == ['__0_0.distcp', '__1_0.distcp']
    resumed = iter_losses(train(*args, '--max_iters=19', f'--out_dir={cut_dir}', '--init_from=resume', cwd=workdir,
                                launcher=TORCHRUN))
    assert sorted(resumed) == list(range(10, 20))
    assert all(resumed[i] == full[i] for i in resumed), (resumed, full)
    sampled = ok(run_script('sample.py', f'--out_dir={cut_dir}', '--device=cpu', '--num_samples=1',
                            '--max_new_tokens=20', cwd=workdir))
    assert sampled.count('---------------') == 1
    model, checkpoint = checkpoints.load_run(str(cut_dir), 'cpu') # what sample.py and analyze_jacobian.py load
    assert checkpoint['config']['dataset'] == 'tiny'
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    dcp_to_torch_save(sharded_directory(cut_dir), workdir / 'fsdp-killed-whole.pt')
    whole = torch.load(workdir / 'fsdp-killed-whole.pt', weights_only=False)['model']
    assert sorted(whole) == sorted(model.state_dict())
    assert all(torch.equal(p, whole[name]) for name, p in model.state_dict().items())
    # and export_hf.py reads it too: transformers computes the muP model's logits
    from test_hf import exported_logits_difference
    ok(run_script('export_hf.py', f'--out_dir={cut_dir}', f'--hf_dir={workdir / "fsdp-killed-hf"}', cwd=workdir))
    assert exported_logits_difference(cut_dir, workdir / 'fsdp-killed-hf') <= 1e-5


def test_resuming_an_fsdp_checkpoint_without_fsdp_says_how(workdir, monkeypatch):
    out_dir = workdir / 'fsdp-mismatch'
    train('--fsdp=True', '--max_iters=10', f'--out_dir={out_dir}', cwd=workdir, launcher=TORCHRUN)
    line = stops_with('train.py', *TINY_TRAIN, *MUP, '--max_iters=12', f'--out_dir={out_dir}', '--init_from=resume',
                      cwd=workdir, monkeypatch=monkeypatch)
    assert line.startswith("fsdp=False: ") and '--fsdp=True' in line


def test_fsdp_without_torchrun_says_how_to_launch(workdir, monkeypatch):
    assert 'torchrun' in stops_with('train.py', *TINY_TRAIN, '--fsdp=True', cwd=workdir, monkeypatch=monkeypatch)


def train_until_a_failed_save(fault, workdir, tmp_path):
    """2 FSDP processes with `fault` installed as sitecustomize, meant to fail the save of iter 20
    (that of iter 10 succeeds): the process, which must have stopped there, and its out_dir."""
    (tmp_path / 'sitecustomize.py').write_text(fault)
    out_dir = tmp_path / 'out'
    proc = run_script('train.py', *TINY_TRAIN, *MUP, '--fsdp=True', '--max_iters=30', f'--out_dir={out_dir}',
                      cwd=workdir, launcher=TORCHRUN, env={**SCRIPT_ENV, 'PYTHONPATH': str(tmp_path)})
    assert proc.returncode != 0 and 'iter 20:' not in proc.stdout
    return proc, out_dir


# process 1's disk is full when the shards of iter 20 are written
SHARD_WRITE_FAILS = """import os
if os.environ.get('RANK') == '1':
    from torch.distributed.checkpoint import FileSystemWriter
    write_data = FileSystemWriter.write_data
    def full_disk(self, plan, planner):
        if 'ckpt_000020_' in str(self.path):
            raise OSError(28, 'No space left on device')
        return write_data(self, plan, planner)
    FileSystemWriter.write_data = full_disk
"""


def test_a_full_disk_at_a_sharded_save_removes_its_directory_and_keeps_the_last_checkpoint(workdir, tmp_path):
    """The save at iter 10 succeeds; at iter 20 one process cannot write its shard. Both processes
    stop with the one-line error, the half-written directory is gone, and ckpt.pt still names the
    intact shards of iter 10, which load."""
    proc, out_dir = train_until_a_failed_save(SHARD_WRITE_FAILS, workdir, tmp_path)
    line = rf"saving the shards of iter 20 to {out_dir}/ckpt_000020_[0-9a-f]{{8}}\.dcp failed \(\[Errno 28\] No space left"
    assert len(re.findall(line, proc.stderr)) == 2, proc.stderr[-3000:]
    assert f"{out_dir}/ckpt.pt is the last good checkpoint" in proc.stderr
    assert listing(out_dir) == ['ckpt.pt', 'ckpt_000010_*.dcp']
    from model import GPT, GPTConfig
    saved = checkpoints.read(str(out_dir), 'cpu')
    assert saved['iter_num'] == 10
    model = GPT(GPTConfig(**saved['model_args']))
    checkpoints.load_model(saved, str(out_dir), model)


# the master's disk is full when it writes ckpt.pt for the shards of iter 20
CKPT_WRITE_FAILS = """import os
if os.environ.get('RANK') == '0':
    import torch
    save = torch.save
    def full_disk(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get('iter_num') == 20 and 'sharded' in obj:
            raise OSError(28, 'No space left on device')
        return save(obj, f, *args, **kwargs)
    torch.save = full_disk
"""


def test_a_failed_ckpt_pt_write_under_fsdp_also_removes_the_shards_it_would_name(workdir, tmp_path):
    """The shards of iter 20 are written, then ckpt.pt cannot be: the shards go too (nothing would
    name them, and the disk is full), and ckpt.pt still names the shards of iter 10."""
    proc, out_dir = train_until_a_failed_save(CKPT_WRITE_FAILS, workdir, tmp_path)
    line = (rf"saving the checkpoint of iter 20 to {out_dir}/ckpt.pt.tmp failed \(\[Errno 28\] No space left on "
            rf"device\); removed {out_dir}/ckpt.pt.tmp and {out_dir}/ckpt_000020_[0-9a-f]{{8}}\.dcp, "
            rf"{out_dir}/ckpt.pt is the last good checkpoint")
    assert re.search(line, proc.stderr), proc.stderr[-3000:]
    assert listing(out_dir) == ['ckpt.pt', 'ckpt_000010_*.dcp']
    assert torch.load(out_dir / 'ckpt.pt', weights_only=False)['iter_num'] == 10
