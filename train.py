"""
Train a GPT, SP or muP, on one CPU/GPU or on several with DDP or FSDP2 (--fsdp=True).

On one device:
$ python train.py config/shakespeare_mup.py
$ python train.py config/train_shakespeare_char.py --device=cpu --compile=False --max_iters=2000

With DDP on the 4 GPUs of one node:
$ torchrun --standalone --nproc_per_node=4 \
    train.py config/shakespeare_mup.py --gradient_accumulation_steps=4

With DDP on 2 nodes of 8 GPUs; first on the master node, whose IP is --master_addr:
$ torchrun --nproc_per_node=8 --nnodes=2 --node_rank=0 --master_addr=10.0.0.1 --master_port=29500 \
    train.py config/shakespeare_mup.py --gradient_accumulation_steps=16
then on the other node:
$ torchrun --nproc_per_node=8 --nnodes=2 --node_rank=1 --master_addr=10.0.0.1 --master_port=29500 \
    train.py config/shakespeare_mup.py --gradient_accumulation_steps=16

With FSDP2, parameters, gradients and optimizer state sharded over the processes (same flags;
each process saves its shards in a directory out_dir/ckpt_<iter>_<token>.dcp, which ckpt.pt
names; across nodes out_dir must be on a filesystem they share):
$ torchrun --standalone --nproc_per_node=8 \
    train.py config/train_gpt2_mup.py --gradient_accumulation_steps=40 --fsdp=True

gradient_accumulation_steps counts the micro-batches of the global batch, so it must be a
multiple of the number of processes. Ctrl-C or SIGTERM finishes the step, saves out_dir/ckpt.pt
and exits; `--init_from=resume` with the same settings continues exactly where it stopped.
"""

import math
import os
import signal
import sys
import tempfile
import time
from dataclasses import asdict, fields

import torch

import checkpoints
import distributed
import hf
import transfer
from configurator import (DTYPES, autocast, configure, device_peak_flops, model_settings, require, resolve_device,
                          resolve_dtype)
from data import check_token_files, get_batch, read_meta
from errors import UserError
from model import GPT, GPTConfig, set_lr

