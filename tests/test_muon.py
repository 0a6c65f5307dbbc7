"""Muon with muP (docs/mup.md "Muon"): torch's Muon steps the hidden matrices with no 1/m on their
lr, AdamW the rest with the width rules; a coordinate check after a few Muon steps is flat in
width under muP (and grows with Moonshot's RMS-matched update and under SP); the best learning
rate stays put across 8x width."""

import pytest
import torch

import model as model_module
from conftest import best_log2_lr, make_gpt, quiet, tokens
from coord_check import run_widths, slope, slopes
from model import set_lr

WIDTHS = [128, 256, 512, 1024]
MULT = 4.0 # muon_lr_mult: Muon's lr is 4x the base lr in these checks


@pytest.mark.parametrize('mup_base_width', [0, 64])
def test_hidden_matrices_go_to_muon_without_the_width_rule(mup_base_width):
    model = make_gpt(n_embd=256, bias=True, mup_base_width=mup_base_width)
    optimizer = quiet(model.configure_optimizers, 0.1, 1e-3, (0.9, 0.99), 'cpu', 1e-8, 'muon', MULT, 0.9)
    muon, adamw = optimizer.optimizers
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    in_muon = {names[id(p)] for g in muon.param_groups for p in g['params']}
    assert in_muon == {n for n, p in model.named_parameters() if p.dim() == 2 and '.h.' in n}
    m = 256 / mup_base_width if mup_base_width else 1.0
    for g in muon.param_groups: # lr and decay as is at every width; torch's 'original' shape adjustment
        assert g['lr'] == pytest.approx(1e-3 * MULT) and g['weight_decay'] == 0.1
        assert g['adjust_lr_fn'] == 'original' and g['momentum'] == 0.9
    for g in adamw.param_groups: # the AdamW groups keep muP's rules: embeddings at lr, vectors undecayed
        assert g['lr'] == pytest.approx(1e-3) and g['weight_decay'] in (0.0, 0.1)
    assert not any(g['lr_scale'] == pytest.approx(1 / m) for g in muon.param_groups if m != 1)
    set_lr(optimizer, 0.5) # the one knob a sweep turns moves both optimizers
    assert [g['lr'] for g in optimizer.param_groups] == [0.5 * g['lr_scale'] for g in optimizer.param_groups]
    assert muon.param_groups[0]['lr'] == pytest.approx(0.5 * MULT)


# ---- the coordinate check after 4 Muon steps: widths 128..1024, base lr 3e-3 (Muon 1.2e-2).
# Max |slope| of mean|h| and of mean|h_t - h_0| at t = 4, measured over seeds 0-2: muP 0.07-0.08;
# Moonshot's match_rms_adamw at the same lr 0.65-0.66 (its update grows like sqrt(width)); SP 1.18-1.23.

def muon_slopes(param, seed=0):
    results = run_widths(WIDTHS, param, steps=4, lr=3e-3, seed=seed, base_width=64, optimizer='muon',
                         muon_lr_mult=MULT)
    return {**slopes(results, 4, 'h'), **{f'd{k}': v for k, v in slopes(results, 4, 'dh').items()}}


def test_mup_muon_coord_check_is_flat():
    s = muon_slopes('mup')
    assert max(abs(v) for v in s.values()) <= 0.25, s


def test_rms_matched_muon_update_grows_with_width(monkeypatch):
    muon = torch.optim.Muon
    monkeypatch.setattr(model_module.torch.optim, 'Muon', lambda *a, **kw: muon(*a, **{**kw, 'adjust_lr_fn': 'match_rms_adamw'}))
    s = muon_slopes('mup')
    assert max(abs(v) for v in s.values()) >= 0.5, s


def test_sp_muon_coord_check_blows_up():
    s = muon_slopes('sp')
    assert max(abs(v) for v in s.values()) >= 0.8, s


# ---- the spectral condition itself: one Muon step changes what a hidden matrix computes, on the
# inputs it saw, by the same amount per coordinate at every width (mean|dW x| for MLP.c_fc of every
# block, widths 128..1024). The coordinate check above cannot see a Muon lr that is too small at
# width (AdamW's embeddings carry the change); this can. Slope vs log2 width over seeds 0-2:
# muP -0.015..-0.004; with AdamW's 1/m on Muon's lr -1.02..-1.00; RMS-matched update 0.49..0.50.

def hidden_update_slope(seed):
    stats = []
    for width in WIDTHS:
        model = make_gpt(seed, n_embd=width, mup_base_width=64)
        fcs = [block.mlp.c_fc for block in model.transformer.h]
        inputs = []
        hooks = [fc.register_forward_hook(lambda mod, args, out: inputs.append(args[0].detach())) for fc in fcs]
        before = [fc.weight.detach().clone() for fc in fcs]
        optimizer = quiet(model.configure_optimizers, 0.0, 3e-3, (0.9, 0.99), 'cpu', 1e-8, 'muon', MULT, 0.95)
        model(tokens(B=8, seed=seed), tokens(B=8, seed=seed + 100))[1].backward()
        optimizer.step()
        for hook in hooks:
            hook.remove()
        stats.append(sum((x @ (fc.weight - w0).T).abs().mean().item() for x, fc, w0 in zip(inputs, fcs, before)))
    return slope(WIDTHS, stats)


def test_muon_hidden_update_is_the_same_size_at_every_width():
    s = hidden_update_slope(seed=0)
    assert abs(s) <= 0.2, s


# ---- lr transfer with Muon: fit one 8x32 batch of random tokens in 10 steps, widths 32..256 (8x),
# base width 32, base lr on a x2 grid (Muon at 4x). Best log2 lr per width, seeds 0-1: muP -4 -4 -4
# -4 both; SP -4 -5 -6 -7 and -4 -5 -6 -6.

LR_WIDTHS = [32, 64, 128, 256]
LOG2_LRS = list(range(-12, -1))


def best_log2_lrs(param, seed=0):
    return [best_log2_lr(dict(width=w, param=param, base_width=LR_WIDTHS[0]), LOG2_LRS, seed, optimizer='muon',
                         muon_lr_mult=MULT) for w in LR_WIDTHS]


def test_mup_muon_best_lr_transfers_across_width():
    best = best_log2_lrs('mup')
    assert max(best) - min(best) <= 1, best


def test_sp_muon_best_lr_shrinks_with_width():
    best = best_log2_lrs('sp')
    assert best[0] - best[-1] >= 2, best
