"""
A GPT language model with one switch between the standard parameterization (SP) and the
Maximal Update Parameterization (muP), and attention written in FlexAttention's idiom.

- `mup_base_width = 0` is plain nanoGPT (SP). `mup_base_width > 0` is muP relative to a model of
  that width: every rule lives in `GPT.mup_param_info` (which parameter is what) and in the
  three forward multipliers (input, attention logits, readout), each commented with its rule.
  The rules are those of "Tensor Programs V" (Yang et al. 2022), Table 8, as microsoft/mup's
  MuReadout + MuAdamW implement them; the repo's MUP.md spells them out.
- Attention patterns are a `score_mod(score, b, h, q_idx, kv_idx)` and a
  `mask_mod(b, h, q_idx, kv_idx)`, as in torch.nn.attention.flex_attention. Subclass
  `MuPFlexAttention` and override them; muP stays correct without further work.

References: karpathy/nanoGPT (layout), microsoft/mup (MuReadout, set_base_shapes),
meta-pytorch/attention-gym (mods catalog).
"""

import inspect
import math
import time
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

# -----------------------------------------------------------------------------
# Attention mods: small pure functions in FlexAttention's signature.
# score mods: (score, b, h, q_idx, kv_idx) -> score;  mask mods: (b, h, q_idx, kv_idx) -> bool
# They see tensors, so they must be written with tensor ops only (no Python `if` on values,
# no .item(), no dict look-ups): flex traces them and the dense backend vmaps them.

def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx

def sliding_window(window):
    """Causal attention to the last `window` positions (the query itself included)."""
    def sliding_window_mask(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < window)
    return sliding_window_mask

def prefix_lm(prefix_len):
    """Bidirectional over the first `prefix_len` tokens, causal after them."""
    def prefix_lm_mask(b, h, q_idx, kv_idx):
        return (kv_idx < prefix_len) | (q_idx >= kv_idx)
    return prefix_lm_mask

def document_mask(document_ids):
    """Packed sequences: attend causally within the same document only.
    document_ids: (B, T) integer tensor, one id per token."""
    def document_causal_mask(b, h, q_idx, kv_idx):
        return (document_ids[b, q_idx] == document_ids[b, kv_idx]) & (q_idx >= kv_idx)
    return document_causal_mask

def and_masks(*mask_mods):
    def and_mask(b, h, q_idx, kv_idx):
        result = mask_mods[0](b, h, q_idx, kv_idx)
        for mask_mod in mask_mods[1:]:
            result = result & mask_mod(b, h, q_idx, kv_idx)
        return result
    return and_mask

def or_masks(*mask_mods):
    def or_mask(b, h, q_idx, kv_idx):
        result = mask_mods[0](b, h, q_idx, kv_idx)
        for mask_mod in mask_mods[1:]:
            result = result | mask_mod(b, h, q_idx, kv_idx)
        return result
    return or_mask

def alibi_slopes(n_head):
    """Press et al. 2022: geometric slopes 2^(-8/n), 2^(-16/n), ... one per head."""
    return torch.tensor([2.0 ** (-8.0 * (i + 1) / n_head) for i in range(n_head)])

def alibi(slopes):
    """Additive linear distance penalty per head; `slopes` is an (n_head,) tensor (a buffer or
    an nn.Parameter, for learned slopes)."""
    def alibi_bias(score, b, h, q_idx, kv_idx):
        return score - slopes[h] * (q_idx - kv_idx)
    return alibi_bias

class ModuleALiBi:
    """ALiBi with the slopes an attention module holds, looked up at every call. A closure over
    the tensor would go stale: .to()/.double() replace a buffer, and a deep-copied model's mod
    would keep the original's slopes (and train those, not its own learned ones)."""
    def __init__(self, attn):
        self.attn = attn
    def __call__(self, score, b, h, q_idx, kv_idx):
        return alibi(self.attn.alibi_slopes)(score, b, h, q_idx, kv_idx)

def soft_cap(cap):
    """Gemma-2 style tanh soft-capping of the attention logits at +-cap."""
    def soft_cap_score(score, b, h, q_idx, kv_idx):
        return cap * torch.tanh(score / cap)
    return soft_cap_score

