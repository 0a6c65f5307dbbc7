"""
muP's policy, in one place: which class each parameter is in, found from shapes alone, and what
each class gets as the model widens and deepens (init, Adam lr, weight decay, Adam eps), and the
optimizer that applies it. model.py holds the model and its three forward multipliers (input,
attention logits, readout); this file holds the rest. docs/mup.md states the rules and why.

microsoft/mup splits the same way: set_base_shapes (classify_params here) finds each parameter's
class by comparing its shape with the base model's, MuAdamW (param_groups, configure_optimizers)
scales the lr per class, MuReadout (model.Readout) holds the readout's 1/m.
"""

import math
from dataclasses import replace
from typing import NamedTuple

import torch
import torch.nn as nn

from muon import Muon


class Rule(NamedTuple):
    """How one class of parameters scales with m, the growth of its fan-in (n_embd /
    mup_base_width where the fan-in grows, else 1): init std x m^init and Adam lr x m^lr; a
    decayed class's weight decay is x m^-lr (mup_scale_weight_decay), so that lr x decay, the
    fraction AdamW removes per step, does not change with width."""
    init: float
    lr: float
    decayed: bool


# docs/mup.md, per-parameter rules (TP V, Table 8)
RULES = {                                                # what grows with width
    'hidden':    Rule(init=-0.5, lr=-1.0, decayed=True), # fan-in and fan-out: c_attn, c_proj, c_fc
    'output':    Rule(init=-1.0, lr=-1.0, decayed=True), # the fan-in alone: a headwise gate, a router
    'embedding': Rule(init=0.0, lr=0.0, decayed=True),   # the fan-out alone, or nothing: wte, wpe
    'readout':   Rule(init=0.0, lr=0.0, decayed=True),   # the fan-in; its 1/m is in model.Readout
    'vector':    Rule(init=0.0, lr=0.0, decayed=False),  # one dim: norm gains, biases, ALiBi slopes
}


class ParamInfo(NamedTuple):
    """What muP needs to know of one parameter (docs/mup.md, per-parameter rules)."""
    kind: str # a key of RULES
    width_mult: float # how much its fan-in has grown: m where the fan-in grows with width, else 1
    in_block: bool # inside a residual branch, where depth scaling applies


def fan_in_dim(param, owner):
    """The dim of a weight that its input is summed over. A `fan_in_dim` attribute on the
    parameter says it outright (the override, for a raw parameter used as `x @ W`); else an
    nn.Embedding's is 0 (its one-hot input picks a row of (num, dim)), and every other weight's
    is 1: nn.Linear's (out, in) and torch.nn.init's convention for any other weight."""
    if hasattr(param, 'fan_in_dim'):
        return param.fan_in_dim
    if isinstance(owner, nn.Embedding):
        return 0
    return 1


