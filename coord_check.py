"""
Coordinate check for muP (docs/mup.md invariants 3 and 4), in the style of microsoft/mup's figure.

GPTs of several widths take a few Adam steps on one fixed batch, with the learning rates set as
train.py sets them (lr * lr_scale on every group of model.configure_optimizers). Forward hooks
record mean(|h|) of the output of every module, before each step: every Linear, Embedding,
LayerNorm and activation, each block's attention, MLP and residual stream, the logits, and the
modules of your own attention class (--attn_cls), as microsoft/mup's get_coord_data does, so the
slope table names the layer at fault.
Under muP these coordinates stay the same size as the width grows once the weights have moved;
under SP the block outputs grow about like width^2 after a few Adam steps. The check must look
after updates: at t = 0 muP's logits shrink like 1/sqrt(width) by design (the readout's output
vanishes at init in the muP limit), and the updates are what muP is about. It also records
mean(|h_t - h_0|), the change of each output since init: invariant 4 asks that the first step's
change be width-independent under muP.

With --depths it is the depth check of CompleteP instead (docs/mup.md, depth): models of one
width and growing depth, with no depth scaling, with depth-muP (alpha = 0.5) and with CompleteP
(alpha = 1); the statistics are the residual stream halfway up and at the top (before ln_f),
and the logits. Without depth scaling the residual stream grows with depth after a few steps.

$ python coord_check.py                                  # SP and muP, widths 128..1024, n_head fixed
$ python coord_check.py --heads=grow --out=coord_check_grow   # head_dim fixed, n_head grows
$ python coord_check.py --param=mup --widths=64,256,1024 --steps=5 --lr=3e-2
$ python coord_check.py --depths=2,4,8,16 --out=coord_check_depth   # depth: none, depth-muP, CompleteP
$ python coord_check.py --attn_cls=gated_attention.py:HeadwiseGate --widths=64,128,256,512  # your class
$ python coord_check.py --pos_emb=rope --qk_norm=True --norm=rmsnorm --mlp=relu2 --n_kv_head=2   # a modern block
$ python coord_check.py --n_expert=4 --n_expert_active=2 --widths=64,128,256,512 --base_width=32   # MoE, 4 experts
$ python coord_check.py --n_expert=2 --n_expert_active=1 --experts=grow --widths=64,128,256,512 --base_width=32

Writes <out_dir>/assets/<out>.png and <out_dir>/results/<out>.csv (out_dir: a new directory unless
--out_dir=. updates the repository's committed ones), prints a table of log2-log2 slopes vs width (or
depth), one row per module, and the worst module by name. The functions (fixed_batch, build_model, measure, run_widths, run_depths, slopes) are
what tests/test_mup.py and tests/test_depth.py use, so the tests and the figures are one
implementation.
"""

import csv
import functools
import math
import os
import sys
from dataclasses import fields

import numpy as np
import torch

from configurator import model_settings
from data import get_batch, read_meta
from model import GPT, GPTConfig, MoE, MuPFlexAttention, load_attn_cls, set_lr

_HERE = os.path.dirname(os.path.abspath(__file__))
_DATA_DIR = os.path.join(_HERE, 'data', 'shakespeare_char')
_RANDOM_VOCAB = 65 # shakespeare_char's vocabulary size, so both data sources build the same model

# -----------------------------------------------------------------------------
# ---- default config values, every one overridable with --key=value
# Widths start one doubling above the base: at the base width itself (64) finite-width effects
# put the MLP outputs' mean|h| 30-50% above their flat value at 128..1024 and tilt the slope.
widths = [128, 256, 512, 1024]
steps = 4 # Adam steps; statistics are recorded at t = 0 .. steps (t = updates done so far)
# Large enough that SP blows up within 4 steps (slopes ~2), small enough that the muP family is
# not yet oscillating on the fixed batch: at 1e-2 mean|h| at t=4 jumps by up to 2.5x between
# neighbouring widths and muP's worst |slope| reaches 0.3-0.5 (the original design notes suggested ~1e-2).
lr = 3e-3
param = 'both' # 'sp' | 'mup' | 'both'
heads = 'fixed' # 'fixed': n_head fixed, head_dim grows (nanoGPT's --n_embd habit); 'grow': head_dim fixed, n_head grows
head_dim = 16 # used when heads='grow' (becomes mup_base_head_dim under muP)
# with --n_expert: 'fixed' keeps n_expert and n_expert_active; 'grow' multiplies both by width /
# base_width (the number of experts as a width: mup_base_n_expert = n_expert under muP)
experts = 'fixed'
base_width = 64 # mup_base_width of the muP models
# ---- the model: every field of model.GPTConfig is a setting (--help says what each means), but
# those the check sets itself: n_embd (the widths), mup_base_width (base_width) and
# mup_base_head_dim (head_dim, with heads='grow'); n_head is used when heads='fixed'
globals().update(model_settings('n_embd', 'mup_base_width', 'mup_base_head_dim', n_layer=2, n_head=4,
                                block_size=64, bias=False))
