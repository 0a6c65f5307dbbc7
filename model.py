"""
A GPT language model with one switch between the standard parameterization (SP) and the
Maximal Update Parameterization (muP), and attention written as FlexAttention mods.

- `mup_base_width = 0` is plain nanoGPT. `mup_base_width > 0` is muP relative to a model of
  that width: mup.py decides each parameter's treatment (init, learning rate, weight decay)
  from its shape, and three forward multipliers here do the rest (input, attention logits,
  readout).
  docs/mup.md states the rules, the invariants the tests check, and the papers behind them.
- An attention pattern is a `mask_mod(b, h, q_idx, kv_idx)` and a
  `score_mod(score, b, h, q_idx, kv_idx)`, as in torch.nn.attention.flex_attention. Subclass
  `MuPFlexAttention`, override them, and muP stays correct without further work.

References: karpathy/nanoGPT (layout), microsoft/mup (MuReadout, set_base_shapes),
meta-pytorch/attention-gym (the mods catalog, in attn_mods.py).
"""

import functools
import importlib.util
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from attn_mods import ATTN_MODS, causal, dense_attention, dense_mask, parse_attn_mod
import generate
import mup
from mup import fan_in_dim, set_lr # noqa: F401 (what users import from model)

# -----------------------------------------------------------------------------

ATTN_BACKENDS = ('auto', 'sdpa', 'flex', 'dense')
POS_EMBS = ('learned', 'rope')
NORMS = ('layernorm', 'rmsnorm')
MLPS = ('gelu', 'gelu_tanh', 'relu2', 'swiglu')