# -----------------------------------------------------------------------------
# default config values, every one overridable by a config file or --key=value; `python train.py
# --help` lists them with what each means
# ---- I/O
out_dir = 'out' # checkpoints go to out_dir/ckpt.pt
eval_interval = 250 # evaluate the train and val loss (and save) every eval_interval iterations
log_interval = 10 # print the loss every log_interval iterations
eval_iters = 200 # batches per loss estimate
eval_only = False # if True, script exits right after the first eval
always_save_checkpoint = True # if True, always save a checkpoint after each eval
keep_last_n = 0 # > 0: also keep the last n checkpoints as ckpt_<iter>.pt
# 'scratch', 'resume' (out_dir/ckpt.pt, with the same model settings), or GPT-2's weights: 'gpt2',
# 'gpt2-medium', 'gpt2-large', 'gpt2-xl' or a local transformers GPT-2 directory (hf.py)
init_from = 'scratch'
skip_nonfinite = False # a non-finite loss or gradient: False stops the run, True skips the step
# ---- wandb logging
wandb_log = False # log to Weights & Biases
wandb_project = 'mupgpt' # the wandb project
wandb_run_name = 'run' # the run's name in it
# ---- data
dataset = 'shakespeare_char' # data/<dataset>/{train,val}.bin, from data/<dataset>/prepare.py
gradient_accumulation_steps = 1 # micro-batches of the global batch, split over the processes
batch_size = 12 # micro-batch size
# ---- model: every field of model.GPTConfig is a setting, at its default there but for these (its
# comment there is its --help); vocab_size is the dataset's
globals().update(model_settings(n_layer=6, n_head=6, n_embd=384, block_size=256, bias=False))
# ---- optimizer
optimizer = 'adamw' # 'adamw', or 'muon' (muon.py's Muon for the hidden matrices, AdamW for the rest)
muon_lr_mult = 1.0 # the Muon group's lr is learning_rate x muon_lr_mult (muTransferable)
muon_momentum = 0.95 # Muon's momentum (its beta)
learning_rate = 1e-3 # max learning rate; each muP group scales it by its lr_scale
max_iters = 5000 # total number of training iterations
weight_decay = 1e-1 # AdamW's (decoupled); muP scales the hidden matrices' by m (mup_scale_weight_decay)
beta1 = 0.9 # AdamW's first-moment decay
beta2 = 0.99 # AdamW's second-moment decay
adam_eps = 1e-8 # AdamW's epsilon; CompleteP scales it per group
grad_clip = 1.0 # clip gradients at this value, or disable if == 0.0
# ---- learning rate decay settings
decay_lr = True # whether to decay the learning rate
warmup_iters = 100 # how many steps to warm up for
lr_decay_iters = 5000 # should be ~= max_iters per Chinchilla
min_lr = 1e-4 # minimum learning rate, should be ~= learning_rate/10 per Chinchilla
# ---- tune small, train big along the batch and the length (transfer.py; docs/mup.md, "Beyond
# width and depth"): with these set, the optimizer values above are a proxy's, tuned at another
# batch or length, and the run derives its own from them; 0 = off (that axis is the proxy's)
base_batch_tokens = 0 # tokens per optimizer step of the tuning run
base_train_tokens = 0 # total training tokens of the tuning run
# lr x (B / base_batch_tokens)^this below the critical batch; -1: the one measured here for the
# optimizer (transfer.MEASURED_EXPONENTS: AdamW 0.45, Muon 0.63)
batch_lr_exponent = transfer.MEASURED
# lr x (D / base_train_tokens)^-this; -1: the one measured here for the optimizer (AdamW 0, Muon 0.55)
length_lr_exponent = transfer.MEASURED
critical_batch_tokens = 0 # the lr stops growing with the batch above this many tokens a step (0: no bound)
# ---- FSDP2
# under torchrun: shard parameters, gradients and optimizer state over the processes instead of
# replicating them as DDP does; for models whose training state outgrows one device
fsdp = False
# ---- system
device = 'auto' # 'auto' (cuda > mps > cpu), or 'cpu', 'cuda', 'cuda:1', 'mps'
# 'auto': bfloat16 where the GPU supports it, else float16 on CUDA; float32 off CUDA
dtype = 'auto'
compile = True # use PyTorch 2.0 to compile the model to be faster
seed = 1337 # of the init, the batches and dropout
# -----------------------------------------------------------------------------
config = configure(globals(), sys.argv[1:])
# -----------------------------------------------------------------------------

# Every setting is checked before any work starts, in order: a check that relies on another
# setting comes after that setting's own check. A bad one stops the run with one line.
procs = distributed.processes() # this process among torchrun's, or the only one
require(config, 'batch_size', batch_size >= 1, 'an integer >= 1')
require(config, 'gradient_accumulation_steps', gradient_accumulation_steps >= 1, 'an integer >= 1')
require(config, 'max_iters', max_iters >= 0, 'an integer >= 0')
require(config, 'eval_iters', eval_iters >= 1,
        'an integer >= 1: the val loss is a mean over eval_iters batches')
require(config, 'eval_interval', eval_interval >= 1, 'an integer >= 1')
require(config, 'log_interval', log_interval >= 1, 'an integer >= 1')
require(config, 'keep_last_n', keep_last_n >= 0, 'an integer >= 0')
require(config, 'warmup_iters', warmup_iters >= 0, 'an integer >= 0')
require(config, 'lr_decay_iters', lr_decay_iters > warmup_iters or not decay_lr,
        'larger than warmup_iters')
