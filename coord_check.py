"""
Coordinate check for muP (MUP.md invariants 3 and 4), in the style of microsoft/mup's figure.

GPTs of several widths take a few Adam steps on one fixed batch, with the learning rates set as
train.py sets them (lr * lr_scale on every group of model.configure_optimizers). Forward hooks
record mean(|h|) of every block's attention and MLP output, and the logits, before each step.
Under muP these coordinates stay the same size as the width grows once the weights have moved;
under SP the block outputs grow about like width^2 after a few Adam steps. The check must look
after updates: at t = 0 muP's logits shrink like 1/sqrt(width) by design (the readout's output
vanishes at init in the muP limit), and the updates are what muP is about. It also records
mean(|h_t - h_0|), the change of each output since init: invariant 4 asks that the first step's
change be width-independent under muP.

$ python coord_check.py                                  # SP and muP, widths 128..1024, n_head fixed
$ python coord_check.py --heads=grow --out=coord_check_grow   # head_dim fixed, n_head grows
$ python coord_check.py --param=mup --widths=64,256,1024 --steps=5 --lr=3e-2

Writes assets/<out>.png and results/<out>.csv, prints a table of log2-log2 slopes vs width.
The functions (fixed_batch, build_model, measure, run_widths, slopes) are what tests/test_mup.py
uses, so the test and the figure are one implementation.
"""

import contextlib
import csv
import io
import os
import pickle
import sys

import numpy as np
import torch

from model import GPT, GPTConfig, set_lr

_HERE = os.path.dirname(os.path.abspath(__file__))
_DATA_DIR = os.path.join(_HERE, 'data', 'shakespeare_char')
_RANDOM_VOCAB = 65 # shakespeare_char's vocabulary size, so both data sources build the same model

# -----------------------------------------------------------------------------
# default config values, every one overridable with --key=value
# Widths start one doubling above the base: at the base width itself (64) finite-width effects
# put the MLP outputs' mean|h| 30-50% above their flat value at 128..1024 and tilt the slope.
widths = [128, 256, 512, 1024]
steps = 4 # Adam steps; statistics are recorded at t = 0 .. steps (t = updates done so far)
# Large enough that SP blows up within 4 steps (slopes ~2), small enough that the muP family is
# not yet oscillating on the fixed batch: at 1e-2 mean|h| at t=4 jumps by up to 2.5x between
# neighbouring widths and muP's worst |slope| reaches 0.3-0.5 (MUP.md suggests ~1e-2).
lr = 3e-3
param = 'both' # 'sp' | 'mup' | 'both'
heads = 'fixed' # 'fixed': n_head fixed, head_dim grows (nanoGPT's --n_embd habit); 'grow': head_dim fixed, n_head grows
n_layer = 2
n_head = 4 # used when heads='fixed'
head_dim = 16 # used when heads='grow' (becomes mup_base_head_dim under muP)
base_width = 64 # mup_base_width of the muP models
batch_size = 16
block_size = 64
seed = 1337
out = 'coord_check' # writes assets/<out>.png and results/<out>.csv
# -----------------------------------------------------------------------------

def random_batch(batch_size, block_size, seed, vocab_size=_RANDOM_VOCAB):
    """(x, y) of uniform random tokens: the data-independent batch the tests use."""
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(vocab_size, (batch_size, block_size + 1), generator=g)
    return data[:, :-1].contiguous(), data[:, 1:].contiguous()

def fixed_batch(batch_size, block_size, seed):
    """(x, y, vocab_size, source): one batch of data/shakespeare_char/train.bin if it has been
    prepared, else random tokens; `source` says which."""
    path = os.path.join(_DATA_DIR, 'train.bin')
    if not os.path.exists(path):
        x, y = random_batch(batch_size, block_size, seed)
        return x, y, _RANDOM_VOCAB, 'random tokens (data/shakespeare_char/train.bin not prepared)'
    data = np.memmap(path, dtype=np.uint16, mode='r')
    g = torch.Generator().manual_seed(seed)
    ix = torch.randint(len(data) - block_size - 1, (batch_size,), generator=g).tolist()
    xy = torch.stack([torch.from_numpy(data[i:i + block_size + 1].astype(np.int64)) for i in ix])
    with open(os.path.join(_DATA_DIR, 'meta.pkl'), 'rb') as f:
        vocab_size = pickle.load(f)['vocab_size']
    return xy[:, :-1].contiguous(), xy[:, 1:].contiguous(), vocab_size, 'shakespeare_char train.bin'

