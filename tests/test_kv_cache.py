"""KV-cache decoding (GPT.generate(kv_cache=True)): at every step, for every catalog mod, a
per-layer list, two subclasses, SP and muP, and each backend, the logits of the newest token are
those of a full forward over the sequence so far; past block_size, those of a full forward over
the documented window; masks under which an earlier query sees a later key recompute instead of
going stale; a mask whose data does not reach the generated tokens fails with a reason."""

import pytest
import torch

from conftest import tiny_config, tokens
from model import GPT, MuPFlexAttention

VOCAB, PROMPT = 11, 5


class RelativeBias(MuPFlexAttention):
    """A learned bias per (distance bucket, head): a score_mod that reads q_idx - kv_idx."""
    num_buckets = 8

    def __init__(self, config):
        super().__init__(config)
        self.rel_bias = torch.nn.Parameter(torch.randn(self.num_buckets, config.n_head))

    def score_mod(self, score, b, h, q_idx, kv_idx):
        bucket = (q_idx - kv_idx).clamp(0, self.num_buckets - 1)
        return score + self.rel_bias[bucket, h]


class Dilated(MuPFlexAttention):
    """Causal attention to every other position: a mask_mod of the distance's parity."""

    def mask_mod(self, b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & ((q_idx - kv_idx) % 2 == 0)


# name -> (attn_mod, attention class): the catalog, a per-layer list and two subclasses
MODS = {
    'causal': ('causal', MuPFlexAttention),
    'sliding_window': ('sliding_window:3', MuPFlexAttention),
    'prefix_lm': ('prefix_lm:5', MuPFlexAttention), # the prompt covers the prefix
    'alibi': ('alibi', MuPFlexAttention),
    'alibi:learned': ('alibi:learned', MuPFlexAttention),
    'soft_cap': ('soft_cap:0.5', MuPFlexAttention),
    'per_layer': ('sliding_window:3,causal', MuPFlexAttention),
    'relative_bias': ('causal', RelativeBias),
    'dilated': ('causal', Dilated),
}


def build(attn_mod='causal', attn_cls=MuPFlexAttention, backend='dense', param='sp', seed=0, **kw):
    """A tiny eval-mode GPT with weights large enough that attention is far from uniform, so a
    query that sees the wrong keys, or scores at the wrong positions, changes the logits."""
    mup = dict(n_embd=64, mup_base_width=16, mup_output_mult=4.0) if param == 'mup' else {}
    config = tiny_config(**{**dict(block_size=32, vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=16,
                                   init_std=0.3, attn_mod=attn_mod, attn_backend=backend), **mup, **kw})
    torch.manual_seed(seed)
    gpt = GPT(config, attn_cls).eval()
    if attn_mod.startswith('alibi:learned'):
        with torch.no_grad(): # move the slopes off their init, so a mod using the init would fail
            for block in gpt.transformer.h:
                block.attn.alibi_slopes.mul_(torch.tensor([3.0, 0.5]))
    return gpt


def decode_logits(gpt, prompt, steps, **kw):
    """The tokens greedy cached decoding appends, and the logits it picked each one from."""
    step_logits = []
    hook = gpt.register_forward_hook(lambda module, args, out: step_logits.append(out[0][:, -1]))
    out = gpt.generate(prompt, max_new_tokens=steps, temperature=0, **kw)
    hook.remove()
    return out, step_logits


def assert_each_step_is_a_full_forward(gpt, out, step_logits, window_start=lambda length: 0):
    """Step s picked token PROMPT + s from the logits of a full forward over the sequence so far
    (from window_start(length) on): equal within float error, and the greedy choice."""
    with torch.no_grad():
        for step, logits in enumerate(step_logits):
            length = PROMPT + step
            reference = gpt(out[:, window_start(length):length])[0][:, -1]
            torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)
            assert torch.equal(out[:, length], logits.argmax(-1))


@pytest.mark.parametrize('param', ['sp', 'mup'])
@pytest.mark.parametrize('backend', ['dense', 'flex'])
@pytest.mark.parametrize('name', list(MODS))
def test_cached_decoding_equals_a_full_forward_at_every_step(name, backend, param):
    attn_mod, attn_cls = MODS[name]
    gpt = build(attn_mod, attn_cls, backend, param)
    prompt = tokens(2, PROMPT, vocab_size=VOCAB)
    out, step_logits = decode_logits(gpt, prompt, 32 - PROMPT) # up to block_size
    assert out.shape == (2, 32) and len(step_logits) == 32 - PROMPT
    assert_each_step_is_a_full_forward(gpt, out, step_logits)
    assert torch.equal(out, gpt.generate(prompt, 32 - PROMPT, temperature=0, kv_cache=False))