# `attn_mod` config strings, 'name' or 'name:arg'. Each entry builds the module's
# (mask_mod, score_mod) from the argument string, so mods with per-head state (ALiBi slopes)
# get it from the module. The value's second field documents the argument.
ATTN_MODS = {
    'causal':         (lambda attn, arg: (causal, None), None),
    'sliding_window': (lambda attn, arg: (sliding_window(int(arg)), None), 'window length, an integer, e.g. sliding_window:128'),
    'prefix_lm':      (lambda attn, arg: (prefix_lm(int(arg)), None), 'prefix length, an integer, e.g. prefix_lm:32'),
    'alibi':          (lambda attn, arg: (causal, ModuleALiBi(attn)), None),
    'alibi_learned':  (lambda attn, arg: (causal, ModuleALiBi(attn)), None),
    'soft_cap':       (lambda attn, arg: (causal, soft_cap(float(arg))), 'cap, finite, e.g. soft_cap:20'),
}

def parse_attn_mod(spec):
    """'sliding_window:128' -> ('sliding_window', '128'), with errors that say what to write."""
    name, _, arg = spec.partition(':')
    if name not in ATTN_MODS:
        raise ValueError(f"attn_mod={spec!r}: unknown mod {name!r}; choose one of {sorted(ATTN_MODS)}")
    arg_doc = ATTN_MODS[name][1]
    if arg_doc is None and arg:
        raise ValueError(f"attn_mod={spec!r}: {name} takes no argument; write attn_mod='{name}'")
    if arg_doc is not None:
        try:
            ATTN_MODS[name][0](None, arg) # the entry's own int()/float() of the argument (these builders need no module)
            assert 0 < float(arg) < math.inf # soft_cap:inf would give inf * tanh(0) = nan
        except (ValueError, AssertionError):
            raise ValueError(f"attn_mod={spec!r}: {name} needs a positive number, the {arg_doc}") from None
    return name, arg

# -----------------------------------------------------------------------------

@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304 # GPT-2 vocab_size of 50257, padded up to nearest multiple of 64 for efficiency
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True # True: bias in Linears and LayerNorms, like GPT-2. False: a bit better and faster
    # --- muP (MUP.md). 0 = SP. Otherwise the width the hyperparameters were tuned at.
    mup_base_width: int = 0
    mup_base_head_dim: int = 0  # head dim of the base model; 0 = mup_base_width // n_head (n_head fixed when widening)
    # muTransfer hyperparameters: tune at the base width, then keep them fixed (MUP.md).
    init_std: float = 0.02        # sigma: std of embeddings and (at base width) of hidden matrices
    mup_input_mult: float = 1.0   # x = input_mult * (tok_emb + pos_emb)
    mup_output_mult: float = 1.0  # logits = output_mult * lm_head(x) / m
    mup_attn_mult: float = 1.0    # attention logit scale = attn_mult * sqrt(d_base) / d_head
    mup_scale_weight_decay: bool = True  # hidden matrices decay with weight_decay * m, so lr * wd is width-independent (as MuAdamW)
    mup_hidden_lr_exponent: float = 1.0  # hidden Adam lr / m**exponent; 1 is muP. Other values only for the finite-width study (README)
    tie_weights: bool = True      # lm_head shares wte (nanoGPT). Untied: the readout starts at zero (MUP.md)
    # --- attention
    attn_mod: str = 'causal'      # one of ATTN_MODS, 'name' or 'name:arg'
    attn_backend: str = 'auto'    # 'auto' | 'sdpa' | 'flex' | 'dense'

    def __post_init__(self):
        for name in ('block_size', 'vocab_size', 'n_layer', 'n_head', 'n_embd'):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; "
                             f"pick n_embd as a multiple of n_head")
        if self.mup_base_width < 0 or self.mup_base_head_dim < 0:
            raise ValueError("mup_base_width and mup_base_head_dim must be >= 0 (0 = SP / derived)")
        if self.mup_base_head_dim and not self.mup_base_width:
            raise ValueError(f"mup_base_head_dim={self.mup_base_head_dim} only has a meaning under muP; "
                             f"set mup_base_width too, or leave mup_base_head_dim=0")
        if self.mup_base_width:
            if not self.mup_base_head_dim and self.mup_base_width % self.n_head:
                raise ValueError(f"mup_base_width={self.mup_base_width} is not divisible by n_head={self.n_head}: "
                                 f"the base model keeps n_head heads; set mup_base_head_dim to the base model's head dim")
            if self.mup_base_width % self.base_head_dim:
                raise ValueError(f"mup_base_width={self.mup_base_width} is not a multiple of "
                                 f"mup_base_head_dim={self.mup_base_head_dim}")
        if self.attn_backend not in ('auto', 'sdpa', 'flex', 'dense'):
            raise ValueError(f"attn_backend={self.attn_backend!r}: use 'auto', 'sdpa', 'flex' or 'dense'")
        parse_attn_mod(self.attn_mod)

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    @property
    def base_head_dim(self):
        if not self.mup_base_width:
            return self.head_dim
        return self.mup_base_head_dim or self.mup_base_width // self.n_head

    @property
    def width_mult(self):
        """m = n_embd / mup_base_width; 1 under SP."""
        return self.n_embd / self.mup_base_width if self.mup_base_width else 1.0