require(config, 'learning_rate', 0 <= learning_rate < math.inf, 'a finite number >= 0')
require(config, 'min_lr', 0 <= min_lr <= learning_rate, 'a number between 0 and learning_rate')
require(config, 'weight_decay', 0 <= weight_decay < math.inf, 'a finite number >= 0')
require(config, 'beta1', 0 <= beta1 < 1, 'in [0, 1)')
require(config, 'beta2', 0 <= beta2 < 1, 'in [0, 1)')
require(config, 'adam_eps', 0 < adam_eps < math.inf, 'a finite number > 0')
require(config, 'grad_clip', 0 <= grad_clip < math.inf, 'a finite number >= 0 (0 = no clipping)')
require(config, 'dtype', dtype in DTYPES, "'auto', 'float32', 'bfloat16' or 'float16'")
require(config, 'optimizer', optimizer in ('adamw', 'muon'), "'adamw' or 'muon'")
require(config, 'muon_lr_mult', 0 < muon_lr_mult < math.inf, 'a finite number > 0')
require(config, 'muon_momentum', 0 <= muon_momentum < 1, 'in [0, 1)')
for key in ('base_batch_tokens', 'base_train_tokens', 'critical_batch_tokens'):
    require(config, key, config[key] >= 0, 'an integer >= 0 (0 = off)')
for key in ('batch_lr_exponent', 'length_lr_exponent'):
    require(config, key, abs(config[key]) < math.inf, f'a finite number ({transfer.MEASURED:g}: the measured one)')
require(config, 'init_from', init_from in ('scratch', 'resume', *hf.GPT2_SIZES) or os.path.isdir(init_from),
        f"'scratch', 'resume', one of {', '.join(hf.GPT2_SIZES)}, or the path of a directory that "
        f"transformers' GPT2LMHeadModel.save_pretrained wrote")
device = resolve_device(device) # 'auto' becomes cuda, mps or cpu
if fsdp and not procs.ddp:
    raise UserError("fsdp=True shards the model over torchrun's processes: launch with "
                      "torchrun --standalone --nproc_per_node=<N> train.py ... --fsdp=True")
if fsdp and dtype == 'float16':
    raise UserError("fsdp=True with dtype='float16': FSDP here computes in bfloat16 or "
                      "float32; use --dtype=bfloat16 (or auto)")
if gradient_accumulation_steps % procs.world_size:
    raise UserError(f"gradient_accumulation_steps={gradient_accumulation_steps}: must be a "
                      f"multiple of the number of processes ({procs.world_size}), since it "
                      f"counts the micro-batches of the global batch; e.g. "
                      f"--gradient_accumulation_steps={procs.world_size}")

# the data: uint16 token files written by data/<dataset>/prepare.py, relative to the working
# directory (as nanoGPT); meta.pkl, if there is one, holds the dataset's vocab_size. The model's
# settings come before the token files' checks, which need a valid block_size.
data_dir = os.path.join('data', dataset)
meta = read_meta(data_dir)
vocab_size = 50304 # without meta.pkl: GPT-2's 50257 tokens, padded up to a multiple of 64
if meta is not None:
    vocab_size = meta['vocab_size']
    print(f"found vocab_size = {vocab_size} (inside {data_dir}/meta.pkl)")
model_args = {f.name: config[f.name] for f in fields(GPTConfig) if f.name != 'vocab_size'}
model_args['vocab_size'] = vocab_size
try:
    GPTConfig(**model_args)
except ValueError as e:
    raise UserError(str(e)) from None
ckpt_path = os.path.join(out_dir, 'ckpt.pt')
if procs.master: # fail now, not at the first checkpoint after a long stretch of training
    try:
        os.makedirs(out_dir, exist_ok=True)
        tempfile.TemporaryFile(dir=out_dir).close()
    except OSError as e:
        raise UserError(f"out_dir={out_dir!r} is not a writable directory ({e}): checkpoints "
                          f"are saved there; pass --out_dir=<a directory you can write>") from None
