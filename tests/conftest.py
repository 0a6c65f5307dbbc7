"""Shared test helpers: one intra-op thread, tiny models and batches, the project's scripts run as
a user runs them, and a tiny prepared dataset (no download, nothing read from data/)."""
import math
import os
import runpy
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
import torch

from model import GPT, GPTConfig, MuPFlexAttention

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(block_size=32, vocab_size=65, n_layer=2, n_head=4, n_embd=64, dropout=0.0, bias=False)
# train.py on the tiny dataset of `workdir`, small enough for a few seconds per run
TINY_TRAIN = ['--device=cpu', '--compile=False', '--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=32',
              '--batch_size=8', '--eval_iters=5', '--log_interval=1', '--warmup_iters=5', '--learning_rate=3e-3',
              '--dataset=tiny']
MOE_TRAIN = ('--n_expert=4', '--n_expert_active=2', '--n_shared_expert=1') # train.py's mixture of experts
SCRIPT_ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1'}


@pytest.fixture(autouse=True, scope='session')
def one_thread():
    """The test models are tiny: on a loaded 2-core machine, 2 intra-op threads made the mods and
    graph tests take 72 s instead of 14 s (OpenMP threads waiting on each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(**kw):
    return GPTConfig(**{**TINY, **kw})


def make_gpt(seed=0, attn_cls=MuPFlexAttention, **kw):
    """A GPT of TINY (with changes kw), initialised from `seed`."""
    torch.manual_seed(seed)
    return GPT(tiny_config(**kw), attn_cls)


def tokens(B=3, T=32, seed=1, vocab_size=TINY['vocab_size']):
    return torch.randint(0, vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


# the modern block's options (docs/mup.md, modern blocks): each alone, and the full combination
# of the issue (RoPE + QK-norm + RMSNorm + ReLU^2 + GQA at n_kv_head = n_head / 2 + untied);
# n_kv_head 'half' is half the base model's heads
BLOCK_OPTIONS = {
    'rope': dict(pos_emb='rope'),
    'rmsnorm': dict(norm='rmsnorm'),
    'no_gains': dict(norm='rmsnorm', norm_gain=False, qk_norm=True),
    'qk_norm': dict(qk_norm=True),
    'relu2': dict(mlp='relu2'),
    'swiglu': dict(mlp='swiglu'),
    'gqa': dict(n_kv_head='half'),
    'untied': dict(tie_weights=False),
    'moe': dict(n_expert=4, n_expert_active=2, n_shared_expert=1), # a mixture of experts for the MLP
    'all': dict(pos_emb='rope', qk_norm=True, norm='rmsnorm', mlp='relu2', n_kv_head='half', tie_weights=False),
}


def block_options(name, base_heads=4):
    """BLOCK_OPTIONS[name] with n_kv_head 'half' made a number."""
    chosen = dict(BLOCK_OPTIONS[name])
    if chosen.get('n_kv_head') == 'half':
        chosen['n_kv_head'] = base_heads // 2
    return chosen


def run_script(script, *args, cwd, launcher=(sys.executable,), timeout=300, env=SCRIPT_ENV):
    """One of the project's scripts in a subprocess, from `cwd`, as a user runs it."""
    return subprocess.run([*launcher, os.path.join(ROOT, script), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=env)


def stops_with(script, *args, cwd, monkeypatch, env=None):
    """The one-line message of the UserError that `script` stops with, run in this process (as
    a user runs it, from `cwd`, with these arguments and environment). For checks that come
    before any work: milliseconds where a subprocess spends seconds importing torch. That such an
    error prints one line and exits non-zero is the excepthook's (configurator.py), checked in a
    subprocess by tests/test_errors.py."""
    from errors import UserError
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, 'argv', [script, *args])
    monkeypatch.setattr(sys, 'excepthook', sys.excepthook) # configure() sets its own
    for key, value in (env or {}).items():
        monkeypatch.setenv(key, value)
    with pytest.raises(UserError) as error:
        runpy.run_path(os.path.join(ROOT, script), run_name='__main__')
    message = str(error.value)
    assert '\n' not in message, message
    return message


def ok(proc):
    """The stdout of a process that must have succeeded."""
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def text_batch(batch_size, block_size, seed):
    """(x, y, vocab_size): one batch of real English text at the character level (tests/data/
    sonnets.txt, ten of Shakespeare's sonnets), the same in every clone, no download needed."""
    with open(os.path.join(ROOT, 'tests', 'data', 'sonnets.txt')) as f:
        text = f.read()
    chars = sorted(set(text))
    ids = torch.tensor([chars.index(c) for c in text])
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(len(ids) - block_size - 1, (batch_size,), generator=g).tolist()
    xy = torch.stack([ids[start:start + block_size + 1] for start in starts])
    return xy[:, :-1].contiguous(), xy[:, 1:].contiguous(), len(chars)


def best_log2_lr(model_args, log2_lrs, seed=0, steps=10, **optimizer):
    """The best lr on a x2 grid (its log2) for fitting one 8x32 batch of random tokens in `steps`
    constant-lr steps, as coord_check.measure takes them, with models from
    coord_check.build_model(**model_args). A best lr on the grid's edge fails: the optimum would
    be bounded, not measured."""
    from coord_check import build_model, measure, random_batch
    x, y = random_batch(8, 32, seed)
    losses = []
    for log2_lr in log2_lrs:
        model = build_model(**model_args, block_size=32, seed=seed)
        final = measure(model, x, y, 2.0 ** log2_lr, steps, **optimizer)[2][-1]
        losses.append(final if math.isfinite(final) else math.inf)
    i = losses.index(min(losses))
    assert 0 < i < len(log2_lrs) - 1, f"{model_args}: best lr 2^{log2_lrs[i]} on the grid's edge {losses}"
    return log2_lrs[i]


@pytest.fixture(scope='session')
def workdir(tmp_path_factory):
    """A working directory whose data/tiny is shakespeare_char's preparation of a small local text."""
    work = tmp_path_factory.mktemp('work')
    text = "".join(f"{name}: the {thing} is {state}.\n" for name in ('ROMEO', 'JULIET', 'NURSE')
                   for thing in ('night', 'moon', 'rose', 'sword') for state in ('fair', 'dark', 'sweet', 'cold'))
    (work / 'input.txt').write_text(text * 30)
    ok(run_script('data/shakespeare_char/prepare.py', f'--input={work / "input.txt"}',
                  f'--out_dir={work / "data" / "tiny"}', cwd=work))
    return work


@pytest.fixture
def offline(monkeypatch):
    """No network: a download fails as it does on a machine without internet."""
    def fail(*args, **kwargs):
        raise urllib.error.URLError('no network in this test')
    monkeypatch.setattr(urllib.request, 'urlopen', fail)