# -----------------------------------------------------------------------------

class LayerNorm(nn.Module):
    """ LayerNorm but with an optional bias. PyTorch doesn't support simply bias=False """

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, input):
        return F.layer_norm(input, self.weight.shape, self.weight, self.bias, 1e-5)


# The dense backend works through the scores in blocks, like a flash kernel's tiles but built from
# plain ops: _DENSE_QUERY_BLOCK queries at a time see only the range of keys the mask lets some of
# them attend to (causal attention skips 1/4 of the work at T = 256, 7/16 at T = 1024), and a
# block holds about _DENSE_BLOCK_SCORES scores (8 MB in float32), so that every elementwise pass
# (score_mod, mask, softmax, and their backward) runs in cache. Measured with bench.py's attention
# shapes on a 2-core CPU (README, Benchmarks): soft_cap at T = 256 went from 1.59x to 1.40x causal SDPA.
_DENSE_QUERY_BLOCK = 128
_DENSE_BLOCK_SCORES = 1 << 21


def _vmap_bhqkv(fn, prefix):
    """Evaluate a mod at every (b, h, q_idx, kv_idx) with nested vmaps, as flex's own eager path
    does, so a mod written for flex means exactly the same thing here. `prefix` is the number of
    leading tensor arguments (the score) that carry the four dims."""
    for dims in ((None, None, None, 0), (None, None, 0, None), (None, 0, None, None), (0, None, None, None)):
        fn = torch.vmap(fn, in_dims=(0,) * prefix + dims, out_dims=0)
    return fn


def _bhqkv_indices(b_range, h_range, q_range, kv_range, device):
    """The (b, h, q_idx, kv_idx) index vectors of a block of scores (four ranges), and the same four
    shaped to broadcast against each other (one mod call on them covers every element)."""
    idx = [torch.arange(r.start, r.stop, device=device) for r in (b_range, h_range, q_range, kv_range)]
    b, h, q_idx, kv_idx = idx
    return idx, (b[:, None, None, None], h[None, :, None, None], q_idx[None, None, :, None], kv_idx[None, None, None, :])


