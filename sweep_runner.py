"""
What lr_sweep.py and mup_payoff.py share: the reference setup, and a Runner that measures runs.

Every run is `train.py` itself in a subprocess (the same model, optimizer groups, lr_scale and
warmup + cosine schedule), so no study can train by different rules. The Runner launches at most
`jobs` of them at a time, shows a progress bar over the runs it has to measure, and records each
result in <out_dir>/results/<out>.json, one record per run, keyed by every setting that changes its outcome.

A recorded run stands in for a new one only when the user asks (--reuse=True): by default a study
measures every run it needs again and updates the file, so what it reports was measured by this
code on this machine. Either way a study prints how many runs it measured and how many it reused.
Paths (data/, out_dir) are relative to the working directory, as train.py's data/ is.
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
from concurrent.futures import Future, ThreadPoolExecutor

from tqdm import tqdm

from configurator import model_settings
from errors import UserError
from model import load_attn_cls
import transfer

_TRAIN_PY = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'train.py')

# The reference setup of docs/mup-study.md: what every run of a study shares unless the study
# changes it (2 layers, 4 heads, batch 16x64, warmup 10, cosine decay to lr/10, clip 1.0, no
# weight decay; the score is the final val loss). Each tool takes every key as --key=value.
REFERENCE = dict(
    dataset='shakespeare_char', # train.py's data/<dataset>
    base_width=64, # mup_base_width of the muP runs
    batch_size=16, # sequences per step
    warmup_iters=10, # linear warmup, then a cosine to lr/10 at max_iters
    grad_clip=1.0, # clip gradients at this norm (0: no clipping)
    weight_decay=0.0, # AdamW's; muP scales the hidden matrices' by m
    adam_eps=1e-8, # AdamW's epsilon
    eval_iters=20, # val batches for the final loss; the same batches for every run, so comparisons are paired
    # 'adamw', or 'muon': Muon for the hidden matrices (at the base lr x muon_lr_mult), AdamW for the rest
    optimizer='adamw',
    muon_lr_mult=1.0, # the Muon group's lr is the lr x muon_lr_mult
    muon_momentum=0.95, # Muon's momentum
    beta1=0.9, # AdamW's first-moment decay
    beta2=0.99, # AdamW's second-moment decay
    gradient_accumulation_steps=1, # micro-batches per step
    decay_lr=True, # warmup then a cosine to lr x min_lr_fraction; False: constant after warmup
    min_lr_fraction=0.1, # the cosine's floor, as a fraction of the lr
    # tune small, train big along the batch and the length (train.py, transfer.py): 0 = off
    base_batch_tokens=0, # the proxy's tokens per step
    base_train_tokens=0, # the proxy's tokens in all
    batch_lr_exponent=transfer.MEASURED, # lr x (B / base_batch_tokens)^this (-1: the measured one)
    length_lr_exponent=transfer.MEASURED, # lr x (D / base_train_tokens)^-this (-1: the measured one)
    critical_batch_tokens=0, # the batch rule's bound (0: none)
    # the model: every GPTConfig field (train.py's defaults, but 2 layers of 4 heads and 64 tokens),
    # but the width and base width each run sets (width, base_width)
    **model_settings('n_embd', 'mup_base_width', n_layer=2, n_head=4, block_size=64, bias=False),
)
# the muTransfer hyperparameters of every run (Muon's lr multiplier aside), and their neutral
# values, where mup_payoff.py's search starts
NEUTRAL = dict(mup_output_mult=1.0, mup_attn_mult=1.0, mup_input_mult=1.0, init_std=0.02)
MUP_HPARAMS = ('log2_lr', *NEUTRAL)

# A run's cache key: these settings, and each other REFERENCE setting away from its default.
# Keys are recomputed from the records when a file is read, so a setting added to REFERENCE
# (a GPTConfig field, say) leaves the recorded runs valid: they ran at its default.
_KEYED = ('adam_eps', 'base_width', 'batch_size', 'block_size', 'dataset', 'eval_iters', 'grad_clip',
          'mup_hidden_lr_exponent', 'mup_scale_weight_decay', 'n_head', 'n_layer', 'warmup_iters', 'weight_decay',
          'param', 'width', 'seed', 'max_iters', *MUP_HPARAMS, 'device')
_MUP_ONLY = ('base_width', 'mup_scale_weight_decay', 'mup_hidden_lr_exponent') # an SP run ignores them
# without a proxy (base_batch_tokens and base_train_tokens 0) transfer.py ignores them
_TRANSFER_ONLY = ('batch_lr_exponent', 'length_lr_exponent', 'critical_batch_tokens')
_STEP_LINE = re.compile(r'^step (\d+): train loss (\S+), val loss (\S+)$', re.M)


def run_key(run):
    """The cache key of a run: every setting that changes its outcome, and no other. A whole
    number is keyed as an int, so that a grid of half steps (-7.0, -7.5) finds the runs of a grid
    of whole ones (-7)."""
    fields = {k: run[k] for k in _KEYED}
    if run['param'] == 'sp': # one SP run serves every muP-only variant (e.g. each base width of --study=causes)
        fields.update(dict.fromkeys(_MUP_ONLY))
    no_proxy = not run.get('base_batch_tokens') and not run.get('base_train_tokens')
    optimizer = run.get('optimizer', REFERENCE['optimizer'])
    # an exponent left at MEASURED is the optimizer's measured one: keyed by the value it takes
    used = dict(zip(('batch_lr_exponent', 'length_lr_exponent'), transfer.exponents(
        optimizer, run.get('batch_lr_exponent', transfer.MEASURED), run.get('length_lr_exponent', transfer.MEASURED))))
    measured = dict(zip(('batch_lr_exponent', 'length_lr_exponent'), transfer.exponents(optimizer)))
    for k, default in REFERENCE.items(): # without depth scaling alpha means nothing
        if k in _KEYED or (k == 'mup_depth_alpha' and not run.get('mup_base_depth')):
            continue
        if k in _TRANSFER_ONLY and no_proxy:
            continue
        if k in used:
            if used[k] != measured[k]:
                fields[k] = used[k]
        elif run.get(k, default) != default:
            fields[k] = run[k]
    whole = lambda v: int(v) if isinstance(v, float) and v.is_integer() else v
    return json.dumps({k: whole(v) for k, v in fields.items()})


def train(run, threads):
    """One train.py run, from the working directory; returns its final losses (None when it
    diverged) and wall time."""
    it = run['max_iters']
    lr = 2.0 ** run['log2_lr']
    base_width = run['base_width'] if run['param'] == 'mup' else 0 # 0: SP
    # train.py's settings, the model's among them
    args = {k: run.get(k, REFERENCE[k]) for k in REFERENCE if k not in ('base_width', 'min_lr_fraction')}
    args.update(device=run['device'], compile=False, n_embd=run['width'], mup_base_width=base_width,
                learning_rate=lr, min_lr=lr * run.get('min_lr_fraction', 0.1), max_iters=it, lr_decay_iters=it,
                eval_interval=it, log_interval=it, seed=run['seed'], always_save_checkpoint=False)
    out_dir = tempfile.mkdtemp(prefix='sweep_run_') # train.py saves a checkpoint whenever val improves
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    t0 = time.time()
    try:
        command = [sys.executable, _TRAIN_PY, *(f'--{k}={v}' for k, v in args.items()), f'--out_dir={out_dir}']
        proc = subprocess.run(command, env=env, capture_output=True, text=True)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    seconds = round(time.time() - t0, 2)
    steps = {int(n): (float(tr), float(va)) for n, tr, va in _STEP_LINE.findall(proc.stdout)}
    if proc.returncode == 0 and it in steps and all(map(math.isfinite, steps[it])):
        return dict(train_loss=steps[it][0], val_loss=steps[it][1], seconds=seconds)
    if 'non-finite' in proc.stderr + proc.stdout or (it in steps and not math.isfinite(steps[it][1])):
        return dict(train_loss=None, val_loss=None, seconds=seconds) # diverged
    raise RuntimeError(f"train.py failed (exit {proc.returncode}) for {args}:\n{proc.stderr[-2000:]}")


def val(record):
    """Final val loss; a diverged run counts as infinitely bad."""
    return math.inf if record['val_loss'] is None else record['val_loss']


def setting(param, width, log2_lr, it, **changes):
    """A run but its seed: SP or muP ('sp', 'mup') at this width, lr 2**log2_lr, `it` steps, and
    `changes` to the settings the runs share (the multipliers and init std, say)."""
    return dict(param=param, width=width, max_iters=it, log2_lr=log2_lr, **changes)


# the depth scaling of each variant of a depth study, relative to a base depth
DEPTH_VARIANTS = {'none': {}, 'depth-muP': dict(mup_depth_alpha=0.5), 'CompleteP': dict(mup_depth_alpha=1.0)}

def depth_setting(variant, depth, width, base_depth, log2_lr, it, **changes):
    """A muP run of `depth` layers with the depth scaling of DEPTH_VARIANTS[variant]."""
    scaling = dict(DEPTH_VARIANTS[variant], mup_base_depth=base_depth) if variant != 'none' else {}
    return setting('mup', width, log2_lr, it, n_layer=depth, **scaling, **changes)


class Runner:
    """Measures runs with train.py, at most `jobs` at a time, and records each in a JSON file
    (one record per run, keyed by run_key) rewritten atomically after each run, so Ctrl-C loses
    at most the runs in flight. A run asked for twice in one session (a line search revisits its
    centre) is measured once; one recorded by an earlier session is taken from the file only
    with `reuse`, and is otherwise measured again and its record replaced. Run studies inside
    `with runner:`, which shows the progress bar, and on leaving starts no more runs."""

    def __init__(self, path, fixed, seeds, jobs=1, threads=1, reuse=False):
        """fixed: the settings every run shares (REFERENCE's and the device); each setting is run
        once per seed in `seeds` and scored by its mean val loss; threads: OMP threads per run. A
        bad attention class stops here, with one line, before any run."""
        try:
            load_attn_cls(fixed['attn_cls'])
        except ValueError as e:
            raise UserError(str(e)) from None
        self.path, self.fixed, self.seeds = path, fixed, seeds
        self.jobs, self.threads, self.reuse = jobs, threads, reuse
        self.records = {} # key -> record: what the file holds, and this session's runs once measured
        if os.path.exists(path):
            with open(path) as f:
                self.records = {run_key(r): r for r in json.load(f)}
        self.asked = {} # key -> Future of the record, for every run asked for in this session
        self.measured = 0
        self.reused = 0
        self.lock = threading.Lock()
        self.pool = ThreadPoolExecutor(jobs)

    def __enter__(self):
        self.progress = tqdm(total=0, desc='train.py runs', unit='run') # grows as the studies ask for runs
        return self

    def __exit__(self, *exc):
        self.pool.shutdown(cancel_futures=True) # after a failure or Ctrl-C, start none of the queued runs
        self.progress.close()

    def describe(self):
        what = "reused" if self.reuse else "measured again (--reuse=True reuses them)"
        return (f"{len(self.records)} runs recorded in {self.path}: {what} where a study needs them; "
                f"{self.jobs} at a time, {self.threads} thread(s) each, on {self.fixed['device']}")

    def summary(self):
        return f"{self.measured} runs measured, {self.reused} reused from {self.path}"

    def run_all(self, runs):
        """runs: dicts with param, width, seed, max_iters, the MUP_HPARAMS and any shared setting
        they change. Returns their records, in order."""
        runs = [dict(self.fixed, **r) for r in runs]
        keys = [run_key(r) for r in runs]
        with self.lock:
            for key, run in zip(keys, runs):
                if key in self.asked:
                    continue
                if self.reuse and key in self.records:
                    self.asked[key] = Future()
                    self.asked[key].set_result(self.records[key])
                    self.reused += 1
                else:
                    self.asked[key] = self.pool.submit(self.measure, key, run)
                    self.progress.total += 1
            self.progress.refresh()
        return [self.asked[key].result() for key in keys]

    def measure(self, key, run):
        record = dict(run, **train(run, self.threads))
        with self.lock:
            self.records[key] = record
            self.measured += 1
            tmp = self.path + '.tmp'
            with open(tmp, 'w') as f:
                json.dump(list(self.records.values()), f, indent=1)
            os.replace(tmp, self.path)
            self.progress.update(1)
        return record

    def evaluate(self, settings):
        """The mean val loss over seeds of each setting (see `setting`)."""
        return [sum(losses) / len(losses) for losses in self.per_seed(settings)]

    def per_seed(self, settings, seeds=None):
        """The val loss of each setting at each seed of `seeds` (the runner's by default),
        [[loss per seed] per setting]; a diverged run is inf."""
        seeds = self.seeds if seeds is None else seeds
        records = self.run_all([dict(s, seed=seed) for s in settings for seed in seeds])
        n = len(seeds)
        return [[val(r) for r in records[i * n:(i + 1) * n]] for i in range(len(settings))]
