"""
Into and out of Hugging Face transformers. Both directions are a renaming of weights plus, on the
way out, the folding of muP's constants into them, so that a plain transformers model computes
what the GPT computes:

- in: GPT-2's weights ('gpt2' ... 'gpt2-xl', or a local directory of a transformers GPT-2) as an
  SP GPT (or muP at its own width as the base, the same model): from_pretrained, train.py's
  init_from;
- out: a GPT as GPT2LMHeadModel (GPT-2's block), LlamaForCausalLM (RoPE, RMSNorm, SwiGLU, any
  n_kv_head) or Qwen3ForCausalLM (the same with QK-norm), and a mixture of experts of SwiGLU
  experts without shared ones as MixtralForCausalLM or Qwen3MoeForCausalLM (with QK-norm):
  to_transformers, export_hf.py.

muP's forward multipliers are constants, so each becomes part of a weight: the input multiplier
of wte (and wpe), the logit scale's ratio to transformers' 1/sqrt(head_dim) of the query
projection (of QK-norm's gain where q is normalised after it), CompleteP's residual multiplier of
both output projections, and the readout's output_mult / m of an untied lm_head. A setting with no
counterpart (an attention mod, a subclass, an MLP or norm the target lacks) is a ValueError that
names it: never an export that computes something else. transformers is imported here only.
"""

import dataclasses
import math

import torch

GPT2_SIZES = ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl')
# transformers' GPT-2 activation -> our mlp setting (GPT-2's released weights use gelu_new)
GPT2_ACTIVATIONS = {'gelu': 'gelu', 'gelu_new': 'gelu_tanh', 'gelu_pytorch_tanh': 'gelu_tanh'}
CONV1D = ('attn.c_attn.weight', 'attn.c_proj.weight', 'mlp.c_fc.weight', 'mlp.c_proj.weight')
# the GPTConfig fields a GPT-2 checkpoint sets (load_gpt2)
ARCHITECTURE = ('n_layer', 'n_head', 'n_embd', 'block_size', 'vocab_size', 'bias', 'mlp', 'tie_weights')


def transformers_module():
    """transformers, or a ValueError that says how to install it."""
    try:
        import transformers
    except ImportError:
        raise ValueError("this needs Hugging Face transformers: pip install transformers safetensors") from None
    return transformers


# -----------------------------------------------------------------------------
# in: GPT-2

def load_gpt2(source):
    """(settings, state_dict): the GPTConfig fields of a transformers GPT-2 and its weights named
    as GPT's. source: one of GPT2_SIZES (downloaded, or taken from transformers' cache) or the path
    of a directory that GPT2LMHeadModel.save_pretrained wrote."""
    transformers = transformers_module()
    try:
        hf = transformers.GPT2LMHeadModel.from_pretrained(source)
    except OSError as e:
        first = (str(e).strip().splitlines() or [''])[0]
        raise ValueError(f"init_from={source!r}: its weights cannot be loaded ({first}); offline, save them "
                         f"where there is a network (GPT2LMHeadModel.from_pretrained({source!r})"
                         f".save_pretrained('DIR')), copy DIR here and pass init_from=DIR") from None
    c = hf.config
    if c.activation_function not in GPT2_ACTIVATIONS:
        raise ValueError(f"init_from={source!r}: activation {c.activation_function!r} has no counterpart here "
                         f"(GPT's MLP computes {', '.join(GPT2_ACTIVATIONS)})")
    if c.layer_norm_epsilon != 1e-5 or not c.scale_attn_weights or c.scale_attn_by_inverse_layer_idx:
        raise ValueError(f"init_from={source!r}: its LayerNorm eps or attention scaling is not GPT-2's")
    if c.n_inner not in (None, 4 * c.n_embd):
        raise ValueError(f"init_from={source!r}: an MLP width n_inner={c.n_inner} is not 4 n_embd")
    settings = dict(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, block_size=c.n_positions,
                    vocab_size=c.vocab_size, bias=True, mlp=GPT2_ACTIVATIONS[c.activation_function],
                    tie_weights=c.tie_word_embeddings)
    state = {}
    for name, tensor in hf.state_dict().items():
        if name.endswith(('.attn.bias', '.attn.masked_bias')): # causal-mask buffers of older versions
            continue
        if name.endswith(CONV1D):
            tensor = tensor.t() # transformers' Conv1D stores (in, out), a Linear (out, in)
        if '.attn.c_attn.' in name: # GPT's c_attn holds q, k and v apart (for Muon)
            for part, chunk in zip('qkv', tensor.chunk(3, dim=0)):
                state[name.replace('c_attn.', f'c_attn.{part}.')] = chunk.contiguous()
            continue
        state[name] = tensor.contiguous()
    return settings, state


