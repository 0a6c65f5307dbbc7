"""bench.py end to end on a tiny config (no timing assertions: the performance targets are met in
benchmark runs, not in timed tests), and the dense backend's fast paths (broadcast evaluation of
the mods, compact masks), which must keep flex's per-element meaning."""
import json
import os
import subprocess
import sys

import pytest
import torch

import bench as bench_module
from model import ATTN_MODS, GPTConfig, MuPFlexAttention

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--n_layer=1', '--n_head=2', '--n_embd=32', '--mup_base_width=16', '--block_size=16', '--batch_size=2',
        '--vocab_size=11', '--seq_lens=8,16', '--warmup=1', '--iters=1']


def bench(*args, cwd):
    return subprocess.run([sys.executable, os.path.join(ROOT, 'bench.py'), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120, env={**os.environ, 'OMP_NUM_THREADS': '1'})


def test_bench_writes_every_row_and_the_target_ratios(tmp_path):
    proc = bench(*TINY, '--device=cpu', '--out_file=out.json', cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / 'out.json').read_text())
    assert report['settings']['n_embd'] == 32 and report['environment']['device'] == 'cpu'
    assert {'dtype', 'threads', 'load_average_start', 'load_average_end', 'peak_flops'} <= set(report['environment'])

    # training steps: the direct-SDPA reference and every backend that trains on CPU, SP and muP
    rows = {(r['backend'], r['param']): r for r in report['train']}
    assert set(rows) == {(b, p) for b in ('sdpa-direct', 'auto', 'sdpa', 'dense') for p in ('sp', 'mup')}
    for r in rows.values():
        assert r['ms_per_step'] > 0 and r['tokens_per_s'] > 0 and 0 < r['mfu']
        assert {'overhead_ms', 'overhead_pct', 'mask_build_ms'} <= set(r) and len(r['times_ms']) == 1 # iters
    assert rows['dense', 'sp']['resolved'] == 'dense' and rows['auto', 'sp']['resolved'] == 'sdpa'
    for param in ('sp', 'mup'): # every backend trains the same model: same seed, same first loss
        losses = [rows[b, param]['first_loss'] for b in ('sdpa-direct', 'auto', 'sdpa', 'dense')]
        assert max(losses) - min(losses) < 1e-4, losses
    assert rows['auto', 'sp']['first_loss'] != rows['auto', 'mup']['first_loss'] # the muP rows are muP
    assert set(report['ratios']['mup_over_sp']) == {'sdpa-direct', 'auto', 'sdpa', 'dense'}
    assert set(report['ratios']['over_direct_sdpa']) == {f'{b}/{p}' for b in ('auto', 'sdpa', 'dense')
                                                        for p in ('sp', 'mup')}

    # attention only: every catalog mod at every T, against causal SDPA at that T
    cells = {(r['mod'].partition(':')[0], r['backend'], r['T']): r for r in report['attention']}
    expected = {(m, 'dense', T) for m in ATTN_MODS for T in (8, 16)}
    expected |= {('causal', b, T) for b in ('sdpa-direct', 'sdpa') for T in (8, 16)}
    assert set(cells) == expected
    assert all(cells['causal', 'sdpa-direct', T]['over_sdpa_causal'] == 1.0 for T in (8, 16))
    assert 'ms/step' in proc.stdout and 'x causal SDPA' in proc.stdout


def test_bench_gpu_mode_on_cpu_says_it_needs_cuda(tmp_path):
    proc = bench('--modes=gpu', '--device=cpu', cwd=tmp_path)
    assert proc.returncode != 0 and 'needs a CUDA device' in proc.stderr
    assert not (tmp_path / 'bench.json').exists()


@pytest.mark.parametrize('key, value, wanted', [
    ('modes', ('train', 'speed'), "choose from 'train', 'attention', 'gpu'"),
    ('attn_backend', 'fast', "use 'all' or one of"),
    ('parameterization', 'mu', "use 'sp', 'mup' or 'both'"),
    ('compile', 'yes', 'use False, True or both'),
])
def test_bench_refuses_settings_it_does_not_know(monkeypatch, key, value, wanted):
    monkeypatch.setattr(bench_module, key, value)
    with pytest.raises(ValueError, match=wanted):
        bench_module.check_settings()


# ---- the dense backend's fast paths keep flex's meaning

B, H, T, D = 2, 2, 12, 8
pytestmark = pytest.mark.filterwarnings('ignore:flex_attention called without torch.compile')


class RowSumBias(MuPFlexAttention):
    """A score_mod that is not elementwise: a bias per key, the sum of its table row. On broadcast
    index tensors `.sum()` would add up the whole table instead (one constant, which softmax
    ignores), so the dense backend must notice and keep vmap's meaning."""
    def __init__(self, config):
        super().__init__(config)
        self.register_buffer('table', torch.linspace(-1, 1, T * 3).view(T, 3))

    def score_mod(self, score, b, h, q_idx, kv_idx):
        return score + self.table[kv_idx].sum()


class RowSumMask(MuPFlexAttention):
    """A mask_mod that is not elementwise either: the diagonal, and the keys below a threshold per
    query, the sum of its table row (on broadcast indices: of the whole table, so every key)."""
    def __init__(self, config):
        super().__init__(config)
        self.register_buffer('table', torch.arange(T * 2).view(T, 2) % 5)

    def mask_mod(self, b, h, q_idx, kv_idx):
        return (kv_idx == q_idx) | (kv_idx < self.table[q_idx].sum())


def attention(cls, backend, attn_mod='causal'):
    return cls(GPTConfig(block_size=T, vocab_size=11, n_layer=1, n_head=H, n_embd=H * D, attn_mod=attn_mod,
                         attn_backend=backend))


@pytest.mark.parametrize('cls', [RowSumBias, RowSumMask])
def test_dense_keeps_flex_meaning_for_mods_that_are_not_elementwise(cls):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, T, D, generator=g) for _ in range(3))
    with torch.no_grad(): # flex has no backward on CPU; its eager forward is the reference
        dense, flex = attention(cls, 'dense').attend(q, k, v), attention(cls, 'flex').attend(q, k, v)
        plain = attention(MuPFlexAttention, 'dense').attend(q, k, v)
    assert (dense - plain).abs().max() > 1e-2 # the mod does something
    torch.testing.assert_close(dense, flex, rtol=0, atol=1e-5)


def test_elementwise_mods_take_the_broadcast_path_with_a_compact_mask():
    attn = attention(MuPFlexAttention, 'dense', 'alibi')
    attn.attend(*(torch.randn(B, H, T, D) for _ in range(3)))
    cache = attn.block_mask_cache
    assert cache['dense plan', B, T, 'cpu', False][0] is True # (broadcasts, blocks, rows)
    assert cache['dense', B, T, 'cpu'].shape == (1, 1, T, T) # causal depends on neither b nor h
    assert attn._dense_mask(B, T, torch.device('cpu')).shape == (B, H, T, T)
    not_elementwise = attention(RowSumBias, 'dense')
    not_elementwise.attend(*(torch.randn(B, H, T, D) for _ in range(3)))
    assert not_elementwise.block_mask_cache['dense plan', B, T, 'cpu', False][0] is False