class MuPFlexAttention(nn.Module):
    """Multi-head self-attention whose pattern is a FlexAttention `score_mod` and `mask_mod`.

    Contract for subclasses:
    - override `score_mod(score, b, h, q_idx, kv_idx)` and/or `mask_mod(b, h, q_idx, kv_idx)`
      (defaults: the config's `attn_mod`, causal unless set). Write them with tensor ops on the
      index tensors; put data in tensors (buffers or nn.Parameters) and index them with the
      indices. `score` arrives already multiplied by the muP logit scale: never rescale it.
    - parameters you create in `__init__` (bias tables, gates, learned slopes) are classified by
      shape against the base-width model (GPT.mup_param_info) and get their muP init scaling,
      learning rate and weight decay automatically; they get gradients on every backend.
    - the mask must be the same for every layer of one forward (it is built once and shared);
      if it depends on data you change (a new graph, new document ids), call
      `clear_block_mask_cache()` after changing it.
    """

    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.head_dim
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.residual_proj = True # init std / sqrt(2 n_layer), GPT-2
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.dropout = config.dropout
        # muP attention: logits scale as 1/d_head (Tensor Programs V, sec. on attention), written
        # sqrt(d_base)/d_head so that it is SP's 1/sqrt(d_head) at the base head dim. Widening by
        # adding heads at fixed d_head keeps 1/sqrt(d_head), which is correct (microsoft/mup #17).
        self.scale = config.mup_attn_mult * math.sqrt(config.base_head_dim) / config.head_dim
        self.backend = config.attn_backend
        name, arg = parse_attn_mod(config.attn_mod)
        if name == 'alibi_learned':
            self.alibi_slopes = nn.Parameter(alibi_slopes(config.n_head)) # a 'vector' (one per head): lr as is
        elif name == 'alibi':
            self.register_buffer('alibi_slopes', alibi_slopes(config.n_head), persistent=False)
        self._mask_fn, self._score_fn = ATTN_MODS[name][0](self, arg)
        self.block_mask_cache = {} # GPT replaces this with one dict shared by all layers
        self.capture = False       # analyze_jacobian.py: keep the attention probabilities (dense backend)
        self.captured_probs = None # (B, n_head, T, T), with .grad = dL/dA after backward
        self.captured_mask = None  # the boolean mask those probabilities were computed under

    # ---- the two overridable mods
    def score_mod(self, score, b, h, q_idx, kv_idx):
        return score if self._score_fn is None else self._score_fn(score, b, h, q_idx, kv_idx)

    def mask_mod(self, b, h, q_idx, kv_idx):
        return self._mask_fn(b, h, q_idx, kv_idx)

    def clear_block_mask_cache(self):
        self.block_mask_cache.clear()

    @property
    def has_score_mod(self):
        return type(self).score_mod is not MuPFlexAttention.score_mod or self._score_fn is not None

    @property
    def is_plain_causal(self):
        return (not self.has_score_mod and type(self).mask_mod is MuPFlexAttention.mask_mod
                and self._mask_fn is causal)

    def resolve_backend(self, device):
        """'auto': SDPA (fused kernels) when the pattern is plain causal; flex on CUDA; the dense
        reference otherwise (flex has no backward on CPU, and its CPU forward compiles per shape).
        Capture mode always runs the dense backend, the only one that materializes the probabilities."""
        if self.capture:
            return 'dense'
        if self.backend != 'auto':
            if self.backend == 'sdpa' and not self.is_plain_causal:
                raise ValueError("attn_backend='sdpa' only runs plain causal attention; this module has "
                                 "a custom score_mod/mask_mod: use 'auto', 'flex' or 'dense'")
            return self.backend
        if self.is_plain_causal:
            return 'sdpa'
        return 'flex' if device.type == 'cuda' else 'dense'

    # ---- backends
    def _make_room_in_mask_cache(self):
        """Keep the masks of the 4 most recent shapes only: generate grows T by one each token,
        and keeping every (B, H, T, T) dense mask would cost O(block_size^3) memory (4.3 GB at
        block_size 1024, 12 heads). Training and eval reuse one shape, so they still build once."""
        while len(self.block_mask_cache) >= 4:
            del self.block_mask_cache[next(iter(self.block_mask_cache))]

    def _block_mask(self, B, T, device):
        key = (B, T, str(device))
        if key not in self.block_mask_cache:
            self._make_room_in_mask_cache()
            self.block_mask_cache[key] = create_block_mask(lambda b, h, q_idx, kv_idx: self.mask_mod(b, h, q_idx, kv_idx), B, self.n_head, T, T, device=device)
        return self.block_mask_cache[key]

    def _dense_mask(self, B, T, device):
        """The dense backend's boolean mask as a (B, n_head, T, T) view of the cached one."""
        return self._compact_dense_mask(B, T, device).expand(B, self.n_head, T, T)

    def _compact_dense_mask(self, B, T, device):
        """The dense backend's boolean mask, cached. A mask_mod that gives on broadcast index
        tensors exactly what it gives element by element (every catalog mod) is kept with only the
        dims it depends on (causal: (1, 1, T, T)): T^2 memory, not B*H*T^2, and SDPA takes that
        compact mask as fast as is_causal. Others keep the (B, n_head, T, T) vmap evaluation."""
        key = ('dense', B, T, str(device))
        if key not in self.block_mask_cache:
            self._make_room_in_mask_cache()
            idx, broadcast_idx = _bhqkv_indices(range(B), range(self.n_head), range(T), range(T), device)
            mask = _vmap_bhqkv(self.mask_mod, prefix=0)(*idx) # the reference: flex's per-element meaning
            if not torch.compiler.is_compiling(): # the check is a graph break there, for a once-per-shape gain
                try:
                    compact = self.mask_mod(*broadcast_idx)
                    if torch.equal(torch.broadcast_to(compact, mask.shape), mask):
                        mask = compact
                except (RuntimeError, IndexError, TypeError, ValueError):
                    pass # not written elementwise (e.g. a reduction over an index): keep the vmap result
            self.block_mask_cache[key] = mask
        return self.block_mask_cache[key]

    def _dense(self, q, k, v):
        B, H, T, _ = q.shape
        compact = self._compact_dense_mask(B, T, q.device) # ops on it stay compact
        if not self.has_score_mod and not self.capture:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=compact, scale=self.scale,
                                                  dropout_p=self.dropout if self.training else 0.0)
        broadcasts, blocks, rows = self._dense_plan(q, k, compact)
        return torch.cat([torch.cat([self._dense_block(q, k, v, compact, range(b0, min(B, b0 + rows)), q_range, kv_range,
                                                       broadcasts) for q_range, kv_range in blocks], dim=2)
                          for b0 in range(0, B, rows)])

    def _dense_plan(self, q, k, compact):
        """How the dense backend covers the scores, decided once per shape and cached with the masks
        (every layer runs the same mods): whether score_mod may be called on broadcast indices,
        the (query range, key range) blocks, and how many sequences a block takes."""
        B, H, T, _ = q.shape
        key = ('dense plan', B, T, str(q.device), self.capture)
        if key in self.block_mask_cache:
            return self.block_mask_cache[key]
        if torch.compiler.is_compiling():
            # the checks are data-dependent (graph breaks); inductor fuses the vmap path and the
            # whole (B, H, T, T) computation anyway
            return False, [(range(T), range(T))], B
        broadcasts = False
        if self.has_score_mod:
            # One call on broadcast index tensors is much faster than nested vmaps, and means the
            # same for an elementwise mod (every catalog mod): checked against vmap on these scores.
            with torch.no_grad():
                broadcasts = self._score_mod_broadcasts((q * self.scale) @ k.transpose(-2, -1))
        if self.capture: # analyze_jacobian.py takes the whole (B, H, T, T) probabilities
            blocks, rows = [(range(T), range(T))], B
        else:
            attended = torch.broadcast_to(compact.any(0).any(0), (T, T)) # by some sequence and head
            blocks = []
            for q0 in range(0, T, _DENSE_QUERY_BLOCK):
                q_range = range(q0, min(T, q0 + _DENSE_QUERY_BLOCK))
                keys = attended[q_range.start:q_range.stop].any(0).nonzero().flatten().tolist()
                # no key at all: one (masked) key; the `attends` flag then zeroes the block's rows
                blocks.append((q_range, range(keys[0], keys[-1] + 1) if keys else range(1)))
            rows = max(1, _DENSE_BLOCK_SCORES // (H * _DENSE_QUERY_BLOCK * T))
        self._make_room_in_mask_cache()
        self.block_mask_cache[key] = broadcasts, blocks, rows
        return broadcasts, blocks, rows

    def _score_mod_broadcasts(self, score):
        """Does score_mod on broadcast index tensors give what vmap gives element by element?"""
        B, H, T, _ = score.shape
        idx, broadcast_idx = _bhqkv_indices(range(B), range(H), range(T), range(T), score.device)
        reference = _vmap_bhqkv(self.score_mod, prefix=1)(score, *idx)
        try:
            broadcast = torch.broadcast_to(self.score_mod(score, *broadcast_idx), reference.shape)
        except (RuntimeError, IndexError, TypeError, ValueError):
            return False # not written elementwise (e.g. a reduction over an index)
        tol = 8 * torch.finfo(reference.dtype).eps
        return torch.allclose(broadcast, reference, rtol=tol, atol=tol, equal_nan=True)

    def _dense_block(self, q, k, v, compact, b_range, q_range, kv_range, broadcasts):
        """Attention of the queries in q_range of the sequences in b_range over the keys in
        kv_range (every key the mask lets them see), the dense way."""
        b, qs, kvs = (slice(r.start, r.stop) for r in (b_range, q_range, kv_range))
        q, k, v = q[b, :, qs], k[b, :, kvs], v[b, :, kvs]
        # the compact mask's broadcast (size-1) dims stay whole
        compact = compact[tuple(s if n > 1 else slice(None) for n, s in zip(compact.shape, (b, slice(None), qs, kvs)))]
        score = (q * self.scale) @ k.transpose(-2, -1) # scaling q costs T*head_dim multiplies, not T*T
        if self.has_score_mod:
            idx, broadcast_idx = _bhqkv_indices(b_range, range(self.n_head), q_range, kv_range, q.device)
            if broadcasts:
                score = torch.broadcast_to(self.score_mod(score, *broadcast_idx), score.shape)
            else:
                score = _vmap_bhqkv(self.score_mod, prefix=1)(score, *idx)
        # The mask as an additive bias: its backward is free, masked_fill's is one more pass over the
        # scores. Finite, so a fully masked row gives a uniform row instead of nan; the multiply by
        # `attends` below makes it 0, as flex and SDPA give.
        bias = torch.zeros(compact.shape, dtype=score.dtype, device=q.device)
        bias.masked_fill_(~compact, torch.finfo(score.dtype).min / 2)
        probs = torch.softmax(score + bias, dim=-1)
        attends = compact.any(-1, keepdim=True) # False on rows with nothing to attend to
        if self.capture:
            probs = probs * attends
            probs.retain_grad()
            self.captured_probs, self.captured_mask = probs, compact.expand(probs.shape)
        return (self.attn_dropout(probs) @ v) * attends # (rows, H, queries, head_dim): cheaper than on probs

    def attend(self, q, k, v):
        """q, k, v: (B, n_head, T, head_dim) -> (B, n_head, T, head_dim)."""
        backend = self.resolve_backend(q.device)
        if backend == 'sdpa':
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale,
                                                  dropout_p=self.dropout if self.training else 0.0)
        if backend == 'flex':
            # flex has no attention-probability dropout; residual dropout still applies
            score_mod = None
            if self.has_score_mod: # flex wants a plain function, not a bound method
                score_mod = lambda score, b, h, q_idx, kv_idx: self.score_mod(score, b, h, q_idx, kv_idx)
            flex = compiled_flex_attention() if q.device.type == 'cuda' else flex_attention
            return flex(q, k, v, score_mod=score_mod, block_mask=self._block_mask(q.size(0), q.size(2), q.device),
                        scale=self.scale)
        return self._dense(q, k, v)

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))
        y = self.attend(q, k, v)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))

