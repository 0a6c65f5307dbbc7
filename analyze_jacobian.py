"""
Can the softmax backward's lateral (off-diagonal) term be dropped? Measured on our own model.

For one attention row A = softmax(s) and the upstream gradient g = dL/dA, the exact backward is
    g_full = dL/ds = A * (g - sum_j A_j g_j)        (Jacobian diag(A) - A A^T)
A local learning rule keeps only the Jacobian's diagonal, dA_i/ds_i = A_i (1 - A_i):
    g_diag = A * (1 - A) * g                        (drops the lateral -A_i sum_{j!=i} A_j g_j)
and a straight-through estimator passes g_ste = g unchanged.

The script trains a small softmax GPT (or loads a train.py checkpoint), runs one diagnostic
batch through a copy of it whose attention is a MuPFlexAttention subclass that computes the
probabilities A with the model's own dense code and keeps them (after backward, g = dL/dA), and
reports per layer and head:
  mean_A     mean of A over the unmasked (q, k) entries. Rows sum to 1, so this is fixed by the
             mask (2/(T+1) for causal attention); it checks the capture, not the model
  entropy    mean over query rows of -sum_k A log A, in nats: 0 = one-hot, log(#keys) = uniform
  r_diag     ||g_diag||^2 / ||g_full||^2, summed over the whole batch: 1 = the right energy
  1-r_diag   its complement. ||g_full||^2 = ||g_diag||^2 + ||g_lat||^2 + 2<g_diag, g_lat>, so this
             is the lateral share only when the two parts are orthogonal; it can be negative
  cos_diag   cos(g_diag, g_full); cos_ste = cos(g_ste, g_full)
A sample for the cosines is one (batch element, head): the vector of all its unmasked (q, k)
entries (masked entries are left out, which matters for g_ste); cosines are averaged over the
batch elements. Zero vectors: if both vectors (or both energies, for r_diag) are 0, as for
one-hot rows where g_full = g_diag = 0, the value is 1 (the approximation is exact there); if only
one is 0 the cosine is 0. Nothing is divided by zero and no value is NaN (a zero g_full under a
nonzero g_diag, which needs g constant over every row's keys, gives a huge r_diag).

$ python analyze_jacobian.py                    # 4 layers x 4 heads x 128, 500 steps, then analyse
$ python analyze_jacobian.py --attn_mod=sliding_window:16 --mup_base_width=64
$ python analyze_jacobian.py --ckpt=out-shakespeare-char --batch_size=8   # a train.py out_dir, its dataset
$ python analyze_jacobian.py --attn_cls=gated_attention.py:HeadwiseGate   # your attention class
$ python analyze_jacobian.py --qk_norm=True --pos_emb=rope --norm=rmsnorm --mlp=relu2   # a modern block
Writes OUT/jacobian.json (every number) and OUT/jacobian.png (r_diag and cos_diag heatmaps).
"""

import functools
import json
import os
import runpy
import sys
import time
from dataclasses import asdict, replace

import numpy as np
import torch
from tqdm import tqdm

import checkpoints
from attn_mods import attention_probs, repeat_heads
from configurator import configure, model_config, model_settings, resolve_device
from data import get_batch, read_meta
from errors import UserError
from model import GPT, set_lr

# -----------------------------------------------------------------------------
# ---- settings, each overridable with --key=value
steps = 500          # training steps from scratch (0: analyse the model at initialisation)
batch_size = 32      # sequences per training batch and in the diagnostic batch
device = 'auto'      # 'auto' (cuda > mps > cpu), 'cpu', 'cuda', ...
out = 'out-jacobian' # where jacobian.json and jacobian.png go
ckpt = ''            # a train.py run (its out_dir or ckpt.pt): analyse its model instead of training
# ---- the model trained here (without --ckpt): every field of model.GPTConfig is a setting, at its
# default there but for these (its comment there is its --help). Try --attn_mod=sliding_window:16,
# --qk_norm=True (it changes what reaches the softmax) or --attn_cls=path/to/file.py:YourClass.
globals().update(model_settings(n_layer=4, n_head=4, n_embd=128, block_size=64, bias=False))
# -----------------------------------------------------------------------------
# fixed by issue 5 (underscored, so the configurator does not offer them as keys)
_LR, _SEED = 1e-3, 1337
_WEIGHT_DECAY, _BETAS, _GRAD_CLIP = 0.1, (0.9, 0.99), 1.0 # train.py's defaults
_HERE = os.path.dirname(os.path.abspath(__file__))
_DATA_DIR = os.path.join(_HERE, 'data', 'shakespeare_char')
_PREPARE = os.path.join(_DATA_DIR, 'prepare.py')
# verdict thresholds on the mean cos_diag of a layer (cos 0.9 is 26 degrees off the true gradient)
_GOOD, _FAIR = 0.9, 0.7
# the settings that only make sense when training, with their defaults: --ckpt refuses others
_TRAINING_DEFAULTS = {key: globals()[key] for key in ('steps', *model_settings())}

