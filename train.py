"""
Train a GPT, SP or muP, on one CPU/GPU or on several with DDP:
$ python train.py config/shakespeare_mup.py
$ python train.py config/train_shakespeare_char.py --device=cpu --compile=False --max_iters=2000
$ torchrun --standalone --nproc_per_node=4 train.py config/shakespeare_mup.py --gradient_accumulation_steps=4
Across nodes (run on each; the master's IP in --master_addr):
$ torchrun --nproc_per_node=8 --nnodes=2 --node_rank=0 --master_addr=10.0.0.1 --master_port=1234 train.py ...
gradient_accumulation_steps counts the micro-batches of the global batch, so it must be a multiple
of the number of processes. Ctrl-C or SIGTERM finishes the step, saves out_dir/ckpt.pt and exits;
`--init_from=resume` with the same settings continues exactly where it stopped.
"""

import math
import os
import pickle
import random
import re
import signal
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import fields

import numpy as np
import torch
from torch.distributed import destroy_process_group, init_process_group
from torch.nn.parallel import DistributedDataParallel as DDP

from configurator import ConfigError, configure
from model import GPT, GPTConfig, device_peak_flops, set_lr

# -----------------------------------------------------------------------------
# default config values, every one overridable by a config file or --key=value
# I/O
out_dir = 'out'
eval_interval = 250
log_interval = 10
eval_iters = 200
eval_only = False # if True, script exits right after the first eval
always_save_checkpoint = True # if True, always save a checkpoint after each eval
keep_last_n = 0 # > 0: also keep the last n checkpoints as ckpt_<iter>.pt (ckpt.pt is always the latest)
init_from = 'scratch' # 'scratch' or 'resume' (from out_dir/ckpt.pt, with the same model settings)
skip_nonfinite = False # a non-finite loss or gradient: False stops the run, True skips that step
# wandb logging
wandb_log = False
wandb_project = 'mupgpt'
wandb_run_name = 'run'
# data
dataset = 'shakespeare_char'
gradient_accumulation_steps = 1 # micro-batches of the global batch, split across DDP processes
batch_size = 12 # micro-batch size
# model: every GPTConfig field but vocab_size is a key; these replace its defaults, the muP and
# attention keys keep theirs (model.py)
n_layer = 6
n_head = 6
n_embd = 384
block_size = 256
dropout = 0.0 # for pretraining 0 is good, for finetuning try 0.1+
bias = False # do we use bias inside LayerNorm and Linear layers?
# optimizer: 'adamw', or 'muon' (torch's Muon for the hidden matrices, AdamW for the rest)
optimizer = 'adamw'
muon_lr_mult = 1.0 # the Muon group's lr is learning_rate x muon_lr_mult: a muTransfer hyperparameter
muon_momentum = 0.95
learning_rate = 1e-3 # max learning rate: the base lr, which each muP group scales by its lr_scale
max_iters = 5000 # total number of training iterations
weight_decay = 1e-1
beta1 = 0.9
beta2 = 0.99
adam_eps = 1e-8
grad_clip = 1.0 # clip gradients at this value, or disable if == 0.0
# learning rate decay settings
decay_lr = True # whether to decay the learning rate
warmup_iters = 100 # how many steps to warm up for
lr_decay_iters = 5000 # should be ~= max_iters per Chinchilla
min_lr = 1e-4 # minimum learning rate, should be ~= learning_rate/10 per Chinchilla
# system
device = 'auto' # 'auto' (cuda > mps > cpu), or 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = 'auto' # 'auto': bfloat16 where the GPU supports it, else float16 on CUDA; float32 elsewhere
compile = True # use PyTorch 2.0 to compile the model to be faster
seed = 1337
_model_keys = [f.name for f in fields(GPTConfig) if f.name != 'vocab_size']
globals().update({k: getattr(GPTConfig, k) for k in _model_keys if k not in globals()})
# -----------------------------------------------------------------------------
config = configure(globals(), sys.argv[1:])
# -----------------------------------------------------------------------------

