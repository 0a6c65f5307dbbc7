"""muP's output weights (docs/mup.md, per-parameter rules): a weight whose fan-in grows with width
and whose fan-out does not (a headwise attention gate, a MoE router, a down-projection to a fixed
latent size) gets init std sigma/m and Adam lr eta/m, found from its shape and the module that
owns it; a weight whose fan-out alone grows stays an input weight (sigma, eta); the readout keeps
its 1/m in the forward and nothing more.

The behavioural check is the headwise gate of gated_attention.py on real text (ten sonnets at the
character level): 6 AdamW steps at lr 2^-6 with init std 0.08 (the CPU recipe's base-width
values), widths 64..512 around a base of 64, 1 layer. The statistic is mean|x W_g| of the gate's
pre-activation, and its change since init, after the last step; slopes against log2 width,
measured over seeds 0-2: muP -0.08..0.07 (change -0.02..0.17), SP 0.68..0.75, and the gate treated
as an input weight (this project's bug before) 1.05..1.21: at width 512 its sigmoids saturate."""
import pytest
import torch
import torch.nn as nn

from conftest import make_gpt, text_batch, tokens
from coord_check import run_widths, slopes
from gated_attention import HeadwiseGate
from model import MuPFlexAttention

WIDTHS = [64, 128, 256, 512]


def gate_slopes(param, seed=0):
    """{'h', 'dh'}: slopes vs width of the gate pre-activation's mean|h| and mean|h_t - h_0| after 6 steps."""
    results = run_widths(WIDTHS, param, steps=6, lr=2 ** -6, seed=seed, batch=text_batch(16, 64, seed), n_layer=1,
                         attn_cls=HeadwiseGate, model_args=dict(init_std=0.08))
    return {stat: slopes(results, 6, stat)['h.0.attn.gate'] for stat in ('h', 'dh')}


def test_mup_gate_preactivation_and_its_change_are_flat_in_width():
    s = gate_slopes('mup')
    assert abs(s['h']) < 0.3 and abs(s['dh']) < 0.3, s


def test_sp_gate_preactivation_grows_with_width():
    s = gate_slopes('sp')
    assert s['h'] >= 0.5 and s['dh'] >= 0.5, s


class RouterAndExpansion(MuPFlexAttention):
    """Two layers a researcher adds, with the same kind of shape and opposite roles: a router
    Linear(n_embd, k), whose fan-in grows ('output'), and a Linear(k, n_embd) from k features
    back to the residual width, whose fan-out grows ('embedding', an input weight). And a raw
    (n_embd, k) parameter used as x @ W, which says its fan-in dim itself."""
    def __init__(self, config):
        super().__init__(config)
        self.router = nn.Linear(config.n_embd, 8, bias=False)
        self.expand = nn.Linear(8, config.n_embd, bias=False)
        self.x_at_w = nn.Parameter(torch.randn(config.n_embd, 8) * config.init_std)
        self.x_at_w.fan_in_dim = 0 # used as x @ W: dim 0 is summed over

    def forward(self, x, mask, rope=None, kv_cache=None):
        y = super().forward(x, mask, rope, kv_cache)
        return y + self.expand(torch.softmax(self.router(x), -1) + x @ self.x_at_w)