# -----------------------------------------------------------------------------
# the two backward rules and the statistics

def softmax_backward(A, g):
    """Exact dL/ds of A = softmax(s) over the last dim, given g = dL/dA."""
    return A * (g - (A * g).sum(-1, keepdim=True))

def diagonal_backward(A, g):
    """Only the Jacobian's diagonal dA_i/ds_i = A_i (1 - A_i): the lateral term dropped."""
    return A * (1 - A) * g

def _ratio(num, den):
    """num / den, with 0/0 = 1 (both gradients vanish: they agree) and never NaN."""
    return torch.where((num == 0) & (den == 0), 1.0, num / den.clamp_min(torch.finfo(den.dtype).tiny))

def _cos(x, y):
    """Cosine per (batch element, head) over the (q, k) entries: 1 if both are zero vectors,
    0 if only one is."""
    nx, ny = x.norm(dim=(-2, -1)), y.norm(dim=(-2, -1))
    cos = (x * y).sum((-2, -1)) / (nx * ny).clamp_min(torch.finfo(nx.dtype).tiny)
    cos = torch.where((nx == 0) & (ny == 0), 1.0, cos)
    return cos.clamp(-1.0, 1.0) # rounding can step past +-1 by an ulp

def attention_stats(A, g, mask):
    """One layer's statistics per head (see the module docstring).
    A, g: (B, H, T, T) probabilities and dL/dA; mask: (B, H, T, T) bool, True where a query may
    attend. Returns {name: (H,) float64 tensor}."""
    A, g = A.double(), torch.where(mask, g.double(), 0.0) # g_ste lives on the unmasked entries only
    g_full, g_diag = softmax_backward(A, g), diagonal_backward(A, g)
    rows = mask.any(-1) # query rows with at least one key
    entropy = -torch.special.xlogy(A, A).sum(-1) # 0 log 0 = 0
    energy = lambda t: t.square().sum((0, 2, 3))
    r_diag = _ratio(energy(g_diag), energy(g_full))
    return {
        'mean_A': (A * mask).sum((0, 2, 3)) / mask.sum((0, 2, 3)),
        'entropy': (entropy * rows).sum((0, 2)) / rows.sum((0, 2)),
        'r_diag': r_diag,
        '1-r_diag': 1 - r_diag,
        'cos_diag': _cos(g_diag, g_full).mean(0),
        'cos_ste': _cos(g, g_full).mean(0),
    }

# -----------------------------------------------------------------------------
# the model: capture, data, training, checkpoint

def capturing(attn_cls):
    """A subclass of the model's attention class (or a functools.partial of one) whose attend()
    computes the attention densely and keeps the probabilities A (after backward, A.grad is
    dL/dA) and the mask they were computed under. Everything else is the model's own class: a
    subclass's parameters, mods and forward (a gate on the heads, say) are kept."""
    if isinstance(attn_cls, functools.partial):
        return functools.partial(capturing(attn_cls.func), *attn_cls.args, **attn_cls.keywords)

    class CapturingAttention(attn_cls):
        def attend(self, q, k, v, mask): # the dense backend's Mask: its data is a bool tensor
            self.probs = attention_probs(q, k, mask.data, self.active_score_mod(), self.scale)
            self.probs.retain_grad()
            self.mask = mask.data.expand(self.probs.shape)
            return self.probs @ repeat_heads(v, q.size(1)) # grouped-query attention: fewer value heads
    return CapturingAttention

