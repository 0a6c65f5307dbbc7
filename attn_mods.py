"""
Attention mods: the catalog of attention patterns as FlexAttention mods, the `attn_mod` config
strings that select them (model.py builds every layer's default mods from its string), and the
dense backend that evaluates any mod with flex's meaning where flex cannot train (CPU).

A mask mod `mask_mod(b, h, q_idx, kv_idx) -> bool` says which keys a query may see; a score mod
`score_mod(score, b, h, q_idx, kv_idx) -> score` changes a logit before the softmax. They receive
index tensors, so they must be written with tensor ops (no Python `if` on values, no .item(), no
dict look-ups): flex traces them and the dense backend vmaps them. Combine masks with
torch.nn.attention.flex_attention's and_masks / or_masks. Catalog in the style of
meta-pytorch/attention-gym.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
from torch.nn import functional as F


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx

def sliding_window(window):
    """Causal attention to the last `window` positions, the query's own included."""
    def sliding_window_mask(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < window)
    return sliding_window_mask

def prefix_lm(prefix_len):
    """Bidirectional over the first `prefix_len` tokens, causal after them."""
    def prefix_lm_mask(b, h, q_idx, kv_idx):
        return (kv_idx < prefix_len) | (q_idx >= kv_idx)
    return prefix_lm_mask

def document_mask(document_ids):
    """Packed sequences: causal attention within a document. document_ids: (B, T) integers."""
    def document_causal_mask(b, h, q_idx, kv_idx):
        return (document_ids[b, q_idx] == document_ids[b, kv_idx]) & (q_idx >= kv_idx)
    return document_causal_mask

def alibi(slopes):
    """Press et al. 2022: subtract slope[h] * distance. `slopes`: (n_head,), fixed or learned."""
    def alibi_bias(score, b, h, q_idx, kv_idx):
        return score - slopes[h] * (q_idx - kv_idx)
    return alibi_bias

def alibi_slopes(n_head):
    return 2.0 ** (-8.0 * torch.arange(1, n_head + 1) / n_head)

def add_alibi_slopes(attn, arg):
    """ALiBi's slopes on the attention module: one per head, learned ('alibi:learned': a muP
    vector, lr as is, no decay) or a fixed buffer."""
    if arg == 'learned':
        attn.alibi_slopes = nn.Parameter(alibi_slopes(attn.n_head))
    else:
        attn.register_buffer('alibi_slopes', alibi_slopes(attn.n_head), persistent=False)

def soft_cap(cap):
    """Gemma 2: squash the attention logits smoothly into (-cap, cap)."""
    def soft_cap_score(score, b, h, q_idx, kv_idx):
        return cap * torch.tanh(score / cap)
    return soft_cap_score

class Mods(NamedTuple):
    """The two halves of an attention pattern; score_mod is None where scores stay as they are."""
    mask_mod: Callable
    score_mod: Callable | None


@dataclass(frozen=True)
class CatalogEntry:
    """One `attn_mod` name: how to build its mods, which arguments it takes, how to write one.

    `build(attn, arg)` gets the attention module, so a mod can read its tensors (ALiBi's slopes).
    Mods are rebuilt at every use from the module's current tensors: .to(), .double() and
    deepcopy never leave a mod holding stale slopes."""
    build: Callable[..., Mods]
    accepts: Callable[[str], bool]
    usage: str
    relative: bool = True # reads positions only through q_idx - kv_idx (a RoPE cache may slide)
    setup: Callable | None = None # setup(attn, arg) at the module's init: the tensors a mod reads


def _no_argument(arg):
    return arg == ''


def _positive_int(arg):
    return arg.isdigit() and int(arg) > 0


def _positive_finite(arg):
    try:
        return 0 < float(arg) < math.inf
    except ValueError:
        return False


def _alibi_argument(arg):
    return arg in ('', 'learned')


ATTN_MODS = {
    'causal': CatalogEntry(
        build=lambda attn, arg: Mods(causal, None),
        accepts=_no_argument,
        usage="attn_mod='causal'"),
    'sliding_window': CatalogEntry(
        build=lambda attn, arg: Mods(sliding_window(int(arg)), None),
        accepts=_positive_int,
        usage="a window length, a positive integer: attn_mod='sliding_window:128'"),
    'prefix_lm': CatalogEntry(
        build=lambda attn, arg: Mods(prefix_lm(int(arg)), None),
        accepts=_positive_int,
        usage="a prefix length, a positive integer: attn_mod='prefix_lm:32'",
        relative=False),
    'alibi': CatalogEntry(
        build=lambda attn, arg: Mods(causal, alibi(attn.alibi_slopes)),
        accepts=_alibi_argument,
        usage="attn_mod='alibi' (fixed slopes) or 'alibi:learned'",
        setup=add_alibi_slopes),
    'soft_cap': CatalogEntry(
        build=lambda attn, arg: Mods(causal, soft_cap(float(arg))),
        accepts=_positive_finite,
        usage="a cap, a positive finite number: attn_mod='soft_cap:20'"),
}