def check_config():
    """Every setting is checked before any work starts: a bad one stops the run with one line that
    names it, its value and what it must be."""
    rules = [
        ('batch_size', batch_size >= 1, 'an integer >= 1'),
        ('gradient_accumulation_steps', gradient_accumulation_steps >= 1, 'an integer >= 1'),
        ('max_iters', max_iters >= 0, 'an integer >= 0'),
        ('eval_iters', eval_iters >= 1, 'an integer >= 1: the val loss is a mean over eval_iters batches'),
        ('eval_interval', eval_interval >= 1, 'an integer >= 1'),
        ('log_interval', log_interval >= 1, 'an integer >= 1'),
        ('keep_last_n', keep_last_n >= 0, 'an integer >= 0'),
        ('warmup_iters', warmup_iters >= 0, 'an integer >= 0'),
        ('lr_decay_iters', lr_decay_iters > warmup_iters or not decay_lr, 'larger than warmup_iters'),
        ('learning_rate', 0 <= learning_rate < math.inf, 'a finite number >= 0'),
        ('min_lr', 0 <= min_lr <= learning_rate, 'a number between 0 and learning_rate'),
        ('weight_decay', 0 <= weight_decay < math.inf, 'a finite number >= 0'),
        ('beta1', 0 <= beta1 < 1, 'in [0, 1)'),
        ('beta2', 0 <= beta2 < 1, 'in [0, 1)'),
        ('adam_eps', 0 < adam_eps < math.inf, 'a finite number > 0'),
        ('grad_clip', 0 <= grad_clip < math.inf, 'a finite number >= 0 (0 = no clipping)'),
        ('dtype', dtype in ('auto', 'float32', 'bfloat16', 'float16'), "'auto', 'float32', 'bfloat16' or 'float16'"),
        ('optimizer', optimizer in ('adamw', 'muon'), "'adamw' or 'muon'"),
        ('muon_lr_mult', 0 < muon_lr_mult < math.inf, 'a finite number > 0'),
        ('muon_momentum', 0 <= muon_momentum < 1, 'in [0, 1)'),
        ('init_from', init_from in ('scratch', 'resume'), "'scratch' or 'resume'"),
    ]
    for key, ok, must_be in rules:
        if not ok:
            raise ConfigError(f"{key}={globals()[key]!r}: must be {must_be}")
    try:
        torch.device('cpu' if device == 'auto' else device)
    except RuntimeError:
        raise ConfigError(f"device={device!r}: use 'auto', 'cpu', 'cuda', 'cuda:<index>' or 'mps'") from None
    if device.startswith('cuda') and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r}, but this machine has no CUDA device: use --device=cpu (or auto)")
    if gradient_accumulation_steps % ddp_world_size:
        raise ConfigError(f"gradient_accumulation_steps={gradient_accumulation_steps}: must be a multiple of the number "
                          f"of processes ({ddp_world_size}), since it counts the micro-batches of the global batch; "
                          f"e.g. --gradient_accumulation_steps={ddp_world_size}")

# various inits, derived attributes, I/O setup
ddp = int(os.environ.get('RANK', -1)) != -1 # is this a ddp run?
ddp_rank, ddp_local_rank, ddp_world_size = (int(os.environ.get(k, d)) for k, d in
                                            (('RANK', 0), ('LOCAL_RANK', 0), ('WORLD_SIZE', 1)))
master_process = ddp_rank == 0 # this process will do logging, checkpointing etc.
check_config()
if device == 'auto':
    device = 'cuda' if torch.cuda.is_available() else 'mps' if torch.backends.mps.is_available() else 'cpu'
device_type = 'cuda' if 'cuda' in device else 'mps' if 'mps' in device else 'cpu'
if ddp:
    init_process_group(backend='nccl' if device_type == 'cuda' else 'gloo')
    if device_type == 'cuda':
        device = f'cuda:{ddp_local_rank}'
        torch.cuda.set_device(device)
local_accum_steps = gradient_accumulation_steps // ddp_world_size
if master_process:
    print(f"tokens per iteration will be: {gradient_accumulation_steps * batch_size * block_size:,}")
torch.manual_seed(seed + ddp_rank) # dropout differs per process; batches come from data_rng below
torch.backends.cuda.matmul.allow_tf32 = True # allow tf32 on matmul
torch.backends.cudnn.allow_tf32 = True # allow tf32 on cudnn
if dtype == 'auto':
    dtype = ('bfloat16' if torch.cuda.is_bf16_supported() else 'float16') if device_type == 'cuda' else 'float32'
ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype]
ctx = nullcontext() if ptdtype == torch.float32 else torch.amp.autocast(device_type=device_type, dtype=ptdtype)

