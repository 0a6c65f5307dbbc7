"""
The learning-rate sweep (docs/mup.md invariant 6): where does the best lr go as the model widens?
The final val loss over a x2 lr grid at several widths, SP and muP, as in the muP paper's Figure 1;
with --depths, across depths at the base width instead, for three depth scalings (none,
depth-muP, CompleteP). The setup is docs/mup-study.md's reference (sweep_runner.REFERENCE), 150
steps. With --batch_sizes (at fixed tokens) or --lengths (steps at a fixed batch), along the
batch or the length instead, muP at one width, the lr, (--tune=weight_decay) the weight decay or
(--tune=beta2) Adam's beta2, with the policy of transfer.py on or off (--policy). Every sweep
reports the optimum as a continuous value (a parabola through the grid's best points: use half
steps), its 90% bootstrap interval over --seeds, the slope against log2 of the axis (the
exponent) and the loss given up by reusing the first value's optimum. Writes
<out_dir>/assets/<out>.png and <out>_fit.png, records every run in <out_dir>/results/<out>.json
and the fit in <out>_fit.json (out_dir: a new directory unless --out_dir=. updates the
repository's committed files).

$ python lr_sweep.py                                    # the default grid: 56 runs, 19 min on 2 cores
$ python lr_sweep.py --widths=64,128,256,512,1024 --log2_lrs=-13,-12,-11,-10,-9,-8,-7,-6 --device=cuda --jobs=8
$ python lr_sweep.py --seeds=1337,1338,1339             # several seeds: the best lr of the mean loss
$ python lr_sweep.py --depths=2,4,8,16 --out=lr_transfer_depth   # lr across depth
$ python lr_sweep.py --optimizer=muon --muon_lr_mult=4 --out=lr_transfer_muon   # Muon for the hidden matrices
$ python lr_sweep.py --reuse=True                       # take the recorded runs, measure only what is missing
$ python lr_sweep.py --batch_sizes=4,16,64 --tokens=614400 --log2_lrs=-9.5,-9,-8.5,-8,-7.5,-7,-6.5 --seeds=1337,1338,1339
$ python lr_sweep.py --lengths=600,2400 --tune=weight_decay --log2_lr=-7.5 --seeds=1337,1338,1339
$ python lr_sweep.py --batch_sizes=4,16,64 --tune=beta2 --log2_lr=-8.6 --policy=True --critical_batch_tokens=1024 --seeds=1337,1338,1339

Run it from the repository root: data/ and out_dir are relative to the working directory, as
train.py's data/ is. Whether muP pays off against SP tuned at every width is mup_payoff.py's question.
"""

import json
import math
import os
import sys

from sweep_runner import DEPTH_VARIANTS, REFERENCE, Runner, depth_setting, setting

# -----------------------------------------------------------------------------
# ---- default config values, every one overridable with --key=value
widths = [64, 128, 256, 512]
depths = [] # e.g. 2,4,8,16: sweep across these depths at the base width instead, n_layer the base depth
# e.g. 4,16,64: sweep across these batch sizes (sequences per step) at `tokens` tokens in all, muP
# at `width`; the first is the proxy's
batch_sizes = []
# e.g. 150,600,2400: sweep across these lengths (steps) at the batch of batch_size, muP at `width`;
# the first is the proxy's
lengths = []
width = 128 # the batch and length sweeps' width (muP relative to base_width)
tokens = 614400 # the batch sweep's training tokens: max_iters = tokens / (batch_size x block_size)
policy = False # batch and length sweeps: each run derives its values from the proxy's (transfer.py)
tune = 'lr' # what the grid sets in the batch and length sweeps: 'lr', or 'weight_decay' or 'beta2' at 2**log2_lr
log2_lrs = [-12.0, -11.0, -10.0, -9.0, -8.0, -7.0, -6.0] # the grid: learning_rate = 2**k (half steps welcome)
log2_wds = [-6.0, -5.0, -4.0, -3.0, -2.0, -1.0] # tune='weight_decay': its grid, weight_decay = 2**k
log2_one_minus_beta2s = [-9.0, -8.0, -7.0, -6.0, -5.0, -4.0] # tune='beta2': its grid, beta2 = 1 - 2**k
log2_lr = -7.0 # tune='weight_decay' or 'beta2': the lr
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
    """({variant: {size: {log2_lr: mean val loss}}}, {variant: {size: [[loss per seed] per
    log2_lr]}}) over a grid of {(variant, size, log2_lr): setting}, its lrs ascending."""
    table, per_seed = {}, {}
    for (variant, size, log2_lr), losses in zip(grid, runner.per_seed(list(grid.values()))):
        table.setdefault(variant, {}).setdefault(size, {})[log2_lr] = sum(losses) / len(losses)
        per_seed.setdefault(variant, {}).setdefault(size, []).append(losses)
    return table, per_seed

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