_compiled_flex = None
def compiled_flex_attention():
    """flex_attention only becomes a fused kernel under torch.compile; compiled once, lazily."""
    global _compiled_flex
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.residual_proj = True # init std / sqrt(2 n_layer), GPT-2
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):

    def __init__(self, config, attn_cls):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = attn_cls(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x

# -----------------------------------------------------------------------------

class GPT(nn.Module):

    def __init__(self, config, attn_cls=MuPFlexAttention, _shapes_only=False):
        super().__init__()
        assert config.vocab_size is not None
        assert config.block_size is not None
        self.config = config
        self.attn_cls = attn_cls

        self.transformer = nn.ModuleDict(dict(
            wte = nn.Embedding(config.vocab_size, config.n_embd),
            wpe = nn.Embedding(config.block_size, config.n_embd),
            drop = nn.Dropout(config.dropout),
            h = nn.ModuleList([Block(config, attn_cls) for _ in range(config.n_layer)]),
            ln_f = LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            # https://paperswithcode.com/method/weight-tying
            self.transformer.wte.weight = self.lm_head.weight
        if _shapes_only: # a throwaway model on the meta device, only read for its parameter shapes
            return
        # one mask cache for the whole model: block masks are built once per shape, not per layer
        block_mask_cache = {}
        for block in self.transformer.h:
            block.attn.block_mask_cache = block_mask_cache

        self.mup_param_info = self._classify_params()
        self._init_weights()
        print("number of parameters: %.2fM" % (self.get_num_params()/1e6,))

    # ---- muP: the one place that decides each parameter's treatment
    def _classify_params(self):
        """Classify every parameter by comparing its shape with the same parameter in the
        base-width model (microsoft/mup's set_base_shapes idea, no name lists), so parameters a
        subclass adds are treated right. A dim is 'growing' if it differs from the base model's
        (at n_embd == base, against a 2x-wide model). MUP.md, per-parameter rules:
          2 growing dims -> 'hidden':    init std / sqrt(m), AdamW lr / m, weight decay * m
          otherwise, >= 2 dims -> 'embedding' (wte, wpe, readout, finite tables): lr, init as is
          otherwise -> 'vector' (LayerNorm, biases): lr, no weight decay
        Under SP the same classes are computed with m = 1, so muP at its base width and SP build
        identical models and identical optimizer groups (MUP.md invariant 1).
        Returns {name: (kind, m)} with m the parameter's width multiplier (fan-in ratio)."""
        c = self.config
        base_width = c.mup_base_width or c.n_embd
        base_n_head = base_width // c.base_head_dim
        base = replace(c, n_embd=base_width, n_head=base_n_head, mup_base_width=0, mup_base_head_dim=0)
        # at m = 1 a 2x-wide model shows which axes grow (every multiplier is 1 there anyway)
        wider = replace(base, n_embd=2 * base_width)
        base_shapes = self._param_shapes(base)
        wider_shapes = base_shapes if c.n_embd != base_width else self._param_shapes(wider)
        info = {}
        for name, p in self.named_parameters():
            if name not in base_shapes:
                raise ValueError(f"parameter {name} does not exist in the base-width model: parameters must be "
                                 f"created in __init__ from the config alone, so muP can compare shapes")
            ref = wider_shapes[name] if c.n_embd == base_width else tuple(p.shape)
            growing = [i for i, (b, r) in enumerate(zip(base_shapes[name], ref)) if b != r]
            m = p.shape[growing[-1]] / base_shapes[name][growing[-1]] if growing else 1.0
            kind = 'hidden' if len(growing) >= 2 else ('embedding' if p.dim() >= 2 else 'vector')
            info[name] = (kind, m)
        return info

    def _param_shapes(self, config):
        with torch.device('meta'):
            shape_model = GPT(config, self.attn_cls, _shapes_only=True)
        return {name: tuple(p.shape) for name, p in shape_model.named_parameters()}

    @torch.no_grad()
    def _init_weights(self):
        c = self.config
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                std = c.init_std
                if getattr(module, 'residual_proj', False):
                    std /= math.sqrt(2 * c.n_layer) # GPT-2: scaled init of residual projections
                torch.nn.init.normal_(module.weight, mean=0.0, std=std)
                if getattr(module, 'bias', None) is not None:
                    torch.nn.init.zeros_(module.bias)
        if not c.tie_weights:
            torch.nn.init.zeros_(self.lm_head.weight) # MUP.md: an untied readout starts at zero (SP too, for equality)
        for name, p in self.named_parameters():
            kind, m = self.mup_param_info[name]
            if kind == 'hidden':
                p.div_(math.sqrt(m)) # muP: hidden init std sigma/sqrt(fan_in ratio), Table 8 (variance 1/fan_in)

    def get_num_params(self, non_embedding=True):
        """
        Return the number of parameters in the model.
        For non-embedding count (default), the position embeddings get subtracted.
        The token embeddings would too, except due to the parameter sharing these
        params are actually used as weights in the final layer, so we include them.
        """
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n_params -= self.transformer.wpe.weight.numel()
        return n_params

    def forward(self, idx, targets=None):
        device = idx.device
        b, t = idx.size()
        assert t <= self.config.block_size, f"Cannot forward sequence of length {t}, block size is only {self.config.block_size}"
        pos = torch.arange(0, t, dtype=torch.long, device=device)

        tok_emb = self.transformer.wte(idx)
        pos_emb = self.transformer.wpe(pos)
        # muP input multiplier: a width-independent constant tuned at the base width (MUP.md)
        x = self.transformer.drop(self.config.mup_input_mult * (tok_emb + pos_emb))
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)

        if targets is None:
            x = x[:, [-1], :] # inference-time mini-optimization: only forward the lm_head on the very last position
        logits = self.readout(x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss

    def readout(self, x):
        """The only place logits are made (forward with or without targets, generate): muP's
        readout multiplier output_mult / m (MuReadout; Tensor Programs V, Table 8) lives here."""
        return self.lm_head(x) * (self.config.mup_output_mult / self.config.width_mult)

    def crop_block_size(self, block_size):
        # model surgery to decrease the block size if necessary
        # e.g. we may load a checkpoint with block size 1024 but want to use a smaller block size
        assert block_size <= self.config.block_size
        self.config = replace(self.config, block_size=block_size)
        self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])
        for block in self.transformer.h:
            block.attn.clear_block_mask_cache()

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type, eps=1e-8):
        """AdamW with one param group per (kind, m). Each group carries `lr_scale`, its muP
        learning-rate multiplier (1/m for hidden matrices, 1 otherwise and under SP); the
        training loop sets lr = schedule(it) * lr_scale on every group."""
        groups = {}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            kind, m = self.mup_param_info[name]
            if kind == 'hidden':
                # muP (Table 8, MuAdamW): Adam lr of hidden matrices / m. Weight decay * m keeps the
                # per-step decay lr*wd width-independent (optional, mup_scale_weight_decay).
                lr_scale = m ** -self.config.mup_hidden_lr_exponent
                wd = weight_decay * (1.0 / lr_scale if self.config.mup_scale_weight_decay else 1.0)
            elif kind == 'embedding':
                lr_scale, wd = 1.0, weight_decay
            else:
                lr_scale, wd = 1.0, 0.0 # no decay for LayerNorms and biases, as nanoGPT
            key = (kind, lr_scale, wd)
            if key not in groups:
                groups[key] = dict(params=[], name=kind, weight_decay=wd, lr_scale=lr_scale,
                                   lr=learning_rate * lr_scale)
            groups[key]['params'].append(p)
        optim_groups = list(groups.values())
        for g in optim_groups:
            print(f"param group {g['name']}: {len(g['params'])} tensors, "
                  f"{sum(p.numel() for p in g['params']):,} parameters, lr_scale {g['lr_scale']:.4g}, "
                  f"weight_decay {g['weight_decay']:.4g}")
        # Create AdamW optimizer and use the fused version if it is available
        fused_available = 'fused' in inspect.signature(torch.optim.AdamW).parameters
        use_fused = fused_available and device_type == 'cuda'
        extra_args = dict(fused=True) if use_fused else dict()
        optimizer = torch.optim.AdamW(optim_groups, lr=learning_rate, betas=betas, eps=eps, **extra_args)
        return optimizer

    def estimate_mfu(self, fwdbwd_per_iter, dt, peak_flops=312e12):
        """ estimate model flops utilization (MFU) as a fraction of `peak_flops`
        (default: A100 bf16 peak, as nanoGPT; see device_peak_flops) """
        # first estimate the number of flops we do per iteration.
        # see PaLM paper Appendix B as ref: https://arxiv.org/abs/2204.02311
        N = self.get_num_params()
        cfg = self.config
        L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.n_embd//cfg.n_head, cfg.block_size
        flops_per_token = 6*N + 12*L*H*Q*T
        flops_per_fwdbwd = flops_per_token * T
        flops_per_iter = flops_per_fwdbwd * fwdbwd_per_iter
        flops_achieved = flops_per_iter * (1.0/dt) # per second
        return flops_achieved / peak_flops

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None):
        """
        Take a conditioning sequence of indices idx (LongTensor of shape (b,t)) and complete
        the sequence max_new_tokens times, feeding the predictions back into the model each time.
        The whole (cropped) context is recomputed every step, so every mask sees true positions.
        Most likely you'll want to make sure to be in model.eval() mode of operation for this.
        """
        for _ in range(max_new_tokens):
            # if the sequence context is growing too long we must crop it at block_size
            idx_cond = idx if idx.size(1) <= self.config.block_size else idx[:, -self.config.block_size:]
            logits, _ = self(idx_cond)
            logits = logits[:, -1, :] / temperature
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float('Inf')
            probs = F.softmax(logits, dim=-1)
            idx_next = torch.multinomial(probs, num_samples=1)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx


# bf16 dense peaks of common GPUs (vendor datasheets, without sparsity)
GPU_PEAK_FLOPS = {'H200': 989e12, 'H100': 989e12, 'A100': 312e12, 'L4': 121e12, 'A10': 125e12,
                  'RTX 4090': 165e12, 'RTX 3090': 71e12, 'V100': 125e12, 'T4': 65e12}

def device_peak_flops(device, dtype=torch.float32):
    """Peak FLOP/s the MFU figures are measured against: a GPU's datasheet bf16 peak; elsewhere
    (CPU, MPS) there is no datasheet figure, so measure the best rate of a large matmul in `dtype`
    once (an achievable peak, so CPU MFU reads 'fraction of what this machine's GEMM reaches')."""
    device = torch.device(device)
    if device.type == 'cuda':
        name = torch.cuda.get_device_name(device)
        for key, flops in GPU_PEAK_FLOPS.items():
            if key in name:
                return flops
    n = 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = float('inf')
    for _ in range(5):
        t0 = time.perf_counter()
        a @ b
        if device.type == 'cuda':
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best