# data: uint16 token files written by data/<dataset>/prepare.py
data_dir = os.path.join('data', dataset) # relative to the working directory, as nanoGPT
for split in ('train', 'val'):
    path = os.path.join(data_dir, f'{split}.bin')
    if not os.path.exists(path):
        raise ConfigError(f"dataset={dataset!r}: {path} not found; prepare the dataset first with "
                          f"`python data/{dataset}/prepare.py` (offline: add --input PATH/TO/input.txt)")
    if os.path.getsize(path) // 2 <= block_size:
        raise ConfigError(f"block_size={block_size}: {path} holds only {os.path.getsize(path) // 2} tokens; "
                          f"a training sequence needs block_size + 1 of them: lower block_size")
# Every process draws the indices of the whole global batch from one generator and keeps its
# own share, so N processes see exactly the micro-batches one process sees with N x accumulation.
data_rng = torch.Generator().manual_seed(seed)

def get_batch(split, generator, n_micro):
    """n_micro micro-batches (x, y) of this process's share; the generator is advanced identically
    on every process."""
    # recreate np.memmap every batch to avoid a memory leak, as per
    # https://stackoverflow.com/questions/45132940/numpy-memmap-memory-usage-want-to-iterate-once/61472122#61472122
    data = np.memmap(os.path.join(data_dir, f'{split}.bin'), dtype=np.uint16, mode='r')
    ix = torch.randint(len(data) - block_size, (n_micro * ddp_world_size, batch_size), generator=generator)
    batches = []
    for rows in ix[ddp_rank * n_micro:(ddp_rank + 1) * n_micro].tolist():
        x = torch.stack([torch.from_numpy(data[i:i+block_size].astype(np.int64)) for i in rows])
        y = torch.stack([torch.from_numpy(data[i+1:i+1+block_size].astype(np.int64)) for i in rows])
        if device_type == 'cuda':
            # pin arrays x,y, which allows us to move them to GPU asynchronously (non_blocking=True)
            x, y = x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        else:
            x, y = x.to(device), y.to(device)
        batches.append((x, y))
    return batches

# attempt to derive vocab_size from the dataset
meta_path = os.path.join(data_dir, 'meta.pkl')
meta_vocab_size = None
if os.path.exists(meta_path):
    with open(meta_path, 'rb') as f:
        meta_vocab_size = pickle.load(f)['vocab_size']
    print(f"found vocab_size = {meta_vocab_size} (inside {meta_path})")
model_args = {k: config[k] for k in _model_keys}
model_args['vocab_size'] = meta_vocab_size if meta_vocab_size is not None else 50304
ckpt_path = os.path.join(out_dir, 'ckpt.pt')