# settings that leave the function GPT-2's weights compute as it is (dropout, a kernel, a training
# rule, a setting another one switches off), or that a fine-tune may change on purpose (attn_mod)
GPT2_FREE = ('block_size', 'dropout', 'attn_backend', 'attn_mod', 'init_std', 'mup_scale_weight_decay',
             'mup_hidden_lr_exponent', 'embedding_lr_mult', 'mup_depth_alpha', 'rope_base')


def from_pretrained(source, **settings):
    """GPT-2's weights (GPT2_SIZES or a local directory of a transformers GPT-2) as a GPT: the
    architecture from the checkpoint, every other GPTConfig setting (dropout, attn_backend, ...)
    from `settings`, block_size at most GPT-2's (wpe cropped to it). An SP model, or muP with its
    own width as the base: the same model (check_gpt2_settings); another is a ValueError."""
    from model import GPT, GPTConfig
    architecture, state = load_gpt2(source)
    block_size = min(settings.get('block_size', architecture['block_size']), architecture['block_size'])
    config = GPTConfig(**{**settings, **architecture, 'block_size': block_size})
    check_gpt2_settings(config)
    state['transformer.wpe.weight'] = state['transformer.wpe.weight'][:block_size]
    model = GPT(config)
    model.load_state_dict(state)
    return model


def check_gpt2_settings(config):
    """A model GPT-2's weights compute GPT-2's function in: SP, or muP at its own width as the base
    (the same model), with every other setting but GPT2_FREE and the architecture (load_gpt2's) at
    its default, GPT-2's block; else a ValueError naming what differs."""
    if config.mup_base_width not in (0, config.n_embd) or config.mup_base_head_dim not in (0, config.head_dim):
        raise ValueError(f"mup_base_width={config.mup_base_width}: GPT-2's weights make an SP model, or muP with "
                         f"its own width as the base (mup_base_width={config.n_embd}), which is the same model")
    if config.mup_base_depth not in (0, config.n_layer):
        raise ValueError(f"mup_base_depth={config.mup_base_depth}: GPT-2's weights are a {config.n_layer}-layer "
                         f"model; leave mup_base_depth=0")
    checked = ('mup_base_width', 'mup_base_head_dim', 'mup_base_depth')
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if field.name in (*GPT2_FREE, *ARCHITECTURE, *checked) or value == field.default:
            continue
        raise ValueError(f"{field.name}={value!r}: GPT-2's weights are for GPT-2's block with muP's neutral "
                         f"multipliers ({field.name}={field.default!r})")


# -----------------------------------------------------------------------------
# out: GPT-2, Llama, Qwen3, Mixtral, Qwen3-MoE

def target(config):
    """The transformers architecture that computes what a model of this config computes:
    'gpt2', 'llama', 'qwen3', 'mixtral' or 'qwen3_moe'; a ValueError naming the first setting
    none of them has."""
    specs = set(config.attn_mod.split(','))
    if specs != {'causal'}:
        raise ValueError(f"attn_mod={config.attn_mod!r}: transformers' GPT-2, Llama and Qwen3 attend causally "
                         f"only; a model with another mask or score cannot be exported")
    if config.attn_cls:
        raise ValueError(f"attn_cls={config.attn_cls!r}: a subclass's own attention has no transformers "
                         f"counterpart")
    if config.n_expert and (config.pos_emb, config.norm, config.mlp) != ('rope', 'rmsnorm', 'swiglu'):
        raise ValueError(f"n_expert={config.n_expert} with pos_emb={config.pos_emb!r}, norm={config.norm!r}, "
                         f"mlp={config.mlp!r}: transformers' mixtures of experts (Mixtral, Qwen3-MoE) have "
                         f"RoPE, RMSNorm and SwiGLU experts")
    if config.pos_emb == 'learned':
        unlike = [(key, value) for key, value in (('norm', config.norm), ('qk_norm', config.qk_norm))
                  if value != {'norm': 'layernorm', 'qk_norm': False}[key]]
        if config.mlp not in ('gelu', 'gelu_tanh'):
            unlike.append(('mlp', config.mlp))
        if config.kv_heads != config.n_head:
            unlike.append(('n_kv_head', config.n_kv_head))
        if unlike:
            key, value = unlike[0]
            raise ValueError(f"{key}={value!r} with pos_emb='learned': GPT-2 (learned positions) has "
                             f"LayerNorm, a GELU MLP and no QK-norm or GQA; Llama and Qwen3 have RoPE")
        return 'gpt2'
    if config.norm != 'rmsnorm':
        raise ValueError(f"norm={config.norm!r} with pos_emb='rope': Llama and Qwen3 use RMSNorm")
    if config.mlp != 'swiglu':
        raise ValueError(f"mlp={config.mlp!r} with pos_emb='rope': Llama and Qwen3 use SwiGLU "
                         f"(mlp='swiglu'); no transformers model has {config.mlp!r} with RoPE")
    if config.qk_norm and config.bias:
        raise ValueError("bias=True with qk_norm=True: Qwen3 (RoPE with QK-norm) has no MLP biases; "
                         "train with bias=False")
    if not config.n_expert:
        return 'qwen3' if config.qk_norm else 'llama'
    # a mixture of experts: Qwen3-MoE (with QK-norm) or Mixtral, both top-k over a softmax
    # renormalised over the chosen, as MoE routes
    if config.n_shared_expert:
        raise ValueError(f"n_shared_expert={config.n_shared_expert}: Mixtral and Qwen3-MoE have no shared "
                         f"experts; export a mixture without them (n_shared_expert=0)")
    if config.bias and not config.qk_norm:
        raise ValueError("bias=True with n_expert: Mixtral's attention has no biases; train with bias=False")
    if config.expert_width % 8: # transformers runs the experts as one grouped matmul
        raise ValueError(f"expert width {config.expert_width} is not a multiple of 8: transformers' grouped "
                         f"matmul of the experts needs 16-byte-aligned rows in bf16; train with an "
                         f"expert_width_mult that makes expert_width_mult x n_embd a multiple of 8")
    return 'qwen3_moe' if config.qk_norm else 'mixtral'


