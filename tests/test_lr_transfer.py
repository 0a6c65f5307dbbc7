"""The lr-transfer studies, lr_sweep.py and mup_payoff.py, on their shared runner (sweep_runner.py):
every run is train.py, recorded under a key of every setting that changes its outcome; a
recorded run is reused only when the user asks; the committed results stay valid caches."""
import json
import math
import re
import shutil

import pytest

from conftest import ROOT, ok, run_script, stops_with

import lr_sweep
import transfer
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


def test_cache_key_ignores_the_transfer_rules_without_a_proxy():
    """Without base_batch_tokens and base_train_tokens transfer.py changes nothing: a batch sweep
    with the policy on finds the proxy's runs among the policy-off sweep's."""
    proxy = dict(base_batch_tokens=1024, base_train_tokens=614400)
    for change in (dict(critical_batch_tokens=1024), dict(batch_lr_exponent=0.25), dict(length_lr_exponent=0.3)):
        assert run_key(run('mup')) == run_key(run('mup', **change))
        assert run_key(run('mup', **proxy)) != run_key(run('mup', **proxy, **change))
    assert run_key(run('mup')) != run_key(run('mup', **proxy))
    # an exponent left to the measured one is keyed as that value: the runs are the same
    for optimizer in ('adamw', 'muon'):
        batch, length = transfer.MEASURED_EXPONENTS[optimizer]
        assert run_key(run('mup', optimizer=optimizer, **proxy)) == run_key(
            run('mup', optimizer=optimizer, batch_lr_exponent=batch, length_lr_exponent=length, **proxy))


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
    fit = json.loads((out / 'results' / 'tiny_fit.json').read_text()) # the optimum with its interval, per arm
    assert set(fit['studies']) == {'SP', 'μP'} and fit['axis'] == 'width'
    assert [r['value'] for r in fit['studies']['μP']['rows']] == [16] and (out / 'assets' / 'tiny_fit.png').exists()
    records = json.loads((out / 'results' / 'tiny.json').read_text())
    assert sorted((r['param'], r['log2_lr']) for r in records) == [('mup', -8), ('mup', -7), ('sp', -8), ('sp', -7)]
    assert all(0 < r['val_loss'] < 5 for r in records) # train.py ran to the end
    assert counts(sweep('--log2_lrs=-8')) == (2, 0) # by default, recorded runs are measured again
    assert len(json.loads((out / 'results' / 'tiny.json').read_text())) == 4 # their records replaced, not added


def test_committed_results_are_reproduced_from_their_records(tmp_path):
    """Every run of the default sweep and of the 150-step tune study over three seeds is found in
    the committed records (no data here: a missing run would fail), and the study's summary comes
    out as committed."""
    (tmp_path / 'results').mkdir()
    shutil.copy(f'{ROOT}/results/lr_transfer.json', tmp_path / 'results')
    assert counts(ok(run_script('lr_sweep.py', '--reuse=True', '--out_dir=.', cwd=tmp_path))) == (0, 56)
    stdout = ok(run_script('mup_payoff.py', '--study=tune', '--horizons=150', '--seeds=1337,1338,1339', '--reuse=True',
                           '--out_dir=.', cwd=tmp_path))
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


class SeededBowl(Bowl):
    """A Bowl whose runs also depend on their seed (seed s adds 0.001 s), and which records the
    seeds each call asked for."""

    def __init__(self, optimum, seeds):
        super().__init__(optimum)
        self.seeds, self.asked = seeds, []

    def per_seed(self, settings, seeds=None):
        seeds = self.seeds if seeds is None else seeds
        self.asked.append(tuple(seeds))
        return [[loss + 0.001 * s for s in seeds] for loss in Bowl.evaluate(self, settings)]

    def evaluate(self, settings):
        return [sum(losses) / len(losses) for losses in self.per_seed(settings)]


