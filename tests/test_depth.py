"""Depth transfer (CompleteP, docs/mup.md "Depth"): one AdamW step moves each parameter as the
depth table says, each block adds m_L^-alpha of its branches, the init does not change with
depth, the rules vanish at the base depth, the residual stream stays the same size as depth
grows after a few Adam steps (and grows without depth scaling), and the best learning rate stays
put across 8x depth."""

import pytest
import torch

from conftest import best_log2_lr, make_gpt, tokens
from coord_check import run_depths, slopes

BASE_WIDTH, BASE_DEPTH = 64, 2
LR, WEIGHT_DECAY, EPS = 1e-3, 0.1, 1e-8

# docs/mup.md's depth table worked out by hand for m_N = 4 (width 256 on base 64) and m_L = 4
# (8 layers on base 2): (Adam lr / LR, weight decay per step / (LR * WEIGHT_DECAY), Adam eps / EPS)
TABLE = {
    1.0: {'block matrix':    (0.25, 1.0, 0.0625),
          'block vector':    (1.0,  0.0, 0.0625),
          'embedding':       (1.0,  1.0, 0.25),
          'final LayerNorm': (1.0,  0.0, 0.25)},
    0.5: {'block matrix':    (0.125, 0.5, 0.125),
          'block vector':    (0.5,   0.0, 0.125),
          'embedding':       (1.0,   1.0, 0.25),
          'final LayerNorm': (1.0,   0.0, 0.25)},
}
BRANCH_MULT = {1.0: 0.25, 0.5: 0.5}


def row(name, p):
    """The depth table's row of a parameter (the tied readout is the token embedding)."""
    if name.startswith('transformer.h.'):
        return 'block matrix' if p.dim() == 2 else 'block vector'
    return 'final LayerNorm' if name.startswith('transformer.ln_f.') else 'embedding'


def one_step(model, value, grad, weight_decay):
    """{parameter name: its change} in configure_optimizers' first AdamW step from every entry at
    `value` with gradient `grad`. Adam's first step is lr * grad / (|grad| + eps) per entry, after
    AdamW's decay by lr * weight_decay: grad >> eps shows the lr, grad == EPS the eps, and a
    zero gradient at value 1 the weight decay."""
    optimizer = model.configure_optimizers(weight_decay, LR, (0.9, 0.99), 'cpu', EPS)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)
            p.grad = torch.full_like(p, grad)
    optimizer.step()
    return {name: (p - value).mean().item() for name, p in model.named_parameters()}


@pytest.mark.parametrize('alpha', [1.0, 0.5])
def test_one_adamw_step_follows_the_completep_table(alpha):
    """What AdamW does to each parameter of a m_N = m_L = 4 model, measured (float64): its lr,
    its weight decay per step and its eps, against the hand-worked table."""
    model = make_gpt(n_embd=256, n_layer=8, bias=True, mup_base_width=BASE_WIDTH, mup_base_depth=BASE_DEPTH,
                     mup_depth_alpha=alpha).double()
    rows = {name: row(name, p) for name, p in model.named_parameters()}
    assert set(rows.values()) == set(TABLE[alpha])
    lr_step = one_step(model, 0.0, 1.0, 0.0)
    eps_step = one_step(model, 0.0, EPS, 0.0) # lr * EPS / (EPS + group eps)
    decay_step = one_step(model, 1.0, 0.0, WEIGHT_DECAY)
    for name, r in rows.items():
        measured = (-lr_step[name] / LR, -decay_step[name] / (LR * WEIGHT_DECAY), lr_step[name] / eps_step[name] - 1)
        assert measured == pytest.approx(TABLE[alpha][r], rel=1e-6), (name, r)


@pytest.mark.parametrize('alpha', [1.0, 0.5])
def test_each_block_adds_m_l_to_the_minus_alpha_of_its_branches(alpha):
    """A block's output minus its input, over what its attention and MLP branches output."""
    model = make_gpt(n_embd=256, n_layer=8, mup_base_width=BASE_WIDTH, mup_base_depth=BASE_DEPTH,
                     mup_depth_alpha=alpha).double()
    seen = {}
    def keep(key):
        return lambda module, args, output: seen.setdefault(key, []).append((args[0], output))
    for block in model.transformer.h:
        for key, module in (('block', block), ('attn', block.attn), ('mlp', block.mlp)):
            module.register_forward_hook(keep(key))
    with torch.no_grad():
        model(tokens())
    for (x, y), (_, attn), (_, mlp) in zip(seen['block'], seen['attn'], seen['mlp']):
        branches = attn + mlp
        mult = ((y - x) * branches).sum() / (branches * branches).sum()
        assert mult.item() == pytest.approx(BRANCH_MULT[alpha], rel=1e-9)
        torch.testing.assert_close(y - x, mult * branches)


def block_matrix_stds(n_layer, **depth):
    """{a block's matrix, e.g. 'mlp.c_proj.weight': the std of its init over every block}."""
    model = make_gpt(n_embd=256, n_layer=n_layer, mup_base_width=BASE_WIDTH, **depth)
    pooled = {}
    for name, p in model.named_parameters():
        if name.startswith('transformer.h.') and p.dim() == 2:
            pooled.setdefault(name.split('.', 3)[3], []).append(p.flatten())
    return {key: torch.cat(entries).std().item() for key, entries in pooled.items()}


def test_init_does_not_change_with_depth():
    """Every matrix of an 8-layer model's blocks, the residual projections included, is initialised
    as in the 2-layer base model. The control, without depth scaling: nanoGPT's 1/sqrt(2 L) on the
    residual projections halves their std at 4x depth."""
    deep, base = block_matrix_stds(8, mup_base_depth=BASE_DEPTH), block_matrix_stds(2, mup_base_depth=BASE_DEPTH)
    assert deep == pytest.approx(base, rel=0.02)
    deep, base = block_matrix_stds(8), block_matrix_stds(2)
    halved = {key: 0.5 if key.endswith('c_proj.weight') else 1.0 for key in base}
    assert {key: deep[key] / base[key] for key in base} == pytest.approx(halved, rel=0.02)


def groups_by_param(model, weight_decay=0.1, lr=1e-3, eps=1e-8):
    """{parameter name: (lr, weight decay, eps)} of AdamW as configure_optimizers builds it."""
    optimizer = model.configure_optimizers(weight_decay, lr, (0.9, 0.99), 'cpu', eps)
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: (g['lr'], g['weight_decay'], g['eps']) for g in optimizer.param_groups for p in g['params']}


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
    optimizers = [plain.configure_optimizers(0.1, 3e-3, (0.9, 0.99), 'cpu', 1e-8 / m_N), # the same eps
                  deep.configure_optimizers(0.1, 3e-3, (0.9, 0.99), 'cpu', 1e-8)]
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
