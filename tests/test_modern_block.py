"""The modern block (docs/mup.md, modern blocks): RoPE, RMSNorm with or without gains, QK-norm,
ReLU^2 and SwiGLU MLPs, grouped-query attention, an untied readout, each one setting and any
combination. Every backend computes the same function; the one classifier gives each new
parameter its muP class; the coordinate check (every module, real text) is flat under muP and
grows under SP; the KV cache stores n_kv_head heads, decodes every option exactly, and with RoPE
slides past block_size."""
import math

import pytest
import torch

from conftest import BLOCK_OPTIONS, block_options, make_gpt, text_batch, tokens
from coord_check import run_widths, slopes, worst
from generate import KVCache, cache_slides
from model import GPT, GPTConfig, MuPFlexAttention, rotary, rotate

# ---- every backend computes the same function, for every option

@pytest.mark.parametrize('name', list(BLOCK_OPTIONS))
def test_every_backend_computes_each_option_alike(name):
    x, y = tokens(), tokens(seed=2)
    outputs = {}
    for backend in ('sdpa', 'dense', 'flex'):
        gpt = make_gpt(seed=1, attn_backend=backend, **block_options(name))
        with torch.no_grad(): # an untied readout starts at zero: give the logits something to show
            gpt.lm_head.weight.normal_(std=0.02, generator=torch.Generator().manual_seed(0))
        if backend == 'flex': # flex has no backward on CPU: its forward is the reference
            with torch.no_grad():
                logits, loss = gpt(x, y)
        else:
            logits, loss = gpt(x, y)
            loss.backward()
        grads = {n: p.grad.clone() for n, p in gpt.named_parameters() if p.grad is not None}
        outputs[backend] = (logits.detach(), grads)
    for backend in ('dense', 'flex'):
        torch.testing.assert_close(outputs[backend][0], outputs['sdpa'][0], rtol=0, atol=1e-5)
    for n, grad in outputs['sdpa'][1].items():
        torch.testing.assert_close(outputs['dense'][1][n], grad, rtol=0, atol=1e-5)


def test_swiglu_keeps_the_parameters_of_the_gelu_mlp():
    gelu, swiglu = make_gpt(n_embd=96, n_head=4), make_gpt(n_embd=96, n_head=4, mlp='swiglu')
    count = lambda gpt: sum(p.numel() for n, p in gpt.named_parameters() if '.mlp.' in n)
    assert count(swiglu) == count(gelu) # 3 x 96 x 256 = 2 x 96 x 384


def test_rope_has_no_position_table_and_q_dot_k_depends_on_the_distance_only():
    assert 'transformer.wpe.weight' not in dict(make_gpt(pos_emb='rope').named_parameters())
    q, k = torch.randn(2, 1, 1, 1, 16, generator=torch.Generator().manual_seed(0))
    at = lambda x, pos: rotate(x, *rotary(torch.tensor([pos]), 16, 10000.0))
    score = lambda q_pos, k_pos: (at(q, q_pos) * at(k, k_pos)).sum().item()
    assert score(5, 2) == pytest.approx(score(40, 37), abs=1e-5) # both 3 apart
    assert abs(score(5, 2) - score(12, 2)) > 1e-2


# ---- muP classes of the new parameters (docs/mup.md, modern blocks)