# ---- the batch and length axes, with statistics over seeds

def axis_grid(axis, values, log2s, width, batch_size, sequence_tokens, tokens, tune, log2_lr, policy):
    """{(value, log2): setting}: muP at `width` for every value of the axis ('batch_size' at
    `tokens` tokens in all, or 'max_iters' at batch_size) and every grid point (the lr, or the
    weight decay or 1 - beta2 at 2**log2_lr). sequence_tokens: the tokens a sequence adds to a step
    (block_size x gradient_accumulation_steps). With `policy`, every run is told the proxy's (the
    first value's) tokens per step and in all, and derives its values from the grid's
    (transfer.py): the grid is in the proxy's units. The proxy's own runs are left without the
    base settings, which are the identity there (bitwise): they are the policy-off sweep's runs."""
    def batch_and_steps(value):
        if axis == 'batch_size':
            return value, tokens // (value * sequence_tokens)
        return batch_size, value
    proxy_batch, proxy_steps = batch_and_steps(values[0])
    grid = {}
    for value in values:
        batch, steps = batch_and_steps(value)
        changes = dict(batch_size=batch)
        if policy and value != values[0]:
            changes.update(base_batch_tokens=proxy_batch * sequence_tokens,
                           base_train_tokens=proxy_batch * sequence_tokens * proxy_steps)
        for k in log2s:
            if tune == 'lr':
                grid[value, k] = setting('mup', width, k, steps, **changes)
            elif tune == 'weight_decay':
                grid[value, k] = setting('mup', width, log2_lr, steps, weight_decay=2.0 ** k, **changes)
            else:
                grid[value, k] = setting('mup', width, log2_lr, steps, beta2=1 - 2.0 ** k, **changes)
    return grid


