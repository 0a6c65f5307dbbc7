"""model.py: API, attention backends, and docs/mup.md invariants 1 (base-width equality),
2 (the output multiplier in every logits path) and 5 (init scaling)."""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import BLOCK_OPTIONS, TINY, block_options, make_gpt as make, tokens
from gated_attention import HeadwiseGate
from model import GPT, GPTConfig, MuPFlexAttention


# ---- API and shapes

def test_forward_shapes_and_nanogpt_semantics():
    model = make()
    idx = tokens()
    logits, loss = model(idx, tokens(seed=2))
    assert logits.shape == (3, 32, 65) and loss.ndim == 0
    assert abs(loss.item() - math.log(65)) < 0.1 # near-uniform predictions at init
    last, no_loss = model(idx)
    assert last.shape == (3, 1, 65) and no_loss is None
    torch.testing.assert_close(last[:, 0], logits[:, -1], rtol=0, atol=1e-6)


def test_generate_appends_tokens_and_crops_context():
    model = make().eval()
    out = model.generate(tokens(B=2, T=30), max_new_tokens=10, top_k=5)
    assert out.shape == (2, 40) and out.max() < 65
    # past block_size (32) the next token comes from the last 32 tokens: the forward would refuse more
    with pytest.raises(ValueError, match='block size is only 32'):
        model(out)
    greedy = model.generate(out, max_new_tokens=1, temperature=0)
    assert torch.equal(greedy[:, :40], out)
    assert torch.equal(greedy[:, 40], model(out[:, -32:])[0][:, -1].argmax(-1))
    assert not torch.equal(model(out[:, -32:])[0], model(out[:, -31:])[0]) # the crop's start matters


def test_embedding_lr_mult_raises_the_embeddings_lr_alone():
    """SP's control of Kalra & Barkeshli: wte and wpe at lr x 4, every other group as before."""
    lr_scales = lambda model: {g['name']: g['lr_scale'] for g in model.configure_optimizers(0.1, 1e-3, (0.9, 0.99),
                                                                                          'cpu').param_groups}
    plain, raised = lr_scales(make()), lr_scales(make(embedding_lr_mult=4.0))
    assert raised == {**plain, 'embedding': 4.0 * plain['embedding']}


def test_mfu_counts_the_weights_that_enter_a_matmul():
    """An untied model's wte is a lookup and its lm_head the readout's matmul: the FLOPs of a tied
    model of the same shape, whose wte is that matmul. Counting the lookup would raise its MFU."""
    tied, untied = make(), make(tie_weights=False)
    assert untied.get_num_params() == tied.get_num_params() + TINY['vocab_size'] * TINY['n_embd']
    assert untied.estimate_mfu(4, 0.1, 1e12) == tied.estimate_mfu(4, 0.1, 1e12)


def test_crop_block_size():
    model = make()
    model.crop_block_size(16)
    assert model.config.block_size == 16 and model.transformer.wpe.weight.shape[0] == 16
    logits, _ = model(tokens(T=16), tokens(T=16))
    assert logits.shape == (3, 16, 65)


def test_optimizer_groups_carry_lr_scale():
    model = make(n_embd=128, mup_base_width=32)
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu')
    by_name = {g['name']: g for g in opt.param_groups}
    assert set(by_name) == {'hidden', 'embedding', 'vector'}
    assert by_name['hidden']['lr_scale'] == 0.25 and by_name['hidden']['lr'] == pytest.approx(2.5e-4)
    assert by_name['hidden']['weight_decay'] == pytest.approx(0.4) # wd * m (mup_scale_weight_decay)
    assert by_name['embedding']['lr_scale'] == 1.0 and by_name['embedding']['weight_decay'] == 0.1
    assert by_name['vector']['weight_decay'] == 0.0
    hidden = {id(p) for p in by_name['hidden']['params']}
    for name, p in model.named_parameters():
        is_hidden = name.endswith(('q.weight', 'k.weight', 'v.weight', 'c_proj.weight', 'c_fc.weight'))
        assert (id(p) in hidden) == is_hidden, name
    unscaled = make(n_embd=128, mup_base_width=32, mup_scale_weight_decay=False)
    groups = unscaled.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu').param_groups
    assert {g['name']: g['weight_decay'] for g in groups}['hidden'] == 0.1
    # the finite-width study's exponent (mup_payoff.py --study=causes): hidden lr / m**0.5, decay * m**0.5
    sqrt_m = make(n_embd=128, mup_base_width=32, mup_hidden_lr_exponent=0.5)
    groups = sqrt_m.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu', eps=1e-12).param_groups
    hidden = {g['name']: g for g in groups}['hidden']
    assert hidden['lr_scale'] == 0.5 and hidden['weight_decay'] == pytest.approx(0.2) and hidden['eps'] == 1e-12