@dataclass
class GPTConfig:
    # Every field is a setting of train.py and the study scripts (configurator.model_settings),
    # and its comment here is its --help.
    block_size: int = 1024 # the longest sequence: the context, and wpe's number of positions
    vocab_size: int = 50304 # GPT-2's 50257, padded up to a multiple of 64 for efficiency
    n_layer: int = 12 # transformer blocks
    n_head: int = 12 # attention heads (query heads, with n_kv_head)
    n_embd: int = 768 # the width: the residual stream's size
    dropout: float = 0.0 # of the embeddings, the attention probabilities and each branch's output
    bias: bool = True # biases in Linears and LayerNorms, like GPT-2; False: a bit better and faster
    # muP (docs/mup.md): 0 = SP; otherwise the width the hyperparameters were tuned at
    mup_base_width: int = 0
    # the base model's head dim; 0 = mup_base_width // n_head (widening keeps n_head, as nanoGPT)
    mup_base_head_dim: int = 0
    init_std: float = 0.02 # the init std at the base width (muTransfer: tuned there, kept when widening)
    mup_input_mult: float = 1.0 # the embeddings' output x this (muTransfer, tuned at the base width)
    mup_output_mult: float = 1.0 # the logits x this / m (muTransfer, tuned at the base width)
    mup_attn_mult: float = 1.0 # the attention logits x this (muTransfer, tuned at the base width)
    # hidden weight decay x m, so that lr * wd does not change with width
    mup_scale_weight_decay: bool = True
    # hidden lr / m**exponent: 1 is muP; other values only for the finite-width study
    mup_hidden_lr_exponent: float = 1.0
    # the embeddings' (wte, wpe) Adam lr x this: 1 under SP and muP; n_embd / base width is the SP
    # control of Kalra & Barkeshli 2026 (mup_payoff.py), which raises that lr alone
    embedding_lr_mult: float = 1.0
    # depth muP (CompleteP, docs/mup.md): 0 = off; else the depth the hyperparameters were tuned at
    mup_base_depth: int = 0
    # residual branches x (n_layer / mup_base_depth)^-alpha: 1 = CompleteP, 0.5 = depth-muP
    mup_depth_alpha: float = 1.0
    tie_weights: bool = True # lm_head shares wte; untied, the readout starts at zero
    # ---- the block: GPT-2's by default; each modern option is one setting, any combination works
    pos_emb: str = 'learned' # 'learned' (wpe) or 'rope' (rotary position embeddings, no wpe)
    rope_base: float = 10000.0 # RoPE's base: the angle of position p in pair i is p * base^(-2i/d)
    norm: str = 'layernorm' # 'layernorm' or 'rmsnorm'
    norm_gain: bool = True # a learned gain in every norm (and QK-norm); False: parameter-free
    qk_norm: bool = False # RMSNorm of each head's q and k, before the rotation and the logit scale
    # 'gelu', 'gelu_tanh' (GPT-2's released weights'), 'relu2' (ReLU squared) or 'swiglu' (at 8/3
    # n_embd: gelu's parameters)
    mlp: str = 'gelu'
    n_kv_head: int = 0 # key/value heads: 0 = n_head; fewer is grouped-query attention, 1 multi-query
    # ---- a mixture of experts in place of each block's MLP (MoE below; docs/mup.md, MoE)
    n_expert: int = 0 # routed experts per block: 0 = the dense MLP
    n_expert_active: int = 2 # the experts each token is routed to (token-choice top-k)
    n_shared_expert: int = 0 # experts every token also goes through (DeepSeek's shared experts)
    # each expert's hidden width, as a multiple of n_embd (so it grows with width under muP): 0 =
    # mlp_width / (n_expert_active + n_shared_expert), the dense MLP's active parameters
    expert_width_mult: float = 0.0
    moe_aux_loss_coef: float = 0.01 # the load-balancing loss's weight in the training loss (Switch)
    # muP with the number of experts as a width (docs/mup.md, MoE): 0 = n_expert is fixed as the
    # model widens; else the base model's n_expert, with the same active fraction n_expert_active / n_expert
    mup_base_n_expert: int = 0
    # an ATTN_MODS string ('causal', 'sliding_window:128', 'alibi', ...), or a comma-separated
    # list cycled over the layers
    attn_mod: str = 'causal'
    attn_backend: str = 'auto' # 'auto' | 'sdpa' | 'flex' | 'dense'
    # the attention class: '' = MuPFlexAttention, or 'path/to/file.py:ClassName' | 'module:ClassName'
    attn_cls: str = ''

    def __post_init__(self):
        """Checks in order, each only once those it relies on have passed, so that a bad value
        is reported as such (n_head=0 is 'must be positive', never a ZeroDivisionError)."""
        for key in ('block_size', 'vocab_size', 'n_layer', 'n_head', 'n_embd'):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key}={getattr(self, key)} must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}: "
                             f"pick a multiple")
        for key in ('mup_base_width', 'mup_base_head_dim', 'mup_base_depth', 'n_kv_head'):
            if getattr(self, key) < 0:
                raise ValueError(f"{key}={getattr(self, key)} must be >= 0 (0 = off / derived)")
        if not 0.5 <= self.mup_depth_alpha <= 1.0:
            raise ValueError(f"mup_depth_alpha={self.mup_depth_alpha}: must be in [0.5, 1] "
                             f"(1 = CompleteP, 0.5 = depth-muP)")
        if self.mup_base_head_dim and not self.mup_base_width:
            raise ValueError(f"mup_base_head_dim={self.mup_base_head_dim} only has a meaning under "
                             f"muP: set mup_base_width too, or leave mup_base_head_dim=0")
        if self.mup_base_width and not self.mup_base_head_dim and self.mup_base_width % self.n_head:
            raise ValueError(f"mup_base_width={self.mup_base_width} is not divisible by "
                             f"n_head={self.n_head}: the base model keeps n_head heads; set "
                             f"mup_base_head_dim to its head dim")
        if self.mup_base_width % self.base_head_dim:
            raise ValueError(f"mup_base_width={self.mup_base_width} is not a multiple of "
                             f"mup_base_head_dim={self.mup_base_head_dim}")
        for key, choices in (('pos_emb', POS_EMBS), ('norm', NORMS), ('mlp', MLPS)):
            if getattr(self, key) not in choices:
                raise ValueError(f"{key}={getattr(self, key)!r}: use one of "
                                 f"{', '.join(map(repr, choices))}")
        if not 0 < self.rope_base < math.inf:
            raise ValueError(f"rope_base={self.rope_base} must be a finite number > 0")
        if self.pos_emb == 'rope' and self.head_dim % 2:
            raise ValueError(f"pos_emb='rope' rotates pairs of coordinates, but the head dim "
                             f"n_embd / n_head = {self.head_dim} is odd: pick an even one")
        if self.n_head % self.kv_heads:
            raise ValueError(f"n_kv_head={self.n_kv_head} does not divide n_head={self.n_head}: "
                             f"each key/value head serves the same number of query heads")
        if self.mup_base_width and self.n_kv_head and (self.mup_base_width // self.base_head_dim) % self.n_kv_head:
            raise ValueError(f"n_kv_head={self.n_kv_head} does not divide the base model's "
                             f"{self.mup_base_width // self.base_head_dim} heads "
                             f"(mup_base_width / its head dim): widening keeps n_kv_head")
        if self.attn_backend not in ATTN_BACKENDS:
            raise ValueError(f"attn_backend={self.attn_backend!r}: use one of "
                             f"{', '.join(map(repr, ATTN_BACKENDS))}")
        for spec in self.attn_mod.split(','):
            parse_attn_mod(spec)
        check_attn_cls(self.attn_cls) # its form and its file; GPT imports it
        for key in ('n_expert', 'n_shared_expert', 'expert_width_mult', 'moe_aux_loss_coef'):
            if getattr(self, key) < 0:
                raise ValueError(f"{key}={getattr(self, key)} must be >= 0")
        if self.n_expert and not 1 <= self.n_expert_active <= self.n_expert:
            raise ValueError(f"n_expert_active={self.n_expert_active} must be in [1, n_expert={self.n_expert}]: "
                             f"each token goes to that many of the experts")
        if not self.n_expert and self.n_shared_expert:
            raise ValueError(f"n_shared_expert={self.n_shared_expert} needs routed experts: set n_expert too")
        if self.mup_base_n_expert and not (self.mup_base_width and self.n_expert):
            raise ValueError(f"mup_base_n_expert={self.mup_base_n_expert} only has a meaning for a mixture "
                             f"of experts under muP: set n_expert and mup_base_width too, or leave it 0")
        if self.mup_base_n_expert and (self.mup_base_n_expert * self.n_expert_active) % self.n_expert:
            raise ValueError(f"mup_base_n_expert={self.mup_base_n_expert}: the base model keeps the active "
                             f"fraction {self.n_expert_active}/{self.n_expert}, so mup_base_n_expert x "
                             f"n_expert_active must be a multiple of n_expert")

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    @property
    def kv_heads(self):
        """The number of key/value heads: n_kv_head, or n_head when it is 0."""
        return self.n_kv_head or self.n_head

    @property
    def mlp_width(self):
        """The MLP's hidden width: 4 n_embd, or 8/3 of it for SwiGLU, whose three matrices
        then hold the parameters of the other two's."""
        if self.mlp == 'swiglu':
            return 8 * self.n_embd // 3
        return 4 * self.n_embd

    @property
    def expert_width(self):
        """Each expert's hidden width (see expert_width_mult)."""
        if self.expert_width_mult:
            return max(1, round(self.expert_width_mult * self.n_embd))
        return max(1, self.mlp_width // (self.n_expert_active + self.n_shared_expert))

    @property
    def base_head_dim(self):
        if not self.mup_base_width:
            return self.head_dim
        return self.mup_base_head_dim or self.mup_base_width // self.n_head

    @property
    def width_mult(self):
        """m = n_embd / mup_base_width; 1 under SP."""
        return self.n_embd / self.mup_base_width if self.mup_base_width else 1.0

    @property
    def depth_mult(self):
        """m_L = n_layer / mup_base_depth; 1 without depth scaling."""
        return self.n_layer / self.mup_base_depth if self.mup_base_depth else 1.0

    def layer_config(self, layer):
        """The config of one layer: its own attn_mod from the list (e.g. 'sliding_window:128,causal'
        alternates local and global layers, as Gemma 2 does)."""
        specs = self.attn_mod.split(',')
        return replace(self, attn_mod=specs[layer % len(specs)])

# -----------------------------------------------------------------------------

class Norm(nn.Module):
    """LayerNorm (GPT-2's) or RMSNorm over the last dim, eps 1e-5; a learned gain unless gain=False
    (nanochat's parameter-free norm), and for LayerNorm a bias with `bias`. Gains and biases are
    muP vectors (docs/mup.md)."""

    def __init__(self, ndim, kind='layernorm', gain=True, bias=False):
        super().__init__()
        self.kind = kind
        self.ndim = ndim
        self.weight = nn.Parameter(torch.ones(ndim)) if gain else None
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias and kind == 'layernorm' else None

    def forward(self, x):
        if self.kind == 'rmsnorm':
            return F.rms_norm(x, (self.ndim,), self.weight, 1e-5)
        return F.layer_norm(x, (self.ndim,), self.weight, self.bias, 1e-5)


def rotary(positions, head_dim, base):
    """The cos and sin (T, 1, head_dim/2) of rotary position embedding's angles (Su et al. 2021)
    at `positions` (T,): position * base^(-2i/head_dim), shaped for (B, T, H, head_dim) inputs.
    GPT.forward computes them once, for q and k of every layer."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.to(torch.float32)[:, None, None] * inv_freq
    return angles.cos(), angles.sin()


def rotate(x, cos, sin):
    """x (B, T, H, D) with each pair (i, i + D/2) turned by rotary(...)'s angles, the half-split
    layout of Llama and nanochat: q.k then depends on the positions only through their difference."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class QKV(nn.Module):
    """nanoGPT's fused c_attn held as three projections (q: n_embd, k and v: n_kv_head heads), so
    that Muon orthogonalizes Q, K and V each on its own, which trains better than orthogonalizing
    the stack (docs/mup.md, Muon). The forward is still one matmul, and the init draws the
    numbers of one fused matrix."""

    def __init__(self, n_embd, kv_dim, bias):
        super().__init__()
        self.q = nn.Linear(n_embd, n_embd, bias=bias)
        self.k = nn.Linear(n_embd, kv_dim, bias=bias)
        self.v = nn.Linear(n_embd, kv_dim, bias=bias)

    def forward(self, x):
        bias = None if self.q.bias is None else torch.cat([self.q.bias, self.k.bias, self.v.bias])
        return F.linear(x, torch.cat([self.q.weight, self.k.weight, self.v.weight]), bias)


class Mask(NamedTuple):
    """The mask a layer attends under in one forward, and the backend it was built for (one of
    BACKENDS): MuPFlexAttention.make_mask builds it, attend hands it to that backend."""
    backend: str
    data: object # 'sdpa': None (SDPA's own causal mask); 'flex': a BlockMask; 'dense': a bool tensor


class MuPFlexAttention(nn.Module):
    """Multi-head causal self-attention whose pattern is a FlexAttention mask_mod and score_mod.

    Subclasses override `mask_mod(b, h, q_idx, kv_idx)` and/or `score_mod(score, b, h, q_idx,
    kv_idx)`; the defaults are the config's attn_mod. `score` arrives already scaled by muP's
    logit scale: never rescale it. Parameters a subclass creates in __init__ are classified by
    shape (mup.classify_params) and get muP's init, learning rate and weight decay, and
    gradients on every backend.

    Layers of one class and attn_mod share the mask of a forward: GPT.forward builds it once,
    from the first of them, so a mask_mod may read data (document ids, a graph) but must not
    differ between those layers. Such a mask is rebuilt at every forward; one that reads only
    positions (the catalog's, or a subclass's that sets `static_mask = True`) is built once per
    sequence length and device and reused.

    The forward is three steps a subclass can reuse (gated_attention.py does): qkv (project,
    QK-norm, rotate, join the KV cache), attend (the backend's kernel), output (the projection).
    """

    # True: this class's own mask_mod reads nothing but the positions and the config, so its
    # mask can be built once and reused. A subclass's mask is taken to read data unless it says so.
    static_mask = False
    # True: this class's own mask_mod and score_mod read positions only through q_idx - kv_idx
    # (a relative bias, a window), so that with RoPE the KV cache may slide past block_size
    relative_mods = False

    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.n_kv_head = config.kv_heads
        self.head_dim = config.head_dim
        self.c_attn = QKV(config.n_embd, config.kv_heads * config.head_dim, config.bias)
        self.q_norm = self.k_norm = None
        if config.qk_norm: # QK-norm (OLMo 2, Qwen3, nanochat): each head's q and k at RMS 1
            self.q_norm = Norm(config.head_dim, 'rmsnorm', config.norm_gain)
            self.k_norm = Norm(config.head_dim, 'rmsnorm', config.norm_gain)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        # GPT-2's scaled init of the projections into the residual stream
        self.c_proj.residual_proj = True
        self.resid_dropout = nn.Dropout(config.dropout)
        self.dropout = config.dropout # dropout of the attention probabilities (flex has none)
        # muP's attention logits scale like 1/d_head, not 1/sqrt(d_head) (docs/mup.md, attention).
        # Written sqrt(d_base) / d_head, it is SP's 1/sqrt(d_head) at the base head dim.
        self.scale = config.mup_attn_mult * math.sqrt(config.base_head_dim) / config.head_dim
        self.attn_mod = config.attn_mod
        self.backend = config.attn_backend
        name, arg = parse_attn_mod(config.attn_mod)
        if ATTN_MODS[name].setup is not None:
            ATTN_MODS[name].setup(self, arg) # the mod's own tensors (ALiBi's slopes)
        if self.backend == 'sdpa' and not self.is_plain_causal():
            raise ValueError(f"attn_backend='sdpa' runs plain causal attention only, but "
                             f"{type(self).__name__} with attn_mod={self.attn_mod!r} has a mask_mod "
                             f"or score_mod: use attn_backend='auto', 'flex' or 'dense'")

    @property
    def pattern(self):
        """What layers that share a mask have in common: the class and the attn_mod string."""
        return (type(self), self.attn_mod)

    def overrides(self, name):
        """Whether this module's class replaces MuPFlexAttention's method `name` (a mod, say)."""
        return getattr(type(self), name) is not getattr(MuPFlexAttention, name)

    def catalog_mods(self):
        """The Mods (mask_mod, score_mod) of this module's attn_mod string."""
        name, arg = parse_attn_mod(self.attn_mod)
        return ATTN_MODS[name].build(self, arg)

    def mask_mod(self, b, h, q_idx, kv_idx):
        return self.catalog_mods().mask_mod(b, h, q_idx, kv_idx)

    def score_mod(self, score, b, h, q_idx, kv_idx):
        return self.catalog_mods().score_mod(score, b, h, q_idx, kv_idx)

    def has_score_mod(self):
        """False only where scores pass unchanged: no score_mod override, none in the catalog."""
        return self.overrides('score_mod') or self.catalog_mods().score_mod is not None

    def mask_reads_data(self):
        """Whether the mask must be rebuilt at every forward: a subclass's own mask_mod or
        make_mask may read tensors it was given (document ids, a graph), unless the class sets
        static_mask = True. The catalog's masks read only positions."""
        own_mask = self.overrides('mask_mod') or self.overrides('make_mask')
        return own_mask and not type(self).static_mask

    def relative_positions(self):
        """Whether the mask and the score depend on positions only through q_idx - kv_idx, so that
        with RoPE a full KV cache can slide (generate.py). The catalog's do, but prefix_lm's; a
        subclass's own mask_mod or score_mod is taken not to, unless the class sets
        relative_mods = True."""
        own_mods = self.overrides('mask_mod') or self.overrides('score_mod')
        if own_mods and not type(self).relative_mods:
            return False
        name, _ = parse_attn_mod(self.attn_mod)
        return ATTN_MODS[name].relative

    def is_plain_causal(self):
        """Causal attention with nothing added: what SDPA's fused kernels compute."""
        causal_mask = not self.overrides('mask_mod') and self.catalog_mods().mask_mod is causal
        return causal_mask and not self.has_score_mod()

    def active_score_mod(self, q_offset=0):
        """The score_mod as a plain function (flex rejects bound methods), or None if none. Its
        q_idx is the query's position in the sequence: q_offset past the index flex passes when
        the queries follow cached keys."""
        if not self.has_score_mod():
            return None
        def score_mod(score, b, h, q_idx, kv_idx):
            return self.score_mod(score, b, h, q_idx + q_offset, kv_idx)
        return score_mod

    def resolve_backend(self, device):
        """The name of the backend (a key of BACKENDS) this layer runs on `device`. 'auto':
        SDPA's fused kernels for plain causal attention; else flex on CUDA, and the dense
        reference elsewhere (flex has no backward on CPU). 'sdpa' was checked in __init__."""
        if self.backend != 'auto':
            return self.backend
        if self.is_plain_causal():
            return 'sdpa'
        if device.type == 'cuda':
            return 'flex'
        return 'dense'

    def make_mask(self, B, T, device, q_offset=0):
        """The Mask of B sequences of T queries at positions q_offset.. over the keys 0 .. q_offset
        + T - 1 (q_offset > 0: decoding after cached keys), for this layer's backend on `device`.
        B=None: one mask for every sequence (a mask that reads no data)."""
        backend = self.resolve_backend(device)
        return Mask(backend, BACKENDS[backend].make_mask(self, B, T, device, q_offset))

    def attend(self, q, k, v, mask):
        """q: (B, n_head, Tq, head_dim), k and v: (B, n_kv_head, Tk, head_dim) -> like q; the
        queries are the last Tq positions of the keys (Tk > Tq after cached keys); mask from
        make_mask, whose backend runs it."""
        dropout_p = self.dropout if self.training else 0.0
        return BACKENDS[mask.backend].attend(self, q, k, v, mask.data, dropout_p)

    def qkv(self, x, rope=None, kv_cache=None):
        """The queries (B, n_head, T, head_dim), keys and values (B, n_kv_head, T, head_dim) of x
        (B, T, n_embd): QK-normed where the config says so, rotated by `rope` (the (cos, sin) of
        x's positions, which GPT.forward computes once for every layer); with a KV cache the keys
        and values of the cached positions come first."""
        B, T, C = x.size() # batch size, sequence length, embedding dimensionality (n_embd)
        kv_dim = self.n_kv_head * self.head_dim
        q, k, v = self.c_attn(x).split([C, kv_dim, kv_dim], dim=2)
        q = q.view(B, T, self.n_head, self.head_dim)
        k = k.view(B, T, self.n_kv_head, self.head_dim)
        v = v.view(B, T, self.n_kv_head, self.head_dim)
        # normed and rotated before the transpose, on contiguous rows: the modern step 1.115 -> 1.098x
        # GPT-2's (docs/mup-study.md, the modern block)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = rotate(q, *rope), rotate(k, *rope)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2) # (B, nh or n_kv, T, hs)
        if kv_cache is not None:
            k, v = kv_cache.append(k, v) # this layer's keys and values so far, the new ones last
        return q, k, v

    def output(self, y):
        """The head outputs y (B, n_head, T, head_dim) side by side, projected into the residual
        stream (B, T, n_embd)."""
        B, _, T, _ = y.size()
        y = y.transpose(1, 2).contiguous().view(B, T, -1) # re-assemble all head outputs side by side
        return self.resid_dropout(self.c_proj(y))

    def forward(self, x, mask, rope=None, kv_cache=None):
        q, k, v = self.qkv(x, rope, kv_cache)
        y = self.attend(q, k, v, mask)
        return self.output(y)

# ---- the attention backends: how each builds a layer's mask and attends under it

def sdpa_mask(attn, B, T, device, q_offset):
    return None # SDPA's own causal mask (attend puts queries after cached keys at their place)


def sdpa_attend(attn, q, k, v, mask, dropout_p):
    """Plain causal attention in SDPA's fused kernels."""
    Tq, Tk = q.size(2), k.size(2)
    gqa = attn.n_kv_head != attn.n_head # SDPA reads each key/value head n_head / n_kv_head times
    if Tq == Tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=attn.scale,
                                              dropout_p=dropout_p, enable_gqa=gqa)
    # is_causal aligns the mask's top-left corners: a query after cached keys would see only the
    # first keys. Its position is at the bottom right.
    lower_right = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(Tk - Tq)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=lower_right, scale=attn.scale,
                                          dropout_p=dropout_p, enable_gqa=gqa)


