"""The lr-transfer studies, lr_sweep.py and mup_payoff.py, on their shared runner (sweep_runner.py):
every run is train.py, recorded under a key of every setting that changes its outcome; a
recorded run is reused only when the user asks; the committed results stay valid caches."""
import json
import math
import re
import shutil

from conftest import ROOT, ok, run_script, stops_with

import mup_payoff
from sweep_runner import NEUTRAL, REFERENCE, run_key, setting

# the sweep on the tiny dataset of `workdir`: SP and muP at width 16, a few seconds per run
TINY_SWEEP = ['--dataset=tiny', '--widths=16', '--base_width=16', '--n_layer=1', '--n_head=2', '--batch_size=4',
              '--block_size=16', '--max_iters=3', '--warmup_iters=1', '--eval_iters=2', '--out=tiny']


def run(param, width=32, **changes):
    return dict(REFERENCE, device='cpu', seed=1337, **setting(param, width, log2_lr=-8, it=3, **changes))


def test_cache_key_ignores_what_sp_ignores():
    for change in (dict(base_width=32), dict(mup_hidden_lr_exponent=0.5), dict(mup_scale_weight_decay=False)):
        assert run_key(run('sp')) == run_key(run('sp', **change)) # one SP run serves every muP-only variant
        assert run_key(run('mup')) != run_key(run('mup', **change))
    for change in (dict(adam_eps=1e-12), dict(weight_decay=0.1), dict(n_head=1), dict(init_std=0.04),
                   dict(width=64), dict(optimizer='muon'), dict(mup_base_depth=2)):
        assert run_key(run('sp')) != run_key(run('sp', **change))


def counts(stdout):
    """(runs measured, runs reused) from a study's output."""
    found = re.search(r'^(\d+) runs measured, (\d+) reused from \S+\.json$', stdout, re.M)
    assert found, stdout[-2000:]
    return int(found[1]), int(found[2])


def test_sweep_measures_every_run_again_unless_told_to_reuse(tmp_path, workdir):
    (tmp_path / 'data').symlink_to(workdir / 'data')
    sweep = lambda *args: ok(run_script('lr_sweep.py', *TINY_SWEEP, *args, cwd=tmp_path))
    assert counts(sweep('--log2_lrs=-8')) == (2, 0) # SP and muP
    out = tmp_path / 'out-studies' # a new directory: the repository's results/ and assets/ stay as committed
    assert (out / 'assets' / 'tiny.png').exists() and not (tmp_path / 'results').exists()
    assert counts(sweep('--log2_lrs=-8,-7', '--reuse=True')) == (2, 2) # only the new lr is trained
    records = json.loads((out / 'results' / 'tiny.json').read_text())
    assert sorted((r['param'], r['log2_lr']) for r in records) == [('mup', -8), ('mup', -7), ('sp', -8), ('sp', -7)]
    assert all(0 < r['val_loss'] < 5 for r in records) # train.py ran to the end
    assert counts(sweep('--log2_lrs=-8')) == (2, 0) # by default, recorded runs are measured again
    assert len(json.loads((out / 'results' / 'tiny.json').read_text())) == 4 # their records replaced, not added


def test_committed_results_are_reproduced_from_their_records(tmp_path):
    """Every run of the default sweep and of the 150-step tune study is found in the committed
    records (no data here: a missing run would fail), and the study's summary comes out as
    committed."""
    (tmp_path / 'results').mkdir()
    shutil.copy(f'{ROOT}/results/lr_transfer.json', tmp_path / 'results')
    assert counts(ok(run_script('lr_sweep.py', '--reuse=True', '--out_dir=.', cwd=tmp_path))) == (0, 56)
    stdout = ok(run_script('mup_payoff.py', '--study=tune', '--horizons=150', '--reuse=True', '--out_dir=.',
                           cwd=tmp_path))
    assert counts(stdout)[0] == 0
    tuned = json.loads((tmp_path / 'results' / 'lr_transfer_tuned.json').read_text())
    with open(f'{ROOT}/results/lr_transfer_tuned.json') as f:
        assert tuned == json.load(f)


def test_payoff_runs_one_study(tmp_path, monkeypatch):
    proc = run_script('mup_payoff.py', '--study=tune,causes', cwd=tmp_path)
    assert proc.returncode != 0
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith('error: '), proc.stderr
    assert 'choose one of tune, joint, causes' in proc.stderr
    # the old lr_transfer.py's flags
    stops_with('mup_payoff.py', '--tune=True', '--causes=True', cwd=tmp_path, monkeypatch=monkeypatch)
    assert not (tmp_path / 'out-studies').exists() # nothing was measured


class Bowl:
    """A stand-in for the Runner: a setting's loss is its squared log2 distance from `optimum`."""

    def __init__(self, optimum):
        self.optimum = optimum

    def evaluate(self, settings):
        log2 = lambda s, k: s[k] if k == 'log2_lr' else math.log2(s[k])
        return [sum((log2(s, k) - log2(self.optimum, k)) ** 2 for k in self.optimum) for s in settings]


def test_tune_walks_each_hyperparameter_to_its_optimum():
    optimum = dict(log2_lr=-6, mup_output_mult=4.0, mup_attn_mult=0.5, mup_input_mult=2.0, init_std=0.04,
                   muon_lr_mult=2.0)
    hp, loss, lr_only, trace = mup_payoff.tune_mup(Bowl(optimum), 64, 150, start_log2_lr=-8, muon_lr_mult=1.0)
    assert hp == optimum and loss == 0
    assert lr_only == dict(NEUTRAL, log2_lr=-6, muon_lr_mult=1.0) # after the first coordinate, the lr
    assert [name for name, _, _ in trace] == ['log2_lr', *NEUTRAL, 'muon_lr_mult', 'log2_lr']
