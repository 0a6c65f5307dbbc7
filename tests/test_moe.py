"""The mixture of experts (model.MoE): its dispatch computes what a loop over tokens computes, its
load-balancing loss and routing statistics, its muP classes by shape (the number of experts fixed
or a width), Muon on each expert, training through train.py, and the coordinate check in both
scalings: n_expert fixed while the width grows, and n_expert growing with it."""

import contextlib
import functools
import json
from unittest import mock

import pytest
import torch

from conftest import TINY_TRAIN, make_gpt, ok, run_script, text_batch, tokens
import coord_check
from coord_check import run_widths, slopes
from muon import orthogonalize, orthogonalize_each
from model import MoE

MOE = dict(n_expert=4, n_expert_active=2)


def routed_by_a_loop(moe, x):
    """Each token through each of its top-k experts, one at a time: the reference."""
    tokens_ = x.reshape(-1, x.size(-1))
    probs = moe.router(tokens_).softmax(-1)
    weights, chosen = probs.topk(moe.n_expert_active, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    out = torch.zeros_like(tokens_)
    for i, token in enumerate(tokens_):
        for weight, e in zip(weights[i], chosen[i]):
            h = token @ moe.expert_fc[e].T
            h = moe.act(token @ moe.expert_gate[e].T) * h if moe.expert_gate is not None else moe.act(h)
            out[i] += weight * (h @ moe.expert_proj[e].T)
    out = out.reshape(x.shape)
    return out + moe.shared(x) if moe.shared is not None else out


@pytest.mark.parametrize('mlp', ['gelu', 'relu2', 'swiglu'])
@pytest.mark.parametrize('shared', [0, 1])
def test_the_packed_dispatch_equals_a_loop_over_tokens(mlp, shared):
    moe = make_gpt(seed=1, mlp=mlp, n_shared_expert=shared, **MOE).transformer.h[0].mlp
    x = torch.randn(3, 7, 64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(moe(x), routed_by_a_loop(moe, x), rtol=0, atol=1e-5)
    assert moe.load.sum() == 3 * 7 * 2 # every token went to 2 experts


def test_the_balance_loss_is_one_when_balanced_and_grows_with_imbalance():
    moe = make_gpt(**MOE).transformer.h[0].mlp
    x = torch.rand(64, 64, generator=torch.Generator().manual_seed(0)) # positive coordinates
    with torch.no_grad():
        moe.router.weight.zero_() # uniform router probabilities: n_expert * sum_i f_i / n_expert = 1
        moe(x)
        assert moe.aux_loss.item() == pytest.approx(1.0)
        moe.router.weight[0] = 1.0 # every token's first choice: expert 0, with probability ~1
        moe(x)
    # f_0 = 1/2 (each token's 2 choices), P_0 ~ 1: 4 x 1/2 x 1
    assert moe.load[0] == 64 and moe.aux_loss.item() == pytest.approx(2.0, abs=1e-3)


def test_the_balance_loss_is_in_the_training_loss_only():
    model = make_gpt(moe_aux_loss_coef=0.5, **MOE)
    idx = tokens()
    train_loss = model(idx, idx)[1]
    aux = sum(block.mlp.aux_loss for block in model.transformer.h)
    eval_loss = model.eval()(idx, idx)[1]
    torch.testing.assert_close(train_loss, eval_loss + 0.5 * aux)


def test_experts_are_hidden_and_the_router_an_output_weight_by_shape():
    model = make_gpt(n_embd=128, mup_base_width=64, mlp='swiglu', n_shared_expert=1, **MOE)
    info = model.mup_param_info
    for name in ('expert_fc', 'expert_gate', 'expert_proj'):
        kind, width_mult, in_block = info[f'transformer.h.0.mlp.{name}'] # 8/3 n_embd / 3 rounds: m ~ 2
        assert kind == 'hidden' and width_mult == pytest.approx(2.0, abs=0.02) and in_block
    assert info['transformer.h.0.mlp.router.weight'][:2] == ('output', 2.0)
    assert info['transformer.h.0.mlp.shared.c_fc.weight'][:2] == ('hidden', 2.0) # a shared expert is an MLP


def test_with_a_base_n_expert_the_number_of_experts_is_a_width():
    """n_expert 8 at width 128 from 4 at 64 (top-2 of 4 -> top-4 of 8): the router's fan-out grows
    with its fan-in, so it is hidden (OLMo-core's num_experts as a width); the experts' matrices
    keep their width multiplier, which only the fan-in sets."""
    model = make_gpt(n_embd=128, mup_base_width=64, n_expert=8, n_expert_active=4, mup_base_n_expert=4,
                     expert_width_mult=1.0)
    info = model.mup_param_info
    assert info['transformer.h.0.mlp.router.weight'][:2] == ('hidden', 2.0)
    for name in ('expert_fc', 'expert_proj'):
        assert info[f'transformer.h.0.mlp.{name}'][:2] == ('hidden', 2.0)
    at_base = make_gpt(n_embd=64, mup_base_width=64, n_expert=4, n_expert_active=2, mup_base_n_expert=4)
    assert at_base.mup_param_info['transformer.h.0.mlp.router.weight'][:2] == ('hidden', 1.0)


@pytest.mark.parametrize('settings, named', [
    (dict(n_expert=8, mup_base_n_expert=4), 'mup_base_n_expert=4 only has a meaning for a mixture of experts under muP'),
    (dict(n_expert=8, n_expert_active=3, mup_base_width=32, mup_base_n_expert=4), 'the base model keeps the active fraction 3/8'),
])
def test_a_base_n_expert_that_cannot_be_is_named(settings, named):
    with pytest.raises(ValueError, match=named):
        make_gpt(**settings)


def test_routing_reports_entropy_and_the_busiest_experts_load():
    model = make_gpt(**MOE)
    with torch.no_grad():
        for block in model.transformer.h:
            block.mlp.router.weight.zero_() # uniform probabilities: entropy log n_expert
        model(tokens())
    for entropy, busiest in model.routing():
        assert entropy == pytest.approx(1.0) and busiest >= 1.0
        # ties broken alike for every token: the same 2 experts take all pairs, 2 x the mean
        assert busiest == pytest.approx(2.0)


def test_muon_orthogonalizes_each_expert_on_its_own():
    stack = torch.randn(3, 8, 5, generator=torch.Generator().manual_seed(0))
    each = orthogonalize_each(stack, torch.float32)
    for expert, matrix in zip(each, stack):
        torch.testing.assert_close(expert, orthogonalize(matrix, torch.float32))


@pytest.mark.parametrize('optimizer', ['adamw', 'muon'])
def test_train_py_trains_a_mixture_of_experts(workdir, optimizer):
    out = ok(run_script('train.py', *TINY_TRAIN, '--max_iters=30', '--eval_interval=30', '--mup_base_width=16',
                        '--n_expert=4', '--n_expert_active=2', '--n_shared_expert=1', f'--optimizer={optimizer}',
                        f'--out_dir={workdir / f"moe-{optimizer}"}', cwd=workdir))
    losses = [float(line.split('loss ')[1].split(',')[0]) for line in out.splitlines() if line.startswith('iter ')]
    assert losses[-1] < losses[0] - 0.5, losses
    routing = [line for line in out.splitlines() if 'router entropy' in line]
    assert len(routing) == 2 and routing[0].startswith('step 0: router entropy ') # at each eval, per block
    if optimizer == 'adamw': # what a user runs on a trained run next
        jacobian = ok(run_script('analyze_jacobian.py', f'--ckpt={workdir / "moe-adamw"}', '--device=cpu',
                                 f'--out={workdir / "jacobian"}', cwd=workdir))
        assert 'verdict: ' in jacobian
        sample = ok(run_script('sample.py', f'--out_dir={workdir / "moe-adamw"}', '--num_samples=1',
                               '--max_new_tokens=20', '--device=cpu', cwd=workdir))
        assert sample.strip()


def test_moe_payoff_compares_the_arms_at_equal_active_parameters(workdir):
    config = workdir / 'moe_tiny.py'
    config.write_text("dataset = 'tiny'\ndevice = 'cpu'\ncompile = False\nn_layer, n_head, n_embd = 2, 2, 32\n"
                      "block_size, batch_size, eval_iters = 32, 8, 2\nmax_iters, warmup_iters = 20, 2\n"
                      "mup_base_width, learning_rate = 16, 3e-3\n")
    out_dir = workdir / 'moe-payoff'
    ok(run_script('moe_payoff.py', f'--config_file={config}', '--eval_interval=10', '--n_expert=4',
                  f'--out_dir={out_dir}', cwd=workdir))
    arms = json.loads((out_dir / 'results' / 'moe_main_job.json').read_text())['arms']
    dense, moe = arms['dense'], arms['moe']
    assert dense['active'] == pytest.approx(moe['active'], abs=0.01) and moe['params'] > moe['active']
    assert [e[0] for e in dense['evals']] == [e[0] for e in moe['evals']] == [0, 10, 20]
    assert moe['evals'][-1][3] < moe['evals'][0][3] - 0.5 # it learned
    assert [r[0] for r in moe['routing']] == [0, 10, 20] and all(len(r[1]) == len(r[2]) == 2 for r in moe['routing'])
    assert (out_dir / 'assets' / 'moe_main_job.png').exists()


# ---- muP's coordinate check in both scalings (python coord_check.py --n_expert=4 [--experts=grow] ...)

@functools.cache
def moe_slopes(param, experts='fixed', router_init_power=0.0):
    """Slopes of every module's mean|h| ('h...') and its change ('dh...') after 4 steps over widths
    64-512 (base 32): 4 experts, top-2, one shared (fixed); or 2 experts top-1 at the base width,
    x width / 32 (grow: 4 top-2 at 64 ... 32 top-16 at 512, each of the derived width).
    router_init_power: the router's init x m^power after muP's own, m = width / 32 (another
    paper's rule: +1/2 turns sigma/m into sigma/sqrt(m), -1/2 the reverse)."""
    build = coord_check.build_model
    def router_rescaled(width, *args, **kwargs):
        model = build(width, *args, **kwargs)
        with torch.no_grad():
            for block in model.transformer.h:
                block.mlp.router.weight.mul_((width / 32) ** router_init_power)
        return model
    x, y, vocab = text_batch(16, 64, 0)
    model_args = dict(n_shared_expert=1, **MOE) if experts == 'fixed' else dict(n_expert=2, n_expert_active=1)
    with mock.patch.object(coord_check, 'build_model', router_rescaled) if router_init_power else contextlib.nullcontext():
        results = run_widths([64, 128, 256, 512], param, steps=4, lr=3e-3, seed=0, batch=(x, y, vocab),
                             base_width=32, model_args=model_args, experts=experts)
    return {**slopes(results, 4, 'h'), **{f'd{k}': v for k, v in slopes(results, 4, 'dh').items()}}


def test_the_coord_check_records_each_expert():
    names = moe_slopes('mup')
    assert {f'h.{i}.mlp.expert.{e}' for i in range(2) for e in range(4)} <= set(names)


def test_mup_moe_coord_check_is_flat_but_the_router_logits_which_lean():
    """Every module's output and its change after 4 steps is flat in width but the router's
    logits. The router is an output weight: at init its logits vanish like 1/sqrt(m) (as the
    readout's do) and the updates build them; after 4 steps they still lean (measured: -0.43 and
    change -0.36 in layer 0; under SP +1.15 and +1.37)."""
    s = moe_slopes('mup')
    router = {k: v for k, v in s.items() if k.endswith('.router')}
    rest = {k: v for k, v in s.items() if k not in router}
    assert max(map(abs, rest.values())) < 0.3, rest
    assert max(map(abs, router.values())) < 0.5, router


def test_sp_moe_coord_check_grows():
    s = moe_slopes('sp')
    assert min(s[k] for k in ('h.0.mlp', 'h.1.mlp', 'dh.0.mlp', 'dh.1.mlp', 'h.0.mlp.router')) >= 1.0, s


def test_mup_moe_coord_check_is_flat_with_the_number_of_experts_as_a_width():
    """n_expert and n_expert_active x 8 from width 64 to 512: the router hidden (its fan-out
    grows), each expert's output and the MoE's flat, the router's logits too (measured: every
    |slope| <= 0.21; the router -0.08 and -0.03)."""
    s = moe_slopes('mup', 'grow')
    assert max(map(abs, s.values())) < 0.3, s


def test_sp_moe_coord_check_grows_with_the_number_of_experts_as_a_width():
    s = moe_slopes('sp', 'grow')
    assert min(s[k] for k in ('h.0.mlp', 'dh.0.mlp', 'h.0.mlp.router', 'h.1.mlp.router')) >= 1.0, s


@pytest.mark.parametrize('experts, power, leans', [('fixed', 0.5, False), ('grow', -0.5, True)])
def test_the_papers_router_rules_differ_in_the_router_logits_only(experts, power, leans):
    """The other init of each scaling (docs/mup.md, the papers' rules): sigma/sqrt(m) with
    n_expert fixed (Jiang et al.'s gamma = 1/2) keeps the router's logits flat (measured -0.06,
    -0.06; by shape, sigma/m: -0.43, -0.09); sigma/m with n_expert growing (their gamma = 1)
    leans (-0.36, -0.26; by shape, sigma/sqrt(m): -0.08, -0.03). The MoE's output is flat under
    every rule (measured <= 0.10)."""
    s = moe_slopes('mup', experts, power)
    router = [s[f'h.{i}.mlp.router'] for i in range(2)]
    assert max(abs(s[f'h.{i}.mlp']) for i in range(2)) < 0.15, s
    if leans:
        assert min(router) < -0.25, router
    else:
        assert max(map(abs, router)) < 0.15, router


def test_mfu_counts_the_active_experts_only():
    """A token's matmuls go through n_expert_active of the n_expert routed experts."""
    flops = lambda k: make_gpt(n_expert=4, n_expert_active=k, expert_width_mult=2.0).estimate_mfu(1, 1.0, 1.0)
    routed = sum(p.numel() for block in make_gpt(n_expert=4, expert_width_mult=2.0).transformer.h
                 for p in (block.mlp.expert_fc, block.mlp.expert_proj))
    T = 32 # TINY's block_size: estimate_mfu counts one sequence of it per forward-backward
    assert flops(4) - flops(1) == pytest.approx(6 * routed * 3 / 4 * T)