def flex_mask(attn, B, T, device, q_offset):
    """A BlockMask; one for every head (H=None) where the mask_mod is the catalog's, which reads
    no head."""
    def mask_mod(b, h, q_idx, kv_idx): # flex counts queries from 0: add their offset
        return attn.mask_mod(b, h, q_idx + q_offset, kv_idx)
    H = attn.n_head if attn.overrides('mask_mod') else None
    return create_block_mask(mask_mod, B, H, T, q_offset + T, device=device)


def flex_attend(attn, q, k, v, block_mask, dropout_p):
    """flex_attention with the score_mod; its fused kernel on CUDA (no dropout: flex has none)."""
    Tq, Tk = q.size(2), k.size(2)
    if q.device.type == 'cuda' and Tq == Tk:
        flex = compiled_flex_attention()
    else:
        # eager off CUDA, and for queries after cached keys: their key length changes at every
        # decoding step, which would recompile the fused kernel each time, and one row of scores
        # per query is small enough to materialize
        flex = flex_attention
    return flex(q, k, v, score_mod=attn.active_score_mod(Tk - Tq), block_mask=block_mask,
                scale=attn.scale, enable_gqa=attn.n_kv_head != attn.n_head)


@functools.cache
def compiled_flex_attention():
    """flex_attention only becomes a fused kernel under torch.compile; compiled once, lazily."""
    return torch.compile(flex_attention, dynamic=False)


