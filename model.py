"""
A GPT language model with one switch between the standard parameterization (SP) and the
Maximal Update Parameterization (muP), and attention written as FlexAttention mods.

- `mup_base_width = 0` is plain nanoGPT. `mup_base_width > 0` is muP relative to a model of
  that width: `GPT._classify_params` decides each parameter's treatment (init, learning rate,
  weight decay) and three forward multipliers do the rest (input, attention logits, readout).
  docs/mup.md states the rules, the invariants the tests check, and the papers behind them.
- An attention pattern is a `mask_mod(b, h, q_idx, kv_idx)` and a
  `score_mod(score, b, h, q_idx, kv_idx)`, as in torch.nn.attention.flex_attention. Subclass
  `MuPFlexAttention`, override them, and muP stays correct without further work.

References: karpathy/nanoGPT (layout), microsoft/mup (MuReadout, set_base_shapes),
meta-pytorch/attention-gym (the mods catalog, in attn_mods.py).
"""

import functools
import inspect
import math
import time
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from attn_mods import ATTN_MODS, alibi_slopes, causal, dense_attention, dense_mask, parse_attn_mod

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
    # muP (docs/mup.md): 0 = SP; otherwise the width the hyperparameters were tuned at
    mup_base_width: int = 0
    mup_base_head_dim: int = 0 # 0: mup_base_width // n_head (widening keeps n_head, nanoGPT's habit)
    # muTransfer hyperparameters: tuned at the base width, kept when widening
    init_std: float = 0.02
    mup_input_mult: float = 1.0
    mup_output_mult: float = 1.0
    mup_attn_mult: float = 1.0
    mup_scale_weight_decay: bool = True # hidden weight decay * m, so that lr * wd does not change with width
    mup_hidden_lr_exponent: float = 1.0 # hidden lr / m**exponent: 1 is muP; others only for lr_transfer.py --causes
    # depth muP (CompleteP, docs/mup.md): 0 = off; otherwise the depth the hyperparameters were tuned at
    mup_base_depth: int = 0
    mup_depth_alpha: float = 1.0 # residual branches x (n_layer / mup_base_depth)^-alpha: 1 = CompleteP, 0.5 = depth-muP
    tie_weights: bool = True # lm_head shares wte; untied, the readout starts at zero
    attn_mod: str = 'causal' # an ATTN_MODS string, or a comma-separated list cycled over the layers
    attn_backend: str = 'auto' # 'auto' | 'sdpa' | 'flex' | 'dense'

    def __post_init__(self):
        c = self
        rules = [(getattr(c, k) > 0, f"{k}={getattr(c, k)} must be positive")
                 for k in ('block_size', 'vocab_size', 'n_layer', 'n_head', 'n_embd')] + [
            (0.0 <= c.dropout < 1.0, f"dropout={c.dropout} must be in [0, 1)"),
            (c.n_embd % c.n_head == 0, f"n_embd={c.n_embd} is not divisible by n_head={c.n_head}: pick a multiple"),
            (min(c.mup_base_width, c.mup_base_head_dim, c.mup_base_depth) >= 0,
             "mup_base_width, mup_base_head_dim and mup_base_depth must be >= 0 (0 = off / derived)"),
            (0.5 <= c.mup_depth_alpha <= 1.0, f"mup_depth_alpha={c.mup_depth_alpha}: must be in [0.5, 1] (1 = CompleteP)"),
            (c.mup_base_width or not c.mup_base_head_dim, f"mup_base_head_dim={c.mup_base_head_dim} only has a "
             f"meaning under muP: set mup_base_width too, or leave mup_base_head_dim=0"),
            (c.mup_base_head_dim or c.mup_base_width % c.n_head == 0, f"mup_base_width={c.mup_base_width} is not "
             f"divisible by n_head={c.n_head}: the base model keeps n_head heads; set mup_base_head_dim to its head dim"),
            (c.attn_backend in ('auto', 'sdpa', 'flex', 'dense'), f"attn_backend={c.attn_backend!r}: use 'auto', "
             f"'sdpa', 'flex' or 'dense'"),
        ]
        for ok, problem in rules:
            if not ok:
                raise ValueError(problem)
        if self.mup_base_width % self.base_head_dim:
            raise ValueError(f"mup_base_width={self.mup_base_width} is not a multiple of "
                             f"mup_base_head_dim={self.mup_base_head_dim}")
        for spec in self.attn_mod.split(','):
            parse_attn_mod(spec)

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

class LayerNorm(nn.Module):
    """ LayerNorm but with an optional bias. PyTorch doesn't support simply bias=False """

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, input):
        return F.layer_norm(input, self.weight.shape, self.weight, self.bias, 1e-5)