def build_model(width, param, heads='fixed', n_layer=2, n_head=4, head_dim=16, base_width=64,
                vocab_size=_RANDOM_VOCAB, block_size=64, seed=1337):
    """A GPT of n_embd=width, as train.py builds it (no bias, no dropout, tied readout), SP or
    muP relative to base_width. heads='fixed' keeps n_head; heads='grow' keeps head_dim and
    tells muP the base model's head dim (mup_base_head_dim)."""
    if param not in ('sp', 'mup'):
        raise ValueError(f"param={param!r}: use 'sp' or 'mup'")
    if heads not in ('fixed', 'grow'):
        raise ValueError(f"heads={heads!r}: use 'fixed' (n_head fixed) or 'grow' (head_dim fixed)")
    mup = param == 'mup'
    config = GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=n_layer,
                       n_head=n_head if heads == 'fixed' else width // head_dim, n_embd=width,
                       dropout=0.0, bias=False, mup_base_width=base_width if mup else 0,
                       mup_base_head_dim=head_dim if mup and heads == 'grow' else 0)
    torch.manual_seed(seed)
    with contextlib.redirect_stdout(io.StringIO()): # GPT prints its parameter count
        return GPT(config)

def layer_names(model):
    return [f'h.{i}.{part}' for i in range(len(model.transformer.h)) for part in ('attn', 'mlp')] + ['logits']

def measure(model, x, y, lr, steps, betas=(0.9, 0.99)):
    """Take `steps` AdamW steps on the batch (x, y) at constant lr, each param group at
    lr * lr_scale as train.py sets it (no weight decay, no clipping: Adam is invariant to
    clipping's rescale up to eps). Returns (h, dh, losses): h[t][layer] = mean|h| and
    dh[t][layer] = mean|h_t - h_0| in the forward after t updates, t = 0 .. steps."""
    outputs = {}
    hooks = []
    for i, block in enumerate(model.transformer.h):
        for part in ('attn', 'mlp'):
            def hook(module, inputs, output, name=f'h.{i}.{part}'):
                outputs[name] = output.detach()
            hooks.append(getattr(block, part).register_forward_hook(hook))
    with contextlib.redirect_stdout(io.StringIO()): # configure_optimizers prints its groups
        optimizer = model.configure_optimizers(0.0, lr, betas, 'cpu')
    set_lr(optimizer, lr)
    h, dh, losses, first = [], [], [], None
    model.train()
    try:
        for t in range(steps + 1):
            logits, loss = model(x, y)
            outputs['logits'] = logits.detach()
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
               n_head=4, head_dim=16, base_width=64, progress=None):
    """measure() at every width with the same batch and seed. batch: (x, y, vocab_size), default
    random tokens. Returns [{'width', 'h', 'dh', 'losses'}, ...] in the order of `widths`."""
    if len(widths) < 2:
        raise ValueError(f"widths={widths}: a slope needs at least two widths (MUP.md asks for >= 3 doublings)")
    x, y, vocab_size = batch if batch is not None else (*random_batch(8, 32, seed), _RANDOM_VOCAB)
    results = []
    for width in widths:
        model = build_model(width, param, heads, n_layer, n_head, head_dim, base_width,
                            vocab_size, x.size(1), seed)
        h, dh, losses = measure(model, x, y, lr, steps)
        results.append(dict(width=width, h=h, dh=dh, losses=losses))
        if progress is not None:
            progress.update(1)
    return results

def slope(widths, values):
    """Least-squares slope of log2(value) vs log2(width): 0 is width-independent, 1 grows like width."""
    return float(np.polyfit(np.log2(widths), np.log2(values), 1)[0])

def slopes(results, step=-1, stat='h'):
    """{layer: slope vs width} of statistic `stat` ('h' or 'dh') at step `step`."""
    widths = [r['width'] for r in results]
    layers = results[0][stat][step].keys()
    return {k: slope(widths, [r[stat][step][k] for r in results]) for k in layers}