@pytest.mark.parametrize("kw, field", [
    (dict(n_embd=60, n_head=8), 'n_embd=60 is not divisible by n_head=8'),
    (dict(n_layer=0), 'n_layer=0 must be positive'),
    (dict(n_head=0), 'n_head=0 must be positive'), # checked before n_embd % n_head divides by it
    (dict(attn_mod='alibi', attn_backend='sdpa'), "attn_backend='sdpa' runs plain causal attention only"),
    (dict(attn_cls='nowhere.py:Attention'), "attn_cls='nowhere.py:Attention': nowhere.py not found"),
    (dict(attn_cls='math:pi'), 'pi is not a subclass of model.MuPFlexAttention'),
    (dict(attn_cls='gated_attention'), "write 'path/to/file.py:ClassName' or 'module:ClassName'"),
    (dict(mup_base_width=30), 'mup_base_width=30 is not divisible by n_head=4'),
    (dict(mup_base_width=64, mup_base_head_dim=24), 'mup_base_head_dim=24'),
    (dict(mup_base_head_dim=16), 'set mup_base_width too'),
    (dict(attn_backend='fast'), "attn_backend='fast'"),
    (dict(attn_mod='window:4'), "unknown mod 'window'"),
    (dict(attn_mod='sliding_window'), 'a window length, a positive integer'),
    (dict(attn_mod='alibi:3'), "'alibi' (fixed slopes) or 'alibi:learned'"),
])
def test_impossible_configs_name_the_field(kw, field):
    with pytest.raises(ValueError, match=field.replace('(', r'\(').replace(')', r'\)')):
        GPT(GPTConfig(**{**TINY, **kw}))


# ---- attention backends: one set of mods, three implementations

def qkv(B=2, H=4, T=24, D=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, T, D, generator=g, dtype=dtype).requires_grad_() for _ in range(3)]


def attention(backend, **kw):
    return MuPFlexAttention(GPTConfig(**{**TINY, 'attn_backend': backend, **kw}))


def attend(attn, q, k, v):
    return attn.attend(q, k, v, attn.make_mask(q.size(0), q.size(2), q.device))


def test_backends_agree_on_outputs():
    q, k, v = (t.detach() for t in qkv()) # flex on CPU is forward-only
    outs = {b: attend(attention(b), q, k, v) for b in ('sdpa', 'dense', 'flex')}
    torch.testing.assert_close(outs['dense'], outs['sdpa'], rtol=0, atol=1e-5)
    torch.testing.assert_close(outs['flex'], outs['sdpa'], rtol=0, atol=1e-5)


def test_dense_and_sdpa_agree_on_qkv_gradients():
    grads = {}
    for backend in ('sdpa', 'dense'):
        q, k, v = qkv()
        (attend(attention(backend), q, k, v) * torch.linspace(-1, 1, 16)).sum().backward()
        grads[backend] = (q.grad, k.grad, v.grad)
    for g_sdpa, g_dense in zip(grads['sdpa'], grads['dense']):
        torch.testing.assert_close(g_dense, g_sdpa, rtol=0, atol=1e-5)


def test_dense_backend_gradcheck_float64():
    attn = attention('dense', attn_mod='soft_cap:2').double()
    q, k, v = qkv(B=1, H=4, T=6, D=4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda q, k, v: attend(attn, q, k, v), (q, k, v))