def test_tune_searches_over_search_seeds_and_measures_each_arm_at_every_seed(tmp_path, monkeypatch):
    optimum = dict(log2_lr=-7, mup_output_mult=2.0, mup_attn_mult=1.0, mup_input_mult=1.0, init_std=0.02)
    runner = SeededBowl(optimum, seeds=[0])
    (summary,) = mup_payoff.study_tune(runner, [64, 128], 64, [150], None, seeds=[0, 1, 2])
    assert set(runner.asked) == {(0,), (0, 1, 2)} # the searches over seed 0 alone
    assert summary['search_seeds'] == [0] and summary['seeds'] == [0, 1, 2]
    assert summary['tuned'] == dict(optimum, log2_lr=-7)
    for row in summary['rows']:
        assert {arm: len(losses) for arm, losses in row['per_seed'].items()} == dict(sp=3, sp_embed=3, mup_tuned=3)
        assert row['per_seed']['mup_tuned'] == pytest.approx([row['mup_tuned'] + 0.001 * s for s in (0, 1, 2)])
    message = stops_with('mup_payoff.py', '--seeds=1,2', '--search_seeds=3', cwd=tmp_path, monkeypatch=monkeypatch)
    assert 'must be among seeds' in message and not (tmp_path / 'out-studies').exists()
    message = stops_with('mup_payoff.py', '--study=joint', '--search_seeds=1337', cwd=tmp_path, monkeypatch=monkeypatch)
    assert "search_seeds is the tune study's" in message


# ---- the batch and length axes: the optimum as a continuous value, with intervals over seeds

HALF_STEPS = [-9.0, -8.5, -8.0, -7.5, -7.0, -6.5, -6.0, -5.5]


def bowl(optimum, depth=2.0, curvature=0.1):
    return [curvature * (x - optimum) ** 2 + depth for x in HALF_STEPS]


def test_the_optimum_is_the_vertex_between_grid_points():
    x, loss = lr_sweep.fit_optimum(HALF_STEPS, bowl(-7.3))
    assert x == pytest.approx(-7.3, abs=1e-9) and loss == pytest.approx(2.0, abs=1e-9)
    curve = bowl(-7.3)
    curve[0] = math.inf # a diverged run is left out of the fit
    assert lr_sweep.fit_optimum(HALF_STEPS, curve)[0] == pytest.approx(-7.3, abs=1e-9)


def test_the_bootstrap_interval_is_the_spread_of_the_seeds():
    seeds = [bowl(-7.5), bowl(-7.3), bowl(-7.1)] # one curve per seed
    per_seed = [list(point) for point in zip(*seeds)] # [[loss per seed] per grid point]
    draws = lr_sweep.bootstrap_optima(HALF_STEPS, per_seed, resamples=200)
    assert -7.5 - 1e-9 <= draws.min() < -7.35 and -7.25 < draws.max() <= -7.1 + 1e-9
    same = [[loss] * 3 for loss in bowl(-7.3)]
    assert set(lr_sweep.bootstrap_optima(HALF_STEPS, same, resamples=20).round(9)) == {-7.3}


def test_the_study_measures_the_exponent_and_the_loss_given_up():
    """Optima -7, -6, -5 at batch 4, 16, 64 (an exponent of 1/2 against log2 batch): transferring
    the first one's costs 0.1 x 1^2 at 16 and 0.1 x 2^2 at 64 on curves of curvature 0.1."""
    values = [4, 16, 64]
    optima = {4: -7.0, 16: -6.0, 64: -5.0}
    grid = [-9.0 + 0.5 * i for i in range(12)]
    per_seed = {v: [[0.1 * (x - optima[v]) ** 2 + 2 + s * 0.001 for s in range(3)] for x in grid] for v in values}
    study = lr_sweep.axis_study(values, grid, per_seed, resamples=50)
    assert [r['optimum'] for r in study['rows']] == pytest.approx([-7.0, -6.0, -5.0], abs=1e-6)
    assert study['exponent']['value'] == pytest.approx(0.5, abs=1e-6)
    assert [e['values'] for e in study['segments']] == [[4, 16], [16, 64]]
    assert [e['value'] for e in study['segments']] == pytest.approx([0.5, 0.5], abs=1e-6)
    assert [r['given_up'] for r in study['rows']] == pytest.approx([0.0, 0.1, 0.4], abs=1e-6)