def load_checkpoint():
    """The checkpoint to resume, after checking that this run's settings build its model."""
    if not os.path.exists(ckpt_path):
        raise ConfigError(f"init_from='resume', but {ckpt_path} does not exist: train with init_from='scratch' "
                          f"first, or point --out_dir at the run to resume")
    try:
        checkpoint = torch.load(ckpt_path, map_location=device, weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise ConfigError(f"{ckpt_path} is truncated or corrupt, it cannot be loaded ({type(e).__name__}: "
                          f"{str(e).splitlines()[0]}). Resume from an intact copy, e.g. a numbered "
                          f"ckpt_<iter>.pt kept by keep_last_n, copied to ckpt.pt") from None
    required = ['model', 'optimizer', 'model_args', 'iter_num', 'best_val_loss', 'config', 'skipped_steps',
                'data_rng_state', 'rng_states']
    missing = [k for k in required if k not in checkpoint] if isinstance(checkpoint, dict) else required
    if missing:
        raise ConfigError(f"{ckpt_path} is not a checkpoint of this train.py (missing {', '.join(missing)}); "
                          f"it cannot be resumed exactly: start with init_from='scratch'")
    # Only the attention backend (the same function, another kernel) may change: taking the
    # checkpoint's shape silently would leave the flags and the model disagreeing.
    differ = [f"  {k}: checkpoint {checkpoint['model_args'].get(k)!r} vs requested {model_args[k]!r}"
              for k in model_args if k != 'attn_backend' and checkpoint['model_args'].get(k) != model_args[k]]
    if differ:
        raise ConfigError(f"cannot resume {ckpt_path}: the model settings differ from the checkpoint's:\n"
                          + "\n".join(differ) + "\nResume with the config file and flags of the run that "
                          "wrote it (only attn_backend may change).")
    if checkpoint['config'].get('optimizer', 'adamw') != optimizer:
        raise ConfigError(f"optimizer={optimizer!r}: {ckpt_path} was trained with "
                          f"optimizer={checkpoint['config'].get('optimizer', 'adamw')!r}, whose state it holds; "
                          f"resume with that optimizer")
    changed = [f"{k} {v!r} -> {config[k]!r}" for k, v in checkpoint['config'].items()
               if k != 'init_from' and k in config and config[k] != v]
    if changed and master_process:
        print(f"resuming with settings changed from the checkpoint's run: {', '.join(changed)}")
    return checkpoint

# model init
checkpoint = load_checkpoint() if init_from == 'resume' else None
iter_num = checkpoint['iter_num'] if checkpoint else 0
best_val_loss = checkpoint['best_val_loss'] if checkpoint else 1e9
skipped_steps = checkpoint['skipped_steps'] if checkpoint else 0 # non-finite steps skipped (skip_nonfinite)
start_iter = iter_num # a checkpoint at start_iter would only rewrite the one we started from
try:
    gptconf = GPTConfig(**model_args)
except ValueError as e:
    raise ConfigError(str(e)) from None
model = GPT(gptconf)
if checkpoint is not None:
    model.load_state_dict(checkpoint['model'])
model.to(device)
if master_process:
    backends = sorted({block.attn.resolve_backend(torch.device(device)) for block in model.transformer.h})
    mup = f"muP, base width {gptconf.mup_base_width}, m = {gptconf.width_mult:g}" if gptconf.mup_base_width else "SP"
    print(f"model: {mup}; attention {gptconf.attn_mod} on the {'/'.join(backends)} backend; device {device}, {dtype}")

# initialize a GradScaler. If enabled=False scaler is a no-op
scaler = torch.amp.GradScaler(device_type, enabled=(dtype == 'float16'))

# optimizer: one group per muP treatment, each with its lr_scale
optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type, adam_eps,
                                       optimizer, muon_lr_mult, muon_momentum)
if checkpoint is not None:
    # load_state_dict also restores the saved hyperparameters (weight_decay, betas): keep this run's
    hyperparameters = [{k: v for k, v in g.items() if k != 'params'} for g in optimizer.param_groups]
    optimizer.load_state_dict(checkpoint['optimizer'])
    for group, h in zip(optimizer.param_groups, hyperparameters):
        group.update(h)

# compile the model
raw_model = model
if compile:
    print("compiling the model... (takes a ~minute)")
    model = torch.compile(model)

# wrap model into DDP container
if ddp:
    model = DDP(model, device_ids=[ddp_local_rank] if device_type == 'cuda' else None)

@torch.no_grad()
def estimate_loss():
    """Mean loss over eval_iters batches per split. The batches are the same at every eval
    (a fixed generator), so successive evals differ only by the model."""
    out = {}
    model.eval()
    for split in ['train', 'val']:
        generator = torch.Generator().manual_seed(seed + 1)
        losses = torch.zeros(eval_iters)
        for k in range(eval_iters):
            X, Y = get_batch(split, generator, 1)[0]
            with ctx:
                logits, loss = model(X, Y)
            losses[k] = loss.item()
        out[split] = losses.mean().item()
    model.train()
    return out

# learning rate decay scheduler (cosine with warmup)
def get_lr(it):
    # 1) linear warmup for warmup_iters steps
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    # 2) if it > lr_decay_iters, return min learning rate
    if it > lr_decay_iters:
        return min_lr
    # 3) in between, use cosine decay down to min learning rate
    decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio)) # coeff ranges 0..1
    return min_lr + coeff * (learning_rate - min_lr)

def rng_states():
    """Every process's RNG states (python, numpy, torch, CUDA), gathered from all processes, so a
    resumed run draws the same dropout masks. A collective under DDP: every process must call it."""
    state = {'python': random.getstate(), 'numpy': np.random.get_state(), 'torch': torch.get_rng_state(),
             'cuda': torch.cuda.get_rng_state() if device_type == 'cuda' else None}
    if not ddp:
        return [state]
    states = [None] * ddp_world_size
    torch.distributed.all_gather_object(states, state)
    return states