checkpoint = None
pretrained = None # a GPT with GPT-2's weights
if init_from == 'resume':
    checkpoint, changed = checkpoints.resume(out_dir, device, model_args, config, fsdp)
    if changed and procs.master:
        print(f"resuming with settings changed from the checkpoint's run: {', '.join(changed)}")
    model_args['vocab_size'] = checkpoint['model_args']['vocab_size'] # the model's: the data is checked against it
elif init_from != 'scratch':
    try: # GPT-2's architecture from the checkpoint, its positions cropped to this run's block_size
        pretrained = hf.from_pretrained(init_from, **model_args)
    except ValueError as e:
        raise UserError(str(e)) from None
    model_args = asdict(pretrained.config)
    print(f"initializing from {init_from}: " + ', '.join(f"{k}={model_args[k]!r}" for k in hf.ARCHITECTURE))
try:
    gptconf = GPTConfig(**model_args)
except ValueError as e:
    raise UserError(str(e)) from None
block_size = gptconf.block_size # GPT-2 may have fewer positions than asked for
check_token_files(data_dir, block_size, gptconf.vocab_size, has_meta=meta is not None)

# -----------------------------------------------------------------------------
# the processes, the device and the precision
device = distributed.init(procs, device) # under torchrun, the process group; cuda:<local rank>
local_accum_steps = gradient_accumulation_steps // procs.world_size
tokens_per_iter = gradient_accumulation_steps * batch_size * block_size
if procs.master:
    print(f"tokens per iteration will be: {tokens_per_iter:,}")
# the proxy's tuned values carried to this run's batch and length (transfer.py); the values as
# given stay in `config`, the ones the run uses are these
tuned = transfer.Hyperparameters(learning_rate, min_lr, beta1, beta2, muon_momentum, weight_decay, adam_eps)
batch_lr_exponent, length_lr_exponent = transfer.exponents(optimizer, batch_lr_exponent, length_lr_exponent)
derived = transfer.transfer(tuned, tokens_per_iter, tokens_per_iter * max_iters, base_batch_tokens,
                            base_train_tokens, batch_lr_exponent, length_lr_exponent, critical_batch_tokens)
learning_rate, min_lr, beta1, beta2, muon_momentum, weight_decay, adam_eps = derived
if procs.master and (base_batch_tokens or base_train_tokens):
    print(f"carried from the proxy ({base_batch_tokens or tokens_per_iter:,} tokens a step, "
          f"{base_train_tokens or tokens_per_iter * max_iters:,} in all) to this run "
          f"({tokens_per_iter:,}, {tokens_per_iter * max_iters:,}; lr exponents {batch_lr_exponent:g} for the "
          f"batch, {length_lr_exponent:g} for the length): "
          + ', '.join(f"{k} {getattr(tuned, k):.6g} -> {v:.6g}" for k, v in derived._asdict().items()))
if procs.master and transfer.wasted_batch(tokens_per_iter, critical_batch_tokens):
    print(f"{tokens_per_iter:,} tokens a step is past the critical batch ({critical_batch_tokens:,}): "
          f"the lr stops growing there, and the extra tokens of each step buy little")
torch.backends.cuda.matmul.allow_tf32 = True # allow tf32 on matmul
torch.backends.cudnn.allow_tf32 = True # allow tf32 on cudnn
ptdtype = resolve_dtype(dtype, device)
ctx = autocast(device, ptdtype)
# the loss is scaled against fp16's underflow; otherwise a no-op
scaler = torch.amp.GradScaler(torch.device(device).type, enabled=ptdtype == torch.float16)

# Every process draws the indices of the whole global batch from one generator and keeps its
# own share, so N processes see exactly the micro-batches one process sees with N x accumulation.
data_rng = torch.Generator().manual_seed(seed)

def next_batches(split, generator, n_micro):
    """n_micro micro-batches (x, y) of this process's share (data.get_batch)."""
    return get_batch(data_dir, split, batch_size, block_size, generator, device, n_micro,
                     procs.rank, procs.world_size)

