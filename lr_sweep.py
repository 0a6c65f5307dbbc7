"""
The learning-rate sweep (docs/mup.md invariant 6): where does the best lr go as the model widens?
The final val loss over a x2 lr grid at several widths, SP and muP, as in the muP paper's Figure 1;
with --depths, across depths at the base width instead, for three depth scalings (none,
depth-muP, CompleteP). The setup is docs/mup-study.md's reference (sweep_runner.REFERENCE), 150
steps. Writes <out_dir>/assets/<out>.png and records every run in <out_dir>/results/<out>.json
(out_dir: a new directory unless --out_dir=. updates the repository's committed files).

$ python lr_sweep.py                                    # the default grid: 56 runs, 19 min on 2 cores
$ python lr_sweep.py --widths=64,128,256,512,1024 --log2_lrs=-13,-12,-11,-10,-9,-8,-7,-6 --device=cuda --jobs=8
$ python lr_sweep.py --seeds=1337,1338,1339             # several seeds: the best lr of the mean loss
$ python lr_sweep.py --depths=2,4,8,16 --out=lr_transfer_depth   # lr across depth
$ python lr_sweep.py --optimizer=muon --muon_lr_mult=4 --out=lr_transfer_muon   # Muon for the hidden matrices
$ python lr_sweep.py --reuse=True                       # take the recorded runs, measure only what is missing

Run it from the repository root: data/ and out_dir are relative to the working directory, as
train.py's data/ is. Whether muP pays off against SP tuned at every width is mup_payoff.py's question.
"""

import math
import os
import sys

from sweep_runner import DEPTH_VARIANTS, REFERENCE, Runner, depth_setting, setting

# -----------------------------------------------------------------------------
# ---- default config values, every one overridable with --key=value
widths = [64, 128, 256, 512]
depths = [] # e.g. 2,4,8,16: sweep across these depths at the base width instead, n_layer the base depth
log2_lrs = [-12, -11, -10, -9, -8, -7, -6] # the x2 grid: learning_rate = 2**k
seeds = [1337] # several: the best lr is the one with the lowest mean val loss over seeds
max_iters = 150
globals().update(REFERENCE) # the settings the runs share, from dataset to muon_momentum (--help lists them)
# how to run
device = 'cpu'
jobs = 2 # train.py processes at a time
threads = 1 # OMP threads per process
reuse = False # take the runs already recorded in <out_dir>/results/<out>.json instead of measuring them again
out_dir = 'out-studies' # where results/ and assets/ go: --out_dir=. updates the repository's committed files
out = 'lr_transfer' # <out_dir>/results/<out>.json, <out_dir>/assets/<out>.png
# -----------------------------------------------------------------------------

NAMES = {'sp': 'SP', 'mup': 'μP', 'none': 'no depth scaling', 'depth-muP': 'depth-μP', 'CompleteP': 'CompleteP'}


def width_grid(widths, log2_lrs, it):
    """{(param, width, log2_lr): setting}: SP and muP at every width and lr."""
    return {(p, w, k): setting(p, w, k, it) for p in ('sp', 'mup') for w in widths for k in log2_lrs}

def depth_grid(depths, log2_lrs, it, width, base_depth):
    """{(variant, depth, log2_lr): setting}: each of DEPTH_VARIANTS at every depth and lr."""
    return {(v, d, k): depth_setting(v, d, width, base_depth, k, it)
            for v in DEPTH_VARIANTS for d in depths for k in log2_lrs}

def sweep(runner, grid):
    """{variant: {size: {log2_lr: mean val loss}}} over a grid of {(variant, size, log2_lr): setting}."""
    table = {}
    for (variant, size, log2_lr), loss in zip(grid, runner.evaluate(list(grid.values()))):
        table.setdefault(variant, {}).setdefault(size, {})[log2_lr] = loss
    return table

def best(curve):
    """log2 lr of the lowest loss in {log2_lr: loss}."""
    return min(curve, key=curve.get)

def variant_title(variant, base_width, base_depth):
    if variant == 'mup':
        return f'μP (base width {base_width})'
    if variant in ('depth-muP', 'CompleteP'):
        return f"{NAMES[variant]} (α = {DEPTH_VARIANTS[variant]['mup_depth_alpha']:g}, base depth {base_depth})"
    return NAMES[variant]

