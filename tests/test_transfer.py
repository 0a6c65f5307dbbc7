"""Tune small, train big along the batch and the length (transfer.py): each rule keeps the quantity
its source says it keeps, the critical batch bounds the lr, the base values change nothing bitwise,
and train.py applies the derived values and records them."""
import math
import re

import pytest
import torch

from conftest import TINY_TRAIN, ok, run_script
from transfer import MEASURED_EXPONENTS, Hyperparameters, exponents, transfer, wasted_batch

BATCH_LR_EXPONENT = MEASURED_EXPONENTS['adamw'][0]

TUNED = Hyperparameters(learning_rate=3e-3, min_lr=3e-4, beta1=0.9, beta2=0.99, muon_momentum=0.95,
                        weight_decay=0.1, adam_eps=1e-8)
B0, D0 = 1024, 1024 * 600 # the proxy: 16 x 64 tokens a step, 600 steps


def half_life_in_tokens(beta, batch_tokens):
    """Tokens until an EMA of decay beta per step of batch_tokens forgets half of what it held."""
    return math.log(0.5) / math.log(beta) * batch_tokens


def test_each_rule_keeps_what_its_source_says():
    """4x the batch and 2x the tokens: the lr x 2 (square root of the batch) x 2^-0.3 (the horizon),
    each EMA's half-life in tokens and AdamW's timescale as a fraction of the run held, eps / 2."""
    run = transfer(TUNED, 4 * B0, 2 * D0, B0, D0, batch_lr_exponent=0.5, length_lr_exponent=0.3)
    assert run.learning_rate == pytest.approx(TUNED.learning_rate * 2 * 2 ** -0.3, rel=1e-12)
    assert run.min_lr / run.learning_rate == pytest.approx(TUNED.min_lr / TUNED.learning_rate, rel=1e-12)
    for name in ('beta1', 'beta2', 'muon_momentum'):
        assert half_life_in_tokens(getattr(run, name), 4 * B0) == pytest.approx(
            half_life_in_tokens(getattr(TUNED, name), B0), rel=1e-9), name
    timescale_fraction = lambda hp, B, D: 1 / (hp.learning_rate * hp.weight_decay) / (D / B)
    assert timescale_fraction(run, 4 * B0, 2 * D0) == pytest.approx(timescale_fraction(TUNED, B0, D0), rel=1e-12)
    assert run.adam_eps == pytest.approx(TUNED.adam_eps / 2, rel=1e-12)


def test_each_optimizer_gets_its_measured_exponents_unless_given():
    assert exponents('adamw') == MEASURED_EXPONENTS['adamw'] and exponents('muon') == MEASURED_EXPONENTS['muon']
    assert MEASURED_EXPONENTS['adamw'] != MEASURED_EXPONENTS['muon'] # measured apart: docs/mup.md
    assert exponents('muon', 0.5) == (0.5, MEASURED_EXPONENTS['muon'][1])
    assert exponents('adamw', length_lr_exponent=0.0) == (MEASURED_EXPONENTS['adamw'][0], 0.0)


def test_the_critical_batch_stops_the_lr_and_says_the_tokens_are_wasted():
    below = transfer(TUNED, 4 * B0, D0, B0, critical_batch_tokens=4 * B0)
    above = transfer(TUNED, 16 * B0, D0, B0, critical_batch_tokens=4 * B0)
    assert above.learning_rate == below.learning_rate == pytest.approx(4 ** BATCH_LR_EXPONENT * TUNED.learning_rate)
    assert above.beta2 < below.beta2 # the half-lives still follow the batch
    assert wasted_batch(16 * B0, 4 * B0) and not wasted_batch(4 * B0, 4 * B0) and not wasted_batch(16 * B0, 0)


@pytest.mark.parametrize('base', [(B0, D0), (0, 0), (B0, 0), (0, D0)])
def test_at_the_base_values_nothing_changes_bitwise(base):
    assert transfer(TUNED, B0, D0, *base, batch_lr_exponent=0.37, length_lr_exponent=0.21) == TUNED


def losses(stdout):
    return re.findall(r'^iter \d+: loss (\S+),', stdout, flags=re.M)


def test_train_py_applies_the_derived_values_and_records_them(workdir):
    """The tiny run (8 x 32 = 256 tokens a step, 20 steps): told it is its own proxy, it logs the
    same losses bitwise; told the proxy had a quarter of its batch and its tokens, it trains at
    the derived lr and betas (its optimizer's groups and the checkpoint say so)."""
    args = [*TINY_TRAIN, '--max_iters=20', '--eval_interval=20', '--mup_base_width=16', '--n_embd=32']
    plain = ok(run_script('train.py', *args, f'--out_dir={workdir / "transfer-plain"}', cwd=workdir))
    own = ok(run_script('train.py', *args, '--base_batch_tokens=256', f'--base_train_tokens={256 * 20}',
                        f'--out_dir={workdir / "transfer-own"}', cwd=workdir))
    assert losses(own) == losses(plain) and len(losses(plain)) == 21
    out_dir = workdir / 'transfer-quarter'
    quarter = ok(run_script('train.py', *args, '--base_batch_tokens=64', f'--base_train_tokens={64 * 20}',
                            '--length_lr_exponent=0.5', f'--out_dir={out_dir}', cwd=workdir))
    assert ('carried from the proxy (64 tokens a step, 1,280 in all) to this run (256, 5,120; lr exponents '
            f'{BATCH_LR_EXPONENT:g} for the batch, 0.5 for the length)') in quarter # AdamW's measured one, the one given
    saved = torch.load(out_dir / 'ckpt.pt', weights_only=False)
    derived = saved['transferred']
    assert derived['learning_rate'] == pytest.approx(3e-3 * 4 ** BATCH_LR_EXPONENT * 4 ** -0.5) # TINY_TRAIN's lr 3e-3
    assert derived['beta2'] == pytest.approx(0.99 ** 4) and saved['config']['beta2'] == 0.99
    for group in saved['optimizer']['param_groups']:
        assert group['betas'] == pytest.approx((0.9 ** 4, 0.99 ** 4))
        assert group['eps'] == pytest.approx(1e-8 / 2)
    assert losses(quarter) != losses(plain)