# -----------------------------------------------------------------------------
# the model and the optimizer, from scratch or from the checkpoint to resume
iter_num = 0
best_val_loss = 1e9
skipped_steps = 0 # non-finite steps skipped (skip_nonfinite)
if checkpoint is not None:
    iter_num = checkpoint['iter_num']
    best_val_loss = checkpoint['best_val_loss']
    skipped_steps = checkpoint['skipped_steps']
start_iter = iter_num # a save at start_iter would only rewrite the checkpoint we started from
# the same init on every process: FSDP shards each process's copy, and has no broadcast of
# rank 0's as DDP has. Then dropout differs per process; the batches come from data_rng.
torch.manual_seed(seed)
try:
    model = GPT(gptconf) if pretrained is None else pretrained # its attention class is gptconf.attn_cls's
except ValueError as e: # the settings (or the attention class they name) cannot build a model
    raise UserError(str(e)) from None
torch.manual_seed(seed + procs.rank)
pretrained = None # one name for the model
model.to(device)
if procs.master:
    backends = {block.attn.resolve_backend(torch.device(device)) for block in model.transformer.h}
    if gptconf.mup_base_width:
        parametrization = f"muP, base width {gptconf.mup_base_width}, m = {gptconf.width_mult:g}"
    else:
        parametrization = "SP"
    attention = type(model.transformer.h[0].attn).__name__
    active = f" ({model.get_num_params(active=True) / 1e6:.2f}M active per token)" if gptconf.n_expert else ''
    print(f"number of parameters: {model.get_num_params() / 1e6:.2f}M{active}")
    print(f"model: {parametrization}; attention {attention}, {gptconf.attn_mod} on the "
          f"{'/'.join(sorted(backends))} backend; device {device}, {ptdtype}")
if fsdp:
    distributed.shard(model, ptdtype)
# one param group per muP treatment, each with its lr_scale. From here on `optimizer` is the
# optimizer; the setting's value stays in config['optimizer'].
optimizer = model.configure_optimizers(
    weight_decay=weight_decay, learning_rate=learning_rate, betas=(beta1, beta2),
    device_type=torch.device(device).type, eps=adam_eps, optimizer=config['optimizer'],
    muon_lr_mult=muon_lr_mult, muon_momentum=muon_momentum)
if checkpoint is not None:
    checkpoints.restore(checkpoint, out_dir, model, optimizer)
if procs.master:
    for group in optimizer.param_groups:
        n_params = sum(p.numel() for p in group['params'])
        print(f"param group {group['name']}: {len(group['params'])} tensors, "
              f"{n_params:,} parameters, lr_scale {group['lr_scale']:.4g}, "
              f"weight_decay {group['weight_decay']:.4g}, eps_scale {group['eps_scale']:.4g}")
raw_model = model
if compile:
    if procs.master:
        print("compiling the model... (takes a ~minute)")
    model = torch.compile(model)
if procs.ddp and not fsdp:
    model = distributed.replicate(model, device)

if wandb_log and procs.master:
    import wandb
    lr_scales = {f"lr_scale/{g['name']}": g['lr_scale'] for g in optimizer.param_groups}
    wandb.init(project=wandb_project, name=wandb_run_name,
               config={**config, 'width_mult': gptconf.width_mult, **lr_scales})

# -----------------------------------------------------------------------------
# what the training loop calls
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
            X, Y = next_batches(split, generator, 1)[0]
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

def save_checkpoint(rng_states):
    """out_dir/ckpt.pt (under FSDP with the shards it names): the model, the optimizer, and
    everything an exact resume needs. On every process under FSDP, on the master otherwise."""
    state = dict(model_args=model_args, iter_num=iter_num, best_val_loss=best_val_loss,
                 config=config, transferred=derived._asdict(), skipped_steps=skipped_steps,
                 data_rng_state=batch_rng_state, # what drew this iteration's batches
                 rng_states=rng_states)
    saved = checkpoints.save(state, out_dir, raw_model, optimizer, fsdp, procs.master, keep_last_n)
    if saved:
        print(f"saved checkpoint to {' and '.join(saved)}")

