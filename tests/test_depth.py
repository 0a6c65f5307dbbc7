"""Depth transfer (CompleteP, docs/mup.md "Depth"): the optimizer groups follow the table, the
rules vanish at the base depth, the residual stream stays the same size as depth grows after a
few Adam steps (and grows without depth scaling), and the best learning rate stays put across 8x
depth."""
import math

import pytest
import torch

from conftest import best_log2_lr, make_gpt, quiet, tokens
from coord_check import run_depths, slopes

BASE_WIDTH, BASE_DEPTH = 64, 2


def groups_by_param(model, weight_decay=0.1, lr=1e-3, eps=1e-8):
    """{parameter name: (lr, weight decay, eps)} of AdamW as configure_optimizers builds it."""
    optimizer = quiet(model.configure_optimizers, weight_decay, lr, (0.9, 0.99), 'cpu', eps)
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: (g['lr'], g['weight_decay'], g['eps']) for g in optimizer.param_groups for p in g['params']}


@pytest.mark.parametrize('alpha', [1.0, 0.5])
def test_optimizer_groups_follow_the_completep_table(alpha):
    """m_N = 4 (width 256 on base 64) and m_L = 4 (8 layers on base 2): every group's lr, weight
    decay and eps, and the residual branch multiplier, are those of docs/mup.md's depth table."""
    m_N = m_L = 4
    model = make_gpt(n_embd=256, n_layer=8, bias=True, mup_base_width=BASE_WIDTH, mup_base_depth=BASE_DEPTH,
                     mup_depth_alpha=alpha)
    lr, wd, eps = 1e-3, 0.1, 1e-8
    expected = {
        'hidden':          (lr / m_N * m_L ** (alpha - 1), wd * m_N, eps / m_N * m_L ** -alpha),
        'in-block vector': (lr * m_L ** (alpha - 1), 0.0, eps / m_N * m_L ** -alpha),
        'embedding':       (lr, wd, eps / m_N),
        'final LayerNorm': (lr, 0.0, eps / m_N),
    }
    def row(name):
        if name.startswith('transformer.ln_f'):
            return 'final LayerNorm'
        if name.startswith('transformer.w'):
            return 'embedding'
        return 'hidden' if name.endswith('.weight') and not '.ln_' in name else 'in-block vector'
    got = groups_by_param(model, wd, lr, eps)
    assert {row(n) for n in got} == set(expected)
    for name, values in got.items():
        assert values == pytest.approx(expected[row(name)], rel=1e-12), name
    assert all(block.residual_mult == pytest.approx(m_L ** -alpha) for block in model.transformer.h)


def test_init_does_not_change_with_depth():
    """The residual projections keep the base depth's 1/sqrt(2 L_base) at every depth."""
    for n_layer in (2, 8):
        model = make_gpt(n_embd=256, n_layer=n_layer, mup_base_width=BASE_WIDTH, mup_base_depth=BASE_DEPTH)
        std = model.transformer.h[-1].mlp.c_proj.weight.std().item()
        assert std * math.sqrt(256 / BASE_WIDTH) == pytest.approx(0.02 / math.sqrt(2 * BASE_DEPTH), rel=0.05)


@pytest.mark.parametrize('n_embd', [64, 256])
def test_base_depth_is_exactly_width_only_mup(n_embd):
    """mup_base_depth == n_layer: the same parameters, logits and optimizer groups as without depth
    scaling, and the same weights after training steps. The one rule left at the base depth is
    CompleteP's eps / m_N, the identity at the base width."""
    plain = make_gpt(3, n_embd=n_embd, n_layer=4, bias=True, mup_base_width=BASE_WIDTH)
    deep = make_gpt(3, n_embd=n_embd, n_layer=4, bias=True, mup_base_width=BASE_WIDTH, mup_base_depth=4)
    for (n1, p1), (n2, p2) in zip(plain.named_parameters(), deep.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    m_N = n_embd / BASE_WIDTH
    g_plain, g_deep = groups_by_param(plain), groups_by_param(deep)
    assert {n: v[:2] for n, v in g_plain.items()} == {n: v[:2] for n, v in g_deep.items()}
    assert all(g_deep[n][2] == g_plain[n][2] / m_N for n in g_plain)
    idx = tokens()
    optimizers = [quiet(plain.configure_optimizers, 0.1, 3e-3, (0.9, 0.99), 'cpu', 1e-8 / m_N), # the same eps
                  quiet(deep.configure_optimizers, 0.1, 3e-3, (0.9, 0.99), 'cpu', 1e-8)]
    for _ in range(3):
        for model, optimizer in zip((plain, deep), optimizers):
            optimizer.zero_grad()
            model(idx, idx)[1].backward()
            optimizer.step()
    for p1, p2 in zip(plain.parameters(), deep.parameters()):
        assert torch.equal(p1, p2)


# ---- the depth coordinate check: width 64, depths 2..16, 4 Adam steps at lr 3e-3 on random tokens.
# Slopes of log2 mean|h| vs log2 depth, measured over seeds 0-4: with CompleteP -0.07..0.02, with
# depth-muP -0.05..0.02 (residual stream and logits); without depth scaling the residual stream's
# slope is 0.78..0.99 (the logits stay flat there too: ln_f normalises the stream).

DEPTHS = [2, 4, 8, 16]


def depth_slopes(variant, seed=0):
    results = run_depths(DEPTHS, variant, width=64, base_depth=BASE_DEPTH, steps=4, lr=3e-3, seed=seed,
                         base_width=BASE_WIDTH)
    return slopes(results)


@pytest.mark.parametrize('variant', ['CompleteP', 'depth-muP'])
def test_residual_stream_is_flat_in_depth_with_depth_scaling(variant):
    s = depth_slopes(variant)
    assert set(s) == {'residual at L/2', 'residual at L', 'logits'}
    assert max(abs(v) for v in s.values()) <= 0.2, s


def test_residual_stream_grows_with_depth_without_depth_scaling():
    s = depth_slopes('none')
    assert min(s['residual at L/2'], s['residual at L']) >= 0.5, s


# ---- depth lr transfer: fit one 8x32 batch of random tokens with 10 constant-lr Adam steps at
# width 64; the best lr of each depth on a x2 grid.

LOG2_LRS = list(range(-11, -2))


def best_log2_lr_at(depth, **scaling):
    return best_log2_lr(dict(width=BASE_WIDTH, param='mup', n_layer=depth, base_width=BASE_WIDTH, **scaling), LOG2_LRS)


def test_completep_best_lr_transfers_across_depth():
    best = [best_log2_lr_at(depth, mup_base_depth=BASE_DEPTH, mup_depth_alpha=1.0) for depth in DEPTHS]
    assert max(best) - min(best) <= 1, best # at most one x2 step over 8x depth (measured: 0, seeds 0-4)


def test_without_depth_scaling_the_best_lr_shrinks_with_depth():
    best = [best_log2_lr_at(depth) for depth in DEPTHS]
    assert best[0] - best[-1] >= 1, best # measured: 1 or 2 steps smaller at 8x depth, seeds 0-4