# -----------------------------------------------------------------------------

def plot(all_results, path, title):
    """microsoft/mup-style coord check: one panel per step, log-log mean|h| vs width, one line
    per layer; a row per parameterization."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    rows = list(all_results)
    n_steps = len(next(iter(all_results.values()))[0]['h'])
    fig, axes = plt.subplots(len(rows), n_steps, figsize=(3 * n_steps, 3 * len(rows)), squeeze=False)
    for r, p in enumerate(rows):
        results = all_results[p]
        widths = [res['width'] for res in results]
        layers = list(results[0]['h'][0])
        colors = matplotlib.colormaps['viridis'](np.linspace(0, 0.9, len(layers)))
        for t in range(n_steps):
            ax = axes[r, t]
            for layer, color in zip(layers, colors):
                ax.plot(widths, [res['h'][t][layer] for res in results], marker='o', ms=3,
                        color=color, label=layer)
            ax.set_xscale('log', base=2)
            ax.set_yscale('log')
            ax.set_title(f"{'μP' if p == 'mup' else 'SP'}  t={t}")
            ax.set_xlabel('width')
            if t == 0:
                ax.set_ylabel('mean |h|')
    axes[0, -1].legend(fontsize=7, loc='upper left', bbox_to_anchor=(1.02, 1.0))
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

def write_csv(all_results, path, heads):
    with open(path, 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(['param', 'heads', 'width', 'step', 'layer', 'mean_abs_h', 'mean_abs_dh', 'loss'])
        for p, results in all_results.items():
            for res in results:
                for t, (h, dh) in enumerate(zip(res['h'], res['dh'])):
                    for layer in h:
                        w.writerow([p, heads, res['width'], t, layer, f"{h[layer]:.6g}",
                                    f"{dh[layer]:.6g}", f"{res['losses'][t]:.6g}"])

def print_slopes(all_results, steps):
    tables = [(f'mean|h| at t={steps}', 'h', -1), ('mean|h_1 - h_0| (first update)', 'dh', 1)]
    for name, stat, step in tables:
        print(f"\nlog2-log2 slope vs width of {name}")
        per_param = {p: slopes(res, step, stat) for p, res in all_results.items()}
        print(f"{'layer':<10}" + ''.join(f"{'μP' if p == 'mup' else 'SP':>8}" for p in per_param))
        for layer in next(iter(per_param.values())):
            print(f"{layer:<10}" + ''.join(f"{s[layer]:>8.2f}" for s in per_param.values()))
        print(f"{'max |s|':<10}" + ''.join(f"{max(abs(v) for v in s.values()):>8.2f}" for s in per_param.values()))

if __name__ == '__main__':
    from tqdm import tqdm

    from configurator import configure
    configure(globals(), sys.argv[1:])
    if param not in ('sp', 'mup', 'both'):
        raise ValueError(f"param={param!r}: use 'sp', 'mup' or 'both'")
    params = ['sp', 'mup'] if param == 'both' else [param]
    x, y, vocab_size, source = fixed_batch(batch_size, block_size, seed)
    layout = (f'n_head={n_head} fixed' if heads == 'fixed' else f'head_dim={head_dim} fixed')
    print(f"data: {source}; batch {batch_size}x{block_size}; {n_layer} layers, {layout}; "
          f"Adam lr {lr:g}, {steps} steps; muP base width {base_width}")
    all_results = {}
    with tqdm(total=len(params) * len(widths), desc='widths') as bar:
        for p in params:
            all_results[p] = run_widths(widths, p, heads, steps, lr, seed, (x, y, vocab_size), n_layer,
                                        n_head, head_dim, base_width, progress=bar)
    print_slopes(all_results, steps)
    for d in ('assets', 'results'):
        os.makedirs(os.path.join(_HERE, d), exist_ok=True)
    png, csv_path = os.path.join(_HERE, 'assets', f'{out}.png'), os.path.join(_HERE, 'results', f'{out}.csv')
    plot(all_results, png, f"coord check: {n_layer}-layer GPT, {layout}, Adam lr {lr:g}, data: {source.split(' (')[0]}")
    write_csv(all_results, csv_path, heads)
    print(f"\nwrote {png} and {csv_path}")
