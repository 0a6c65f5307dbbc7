"""bench.py end to end on a tiny config, the ratios of its tables on timings whose ratios are
known, and the backends it picks (no timing assertions: the performance targets are met in
benchmark runs, not in timed tests)."""
import json
import math
import re

import pytest
import torch

import bench as bench_module
from conftest import ok, run_script
from attn_mods import ATTN_MODS
from errors import UserError

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
    for r in rows.values():
        assert len(r['times_ms']) == 3 # one per timed round
        assert r['tokens_per_s'] == pytest.approx(2 * 16 / (r['ms_per_step'] / 1e3))
    assert rows['dense', 'sp']['resolved'] == 'dense' and rows['auto', 'sp']['resolved'] == 'sdpa'
    for param in ('sp', 'mup'): # every backend trains the same model: same seed, same first loss
        losses = [rows[b, param]['first_loss'] for b in ('sdpa-direct', 'auto', 'sdpa', 'dense')]
        assert max(losses) - min(losses) < 1e-4, losses
    assert rows['auto', 'sp']['first_loss'] != rows['auto', 'mup']['first_loss'] # the muP rows are muP
    # every ratio the targets are stated in, one per pair of rows that exists (values: tested below)
    ratios = report['ratios']
    backends = ('sdpa-direct', 'auto', 'sdpa', 'dense')
    assert set(ratios) == {'mup_over_sp', 'over_direct_sdpa', 'muon_over_adamw'} # no compiled rows
    assert set(ratios['mup_over_sp']) == {b + o for b in backends for o in ('', '/muon')}
    assert set(ratios['over_direct_sdpa']) == {b + o + '/' + p for b in backends[1:] for o in ('', '/muon')
                                               for p in ('sp', 'mup')}
    assert set(ratios['muon_over_adamw']) == {f"{b}/{p}" for b in backends for p in ('sp', 'mup')}
    assert all(math.isfinite(v) and v > 0 for values in ratios.values() for v in values.values())
    # attention only: every catalog mod at every T, against causal SDPA at that T
    cells = {(r['mod'], r['backend'], r['T']): r for r in report['attention']}
    expected = {(spec, 'dense', T) for spec in bench_module.CATALOG for T in (8, 16)}
    expected |= {('causal', b, T) for b in ('sdpa-direct', 'sdpa') for T in (8, 16)}
    assert set(cells) == expected
    assert {name for name, *_ in map(lambda spec: spec.split(':'), bench_module.CATALOG)} == set(ATTN_MODS)
    # the printed tables: a line per training row, in the report's order, then the ratios; a line
    # per (mod, backend) of the attention table with a cell "ms (x causal SDPA)" per T
    lines = stdout.splitlines()
    start = lines.index(next(line for line in lines if line.startswith('backend ') and 'ms/step' in line)) + 1
    for line, r in zip(lines[start:], report['train']):
        assert line.split()[0] == r['backend'] and f"{r['first_loss']:9.4f}" in line, line
    assert lines[start + len(report['train'])].startswith('mup_over_sp: ')
    start = lines.index(next(line for line in lines if line.startswith('mod ') and 'T=8' in line)) + 1
    table = lines[start:start + len({(r['mod'], r['backend']) for r in report['attention']})]
    assert [line.split()[:2] for line in table] == [[spec, b] for spec, b in dict.fromkeys(
        (r['mod'], r['backend']) for r in report['attention'])]
    assert all(len(re.findall(r'\d+\.\d\d \(\d+\.\d\d\)', line)) == 2 for line in table), table


def test_paired_ratio_is_the_median_of_per_round_ratios():
    """Rows are compared round by round (a load change between rounds hits both rows alike), not
    as a ratio of medians: here 2x in two rounds of three, while the medians give 0.67x."""
    reference, times = [10, 30, 30], [20, 60, 6]
    assert bench_module.paired_ratio(times, reference) == pytest.approx(2.0)