def dense_mask_of(attn, B, T, device, q_offset):
    """A boolean tensor that drops each dim it does not vary along (causal: (1, 1, T, T))."""
    mask_mod = lambda b, h, q_idx, kv_idx: attn.mask_mod(b, h, q_idx, kv_idx)
    return dense_mask(mask_mod, B or 1, attn.n_head, T, device, q_offset)


def dense_attend(attn, q, k, v, mask, dropout_p):
    """The reference that trains anywhere: flex's semantics in plain tensor ops (attn_mods.py)."""
    return dense_attention(q, k, v, mask, attn.active_score_mod(), attn.scale, dropout_p)


class Backend(NamedTuple):
    """How one attention backend builds a layer's mask and attends under it."""
    make_mask: Callable # (attn, B, T, device, q_offset) -> the mask's data
    attend: Callable # (attn, q, k, v, the mask's data, dropout_p) -> the head outputs


# the attn_backend settings but 'auto', which MuPFlexAttention.resolve_backend turns into one
BACKENDS = {'sdpa': Backend(sdpa_mask, sdpa_attend), 'flex': Backend(flex_mask, flex_attend),
            'dense': Backend(dense_mask_of, dense_attend)}


class ReLUSquared(nn.Module):
    """relu(x)^2 (So et al. 2021, Primer; nanochat, modded-nanogpt)."""

    def forward(self, x):
        return F.relu(x).square()