class QKV(nn.Module):
    """nanoGPT's fused c_attn held as three (n_embd, n_embd) projections, so that Muon orthogonalizes
    Q, K and V each on its own, which trains better than orthogonalizing the stack (docs/mup.md,
    Muon). The forward is still one matmul, and the init draws the numbers of one fused matrix."""

    def __init__(self, n_embd, bias):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(n_embd, n_embd, bias=bias) for _ in range(3))

    def forward(self, x):
        bias = None if self.q.bias is None else torch.cat([self.q.bias, self.k.bias, self.v.bias])
        return F.linear(x, torch.cat([self.q.weight, self.k.weight, self.v.weight]), bias)


class MuPFlexAttention(nn.Module):
    """Multi-head causal self-attention whose pattern is a FlexAttention mask_mod and score_mod.

    Subclasses override `mask_mod(b, h, q_idx, kv_idx)` and/or `score_mod(score, b, h, q_idx,
    kv_idx)`; the defaults are the config's attn_mod. `score` arrives already scaled by muP's
    logit scale: never rescale it. Parameters a subclass creates in __init__ are classified by
    shape (GPT._classify_params) and get muP's init, learning rate and weight decay, and gradients
    on every backend. Layers of one class and attn_mod share the mask of a forward: GPT.forward
    builds it once, from the first of them, so a mask_mod may read data (document ids, a graph)
    but must not differ between those layers.
    """

    def __init__(self, config):
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.head_dim
        self.c_attn = QKV(config.n_embd, config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.residual_proj = True # GPT-2's scaled init of the projections into the residual stream
        self.resid_dropout = nn.Dropout(config.dropout)
        self.dropout = config.dropout # attention-probability dropout (sdpa and dense; flex has none)
        # muP's attention logits scale like 1/d_head, not 1/sqrt(d_head) (docs/mup.md, attention).
        # Written sqrt(d_base) / d_head, it is SP's 1/sqrt(d_head) at the base head dim.
        self.scale = config.mup_attn_mult * math.sqrt(config.base_head_dim) / config.head_dim
        self.attn_mod, self.backend = config.attn_mod, config.attn_backend
        name, arg = parse_attn_mod(config.attn_mod)
        if name == 'alibi' and arg == 'learned':
            self.alibi_slopes = nn.Parameter(alibi_slopes(config.n_head)) # one per head: a 'vector' to muP
        elif name == 'alibi':
            self.register_buffer('alibi_slopes', alibi_slopes(config.n_head), persistent=False)

    def catalog_mods(self):
        """(mask_mod, score_mod or None) of this module's attn_mod."""
        name, arg = parse_attn_mod(self.attn_mod)
        return ATTN_MODS[name][0](self, arg)

    def mask_mod(self, b, h, q_idx, kv_idx):
        return self.catalog_mods()[0](b, h, q_idx, kv_idx)

    def score_mod(self, score, b, h, q_idx, kv_idx):
        return self.catalog_mods()[1](score, b, h, q_idx, kv_idx)

    def active_score_mod(self):
        """The score_mod as a plain function (flex rejects bound methods), or None if there is none."""
        if type(self).score_mod is MuPFlexAttention.score_mod and self.catalog_mods()[1] is None:
            return None
        return lambda score, b, h, q_idx, kv_idx: self.score_mod(score, b, h, q_idx, kv_idx)

    def resolve_backend(self, device):
        """'auto': SDPA's fused kernels for plain causal attention; else flex on CUDA, and the dense
        reference elsewhere (flex has no backward on CPU)."""
        plain_causal = (type(self).mask_mod is MuPFlexAttention.mask_mod and self.catalog_mods()[0] is causal
                        and self.active_score_mod() is None)
        if self.backend == 'sdpa' and not plain_causal:
            raise ValueError("attn_backend='sdpa' runs plain causal attention only, but this layer has a "
                             "mask_mod or score_mod of its own: use 'auto', 'flex' or 'dense'")
        if self.backend != 'auto':
            return self.backend
        return 'sdpa' if plain_causal else 'flex' if device.type == 'cuda' else 'dense'

    def make_mask(self, B, T, device):
        """The mask of B sequences of T tokens for this layer's backend: None (SDPA), BlockMask, bool tensor."""
        backend = self.resolve_backend(device)
        if backend == 'sdpa':
            return None
        mask_mod = lambda b, h, q_idx, kv_idx: self.mask_mod(b, h, q_idx, kv_idx)
        if backend == 'flex':
            return create_block_mask(mask_mod, B, self.n_head, T, T, device=device)
        return dense_mask(mask_mod, B, self.n_head, T, device)

    def attend(self, q, k, v, mask):
        """q, k, v: (B, n_head, T, head_dim) -> (B, n_head, T, head_dim); mask from make_mask."""
        dropout_p = self.dropout if self.training else 0.0
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, dropout_p=dropout_p)
        if isinstance(mask, BlockMask):
            flex = compiled_flex_attention() if q.device.type == 'cuda' else flex_attention
            return flex(q, k, v, score_mod=self.active_score_mod(), block_mask=mask, scale=self.scale)
        return dense_attention(q, k, v, mask, self.active_score_mod(), self.scale, dropout_p)

    def forward(self, x, mask):
        B, T, C = x.size()
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in self.c_attn(x).split(C, dim=2))
        y = self.attend(q, k, v, mask).transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))

