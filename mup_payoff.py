"""
Does muP pay off? muP tuned once at the base width against SP tuned at every width, as one of
three studies (--study; the setup is docs/mup-study.md's reference, sweep_runner.REFERENCE):

tune    At each horizon (max_iters) of --horizons: tune the muTransfer hyperparameters (lr,
        mup_output_mult, mup_attn_mult, mup_input_mult, init_std, and Muon's lr multiplier with
        --optimizer=muon) at the base width by one round of coordinate search over x2 grids,
        transfer them unchanged to every width, and compare with SP at its own best lr for each
        width (searched on the same grid at that horizon), and with SP given muP's tuned
        multipliers and init std at its own best lr (the control: what do the multipliers buy
        without muP?). Writes results/<out>_tuned.json and assets/<out>_tuned.png.
joint   At each horizon: tune as `tune` does at base_width x n_layer, transfer to joint_width x
        joint_depth with CompleteP, with depth-muP and with no depth scaling, and compare with SP
        at its own best lr there. Writes results/<out>_joint.json.
causes  Why does muP with only the lr transferred lose to SP tuned at every width? For each
        suspect (base width, head dim, Adam eps, weight decay, the 1/m hidden-lr exponent) change
        that one setting and measure the gap at the widest width again, at max_iters steps.
        Writes results/<out>_summary.json.

$ python mup_payoff.py --study=tune --horizons=150     # results/lr_transfer_tuned.json, assets/lr_transfer_tuned.png
$ python mup_payoff.py --study=tune --horizons=150,1000 --device=cuda --jobs=12 --out=lr_transfer_cuda
$ python mup_payoff.py --study=joint --horizons=150    # tuned at 64 x 2 layers, transferred to 256 x 8
$ python mup_payoff.py --study=causes --widths=64,512 --out=lr_transfer_causes
$ python mup_payoff.py --study=tune --optimizer=muon --muon_lr_mult=4 --horizons=150 --out=lr_transfer_muon

Every run is recorded in results/<out>.json; with --reuse=True the searches take the runs
already there (lr_sweep.py's included, with the same --out) and measure only what is missing.
Run it from the repository root: data/ and out_dir are relative to the working directory. Every
file goes to out_dir, a new directory unless --out_dir=. updates the repository's committed ones.
"""

import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor

from sweep_runner import DEPTH_VARIANTS, NEUTRAL, REFERENCE, Runner, depth_setting, setting

# -----------------------------------------------------------------------------
# ---- default config values, every one overridable with --key=value
study = 'tune' # 'tune', 'joint' or 'causes': one study per run
widths = [64, 128, 256, 512] # tune and causes (causes compares at the widest)
horizons = [150, 1000] # tune and joint: the max_iters at which to tune muP and search SP's lr
max_iters = 150 # causes: its one horizon
joint_width = 256 # joint: the model the base width's values are transferred to
joint_depth = 8
seeds = [1337] # several: every loss is the mean val loss over seeds
search_seeds = [] # tune: the seeds the searches average over, among seeds (empty: all); the arms then run at every seed
globals().update(REFERENCE) # the settings the runs share, from dataset to muon_momentum (--help lists them)
# how to run
device = 'cpu'
jobs = 2 # train.py processes at a time
threads = 1 # OMP threads per process
reuse = False # take the runs already recorded in <out_dir>/results/<out>.json instead of measuring them again
out_dir = 'out-studies' # where results/ and assets/ go: --out_dir=. updates the repository's committed files
out = 'lr_transfer' # <out_dir>/results/<out>.json (the runs), <out>_tuned.json, _joint.json or _summary.json
# -----------------------------------------------------------------------------

# underscored: constants, not --keys
_STUDIES = ('tune', 'joint', 'causes')
_START_LOG2_LR = -8 # the reference optimum at 150 steps (docs/mup-study.md); the searches walk from there
_WIDE_SP_START_LOG2_LR = -9 # SP's optimum moves to smaller lrs as it widens: on a wide model start a step lower