@pytest.mark.parametrize('param', ['sp', 'mup'])
def test_cached_decoding_on_sdpa_puts_the_query_at_its_position(param):
    """SDPA's is_causal aligns a single query with the first key: decoding must not use it."""
    gpt = build('causal', backend='sdpa', param=param)
    out, step_logits = decode_logits(gpt, tokens(3, PROMPT, vocab_size=VOCAB), 32 - PROMPT)
    assert_each_step_is_a_full_forward(gpt, out, step_logits)


def test_the_readout_multiplier_applies_to_cached_logits():
    """muP's output_mult / m: a sampled continuation at a huge multiplier is the greedy one."""
    gpt = build(param='mup', mup_output_mult=1e4)
    prompt = tokens(2, PROMPT, vocab_size=VOCAB)
    torch.manual_seed(0)
    sampled = gpt.generate(prompt, max_new_tokens=20)
    assert torch.equal(sampled, gpt.generate(prompt, max_new_tokens=20, temperature=0, kv_cache=False))


@pytest.mark.parametrize('backend', ['dense', 'flex'])
def test_prefix_lm_inside_its_prefix_recomputes_instead_of_using_a_stale_cache(backend, monkeypatch):
    """prefix_lm:12 with a 5-token prompt: the first tokens see the ones generated after them
    until the text passes the prefix. Those steps recompute; afterwards the cache is used."""
    gpt = build('prefix_lm:12', backend=backend)
    prompt = tokens(2, PROMPT, vocab_size=VOCAB)
    lengths = []
    forward = GPT.forward
    monkeypatch.setattr(GPT, 'forward', lambda self, idx, *a, **kw: lengths.append(idx.size(1))
                        or forward(self, idx, *a, **kw))
    out, step_logits = decode_logits(gpt, prompt, 20)
    monkeypatch.undo()
    assert_each_step_is_a_full_forward(gpt, out, step_logits)
    # recompute while the new key is inside the prefix (positions 5..11), then one token a step
    assert lengths == list(range(5, 13)) + [1] * 12, lengths


def test_past_block_size_the_newest_half_is_prefilled_anew():
    """block_size 16, 40 new tokens: when the cache holds 16 positions, the newest 8 tokens are
    prefilled at positions 0..7 and decoding goes on; every step is a full forward over its window."""
    gpt = build('alibi', block_size=16)
    prompt = tokens(2, PROMPT, vocab_size=VOCAB)
    out, step_logits = decode_logits(gpt, prompt, 40)
    assert out.shape == (2, PROMPT + 40)

    starts = [0]
    def window_start(length): # the documented rule, written out: the window may not pass 16
        if length - starts[-1] > 16:
            starts.append(length - 8)
        return starts[-1]
    assert_each_step_is_a_full_forward(gpt, out, step_logits, window_start)
    assert starts == [0, 9, 18, 27, 36] # every 9 tokens: 8 prefilled, then 8 more fill the cache


def test_a_mask_whose_data_ends_at_the_prompt_fails_with_a_reason():
    ids = torch.zeros(2, PROMPT, dtype=torch.long) # document ids for the prompt only

    class Packed(MuPFlexAttention):
        def mask_mod(self, b, h, q_idx, kv_idx):
            return (ids[b, q_idx] == ids[b, kv_idx]) & (q_idx >= kv_idx)

    gpt = build(attn_cls=Packed)
    with pytest.raises(ValueError, match="Packed.mask_mod cannot be evaluated at position 5"):
        gpt.generate(tokens(2, PROMPT, vocab_size=VOCAB), max_new_tokens=3)


def test_generate_leaves_no_state_on_the_modules():
    gpt = build('sliding_window:3')
    before = {name: set(vars(module)) for name, module in gpt.named_modules()}
    buffers = {name for name, _ in gpt.named_buffers()}
    gpt.generate(tokens(2, PROMPT, vocab_size=VOCAB), max_new_tokens=5)
    assert {name: set(vars(module)) for name, module in gpt.named_modules()} == before
    assert {name for name, _ in gpt.named_buffers()} == buffers