batch_size = 16
seed = 1337
out_dir = 'out-studies' # where results/ and assets/ go: --out_dir=. updates the repository's committed files
out = 'coord_check' # writes <out_dir>/assets/<out>.png and <out_dir>/results/<out>.csv
# the depth check (when depths are given): muP models of width depth_width, base depth base_depth
depths = [] # e.g. 2,4,8,16
depth_width = 128
base_depth = 2
# -----------------------------------------------------------------------------

def random_batch(batch_size, block_size, seed, vocab_size=_RANDOM_VOCAB):
    """(x, y) of uniform random tokens: the data-independent batch the tests use."""
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(vocab_size, (batch_size, block_size + 1), generator=g)
    return data[:, :-1].contiguous(), data[:, 1:].contiguous()

def fixed_batch(batch_size, block_size, seed):
    """(x, y, vocab_size, source): one batch of data/shakespeare_char/train.bin if it has been
    prepared, else random tokens; `source` says which."""
    if not os.path.exists(os.path.join(_DATA_DIR, 'train.bin')):
        x, y = random_batch(batch_size, block_size, seed)
        return x, y, _RANDOM_VOCAB, 'random tokens (data/shakespeare_char/train.bin not prepared)'
    generator = torch.Generator().manual_seed(seed)
    x, y = get_batch(_DATA_DIR, 'train', batch_size, block_size, generator)[0]
    return x, y, read_meta(_DATA_DIR)['vocab_size'], 'shakespeare_char train.bin'