@functools.cache
def compiled_flex_attention():
    """flex_attention only becomes a fused kernel under torch.compile; compiled once, lazily."""
    return torch.compile(flex_attention, dynamic=False)


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.residual_proj = True
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
        # CompleteP: each residual branch x m_L^-alpha, so that the residual stream's update stays
        # the same size as depth grows (docs/mup.md, depth); 1 without depth scaling
        self.residual_mult = config.depth_mult ** -config.mup_depth_alpha

    def forward(self, x, mask):
        x = x + self.residual_mult * self.attn(self.ln_1(x), mask)
        x = x + self.residual_mult * self.mlp(self.ln_2(x))
        return x

# -----------------------------------------------------------------------------

def set_lr(optimizer, lr):
    """Every param group at lr times its muP lr_scale: how the schedule meets muP, in one place."""
    for group in optimizer.param_groups:
        group['lr'] = lr * group['lr_scale']


class Optimizers:
    """Several optimizers used as one (Muon for the hidden matrices, AdamW for the rest): the
    training loop, GradScaler and checkpoints see one param_groups list, step and state."""

    def __init__(self, *optimizers):
        self.optimizers = optimizers
    @property
    def param_groups(self):
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]
    def step(self):
        for optimizer in self.optimizers:
            optimizer.step()
    def zero_grad(self, set_to_none=True):
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)
    def state_dict(self):
        return [optimizer.state_dict() for optimizer in self.optimizers]
    def load_state_dict(self, state_dicts):
        for optimizer, state_dict in zip(self.optimizers, state_dicts, strict=True):
            optimizer.load_state_dict(state_dict)


