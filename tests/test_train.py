"""End to end: prepare a tiny dataset, train (SP and muP), resume, sample — through the real
scripts, as a user runs them."""
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, SCRIPT_ENV, TINY_TRAIN as TINY_MODEL, ok, run_script, stops_with


def run(script, *args, cwd):
    return ok(run_script(script, *args, cwd=cwd))


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
    # train.py prints the optimizer's groups: muP trains the hidden matrices at lr / m
    groups = re.findall(r'^param group (\w+): \d+ tensors, [\d,]+ parameters, lr_scale ([\d.]+),', out,
                        flags=re.M)
    assert sorted(groups) == [('embedding', '1'), ('hidden', '0.5' if param else '1'), ('vector', '1')]
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
    samples = out.split('...\n', 1)[1].split('\n---------------\n')[:-1] # print() adds the \n
    assert len(samples) == 2 and all(s.startswith('ROMEO') for s in samples)
    assert all(len(s) == len('ROMEO') + 40 for s in samples), samples


def test_the_last_iteration_evaluates_and_saves(workdir):
    """A run shorter than eval_interval still ends with an eval and a checkpoint of its last
    iteration, as nanochat's does."""
    out_dir = workdir / 'out-short'
    out = run('train.py', *TINY_MODEL, '--max_iters=12', '--eval_interval=250', f'--out_dir={out_dir}', cwd=workdir)
    assert set(losses(out)) == {0, 12}
    assert torch.load(out_dir / 'ckpt.pt', weights_only=False)['iter_num'] == 12


def test_missing_dataset_names_the_prepare_command(tmp_path, monkeypatch):
    line = stops_with('train.py', '--dataset=nowhere', '--device=cpu', cwd=tmp_path, monkeypatch=monkeypatch)
    assert 'python data/nowhere/prepare.py' in line


def test_unknown_config_key_is_an_error(tmp_path, monkeypatch):
    assert 'learning_rate' in stops_with('train.py', '--learning_rat=1e-3', cwd=tmp_path, monkeypatch=monkeypatch)


def test_help_lists_every_model_setting_once_and_nothing_internal(tmp_path):
    """train.py takes the model's keys from GPTConfig's fields, each with a default."""
    from dataclasses import fields

    from model import GPTConfig
    out = ok(run_script('train.py', '--help', cwd=tmp_path))
    keys = re.findall(r'^  --(\w+)=', out, flags=re.M)
    assert len(keys) == len(set(keys))
    assert {f.name for f in fields(GPTConfig)} - set(keys) == {'vocab_size'} # from the dataset
    assert {'optimizer', 'muon_lr_mult', 'learning_rate', 'compile'} <= set(keys)
    assert not [k for k in keys if 'keys' in k or k.startswith('_')]
    # nanoGPT's model size and dropout/bias are train.py's own defaults; every other model setting
    # starts where GPTConfig does
    defaults = dict(re.findall(r'^  --(\w+)=(\S+)', out, flags=re.M))
    own = {'n_layer', 'n_head', 'n_embd', 'block_size', 'dropout', 'bias'}
    for field in fields(GPTConfig):
        if field.name not in own | {'vocab_size'}:
            assert defaults[field.name] == repr(field.default), field.name