def parse_attn_mod(spec):
    """'sliding_window:128' -> ('sliding_window', '128'), or an error that says what to write."""
    name, _, arg = spec.partition(':')
    if name not in ATTN_MODS:
        raise ValueError(f"attn_mod={spec!r}: unknown mod {name!r}; choose one of "
                         f"{sorted(ATTN_MODS)}, or a comma-separated list of them, one per layer "
                         f"in turn")
    if not ATTN_MODS[name].accepts(arg):
        raise ValueError(f"attn_mod={spec!r}: write {ATTN_MODS[name].usage}")
    return name, arg

# -----------------------------------------------------------------------------
# The dense backend: the reference that trains on CPU

def vmap_bhqkv(mod, n_scores):
    """`mod` evaluated at every (b, h, q_idx, kv_idx) with nested vmaps, as flex's own eager path
    does, so that a mod written for flex means the same here. The first `n_scores` arguments are
    (B, H, Q, KV) tensors; the index arguments are 1-d aranges."""
    index_dims = [(None, None, None, 0), (None, None, 0, None), (None, 0, None, None),
                  (0, None, None, None)]  # kv_idx innermost, b outermost
    for dims in index_dims:
        mod = torch.vmap(mod, in_dims=(0,) * n_scores + dims)
    return mod


def dense_mask(mask_mod, B, H, T, device, q_offset=0):
    """The mask of T queries at positions q_offset.. over the keys at 0 .. q_offset + T - 1, as a
    boolean tensor with a batch or head dim of 1 where it does not vary along it (causal:
    (1, 1, T, T)), which SDPA and the dense backend broadcast. q_offset > 0: decoding from a KV
    cache, the queries being the newest positions."""
    indices = (torch.arange(B, device=device), torch.arange(H, device=device),
               torch.arange(q_offset, q_offset + T, device=device),
               torch.arange(q_offset + T, device=device))
    mask = vmap_bhqkv(mask_mod, 0)(*indices)
    if not torch.compiler.is_compiling(): # data-dependent: left out of compiled graphs
        for dim in (0, 1):
            if (mask == mask.narrow(dim, 0, 1)).all():
                mask = mask.narrow(dim, 0, 1)
    return mask


def repeat_heads(kv, n_head):
    """Keys or values of fewer heads (grouped-query attention) repeated to n_head, as SDPA's and
    flex's enable_gqa read them: query head h uses key/value head h // (n_head / n_kv_head)."""
    if kv.size(1) == n_head:
        return kv
    return kv.repeat_interleave(n_head // kv.size(1), dim=1)


def attention_probs(q, k, mask, score_mod, scale, q_offset=0):
    """softmax over the keys of score_mod(scale * q.k) where the mask allows, and 0 on rows where
    it allows nothing, as flex and SDPA give. q: (B, H, Tq, D) at positions q_offset.., k: (B, H
    or fewer heads, Tk, D), mask: broadcastable to (B, H, Tq, Tk)."""
    k = repeat_heads(k, q.size(1))
    score = (q * scale) @ k.transpose(-2, -1) # scaling q costs Tq*D multiplies, not Tq*Tk
    if score_mod is not None:
        B, H, Tq, Tk = score.shape
        idx = [torch.arange(n, device=q.device) for n in (B, H, Tq, Tk)]
        score = vmap_bhqkv(score_mod, 1)(score, idx[0], idx[1], idx[2] + q_offset, idx[3])
    # The mask as an additive bias: its backward is free, masked_fill's is one more pass over the
    # scores. Finite, so a row with nothing to attend gives numbers, which the last factor zeroes.
    bias = torch.zeros(mask.shape, dtype=score.dtype, device=q.device)
    bias.masked_fill_(~mask, torch.finfo(score.dtype).min / 2)
    return torch.softmax(score + bias, dim=-1) * mask.any(-1, keepdim=True)


def dense_attention(q, k, v, mask, score_mod, scale, dropout_p=0.0, query_block=128):
    """The CPU reference backend: flex's semantics with autograd. q: (B, H, Tq, D), k and v: (B, H
    or fewer heads (GQA), Tk, D), Tk >= Tq, the queries being the last Tq positions of the keys (Tk > Tq: decoding from a
    KV cache). Without a score_mod, SDPA with the boolean mask does it all. With one, blocks of
    `query_block` queries each attend to the keys up to the last one their mask reaches: causal
    attention skips a quarter of the scores at T = 256, and each block's elementwise passes stay
    in cache (docs/mup-study.md, Benchmarks)."""
    k, v = repeat_heads(k, q.size(1)), repeat_heads(v, q.size(1))
    if score_mod is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                              dropout_p=dropout_p)
    Tq, Tk = q.size(2), k.size(2)
    q_offset = Tk - Tq
    out = []
    for q0 in range(0, Tq, query_block):
        block_mask = mask[..., q0:q0 + query_block, :]
        kv_end = Tk
        if not torch.compiler.is_compiling(): # data-dependent: compiled graphs take every key
            seen = block_mask.flatten(0, -2).any(0)
            kv_end = max(1, int((seen * torch.arange(1, Tk + 1, device=q.device)).max()))
        q_block = q[:, :, q0:q0 + query_block]
        probs = attention_probs(q_block, k[:, :, :kv_end], block_mask[..., :kv_end], score_mod,
                                scale, q_offset + q0)
        out.append(F.dropout(probs, dropout_p) @ v[:, :, :kv_end])
    return torch.cat(out, dim=2)