def test_auto_backend_choice():
    plain, windowed = attention('auto'), attention('auto', attn_mod='sliding_window:4')
    assert plain.resolve_backend(torch.device('cpu')) == 'sdpa'
    assert windowed.resolve_backend(torch.device('cpu')) == 'dense' # flex has no CPU backward
    assert windowed.resolve_backend(torch.device('cuda')) == 'flex'

    class Windowed(MuPFlexAttention): # a subclass's own mask: known when the model is built
        def mask_mod(self, b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (q_idx - kv_idx < 4)
    with pytest.raises(ValueError, match="Windowed with attn_mod='causal' has a mask_mod or score_mod"):
        GPT(GPTConfig(**{**TINY, 'attn_backend': 'sdpa'}), Windowed)


def test_whole_model_agrees_across_backends():
    idx = tokens()
    logits = {}
    for backend in ('sdpa', 'dense', 'flex'):
        with torch.no_grad():
            logits[backend] = make(attn_backend=backend).eval()(idx, idx)[0]
    torch.testing.assert_close(logits['dense'], logits['sdpa'], rtol=0, atol=1e-5)
    torch.testing.assert_close(logits['flex'], logits['sdpa'], rtol=0, atol=1e-5)


# ---- docs/mup.md invariant 1: muP at its base width is SP, exactly

@pytest.mark.parametrize("layout", [dict(), dict(mup_base_head_dim=16)])
@pytest.mark.parametrize("attn_cls, untied", [(MuPFlexAttention, False), (HeadwiseGate, True)])
@pytest.mark.parametrize("block", ['gpt2', *BLOCK_OPTIONS])
def test_mup_equals_sp_at_base_width(layout, attn_cls, untied, block):
    """With an output weight (the headwise gate), the untied readout, and every option of the
    block: every muP class is the identity at the base width."""
    tie = dict(tie_weights=not untied)
    options = {**tie, **(block_options(block) if block != 'gpt2' else {})}
    sp = make(seed=3, attn_cls=attn_cls, **options)
    mup = make(seed=3, attn_cls=attn_cls, mup_base_width=64, **options, **layout)
    for (n1, p1), (n2, p2) in zip(sp.named_parameters(), mup.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    idx = tokens()
    (l_sp, loss_sp), (l_mup, loss_mup) = sp(idx, idx), mup(idx, idx)
    assert torch.equal(l_sp, l_mup) and torch.equal(loss_sp, loss_mup)

    def groups(model):
        opt = model.configure_optimizers(0.1, 3e-3, (0.9, 0.95), 'cpu')
        names = {id(p): n for n, p in model.named_parameters()}
        return opt, {names[id(p)]: (g['lr'], g['weight_decay'], g['lr_scale'])
                     for g in opt.param_groups for p in g['params']}
    (opt_sp, g_sp), (opt_mup, g_mup) = groups(sp), groups(mup)
    assert g_sp == g_mup
    for _ in range(3): # and they stay equal through training
        for model, opt in ((sp, opt_sp), (mup, opt_mup)):
            opt.zero_grad()
            model(idx, idx)[1].backward()
            opt.step()
    for p1, p2 in zip(sp.parameters(), mup.parameters()):
        assert torch.equal(p1, p2)


# ---- docs/mup.md invariant 2: the readout multiplier in every logits path

def test_output_multiplier_in_forward_with_and_without_targets():
    model = make(n_embd=256, mup_base_width=64, mup_output_mult=3.0).eval()
    hidden = {}
    model.transformer.ln_f.register_forward_hook(lambda m, i, o: hidden.__setitem__('x', o))
    idx = tokens()
    logits, _ = model(idx, idx)
    expected = F.linear(hidden['x'], model.lm_head.weight) * 3.0 / 4.0 # output_mult / m, m = 256 / 64
    # float32 rounding measured up to 1.4e-6 on logits of ~2.5 (4 ulp); a wrong multiplier is off by >= 25%
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-6)
    last, _ = model(idx)
    torch.testing.assert_close(last, expected[:, [-1]], rtol=1e-5, atol=1e-6)


def test_generate_uses_the_output_multiplier():
    # A huge output multiplier makes the sampling distribution one-hot, so sampling must equal
    # greedy decoding; a generate() that skipped the multiplier would sample from the
    # near-uniform init distribution instead.
    model = make(n_embd=128, mup_base_width=64, mup_output_mult=1e4).eval()
    idx = tokens(B=2, T=8)
    torch.manual_seed(0)
    sampled = model.generate(idx, max_new_tokens=12)
    greedy = idx
    with torch.no_grad():
        for _ in range(12):
            greedy = torch.cat([greedy, model(greedy)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(sampled, greedy)


# ---- docs/mup.md invariant 5: init scaling

def test_init_std_scales_as_mup_says():
    L, sigma = TINY['n_layer'], 0.02
    for width in (64, 128, 256, 512):
        model = make(n_embd=width, n_head=4, mup_base_width=64)
        m = width / 64
        for name, p in model.named_parameters():
            std = p.std().item()
            if name.endswith(('q.weight', 'k.weight', 'v.weight', 'c_fc.weight')):
                assert std * math.sqrt(m) == pytest.approx(sigma, rel=0.05), name
            elif name.endswith('c_proj.weight'):
                assert std * math.sqrt(m) == pytest.approx(sigma / math.sqrt(2 * L), rel=0.05), name
            elif name.endswith(('wte.weight', 'wpe.weight')):
                assert std == pytest.approx(sigma, rel=0.05), name # constant in width


def test_untied_readout_starts_at_zero():
    model = make(tie_weights=False, n_embd=128, mup_base_width=64)
    assert model.lm_head.weight.abs().max() == 0
    assert model.mup_param_info['lm_head.weight'].kind == 'readout'