def line_search(runner, make, name, start, max_moves=4):
    """Minimise the loss of make(name=x) over x on a x2 grid (log2_lr: +-1): evaluate both
    neighbours of `start`, then walk in the better direction until the next step is worse or
    `max_moves` steps were taken. Returns (best x, its loss)."""
    step = (lambda x, d: x + d) if name == 'log2_lr' else (lambda x, d: x * 2.0 ** d)
    x = start
    lo, mid, hi = runner.evaluate([make(**{name: step(x, d)}) for d in (-1, 0, 1)])
    if mid <= min(lo, hi):
        return x, mid
    d, loss = (-1, lo) if lo < hi else (1, hi)
    x = step(x, d)
    for _ in range(max_moves - 1):
        (nxt,) = runner.evaluate([make(**{name: step(x, d)})])
        if nxt >= loss:
            break
        x, loss = step(x, d), nxt
    return x, loss

def tune_mup(runner, width, it, start_log2_lr, muon_lr_mult=None):
    """One round of coordinate search for muP at this width over the lr, the multipliers and init
    std (NEUTRAL's keys), and Muon's lr multiplier from muon_lr_mult unless it is None; the lr
    first and again last (it interacts with every multiplier). Returns (hparams, loss, the
    hparams after the first lr search, the search's (name, value, loss) trace)."""
    hp = dict(NEUTRAL, log2_lr=start_log2_lr)
    names = ('log2_lr', *NEUTRAL)
    if muon_lr_mult is not None:
        hp['muon_lr_mult'] = muon_lr_mult
        names += ('muon_lr_mult',)
    trace = []
    for name in names + ('log2_lr',):
        make = lambda **kw: setting('mup', width, it=it, **dict(hp, **kw))
        hp[name], loss = line_search(runner, make, name, hp[name])
        trace.append((name, hp[name], loss))
        if len(trace) == 1:
            lr_only = dict(hp)
    return hp, loss, lr_only, trace

def sp_best_lr(runner, width, it, start_log2_lr, hparams=NEUTRAL):
    """SP's best lr at this width and horizon, with the given multipliers and init std (or any
    other setting a run may change, such as a causes suspect's)."""
    return line_search(runner, lambda **kw: setting('sp', width, it=it, **dict(hparams, **kw)),
                       'log2_lr', start_log2_lr, max_moves=6)

def multipliers(hp):
    """The tuned hparams but the lr (init std and multipliers, Muon's included)."""
    return {k: v for k, v in hp.items() if k != 'log2_lr'}

# -----------------------------------------------------------------------------
# tune: tune muP at the base width, transfer, compare with SP at its own best lr per width