def stop_on_nonfinite(what):
    """A non-finite loss or gradient norm, without skip_nonfinite: stop without saving, the
    master with one line that names the iteration, the param groups and the last checkpoint."""
    if not procs.master:
        sys.exit(1) # the master says why
    bad_groups = set()
    for group in optimizer.param_groups:
        for grad in distributed.local_grads(group['params']):
            if grad is not None and not torch.isfinite(grad).all():
                bad_groups.add(group['name'])
    if os.path.exists(ckpt_path):
        last = f"last good checkpoint: {ckpt_path}"
    else:
        last = "no checkpoint saved yet"
    sys.exit(f"{what} (param groups with non-finite gradients: {', '.join(sorted(bad_groups)) or 'none'}). "
             f"Stopped; {last}. Lower the learning rate or check the data; "
             f"--skip_nonfinite=True skips such steps instead")

# SIGINT (Ctrl-C) and SIGTERM (schedulers, torchrun) ask the loop to finish its step, save
# and exit 0
stop_signal = None
def request_stop(signum, frame):
    global stop_signal
    stop_signal = signal.Signals(signum).name
    signal.signal(signum, signal.SIG_DFL) # a second one stops at once

# -----------------------------------------------------------------------------
# training loop
peak_flops = device_peak_flops(device)
# last, as building the model and measuring peak flops drew from torch's RNG
if checkpoint is not None:
    data_rng.set_state(checkpoint['data_rng_state'])
    same_processes = distributed.set_rng_states(checkpoint['rng_states'], procs, device)
    if not same_processes and procs.master:
        print(f"the checkpoint holds the RNG states of {len(checkpoint['rng_states'])} "
              f"processes, this run has {procs.world_size}: dropout continues from fresh seeds")