class GPT(nn.Module):

    def __init__(self, config, attn_cls=MuPFlexAttention, _shapes_only=False):
        super().__init__()
        self.config = config
        self.attn_cls = attn_cls
        self.transformer = nn.ModuleDict(dict(
            wte = nn.Embedding(config.vocab_size, config.n_embd),
            wpe = nn.Embedding(config.block_size, config.n_embd),
            drop = nn.Dropout(config.dropout),
            h = nn.ModuleList([Block(config.layer_config(i), attn_cls) for i in range(config.n_layer)]),
            ln_f = LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            # https://paperswithcode.com/method/weight-tying
            self.transformer.wte.weight = self.lm_head.weight
        if _shapes_only: # a throwaway model on the meta device, only read for its parameter shapes
            return
        self.mup_param_info = self._classify_params()
        self._init_weights()
        print("number of parameters: %.2fM" % (self.get_num_params()/1e6,))

    # ---- muP: the one place that decides each parameter's treatment (docs/mup.md)
    def _classify_params(self):
        """{name: (kind, m, in_block)}: each parameter's muP class, found by comparing its shape with
        the same parameter in the base-width model (microsoft/mup's set_base_shapes idea), so
        parameters a subclass adds are treated right without a list of names. A dim grows if it
        differs from the base model's (at the base width: from a 2x wider model's). Two growing dims:
        'hidden'; else two or more dims: 'embedding' (wte, wpe, the readout, per-head tables); else
        'vector' (LayerNorms, biases). m is the ratio of the last growing dim (the fan-in), 1 under
        SP. in_block: inside a residual branch, where depth scaling applies."""
        c = self.config
        base_width = c.mup_base_width or c.n_embd
        base = replace(c, n_embd=base_width, n_head=base_width // c.base_head_dim, mup_base_width=0,
                       mup_base_head_dim=0)
        base_shapes = self._param_shapes(base)
        wider_shapes = self._param_shapes(replace(base, n_embd=2 * base_width)) if c.n_embd == base_width else None
        info = {}
        for name, p in self.named_parameters():
            if name not in base_shapes:
                raise ValueError(f"parameter {name} does not exist in the base-width model: create parameters "
                                 f"in __init__ from the config alone, so that muP can compare their shapes")
            ref = wider_shapes[name] if wider_shapes else tuple(p.shape)
            growing = [i for i, (b, r) in enumerate(zip(base_shapes[name], ref)) if b != r]
            m = p.shape[growing[-1]] / base_shapes[name][growing[-1]] if growing else 1.0
            kind = 'hidden' if len(growing) >= 2 else 'embedding' if p.dim() >= 2 else 'vector'
            info[name] = (kind, m, name.startswith('transformer.h.'))
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
                # GPT-2's residual projections / sqrt(2 L), with the base depth's L under CompleteP, so
                # the init does not change with depth (docs/mup.md, depth)
                residual_depth = c.mup_base_depth or c.n_layer
                std = c.init_std / math.sqrt(2 * residual_depth) if getattr(module, 'residual_proj', False) else c.init_std
                torch.nn.init.normal_(module.weight, mean=0.0, std=std)
                if getattr(module, 'bias', None) is not None:
                    torch.nn.init.zeros_(module.bias)
        if not c.tie_weights:
            torch.nn.init.zeros_(self.lm_head.weight) # docs/mup.md: an untied readout starts at zero (SP too)
        for name, p in self.named_parameters():
            kind, m, _ = self.mup_param_info[name]
            if kind == 'hidden':
                p.div_(math.sqrt(m)) # muP: hidden matrices' init variance ~ 1/fan_in (docs/mup.md)

    def get_num_params(self, non_embedding=True):
        """Parameters, without the position embeddings by default (wte counts: it is the readout too)."""
        return sum(p.numel() for p in self.parameters()) - (self.transformer.wpe.weight.numel() if non_embedding else 0)

    def forward(self, idx, targets=None):
        b, t = idx.size()
        if t > self.config.block_size:
            raise ValueError(f"Cannot forward sequence of length {t}, block size is only {self.config.block_size}")
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
        # muP's input multiplier: a constant tuned at the base width (docs/mup.md)
        x = self.transformer.drop(self.config.mup_input_mult * (self.transformer.wte(idx) + self.transformer.wpe(pos)))
        masks = {} # one mask per attention pattern, built once and passed to its layers
        for block in self.transformer.h:
            pattern = (type(block.attn), block.attn.attn_mod)
            if pattern not in masks:
                masks[pattern] = block.attn.make_mask(b, t, idx.device)
            x = block(x, masks[pattern])
        x = self.transformer.ln_f(x)

        if targets is None:
            x = x[:, [-1], :] # inference-time mini-optimization: only forward the lm_head on the very last position
        logits = self.readout(x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss

    def readout(self, x):
        """Every path to logits goes through here: muP's readout multiplier output_mult / m
        (MuReadout; docs/mup.md)."""
        return self.lm_head(x) * (self.config.mup_output_mult / self.config.width_mult)

    def crop_block_size(self, block_size):
        # model surgery, e.g. to use a checkpoint of block size 1024 with a smaller block size
        if block_size > self.config.block_size:
            raise ValueError(f"crop_block_size({block_size}): the model's block size is only {self.config.block_size}")
        self.config = replace(self.config, block_size=block_size)
        self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])

    def param_groups(self, weight_decay, optimizer='adamw', muon_lr_mult=1.0):
        """One param group per muP treatment (docs/mup.md), each with `lr_scale` (the training loop
        sets lr = schedule(it) * lr_scale on every group, see set_lr), `weight_decay`, `eps_scale`
        and the `optimizer` that steps it: with optimizer='muon', torch's Muon for the hidden
        matrices and AdamW for the rest."""
        c = self.config
        depth_lr = c.depth_mult ** (c.mup_depth_alpha - 1) # CompleteP: in-block lr x m_L^(alpha - 1)
        groups = {}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            kind, m, in_block = self.mup_param_info[name]
            opt = 'muon' if kind == 'hidden' and optimizer == 'muon' else 'adamw'
            if opt == 'muon':
                # Muon's orthogonalized update has its size set by the lr (with torch's 'original'
                # sqrt(max(1, fan_out / fan_in))), which the spectral condition wants width-independent:
                # no 1/m, and so weight decay as is, lr * wd being width-independent (docs/mup.md, Muon)
                width_lr, wd = muon_lr_mult, weight_decay
            else:
                # muP: Adam's hidden-matrix lr / m. Weight decay x m keeps the decay per step, lr * wd,
                # the same at every width (as MuAdamW; mup_scale_weight_decay). No decay for vectors.
                width_lr = m ** -c.mup_hidden_lr_exponent if kind == 'hidden' else 1.0
                wd = 0.0 if kind == 'vector' else weight_decay / width_lr if c.mup_scale_weight_decay else weight_decay
            lr_scale = width_lr * (depth_lr if in_block else 1.0)
            # CompleteP's Adam eps: / m_N everywhere, and / m_L^alpha inside the residual branches,
            # whose gradients the branch multiplier shrinks (docs/mup.md, depth)
            eps_scale = 1.0
            if c.mup_base_depth:
                eps_scale = c.width_mult ** -1 * (c.depth_mult ** -c.mup_depth_alpha if in_block else 1.0)
            name = kind + (' in blocks' if in_block and c.depth_mult != 1 else '') + (' (Muon)' if opt == 'muon' else '')
            groups.setdefault((name, lr_scale, wd, eps_scale), dict(params=[], name=name, lr_scale=lr_scale,
                              weight_decay=wd, eps_scale=eps_scale, optimizer=opt))['params'].append(p)
        for g in groups.values():
            print(f"param group {g['name']}: {len(g['params'])} tensors, {sum(p.numel() for p in g['params']):,} "
                  f"parameters, lr_scale {g['lr_scale']:.4g}, weight_decay {g['weight_decay']:.4g}, "
                  f"eps_scale {g['eps_scale']:.4g}")
        return list(groups.values())

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type, eps=1e-8, optimizer='adamw',
                             muon_lr_mult=1.0, muon_momentum=0.95):
        """AdamW over param_groups, each group at learning_rate * lr_scale and eps * eps_scale; with
        optimizer='muon', torch's Muon steps the hidden matrices, and the two step as one."""
        groups = self.param_groups(weight_decay, optimizer, muon_lr_mult)
        for g in groups:
            g['lr'] = learning_rate * g['lr_scale']
        # Create AdamW optimizer and use the fused version if it is available
        use_fused = 'fused' in inspect.signature(torch.optim.AdamW).parameters and device_type == 'cuda'
        adamw = torch.optim.AdamW([dict(g, eps=eps * g['eps_scale']) for g in groups if g['optimizer'] == 'adamw'],
                                  lr=learning_rate, betas=betas, eps=eps, **(dict(fused=True) if use_fused else {}))
        if optimizer == 'adamw':
            return adamw
        muon = torch.optim.Muon([g for g in groups if g['optimizer'] == 'muon'], lr=learning_rate,
                                momentum=muon_momentum, adjust_lr_fn='original')
        return Optimizers(muon, adamw)

    def estimate_mfu(self, fwdbwd_per_iter, dt, peak_flops=312e12):
        """Model flops utilization against `peak_flops` (see device_peak_flops); flops as PaLM, Appendix B."""
        cfg = self.config
        flops_per_token = 6 * self.get_num_params() + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size
        return flops_per_token * cfg.block_size * fwdbwd_per_iter / dt / peak_flops

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None):
        """Complete idx (b, t) by max_new_tokens tokens, recomputing the whole (cropped) context each
        step so that every mask sees true positions; temperature=0 is greedy. Use model.eval()."""
        for _ in range(max_new_tokens):
            idx_cond = idx if idx.size(1) <= self.config.block_size else idx[:, -self.config.block_size:]
            logits = self(idx_cond)[0][:, -1, :]
            if temperature == 0:
                idx_next = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits[logits < v[:, [-1]]] = -float('Inf')
                idx_next = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx


# bf16 dense peaks of common GPUs (vendor datasheets, without sparsity)
GPU_PEAK_FLOPS = {'H200': 989e12, 'H100': 989e12, 'A100': 312e12, 'L4': 121e12, 'A10': 125e12,
                  'RTX 4090': 165e12, 'RTX 3090': 71e12, 'V100': 125e12, 'T4': 65e12}

def device_peak_flops(device, dtype=torch.float32):
    """What MFU is measured against: a GPU's datasheet bf16 peak (an unknown GPU: A100's, as
    nanoGPT); elsewhere (CPU, MPS), the best rate of a 1024^2 matmul in `dtype` over 5 tries, so
    CPU MFU reads as a fraction of what this machine's GEMM reaches."""
    device = torch.device(device)
    if device.type == 'cuda':
        name = torch.cuda.get_device_name(device)
        return next((flops for key, flops in GPU_PEAK_FLOPS.items() if key in name), 312e12)
    a = torch.randn(1024, 1024, device=device, dtype=dtype)
    best = float('inf')
    for _ in range(5):
        t0 = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t0)
    return 2 * 1024 ** 3 / best