def study_tune(runner, widths, base_width, horizons, muon_lr_mult, seeds):
    """For each horizon: tune muP at the base width and search SP's lr at every width (all in
    parallel); then run muP at every width with the base width's values, and, as the control
    for what the multipliers alone buy, search SP's lr at every width with muP's tuned
    multipliers and init std (at the base width SP and muP are the same model), and SP with only
    its embeddings' lr raised by the width ratio (Kalra & Barkeshli 2026, arXiv 2605.21486: with
    AdamW most of muP's gain), at its own best lr. The searches average over the runner's seeds;
    SP's, SP + embedding lr's and muP tuned's chosen settings are then run at every seed of
    `seeds` for the paired differences."""
    with ThreadPoolExecutor(len(horizons) * (1 + len(widths))) as searches:
        tuned = {it: searches.submit(tune_mup, runner, base_width, it, _START_LOG2_LR, muon_lr_mult)
                 for it in horizons}
        sp = {(it, w): searches.submit(sp_best_lr, runner, w, it, _START_LOG2_LR)
              for it in horizons for w in widths}
        tuned = {it: f.result() for it, f in tuned.items()}
        sp_mults = {(it, w): searches.submit(sp_best_lr, runner, w, it, tuned[it][0]['log2_lr'],
                                             multipliers(tuned[it][0]))
                    for it in horizons for w in widths}
        # Kalra & Barkeshli's control: SP with only the embeddings' lr raised by the width ratio
        sp_embed = {(it, w): searches.submit(sp_best_lr, runner, w, it, _START_LOG2_LR,
                                             dict(NEUTRAL, embedding_lr_mult=w / base_width))
                    for it in horizons for w in widths}
        sp = {k: f.result() for k, f in sp.items()}
        sp_mults = {k: f.result() for k, f in sp_mults.items()}
        sp_embed = {k: f.result() for k, f in sp_embed.items()}
    summary = []
    for it in horizons:
        hp, _, lr_only, trace = tuned[it]
        mup_tuned = runner.evaluate([setting('mup', w, it=it, **hp) for w in widths])
        mup_lr = runner.evaluate([setting('mup', w, it=it, **lr_only) for w in widths])
        rows = []
        for w, a, b in zip(widths, mup_lr, mup_tuned):
            # each arm's run at its best lr, per seed: the paired differences' intervals
            arms = dict(sp=setting('sp', w, it=it, **dict(NEUTRAL, log2_lr=sp[it, w][0])),
                        sp_embed=setting('sp', w, it=it, **dict(NEUTRAL, embedding_lr_mult=w / base_width,
                                                                log2_lr=sp_embed[it, w][0])),
                        mup_tuned=setting('mup', w, it=it, **hp))
            losses = dict(zip(arms, runner.per_seed(list(arms.values()), seeds)))
            rows.append(dict(width=w, sp_log2_lr=sp[it, w][0], sp=sp[it, w][1], sp_mults_log2_lr=sp_mults[it, w][0],
                             sp_mults=sp_mults[it, w][1], sp_embed_log2_lr=sp_embed[it, w][0],
                             sp_embed=sp_embed[it, w][1], mup_lr_only=a, mup_tuned=b,
                             per_seed=losses,
                             mup_tuned_minus_sp=paired_interval(losses['mup_tuned'], losses['sp']),
                             sp_embed_minus_sp=paired_interval(losses['sp_embed'], losses['sp'])))
        summary.append(dict(max_iters=it, search_seeds=runner.seeds, seeds=seeds, tuned=hp, lr_only=lr_only,
                            search=trace, rows=rows))
    return summary

def paired_interval(a, b, interval=90, resamples=1000, seed=0):
    """[mean, low, high]: the mean over seeds of a - b (paired: each seed's two runs) and its
    bootstrap interval (the seeds resampled with replacement)."""
    import numpy as np
    diff = np.array(a) - np.array(b)
    rng = np.random.default_rng(seed)
    means = [diff[rng.integers(0, len(diff), len(diff))].mean() for _ in range(resamples)]
    tail = (100 - interval) / 2
    return [float(diff.mean()), *map(float, np.percentile(means, [tail, 100 - tail]))]

def report_tune(summary, base_width):
    for s in summary:
        hp = s['tuned']
        print(f"\n{s['max_iters']} steps; muP tuned at width {base_width}: lr 2^{hp['log2_lr']}, "
              f"output x{hp['mup_output_mult']:g}, attn x{hp['mup_attn_mult']:g}, input x{hp['mup_input_mult']:g}, "
              f"init_std {hp['init_std']:g}"
              + (f", Muon lr x{hp['muon_lr_mult']:g}" if 'muon_lr_mult' in hp else '')
              + f" (lr only: 2^{s['lr_only']['log2_lr']})")
        print(f"{'width':>6} {'SP own best lr':>18} {'SP + muP mults':>18} {'SP + embedding lr':>18} "
              f"{'μP lr only':>11} {'μP tuned':>9}")
        for r in s['rows']:
            print(f"{r['width']:>6} {r['sp']:>10.3f} (2^{r['sp_log2_lr']}) "
                  f"{r['sp_mults']:>10.3f} (2^{r['sp_mults_log2_lr']}) "
                  f"{r['sp_embed']:>10.3f} (2^{r['sp_embed_log2_lr']}) {r['mup_lr_only']:>11.3f} {r['mup_tuned']:>9.3f}")
        print(f"paired differences over seeds {s['seeds']} (the searches over {s['search_seeds']}), "
              f"mean [90% bootstrap interval]:")
        for r in s['rows']:
            print(f"{r['width']:>6}  μP tuned - SP: {'{:+.3f} [{:+.3f}, {:+.3f}]'.format(*r['mup_tuned_minus_sp'])}   "
                  f"SP + embedding lr - SP: {'{:+.3f} [{:+.3f}, {:+.3f}]'.format(*r['sp_embed_minus_sp'])}")