def set_rng_states(states):
    """Continue the RNG streams of the checkpoint's run; a run with another number of processes
    cannot, and keeps its fresh seeds (the batches come from data_rng and are unaffected)."""
    if len(states) != ddp_world_size:
        if master_process:
            print(f"the checkpoint holds the RNG states of {len(states)} processes, this run has "
                  f"{ddp_world_size}: dropout continues from fresh seeds")
        return
    state = states[ddp_rank]
    random.setstate(state['python'])
    np.random.set_state(state['numpy'])
    torch.set_rng_state(state['torch'])
    if device_type == 'cuda' and state['cuda'] is not None:
        torch.cuda.set_rng_state(state['cuda'])

def save_checkpoint(rng):
    """Atomic: write a temporary file beside ckpt.pt, fsync, then rename it over ckpt.pt, so a kill at
    any moment leaves the previous checkpoint intact. With keep_last_n the file is renamed to
    ckpt_<iter>.pt instead and ckpt.pt becomes a second name (hard link) of it: no second write."""
    checkpoint = {
        'model': raw_model.state_dict(),
        'optimizer': optimizer.state_dict(),
        'model_args': model_args,
        'iter_num': iter_num,
        'best_val_loss': best_val_loss,
        'config': config,
        'skipped_steps': skipped_steps,
        'data_rng_state': batch_rng_state, # the state that drew this iteration's batches, not the next
        'rng_states': rng,
    }
    tmp_path = ckpt_path + '.tmp'
    with open(tmp_path, 'wb') as f:
        torch.save(checkpoint, f)
        f.flush()
        os.fsync(f.fileno())
    saved = [ckpt_path]
    if keep_last_n:
        numbered = os.path.join(out_dir, f'ckpt_{iter_num:06d}.pt')
        os.replace(tmp_path, numbered)
        os.link(numbered, tmp_path)
        saved.append(numbered)
    os.replace(tmp_path, ckpt_path)
    if keep_last_n:
        kept = sorted((int(m[1]), m[0]) for m in map(re.compile(r'ckpt_(\d+)\.pt$').match, os.listdir(out_dir)) if m)
        for _, name in kept[:-keep_last_n]:
            os.remove(os.path.join(out_dir, name))
    print(f"saved checkpoint to {' and '.join(saved)}")

# SIGINT (Ctrl-C) / SIGTERM (schedulers, torchrun) ask the loop to finish its step, save and exit 0
stop_signal = None
def request_stop(signum, frame):
    global stop_signal
    stop_signal = signal.Signals(signum).name
    signal.signal(signum, signal.SIG_DFL) # a second one stops at once

if master_process:
    try: # fail now, not at the first checkpoint after a long stretch of training
        os.makedirs(out_dir, exist_ok=True)
        tempfile.TemporaryFile(dir=out_dir).close()
    except OSError as e:
        raise ConfigError(f"out_dir={out_dir!r} is not a writable directory ({e}): checkpoints are saved there; "
                          f"pass --out_dir=<a directory you can write>") from None
    if wandb_log:
        import wandb
        wandb.init(project=wandb_project, name=wandb_run_name, config={**config, 'width_mult': gptconf.width_mult,
                   **{f"lr_scale/{g['name']}": g['lr_scale'] for g in optimizer.param_groups}})

# training loop
peak_flops = device_peak_flops(device)
if checkpoint is not None: # last: building the model and measuring peak flops drew from torch's RNG
    data_rng.set_state(checkpoint['data_rng_state'])
    set_rng_states(checkpoint['rng_states'])
