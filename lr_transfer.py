"""
muTransfer experiment (docs/mup.md invariant 6): sweep the learning rate on a x2 grid at several
widths, SP and muP, on shakespeare_char, and see where the best lr goes as the model widens.
In the style of the muP paper's Figure 1.

Every run is `train.py` itself in a subprocess (the same model, optimizer groups, lr_scale and
warmup + cosine schedule), so nothing here can train by different rules. The setup is docs/mup-study.md's
reference: 2 layers, 4 heads, 150 steps of batch 16x64, warmup 10, cosine decay to lr/10, clip
1.0, no weight decay; the score is the final val loss.

$ python lr_transfer.py                                   # the default grid, 19 min on 2 cores
$ python lr_transfer.py --widths=64,128,256,512,1024 --log2_lrs=-13,-12,-11,-10,-9,-8,-7,-6 --device=cuda --jobs=8
$ python lr_transfer.py --seeds=1337,1338,1339            # several seeds: the best lr of the mean loss
$ python lr_transfer.py --tune=True --horizons=150,1000 --device=cuda --jobs=12 --out=lr_transfer_cuda
$ python lr_transfer.py --causes=True --widths=64,512 --out=lr_transfer_causes   # results/<out>_summary.json
$ python lr_transfer.py --depths=2,4,8,16 --out=lr_transfer_depth   # lr across depth: none, depth-muP, CompleteP
$ python lr_transfer.py --joint=True --horizons=150 # tune at 64 x 2 layers, transfer to 256 x 8 (results/<out>_joint.json)
$ python lr_transfer.py --optimizer=muon --muon_lr_mult=8 --out=lr_transfer_muon   # Muon for the hidden matrices

--tune=True answers "does muP pay off?": at every horizon (max_iters) it tunes at the base width
the muTransfer hyperparameters (lr, mup_output_mult, mup_attn_mult, mup_input_mult, init_std) by
one round of coordinate search over x2 grids, transfers them unchanged to every width, and
compares with SP at its own best lr for each width (searched on the same grid at that horizon),
and with SP given muP's tuned multipliers and init std at its own best lr (the control: what do
the multipliers buy without muP?).

--causes=True asks why muP with only the lr transferred loses to SP tuned at every width: for
each suspect (base width, head dim, Adam eps, weight decay, the 1/m hidden-lr exponent) it changes
that one setting and measures the gap at the widest width again.

Runs are cached in results/<out>.json (one record per run, keyed by every setting that changes
its outcome), so an interrupted sweep resumes where it stopped and the tuning reuses the sweep.
Writes assets/<out>.png; --tune writes results/<out>_tuned.json and assets/<out>_tuned.png.
"""

import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

_HERE = os.path.dirname(os.path.abspath(__file__))

# -----------------------------------------------------------------------------
# default config values, every one overridable with --key=value
widths = [64, 128, 256, 512]
base_width = 64 # mup_base_width of the muP runs
log2_lrs = [-12, -11, -10, -9, -8, -7, -6] # the x2 grid: learning_rate = 2**k
seeds = [1337] # several: the best lr is the one with the lowest mean val loss over seeds
# the reference setup of docs/mup.md
dataset = 'shakespeare_char'
n_layer = 2
n_head = 4
batch_size = 16
block_size = 64
max_iters = 150
warmup_iters = 10
grad_clip = 1.0
weight_decay = 0.0
mup_scale_weight_decay = True
adam_eps = 1e-8
mup_hidden_lr_exponent = 1.0 # 1 is muP; --causes tries another
eval_iters = 20 # val batches for the final loss; the same batches for every run, so comparisons are paired
# how to run
device = 'cpu'
jobs = 2 # train.py processes at a time
threads = 1 # OMP threads per process
out = 'lr_transfer' # results/<out>.json, assets/<out>.png
# --tune: "does muP pay off?"
tune = False
horizons = [150, 1000] # max_iters at which to tune muP and search SP's lr
# --causes: why does muP with only the base width's lr lose to SP tuned at every width?
causes = False
# the optimizer of every run: 'adamw', or 'muon' (Muon for the hidden matrices; muon_lr_mult is
# tuned with the other muTransfer hyperparameters by --tune)
optimizer = 'adamw'
muon_lr_mult = 1.0
muon_momentum = 0.95
# depth (CompleteP): --depths sweeps the lr across depths at the base width instead of widths;
# --joint tunes at base_width x n_layer and transfers to joint_width x joint_depth
depths = [] # e.g. 2,4,8,16
base_depth = 2
joint = False
joint_width = 256
joint_depth = 8
# -----------------------------------------------------------------------------