def plot_tune(summary, base_width, muon, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(summary), figsize=(5 * len(summary), 4), squeeze=False)
    for ax, s in zip(axes[0], summary):
        ws = [r['width'] for r in s['rows']]
        for key, label, style in (('sp', 'SP, own best lr per width', 'o-'),
                                  ('sp_mults', 'SP + μP\'s tuned multipliers, own best lr', 'o:'),
                                  ('sp_embed', 'SP, embedding lr x width ratio, own best lr', 'd-.'),
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
                 + (' (Muon for the hidden matrices)' if muon else ''), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

# -----------------------------------------------------------------------------
# joint: tune at the base width and depth, transfer to a wider and deeper model

def study_joint(runner, base_width, base_depth, horizons, joint_width, joint_depth, muon_lr_mult):
    """For each horizon: the tune study's search at base_width x base_depth layers, then at
    joint_width x joint_depth with those values: muP with CompleteP, with depth-muP and with no
    depth scaling (width-only muP), against SP at its own best lr there (a line search)."""
    def one(it):
        hp, base_loss, _, _ = tune_mup(runner, base_width, it, _START_LOG2_LR, muon_lr_mult)
        losses = runner.evaluate([depth_setting(v, joint_depth, joint_width, base_depth, it=it, **hp)
                                  for v in DEPTH_VARIANTS])
        sp_log2_lr, sp = sp_best_lr(runner, joint_width, it, _WIDE_SP_START_LOG2_LR,
                                    dict(NEUTRAL, n_layer=joint_depth))
        return dict(max_iters=it, tuned=hp, base=base_loss, sp_log2_lr=sp_log2_lr, sp=sp,
                    **{variant: loss for variant, loss in zip(DEPTH_VARIANTS, losses)})
    with ThreadPoolExecutor(len(horizons)) as searches:
        return list(searches.map(one, horizons))

def report_joint(rows, base_width, base_depth, joint_width, joint_depth):
    print(f"\ntuned at width {base_width} x {base_depth} layers, transferred to {joint_width} x {joint_depth}; "
          f"final val loss:")
    print(f"{'steps':>6} {'base':>7} {'CompleteP':>10} {'depth-μP':>9} {'width-only μP':>14} {'SP own best lr':>20}")
    for r in rows:
        print(f"{r['max_iters']:>6} {r['base']:>7.3f} {r['CompleteP']:>10.3f} {r['depth-muP']:>9.3f} "
              f"{r['none']:>14.3f} {r['sp']:>11.3f} (2^{r['sp_log2_lr']})")

# -----------------------------------------------------------------------------
# causes: the suspects for muP with the transferred lr losing to SP tuned at each width

def suspects(base_width, n_head, adam_eps):
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

def study_causes(runner, wide, base_width, n_head, adam_eps, it):
    """For each suspect, at `it` steps and width `wide`: muP with the best lr of its base width
    (a line search there) against SP at its own best lr. The gap is what transferring only the
    lr costs; a suspect that closes it explains it."""
    def one(change):
        base = change.get('base_width', base_width)
        base_log2_lr, base_loss = line_search(runner, lambda **kw: setting('mup', base, it=it, **change, **kw),
                                              'log2_lr', _START_LOG2_LR)
        (mup_wide,) = runner.evaluate([setting('mup', wide, base_log2_lr, it, **change)])
        sp_log2_lr, sp_wide = sp_best_lr(runner, wide, it, _WIDE_SP_START_LOG2_LR, change)
        return dict(change=change, mup_base_log2_lr=base_log2_lr, mup_base=base_loss, mup_wide=mup_wide,
                    sp_wide_log2_lr=sp_log2_lr, sp_wide=sp_wide)
    changes = suspects(base_width, n_head, adam_eps)
    with ThreadPoolExecutor(len(changes)) as searches:
        futures = {name: searches.submit(one, change) for name, change in changes.items()}
        return {name: f.result() for name, f in futures.items()}

def report_causes(results, wide, it):
    print(f"\n{it} steps; muP at width {wide} with its base width's best lr vs SP at its own best lr:")
    print(f"{'suspect':<42} {'μP base':>14} {f'μP {wide}':>8} {f'SP {wide}':>15} {'gap':>7}")
    for name, r in results.items():
        print(f"{name:<42} {r['mup_base']:.3f} (2^{r['mup_base_log2_lr']}) {r['mup_wide']:>8.3f} "
              f"{r['sp_wide']:.3f} (2^{r['sp_wide_log2_lr']}) {r['mup_wide'] - r['sp_wide']:>+7.3f}")

# -----------------------------------------------------------------------------

if __name__ == '__main__':
    from configurator import configure
    from errors import UserError
    import sweep_runner
    config = configure(globals(), sys.argv[1:], documented_in=[sweep_runner.__file__])
    setup = {k: config[k] for k in REFERENCE}
    base_width, n_layer, n_head = setup['base_width'], setup['n_layer'], setup['n_head']
    if search_seeds and study != 'tune':
        raise UserError(f"search_seeds is the tune study's: study={study!r} averages every run over seeds={seeds}")
    if not set(search_seeds) <= set(seeds):
        raise UserError(f"search_seeds={search_seeds} must be among seeds={seeds}: the arms are measured at every seed")
    if study not in _STUDIES:
        raise UserError(f"study={study!r}: choose one of {', '.join(_STUDIES)} (one study per run)")
    if study == 'joint' and (joint_width % n_head or base_width % n_head):
        raise UserError(f"joint_width={joint_width} and base_width={base_width} must be multiples of "
                          f"n_head={n_head}")
    if study != 'joint' and base_width not in widths:
        raise UserError(f"base_width={base_width} is not among widths={widths}: muP's reference model "
                          f"must be measured too")
    if study != 'joint' and any(w % n_head for w in widths):
        raise UserError(f"every width must be a multiple of n_head={n_head}: got widths={widths}")
    muon_lr_mult_start = setup['muon_lr_mult'] if setup['optimizer'] == 'muon' else None # searched with the rest
    results_dir, assets_dir = os.path.join(out_dir, 'results'), os.path.join(out_dir, 'assets')
    for d in (results_dir, assets_dir):
        os.makedirs(d, exist_ok=True)
    runner = Runner(os.path.join(results_dir, f'{out}.json'), dict(setup, device=device), search_seeds or seeds,
                    jobs, threads, reuse)
    print(runner.describe())
    with runner:
        if study == 'tune':
            summary = study_tune(runner, widths, base_width, horizons, muon_lr_mult_start, seeds)
        elif study == 'joint':
            rows = study_joint(runner, base_width, n_layer, horizons, joint_width, joint_depth,
                               muon_lr_mult_start)
        else:
            results = study_causes(runner, max(widths), base_width, n_head, setup['adam_eps'], max_iters)
    print(runner.summary())
    if study == 'tune':
        report_tune(summary, base_width)
        path, png = os.path.join(results_dir, f'{out}_tuned.json'), os.path.join(assets_dir, f'{out}_tuned.png')
        with open(path, 'w') as f:
            json.dump(summary, f, indent=1)
        muon = muon_lr_mult_start is not None
        plot_tune(summary, base_width, muon, png)
        print(f"\nwrote {path} and {png}")
    elif study == 'joint':
        report_joint(rows, base_width, n_layer, joint_width, joint_depth)
        path = os.path.join(results_dir, f'{out}_joint.json')
        with open(path, 'w') as f:
            json.dump(rows, f, indent=1)
        print(f"\nwrote {path}")
    else:
        report_causes(results, max(widths), max_iters)
        path = os.path.join(results_dir, f'{out}_summary.json')
        with open(path, 'w') as f:
            json.dump(results, f, indent=1)
        print(f"\nwrote {path}")