def fit_optimum(log2s, losses, points=5):
    """(x, loss there): the vertex of the parabola through the `points` finite grid points around
    the lowest loss, kept within them; the lowest point itself where the curve is not convex
    there. log2s ascending; a diverged run (inf) is left out."""
    import numpy as np
    finite = [(x, loss) for x, loss in zip(log2s, losses) if math.isfinite(loss)]
    xs, ys = np.array([x for x, _ in finite]), np.array([y for _, y in finite])
    i = int(ys.argmin())
    if len(xs) < 3:
        return float(xs[i]), float(ys[i])
    lo = max(0, min(i - points // 2, len(xs) - points))
    window_x, window_y = xs[lo:lo + points], ys[lo:lo + points]
    a, b, c = np.polyfit(window_x, window_y, 2)
    if a <= 0:
        return float(xs[i]), float(ys[i])
    x = float(np.clip(-b / (2 * a), window_x[0], window_x[-1]))
    return x, float(np.polyval([a, b, c], x))


def bootstrap_optima(log2s, per_seed, resamples=1000, seed=0):
    """fit_optimum of the seeds' mean loss over `resamples` resamples of the seeds (with
    replacement, the same seeds at every grid point: a seed's curve moves as one)."""
    import numpy as np
    losses = np.array(per_seed, dtype=float) # (grid points, seeds)
    rng = np.random.default_rng(seed)
    n = losses.shape[1]
    return np.array([fit_optimum(log2s, losses[:, rng.integers(0, n, n)].mean(1))[0] for _ in range(resamples)])


def axis_study(values, log2s, per_seed, interval=90, resamples=1000):
    """per_seed: {value: [[loss per seed] per grid point]}. For each value: the optimum (fit of the
    seeds' mean) and its bootstrap interval, the fitted lowest loss, and the loss given up by
    using the first value's optimum there (the mean curve, interpolated, at the first optimum
    minus at its own: 0 at the first value); and the exponent, the slope of the optimum against
    log2 of the value, with its interval, over all the values and between each two neighbours
    (a rule can hold on part of the axis: below the critical batch, say); None for one value."""
    import numpy as np
    tails = ((100 - interval) / 2, (100 + interval) / 2)
    rows, draws = [], []
    for value in values:
        mean = np.array(per_seed[value], dtype=float).mean(1)
        optimum, lowest = fit_optimum(log2s, mean)
        draw = bootstrap_optima(log2s, per_seed[value], resamples)
        draws.append(draw)
        rows.append(dict(value=value, optimum=optimum, interval=list(np.percentile(draw, tails)), lowest=lowest,
                         mean=list(mean)))
    transferred = rows[0]['optimum']
    for row in rows:
        finite = [(x, y) for x, y in zip(log2s, row['mean']) if math.isfinite(y)]
        curve = lambda x: float(np.interp(x, [x for x, _ in finite], [y for _, y in finite]))
        row['given_up'] = curve(transferred) - curve(row['optimum'])

    def exponent(first, last):
        logs = np.log2(values[first:last + 1])
        slope = lambda optima: float(np.polyfit(logs, optima[first:last + 1], 1)[0])
        slopes = [slope([draw[r] for draw in draws]) for r in range(resamples)]
        return dict(values=[values[first], values[last]], value=slope([row['optimum'] for row in rows]),
                    interval=list(np.percentile(slopes, tails)))
    return dict(rows=rows, exponent=exponent(0, len(values) - 1) if len(values) > 1 else None,
                segments=[exponent(i, i + 1) for i in range(len(values) - 1)] if len(values) > 2 else [],
                interval_percent=interval, log2s=list(log2s))


# what the grid of each `tune` sets, as its optimum is reported
UNITS = {'lr': 'log2 lr', 'weight_decay': 'log2 weight decay', 'beta2': 'log2(1 - beta2)'}


def report_axis(study, axis, tune, policy):
    unit = UNITS[tune]
    print(f"\nthe best {unit} along {axis}{' (in the proxy units, the policy on)' if policy else ''}, "
          f"{study['interval_percent']}% bootstrap intervals over seeds:")
    timescale = f" {'1/(lr wd)':>10}" if 'timescale_fraction' in study['rows'][0] else '' # of the run's steps
    print(f"{axis:>12} {'optimum':>9} {'interval':>17} {'lowest loss':>12} {'given up':>9}{timescale}")
    for r in study['rows']:
        timescale = f" {r['timescale_fraction']:>10.3f}" if 'timescale_fraction' in r else ''
        print(f"{r['value']:>12} {r['optimum']:>9.2f} [{r['interval'][0]:>6.2f}, {r['interval'][1]:>6.2f}] "
              f"{r['lowest']:>12.4f} {r['given_up']:>9.4f}{timescale}")
    optima = [r['optimum'] for r in study['rows']]
    edge = [r['value'] for r in study['rows'] if r['optimum'] in (study['log2s'][0], study['log2s'][-1])]
    if edge:
        print(f"the optimum is on the grid's edge at {axis} {edge}: a bound, not a measurement; widen the grid")
    if not study['exponent']: # one value: no slope
        return
    print(f"optimum moves {max(optima) - min(optima):.2f} ({unit}) over {axis} {study['rows'][0]['value']}.."
          f"{study['rows'][-1]['value']}; slope against log2 {axis} (the exponent):")
    for e in [study['exponent'], *study['segments']]:
        print(f"  {e['values'][0]:>6}..{e['values'][1]:<6} {e['value']:+.3f} [{e['interval'][0]:+.3f}, "
              f"{e['interval'][1]:+.3f}]")


def plot_axis(studies, axis, tune, title, path):
    """For each of {label: study}: the optimum (with its interval) and the loss given up by
    transferring the first value's, against the axis."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for label, study in studies.items():
        rows = study['rows']
        values = [r['value'] for r in rows]
        errors = [[r['optimum'] - r['interval'][0] for r in rows], [r['interval'][1] - r['optimum'] for r in rows]]
        line = left.errorbar(values, [r['optimum'] for r in rows], yerr=errors, marker='o', capsize=4, label=label)
        left.axhline(rows[0]['optimum'], color=line[0].get_color(), ls=':')
        right.plot(values, [r['given_up'] for r in rows], marker='o', label=label)
    left.set(xscale='log', xlabel=axis, ylabel=f"best {UNITS[tune]} (dotted: the first value's, transferred)")
    left.legend(fontsize=8)
    right.set(xscale='log', xlabel=axis, ylabel='val loss given up by transferring')
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == '__main__':
    from configurator import configure
    from errors import UserError
    import sweep_runner
    config = configure(globals(), sys.argv[1:], documented_in=[sweep_runner.__file__])
    setup = {k: config[k] for k in REFERENCE}
    base_width, n_layer, n_head = setup['base_width'], setup['n_layer'], setup['n_head']
    log2_lrs, log2_wds, log2_one_minus_beta2s = map(sorted, (log2_lrs, log2_wds, log2_one_minus_beta2s))
    if sum(map(bool, (depths, batch_sizes, lengths))) > 1:
        raise UserError("set one of depths, batch_sizes and lengths: a sweep goes along one axis")
    if tune not in UNITS:
        raise UserError(f"tune={tune!r}: use one of {', '.join(UNITS)}")
    if batch_sizes or lengths:
        axis = 'batch_size' if batch_sizes else 'max_iters'
        values = batch_sizes or lengths
        log2s = dict(lr=log2_lrs, weight_decay=log2_wds, beta2=log2_one_minus_beta2s)[tune]
        if tune == 'beta2' and max(log2s) >= 0:
            raise UserError(f"log2_one_minus_beta2s={log2s}: each must be below 0 (beta2 = 1 - 2**k in [0, 1))")
        if len(values) < 2 or sorted(values) != list(values):
            raise UserError(f"{axis} values {values}: give at least two, ascending (the first is the proxy's)")
        if width % n_head:
            raise UserError(f"width={width} must be a multiple of n_head={n_head}")
        sequence_tokens = setup['block_size'] * setup['gradient_accumulation_steps']
        if batch_sizes and any(tokens % (b * sequence_tokens) for b in batch_sizes):
            raise UserError(f"tokens={tokens} must be a whole number of steps at every batch size: a multiple of "
                            f"batch_size x {sequence_tokens} for each of {batch_sizes}")
        grid = axis_grid(axis, values, log2s, width, setup['batch_size'], sequence_tokens, tokens, tune,
                         log2_lr, policy)
        for d in ('results', 'assets'):
            os.makedirs(os.path.join(out_dir, d), exist_ok=True)
        runner = Runner(os.path.join(out_dir, 'results', f'{out}.json'), dict(setup, device=device), seeds, jobs,
                        threads, reuse)
        print(runner.describe())
        with runner:
            losses = runner.per_seed(list(grid.values()))
        print(runner.summary())
        per_seed = {}
        for (value, _), seed_losses in zip(grid, losses):
            per_seed.setdefault(value, []).append(seed_losses)
        study = axis_study(values, log2s, per_seed)
        if tune == 'weight_decay' and not policy:
            for row in study['rows']: # AdamW's timescale 1 / (lr x wd) in iterations, as a fraction of the run
                iterations = grid[row['value'], log2s[0]]['max_iters']
                row['timescale_fraction'] = 2.0 ** -(log2_lr + row['optimum']) / iterations
        report_axis(study, axis, tune, policy)
        fit_path = os.path.join(out_dir, 'results', f'{out}_fit.json')
        with open(fit_path, 'w') as f:
            json.dump(dict(axis=axis, tune=tune, policy=policy, width=width, seeds=seeds, **study),
                      f, indent=1)
        png = os.path.join(out_dir, 'assets', f'{out}.png')
        what = f"{setup['optimizer']}, μP width {width} (base {base_width}), {len(seeds)} seeds" + (
            f", {tokens:,} tokens" if axis == 'batch_size' else f", batch {setup['batch_size']}") + (
            ", the policy on" if policy else "")
        plot_axis({'μP': study}, axis, tune, f"the best {tune} along {axis}: {what}", png)
        print(f"\nwrote {fit_path} and {png}")
        sys.exit(0)
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
        table, per_seed = sweep(runner, grid)
    print(runner.summary())
    report_sweep(table, axis, sizes, log2_lrs, max_iters)
    studies = {NAMES[v]: axis_study(sizes, log2_lrs, per_seed[v]) for v in table}
    for name, study in studies.items():
        print(f"\n{name}:", end='')
        report_axis(study, axis, 'lr', policy=False)
    titles = {v: f'{variant_title(v, base_width, n_layer)}:\n{model}, {max_iters} steps' for v in table}
    optimizer_note = ''
    if setup['optimizer'] == 'muon':
        optimizer_note = f"Muon (lr x{setup['muon_lr_mult']:g}) for the hidden matrices, AdamW for the rest; "
    png = os.path.join(out_dir, 'assets', f'{out}.png')
    plot_sweep(table, axis, sizes, log2_lrs, titles, optimizer_note, png)
    fit_path, fit_png = os.path.join(out_dir, 'results', f'{out}_fit.json'), os.path.join(out_dir, 'assets', f'{out}_fit.png')
    with open(fit_path, 'w') as f:
        json.dump(dict(axis=axis, tune='lr', seeds=seeds, studies=studies), f, indent=1)
    plot_axis(studies, axis, 'lr', f"the best lr along {axis}: {optimizer_note}{model}, {max_iters} steps, "
              f"{len(seeds)} seed(s)", fit_png)
    print(f"\nwrote {png}, {fit_path} and {fit_png}")