def folded_state(model):
    """GPT's weights with muP's forward constants folded in (the module docstring), still named
    as GPT's, and whether the readout can stay tied to wte. Biases and gains the model has not
    are zeros and ones where the target has them."""
    c = model.config
    state = {name: tensor.detach().clone().float() for name, tensor in model.state_dict().items()}
    readout = c.mup_output_mult / c.width_mult # the Readout's multiplier
    tied = c.tie_weights and c.mup_input_mult == readout
    if not tied:
        state['lm_head.weight'] = readout * model.lm_head.weight.detach().float()
    state['transformer.wte.weight'] = c.mup_input_mult * state['transformer.wte.weight']
    if 'transformer.wpe.weight' in state:
        state['transformer.wpe.weight'] = c.mup_input_mult * state['transformer.wpe.weight']
    # the logit scale attn_mult sqrt(d_base) / d_head against transformers' 1 / sqrt(d_head)
    ratio = model.transformer.h[0].attn.scale * math.sqrt(c.head_dim)
    residual = model.transformer.h[0].residual_mult # CompleteP's m_L^-alpha, 1 without
    for i in range(c.n_layer):
        prefix = f'transformer.h.{i}.'
        if c.qk_norm: # q is normalised after its projection: scale what comes out of the norm
            gain = state.get(prefix + 'attn.q_norm.weight', torch.ones(c.head_dim))
            state[prefix + 'attn.q_norm.weight'] = ratio * gain
        else:
            for name in ('attn.c_attn.q.weight', 'attn.c_attn.q.bias'):
                if prefix + name in state:
                    state[prefix + name] = ratio * state[prefix + name]
        for name in ('attn.c_proj.weight', 'attn.c_proj.bias', 'mlp.c_proj.weight', 'mlp.c_proj.bias',
                     'mlp.expert_proj'):
            if prefix + name in state:
                state[prefix + name] = residual * state[prefix + name]
    return state, tied


def norm_weights(state, name, ndim, bias):
    """A norm's gain (ones where the model has none) and, with `bias`, its bias (zeros likewise)."""
    weights = {'weight': state.get(f'{name}.weight', torch.ones(ndim))}
    if bias:
        weights['bias'] = state.get(f'{name}.bias', torch.zeros(ndim))
    return weights


