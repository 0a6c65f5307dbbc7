"""bench.py end to end on a tiny config, and the arithmetic its tables rest on (no timing
assertions: the performance targets are met in benchmark runs, not in timed tests)."""
import json

import pytest

import bench as bench_module
from conftest import ok, run_script
from attn_mods import ATTN_MODS

TINY = ['--n_layer=1', '--n_head=2', '--n_embd=32', '--mup_base_width=16', '--block_size=16', '--batch_size=2',
        '--vocab_size=11', '--seq_lens=8,16', '--warmup=1', '--iters=3', '--optimizers=adamw,muon']


def test_bench_writes_every_row_and_the_target_ratios(tmp_path):
    stdout = ok(run_script('bench.py', *TINY, '--device=cpu', '--out_file=out.json', cwd=tmp_path, timeout=120))
    report = json.loads((tmp_path / 'out.json').read_text())
    assert report['settings']['n_embd'] == 32 and report['environment']['device'] == 'cpu'
    # training steps: the direct-SDPA reference and every backend that trains on CPU, SP and muP
    muon = {(r['backend'], r['param']): r for r in report['train'] if r['optimizer'] == 'muon'}
    rows = {(r['backend'], r['param']): r for r in report['train'] if r['optimizer'] == 'adamw'}
    assert set(rows) == set(muon) == {(b, p) for b in ('sdpa-direct', 'auto', 'sdpa', 'dense') for p in ('sp', 'mup')}
    assert report['ratios']['muon_over_adamw']['dense/mup'] == pytest.approx(bench_module.paired_ratio(
        muon['dense', 'mup']['times_ms'], rows['dense', 'mup']['times_ms']))
    for r in rows.values():
        assert len(r['times_ms']) == 3 # one per timed round
        assert r['tokens_per_s'] == pytest.approx(2 * 16 / (r['ms_per_step'] / 1e3))
    assert rows['dense', 'sp']['resolved'] == 'dense' and rows['auto', 'sp']['resolved'] == 'sdpa'
    assert rows['auto', 'sp']['mask_ms'] < rows['dense', 'sp']['mask_ms'] # SDPA's causal needs no mask tensor
    for param in ('sp', 'mup'): # every backend trains the same model: same seed, same first loss
        losses = [rows[b, param]['first_loss'] for b in ('sdpa-direct', 'auto', 'sdpa', 'dense')]
        assert max(losses) - min(losses) < 1e-4, losses
    assert rows['auto', 'sp']['first_loss'] != rows['auto', 'mup']['first_loss'] # the muP rows are muP
    ratios = report['ratios']
    assert ratios['over_direct_sdpa']['dense/mup'] == pytest.approx(bench_module.paired_ratio(
        rows['dense', 'mup']['times_ms'], rows['sdpa-direct', 'mup']['times_ms']))
    assert set(ratios['mup_over_sp']) == {b + o for b in ('sdpa-direct', 'auto', 'sdpa', 'dense') for o in ('', '/muon')}
    # attention only: every catalog mod at every T, against causal SDPA at that T
    cells = {(r['mod'], r['backend'], r['T']): r for r in report['attention']}
    expected = {(spec, 'dense', T) for spec in bench_module.CATALOG for T in (8, 16)}
    expected |= {('causal', b, T) for b in ('sdpa-direct', 'sdpa') for T in (8, 16)}
    assert set(cells) == expected
    assert {name for name, *_ in map(lambda spec: spec.split(':'), bench_module.CATALOG)} == set(ATTN_MODS)
    assert 'ms/step' in stdout and 'x causal SDPA' in stdout


def test_paired_ratio_is_the_median_of_per_round_ratios():
    """Rows are compared round by round (a load change between rounds hits both rows alike), not
    as a ratio of medians: here 2x in two rounds of three, while the medians give 0.67x."""
    reference, times = [10, 30, 30], [20, 60, 6]
    assert bench_module.paired_ratio(times, reference) == pytest.approx(2.0)


def test_bench_gpu_mode_on_cpu_says_it_needs_cuda(tmp_path):
    proc = run_script('bench.py', '--modes=gpu', '--device=cpu', cwd=tmp_path, timeout=120)
    assert proc.returncode != 0 and 'needs a CUDA device' in proc.stderr
    assert not (tmp_path / 'bench.json').exists()


@pytest.mark.parametrize('key, value, wanted', [
    ('modes', ('train', 'speed'), "choose from 'train', 'attention', 'gpu'"),
    ('attn_backend', 'fast', "use 'all' or one of"),
    ('parameterization', 'mu', "use 'sp', 'mup' or 'both'"),
    ('compile', 'yes', 'use False, True or both'),
    ('optimizers', ('adamw', 'sgd'), "choose from 'adamw', 'muon'"),
])
def test_bench_refuses_settings_it_does_not_know(monkeypatch, key, value, wanted):
    monkeypatch.setattr(bench_module, key, value)
    with pytest.raises(ValueError, match=wanted):
        bench_module.check_settings()