def test_a_batch_sweep_at_fixed_tokens_fits_each_batch_and_applies_the_policy(tmp_path, workdir):
    (tmp_path / 'data').symlink_to(workdir / 'data')
    out = ok(run_script('lr_sweep.py', '--dataset=tiny', '--batch_sizes=4,8', '--tokens=512', '--width=32',
                        '--base_width=16', '--n_layer=1', '--n_head=2', '--block_size=16', '--warmup_iters=1',
                        '--eval_iters=2', '--log2_lrs=-8,-7,-6', '--seeds=1,2', '--policy=True', '--out=batch',
                        cwd=tmp_path))
    assert 'the best log2 lr along batch_size (in the proxy units, the policy on)' in out
    fit = json.loads((tmp_path / 'out-studies' / 'results' / 'batch_fit.json').read_text())
    assert [r['value'] for r in fit['rows']] == [4, 8] and fit['axis'] == 'batch_size'
    records = json.loads((tmp_path / 'out-studies' / 'results' / 'batch.json').read_text())
    assert {(r['batch_size'], r['max_iters'], r['base_batch_tokens'], r['base_train_tokens']) for r in records} == {
        (4, 8, 0, 0), (8, 4, 64, 512)} # 512 tokens in all; the proxy (batch 4 x 16 tokens, 8 steps) its own
    assert len(records) == 12


def test_a_beta2_grid_sets_one_minus_beta2_and_the_policy_carries_it():
    grid = lr_sweep.axis_grid('batch_size', [4, 16], [-8.0, -5.0], width=32, batch_size=4, sequence_tokens=16,
                              tokens=1024, tune='beta2', log2_lr=-7.0, policy=True)
    assert {k: (s['beta2'], s['log2_lr'], s['batch_size'], s['max_iters']) for k, s in grid.items()} == {
        (4, -8.0): (1 - 2 ** -8, -7.0, 4, 16), (4, -5.0): (1 - 2 ** -5, -7.0, 4, 16),
        (16, -8.0): (1 - 2 ** -8, -7.0, 16, 4), (16, -5.0): (1 - 2 ** -5, -7.0, 16, 4)}
    assert grid[16, -8.0]['base_batch_tokens'] == 64 and 'base_batch_tokens' not in grid[4, -8.0] # the proxy's own
    assert run_key(run('mup', beta2=1 - 2 ** -8)) != run_key(run('mup', beta2=1 - 2 ** -5))


def test_a_weight_decay_sweep_along_the_length_reports_the_adamw_timescale(tmp_path, workdir):
    (tmp_path / 'data').symlink_to(workdir / 'data')
    out = ok(run_script('lr_sweep.py', '--dataset=tiny', '--lengths=4,8', '--tune=weight_decay', '--log2_lr=-7',
                        '--log2_wds=-2,-1,0', '--width=32', '--base_width=16', '--n_layer=1', '--n_head=2',
                        '--batch_size=4', '--block_size=16', '--warmup_iters=1', '--eval_iters=2', '--seeds=1,2',
                        '--out=wd', cwd=tmp_path))
    assert 'the best log2 weight decay along max_iters' in out and '1/(lr wd)' in out
    records = json.loads((tmp_path / 'out-studies' / 'results' / 'wd.json').read_text())
    assert {(r['max_iters'], r['weight_decay'], r['log2_lr']) for r in records} == {
        (it, wd, -7) for it in (4, 8) for wd in (0.25, 0.5, 1.0)}
    fit = json.loads((tmp_path / 'out-studies' / 'results' / 'wd_fit.json').read_text())
    for row in fit['rows']: # 1 / (lr x wd) iterations, as a fraction of the run's
        assert row['timescale_fraction'] == pytest.approx(2.0 ** -(-7 + row['optimum']) / row['value'])
