"""The attention mods catalog (model.py) and the subclassing contract of MuPFlexAttention:
every mod means the same on the dense and flex backends, has correct gradients, changes the
output, reaches every layer from the config string, survives generation; masks are built once
per shape; the muP logit scale reaches score_mod exactly once; subclass parameters are
classified by shape (MUP.md) and train."""
import contextlib
import copy
import io
import math

import pytest
import torch

import model as model_module
from model import (GPT, GPTConfig, MuPFlexAttention, and_masks, causal, document_mask, or_masks,
                   sliding_window)

# flex's eager CPU path (a reference implementation) is what these tests compare against
pytestmark = pytest.mark.filterwarnings('ignore:flex_attention called without torch.compile')

B, T, N_HEAD, HEAD_DIM = 2, 12, 2, 8
DOC_IDS = torch.tensor([[0] * 5 + [1] * 4 + [2] * 3, [0] * 2 + [1] * 10]) # (B, T): packed documents


def with_mods(mask_mod, score_mod=None):
    """A MuPFlexAttention subclass overriding mask_mod (and score_mod, if given) with catalog mods."""
    attrs = dict(mask_mod=lambda self, b, h, q_idx, kv_idx: mask_mod(b, h, q_idx, kv_idx))
    if score_mod is not None:
        attrs['score_mod'] = lambda self, score, b, h, q_idx, kv_idx: score_mod(score, b, h, q_idx, kv_idx)
    return type('WithMods', (MuPFlexAttention,), attrs)


# name -> (attn_mod config string, attention class): the catalog, each mod once, and the combinators
MODS = {
    'causal':         ('causal', MuPFlexAttention),
    'sliding_window': ('sliding_window:3', MuPFlexAttention),
    'prefix_lm':      ('prefix_lm:5', MuPFlexAttention),
    'alibi':          ('alibi', MuPFlexAttention),
    'alibi_learned':  ('alibi_learned', MuPFlexAttention),
    'soft_cap':       ('soft_cap:0.5', MuPFlexAttention),
    'document_mask':  ('causal', with_mods(document_mask(DOC_IDS))),
    'and_masks':      ('causal', with_mods(and_masks(sliding_window(4), document_mask(DOC_IDS)))),
    'or_masks':       ('causal', with_mods(or_masks(sliding_window(3), lambda b, h, q_idx, kv_idx: kv_idx == 0))),
}
NOT_CAUSAL = [name for name in MODS if name != 'causal']


def config(attn_mod='causal', **kw):
    return GPTConfig(**{**dict(block_size=16, vocab_size=11, n_layer=2, n_head=N_HEAD, n_embd=N_HEAD * HEAD_DIM,
                               bias=False, attn_mod=attn_mod), **kw})


def attention(name, backend='dense', dtype=torch.float32):
    attn_mod, cls = MODS[name]
    torch.manual_seed(0)
    attn = cls(config(attn_mod, attn_backend=backend)).to(dtype)
    if name == 'alibi_learned': # move the slopes off their init, so a mod using the init values would fail
        with torch.no_grad():
            attn.alibi_slopes.mul_(torch.tensor([3.0, 0.5], dtype=dtype))
    return attn


def qkv():
    return torch.randn(3, B, N_HEAD, T, HEAD_DIM, generator=torch.Generator().manual_seed(0)).unbind(0)


def quiet_gpt(cfg, attn_cls=MuPFlexAttention, seed=0):
    torch.manual_seed(seed)
    with contextlib.redirect_stdout(io.StringIO()): # GPT prints its parameter count
        return GPT(cfg, attn_cls)


# ---- every mod on every backend

@pytest.mark.parametrize('name', MODS)
def test_every_mod_dense_matches_flex_forward(name):
    q, k, v = qkv()
    dense = attention(name, 'dense')
    flex = attention(name, 'flex')
    with torch.no_grad(): # flex has no backward on CPU
        torch.testing.assert_close(flex.attend(q, k, v), dense.attend(q, k, v), rtol=0, atol=1e-5)


# a score_mod and a mask that differ per sequence: a block given the wrong b would compute another
MODS_BY_SEQUENCE = {'per_sequence': ('causal', with_mods(document_mask(DOC_IDS),
                                                         lambda score, b, h, q_idx, kv_idx: score + 0.3 * (b + 1) * kv_idx))}