def activation(mlp):
    """The nonlinearity of an MLP setting (SwiGLU's is the SiLU of its gate)."""
    if mlp == 'swiglu':
        return nn.SiLU()
    if mlp == 'relu2':
        return ReLUSquared()
    return nn.GELU(approximate='tanh' if mlp == 'gelu_tanh' else 'none')


class MLP(nn.Module):
    """GPT-2's MLP (GELU, exact or tanh's), ReLU^2, or SwiGLU (Shazeer 2020): silu(x W_gate) * (x W_fc), at the
    width config.mlp_width (or `width`). Every matrix is muP-hidden: its fan-in and fan-out grow with width."""

    def __init__(self, config, width=None):
        super().__init__()
        width = width or config.mlp_width
        self.c_fc = nn.Linear(config.n_embd, width, bias=config.bias)
        self.c_gate = None
        if config.mlp == 'swiglu':
            self.c_gate = nn.Linear(config.n_embd, width, bias=config.bias)
        self.act = activation(config.mlp)
        self.c_proj = nn.Linear(width, config.n_embd, bias=config.bias)
        self.c_proj.residual_proj = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        if self.c_gate is not None:
            h = self.act(self.c_gate(x)) * self.c_fc(x)
        else:
            h = self.act(self.c_fc(x))
        return self.dropout(self.c_proj(h))