@pytest.mark.parametrize('width', [64, 256])
def test_the_new_parameters_are_classified_as_the_rules_say(width):
    m = width / 64
    fixed = make_gpt(n_embd=width, mup_base_width=64, norm='rmsnorm', qk_norm=True, mlp='swiglu', n_kv_head=2)
    info = fixed.mup_param_info
    assert info['transformer.h.0.ln_1.weight'].kind == 'vector' # RMSNorm gain
    assert info['transformer.h.0.attn.q_norm.weight'].kind == 'vector' # QK-norm gain, head_dim long
    assert 'transformer.h.0.ln_1.bias' not in info # RMSNorm has no bias
    for matrix in ('mlp.c_gate', 'mlp.c_fc', 'mlp.c_proj', 'attn.c_attn.k', 'attn.c_attn.v'):
        assert info[f'transformer.h.0.{matrix}.weight'][:2] == ('hidden', pytest.approx(m, rel=0.01)), matrix
    # heads added at a fixed head dim, n_kv_head fixed: K and V map the width to a fixed size
    grow = make_gpt(n_embd=width, n_head=width // 16, mup_base_width=64, mup_base_head_dim=16, n_kv_head=2)
    for matrix in ('attn.c_attn.k', 'attn.c_attn.v'):
        assert grow.mup_param_info[f'transformer.h.0.{matrix}.weight'][:2] == ('output', m), matrix
    assert grow.mup_param_info['transformer.h.0.attn.c_attn.q.weight'][:2] == ('hidden', m)
    bare = make_gpt(n_embd=width, mup_base_width=64, norm='rmsnorm', norm_gain=False, qk_norm=True)
    assert not [n for n in bare.mup_param_info if 'norm' in n or 'ln_' in n] # parameter-free norms


# ---- the coordinate check, every module, real text (ten sonnets): 4 AdamW steps at lr 3e-3,
# widths 64..512 around a base of 32 (head dim 16 in the grow layout, so 2 base heads and
# n_kv_head 1 there). Worst |slope| of mean|h| at t = 4 and of the change since init, measured
# (python coord_check.py with each option, docs/mup-study.md): muP 0.04-0.22 for every option
# and layout but GQA in the grow layout; SP 2.1-3.1.

def coord_slopes(param, name, heads='fixed'):
    x, y, vocab = text_batch(16, 64, 0)
    base_heads = 4 if heads == 'fixed' else 2
    results = run_widths([64, 128, 256, 512], param, heads=heads, steps=4, lr=3e-3, seed=0, batch=(x, y, vocab),
                         base_width=32, model_args=block_options(name, base_heads))
    return {**slopes(results, 4, 'h'), **{f'd{k}': v for k, v in slopes(results, 4, 'dh').items()}}


@pytest.mark.parametrize('name, heads', [(name, 'fixed') for name in BLOCK_OPTIONS if name not in ('no_gains', 'moe')]
                         + [('all', 'grow')]) # the mixture of experts' router: tests/test_moe.py
def test_mup_coord_check_is_flat_for_every_option(name, heads):
    s = coord_slopes('mup', name, heads)
    assert abs(worst(s)[1]) < 0.3, worst(s)


@pytest.mark.parametrize('heads', ['fixed', 'grow'])
def test_sp_coord_check_grows_with_the_full_combination(heads):
    s = coord_slopes('sp', 'all', heads)
    assert worst(s)[1] >= 1.0, worst(s)


def test_gqa_with_heads_added_keeps_k_and_v_output_weights_and_their_outputs_bounded():
    """Heads added at a fixed head dim with n_kv_head fixed: K and V are output weights (init
    sigma/m, lr eta/m), whose outputs vanish at init like 1/sqrt(m) by design (as the logits do)
    and are built by the updates. After 4 steps the attention outputs still lean (measured: worst
    slope -0.40, h.1.attn; with K and V as input weights +0.82, as hidden weights -0.13: see
    docs/mup-study.md); the rest of the model is flat."""
    s = coord_slopes('mup', 'gqa', 'grow')
    attention = {k: v for k, v in s.items() if k.endswith(('.attn', '.attn.c_proj'))}
    rest = {k: v for k, v in s.items() if k not in attention}
    assert abs(worst(rest)[1]) < 0.3 and abs(worst(attention)[1]) < 0.5, (worst(rest), worst(attention))


# ---- decoding: the cache holds n_kv_head heads, every option decodes exactly, RoPE slides

VOCAB, PROMPT = 11, 5


def decoder(seed=0, attn_cls=None, **kw):
    """A tiny eval-mode GPT with weights large enough that attention is far from uniform."""
    config = dict(block_size=32, vocab_size=VOCAB, n_layer=2, n_head=4, n_embd=32, init_std=0.3, attn_backend='dense')
    torch.manual_seed(seed)
    gpt = GPT(GPTConfig(**{**config, **kw}), attn_cls).eval()
    if not gpt.config.tie_weights:
        with torch.no_grad():
            gpt.lm_head.weight.normal_(std=0.3)
    return gpt


def step_logits(gpt, prompt, steps):
    """The tokens cached decoding samples (greedy decoding of a random model soon repeats one
    token, which would hide a wrong context), and the logits of each step."""
    logits = []
    hook = gpt.register_forward_hook(lambda module, args, out: logits.append(out[0][:, -1]))
    torch.manual_seed(0)
    out = gpt.generate(prompt, max_new_tokens=steps)
    hook.remove()
    return out, logits


@pytest.mark.parametrize('backend', ['dense', 'flex'])
@pytest.mark.parametrize('name', list(BLOCK_OPTIONS))
def test_cached_decoding_equals_a_full_forward_for_every_option(name, backend):
    gpt = decoder(attn_backend=backend, attn_mod='alibi', **block_options(name))
    prompt = tokens(2, PROMPT, vocab_size=VOCAB)
    out, logits = step_logits(gpt, prompt, 32 - PROMPT)
    with torch.no_grad():
        for step, step_logit in enumerate(logits):
            reference = gpt(out[:, :PROMPT + step])[0][:, -1]
            torch.testing.assert_close(step_logit, reference, rtol=1e-5, atol=1e-5)


def test_the_cache_stores_n_kv_head_heads():
    for n_kv_head, heads in ((0, 4), (2, 2), (1, 1)):
        gpt = decoder(n_kv_head=n_kv_head)
        cache = KVCache(gpt.config.n_layer, gpt.config.block_size)
        with torch.no_grad():
            gpt(tokens(2, PROMPT, vocab_size=VOCAB), kv_cache=cache)
        assert cache.k.shape == (2, 2, heads, 32, 8) and cache.v.shape == cache.k.shape


class Windowed(MuPFlexAttention):
    """The same attention, limited to the last WINDOW positions: what a sliding cache of
    block_size = WINDOW computes over a longer text."""
    window = 16

    def mask_mod(self, b, h, q_idx, kv_idx):
        return super().mask_mod(b, h, q_idx, kv_idx) & (q_idx - kv_idx < self.window)


@pytest.mark.parametrize('attn_mod', ['causal', 'sliding_window:5', 'alibi', 'soft_cap:0.5'])
def test_past_block_size_a_rope_cache_slides_and_equals_a_windowed_full_forward(attn_mod):
    """block_size 16, 48 new tokens (3 x block_size): each step after the cache is full drops the
    oldest position and runs one token. Its logits are those of a full forward over the whole text
    in which each position attends to the last 16 (mask and score as configured): every key keeps
    the context it was computed with. Cropping the text to its last 16 tokens, as kv_cache=False
    does, is another function past block_size (its first tokens lose their context)."""
    gpt = decoder(block_size=16, pos_emb='rope', attn_mod=attn_mod, n_kv_head=2, qk_norm=True)
    assert cache_slides(gpt)
    prompt = tokens(2, PROMPT, vocab_size=VOCAB)
    lengths = []
    hook = gpt.register_forward_pre_hook(lambda module, args, kwargs: lengths.append(args[0].size(1)),
                                         with_kwargs=True)
    out, logits = step_logits(gpt, prompt, 48)
    hook.remove()
    assert lengths == [PROMPT] + [1] * 47 # one prefill, then one token a step: no second prefill
    reference = decoder(block_size=64, pos_emb='rope', attn_mod=attn_mod, n_kv_head=2, qk_norm=True,
                        attn_cls=Windowed)
    reference.load_state_dict(gpt.state_dict())
    with torch.no_grad():
        for step, step_logit in enumerate(logits):
            expected = reference(out[:, :PROMPT + step])[0][:, -1]
            torch.testing.assert_close(step_logit, expected, rtol=1e-4, atol=1e-4)
        cropped = gpt(out[:, -17:-1])[0][:, -1] # kv_cache=False's logits for the last token
    if attn_mod == 'sliding_window:5': # 2 layers see 8 positions back: the crop loses nothing
        torch.testing.assert_close(cropped, logits[-1], rtol=1e-4, atol=1e-4)
    else:
        assert (cropped - logits[-1]).abs().max() > 1e-2


def test_past_block_size_prefix_lm_with_rope_is_prefilled_anew():
    """prefix_lm reads absolute positions: its cache does not slide, it is prefilled again, as
    with learned positions (tests/test_kv_cache.py)."""
    gpt = decoder(block_size=16, pos_emb='rope', attn_mod='prefix_lm:3')
    assert not cache_slides(gpt)
    lengths = []
    hook = gpt.register_forward_pre_hook(lambda module, args, kwargs: lengths.append(args[0].size(1)),
                                         with_kwargs=True)
    gpt.generate(tokens(2, PROMPT, vocab_size=VOCAB), max_new_tokens=20, temperature=0)
    hook.remove()
    assert 8 in lengths # the newest half of the window, prefilled at positions 0..7


def test_a_subclass_says_its_mods_are_relative_to_let_the_cache_slide():
    class Relative(MuPFlexAttention):
        relative_mods = True
        def score_mod(self, score, b, h, q_idx, kv_idx):
            return score - 0.1 * (q_idx - kv_idx)

    class Absolute(Relative):
        relative_mods = False

    assert cache_slides(decoder(pos_emb='rope', attn_cls=Relative))
    assert not cache_slides(decoder(pos_emb='rope', attn_cls=Absolute))
    assert not cache_slides(decoder(attn_cls=Relative)) # learned positions never slide
    assert math.isfinite(decoder(pos_emb='rope', attn_cls=Relative)(tokens(1, 4, vocab_size=VOCAB))[0].sum().item())