def capture_attention(model, x, y):
    """One forward and backward of a capturing copy of `model` (same weights, dense backend, eval
    mode: no dropout). Returns the loss and, per layer, (A, dL/dA, mask), each (B, n_head, T, T)."""
    twin = GPT(replace(model.config, attn_backend='dense'), capturing(model.attn_cls)).to(x.device)
    twin.load_state_dict(model.state_dict())
    twin.eval()
    _, loss = twin(x, y)
    loss.backward()
    attns = [block.attn for block in twin.transformer.h]
    return loss.item(), [(a.probs.detach(), a.probs.grad, a.mask) for a in attns]

def analyze(model, x, y):
    """Loss on (x, y) and {name: (n_layer, n_head) float64 tensor} of attention_stats."""
    loss, layers = capture_attention(model, x, y)
    per_layer = [attention_stats(*layer) for layer in layers]
    return loss, {name: torch.stack([s[name] for s in per_layer]) for name in per_layer[0]}

def ensure_data(data_dir=_DATA_DIR):
    """Prepare shakespeare_char when train.bin/val.bin/meta.pkl are missing (prepare.py reuses
    data_dir/input.txt if it is there, else downloads it). Returns the vocab size."""
    if not all(os.path.exists(os.path.join(data_dir, f)) for f in ('train.bin', 'val.bin', 'meta.pkl')):
        print(f"{data_dir} is not prepared: running {_PREPARE}")
        try:
            runpy.run_path(_PREPARE)['prepare'](out_dir=data_dir)
        except RuntimeError as e: # the download failed (offline)
            command = f"python {os.path.relpath(_PREPARE)} --input PATH/TO/input.txt"
            if os.path.abspath(data_dir) != _DATA_DIR:
                command += f" --out_dir {data_dir}"
            raise RuntimeError(f"{e}\nPrepare the data from a local copy of input.txt, then rerun:\n  {command}") from None
    return read_meta(data_dir)['vocab_size']

def train(model, data_dir, steps, batch_size, device):
    """AdamW at the constant lr 1e-3 (no schedule: issue 5 fixes it). Returns the last loss."""
    optimizer = model.configure_optimizers(_WEIGHT_DECAY, _LR, _BETAS, torch.device(device).type)
    set_lr(optimizer, _LR) # each muP group at _LR * its lr_scale, as train.py
    generator = torch.Generator().manual_seed(_SEED)
    model.train()
    bar = tqdm(range(steps), desc='training')
    for _ in bar:
        x, y = get_batch(data_dir, 'train', batch_size, model.config.block_size, generator, device)[0]
        _, loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), _GRAD_CLIP)
        optimizer.step()
        bar.set_postfix(loss=f'{loss.item():.4f}')
    return loss.item()

# -----------------------------------------------------------------------------
# output

def format_table(stats):
    """Aligned table: one row per (layer, head), then one 'mean' row per layer."""
    names = list(stats)
    n_layer, n_head = stats[names[0]].shape
    lines = ['layer  head  ' + '  '.join(f'{n:>8}' for n in names)]
    row = lambda layer, head, values: f'{layer:>5}  {head:>4}  ' + '  '.join(f'{v:8.4f}' for v in values)
    for l in range(n_layer):
        lines += [row(l, h, [stats[n][l, h] for n in names]) for h in range(n_head)]
    lines += [row(l, 'mean', [stats[n][l].mean() for n in names]) for l in range(n_layer)]
    return '\n'.join(lines)