@pytest.mark.parametrize('name', ['alibi', 'alibi_learned', 'soft_cap', 'per_sequence', 'sliding_window+soft_cap'])
def test_dense_in_blocks_equals_one_block(name, monkeypatch):
    """With a score_mod, the dense backend takes a block of queries of a few sequences at a time,
    over only the keys the mask lets them see. Forcing small blocks (4 queries, one sequence) must
    give the output and gradients of one (B, H, T, T) block, and skip the keys no query sees."""
    if name in MODS:
        attn = attention(name)
    elif name in MODS_BY_SEQUENCE:
        attn_mod, cls = MODS_BY_SEQUENCE[name]
        attn = cls(config(attn_mod, attn_backend='dense'))
    else:
        attn = MuPFlexAttention(config('soft_cap:0.5', attn_backend='dense'))
        attn._mask_fn = sliding_window(3)
    captured = [p for n, p in attn.named_parameters() if not n.startswith(('c_attn', 'c_proj'))]
    q, k, v = (t.requires_grad_() for t in qkv())
    blocks = []
    dense_block = attn._dense_block
    monkeypatch.setattr(attn, '_dense_block', lambda *a: blocks.append(a[4:7]) or dense_block(*a))

    def run():
        attn.clear_block_mask_cache()
        blocks.clear()
        out = attn.attend(q, k, v)
        return [out, *torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum(),
                                          [q, k, v, *captured])]

    monkeypatch.setattr(model_module, '_DENSE_QUERY_BLOCK', T)
    whole = run()
    assert blocks == [(range(B), range(T), range(T))]
    monkeypatch.setattr(model_module, '_DENSE_QUERY_BLOCK', 4)
    monkeypatch.setattr(model_module, '_DENSE_BLOCK_SCORES', N_HEAD * 4 * T) # one sequence per block
    in_blocks = run()
    # the first key some query of the block sees, in some sequence (DOC_IDS: query 8..11 never sees 0, 1)
    first_key = {'sliding_window+soft_cap': [0, 2, 6], 'per_sequence': [0, 0, 2]}.get(name, [0, 0, 0])
    assert blocks == [(range(b, b + 1), range(q0, q0 + 4), range(first_key[q0 // 4], q0 + 4))
                      for b in range(B) for q0 in (0, 4, 8)]
    for a, b in zip(whole, in_blocks):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('name', NOT_CAUSAL)
def test_every_mod_changes_the_output_vs_causal(name):
    q, k, v = qkv()
    with torch.no_grad():
        diff = (attention(name).attend(q, k, v) - attention('causal', 'dense').attend(q, k, v)).abs().max()
    assert diff > 1e-2, f"{name} is silently ignored: output equals plain causal attention"


@pytest.mark.parametrize('name', MODS)
def test_every_mod_passes_float64_gradcheck_on_dense(name):
    """Gradients w.r.t. the layer input and every parameter a mod captures (the learned ALiBi
    slopes), checked against finite differences."""
    attn = attention(name, 'dense', torch.float64)
    captured = {n: p for n, p in attn.named_parameters() if not n.startswith(('c_attn', 'c_proj'))}
    assert list(captured) == (['alibi_slopes'] if name == 'alibi_learned' else [])
    x = torch.randn(B, T, N_HEAD * HEAD_DIM, dtype=torch.float64, requires_grad=True)
    params = [p.detach().clone().requires_grad_() for p in captured.values()]
    f = lambda x, *params: torch.func.functional_call(attn, dict(zip(captured, params)), (x,))
    assert torch.autograd.gradcheck(f, (x, *params), fast_mode=True)


def test_combinators_are_elementwise_and_or():
    b, h = torch.arange(B).view(B, 1, 1, 1), torch.zeros(1, 1, 1, 1, dtype=torch.long)
    q_idx, kv_idx = torch.arange(T).view(1, 1, T, 1), torch.arange(T).view(1, 1, 1, T)
    window, docs, sink = sliding_window(4), document_mask(DOC_IDS), lambda b, h, q_idx, kv_idx: kv_idx == 0
    assert torch.equal(and_masks(window, docs)(b, h, q_idx, kv_idx),
                       window(b, h, q_idx, kv_idx) & docs(b, h, q_idx, kv_idx))
    assert torch.equal(or_masks(window, sink)(b, h, q_idx, kv_idx),
                       window(b, h, q_idx, kv_idx) | sink(b, h, q_idx, kv_idx))


@pytest.mark.parametrize('attn_mod, expected', [
    ('sliding_window:3', lambda q, kv: (q >= kv) & (q - kv < 3)),
    ('prefix_lm:5', lambda q, kv: (kv < 5) | (q >= kv)),
    ('alibi', lambda q, kv: q >= kv),
])
def test_attn_mod_config_string_selects_the_mask(attn_mod, expected):
    attn = MuPFlexAttention(config(attn_mod, attn_backend='dense'))
    mask = attn._dense_mask(1, T, torch.device('cpu'))
    q, kv = torch.arange(T).view(T, 1), torch.arange(T).view(1, T)
    assert torch.equal(mask[0, 0], expected(q, kv)) and torch.equal(mask[0, 0], mask[0, 1])


@pytest.mark.parametrize('attn_mod, wanted', [
    ('sliding_window:1.5', 'window length, an integer'), # used to pass the config, then fail in int()
    ('prefix_lm:0', 'prefix length, an integer'),
    ('soft_cap:inf', 'the cap, finite'),                 # used to pass, then give nan attention
    ('soft_cap:-1', 'needs a positive number'),
])
def test_bad_attn_mod_arguments_are_refused_by_the_config(attn_mod, wanted):
    with pytest.raises(ValueError, match=f"attn_mod='{attn_mod}'.*{wanted}"):
        GPTConfig(attn_mod=attn_mod)


@pytest.mark.parametrize('attn_mod, score_fn', [
    # Press et al.: slopes 2^(-8/H), 2^(-16/H), ... times the distance q - kv, subtracted
    ('alibi', lambda s, h, q, kv: s - 2.0 ** (-8.0 * (h + 1) / N_HEAD) * (q - kv)),
    ('soft_cap:0.5', lambda s, h, q, kv: 0.5 * torch.tanh(s / 0.5)),
])
def test_attn_mod_config_string_computes_the_score(attn_mod, score_fn):
    attn = MuPFlexAttention(config(attn_mod, attn_backend='dense'))
    q, k, v = qkv()
    h, q_idx, kv_idx = torch.arange(N_HEAD).view(N_HEAD, 1, 1), torch.arange(T).view(T, 1), torch.arange(T).view(1, T)
    score = score_fn((q @ k.transpose(-2, -1)) * attn.scale, h, q_idx, kv_idx)
    expected = torch.softmax(score.masked_fill(q_idx < kv_idx, float('-inf')), dim=-1) @ v
    with torch.no_grad():
        torch.testing.assert_close(attn.attend(q, k, v), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize('attn_mod', ['sliding_window:3', 'prefix_lm:5', 'alibi', 'alibi_learned', 'soft_cap:0.5'])
def test_attn_mod_config_reaches_every_layer_of_gpt(attn_mod):
    idx = torch.randint(11, (B, T), generator=torch.Generator().manual_seed(0))
    plain = quiet_gpt(config(init_std=0.5)) # a large init makes the scores large enough for soft_cap to act
    modded = quiet_gpt(config(attn_mod, init_std=0.5))
    modded.load_state_dict(plain.state_dict(), strict=False) # same weights (learned slopes keep their init)
    with torch.no_grad():
        assert (modded(idx, idx)[0] - plain(idx, idx)[0]).abs().max() > 1e-3
        for i in range(config().n_layer): # switching off the mod in one layer changes the logits: every layer uses it
            single = copy.deepcopy(modded)
            single.transformer.h[i].attn = copy.deepcopy(plain.transformer.h[i].attn)
            single.transformer.h[i].attn.block_mask_cache = {}
            assert (single(idx, idx)[0] - modded(idx, idx)[0]).abs().max() > 1e-4


def test_alibi_follows_the_module_through_copy_and_dtype_changes():
    """The mod reads the slopes the module holds now: a deep copy trains its own learned slopes,
    and .double() (which replaces buffers) is seen by fixed-slope ALiBi."""
    model = quiet_gpt(config('alibi_learned', attn_backend='dense'))
    clone = copy.deepcopy(model)
    idx = torch.randint(11, (B, T), generator=torch.Generator().manual_seed(0))
    clone(idx, idx)[1].backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(b.attn.alibi_slopes.grad.abs().sum() > 0 for b in clone.transformer.h)
    fixed = quiet_gpt(config('alibi', attn_backend='dense')).double()
    with torch.no_grad():
        for block in fixed.transformer.h:
            block.attn.alibi_slopes.zero_()
        plain = quiet_gpt(config(attn_backend='dense')).double()
        plain.load_state_dict(fixed.state_dict())
        torch.testing.assert_close(fixed(idx, idx)[0], plain(idx, idx)[0], rtol=0, atol=1e-12)


# ---- the muP scale reaches score_mod exactly once

@pytest.mark.parametrize('backend', ['dense', 'flex'])
def test_score_mod_sees_the_mup_scaled_score_once(backend):
    """score_mod squares the score it receives: a nonlinear map, so the result tells whether the
    score was q.k * scale (right), q.k (scale after the mod), q.k * scale^2 (applied twice) or
    q.k / sqrt(d) (flex's default scale instead of muP's)."""
    cfg = config(n_embd=4 * N_HEAD * HEAD_DIM, mup_base_width=N_HEAD * HEAD_DIM, attn_backend=backend) # m = 4
    attn = with_mods(causal, lambda score, b, h, q_idx, kv_idx: score * score)(cfg)
    scale = math.sqrt(HEAD_DIM) / (4 * HEAD_DIM) # muP: sqrt(d_base) / d_head
    assert attn.scale == pytest.approx(scale) and scale != pytest.approx(1 / math.sqrt(4 * HEAD_DIM))
    q, k, v = (t.repeat(1, 1, 1, 4) for t in qkv())
    score = ((q @ k.transpose(-2, -1)) * scale) ** 2
    score = score.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float('-inf'))
    expected = torch.softmax(score, dim=-1) @ v
    with torch.no_grad():
        torch.testing.assert_close(attn.attend(q, k, v), expected, rtol=0, atol=1e-5)


# ---- masks: built once per shape, shared by layers, reused across steps

def test_flex_block_mask_built_once_per_shape_for_all_layers(monkeypatch):
    calls = []
    real = model_module.create_block_mask
    monkeypatch.setattr(model_module, 'create_block_mask', lambda *a, **kw: calls.append(a[1:4]) or real(*a, **kw))
    gpt = quiet_gpt(config('sliding_window:3', n_layer=3, attn_backend='flex'))
    caches = {id(block.attn.block_mask_cache) for block in gpt.transformer.h}
    assert len(caches) == 1 # one cache for the whole model
    idx = torch.randint(11, (B, T))
    with torch.no_grad():
        for _ in range(3): # three steps of a 3-layer model
            gpt(idx)
        assert calls == [(B, N_HEAD, T)]
        gpt(idx[:, :T - 1]) # a new shape builds one more
        assert calls == [(B, N_HEAD, T), (B, N_HEAD, T - 1)]


class CountingDict(dict):
    def __init__(self):
        super().__init__()
        self.stores = []

    def __setitem__(self, key, value):
        self.stores.append(key)
        super().__setitem__(key, value)


def test_dense_mask_built_once_for_all_layers_and_training_steps():
    gpt = quiet_gpt(config('prefix_lm:5', n_layer=3, attn_backend='dense'))
    cache = CountingDict()
    for block in gpt.transformer.h: # stands in for the model's shared cache, counting what is stored
        block.attn.block_mask_cache = cache
    optimizer = torch.optim.AdamW(gpt.parameters(), lr=1e-3)
    idx = torch.randint(11, (B, T))
    for _ in range(3): # three training steps of a 3-layer model
        gpt(idx, idx)[1].backward()
        optimizer.step()
        optimizer.zero_grad()
    assert len(cache.stores) == 1 and len(cache) == 1


def test_generation_keeps_a_bounded_mask_cache():
    gpt = quiet_gpt(config('sliding_window:3', attn_backend='dense')).eval()
    gpt.generate(torch.zeros(1, 1, dtype=torch.long), max_new_tokens=15)
    assert len(gpt.transformer.h[0].attn.block_mask_cache) <= 4 # not one (1, H, t, t) mask per t


# ---- generation: generate recomputes the context, so every mask sees the true positions

@pytest.mark.parametrize('name', MODS)
def test_generate_gives_the_next_token_logits_of_a_full_forward(name):
    attn_mod, cls = MODS[name]
    gpt = quiet_gpt(config(attn_mod), cls).eval()
    step_logits = []
    gpt.register_forward_hook(lambda module, args, out: step_logits.append(out[0][:, -1]))
    prompt = torch.randint(11, (B, 5), generator=torch.Generator().manual_seed(1)) # prompt >= prefix_lm's prefix
    out = gpt.generate(prompt, max_new_tokens=T - 5, top_k=1)
    full = gpt(out, out)[0] # logits at every position
    for step, logits in enumerate(step_logits[:-1]): # the last entry is the full forward itself
        torch.testing.assert_close(logits, full[:, 5 + step - 1], rtol=0, atol=1e-5)
        assert torch.equal(out[:, 5 + step], logits.argmax(-1)) # greedy: the token generate appended


# ---- the subclassing contract

class RelativeBias(MuPFlexAttention):
    """The README's subclassing example: a learned bias per (distance bucket, head), T5-style."""
    num_buckets = 8

    def __init__(self, config):
        super().__init__(config)
        self.rel_bias = torch.nn.Parameter(torch.zeros(self.num_buckets, config.n_head))

    def score_mod(self, score, b, h, q_idx, kv_idx):
        bucket = (q_idx - kv_idx).clamp(0, self.num_buckets - 1)
        return score + self.rel_bias[bucket, h]


class GatedBias(RelativeBias):
    """Adds a hidden-shaped parameter: an (n_embd, n_embd) gate matrix, used inside score_mod
    through a per-token gate computed in forward."""

    def __init__(self, config):
        super().__init__(config)
        self.gate = torch.nn.Parameter(torch.randn(config.n_embd, config.n_embd) * config.init_std)

    def forward(self, x):
        g = torch.sigmoid(x @ self.gate) # (B, T, n_embd) -> one gate per (token, head)
        self.query_gate = g.view(*x.shape[:2], self.n_head, self.head_dim).mean(-1)
        return super().forward(x)

    def score_mod(self, score, b, h, q_idx, kv_idx):
        return super().score_mod(score, b, h, q_idx, kv_idx) * 2 * self.query_gate[b, q_idx, h]


@pytest.mark.parametrize('width', [64, 256])
def test_subclass_parameters_are_classified_by_shape(width):
    """MUP.md: a [num_buckets, n_head] table has no growing dim, so it is not 'hidden' (lr as is);
    an [n_embd, n_embd] gate grows in both dims: 'hidden', init std / sqrt(m), lr / m."""
    m = width / 64
    gpt = quiet_gpt(config(n_embd=width, n_head=4, mup_base_width=64), GatedBias)
    info = gpt.mup_param_info
    assert info['transformer.h.0.attn.rel_bias'] == ('embedding', 1.0)
    assert info['transformer.h.0.attn.gate'] == ('hidden', m)
    with contextlib.redirect_stdout(io.StringIO()):
        groups = gpt.configure_optimizers(0.1, 1e-3, (0.9, 0.99), 'cpu').param_groups
    scale = {id(p): g['lr_scale'] for g in groups for p in g['params']}
    attn = gpt.transformer.h[0].attn
    assert scale[id(attn.rel_bias)] == 1.0 and scale[id(attn.gate)] == pytest.approx(1 / m)
    assert attn.gate.std().item() * math.sqrt(m) == pytest.approx(0.02, rel=0.05)


def test_subclass_parameters_get_gradients_on_the_dense_backend():
    gpt = quiet_gpt(config(attn_backend='auto'), GatedBias) # auto on CPU with a score_mod: dense
    assert gpt.transformer.h[0].attn.resolve_backend(torch.device('cpu')) == 'dense'
    idx = torch.randint(11, (B, T))
    gpt(idx, idx)[1].backward()
    for block in gpt.transformer.h:
        assert block.attn.rel_bias.grad.abs().sum() > 0 and block.attn.gate.grad.abs().sum() > 0
