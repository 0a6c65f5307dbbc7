"""Muon with muP (docs/mup.md "Muon"): the project's Muon (muon.py, torch.optim.Muon's math in
the device's fast dtype) steps the hidden matrices with no 1/m on their lr, AdamW the rest with
the width rules; a coordinate check after a few Muon steps is flat in width under muP (and grows
with Moonshot's RMS-matched update and under SP); the best learning rate stays put across 8x
width."""

import pytest
import torch

import muon as muon_module
from conftest import best_log2_lr, make_gpt, tokens
from coord_check import run_widths, slope, slopes
from model import set_lr
from muon import Muon, default_ns_dtype, orthogonalize

WIDTHS = [128, 256, 512, 1024]
MULT = 4.0 # muon_lr_mult: Muon's lr is 4x the base lr in these checks


# ---- the project's Muon is torch.optim.Muon's math in the device's fast dtype

def muon_pair(shapes, seed=0, **kw):
    """The same matrices, with a random gradient each, for our Muon and for torch's."""
    torch.manual_seed(seed)
    ours = [torch.nn.Parameter(torch.randn(shape)) for shape in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    return ours, theirs


def random_grads(params_a, params_b, seed):
    g = torch.Generator().manual_seed(seed)
    for a, b in zip(params_a, params_b):
        grad = torch.randn(a.shape, generator=g)
        a.grad, b.grad = grad.clone(), grad.clone()


@pytest.mark.parametrize('nesterov', [True, False])
def test_muon_equals_torch_muon_in_bfloat16(nesterov):
    """Tall, wide and square matrices, 3 steps with momentum and weight decay: bitwise equal."""
    ours, theirs = muon_pair([(48, 16), (16, 40), (24, 24)])
    mine = Muon(ours, lr=0.05, weight_decay=0.1, momentum=0.9, nesterov=nesterov, ns_dtype=torch.bfloat16)
    torchs = torch.optim.Muon(theirs, lr=0.05, weight_decay=0.1, momentum=0.9, nesterov=nesterov,
                              adjust_lr_fn='original')
    for step in range(3):
        random_grads(ours, theirs, seed=step)
        mine.step()
        torchs.step()
        for a, b in zip(ours, theirs):
            assert torch.equal(a, b), (step, (a - b).abs().max())


def test_orthogonalize_in_float32_is_near_orthogonal_and_close_to_bfloat16():
    """fp32 (CPUs without bf16 instructions) runs the same iteration: singular values in
    Newton-Schulz's band around 1, and within bf16's rounding of torch's result."""
    g = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    fp32 = orthogonalize(g, torch.float32)
    assert fp32.dtype == torch.float32
    singular_values = torch.linalg.svdvals(fp32)
    assert singular_values.min() > 0.6 and singular_values.max() < 1.25, singular_values
    bf16 = orthogonalize(g, torch.bfloat16).float()
    assert (fp32 - bf16).abs().max() < 0.03


@pytest.mark.parametrize('has_bf16', [False, True])
def test_muon_steps_in_bfloat16_only_on_cpus_that_have_it(has_bf16, monkeypatch):
    """A CPU without bf16 instructions gets no bf16 anywhere in a Muon step (there a bf16 matmul
    is emulated, ~50x slower than fp32); one with them gets torch's bf16."""
    monkeypatch.setattr(muon_module, 'cpu_has_bf16_matmul', lambda: has_bf16)
    seen = []
    original = muon_module.orthogonalize
    def spy(matrix, dtype, *args, **kwargs):
        seen.append(dtype)
        return original(matrix, dtype, *args, **kwargs)
    monkeypatch.setattr(muon_module, 'orthogonalize', spy)
    p = torch.nn.Parameter(torch.randn(32, 32))
    p.grad = torch.randn(32, 32)
    Muon([p], lr=0.01).step()
    assert seen == [torch.bfloat16 if has_bf16 else torch.float32]
    assert default_ns_dtype(torch.device('cuda')) == torch.bfloat16


@pytest.mark.parametrize('mup_base_width', [0, 64])
def test_hidden_matrices_go_to_muon_without_the_width_rule(mup_base_width):
    model = make_gpt(n_embd=256, bias=True, mup_base_width=mup_base_width)
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), 'cpu', 1e-8, 'muon', MULT, 0.9)
    muon, adamw = optimizer.optimizers
    assert isinstance(muon, Muon) and isinstance(adamw, torch.optim.AdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    in_muon = {names[id(p)] for g in muon.param_groups for p in g['params']}
    assert in_muon == {n for n, p in model.named_parameters() if p.dim() == 2 and '.h.' in n}
    for g in muon.param_groups: # lr and decay as is at every width (m = 4 under muP here)
        assert g['lr'] == pytest.approx(1e-3 * MULT) and g['weight_decay'] == 0.1
        assert g['momentum'] == 0.9
    for g in adamw.param_groups: # the AdamW groups keep muP's rules: embeddings at lr, vectors undecayed
        assert g['lr'] == pytest.approx(1e-3) and g['weight_decay'] in (0.0, 0.1)
    set_lr(optimizer, 0.5) # the one knob a sweep turns moves both optimizers
    assert muon.param_groups[0]['lr'] == pytest.approx(0.5 * MULT)
    assert [g['lr'] for g in adamw.param_groups] == pytest.approx([0.5] * len(adamw.param_groups))


# ---- the coordinate check after 6 Muon steps: widths 64..512 around a base of 32, base lr 3e-3 (Muon
# 1.2e-2), every module's output. Max |slope| of mean|h| and of mean|h_t - h_0| at t = 6, measured
# over seeds 0-2: muP 0.11-0.13; SP 1.07-1.10; Moonshot's match_rms_adamw at the same lr 0.71 (its
# update grows like sqrt(width)). (Widths 128..1024 at t = 4, 4x the time: muP 0.07, SP 1.19-1.23,
# RMS-matched 0.66.)

def muon_slopes(param, seed=0):
    results = run_widths([64, 128, 256, 512], param, steps=6, lr=3e-3, seed=seed, base_width=32, optimizer='muon',
                         muon_lr_mult=MULT)
    return {**slopes(results, 6, 'h'), **{f'd{k}': v for k, v in slopes(results, 6, 'dh').items()}}


def test_mup_muon_coord_check_is_flat():
    s = muon_slopes('mup')
    assert max(abs(v) for v in s.values()) <= 0.25, s


def test_rms_matched_muon_update_grows_with_width(monkeypatch):
    """Moonshot's update scale 0.2 sqrt(max(fan_out, fan_in)) (torch's 'match_rms_adamw')."""
    monkeypatch.setattr(muon_module, 'update_scale', lambda shape: 0.2 * max(shape) ** 0.5)
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
        optimizer = model.configure_optimizers(0.0, 3e-3, (0.9, 0.99), 'cpu', 1e-8, 'muon', MULT, 0.95)
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
LOG2_LRS = list(range(-9, -1)) # around the optima measured on -12..-2: muP -4, SP -4..-7


def best_log2_lrs(param, seed=0):
    return [best_log2_lr(dict(width=w, param=param, base_width=LR_WIDTHS[0]), LOG2_LRS, seed, optimizer='muon',
                         muon_lr_mult=MULT) for w in LR_WIDTHS]


def test_mup_muon_best_lr_transfers_across_width():
    best = best_log2_lrs('mup')
    assert max(best) - min(best) <= 1, best


def test_sp_muon_best_lr_shrinks_with_width():
    best = best_log2_lrs('sp')
    assert best[0] - best[-1] >= 2, best