def test_a_field_added_to_gptconfig_is_a_flag_of_every_script(tmp_path):
    """One definition: a field added to GPTConfig (in a copy of the project) is a --flag of every
    script that builds models, its comment its --help, with no other edit; and its value reaches
    the model (a GPTConfig that rejects any other value stops the script with that line)."""
    for entry in os.listdir(ROOT):
        if entry.endswith('.py'):
            shutil.copy(os.path.join(ROOT, entry), tmp_path / entry)
    model_py = (tmp_path / 'model.py').read_text()
    model_py = model_py.replace("    attn_cls: str = ''\n", "    attn_cls: str = ''\n    probe: int = 7 # a field added in a test\n", 1)
    model_py = model_py.replace("    def __post_init__(self):\n", "    def __post_init__(self):\n        if self.probe != 7:\n"
                                "            raise ValueError(f'probe={self.probe} reached the model')\n", 1)
    (tmp_path / 'model.py').write_text(model_py)
    script = lambda name, *args: subprocess.run([sys.executable, str(tmp_path / name), *args], cwd=tmp_path,
                                                capture_output=True, text=True, env=SCRIPT_ENV, timeout=120)
    for name in ('train.py', 'coord_check.py', 'lr_sweep.py', 'mup_payoff.py', 'analyze_jacobian.py', 'bench.py'):
        out = ok(script(name, '--help'))
        assert re.search(r'^  --probe=7 +int; a field added in a test$', out, flags=re.M), (name, out[-3000:])
    for name, args in (('train.py', ['--device=cpu']), ('coord_check.py', []), ('bench.py', ['--modes=train'])):
        proc = script(name, '--probe=8', *args)
        assert proc.returncode != 0 and 'error: probe=8 reached the model' in proc.stderr, (name, proc.stderr[-2000:])
    import_sweep = subprocess.run([sys.executable, '-c', 'import sweep_runner as s; print(s.REFERENCE["probe"])'],
                                  cwd=tmp_path, capture_output=True, text=True, env=SCRIPT_ENV)
    assert ok(import_sweep).strip() == '7' # every run passes it to train.py, and its cache key has it off 7


def test_the_readme_shows_the_example_attention_file():
    """The README's RelativeBias is relative_bias.py's class, as the file holds it."""
    with open(f'{ROOT}/README.md') as f:
        shown = re.search(r"```python\n(.*?class RelativeBias\(MuPFlexAttention\).*?)```", f.read(), flags=re.S)[1]
    with open(f'{ROOT}/relative_bias.py') as f:
        assert shown in f.read()


def test_the_readme_attention_class_is_a_setting_of_every_script(workdir, monkeypatch):
    """The README's subclass (relative_bias.py) is trained, resumed, sampled and analysed with
    --attn_cls alone: the checkpoint records it, and sample.py and analyze_jacobian.py build it
    from there. Without it the resume is refused, naming it; gone, it is a one-line error."""
    shutil.copy(f'{ROOT}/relative_bias.py', workdir / 'relative_bias.py')
    attn_cls = '--attn_cls=relative_bias.py:RelativeBias'
    out_dir = workdir / 'out-relative-bias'
    out = run('train.py', *TINY_MODEL, attn_cls, '--max_iters=20', '--eval_interval=10', f'--out_dir={out_dir}',
              cwd=workdir)
    assert 'attention RelativeBias, causal on the dense backend' in out
    saved = torch.load(out_dir / 'ckpt.pt', weights_only=False)
    assert saved['model_args']['attn_cls'] == 'relative_bias.py:RelativeBias'
    assert 'transformer.h.0.attn.rel_bias' in saved['model']
    resumed = run('train.py', *TINY_MODEL, attn_cls, '--max_iters=30', '--eval_interval=10', f'--out_dir={out_dir}',
                  '--init_from=resume', cwd=workdir)
    assert re.findall(r'^iter (\d+):', resumed, flags=re.M)[0] == '20'
    refused = run_script('train.py', *TINY_MODEL, '--max_iters=40', f'--out_dir={out_dir}', '--init_from=resume',
                         cwd=workdir)
    assert refused.returncode != 0 and "attn_cls: checkpoint 'relative_bias.py:RelativeBias' vs requested ''" in refused.stderr
    sampled = run('sample.py', f'--out_dir={out_dir}', '--device=cpu', '--num_samples=1', '--max_new_tokens=20',
                  '--start=ROMEO', cwd=workdir)
    assert sampled.count('---------------') == 1
    analysed = run('analyze_jacobian.py', f'--ckpt={out_dir}', '--batch_size=4', f'--out={workdir / "jacobian"}',
                   '--device=cpu', cwd=workdir)
    assert 'cos_diag' in analysed and (workdir / 'jacobian' / 'jacobian.json').exists()
    (workdir / 'relative_bias.py').rename(workdir / 'moved.py')
    gone = stops_with('sample.py', f'--out_dir={out_dir}', '--device=cpu', cwd=workdir, monkeypatch=monkeypatch)
    assert gone == (f"{out_dir / 'ckpt.pt'}: attn_cls='relative_bias.py:RelativeBias': relative_bias.py not found "
                    f"(from {workdir}); give its path from the working directory, or an absolute one")