def build_model(width, param, heads='fixed', n_layer=2, n_head=4, head_dim=16, base_width=64,
                vocab_size=_RANDOM_VOCAB, block_size=64, seed=1337, attn_cls=MuPFlexAttention, experts='fixed',
                **model_args):
    """A GPT of n_embd=width, as train.py builds it (no bias, no dropout, tied readout), SP or
    muP relative to base_width. heads='fixed' keeps n_head; heads='grow' keeps head_dim and
    tells muP the base model's head dim (mup_base_head_dim). attn_cls: the attention class (a
    MuPFlexAttention subclass). experts='grow' (with n_expert): model_args' n_expert and
    n_expert_active are the base width's, both x width / base_width here, and muP is told the
    base model's (mup_base_n_expert). model_args: other GPTConfig fields (init_std, the depth
    scaling's mup_base_depth and mup_depth_alpha, bias and dropout, which are off unless given, ...)."""
    if param not in ('sp', 'mup'):
        raise ValueError(f"param={param!r}: use 'sp' or 'mup'")
    if heads not in ('fixed', 'grow'):
        raise ValueError(f"heads={heads!r}: use 'fixed' (n_head fixed) or 'grow' (head_dim fixed)")
    if experts not in ('fixed', 'grow'):
        raise ValueError(f"experts={experts!r}: use 'fixed' (n_expert fixed) or 'grow' (n_expert x width / base_width)")
    mup = param == 'mup'
    if experts == 'grow' and model_args.get('n_expert'):
        n_expert, active = model_args['n_expert'], model_args.get('n_expert_active', GPTConfig.n_expert_active)
        model_args = dict(model_args, n_expert=n_expert * width // base_width,
                          n_expert_active=active * width // base_width, mup_base_n_expert=n_expert if mup else 0)
    config = GPTConfig(**{**dict(dropout=0.0, bias=False), **model_args}, block_size=block_size,
                       vocab_size=vocab_size, n_layer=n_layer,
                       n_head=n_head if heads == 'fixed' else width // head_dim, n_embd=width,
                       mup_base_width=base_width if mup else 0,
                       mup_base_head_dim=head_dim if mup and heads == 'grow' else 0)
    torch.manual_seed(seed)
    return GPT(config, attn_cls)

def coord_name(model, name, module):
    """The short name a coordinate check gives a module's output: its name without
    'transformer.', and 'logits' for the readout."""
    if module is model.lm_head:
        return 'logits'
    return name.removeprefix('transformer.')

def measure(model, x, y, lr, steps, betas=(0.9, 0.99), optimizer='adamw', muon_lr_mult=1.0):
    """Take `steps` optimizer steps on the batch (x, y) at constant lr, each param group at
    lr * lr_scale as train.py sets it (AdamW, or Muon for the hidden matrices and AdamW for the
    rest; no weight decay, no clipping: both are invariant to clipping's rescale, up to eps).
    Returns (h, dh, losses): h[t][name] = mean|h| and dh[t][name] = mean|h_t - h_0| in the
    forward after t updates, t = 0 .. steps, of the output of every module that returns a tensor
    (microsoft/mup's get_coord_data records every module too, so a layer at fault is named):
    every Linear, Embedding, norm and activation, a subclass's own modules, each block's
    attention ('h.<i>.attn') and MLP, each block (the residual stream after it, 'h.<i>') and the
    logits; in a mixture of experts also each routed expert's output on every token
    ('h.<i>.mlp.expert.<e>': the packed batch a token's routing picks is ragged). Dropout is left
    out (the identity here: the check runs without dropout)."""
    outputs = {}
    hooks = []
    def record(module, inputs, output, name):
        if isinstance(output, torch.Tensor):
            outputs[name] = output.detach()
        if isinstance(module, MoE): # each routed expert's output, on every token of the batch
            tokens = inputs[0].detach().reshape(1, -1, inputs[0].size(-1))
            with torch.no_grad():
                each = module.experts(tokens.expand(module.router.out_features, -1, -1))
            for e, out in enumerate(each):
                outputs[f'{name}.expert.{e}'] = out
    for name, module in model.named_modules():
        if module is model or isinstance(module, torch.nn.Dropout):
            continue
        hook = functools.partial(record, name=coord_name(model, name, module))
        hooks.append(module.register_forward_hook(hook))
    optimizer = model.configure_optimizers(0.0, lr, betas, 'cpu', optimizer=optimizer,
                                           muon_lr_mult=muon_lr_mult)
    set_lr(optimizer, lr)
    h, dh, losses, first = [], [], [], None
    model.train()
    try:
        for t in range(steps + 1):
            outputs.clear()
            logits, loss = model(x, y)
            if first is None:
                first = dict(outputs)
            h.append({k: v.abs().mean().item() for k, v in outputs.items()})
            dh.append({k: (v - first[k]).abs().mean().item() for k, v in outputs.items()})
            losses.append(loss.item())
            if t == steps:
                break
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    finally:
        for handle in hooks:
            handle.remove()
    return h, dh, losses

def run_widths(widths, param, heads='fixed', steps=4, lr=1e-2, seed=1337, batch=None, n_layer=2,
               n_head=4, head_dim=16, base_width=64, progress=None, attn_cls=MuPFlexAttention, model_args=None,
               experts='fixed', **optimizer):
    """measure() at every width with the same batch and seed, on models of build_model(...,
    attn_cls, **model_args). batch: (x, y, vocab_size), default random tokens. Returns [{'size' (the width), 'h', 'dh', 'losses'}, ...] in the order of `widths`."""
    if len(widths) < 2:
        raise ValueError(f"widths={widths}: a slope needs at least two widths (docs/mup.md asks for >= 3 doublings)")
    x, y, vocab_size = batch if batch is not None else (*random_batch(8, 32, seed), _RANDOM_VOCAB)
    results = []
    for width in widths:
        model = build_model(width, param, heads, n_layer, n_head, head_dim, base_width,
                            vocab_size, x.size(1), seed, attn_cls, experts, **(model_args or {}))
        h, dh, losses = measure(model, x, y, lr, steps, **optimizer)
        results.append(dict(size=width, h=h, dh=dh, losses=losses))
        if progress is not None:
            progress.update(1)
    return results

# depth scaling of each variant of the depth check (mup_base_depth is filled in)
DEPTH_VARIANTS = {'none': dict(), 'depth-muP': dict(mup_depth_alpha=0.5), 'CompleteP': dict(mup_depth_alpha=1.0)}

def run_depths(depths, variant, width=128, base_depth=2, steps=4, lr=3e-3, seed=1337, batch=None, n_head=4,
               base_width=64, progress=None):
    """measure() at every depth with the same batch and seed, muP in width, with the depth scaling
    of DEPTH_VARIANTS[variant] relative to base_depth. The statistics that mean the same at every
    depth: the residual stream after block L/2 and after block L (before ln_f), and the logits.
    Returns [{'size' (the depth), 'h', 'dh', 'losses'}, ...] in the order of `depths`."""
    x, y, vocab_size = batch if batch is not None else (*random_batch(8, 32, seed), _RANDOM_VOCAB)
    results = []
    for depth in depths:
        scaling = dict(DEPTH_VARIANTS[variant], mup_base_depth=base_depth) if variant != 'none' else {}
        model = build_model(width, 'mup', 'fixed', depth, n_head, 16, base_width, vocab_size, x.size(1), seed, **scaling)
        h, dh, losses = measure(model, x, y, lr, steps)
        names = {f'h.{depth // 2 - 1}': 'residual at L/2', f'h.{depth - 1}': 'residual at L', 'logits': 'logits'}
        rename = lambda stats: {names[k]: v for k, v in stats.items() if k in names}
        results.append(dict(size=depth, h=list(map(rename, h)), dh=list(map(rename, dh)), losses=losses))
        if progress is not None:
            progress.update(1)
    return results

def slope(sizes, values):
    """Least-squares slope of log2(value) vs log2(size): 0 is size-independent, 1 grows like size;
    nan where every value is 0."""
    if not any(values):
        return math.nan
    return float(np.polyfit(np.log2(sizes), np.log2(values), 1)[0])

def slopes(results, step=-1, stat='h'):
    """{layer: slope vs width (or depth)} of statistic `stat` ('h' or 'dh') at step `step`."""
    sizes = [r['size'] for r in results]
    layers = results[0][stat][step].keys()
    return {k: slope(sizes, [r[stat][step][k] for r in results]) for k in layers}

# -----------------------------------------------------------------------------

def plot(all_results, path, title, axis='width'):
    """microsoft/mup-style coord check: one panel per step, log-log mean|h| vs width (or depth),
    one line per layer; a row per parameterization (or depth variant)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    rows = list(all_results)
    n_steps = len(next(iter(all_results.values()))[0]['h'])
    fig, axes = plt.subplots(len(rows), n_steps, figsize=(3 * n_steps, 3 * len(rows)), squeeze=False)
    for r, p in enumerate(rows):
        results = all_results[p]
        sizes = [res['size'] for res in results]
        layers = list(results[0]['h'][0])
        colors = matplotlib.colormaps['viridis'](np.linspace(0, 0.9, len(layers)))
        for t in range(n_steps):
            ax = axes[r, t]
            for layer, color in zip(layers, colors):
                ax.plot(sizes, [res['h'][t][layer] for res in results], marker='o', ms=3,
                        color=color, label=layer)
            ax.set_xscale('log', base=2)
            ax.set_yscale('log')
            ax.set_title(f"{LABELS.get(p, p)}  t={t}")
            ax.set_xlabel(axis)
            if t == 0:
                ax.set_ylabel('mean |h|')
    axes[0, -1].legend(fontsize=7, loc='upper left', bbox_to_anchor=(1.02, 1.0))
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

LABELS = {'sp': 'SP', 'mup': 'μP'}

def write_csv(all_results, path, layout, axis='width'):
    with open(path, 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(['param', 'layout', axis, 'step', 'layer', 'mean_abs_h', 'mean_abs_dh', 'loss'])
        for p, results in all_results.items():
            for res in results:
                for t, (h, dh) in enumerate(zip(res['h'], res['dh'])):
                    for layer in h:
                        w.writerow([p, layout, res['size'], t, layer, f"{h[layer]:.6g}",
                                    f"{dh[layer]:.6g}", f"{res['losses'][t]:.6g}"])

def worst(slopes_by_name):
    """(name, slope) of the largest |slope|: the module at fault, if any. A module whose statistic
    is 0 at every width (nothing moved: with an untied readout, which starts at zero, no other
    module's output changes at the first step) has no slope (nan) and is left out."""
    finite = {name: value for name, value in slopes_by_name.items() if np.isfinite(value)}
    return max(finite.items(), key=lambda item: abs(item[1]))

def print_slopes(all_results, steps, axis='width'):
    tables = [(f'mean|h| at t={steps}', 'h', -1), ('mean|h_1 - h_0| (first update)', 'dh', 1)]
    for name, stat, step in tables:
        print(f"\nlog2-log2 slope vs {axis} of {name}")
        per_param = {p: slopes(res, step, stat) for p, res in all_results.items()}
        width = max(len(layer) for layer in next(iter(per_param.values()))) + 2
        print(f"{'module':<{width}}" + ''.join(f"{LABELS.get(p, p):>11}" for p in per_param))
        for layer in next(iter(per_param.values())):
            print(f"{layer:<{width}}" + ''.join(f"{s[layer]:>11.2f}" for s in per_param.values()))
        print(f"{'max |s|':<{width}}" + ''.join(f"{abs(worst(s)[1]):>11.2f}" for s in per_param.values()))
        for p, s in per_param.items():
            module, value = worst(s)
            print(f"worst under {LABELS.get(p, p)}: {module} ({value:+.2f})" + verdict(p, value, axis))


# docs/mup.md, invariants 3 and 4: what a coordinate check over >= 3 doublings must show
MUP_BOUND, SP_BOUND = 0.25, 1.0

def verdict(param, worst_slope, axis='width'):
    """The pass mark of a width check's worst slope: muP flat (|slope| <= MUP_BOUND), SP blowing up
    (|slope| >= SP_BOUND: a check SP passes too proves nothing). Other rows have none."""
    if axis != 'width' or param not in ('sp', 'mup'):
        return ''
    if param == 'mup':
        passed = abs(worst_slope) <= MUP_BOUND
        return f": {'passes' if passed else 'FAILS'} (muP needs every |slope| <= {MUP_BOUND})"
    blew_up = abs(worst_slope) >= SP_BOUND
    return f": {'blows up, as SP must' if blew_up else 'does NOT blow up: the check cannot tell muP from SP here'} (|slope| >= {SP_BOUND})"

if __name__ == '__main__':
    from tqdm import tqdm

    from configurator import configure
    from errors import UserError
    defaults = dict(globals())
    config = configure(globals(), sys.argv[1:])
    if param not in ('sp', 'mup', 'both'):
        raise UserError(f"param={param!r}: use 'sp', 'mup' or 'both'")
    try:
        attention = load_attn_cls(attn_cls)
    except ValueError as e:
        raise UserError(str(e)) from None
    # the model settings build_model does not take as arguments of its own
    block = {f.name: config[f.name] for f in fields(GPTConfig)
             if f.name in config and f.name not in ('n_layer', 'n_head', 'block_size', 'attn_cls')}
    try: # the smallest model, to check the settings before any run
        build_model(min(widths), 'mup', heads, n_layer, n_head, head_dim, base_width, attn_cls=attention,
                    block_size=block_size, experts=experts, **block)
    except ValueError as e:
        raise UserError(str(e)) from None
    if depths and attn_cls:
        raise UserError(f"attn_cls={attn_cls!r} with depths: the depth check runs the model's own "
                          f"attention; leave out --attn_cls or --depths")
    if depths and min(depths) < 2:
        raise UserError(f"depths={depths}: every depth must be >= 2 (the statistics include the residual at L/2)")
    x, y, vocab_size, source = fixed_batch(batch_size, block_size, seed)
    all_results = {}
    if depths:
        axis, layout = 'depth', f'width {depth_width}, base depth {base_depth}'
        with tqdm(total=len(DEPTH_VARIANTS) * len(depths), desc='depths') as bar:
            for variant in DEPTH_VARIANTS:
                all_results[variant] = run_depths(depths, variant, depth_width, base_depth, steps, lr, seed,
                                                  (x, y, vocab_size), n_head, base_width, progress=bar)
    else:
        axis, layout = 'width', (f'n_head={n_head} fixed' if heads == 'fixed' else f'head_dim={head_dim} fixed')
        with tqdm(total=2 * len(widths), desc='widths') as bar:
            for p in (['sp', 'mup'] if param == 'both' else [param]):
                all_results[p] = run_widths(widths, p, heads, steps, lr, seed, (x, y, vocab_size), n_layer,
                                            n_head, head_dim, base_width, progress=bar, attn_cls=attention,
                                            model_args=block, experts=experts)
    changed = {k: v for k, v in block.items() if v != defaults[k]}
    print(f"data: {source}; batch {batch_size}x{block_size}; {layout}; Adam lr {lr:g}, {steps} steps; "
          f"muP base width {base_width}; attention {attention.__name__}; block {changed or 'GPT-2'}")
    print_slopes(all_results, steps, axis)
    for d in ('assets', 'results'):
        os.makedirs(os.path.join(out_dir, d), exist_ok=True)
    png, csv_path = os.path.join(out_dir, 'assets', f'{out}.png'), os.path.join(out_dir, 'results', f'{out}.csv')
    model = f"{n_layer}-layer GPT, {layout}" if axis == 'width' else f"μP GPT, {layout}"
    plot(all_results, png, f"coord check vs {axis}: {model}, Adam lr {lr:g}, data: {source.split(' (')[0]}", axis)
    write_csv(all_results, csv_path, layout if axis == 'depth' else heads, axis)
    print(f"\nwrote {png} and {csv_path}")