class MoE(nn.Module):
    """A mixture of experts in place of the MLP: token-choice top-k routing over n_expert MLPs
    of config.expert_width, plus n_shared_expert experts every token goes through (one MLP of
    their summed width). A token's output is the sum of its k experts' outputs weighted by the
    router's softmax over those k (the softmax over all experts, renormalised over the chosen:
    Mixtral's and Qwen3-MoE's), plus the shared experts'.

    muP by shape, no names (mup.classify_params): each expert matrix is stored as (n_expert,
    fan_out, fan_in), a Linear's weight per expert, with fan_in_dim = 2: its fan-in and fan-out
    grow with width, so it is hidden; the router, Linear(n_embd, n_expert), has only its fan-in
    growing: an output weight (init sigma / m, lr / m), so its logits stay O(1) as width grows.

    Dispatch without a per-token loop: the (token, expert) pairs are sorted by expert and packed
    into an (n_expert, capacity, n_embd) batch (capacity: the busiest expert's count, the rest
    zero-padded), which three batched matmuls run through every expert at once. Experts have no
    biases. Balance: Switch's auxiliary loss (Fedus et al. 2021), n_expert * sum_i f_i P_i with
    f_i the share of the routed pairs that went to expert i and P_i its mean router probability
    (1 when balanced), kept in `aux_loss`; GPT.forward adds it, x moe_aux_loss_coef, to the
    training loss. Chosen over DeepSeek-V3's bias balancing because it lives in the loss: no state
    outside the weights, nothing for the training loop, DDP or FSDP to update."""

    def __init__(self, config):
        super().__init__()
        n, width, d = config.n_expert, config.expert_width, config.n_embd
        self.n_expert_active = config.n_expert_active
        self.router = nn.Linear(d, n, bias=False)
        self.expert_fc = nn.Parameter(torch.empty(n, width, d))
        self.expert_gate = nn.Parameter(torch.empty(n, width, d)) if config.mlp == 'swiglu' else None
        self.expert_proj = nn.Parameter(torch.empty(n, d, width))
        for p in self.expert_weights():
            p.fan_in_dim = 2 # x @ W[e].T, as a Linear's (fan_out, fan_in) weight
        # a function, not a submodule: its output is the zero-padded packed batch, whose size
        # changes every step, which no forward hook (a coordinate check) should read
        self.act = activation(config.mlp).forward
        self.shared = MLP(config, config.n_shared_expert * width) if config.n_shared_expert else None
        self.dropout = nn.Dropout(config.dropout)
        # what the last forward's routing was (train.py prints them at each eval: the balance plot)
        self.aux_loss = None
        self.load = None # the routed pairs per expert
        self.probs = None # the router's probabilities per token (routing() reads their entropy)

    def expert_weights(self):
        """The routed experts' matrices (the gate's only with SwiGLU)."""
        return [p for p in (self.expert_fc, self.expert_gate, self.expert_proj) if p is not None]

    def experts(self, x):
        """Every routed expert on its own rows: x (n_expert, rows, n_embd) -> (n_expert, rows,
        n_embd), x[e] through expert e (three batched matmuls)."""
        h = x @ self.expert_fc.mT
        if self.expert_gate is not None:
            h = self.act(x @ self.expert_gate.mT) * h
        else:
            h = self.act(h)
        return h @ self.expert_proj.mT

    def forward(self, x):
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        n_tokens, k = tokens.size(0), self.n_expert_active
        probs = self.router(tokens).float().softmax(-1) # (tokens, n_expert)
        weights, chosen = probs.topk(k, dim=-1)
        weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)
        expert = chosen.reshape(-1) # the (token, expert) pairs, token-major
        counts = torch.bincount(expert, minlength=probs.size(-1))
        self.load, self.probs = counts.detach(), probs.detach()
        share = counts.float() / expert.numel()
        self.aux_loss = probs.size(-1) * (share * probs.mean(0)).sum()
        # pack the pairs by expert: pair j of expert e goes to row e, slot j
        order = expert.argsort(stable=True)
        by_expert = expert[order]
        slot = torch.arange(order.numel(), device=x.device) - (counts.cumsum(0) - counts)[by_expert]
        token = order // k
        packed = tokens.new_zeros(probs.size(-1), int(counts.max()), shape[-1])
        packed[by_expert, slot] = tokens[token]
        out = self.experts(packed)[by_expert, slot] * weights.reshape(-1)[order, None]
        y = tokens.new_zeros(n_tokens, shape[-1]).index_add_(0, token, out).reshape(shape)
        if self.shared is not None:
            y = y + self.shared(x)
        return self.dropout(y)


class Block(nn.Module):

    def __init__(self, config, attn_cls):
        super().__init__()
        self.ln_1 = Norm(config.n_embd, config.norm, config.norm_gain, config.bias)
        self.attn = attn_cls(config)
        self.ln_2 = Norm(config.n_embd, config.norm, config.norm_gain, config.bias)
        self.mlp = MoE(config) if config.n_expert else MLP(config)
        # CompleteP: each residual branch x m_L^-alpha, so that the residual stream's update stays
        # the same size as depth grows (docs/mup.md, depth); 1 without depth scaling
        self.residual_mult = config.depth_mult ** -config.mup_depth_alpha

    def forward(self, x, mask, rope=None, kv_cache=None):
        x = x + self.residual_mult * self.attn(self.ln_1(x), mask, rope, kv_cache)
        x = x + self.residual_mult * self.mlp(self.ln_2(x))
        return x

# -----------------------------------------------------------------------------

class Readout(nn.Linear):
    """The readout, logits = output_mult / m * (x W^T): muP's output multiplier in the forward
    (microsoft/mup's MuReadout; docs/mup.md), so that no path to logits can miss it and a
    forward hook on it (the coordinate check) sees the logits. Its weight keeps the init and lr of
    the base width ('readout'): the 1/m is here, never a second time in the init or the lr."""

    def __init__(self, in_features, out_features, output_mult, width_mult):
        super().__init__(in_features, out_features, bias=False)
        self.output_mult = output_mult
        self.width_mult = width_mult

    def forward(self, x):
        # muP's readout multiplier output_mult / m (docs/mup.md, per-parameter rules)
        return super().forward(x) * (self.output_mult / self.width_mult)