checkpoint = None # free up memory
batch_rng_state = data_rng.get_state() # what drew `batches`: a checkpoint stores it, so a resume redraws them
batches = get_batch('train', data_rng, local_accum_steps) # fetch the very first batch
signal.signal(signal.SIGINT, request_stop)
signal.signal(signal.SIGTERM, request_stop)
t0 = time.time()
local_iter_num = 0 # number of iterations in the lifetime of this process
running_mfu = -1.0
while True:

    # determine and set the learning rate for this iteration: each group gets its muP lr_scale
    lr = get_lr(iter_num) if decay_lr else learning_rate
    set_lr(optimizer, lr)

    # evaluate the loss on train/val sets and write checkpoints
    if iter_num % eval_interval == 0:
        rng = rng_states() # on every process, before its RNGs move on
        if master_process:
            losses = estimate_loss()
            print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
            if wandb_log:
                wandb.log({"iter": iter_num, "train/loss": losses['train'], "val/loss": losses['val']})
            # a non-finite eval loss (skip_nonfinite after a blow-up) must not replace the last good checkpoint
            if math.isfinite(losses['val']) and (losses['val'] < best_val_loss or always_save_checkpoint):
                best_val_loss = min(best_val_loss, losses['val'])
                if iter_num > start_iter:
                    save_checkpoint(rng)
    if iter_num == 0 and eval_only:
        break

    # forward backward update, with optional gradient accumulation to simulate larger batch size
    # and using the GradScaler if data type is float16
    loss_sum = torch.zeros((), device=device)
    for micro_step, (X, Y) in enumerate(batches):
        if ddp:
            # only sync gradients at the last micro step of the global batch
            model.require_backward_grad_sync = (micro_step == local_accum_steps - 1)
        with ctx:
            logits, loss = model(X, Y)
            # mean over this process's micro-batches; DDP then averages over processes, which
            # makes the gradient the mean over the global batch
            loss = loss / local_accum_steps
        loss_sum += loss.detach()
        scaler.scale(loss).backward()
    batch_rng_state = data_rng.get_state()
    batches = get_batch('train', data_rng, local_accum_steps) # next batch, while the GPU is busy
    # One sync per step: the global batch's loss, the gradient norm (the same on every process after
    # DDP's all-reduce) and whether any process was asked to stop, so that all of them act alike.
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    step_stats = torch.stack([loss_sum, torch.tensor(float(stop_signal is not None), device=device)])
    if ddp:
        torch.distributed.all_reduce(step_stats)
    lossf, stop_requested = step_stats[0].item() / ddp_world_size, step_stats[1].item() > 0
    grad_normf = grad_norm.item()
    # fp16's GradScaler expects overflowing gradients now and then and skips those steps itself
    if not math.isfinite(lossf) or (not math.isfinite(grad_normf) and not scaler.is_enabled()):
        bad = sorted({g['name'] for g in optimizer.param_groups
                      if any(p.grad is not None and not torch.isfinite(p.grad).all() for p in g['params'])})
        what = (f"iter {iter_num}: non-finite loss {lossf} or gradient norm {grad_normf} "
                f"(param groups with non-finite gradients: {', '.join(bad) or 'none'})")
        if not skip_nonfinite:
            last = f"last good checkpoint: {ckpt_path}" if os.path.exists(ckpt_path) else "no checkpoint saved yet"
            sys.exit(f"{what}. Stopped; {last}. Lower the learning rate or check the data; "
                     f"--skip_nonfinite=True skips such steps instead" if master_process else 1)
        skipped_steps += 1
        if master_process:
            print(f"{what}: step skipped ({skipped_steps} skipped so far)")
    else:
        if grad_clip != 0.0:
            torch.nn.utils.clip_grads_with_norm_(model.parameters(), grad_clip, grad_norm)
        scaler.step(optimizer)
    scaler.update()
    # flush the gradients as soon as we can, no need for this memory anymore
    optimizer.zero_grad(set_to_none=True)

    # timing and logging
    t1 = time.time()
    dt = t1 - t0
    t0 = t1
    if iter_num % log_interval == 0 and master_process:
        if local_iter_num >= 5: # let the training loop settle a bit
            mfu = raw_model.estimate_mfu(batch_size * local_accum_steps, dt, peak_flops)
            running_mfu = mfu if running_mfu == -1.0 else 0.9*running_mfu + 0.1*mfu
        # the loss of an fp32 value to its last bit (9 digits): a resumed run can be diffed with the original
        print(f"iter {iter_num}: loss {lossf:.9g}, time {dt*1000:.2f}ms, mfu {running_mfu*100:.2f}%")
        if wandb_log:
            wandb.log({"iter": iter_num, "loss": lossf, "grad_norm": grad_normf, "mfu": running_mfu*100,
                       "skipped_steps": skipped_steps, **{f"lr/{g['name']}": g['lr'] for g in optimizer.param_groups}})
    iter_num += 1
    local_iter_num += 1

    # graceful stop: the step is done, save where the next one would start
    if stop_requested:
        rng = rng_states()
        if master_process:
            save_checkpoint(rng)
            print(f"{stop_signal or 'stop requested by another process'}: stopped before iter {iter_num}; "
                  f"checkpoint in {ckpt_path}, continue with --init_from=resume")
        break
    # termination conditions
    if iter_num > max_iters:
        break

if ddp:
    torch.distributed.barrier() # no process tears down while another still talks to it
    destroy_process_group()