def to_transformers(model):
    """A transformers model (eval mode, float32) that computes the logits `model` computes, as
    target(model.config) picks its class."""
    transformers = transformers_module()
    c = model.config
    kind = target(c)
    state, tied = folded_state(model)
    zeros = lambda n: torch.zeros(n)
    # GPT-2's end-of-text where the vocabulary has it (GPT-2 BPE data), else no special tokens
    end_of_text = 50256 if c.vocab_size > 50256 else None
    special = dict(bos_token_id=end_of_text, eos_token_id=end_of_text, pad_token_id=None)
    out = {}
    if kind == 'gpt2':
        config = transformers.GPT2Config(vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd,
                                         n_layer=c.n_layer, n_head=c.n_head, activation_function=
                                         {'gelu': 'gelu', 'gelu_tanh': 'gelu_new'}[c.mlp], resid_pdrop=0.0,
                                         embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5,
                                         tie_word_embeddings=tied, **special)
        out['transformer.wte.weight'] = state['transformer.wte.weight']
        out['transformer.wpe.weight'] = state['transformer.wpe.weight']
        for i in range(c.n_layer):
            ours, theirs = f'transformer.h.{i}.', f'transformer.h.{i}.'
            for ln in ('ln_1', 'ln_2'):
                for key, tensor in norm_weights(state, ours + ln, c.n_embd, bias=True).items():
                    out[f'{theirs}{ln}.{key}'] = tensor
            qkv = [state[f'{ours}attn.c_attn.{p}.weight'] for p in 'qkv']
            out[theirs + 'attn.c_attn.weight'] = torch.cat(qkv).t() # Conv1D: (in, out)
            out[theirs + 'attn.c_attn.bias'] = torch.cat([state.get(f'{ours}attn.c_attn.{p}.bias', zeros(c.n_embd))
                                                          for p in 'qkv'])
            for linear in ('attn.c_proj', 'mlp.c_fc', 'mlp.c_proj'):
                weight = state[f'{ours}{linear}.weight']
                out[f'{theirs}{linear}.weight'] = weight.t()
                out[f'{theirs}{linear}.bias'] = state.get(f'{ours}{linear}.bias', zeros(weight.size(0)))
        for key, tensor in norm_weights(state, 'transformer.ln_f', c.n_embd, bias=True).items():
            out[f'transformer.ln_f.{key}'] = tensor
        hf = transformers.GPT2LMHeadModel(config)
    else:
        settings = dict(vocab_size=c.vocab_size, hidden_size=c.n_embd, intermediate_size=c.mlp_width,
                        num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.kv_heads,
                        head_dim=c.head_dim, max_position_embeddings=c.block_size, rms_norm_eps=1e-5,
                        hidden_act='silu', attention_bias=c.bias, tie_word_embeddings=tied,
                        rope_parameters={'rope_theta': c.rope_base, 'rope_type': 'default'}, **special)
        moe = dict(num_experts_per_tok=c.n_expert_active, router_aux_loss_coef=c.moe_aux_loss_coef)
        if kind == 'llama':
            hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(mlp_bias=c.bias, **settings))
        elif kind == 'qwen3':
            hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**settings))
        elif kind == 'mixtral':
            hf = transformers.MixtralForCausalLM(transformers.MixtralConfig(
                **{**settings, 'intermediate_size': c.expert_width}, num_local_experts=c.n_expert, **moe))
        else:
            hf = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
                **settings, moe_intermediate_size=c.expert_width, num_experts=c.n_expert, norm_topk_prob=True,
                decoder_sparse_step=1, mlp_only_layers=[], **moe))
        out['model.embed_tokens.weight'] = state['transformer.wte.weight']
        names = {'attn.c_attn.q': 'self_attn.q_proj', 'attn.c_attn.k': 'self_attn.k_proj',
                 'attn.c_attn.v': 'self_attn.v_proj', 'attn.c_proj': 'self_attn.o_proj',
                 'mlp.c_gate': 'mlp.gate_proj', 'mlp.c_fc': 'mlp.up_proj', 'mlp.c_proj': 'mlp.down_proj'}
        for i in range(c.n_layer):
            ours, theirs = f'transformer.h.{i}.', f'model.layers.{i}.'
            for ln, name in (('ln_1', 'input_layernorm'), ('ln_2', 'post_attention_layernorm')):
                out[f'{theirs}{name}.weight'] = norm_weights(state, ours + ln, c.n_embd, bias=False)['weight']
            for linear, name in names.items():
                for part in ('weight', 'bias'):
                    if f'{ours}{linear}.{part}' in state:
                        out[f'{theirs}{name}.{part}'] = state[f'{ours}{linear}.{part}']
            if c.n_expert: # the router, and each expert's gate and up projections in one tensor
                out[f'{theirs}mlp.gate.weight'] = state[f'{ours}mlp.router.weight']
                out[f'{theirs}mlp.experts.gate_up_proj'] = torch.cat([state[f'{ours}mlp.expert_gate'],
                                                                      state[f'{ours}mlp.expert_fc']], dim=1)
                out[f'{theirs}mlp.experts.down_proj'] = state[f'{ours}mlp.expert_proj']
            if c.qk_norm:
                for norm in ('q_norm', 'k_norm'):
                    out[f'{theirs}self_attn.{norm}.weight'] = norm_weights(state, f'{ours}attn.{norm}', c.head_dim,
                                                                          bias=False)['weight']
        out['model.norm.weight'] = norm_weights(state, 'transformer.ln_f', c.n_embd, bias=False)['weight']
    if not tied:
        out['lm_head.weight'] = state['lm_head.weight']
    missing, unexpected = hf.load_state_dict(out, strict=False)
    missing = [name for name in missing if not (tied and name == 'lm_head.weight') and not name.endswith('.attn.bias')]
    if missing or unexpected: # a mapping that left a weight out would export something else
        raise RuntimeError(f"export to {kind}: weights missing {missing}, unexpected {unexpected}")
    return hf.eval()