checkpoint = None # free up memory
batch_rng_state = data_rng.get_state() # what drew `batches`: a checkpoint stores it
batches = next_batches('train', data_rng, local_accum_steps) # fetch the very first batch
signal.signal(signal.SIGINT, request_stop)
signal.signal(signal.SIGTERM, request_stop)
t0 = time.time()
local_iter_num = 0 # number of iterations in the lifetime of this process
running_mfu = -1.0
while True:

    # determine and set the learning rate for this iteration: each group gets its muP lr_scale
    lr = get_lr(iter_num) if decay_lr else learning_rate
    set_lr(optimizer, lr)

    # evaluate the loss on train/val sets and write checkpoints; always at the last iteration
    if iter_num % eval_interval == 0 or iter_num == max_iters:
        rng_states = distributed.rng_states(procs, device) # on every process, before they move on
        # under FSDP every process takes part in each forward: all evaluate (the same batches,
        # so the same losses and the same decision to save), the master reports
        if procs.master or fsdp:
            losses = estimate_loss()
            if procs.master:
                print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
            if procs.master and raw_model.config.n_expert: # on the last val batch, per block
                entropy, load = zip(*raw_model.routing())
                print(f"step {iter_num}: router entropy {' '.join(f'{e:.3f}' for e in entropy)}, "
                      f"busiest expert's load / mean {' '.join(f'{b:.2f}' for b in load)}")
            if wandb_log and procs.master:
                wandb.log({"iter": iter_num, "train/loss": losses['train'], "val/loss": losses['val']})
            # a non-finite eval loss (skip_nonfinite after a blow-up) must not replace the last
            # good checkpoint
            improved = losses['val'] < best_val_loss
            if math.isfinite(losses['val']) and (improved or always_save_checkpoint):
                best_val_loss = min(best_val_loss, losses['val'])
                if iter_num > start_iter:
                    save_checkpoint(rng_states)
    if iter_num == 0 and eval_only:
        break

    # forward backward update, with optional gradient accumulation to simulate larger batch size
    # and using the GradScaler if data type is float16
    loss_sum = torch.zeros((), device=device)
    for micro_step, (X, Y) in enumerate(batches):
        # only sync gradients at the last micro step of the global batch
        distributed.sync_gradients(model, micro_step == local_accum_steps - 1)
        with ctx:
            logits, loss = model(X, Y)
            # mean over this process's micro-batches; DDP (or FSDP's reduce-scatter) then averages
            # over processes, which makes the gradient the mean over the global batch
            loss = loss / local_accum_steps
        loss_sum += loss.detach()
        scaler.scale(loss).backward()
    batch_rng_state = data_rng.get_state()
    # the next batch, while the GPU is busy
    batches = next_batches('train', data_rng, local_accum_steps)
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    # one all-reduce per step: the global batch's loss, and whether any process was asked to
    # stop, so that all of them act alike
    stop_flag = torch.tensor(float(stop_signal is not None), device=device)
    loss_total, n_stopping = distributed.sum_over_processes(torch.stack([loss_sum, stop_flag]), procs)
    lossf = loss_total / procs.world_size
    grad_normf = distributed.item(grad_norm) # the same on every process after the reduction
    # the non-finite guard; fp16's GradScaler expects overflowing gradients now and then and
    # skips those steps itself
    if math.isfinite(lossf) and (math.isfinite(grad_normf) or scaler.is_enabled()):
        if grad_clip != 0.0:
            torch.nn.utils.clip_grads_with_norm_(model.parameters(), grad_clip, grad_norm)
        scaler.step(optimizer)
    else:
        what = f"iter {iter_num}: non-finite loss {lossf} or gradient norm {grad_normf}"
        if not skip_nonfinite:
            stop_on_nonfinite(what)
        skipped_steps += 1
        if procs.master:
            print(f"{what}: step skipped ({skipped_steps} skipped so far)")
    scaler.update()
    # flush the gradients as soon as we can, no need for this memory anymore
    optimizer.zero_grad(set_to_none=True)

    # timing and logging
    t1 = time.time()
    dt = t1 - t0
    t0 = t1
    if local_iter_num == 0 and procs.master: # the optimizer's state exists after its first step
        state = distributed.optimizer_state(getattr(optimizer, 'optimizers', [optimizer]))
        print(f"training state on this process: parameters "
              f"{distributed.local_megabytes(model.parameters()):.2f} MB, optimizer state "
              f"{distributed.local_megabytes(state):.2f} MB")
    if iter_num % log_interval == 0 and procs.master:
        if local_iter_num >= 5: # let the training loop settle a bit
            mfu = raw_model.estimate_mfu(batch_size * local_accum_steps, dt, peak_flops)
            running_mfu = mfu if running_mfu == -1.0 else 0.9*running_mfu + 0.1*mfu
        # the loss to its last fp32 bit (9 digits): a resumed run's log diffs with the original
        print(f"iter {iter_num}: loss {lossf:.9g}, time {dt*1000:.2f}ms, "
              f"mfu {running_mfu*100:.2f}%")
        if wandb_log:
            lrs = {f"lr/{group['name']}": group['lr'] for group in optimizer.param_groups}
            wandb.log({"iter": iter_num, "loss": lossf, "grad_norm": grad_normf,
                       "mfu": running_mfu * 100, "skipped_steps": skipped_steps, **lrs})
    iter_num += 1
    local_iter_num += 1

    # graceful stop: the step is done, save where the next one would start
    if n_stopping > 0:
        rng_states = distributed.rng_states(procs, device)
        if procs.master or fsdp:
            save_checkpoint(rng_states)
        if procs.master:
            reason = stop_signal or 'stop requested by another process'
            print(f"{reason}: stopped before iter {iter_num}; checkpoint in {ckpt_path}, "
                  f"continue with --init_from=resume")
        break
    # termination conditions
    if iter_num > max_iters:
        break

if procs.ddp:
    del model, raw_model, optimizer # what holds the process group goes first (distributed.close)
    distributed.close(procs)