_MUP_HPARAMS = ('log2_lr', 'mup_output_mult', 'mup_attn_mult', 'mup_input_mult', 'init_std')
_MUP_ONLY = ('base_width', 'mup_scale_weight_decay', 'mup_hidden_lr_exponent') # an SP run ignores them
# settings a run may change that came after runs were cached: at these values a run keeps the key
# it had before they existed, so the cached studies stay valid
_LATER = dict(mup_base_depth=0, mup_depth_alpha=1.0, optimizer='adamw', muon_lr_mult=1.0, muon_momentum=0.95)
NEUTRAL = dict(mup_output_mult=1.0, mup_attn_mult=1.0, mup_input_mult=1.0, init_std=0.02)
STEP_LINE = re.compile(r'^step (\d+): train loss (\S+), val loss (\S+)$', re.M)


class Runner:
    """Runs train.py for a list of settings, at most `jobs` at a time, and caches every result
    in a JSON file, written atomically after each run (so Ctrl-C loses at most the runs in flight)."""

    def __init__(self, path, jobs, threads, device, fixed, cwd=_HERE):
        """fixed: the settings every run shares, dataset included (read from cwd/data/<dataset>)."""
        self.path, self.threads, self.device, self.fixed, self.cwd = path, threads, device, fixed, cwd
        self.lock = threading.Lock()
        self.pool = ThreadPoolExecutor(jobs)
        self.records = []
        if os.path.exists(path):
            with open(path) as f:
                self.records = json.load(f)
        self.done = {self.key(r): r for r in self.records}
        self.progress = None

    def key(self, run):
        fields = {k: run[k] for k in sorted(self.fixed) + ['param', 'width', 'seed', 'max_iters', *_MUP_HPARAMS, 'device']}
        if run['param'] == 'sp': # one SP run serves every muP-only variant (e.g. each base width of --causes)
            fields.update(dict.fromkeys(_MUP_ONLY))
        for k, default in _LATER.items(): # without depth scaling alpha means nothing
            if run.get(k, default) != default and (k != 'mup_depth_alpha' or run.get('mup_base_depth')):
                fields[k] = run[k]
        return json.dumps(fields)

    def run_all(self, runs):
        """runs: dicts with param, width, seed, max_iters and the _MUP_HPARAMS. Returns their records."""
        runs = [dict(self.fixed, device=self.device, **r) for r in runs]
        return list(self.pool.map(self.run_one, runs))

    def run_one(self, run):
        key = self.key(run)
        with self.lock:
            if key in self.done:
                return self.done[key]
        record = dict(run, **self.train(run))
        with self.lock:
            self.done[key] = record
            self.records.append(record)
            tmp = self.path + '.tmp'
            with open(tmp, 'w') as f:
                json.dump(self.records, f, indent=1)
            os.replace(tmp, self.path)
            if self.progress is not None:
                self.progress.update(1)
        return record

    def train(self, run):
        """One train.py run; returns its final losses (None when it diverged) and wall time."""
        it = run['max_iters']
        lr = 2.0 ** run['log2_lr']
        args = dict(device=run['device'], dataset=run['dataset'], compile=False, n_layer=run['n_layer'], n_head=run['n_head'],
                    n_embd=run['width'], mup_base_width=run['base_width'] if run['param'] == 'mup' else 0,
                    batch_size=run['batch_size'], block_size=run['block_size'], dropout=0.0,
                    learning_rate=lr, min_lr=lr / 10, max_iters=it, lr_decay_iters=it, warmup_iters=run['warmup_iters'],
                    grad_clip=run['grad_clip'], weight_decay=run['weight_decay'], adam_eps=run['adam_eps'],
                    mup_scale_weight_decay=run['mup_scale_weight_decay'],
                    mup_hidden_lr_exponent=run['mup_hidden_lr_exponent'], eval_interval=it,
                    **{k: run.get(k, default) for k, default in _LATER.items()},
                    eval_iters=run['eval_iters'], log_interval=it, seed=run['seed'], always_save_checkpoint=False,
                    **{k: run[k] for k in _MUP_HPARAMS[1:]})
        out_dir = tempfile.mkdtemp(prefix='lr_transfer_') # train.py saves a checkpoint whenever val improves
        env = dict(os.environ, OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads))
        t0 = time.time()
        try:
            proc = subprocess.run([sys.executable, os.path.join(_HERE, 'train.py'), *(f'--{k}={v}' for k, v in args.items()),
                                   f'--out_dir={out_dir}'], cwd=self.cwd, env=env, capture_output=True, text=True)
        finally:
            shutil.rmtree(out_dir, ignore_errors=True)
        seconds = round(time.time() - t0, 2)
        steps = {int(n): (float(tr), float(va)) for n, tr, va in STEP_LINE.findall(proc.stdout)}
        if proc.returncode == 0 and it in steps and all(map(math.isfinite, steps[it])):
            return dict(train_loss=steps[it][0], val_loss=steps[it][1], seconds=seconds)
        if 'non-finite' in proc.stderr + proc.stdout or (it in steps and not math.isfinite(steps[it][1])):
            return dict(train_loss=None, val_loss=None, seconds=seconds) # diverged
        raise RuntimeError(f"train.py failed (exit {proc.returncode}) for {args}:\n{proc.stderr[-2000:]}")