@pytest.mark.parametrize('width', [64, 256])
def test_router_and_fan_out_only_linear_are_classified_apart(width):
    m = width / 64
    gpt = make_gpt(attn_cls=RouterAndExpansion, n_embd=width, mup_base_width=64)
    info = gpt.mup_param_info
    attn = gpt.transformer.h[0].attn
    assert info['transformer.h.0.attn.router.weight'] == ('output', m, True)
    assert info['transformer.h.0.attn.x_at_w'] == ('output', m, True)
    assert info['transformer.h.0.attn.expand.weight'] == ('embedding', 1.0, True)
    # init: output weights sigma / m, input weights sigma
    assert attn.router.weight.std().item() * m == pytest.approx(0.02, rel=0.1)
    assert attn.x_at_w.std().item() * m == pytest.approx(0.02, rel=0.1)
    assert attn.expand.weight.std().item() == pytest.approx(0.02, rel=0.1)
    # AdamW: output weights lr / m and weight decay * m; input weights as is
    groups = gpt.configure_optimizers(0.1, 1e-3, (0.9, 0.99), 'cpu').param_groups
    group_of = {id(p): g for g in groups for p in g['params']}
    for p in (attn.router.weight, attn.x_at_w):
        assert group_of[id(p)]['name'] == 'output'
        assert group_of[id(p)]['lr_scale'] == pytest.approx(1 / m)
        assert group_of[id(p)]['weight_decay'] == pytest.approx(0.1 * m)
    assert group_of[id(attn.expand.weight)]['lr_scale'] == 1.0
    assert group_of[id(attn.expand.weight)]['weight_decay'] == 0.1
    # Muon steps hidden matrices only: output weights stay on AdamW with the rule above
    muon_groups = gpt.configure_optimizers(0.1, 1e-3, (0.9, 0.99), 'cpu', optimizer='muon').param_groups
    on_muon = {id(p) for g in muon_groups if g['optimizer'] == 'muon' for p in g['params']}
    assert id(attn.router.weight) not in on_muon and id(attn.c_proj.weight) in on_muon
    x = tokens(B=2, T=16)
    gpt(x, x)[1].backward()
    assert all(p.grad.abs().sum() > 0 for p in (attn.router.weight, attn.expand.weight, attn.x_at_w))


@pytest.mark.parametrize('param, bound', [('mup', 0.25), ('sp', None)])
def test_untied_readout_is_scaled_once(param, bound):
    """The untied readout carries output_mult / m in its forward (Readout) and keeps the base
    width's lr: the logits and their change stay flat in width under muP. Were its weight also
    an 'output' weight (lr / m on top of the forward's 1/m), their change would shrink like 1/m."""
    results = run_widths([128, 256, 512, 1024], param, steps=4, lr=3e-3, seed=0, model_args=dict(tie_weights=False))
    s = {stat: slopes(results, 4, stat)['logits'] for stat in ('h', 'dh')}
    worst = max(abs(v) for v in s.values())
    assert worst <= bound if bound else worst >= 0.5, s


def test_untied_readout_keeps_the_base_lr_and_is_read_out_with_one_over_m():
    gpt = make_gpt(tie_weights=False, n_embd=256, mup_base_width=64, mup_output_mult=2.0)
    assert gpt.mup_param_info['lm_head.weight'] == ('readout', 4.0, False) # its fan-in grew 4x
    groups = gpt.configure_optimizers(0.1, 1e-3, (0.9, 0.99), 'cpu').param_groups
    assert {g['name']: g['lr_scale'] for g in groups}['readout'] == 1.0
    with torch.no_grad():
        gpt.lm_head.weight.normal_()
        x = torch.randn(2, 3, 256)
        assert torch.equal(gpt.lm_head(x), (x @ gpt.lm_head.weight.T) * (2.0 / 4.0))


def test_an_output_weight_in_a_block_takes_the_depth_rules_of_a_hidden_matrix():
    """CompleteP (docs/mup.md, depth): inside a residual branch the lr is x m_L^(alpha - 1) and
    Adam's eps / (m_N m_L^alpha), for output weights as for hidden ones."""
    gpt = make_gpt(attn_cls=HeadwiseGate, n_embd=256, mup_base_width=64, n_layer=2, mup_base_depth=1,
                   mup_depth_alpha=0.5)
    m, m_L = 4.0, 2.0
    groups = gpt.configure_optimizers(0.1, 1e-3, (0.9, 0.99), 'cpu', eps=1e-8).param_groups
    group_of = {id(p): g for g in groups for p in g['params']}
    for p, expected_lr in ((gpt.transformer.h[0].attn.gate.weight, 1 / m), (gpt.transformer.h[0].mlp.c_fc.weight, 1 / m)):
        group = group_of[id(p)]
        assert group['lr_scale'] == pytest.approx(expected_lr * m_L ** -0.5)
        assert group['eps'] == pytest.approx(1e-8 / (m * m_L ** 0.5))
        assert group['weight_decay'] == pytest.approx(0.1 * m)