def check_attn_cls(spec):
    """(where, class name) of an attn_cls setting other than '': 'path/to/file.py:ClassName' (a
    path relative to the working directory, or absolute; the file must exist) or
    'module:ClassName'. A ValueError names what is wrong with its form. Nothing is imported."""
    if not spec:
        return None
    where, _, class_name = spec.rpartition(':')
    if not where or not class_name.isidentifier():
        raise ValueError(f"attn_cls={spec!r}: write 'path/to/file.py:ClassName' or "
                         f"'module:ClassName'")
    if where.endswith('.py') and not os.path.isfile(where):
        raise ValueError(f"attn_cls={spec!r}: {where} not found (from {os.getcwd()}); give its "
                         f"path from the working directory, or an absolute one")
    return where, class_name


def load_attn_cls(spec):
    """The attention class that an attn_cls setting names (check_attn_cls); '' is
    MuPFlexAttention. A file is imported once per absolute path. A ValueError names what is
    wrong: the spec's form, a missing file, a failed import, a missing class, or a class that is
    not a MuPFlexAttention subclass."""
    if not spec:
        return MuPFlexAttention
    where, class_name = check_attn_cls(spec)
    try:
        module = import_module_or_file(os.path.abspath(where) if where.endswith('.py') else where)
    except Exception as e: # the user's file, not our code: name it and what it raised
        raise ValueError(f"attn_cls={spec!r}: importing {where} failed ({type(e).__name__}: "
                         f"{e})") from None
    attn_cls = getattr(module, class_name, None)
    if attn_cls is None:
        raise ValueError(f"attn_cls={spec!r}: {where} has no {class_name}")
    if not (isinstance(attn_cls, type) and issubclass(attn_cls, MuPFlexAttention)):
        raise ValueError(f"attn_cls={spec!r}: {class_name} is not a subclass of "
                         f"model.MuPFlexAttention")
    return attn_cls


@functools.cache
def import_module_or_file(name):
    """An importable module by name, or a Python file by its absolute path, imported once."""
    if not name.endswith('.py'):
        return importlib.import_module(name)
    module_spec = importlib.util.spec_from_file_location(os.path.basename(name)[:-3], name)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


