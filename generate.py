"""
Decoding with a KV cache, kept out of the model as gpt-fast keeps it: the cache (a plain object
that one call of `generate` owns; the modules keep nothing), the policy that makes room in a full
cache, and sampling. GPT.generate(kv_cache=False) in model.py is the short reference this must
equal: nanoGPT's loop, which runs the whole (cropped) context at every step.

Each forward runs the tokens the cache does not hold yet: the prompt at first (the prefill), then
one token a step, attending to the cached keys and values of the ones before it, O(T) work per
token instead of O(T^2).

When the cache is full (block_size positions), one of three policies applies:
- slide: with RoPE, and masks and scores that read positions only through their difference
  (cache_slides), the oldest position is dropped and every new token attends to the block_size - 1
  before it, with their keys as they were computed. That is a full forward over the whole text
  with attention limited to the last block_size positions, not the reference's (which crops the
  text to its last block_size tokens at every step, so the first of them see no context).
- prefill anew: with absolute positions (wpe) or a mod that reads them, the newest
  block_size // 2 tokens are prefilled at positions 0.., and decoding goes on from there.
- recompute: a mask under which an earlier query sees a later key (prefix_lm while the text is
  inside its prefix) would leave the cache stale: those steps run the whole window, so the logits
  are a full forward's.
"""

from typing import NamedTuple

import torch
from torch.nn import functional as F

from attn_mods import vmap_bhqkv


class KVCache:
    """The keys and values of every layer for the positions decoded so far, in (n_layer, B,
    n_kv_head, capacity, head_dim) tensors allocated at the first append, in the keys' dtype.

    The cached positions are the slots start .. start + length - 1. A cache that may slide has
    room for 2 max_len slots: dropping the oldest position moves `start`, and only when the end
    of the buffer is reached are the max_len - 1 cached positions moved back to slot 0, one copy
    every max_len tokens instead of one per token. GPT.forward(idx, kv_cache=cache) runs idx as
    the positions after the cached ones; each attention layer appends its keys and values through
    cache.layer(i), and the forward advances `length` after the last layer."""

    def __init__(self, n_layer, max_len, slides=False):
        self.n_layer = n_layer
        self.max_len = max_len
        self.capacity = 2 * max_len if slides else max_len
        self.k = None
        self.v = None
        self.start = 0 # the slot of the oldest cached position
        self.length = 0 # positions cached
        self.dropped = 0 # positions dropped from the front by drop_oldest (RoPE's sliding window)

    @property
    def position(self):
        """The true position of the next token (RoPE's angle): a sliding cache dropped some."""
        return self.dropped + self.length

    def layer(self, index):
        return LayerKVCache(self, index)

    def append(self, layer, k, v):
        """Store k, v (B, n_kv_head, T, head_dim) at the positions after the cached ones; return
        the layer's keys and values up to them, oldest first."""
        if self.k is None:
            B, n_kv_head, _, head_dim = k.shape
            shape = (self.n_layer, B, n_kv_head, self.capacity, head_dim)
            self.k = torch.zeros(shape, dtype=k.dtype, device=k.device)
            self.v = torch.zeros(shape, dtype=v.dtype, device=v.device)
        if self.start + self.length + k.size(2) > self.capacity: # only in a sliding cache
            self.move_to_front()
        end = self.start + self.length + k.size(2)
        self.k[layer, :, :, self.start + self.length:end] = k
        self.v[layer, :, :, self.start + self.length:end] = v
        return self.k[layer, :, :, self.start:end], self.v[layer, :, :, self.start:end]

    def move_to_front(self):
        """The cached positions of every layer back to slot 0, where the next max_len tokens fit."""
        window = slice(self.start, self.start + self.length)
        self.k[:, :, :, :self.length] = self.k[:, :, :, window].clone()
        self.v[:, :, :, :self.length] = self.v[:, :, :, window].clone()
        self.start = 0

    def drop_oldest(self):
        """Forget the oldest cached position of every layer, making room for one more. The keys
        keep the rotation of their true positions, which the next token's continue (`dropped`)."""
        self.start += 1
        self.length -= 1
        self.dropped += 1

    def clear(self):
        """Forget every cached position: the next forward is a prefill."""
        self.start = 0
        self.length = 0


class LayerKVCache(NamedTuple):
    """One layer's view of a KVCache, what an attention module receives."""
    cache: KVCache
    layer: int

    def append(self, k, v):
        return self.cache.append(self.layer, k, v)


def sample(logits, temperature=1.0, top_k=None):
    """The next token (b, 1) from the logits of the last position (b, vocab): the most likely at
    temperature 0, else drawn from softmax(logits / temperature) over the top_k most likely."""
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits[logits < v[:, [-1]]] = -float('Inf')
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1)


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None):
    """Complete idx (b, t) by max_new_tokens tokens with a KV cache; temperature=0 is greedy.
    Use model.eval(). Past block_size, the cache policy of the module docstring applies."""
    block_size = model.config.block_size
    slides = cache_slides(model)
    cache = KVCache(model.config.n_layer, block_size, slides)
    window_start = max(0, idx.size(1) - block_size) # idx's position 0 in the cache
    for _ in range(max_new_tokens):
        window_start = make_room(model, cache, idx, window_start, slides)
        cached = window_start + cache.dropped + cache.length # tokens of idx in the cache
        logits, _ = model(idx[:, cached:], kv_cache=cache) # the prefill, or one token
        logits = logits[:, -1, :]
        idx_next = sample(logits, temperature, top_k)
        idx = torch.cat((idx, idx_next), dim=1)
    return idx


def make_room(model, cache, idx, window_start, slides):
    """The cache policy before each forward (the module docstring): slide a full cache, or empty
    it to prefill the newest half of idx's window anew, or empty it to recompute the window when
    an earlier query would see the new key. Returns where idx's window in the cache starts."""
    if cache.length == cache.max_len and slides:
        cache.drop_oldest()
    elif cache.length == cache.max_len:
        cache.clear()
        window_start = idx.size(1) - cache.max_len // 2
    elif cache.length > 0 and earlier_query_sees(model, cache.length, idx.size(0)):
        cache.clear()
    return window_start


def cache_slides(model):
    """Whether a full KV cache can drop its oldest position and go on: RoPE's positions, and every
    layer's mask and score reading positions only through their difference
    (MuPFlexAttention.relative_positions)."""
    return model.config.pos_emb == 'rope' and all(block.attn.relative_positions()
                                                   for block in model.transformer.h)


def earlier_query_sees(model, position, batch_size):
    """Whether any layer's mask lets a query before `position` see the key at `position`: then
    the keys and values cached for those queries, computed before it existed, differ from a full
    forward's. False for every causal mask; plain causal layers are not asked."""
    device = model.lm_head.weight.device
    queries = torch.arange(position, device=device)
    new_key = torch.tensor([position], device=device)
    asked = set()
    for block in model.transformer.h:
        attn = block.attn
        if attn.pattern in asked or attn.is_plain_causal():
            continue
        asked.add(attn.pattern)
        mask_mod = lambda b, h, q_idx, kv_idx: attn.mask_mod(b, h, q_idx, kv_idx)
        heads = torch.arange(attn.n_head, device=device)
        try:
            seen = vmap_bhqkv(mask_mod, 0)(torch.arange(batch_size, device=device), heads,
                                           queries, new_key)
        except (IndexError, RuntimeError) as e:
            raise ValueError(f"{type(attn).__name__}.mask_mod cannot be evaluated at position "
                             f"{position} ({e}); it reads data that does not reach the "
                             f"generated tokens: give it data for the whole length") from e
        if seen.any():
            return True
    return False