def plot_sweep(table, axis, sizes, log2_lrs, titles, optimizer_note, path):
    """One panel per variant: a loss curve over log2_lrs per size, its best lr starred."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import numpy as np
    fig, axes = plt.subplots(1, len(table), figsize=(5 * len(table), 4), sharey=True)
    colors = matplotlib.colormaps['viridis'](np.linspace(0, 0.9, len(sizes)))
    finite = [v for curves in table.values() for c in curves.values() for v in c.values() if math.isfinite(v)]
    lo = min(finite)
    top = min(lo + 1.0, max(finite) + 0.05) # off-scale and diverged runs are drawn here: the minima stay readable
    for ax, variant in zip(axes, table):
        for size, color in zip(sizes, colors):
            curve = table[variant][size]
            ks = sorted(curve)
            ax.plot(ks, [min(curve[k], top) for k in ks], marker='o', ms=3, color=color, label=f'{axis} {size}')
            b = best(curve)
            ax.plot([b], [curve[b]], marker='*', ms=14, color=color, markeredgecolor='black')
        ax.set_title(titles[variant], fontsize=10)
        ax.set_xlabel('log2 learning rate')
        ax.set_xticks(log2_lrs)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel('final val loss (shakespeare_char)')
    axes[0].set_ylim(lo - 0.05, top + 0.02)
    axes[-1].legend(fontsize=8)
    fig.suptitle(f'learning-rate transfer across {axis}: {optimizer_note}★ = best lr; diverged or off-scale runs are '
                 f'drawn at the top edge', fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

def report_sweep(table, axis, sizes, log2_lrs, it):
    print(f"\nbest log2(lr) per {axis} ({it} steps, final val loss):")
    print(f"{axis:>6} " + ' '.join(f"{NAMES[v]:>18}" for v in table))
    for size in sizes:
        print(f"{size:>6} " + ' '.join(f"{best(table[v][size]):>11} {table[v][size][best(table[v][size])]:.3f}"
                                       for v in table))
    for variant in table:
        bests = [best(table[variant][size]) for size in sizes]
        edge = [s for s, b in zip(sizes, bests) if b in (min(log2_lrs), max(log2_lrs))]
        note = f"; best on the grid's edge at {axis}s {edge}: widen log2_lrs" if edge else ""
        span = max(bests) - min(bests)
        print(f"{variant}: best lr moves by {span} grid steps across {axis}s {sizes}{note}"
              + transfer_verdict(variant, span, axis))


def transfer_verdict(variant, span, axis):
    """docs/mup.md, invariant 6, across >= 8x the width: muP's best lr moves by at most one grid
    step; SP's must move (else the grid cannot tell them apart)."""
    if axis != 'width' or variant not in ('sp', 'mup'):
        return ''
    if variant == 'mup':
        return f": {'passes' if span <= 1 else 'FAILS'} (muP: at most 1)"
    return f": {'moves, as SP must' if span >= 1 else 'does NOT move: the grid cannot tell muP from SP'}"

if __name__ == '__main__':
    from configurator import configure
    from errors import UserError
    import sweep_runner
    config = configure(globals(), sys.argv[1:], documented_in=[sweep_runner.__file__])
    setup = {k: config[k] for k in REFERENCE}
    base_width, n_layer, n_head = setup['base_width'], setup['n_layer'], setup['n_head']
    if depths:
        if n_layer not in depths:
            raise UserError(f"depths={depths} must include n_layer={n_layer}: the base depth of the depth scalings, "
                              f"where the lr is found")
        if base_width % n_head:
            raise UserError(f"base_width={base_width}, the depth sweep's width, must be a multiple of "
                              f"n_head={n_head}")
        grid = depth_grid(depths, log2_lrs, max_iters, base_width, n_layer)
        axis, sizes, model = 'depth', depths, f'width {base_width}'
    else:
        if base_width not in widths:
            raise UserError(f"base_width={base_width} is not among widths={widths}: muP's reference model "
                              f"must be swept too")
        if any(w % n_head for w in widths):
            raise UserError(f"every width must be a multiple of n_head={n_head}: got widths={widths}")
        grid = width_grid(widths, log2_lrs, max_iters)
        axis, sizes, model = 'width', widths, f'{n_layer}-layer GPT'
    for d in ('results', 'assets'):
        os.makedirs(os.path.join(out_dir, d), exist_ok=True)
    runner = Runner(os.path.join(out_dir, 'results', f'{out}.json'), dict(setup, device=device), seeds, jobs, threads, reuse)
    print(runner.describe())
    with runner:
        table = sweep(runner, grid)
    print(runner.summary())
    report_sweep(table, axis, sizes, log2_lrs, max_iters)
    titles = {v: f'{variant_title(v, base_width, n_layer)}:\n{model}, {max_iters} steps' for v in table}
    optimizer_note = ''
    if setup['optimizer'] == 'muon':
        optimizer_note = f"Muon (lr x{setup['muon_lr_mult']:g}) for the hidden matrices, AdamW for the rest; "
    png = os.path.join(out_dir, 'assets', f'{out}.png')
    plot_sweep(table, axis, sizes, log2_lrs, titles, optimizer_note, png)
    print(f"\nwrote {png}")