def val(record):
    """Final val loss; a diverged run counts as infinitely bad."""
    return math.inf if record['val_loss'] is None else record['val_loss']

def mean_val(records):
    return sum(map(val, records)) / len(records)

def setting(param, width, log2_lr, it, **hparams):
    muon = dict(optimizer='muon', muon_lr_mult=muon_lr_mult, muon_momentum=muon_momentum) if optimizer == 'muon' else {}
    return dict(param=param, width=width, max_iters=it, log2_lr=log2_lr, **{**NEUTRAL, **muon, **hparams})

def multipliers(hp):
    """The transferred values of tuned hparams but the lr (init std and multipliers, Muon's included)."""
    return {k: v for k, v in hp.items() if k != 'log2_lr'}

def evaluate(runner, settings):
    """Mean val loss over seeds of each setting."""
    runs = [dict(s, seed=seed) for s in settings for seed in seeds]
    records = runner.run_all(runs)
    n = len(seeds)
    return [mean_val(records[i * n:(i + 1) * n]) for i in range(len(settings))]

# -----------------------------------------------------------------------------
# the sweep

# the depth scaling of each variant of the depth sweep (relative to base_depth)
DEPTH_VARIANTS = {'none': {}, 'depth-muP': dict(mup_depth_alpha=0.5), 'CompleteP': dict(mup_depth_alpha=1.0)}

def depth_setting(variant, depth, log2_lr, it, width=None, **hparams):
    """A muP run of `depth` layers with the depth scaling of DEPTH_VARIANTS[variant]."""
    scaling = dict(DEPTH_VARIANTS[variant], mup_base_depth=base_depth) if variant != 'none' else {}
    return setting('mup', width or base_width, log2_lr, it, n_layer=depth, **scaling, **hparams)

def sweep(runner):
    """{variant: {size: {log2_lr: mean val loss}}} over the whole grid: SP and muP across widths,
    or (with depths) the depth variants across depths at the base width."""
    if depths:
        grid = {(v, d, k): depth_setting(v, d, k, max_iters) for v in DEPTH_VARIANTS for d in depths for k in log2_lrs}
    else:
        grid = {(p, w, k): setting(p, w, k, max_iters) for p in ('sp', 'mup') for w in widths for k in log2_lrs}
    table = {}
    for (variant, size, log2_lr), loss in zip(grid, evaluate(runner, list(grid.values()))):
        table.setdefault(variant, {}).setdefault(size, {})[log2_lr] = loss
    return table

