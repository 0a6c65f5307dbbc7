"""
Does a mixture of experts pay off here? The main job (config/shakespeare_mup.py: the modern block,
Muon, muP tuned at width 64) trained as it is and with each MLP a mixture of experts of the same
active parameters (--n_expert experts, top --n_expert_active, each of the dense MLP's width /
n_expert_active), every other setting the same: the val loss per step and per second of wall
time, and the routing over training (the router's entropy and the busiest expert's load, per
block, at each eval). The two runs go one after the other, each with the machine to itself, so
their seconds compare; nothing else should run meanwhile.

$ python moe_payoff.py                                  # the main job's budget on this machine: ~25 min on 2 cores
$ python moe_payoff.py --n_expert=4 --n_expert_active=1 --max_iters=600

Writes <out_dir>/results/<out>.json and <out_dir>/assets/<out>.png (out_dir: a new directory
unless --out_dir=. updates the repository's committed files). Run it from the repository root:
config_file and train.py's data/ are relative to the working directory.
"""

import json
import os
import re
import subprocess
import sys
import tempfile
import time

# -----------------------------------------------------------------------------
# ---- default config values, every one overridable with --key=value
config_file = 'config/shakespeare_mup.py' # the run both arms start from
n_expert = 8 # the MoE arm's routed experts
n_expert_active = 2 # ... and the experts each token goes to: each expert is the dense MLP's width / this
max_iters = 0 # 0: the config file's
eval_interval = 150 # the loss curve's resolution
threads = 2 # OMP threads of each run
out_dir = 'out-studies' # where results/ and assets/ go: --out_dir=. updates the repository's committed files
out = 'moe_main_job'
# -----------------------------------------------------------------------------

_TRAIN_PY = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'train.py') # run from any directory
_EVAL = re.compile(r'^step (\d+): train loss (\S+), val loss (\S+)$')
_ROUTING = re.compile(r"^step (\d+): router entropy ([\d. ]+), busiest expert's load / mean ([\d. ]+)$")
_PARAMS = re.compile(r'^number of parameters: (\S+)M(?: \((\S+)M active per token\))?$')


def run(args, threads):
    """train.py with args, its output read as it comes: {'evals': [[step, seconds since start,
    train, val]], 'routing': [[step, [entropy per block], [busiest load per block]]], 'params' and
    'active' (per token): millions}. The seconds exclude nothing: startup, evals and checkpoints are in both arms."""
    env = {**os.environ, 'OMP_NUM_THREADS': str(threads), 'PYTHONUNBUFFERED': '1'}
    start = time.time()
    proc = subprocess.Popen([sys.executable, _TRAIN_PY, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    record, lines = dict(evals=[], routing=[], params=None, active=None), []
    for line in proc.stdout:
        lines.append(line)
        line = line.strip()
        if m := _EVAL.match(line):
            record['evals'].append([int(m[1]), round(time.time() - start, 1), float(m[2]), float(m[3])])
        elif m := _ROUTING.match(line):
            record['routing'].append([int(m[1]), [float(v) for v in m[2].split()], [float(v) for v in m[3].split()]])
        elif m := _PARAMS.match(line):
            record['params'] = float(m[1])
            record['active'] = float(m[2] or m[1])
    if proc.wait():
        sys.exit(f"error: train.py {' '.join(args)} failed:\n{''.join(lines[-20:])}")
    return record


def plot(arms, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name, record in arms.items():
        steps, seconds, _, val = zip(*record['evals'])
        axes[0].plot(steps, val, marker='o', ms=3, label=name)
        axes[1].plot(seconds, val, marker='o', ms=3, label=name)
    axes[0].set(xlabel='step', ylabel='val loss', title='val loss per step')
    axes[1].set(xlabel='seconds (wall)', ylabel='val loss', title='val loss per second')
    routing = arms['moe']['routing']
    steps = [r[0] for r in routing]
    for block in range(len(routing[0][1])):
        line, = axes[2].plot(steps, [r[1][block] for r in routing], marker='o', ms=3, label=f'entropy, block {block}')
        axes[2].plot(steps, [r[2][block] for r in routing], marker='s', ms=3, ls='--', color=line.get_color(),
                     label=f'busiest load / mean, block {block}')
    axes[2].set(xlabel='step', title='routing (1 and 1: uniform, balanced)')
    for ax in axes:
        ax.legend(fontsize=7)
    for ax in axes[:2]:
        ax.set_ylim(top=min(max(r['evals'][1][3] for r in arms.values()), 3.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == '__main__':
    from configurator import configure
    configure(globals(), sys.argv[1:])
    common = [config_file, f'--eval_interval={eval_interval}', '--always_save_checkpoint=False']
    if max_iters:
        common += [f'--max_iters={max_iters}', f'--lr_decay_iters={max_iters}']
    arms = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, extra in (('dense', []), ('moe', [f'--n_expert={n_expert}', f'--n_expert_active={n_expert_active}'])):
            print(f"training the {name} arm ...", flush=True)
            arms[name] = run([*common, *extra, f'--out_dir={os.path.join(scratch, name)}'], threads)
    print(f"\n{'arm':<7}{'params (M)':>11}{'active':>8}{'step':>7}{'seconds':>9}{'val loss':>10}")
    for name, record in arms.items():
        for step, seconds, _, val in record['evals']:
            print(f"{name:<7}{record['params']:>11.2f}{record['active']:>8.2f}{step:>7}{seconds:>9.0f}{val:>10.4f}")
    for step, entropy, busiest in arms['moe']['routing']:
        print(f"moe step {step}: router entropy {' '.join(map(str, entropy))}, busiest load / mean {' '.join(map(str, busiest))}")
    for d in ('results', 'assets'):
        os.makedirs(os.path.join(out_dir, d), exist_ok=True)
    json_path, png = os.path.join(out_dir, 'results', f'{out}.json'), os.path.join(out_dir, 'assets', f'{out}.png')
    with open(json_path, 'w') as f:
        json.dump(dict(config_file=config_file, n_expert=n_expert, n_expert_active=n_expert_active, arms=arms), f, indent=1)
    plot(arms, png)
    print(f"wrote {json_path} and {png}")