def test_train_ratios_pair_each_row_with_its_reference():
    """Timings made with known ratios (dense 3x direct SDPA, muP 1.5x SP, Muon 2x AdamW, compiled
    0.5x eager), under a load that every row of a round shares and that changes from round to
    round by far more than any ratio: every ratio comes out exactly, each row paired with the
    right reference row, round by round."""
    load = [1.0, 7.0, 0.2, 40.0, 3.0] # per round, shared by every row
    factors = dict(backend={'sdpa-direct': 1.0, 'dense': 3.0}, param={'sp': 1.0, 'mup': 1.5},
                   optimizer={'adamw': 1.0, 'muon': 2.0}, compile={False: 1.0, True: 0.5})
    rows = [dict(backend=b, param=p, optimizer=o, compile=c,
                 times_ms=[l * factors['backend'][b] * factors['param'][p] * factors['optimizer'][o] *
                           factors['compile'][c] for l in load])
            for b in factors['backend'] for p in factors['param'] for o in factors['optimizer']
            for c in factors['compile']]
    ratios = bench_module.train_ratios(rows)
    assert set(ratios) == {'mup_over_sp', 'over_direct_sdpa', 'compiled_over_eager', 'muon_over_adamw'}
    expected = {'mup_over_sp': 1.5, 'over_direct_sdpa': 3.0, 'compiled_over_eager': 0.5, 'muon_over_adamw': 2.0}
    for name, values in ratios.items():
        assert values and all(v == pytest.approx(expected[name]) for v in values.values()), (name, values)
    assert set(ratios['over_direct_sdpa']) == {f"dense{c}{o}/{p}" for c in ('', '/compiled') for o in ('', '/muon')
                                               for p in ('sp', 'mup')}


@pytest.mark.parametrize('spec, device, expected', [
    ('causal', 'cpu', ['auto', 'sdpa', 'dense']), # flex has no backward on CPU
    ('alibi', 'cpu', ['auto', 'dense']), # SDPA runs plain causal attention only
    ('causal', 'cuda', ['auto', 'sdpa', 'flex', 'dense']),
    ('sliding_window:4', 'cuda', ['auto', 'flex', 'dense']),
])
def test_bench_times_the_backends_the_model_can_train_with(spec, device, expected):
    """The model's choice (resolve_backend), asked of a device by its type: no GPU is needed."""
    device = torch.device(device)
    assert [b for b in bench_module.BACKENDS if bench_module.trains_here(spec, b, device)] == expected


def test_bench_gpu_mode_on_cpu_says_it_needs_cuda(tmp_path):
    proc = run_script('bench.py', '--modes=gpu', '--device=cpu', cwd=tmp_path, timeout=120)
    assert proc.returncode != 0 and proc.stderr.startswith('error: modes=gpu needs a CUDA device')
    assert not (tmp_path / 'bench.json').exists()


@pytest.mark.parametrize('args, wanted', [
    (['--modes=speed'], "error: modes=speed: choose from 'train', 'attention', 'block', 'decode', 'distributed', 'gpu'"),
    (['--optimizers=adamw,sgd'], "error: optimizers=adamw,sgd: choose from 'adamw', 'muon'"),
    (['--attn_backend=sdpa', '--attn_mod=alibi', '--device=cpu'],
     "error: attn_backend=sdpa cannot train attn_mod=alibi on cpu: use --attn_backend=all or one of ['auto', 'dense']"),
])
def test_bench_reports_a_bad_setting_in_one_line(tmp_path, args, wanted):
    """A UserError, which the configurator prints as one line, without a traceback."""
    proc = run_script('bench.py', *args, cwd=tmp_path, timeout=120)
    lines = proc.stderr.splitlines()
    assert proc.returncode != 0 and len(lines) == 1 and lines[0].startswith(wanted), proc.stderr
    assert not (tmp_path / 'bench.json').exists()


@pytest.mark.parametrize('key, value, wanted', [
    ('modes', ('train', 'speed'), "choose from 'train', 'attention', 'block', 'decode', 'distributed', 'gpu'"),
    ('attn_backend', 'fast', "use 'all' or one of"),
    ('parameterization', 'mu', "use 'sp', 'mup' or 'both'"),
    ('compile', 'yes', 'use False, True or both'),
    ('optimizers', ('adamw', 'sgd'), "choose from 'adamw', 'muon'"),
])
def test_bench_refuses_settings_it_does_not_know(monkeypatch, key, value, wanted):
    monkeypatch.setattr(bench_module, key, value)
    with pytest.raises(UserError, match=wanted):
        bench_module.check_settings()