def best(curve):
    """log2 lr of the lowest loss in {log2_lr: loss}."""
    return min(curve, key=curve.get)

def variant_title(variant):
    return {'sp': 'SP', 'mup': f'μP (base width {base_width})', 'none': 'no depth scaling',
            'depth-muP': f'depth-μP (α = 0.5, base depth {base_depth})',
            'CompleteP': f'CompleteP (α = 1, base depth {base_depth})'}[variant]

def plot_sweep(table, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import numpy as np
    axis, sizes = ('depth', depths) if depths else ('width', widths)
    fig, axes = plt.subplots(1, len(table), figsize=(5 * len(table), 4), sharey=True)
    colors = matplotlib.colormaps['viridis'](np.linspace(0, 0.9, len(sizes)))
    finite = [v for curves in table.values() for c in curves.values() for v in c.values() if math.isfinite(v)]
    lo = min(finite)
    top = min(lo + 1.0, max(finite) + 0.05)
    for ax, variant in zip(axes, table):
        for size, color in zip(sizes, colors):
            curve = table[variant][size]
            ks = sorted(curve)
            ax.plot(ks, [min(curve[k], top) for k in ks], marker='o', ms=3, color=color, label=f'{axis} {size}')
            b = best(curve)
            ax.plot([b], [curve[b]], marker='*', ms=14, color=color, markeredgecolor='black')
        model = f'{n_layer}-layer GPT' if axis == 'width' else f'width {base_width}'
        ax.set_title(f'{variant_title(variant)}:\n{model}, {max_iters} steps', fontsize=10)
        ax.set_xlabel('log2 learning rate')
        ax.set_xticks(log2_lrs)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel('final val loss (shakespeare_char)')
    axes[0].set_ylim(lo - 0.05, top + 0.02)
    axes[-1].legend(fontsize=8)
    muon = f'Muon (lr x{muon_lr_mult:g}) for the hidden matrices, AdamW for the rest; ' if optimizer == 'muon' else ''
    fig.suptitle(f'learning-rate transfer across {axis}: {muon}★ = best lr; diverged or off-scale runs are drawn at the '
                 f'top edge', fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

def report_sweep(table):
    axis, sizes = ('depth', depths) if depths else ('width', widths)
    print(f"\nbest log2(lr) per {axis} ({max_iters} steps, final val loss):")
    print(f"{axis:>6} " + ' '.join(f"{variant_title(v).split(' (')[0].split(':')[0]:>18}" for v in table))
    for size in sizes:
        print(f"{size:>6} " + ' '.join(f"{best(table[v][size]):>11} {table[v][size][best(table[v][size])]:.3f}"
                                       for v in table))
    for variant in table:
        bests = [best(table[variant][size]) for size in sizes]
        edge = [s for s, b in zip(sizes, bests) if b in (min(log2_lrs), max(log2_lrs))]
        note = f"; best on the grid's edge at {axis}s {edge}: widen log2_lrs" if edge else ""
        print(f"{variant}: best lr moves by {max(bests) - min(bests)} grid steps across {axis}s {sizes}{note}")

# -----------------------------------------------------------------------------
# --tune: tune muP at the base width, transfer, compare with SP at its own best lr per width

def line_search(runner, make, name, start, max_moves=4):
    """Minimise the loss of make(name=x) over x on a x2 grid (log2_lr: +-1): evaluate both
    neighbours of `start`, then walk in the better direction until the next step is worse or
    `max_moves` steps were taken. Returns (best x, its loss)."""
    step = (lambda x, d: x + d) if name == 'log2_lr' else (lambda x, d: x * 2.0 ** d)
    x = start
    lo, mid, hi = evaluate(runner, [make(**{name: step(x, d)}) for d in (-1, 0, 1)])
    if mid <= min(lo, hi):
        return x, mid
    d, loss = (-1, lo) if lo < hi else (1, hi)
    x = step(x, d)
    for _ in range(max_moves - 1):
        (nxt,) = evaluate(runner, [make(**{name: step(x, d)})])
        if nxt >= loss:
            break
        x, loss = step(x, d), nxt
    return x, loss

def tune_mup(runner, it, start_log2_lr):
    """One round of coordinate search at the base width over _MUP_HPARAMS, lr first and again last
    (it interacts with every multiplier). Returns (hparams, loss, the lr-only hparams)."""
    hp = dict(NEUTRAL, log2_lr=start_log2_lr, **(dict(muon_lr_mult=muon_lr_mult) if optimizer == 'muon' else {}))
    trace = []
    for name in _MUP_HPARAMS + (('muon_lr_mult',) if optimizer == 'muon' else ()) + ('log2_lr',):
        make = lambda **kw: setting('mup', base_width, it=it, **dict(hp, **kw))
        hp[name], loss = line_search(runner, make, name, hp[name])
        trace.append((name, hp[name], loss))
        if len(trace) == 1:
            lr_only = dict(hp)
    return hp, loss, lr_only, trace

def sp_best_lr(runner, width, it, start_log2_lr, hparams=NEUTRAL):
    """SP's best lr at this width and horizon, with the given multipliers and init std (or any
    other setting a run may change, such as a --causes suspect's)."""
    return line_search(runner, lambda **kw: setting('sp', width, it=it, **dict(hparams, **kw)),
                       'log2_lr', start_log2_lr, max_moves=6)

def compare(runner):
    """For each horizon: tune muP at the base width and search SP's lr at every width (all in
    parallel); then run muP at every width with the base width's values, and, as the control
    for what the multipliers alone buy, search SP's lr at every width with muP's tuned
    multipliers and init std (at the base width SP and muP are the same model)."""
    start = -8 # the reference optimum at 150 steps (docs/mup-study.md); the searches walk from there
    with ThreadPoolExecutor(len(horizons) * (1 + len(widths))) as searches:
        tuned = {it: searches.submit(tune_mup, runner, it, start) for it in horizons}
        sp = {(it, w): searches.submit(sp_best_lr, runner, w, it, start) for it in horizons for w in widths}
        tuned = {it: f.result() for it, f in tuned.items()}
        sp_mults = {(it, w): searches.submit(sp_best_lr, runner, w, it, tuned[it][0]['log2_lr'],
                                             multipliers(tuned[it][0]))
                    for it in horizons for w in widths}
        sp = {k: f.result() for k, f in sp.items()}
        sp_mults = {k: f.result() for k, f in sp_mults.items()}
    summary = []
    for it in horizons:
        hp, _, lr_only, trace = tuned[it]
        mup_tuned = evaluate(runner, [setting('mup', w, it=it, **hp) for w in widths])
        mup_lr = evaluate(runner, [setting('mup', w, it=it, **lr_only) for w in widths])
        summary.append(dict(max_iters=it, tuned=hp, lr_only=lr_only, search=trace, rows=[
            dict(width=w, sp_log2_lr=sp[it, w][0], sp=sp[it, w][1], sp_mults_log2_lr=sp_mults[it, w][0],
                 sp_mults=sp_mults[it, w][1], mup_lr_only=a, mup_tuned=b)
            for w, a, b in zip(widths, mup_lr, mup_tuned)]))
    return summary

def report_compare(summary):
    for s in summary:
        hp = s['tuned']
        print(f"\n{s['max_iters']} steps; muP tuned at width {base_width}: lr 2^{hp['log2_lr']}, output x{hp['mup_output_mult']:g}, "
              f"attn x{hp['mup_attn_mult']:g}, input x{hp['mup_input_mult']:g}, init_std {hp['init_std']:g}"
              + (f", Muon lr x{hp['muon_lr_mult']:g}" if 'muon_lr_mult' in hp else '')
              + f" (lr only: 2^{s['lr_only']['log2_lr']})")
        print(f"{'width':>6} {'SP own best lr':>18} {'SP + muP mults':>18} {'μP lr only':>11} {'μP tuned':>9}")
        for r in s['rows']:
            print(f"{r['width']:>6} {r['sp']:>10.3f} (2^{r['sp_log2_lr']}) {r['sp_mults']:>10.3f} (2^{r['sp_mults_log2_lr']}) "
                  f"{r['mup_lr_only']:>11.3f} {r['mup_tuned']:>9.3f}")

def plot_compare(summary, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(summary), figsize=(5 * len(summary), 4), squeeze=False)
    for ax, s in zip(axes[0], summary):
        ws = [r['width'] for r in s['rows']]
        for key, label, style in (('sp', 'SP, own best lr per width', 'o-'),
                                  ('sp_mults', 'SP + μP\'s tuned multipliers, own best lr', 'o:'),
                                  ('mup_lr_only', 'μP, base-width lr', 's--'),
                                  ('mup_tuned', 'μP, all base-width hparams', '^-')):
            ax.plot(ws, [r[key] for r in s['rows']], style, label=label)
        ax.set_xscale('log', base=2)
        ax.set_xlabel('width')
        ax.set_title(f"{s['max_iters']} steps")
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel('final val loss')
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f'does μP pay off? μTransfer from width {base_width}\nvs SP tuned at every width'
                 + (' (Muon for the hidden matrices)' if optimizer == 'muon' else ''), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

# -----------------------------------------------------------------------------
# --causes: the suspects for muP with the transferred lr losing to SP tuned at each width

def suspects():
    """name -> the settings it changes (one; two for the unscaled weight decay), for the SP and the
    muP runs alike."""
    return {
        'none (the sweep setup)': {},
        f'base width {2 * base_width}, not {base_width}': dict(base_width=2 * base_width),
        f'head dim {base_width} at the base (1 head), not {base_width // n_head}': dict(n_head=1),
        f'Adam eps 1e-12, not {adam_eps:g}': dict(adam_eps=1e-12),
        'weight decay 0.1, hidden x m (MuAdamW)': dict(weight_decay=0.1, mup_scale_weight_decay=True),
        'weight decay 0.1, not scaled': dict(weight_decay=0.1, mup_scale_weight_decay=False),
        'hidden lr / sqrt(m), not / m': dict(mup_hidden_lr_exponent=0.5),
    }

def study_causes(runner):
    """For each suspect, at max_iters steps and the widest width: muP with the best lr of its base
    width (a line search there) against SP at its own best lr. The gap is what transferring only
    the lr costs; a suspect that closes it explains it."""
    wide = max(widths)
    def one(change):
        base = change.get('base_width', base_width)
        base_log2_lr, base_loss = line_search(runner, lambda **kw: setting('mup', base, it=max_iters, **change, **kw),
                                              'log2_lr', -8)
        (mup_wide,) = evaluate(runner, [setting('mup', wide, base_log2_lr, max_iters, **change)])
        sp_log2_lr, sp_wide = sp_best_lr(runner, wide, max_iters, -9, change)
        return dict(change=change, mup_base_log2_lr=base_log2_lr, mup_base=base_loss, mup_wide=mup_wide,
                    sp_wide_log2_lr=sp_log2_lr, sp_wide=sp_wide)
    changes = suspects()
    with ThreadPoolExecutor(len(changes)) as pool:
        futures = {name: pool.submit(one, change) for name, change in changes.items()}
        return {name: f.result() for name, f in futures.items()}

def report_causes(results):
    wide = max(widths)
    print(f"\n{max_iters} steps; muP at width {wide} with its base width's best lr vs SP at its own best lr:")
    print(f"{'suspect':<42} {'μP base':>14} {f'μP {wide}':>8} {f'SP {wide}':>15} {'gap':>7}")
    for name, r in results.items():
        print(f"{name:<42} {r['mup_base']:.3f} (2^{r['mup_base_log2_lr']}) {r['mup_wide']:>8.3f} "
              f"{r['sp_wide']:.3f} (2^{r['sp_wide_log2_lr']}) {r['mup_wide'] - r['sp_wide']:>+7.3f}")

# -----------------------------------------------------------------------------

# -----------------------------------------------------------------------------
# --joint: tune at the base width and depth, transfer to a wider and deeper model

def study_joint(runner):
    """For each horizon: the --tune search at base_width x n_layer (cached runs are reused), then
    at joint_width x joint_depth with those values: muP with CompleteP, with depth-muP and with
    no depth scaling (width-only muP), against SP at its own best lr there (a line search)."""
    def one(it):
        hp, base_loss, _, _ = tune_mup(runner, it, -8)
        losses = evaluate(runner, [depth_setting(v, joint_depth, it=it, width=joint_width, **hp) for v in DEPTH_VARIANTS])
        sp_log2_lr, sp = sp_best_lr(runner, joint_width, it, -9, dict(NEUTRAL, n_layer=joint_depth))
        return dict(max_iters=it, tuned=hp, base=base_loss, sp_log2_lr=sp_log2_lr, sp=sp,
                    **{variant: loss for variant, loss in zip(DEPTH_VARIANTS, losses)})
    with ThreadPoolExecutor(len(horizons)) as pool:
        return list(pool.map(one, horizons))

def report_joint(rows):
    print(f"\ntuned at width {base_width} x {n_layer} layers, transferred to {joint_width} x {joint_depth}; final val loss:")
    print(f"{'steps':>6} {'base':>7} {'CompleteP':>10} {'depth-μP':>9} {'width-only μP':>14} {'SP own best lr':>20}")
    for r in rows:
        print(f"{r['max_iters']:>6} {r['base']:>7.3f} {r['CompleteP']:>10.3f} {r['depth-muP']:>9.3f} {r['none']:>14.3f} "
              f"{r['sp']:>11.3f} (2^{r['sp_log2_lr']})")

if __name__ == '__main__':
    from tqdm import tqdm

    from configurator import ConfigError, configure
    configure(globals(), sys.argv[1:])
    if base_width not in widths:
        raise ConfigError(f"base_width={base_width} is not among widths={widths}: muP's reference model must be swept too")
    if any(w % n_head for w in widths + [joint_width]):
        raise ConfigError(f"every width must be a multiple of n_head={n_head}: got widths={widths}, joint_width={joint_width}")
    if depths and (base_depth not in depths or base_depth != n_layer):
        raise ConfigError(f"depths={depths}: must include base_depth={base_depth}, which must equal n_layer={n_layer} "
                          f"(the depth the hyperparameters are tuned at)")
    for d in ('results', 'assets'):
        os.makedirs(os.path.join(_HERE, d), exist_ok=True)
    fixed = dict(dataset=dataset, base_width=base_width, n_layer=n_layer, n_head=n_head, batch_size=batch_size, block_size=block_size,
                 warmup_iters=warmup_iters, grad_clip=grad_clip, weight_decay=weight_decay, eval_iters=eval_iters,
                 mup_scale_weight_decay=mup_scale_weight_decay, adam_eps=adam_eps,
                 mup_hidden_lr_exponent=mup_hidden_lr_exponent)
    runner = Runner(os.path.join(_HERE, 'results', f'{out}.json'), jobs, threads, device, fixed)
    print(f"runs cached in {runner.path} ({len(runner.records)} so far); {jobs} at a time, {threads} thread(s) each, on {device}")
    with tqdm(desc='train.py runs', unit='run') as runner.progress:
        if causes:
            results = study_causes(runner)
        elif joint:
            rows = study_joint(runner)
        elif tune:
            summary = compare(runner)
        else:
            table = sweep(runner)
    if causes:
        report_causes(results)
        with open(os.path.join(_HERE, 'results', f'{out}_summary.json'), 'w') as f:
            json.dump(results, f, indent=1)
        print(f"\nwrote results/{out}_summary.json")
    elif joint:
        report_joint(rows)
        with open(os.path.join(_HERE, 'results', f'{out}_joint.json'), 'w') as f:
            json.dump(rows, f, indent=1)
        print(f"\nwrote results/{out}_joint.json")
    elif tune:
        report_compare(summary)
        with open(os.path.join(_HERE, 'results', f'{out}_tuned.json'), 'w') as f:
            json.dump(summary, f, indent=1)
        plot_compare(summary, os.path.join(_HERE, 'assets', f'{out}_tuned.png'))
        print(f"\nwrote results/{out}_tuned.json and assets/{out}_tuned.png")
    else:
        report_sweep(table)
        plot_sweep(table, os.path.join(_HERE, 'assets', f'{out}.png'))
        print(f"\nwrote assets/{out}.png")