class GPT(nn.Module):

    def __init__(self, config, attn_cls=None, _shapes_only=False):
        """attn_cls: the attention class, a MuPFlexAttention subclass (or a functools.partial of
        one); None: the one config.attn_cls names (MuPFlexAttention by default), which is what a
        checkpoint records."""
        super().__init__()
        self.config = config
        if attn_cls is None:
            attn_cls = load_attn_cls(config.attn_cls)
        self.attn_cls = attn_cls
        self.transformer = nn.ModuleDict(dict(wte=nn.Embedding(config.vocab_size, config.n_embd)))
        if config.pos_emb == 'learned': # GPT-2's absolute positions; RoPE rotates q and k instead
            self.transformer.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.transformer.drop = nn.Dropout(config.dropout)
        self.transformer.h = nn.ModuleList([Block(config.layer_config(i), attn_cls)
                                            for i in range(config.n_layer)])
        self.transformer.ln_f = Norm(config.n_embd, config.norm, config.norm_gain, config.bias)
        self.lm_head = Readout(config.n_embd, config.vocab_size, config.mup_output_mult,
                               config.width_mult)
        if config.tie_weights:
            # https://paperswithcode.com/method/weight-tying
            self.transformer.wte.weight = self.lm_head.weight
        # masks that read no data, by (pattern, length, device): built once, never stale (mask_for)
        self.static_masks = {}
        if _shapes_only: # a throwaway model on the meta device, only read for its parameter shapes
            return
        self.mup_param_info = mup.classify_params(self) # each parameter's muP class, by shape
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self):
        c = self.config
        # GPT-2's residual projections / sqrt(2 L), with the base depth's L under CompleteP, so
        # that the init does not change with depth (docs/mup.md, depth)
        residual_std = c.init_std / math.sqrt(2 * (c.mup_base_depth or c.n_layer))
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                std = residual_std if getattr(module, 'residual_proj', False) else c.init_std
                torch.nn.init.normal_(module.weight, mean=0.0, std=std)
                if getattr(module, 'bias', None) is not None:
                    torch.nn.init.zeros_(module.bias)
            elif isinstance(module, MoE): # each expert as the dense MLP's matrices
                for p in module.expert_weights():
                    torch.nn.init.normal_(p, mean=0.0, std=residual_std if p is module.expert_proj else c.init_std)
        if not c.tie_weights:
            # docs/mup.md: an untied readout starts at zero (SP too)
            torch.nn.init.zeros_(self.lm_head.weight)
        # muP: hidden matrices sigma / sqrt(m), output weights sigma / m (mup.RULES)
        mup.scale_init(self)

    def get_num_params(self, non_embedding=True, active=False):
        """
        Return the number of parameters in the model.
        For non-embedding count (default), the position embeddings get subtracted.
        The token embeddings would too, except due to the parameter sharing these
        params are actually used as weights in the final layer, so we include them.
        active: those a token goes through, n_expert_active of the n_expert routed experts.
        """
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding and 'wpe' in self.transformer:
            n_params -= self.transformer.wpe.weight.numel()
        cfg = self.config
        if active and cfg.n_expert:
            routed = sum(p.numel() for block in self.transformer.h for p in block.mlp.expert_weights())
            n_params -= routed * (1 - cfg.n_expert_active / cfg.n_expert)
        return n_params

    def forward(self, idx, targets=None, kv_cache=None):
        """idx (b, t) -> logits and the loss; without targets the logits of the last position
        only. With a KVCache, idx holds the positions after the cached ones, which it joins."""
        b, t = idx.size()
        start = 0 # the position of idx's first token
        if kv_cache is not None:
            start = kv_cache.length
        if start + t > self.config.block_size:
            raise ValueError(f"Cannot forward sequence of length {start + t}, block size is only "
                             f"{self.config.block_size}")
        pos = torch.arange(start, start + t, dtype=torch.long, device=idx.device) # shape (t)

        x = self.transformer.wte(idx) # token embeddings of shape (b, t, n_embd)
        if 'wpe' in self.transformer:
            x = x + self.transformer.wpe(pos) # position embeddings of shape (t, n_embd)
        # muP's input multiplier: a constant tuned at the base width (docs/mup.md)
        x = self.transformer.drop(self.config.mup_input_mult * x)
        rope = None # RoPE's angles at idx's true positions, computed once for every layer
        if self.config.pos_emb == 'rope':
            first = start if kv_cache is None else kv_cache.position # a sliding cache dropped some
            rope = rotary(torch.arange(first, first + t, device=idx.device), self.config.head_dim,
                          self.config.rope_base)
        masks = {} # one mask per attention pattern, built once and passed to its layers
        for i, block in enumerate(self.transformer.h):
            pattern = block.attn.pattern
            if pattern not in masks:
                masks[pattern] = self.mask_for(block.attn, b, t, idx.device, start)
            layer_cache = None
            if kv_cache is not None:
                layer_cache = kv_cache.layer(i)
            x = block(x, masks[pattern], rope, layer_cache)
        if kv_cache is not None:
            kv_cache.length += t
        x = self.transformer.ln_f(x)

        if targets is not None:
            # if we are given some desired targets also calculate the loss
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1),
                                   ignore_index=-1)
            if self.training and self.config.n_expert: # the experts' load balance (MoE)
                loss = loss + self.config.moe_aux_loss_coef * sum(block.mlp.aux_loss for block in self.transformer.h)
        else:
            # inference-time mini-optimization: only forward the lm_head on the very last position
            logits = self.lm_head(x[:, [-1], :]) # note: using list [-1] to preserve the time dim
            loss = None
        return logits, loss

    def mask_for(self, attn, B, T, device, q_offset=0):
        """attn's mask for a forward of B sequences of T tokens: built anew if it reads data, so
        it is never stale; else built once per length and device, for every batch, and kept.
        Decoding steps (q_offset > 0) build theirs, one query row, each step."""
        if attn.mask_reads_data():
            return attn.make_mask(B, T, device, q_offset)
        if q_offset > 0:
            return attn.make_mask(None, T, device, q_offset)
        key = (*attn.pattern, T, str(device))
        if key not in self.static_masks:
            self.static_masks[key] = attn.make_mask(None, T, device)
        return self.static_masks[key]

    def crop_block_size(self, block_size):
        # model surgery, e.g. to use a checkpoint of block size 1024 with a smaller block size
        if block_size > self.config.block_size:
            raise ValueError(f"crop_block_size({block_size}): the model's block size is only "
                             f"{self.config.block_size}")
        self.config = replace(self.config, block_size=block_size)
        if 'wpe' in self.transformer:
            self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type, eps=1e-8,
                             optimizer='adamw', muon_lr_mult=1.0, muon_momentum=0.95):
        """nanoGPT's call: AdamW (or Muon for the hidden matrices and AdamW for the rest) over
        one param group per muP treatment, as mup.configure_optimizers builds them."""
        return mup.configure_optimizers(self, weight_decay, learning_rate, betas, device_type, eps,
                                        optimizer, muon_lr_mult, muon_momentum)

    def routing(self):
        """[(router entropy / log n_expert, the busiest expert's share of the routed pairs x
        n_expert)] per block, of the last forward: (1, 1) is uniform routing and a perfect balance."""
        def entropy(probs): # the mean over tokens, / log n_expert
            return (-(probs * probs.clamp_min(1e-30).log()).sum(-1).mean() / math.log(probs.size(-1))).item()
        moes = [block.mlp for block in self.transformer.h]
        return [(entropy(moe.probs), (moe.load.max() / moe.load.float().mean()).item()) for moe in moes]

    def estimate_mfu(self, fwdbwd_per_iter, dt, peak_flops=312e12):
        """Model flops utilization against `peak_flops` (see device_peak_flops)."""
        # first estimate the number of flops we do per iteration, as the PaLM paper's Appendix B.
        # N counts the weights that enter a matmul: not wpe, nor an untied wte (lookups, no
        # FLOPs); a tied wte is the readout's matrix.
        N = self.get_num_params(active=True) # a token's matmuls: n_expert_active of the routed experts
        if not self.config.tie_weights:
            N -= self.transformer.wte.weight.numel()
        cfg = self.config
        L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head, cfg.block_size
        flops_per_token = 6 * N + 12 * L * H * Q * T # the matmuls, then attention's q.k and a.v
        flops_per_fwdbwd = flops_per_token * T
        flops_per_iter = flops_per_fwdbwd * fwdbwd_per_iter
        flops_achieved = flops_per_iter / dt # per second
        return flops_achieved / peak_flops

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, kv_cache=True):
        """Complete idx (b, t) by max_new_tokens tokens; temperature=0 is greedy. Use model.eval().
        kv_cache=True: generate.py's decoding, one token a step against the cached keys and values
        of the ones before it (O(T) per token; its docstring says what happens past block_size).
        kv_cache=False: the reference it must equal, nanoGPT's loop below, which runs the whole
        context, cropped to its last block_size tokens, at every step (O(T^2))."""
        if kv_cache:
            return generate.generate(self, idx, max_new_tokens, temperature, top_k)
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.config.block_size:])
            idx_next = generate.sample(logits[:, -1, :], temperature, top_k)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx
