"""
muP, proven by measurement (docs/mup.md invariants 3, 4 and 6), on CPU in seconds.

Every check runs SP too and asserts that SP fails it: a check SP passes proves nothing.
The measurement is coord_check.py's (the same code that draws assets/coord_check.png):
GPTs of several widths, AdamW steps with lr * lr_scale per param group as train.py sets them,
mean|h| of every module's output (each Linear, Embedding, LayerNorm, activation, block output
and the logits) from forward hooks.

Settings, measured over seeds 0-4 (docs/mup-study.md, "Does μP hold here?"):
- widths 128..1024 (3 doublings) around a base width of 64. The base width itself sits off the
  line by finite-width effects of order 1/sqrt(width) (mean|h_1 - h_0| of the MLP is 30-45%
  larger at 64 than at 128..1024, where it is flat), which would tilt the fitted slopes.
- lr 3e-3: large enough that SP's coordinates blow up within 4 steps (slopes >= 2), small
  enough that the base family is not in the oscillating regime where mean|h| at t=4 scatters
  by a factor 2 between neighbouring widths (as it does at 1e-2).
- The seed is a parameter of every helper, so the spread over seeds can be measured.
"""

import functools
import math

import pytest
import torch

from conftest import best_log2_lr
from coord_check import build_model, random_batch, run_widths, slope, slopes
from model import GPT, GPTConfig, MuPFlexAttention

WIDTHS = [128, 256, 512, 1024]
BASE_WIDTH = 64
LR = 3e-3
STEPS = 4


@functools.cache
def coord_check(param, heads, seed=0):
    """run_widths' results after STEPS Adam steps, measured once for the tests that read them."""
    return run_widths(WIDTHS, param, heads=heads, steps=STEPS, lr=LR, seed=seed, base_width=BASE_WIDTH)


def coord_slopes(param, heads, seed=0, steps=STEPS, stat='h'):
    """{module: slope of log2 stat vs log2 width} after `steps` Adam steps (stat 'h': mean|h|;
    'dh': mean|h_t - h_0|, the change since init)."""
    return slopes(coord_check(param, heads, seed), step=steps, stat=stat)

# ---- invariant 3: coord check after updates

@pytest.mark.parametrize('heads', ['fixed', 'grow'])
def test_mup_coord_check_is_flat(heads):
    s = coord_slopes('mup', heads)
    assert max(abs(v) for v in s.values()) <= 0.25, s

@pytest.mark.parametrize('heads', ['fixed', 'grow'])
def test_sp_coord_check_blows_up(heads):
    s = coord_slopes('sp', heads)
    assert max(abs(v) for v in s.values()) >= 1.0, s

# ---- invariant 4: maximal update. mean|h_1 - h_0| after one step, for every block output and
# the logits: width-independent under muP, growing under SP (hidden updates scale with fan-in).

@pytest.mark.parametrize('heads', ['fixed', 'grow'])
def test_mup_first_update_is_width_independent(heads):
    s = coord_slopes('mup', heads, steps=1, stat='dh')
    assert max(abs(v) for v in s.values()) <= 0.25, s

@pytest.mark.parametrize('heads', ['fixed', 'grow'])
def test_sp_first_update_grows_with_width(heads):
    s = coord_slopes('sp', heads, steps=1, stat='dh')
    # every block output's and the logits' change grows, at least like sqrt(width); the embeddings'
    # does not under SP either (their lr is eta in both)
    branches = {name: v for name, v in s.items() if name.split('.')[-1] in ('attn', 'mlp', 'logits')}
    assert len(branches) == 5 and min(branches.values()) >= 0.5, branches

# ---- invariant 6: learning-rate transfer, on a small fixed task: fit one 8x32 batch of random
# tokens with 10 constant-lr Adam steps; the best lr is the one with the lowest loss after them.
# Widths 32..256 (8x) with muP's base at 32; lr on a x2 grid.

LR_WIDTHS = [32, 64, 128, 256]
LOG2_LRS = list(range(-11, -2)) # 2^-11 .. 2^-3


def best_log2_lrs(param, seed=0):
    """Best log2(lr) per width in LR_WIDTHS."""
    return [best_log2_lr(dict(width=w, param=param, base_width=LR_WIDTHS[0]), LOG2_LRS, seed) for w in LR_WIDTHS]

def test_mup_best_lr_transfers_across_width():
    best = best_log2_lrs('mup')
    assert max(best) - min(best) <= 1, best  # at most one x2 step over 8x width

def test_sp_best_lr_shrinks_with_width():
    best = best_log2_lrs('sp')
    assert best[0] - best[-1] >= 2, best  # measured: 3 to 5 steps smaller at 8x width

# ---- invariant 7: the 1/d attention law, behaviourally. The coordinate check above cannot see the
# logit scale (attention is still nearly uniform after 4 steps). Here a 1-layer GPT memorises one
# 16x16 batch of a task that needs sharp attention (the target is the token 3 positions back) in 20
# Adam steps at lr 3e-2, which aligns q and k, so that q.k grows like d_head. The statistic is the
# logit of the key that holds the answer minus the mean logit of its row: how sharp attention has
# become. Slope against width 128..1024 (n_head fixed, so d_head grows), measured over seeds 0-4:
# -0.12..0.05 with muP's sqrt(d_base)/d_head, 0.30..0.53 with SP's 1/sqrt(d_head) (sqrt(d) would be 0.5).

class RecordScores(MuPFlexAttention):
    def attend(self, q, k, v, mask):
        T = q.size(2)
        score = (q * self.scale) @ k.transpose(-2, -1)
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        row_mean = score.masked_fill(~causal, 0).sum(-1) / causal.sum(-1)
        answer = torch.arange(3, T)
        self.logit_gap = (score[..., answer, answer - 3] - row_mean[..., 3:]).mean().item()
        return super().attend(q, k, v, mask)


def logit_gap_slope(scale_law, seed=0, steps=20, lr=3e-2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(16, (16, 16), generator=g)
    y = torch.roll(x, 3, 1)
    y[:, :3] = -1 # no target before the copied token exists
    gaps = []
    for width in WIDTHS:
        torch.manual_seed(seed)
        config = GPTConfig(block_size=16, vocab_size=16, n_layer=1, n_head=4, n_embd=width, bias=False,
                           mup_base_width=BASE_WIDTH)
        model = GPT(config, RecordScores)
        if scale_law == '1/sqrt(d)':
            model.transformer.h[0].attn.scale = 1 / math.sqrt(config.head_dim)
        optimizer = model.configure_optimizers(0.0, lr, (0.9, 0.99), 'cpu')
        for _ in range(steps):
            model(x, y)[1].backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        model(x, y)
        gaps.append(model.transformer.h[0].attn.logit_gap)
    assert min(gaps) > 1, gaps # attention has sharpened at every width
    return slope(WIDTHS, gaps)


def test_attention_sharpness_is_flat_in_width_under_the_1_over_d_law():
    s = logit_gap_slope('mup')
    assert abs(s) <= 0.2, s


def test_attention_sharpness_grows_with_width_under_1_over_sqrt_d():
    s = logit_gap_slope('1/sqrt(d)')
    assert s >= 0.25, s


# ---- weight decay: the fraction of a hidden matrix that decay removes per step, lr * wd, is the same
# at every width (AdamW: lr / m and wd * m; Muon: both as is). With a zero loss only decay acts.

@pytest.mark.parametrize('optimizer', ['adamw', 'muon'])
def test_weight_decay_removes_the_same_fraction_of_hidden_weights_at_every_width(optimizer):
    x, y = random_batch(4, 16, 0)
    widths = [64, 128, 256, 512]
    removed = []
    for width in widths:
        model = build_model(width, 'mup', base_width=BASE_WIDTH, block_size=16)
        opt = model.configure_optimizers(0.1, 1e-2, (0.9, 0.99), 'cpu', optimizer=optimizer)
        weight = model.transformer.h[0].mlp.c_fc.weight
        before = weight.norm().item()
        for _ in range(3):
            (0.0 * model(x, y)[1]).backward() # zero gradients: Adam's and Muon's updates vanish
            opt.step()
            opt.zero_grad(set_to_none=True)
        removed.append(1 - weight.norm().item() / before)
    assert removed[0] > 1e-3 and abs(slope(widths, removed)) <= 0.01, removed