def interpretation(stats):
    """Two lines: a verdict per layer on the diagonal-only rule, then the overall picture."""
    cos, r = stats['cos_diag'].mean(1), stats['r_diag'].mean(1)
    verdict = lambda c: 'good' if c >= _GOOD else 'fair' if c >= _FAIR else 'poor'
    layers = ', '.join(f"layer {l} {verdict(c)} (cos {c:.2f}, r {r[l]:.2f})" for l, c in enumerate(cos.tolist()))
    good = [l for l, c in enumerate(cos.tolist()) if c >= _GOOD]
    return (f"diagonal-only backward (lateral term dropped): {layers}\n"
            f"verdict: a good approximation (mean cos_diag >= {_GOOD}) in {len(good)}/{len(cos)} layers"
            f"{' ' + str(good) if good else ''}; mean cos_diag {stats['cos_diag'].mean():.2f} vs "
            f"straight-through cos_ste {stats['cos_ste'].mean():.2f}; r_diag {stats['r_diag'].mean():.2f} "
            f"(1 = right magnitude)")

def save_heatmaps(stats, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    n_layer, n_head = stats['r_diag'].shape
    fig, axes = plt.subplots(1, 2, figsize=(4 + 1.6 * n_head, 1.5 + 0.6 * n_layer), constrained_layout=True)
    for ax, name in zip(axes, ('r_diag', 'cos_diag')):
        values = stats[name].numpy()
        im = ax.imshow(values, cmap='viridis', vmin=min(0.0, values.min()), vmax=max(1.0, values.max()))
        for (l, h), v in np.ndenumerate(values):
            ax.text(h, l, f'{v:.2f}', ha='center', va='center', color='w' if im.norm(v) < 0.5 else 'k', fontsize=8)
        ax.set(title=name, xlabel='head', ylabel='layer', xticks=range(n_head), yticks=range(n_layer))
        fig.colorbar(im, ax=ax)
    fig.savefig(path, dpi=120)
    plt.close(fig)

def run(model, data_dir, steps, batch_size, device, out):
    """Train `steps` steps, analyse one diagnostic val batch, print the table and its
    interpretation, write out/jacobian.json and out/jacobian.png. Returns the JSON's dict."""
    t0 = time.time()
    train_loss = train(model, data_dir, steps, batch_size, device) if steps else None
    t_train = time.time() - t0
    generator = torch.Generator().manual_seed(_SEED + 1) # the same diagnostic batch in every run
    x, y = get_batch(data_dir, 'val', batch_size, model.config.block_size, generator, device)[0]
    diag_loss, stats = analyze(model, x, y)
    stats = {name: values.cpu() for name, values in stats.items()}
    print(format_table(stats))
    print(interpretation(stats))
    os.makedirs(out, exist_ok=True)
    save_heatmaps(stats, os.path.join(out, 'jacobian.png'))
    results = {
        'model_args': asdict(model.config), 'steps': steps, 'batch_size': batch_size,
        'seq_len': model.config.block_size, 'train_loss': train_loss, 'diag_loss': diag_loss,
        'train_time_s': t_train, 'total_time_s': time.time() - t0,
        'metrics': {name: values.tolist() for name, values in stats.items()},           # [layer][head]
        'layer_mean': {name: values.mean(1).tolist() for name, values in stats.items()}, # [layer]
    }
    with open(os.path.join(out, 'jacobian.json'), 'w') as f:
        json.dump(results, f, indent=1)
    print(f"wrote {out}/jacobian.json and {out}/jacobian.png; "
          f"time {results['total_time_s']:.1f}s (training {t_train:.1f}s)")
    return results

def main(c):
    """c: the settings, as configure() returns them."""
    dev = resolve_device(c['device'])
    refused = [k for k, default in _TRAINING_DEFAULTS.items() if c[k] != default]
    if c['ckpt'] and refused:
        raise UserError(f"--ckpt analyses the checkpoint's own model and trains nothing: drop "
                        f"{', '.join('--' + k for k in refused)}")
    torch.manual_seed(_SEED)
    if not c['ckpt']:
        vocab_size = ensure_data()
        model = GPT(model_config(c, vocab_size=vocab_size)).to(dev)
        return run(model, _DATA_DIR, c['steps'], c['batch_size'], dev, c['out'])
    model, checkpoint = checkpoints.load_run(c['ckpt'], dev, setting='ckpt')
    return run(model, checkpoints.data_dir_of(checkpoint, c['ckpt'], 'val'), 0, c['batch_size'], dev, c['out'])

if __name__ == '__main__':
    main(configure(globals(), sys.argv[1:]))