def classify_params(model):
    """{name: ParamInfo}: each parameter's muP class, found by comparing its shape with the same
    parameter in the base-width model (microsoft/mup's set_base_shapes idea), so that parameters
    a subclass adds are treated right without a list of names.

    A dim grows if it differs from the base model's (at the base width: from a 2x wider model's).
    Which dim is the fan-in comes from the module that owns the weight (fan_in_dim):
    - 'hidden': two or more dims grow (c_attn, c_proj, c_fc; a subclass's n_embd x n_embd);
    - 'output': one dim grows, the fan-in (a headwise gate Linear(n_embd, n_head), a router);
    - 'embedding': one dim grows, not the fan-in (wte, wpe, a Linear(n_head, n_embd)), or none
      (a per-head table): input weights and finite tables;
    - 'readout': the weight of model.lm_head when untied (its 1/m is in its forward);
    - 'vector': one dim (norm gains, biases, learned ALiBi slopes)."""
    c = model.config
    base_width = c.mup_base_width or c.n_embd
    experts = {} # the number of experts as a width: the base model's, at the same active fraction
    if c.mup_base_n_expert:
        experts = dict(n_expert=c.mup_base_n_expert,
                       n_expert_active=c.n_expert_active * c.mup_base_n_expert // c.n_expert)
    base = replace(c, n_embd=base_width, n_head=base_width // c.base_head_dim,
                   mup_base_width=0, mup_base_head_dim=0, mup_base_n_expert=0, **experts)
    base_shapes = param_shapes(model, base)
    at_base_width = c.n_embd == base_width
    if at_base_width: # nothing differs from the base model here: compare with a wider one,
        # widened as this layout widens (more heads where the base head dim is set, more experts
        # where their number is a width)
        wider = replace(base, n_embd=2 * base_width)
        if c.mup_base_head_dim:
            wider = replace(wider, n_head=2 * base_width // c.base_head_dim)
        if c.mup_base_n_expert:
            wider = replace(wider, n_expert=2 * base.n_expert, n_expert_active=2 * base.n_expert_active)
        compared_shapes = param_shapes(model, wider)
    owners = {}
    for module_name, module in model.named_modules():
        for param_name, _ in module.named_parameters(prefix=module_name, recurse=False):
            owners[param_name] = module
    info = {}
    for name, p in model.named_parameters():
        if name not in base_shapes:
            raise ValueError(f"parameter {name} does not exist in the base-width model: create "
                             f"parameters in __init__ from the config alone, so that muP can "
                             f"compare their shapes")
        base_shape = base_shapes[name]
        shape = compared_shapes[name] if at_base_width else tuple(p.shape)
        growing = [dim for dim in range(p.dim()) if shape[dim] != base_shape[dim]]
        owner = owners[name]
        fan_in = fan_in_dim(p, owner) if p.dim() >= 2 else None # a vector has none
        width_mult = 1.0
        if fan_in in growing:
            width_mult = p.shape[fan_in] / base_shape[fan_in]
        if p.dim() < 2:
            kind = 'vector'
        elif owner is model.lm_head:
            kind = 'readout'
        elif len(growing) >= 2:
            kind = 'hidden'
        elif growing == [fan_in]:
            kind = 'output'
        else:
            kind = 'embedding'
        info[name] = ParamInfo(kind, width_mult, in_block=name.startswith('transformer.h.'))
    return info


def param_shapes(model, config):
    """{name: shape} of the parameters of `model`'s class built from `config` with its attention
    class, on the meta device: nothing is allocated or initialised."""
    with torch.device('meta'):
        shape_model = type(model)(config, model.attn_cls, _shapes_only=True)
    return {name: tuple(p.shape) for name, p in shape_model.named_parameters()}


@torch.no_grad()
def scale_init(model):
    """muP's init: each parameter's std (as drawn at the base width) / m^-RULES[kind].init:
    sigma / sqrt(m) for a hidden matrix (variance ~ 1/fan_in), sigma / m for an output weight
    (variance ~ 1/fan_in^2; TP V, Table 8), unchanged for the rest."""
    for name, p in model.named_parameters():
        info = model.mup_param_info[name]
        p.div_(info.width_mult ** -RULES[info.kind].init)


def param_groups(model, weight_decay, optimizer='adamw', muon_lr_mult=1.0):
    """One param group per muP treatment (docs/mup.md), each a dict with `name`, `params`,
    `lr_scale` (the training loop sets lr = schedule(it) * lr_scale on every group, see
    set_lr), `weight_decay`, `eps_scale` and `optimizer`, the one that steps it: with
    optimizer='muon', Muon for the hidden matrices and AdamW for the rest."""
    c = model.config
    # CompleteP: the lr inside the residual branches x m_L^(alpha - 1) (docs/mup.md, depth)
    depth_lr = c.depth_mult ** (c.mup_depth_alpha - 1)
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        info = model.mup_param_info[name]
        rule = RULES[info.kind]
        on_muon = optimizer == 'muon' and info.kind == 'hidden'
        if on_muon:
            # Muon's orthogonalized update has its size set by the lr (times muon.update_scale,
            # sqrt(max(1, fan_out / fan_in))), which the spectral condition wants
            # width-independent: no 1/m, and so weight decay as is (docs/mup.md, Muon)
            width_lr = muon_lr_mult
            decay = weight_decay
        else:
            lr_exponent = rule.lr
            if info.kind == 'hidden': # 1 is muP; other values only in the finite-width study
                lr_exponent = -c.mup_hidden_lr_exponent
            width_lr = info.width_mult ** lr_exponent
            decay = weight_decay if rule.decayed else 0.0
            if rule.decayed and c.mup_scale_weight_decay:
                decay = weight_decay / width_lr # x m where the lr is / m: lr x decay stays put
        lr_scale = width_lr
        if info.kind == 'embedding' and not info.in_block: # wte, wpe
            lr_scale = width_lr * c.embedding_lr_mult # 1 but in SP's embedding-lr control
        if info.in_block:
            lr_scale = width_lr * depth_lr
        # CompleteP's Adam eps: / m_N everywhere, and / m_L^alpha inside the residual
        # branches, whose gradients the branch multiplier shrinks (docs/mup.md, depth)
        eps_scale = 1.0
        if c.mup_base_depth:
            eps_scale = 1.0 / c.width_mult
            if info.in_block:
                eps_scale *= c.depth_mult ** -c.mup_depth_alpha
        group_name = info.kind
        if info.in_block and c.depth_mult != 1:
            group_name += ' in blocks'
        if on_muon:
            group_name += ' (Muon)'
        key = (group_name, lr_scale, decay, eps_scale)
        if key not in groups:
            groups[key] = dict(params=[], name=group_name, lr_scale=lr_scale,
                               weight_decay=decay, eps_scale=eps_scale,
                               optimizer='muon' if on_muon else 'adamw')
        groups[key]['params'].append(p)
    return list(groups.values())


def configure_optimizers(model, weight_decay, learning_rate, betas, device_type, eps=1e-8,
                         optimizer='adamw', muon_lr_mult=1.0, muon_momentum=0.95):
    """AdamW over param_groups, each group at learning_rate * lr_scale and eps * eps_scale;
    with optimizer='muon', Muon (muon.py) steps the hidden matrices, and the two step as one
    (Optimizers)."""
    groups = param_groups(model, weight_decay, optimizer, muon_lr_mult)
    for group in groups:
        group['lr'] = learning_rate * group['lr_scale']
    adamw_groups = [dict(g, eps=eps * g['eps_scale'])
                    for g in groups if g['optimizer'] == 'adamw']
    muon_groups = [g for g in groups if g['optimizer'] == 'muon']
    # the fused AdamW kernel, one launch for all parameters, exists on CUDA
    adamw = torch.optim.AdamW(adamw_groups, lr=learning_rate, betas=betas, eps=eps,
                              fused=device_type == 'cuda')
    if optimizer == 'adamw':
        return adamw
    muon = Muon(muon_groups, lr=learning_rate, momentum=muon_momentum)
    return Optimizers(muon, adamw)


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
