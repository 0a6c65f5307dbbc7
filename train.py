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

import gc
import math
import os
import pickle
import random
import signal
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import fields

import numpy as np
import torch
from torch.distributed import destroy_process_group, init_process_group
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

import checkpoints
from configurator import ConfigError, configure, resolve_device
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
keep_last_n = 0 # > 0: also keep the last n checkpoints as ckpt_<iter>.pt
init_from = 'scratch' # 'scratch' or 'resume' (out_dir/ckpt.pt, with the same model settings)
skip_nonfinite = False # a non-finite loss or gradient: False stops the run, True skips the step
# wandb logging
wandb_log = False
wandb_project = 'mupgpt'
wandb_run_name = 'run'
# data
dataset = 'shakespeare_char'
gradient_accumulation_steps = 1 # micro-batches of the global batch, split over the processes
batch_size = 12 # micro-batch size
# model: every GPTConfig field but vocab_size is a key; these replace its defaults, the muP and
# attention keys keep theirs (model.py)
n_layer = 6
n_head = 6
n_embd = 384
block_size = 256
dropout = 0.0 # for pretraining 0 is good, for finetuning try 0.1+
bias = False # do we use bias inside LayerNorm and Linear layers?
# optimizer: 'adamw', or 'muon' (muon.py's Muon for the hidden matrices, AdamW for the rest)
optimizer = 'adamw'
muon_lr_mult = 1.0 # the Muon group's lr is learning_rate x muon_lr_mult (muTransferable)
muon_momentum = 0.95
learning_rate = 1e-3 # max learning rate; each muP group scales it by its lr_scale
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
# FSDP2 (under torchrun): shard parameters, gradients and optimizer state over the processes
# instead of replicating them as DDP does; for models whose training state outgrows one device
fsdp = False
# system
device = 'auto' # 'auto' (cuda > mps > cpu), or 'cpu', 'cuda', 'cuda:1', 'mps'
# 'auto': bfloat16 where the GPU supports it, else float16 on CUDA; float32 off CUDA
dtype = 'auto'
compile = True # use PyTorch 2.0 to compile the model to be faster
seed = 1337
# the other GPTConfig fields (muP, attention) are keys too, with GPTConfig's defaults
_model_keys = [f.name for f in fields(GPTConfig) if f.name != 'vocab_size']
for _key in _model_keys:
    globals().setdefault(_key, getattr(GPTConfig, _key))
# -----------------------------------------------------------------------------
config = configure(globals(), sys.argv[1:])
# -----------------------------------------------------------------------------

# DDP: torchrun sets these; a plain `python train.py` is one process of rank 0
ddp = int(os.environ.get('RANK', -1)) != -1 # is this a ddp run?
ddp_rank = int(os.environ.get('RANK', 0))
ddp_local_rank = int(os.environ.get('LOCAL_RANK', 0))
ddp_world_size = int(os.environ.get('WORLD_SIZE', 1))
master_process = ddp_rank == 0 # this process will do logging, checkpointing etc.

# Every setting is checked before any work starts, in order: a check that relies on another
# setting comes after that setting's own check. A bad one stops the run with one line.
def require(key, ok, must_be):
    if not ok:
        raise ConfigError(f"{key}={globals()[key]!r}: must be {must_be}")

require('batch_size', batch_size >= 1, 'an integer >= 1')
require('gradient_accumulation_steps', gradient_accumulation_steps >= 1, 'an integer >= 1')
require('max_iters', max_iters >= 0, 'an integer >= 0')
require('eval_iters', eval_iters >= 1,
        'an integer >= 1: the val loss is a mean over eval_iters batches')
require('eval_interval', eval_interval >= 1, 'an integer >= 1')
require('log_interval', log_interval >= 1, 'an integer >= 1')
require('keep_last_n', keep_last_n >= 0, 'an integer >= 0')
require('warmup_iters', warmup_iters >= 0, 'an integer >= 0')
require('lr_decay_iters', lr_decay_iters > warmup_iters or not decay_lr,
        'larger than warmup_iters')
require('learning_rate', 0 <= learning_rate < math.inf, 'a finite number >= 0')
require('min_lr', 0 <= min_lr <= learning_rate, 'a number between 0 and learning_rate')
require('weight_decay', 0 <= weight_decay < math.inf, 'a finite number >= 0')
require('beta1', 0 <= beta1 < 1, 'in [0, 1)')
require('beta2', 0 <= beta2 < 1, 'in [0, 1)')
require('adam_eps', 0 < adam_eps < math.inf, 'a finite number > 0')
require('grad_clip', 0 <= grad_clip < math.inf, 'a finite number >= 0 (0 = no clipping)')
require('dtype', dtype in ('auto', 'float32', 'bfloat16', 'float16'),
        "'auto', 'float32', 'bfloat16' or 'float16'")
require('optimizer', optimizer in ('adamw', 'muon'), "'adamw' or 'muon'")
require('muon_lr_mult', 0 < muon_lr_mult < math.inf, 'a finite number > 0')
require('muon_momentum', 0 <= muon_momentum < 1, 'in [0, 1)')
require('init_from', init_from in ('scratch', 'resume'), "'scratch' or 'resume'")

device = resolve_device(device) # 'auto' becomes cuda, mps or cpu

if fsdp and not ddp:
    raise ConfigError("fsdp=True shards the model over torchrun's processes: launch with "
                      "torchrun --standalone --nproc_per_node=<N> train.py ... --fsdp=True")
if fsdp and dtype == 'float16':
    raise ConfigError("fsdp=True with dtype='float16': FSDP here computes in bfloat16 or "
                      "float32; use --dtype=bfloat16 (or auto)")

if gradient_accumulation_steps % ddp_world_size:
    raise ConfigError(f"gradient_accumulation_steps={gradient_accumulation_steps}: must be a "
                      f"multiple of the number of processes ({ddp_world_size}), since it counts "
                      f"the micro-batches of the global batch; e.g. "
                      f"--gradient_accumulation_steps={ddp_world_size}")

# data: uint16 token files written by data/<dataset>/prepare.py, relative to the working
# directory (as nanoGPT); meta.pkl, if there is one, holds the dataset's vocab_size
data_dir = os.path.join('data', dataset)
prepare_command = f"`python data/{dataset}/prepare.py`"
meta_path = os.path.join(data_dir, 'meta.pkl')
vocab_size = 50304 # without meta.pkl: GPT-2's 50257 tokens, padded up to a multiple of 64
if os.path.exists(meta_path):
    try:
        with open(meta_path, 'rb') as f:
            vocab_size = pickle.load(f)['vocab_size']
    except Exception as e: # the dataset's file is at fault, not our code: name the file
        raise ConfigError(f"{meta_path} cannot be read ({type(e).__name__}: {e}): prepare the "
                          f"dataset again with {prepare_command}") from None
    if not isinstance(vocab_size, int) or vocab_size < 1:
        raise ConfigError(f"{meta_path}: vocab_size={vocab_size!r} is not a positive integer: "
                          f"prepare the dataset again with {prepare_command}")
    print(f"found vocab_size = {vocab_size} (inside {meta_path})")
    vocab_source = f"vocab_size in {meta_path}"
    vocab_fix = (f"the .bin files and meta.pkl come from different preparations; prepare the "
                 f"dataset again with {prepare_command}")
else:
    vocab_source = f"GPT-2's, padded, as there is no {meta_path}"
    vocab_fix = ("a dataset with another vocabulary needs a meta.pkl holding its vocab_size "
                 "beside the .bin files, as data/shakespeare_char/prepare.py writes")

# the model's settings come before the data's checks, which need a valid block_size
model_args = {key: config[key] for key in _model_keys}
model_args['vocab_size'] = vocab_size
try:
    gptconf = GPTConfig(**model_args)
except ValueError as e:
    raise ConfigError(str(e)) from None

for split in ('train', 'val'):
    path = os.path.join(data_dir, f'{split}.bin')
    if not os.path.exists(path):
        raise ConfigError(f"dataset={dataset!r}: {path} not found; prepare the dataset first "
                          f"with {prepare_command} (offline: add --input PATH/TO/input.txt)")
    n_bytes = os.path.getsize(path)
    if n_bytes % 2:
        raise ConfigError(f"{path} is {n_bytes} bytes, an odd number, so not a file of uint16 "
                          f"tokens (2 bytes each): it is truncated or not from prepare.py; "
                          f"prepare the dataset again with {prepare_command}")
    n_tokens = n_bytes // 2
    if n_tokens <= block_size:
        raise ConfigError(f"block_size={block_size}: {path} holds only {n_tokens} tokens; a "
                          f"training sequence needs block_size + 1 of them: lower block_size")
    # one pass over the file at memory speed (a 300 MB file takes milliseconds once cached); a
    # token outside the embedding would otherwise fail mid-training (an IndexError on the CPU, a
    # device-side assert on CUDA)
    largest_token = int(np.memmap(path, dtype=np.uint16, mode='r').max())
    if largest_token >= vocab_size:
        raise ConfigError(f"{path} holds token id {largest_token}, but the vocabulary has only "
                          f"{vocab_size} ids ({vocab_source}): {vocab_fix}")

ckpt_path = os.path.join(out_dir, 'ckpt.pt')
if master_process:
    # fail now, not at the first checkpoint after a long stretch of training
    try:
        os.makedirs(out_dir, exist_ok=True)
        tempfile.TemporaryFile(dir=out_dir).close()
    except OSError as e:
        raise ConfigError(f"out_dir={out_dir!r} is not a writable directory ({e}): checkpoints "
                          f"are saved there; pass --out_dir=<a directory you can write>") from None

# -----------------------------------------------------------------------------
# device, DDP and precision
device_type = torch.device(device).type # 'cuda', 'mps' or 'cpu', as autocast wants it
if ddp:
    if device_type == 'cuda':
        init_process_group(backend='nccl')
        device = f'cuda:{ddp_local_rank}'
        torch.cuda.set_device(device)
    else:
        init_process_group(backend='gloo')
local_accum_steps = gradient_accumulation_steps // ddp_world_size
if master_process:
    tokens_per_iter = gradient_accumulation_steps * batch_size * block_size
    print(f"tokens per iteration will be: {tokens_per_iter:,}")
torch.backends.cuda.matmul.allow_tf32 = True # allow tf32 on matmul
torch.backends.cudnn.allow_tf32 = True # allow tf32 on cudnn
if dtype == 'auto':
    if device_type != 'cuda':
        dtype = 'float32'
    elif torch.cuda.is_bf16_supported():
        dtype = 'bfloat16'
    else:
        dtype = 'float16'
ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype]
if ptdtype == torch.float32:
    ctx = nullcontext()
else:
    ctx = torch.amp.autocast(device_type=device_type, dtype=ptdtype)

# Every process draws the indices of the whole global batch from one generator and keeps its
# own share, so N processes see exactly the micro-batches one process sees with N x accumulation.
data_rng = torch.Generator().manual_seed(seed)

def get_batch(split, generator, n_micro):
    """n_micro micro-batches (x, y) of this process's share; the generator is advanced
    identically on every process."""
    # recreate np.memmap every batch to avoid a memory leak, as per
    # https://stackoverflow.com/a/61472122
    data = np.memmap(os.path.join(data_dir, f'{split}.bin'), dtype=np.uint16, mode='r')
    n_rows = n_micro * ddp_world_size
    starts = torch.randint(len(data) - block_size, (n_rows, batch_size), generator=generator)
    my_starts = starts[ddp_rank * n_micro:(ddp_rank + 1) * n_micro]
    batches = []
    for row in my_starts.tolist():
        x = torch.stack([torch.from_numpy(data[i:i+block_size].astype(np.int64)) for i in row])
        y = torch.stack([torch.from_numpy(data[i+1:i+1+block_size].astype(np.int64)) for i in row])
        if device_type == 'cuda':
            # pin arrays x,y, which allows us to move them to GPU asynchronously
            x = x.pin_memory().to(device, non_blocking=True)
            y = y.pin_memory().to(device, non_blocking=True)
        else:
            x = x.to(device)
            y = y.to(device)
        batches.append((x, y))
    return batches

# -----------------------------------------------------------------------------
# model init, from scratch or from the checkpoint to resume
def load_checkpoint():
    """The checkpoint to resume, after checking that this run's settings build its model."""
    if not os.path.exists(ckpt_path):
        raise ConfigError(f"init_from='resume', but {ckpt_path} does not exist: train with "
                          f"init_from='scratch' first, or point --out_dir at the run to resume")
    required = ['model', 'optimizer', 'model_args', 'iter_num', 'best_val_loss', 'config',
                'skipped_steps', 'data_rng_state', 'rng_states']
    checkpoint = checkpoints.read(out_dir, device, required)
    # Only the attention backend (the same function, another kernel) may change: taking the
    # checkpoint's shape silently would leave the flags and the model disagreeing.
    differences = []
    for key in model_args:
        saved = checkpoint['model_args'].get(key)
        if key != 'attn_backend' and saved != model_args[key]:
            requested = model_args[key]
            differences.append(f"  {key}: checkpoint {saved!r} vs requested {requested!r}")
    if differences:
        heading = f"cannot resume {ckpt_path}: the model settings differ from the checkpoint's:"
        advice = ("Resume with the config file and flags of the run that wrote it (only "
                  "attn_backend may change).")
        raise ConfigError("\n".join([heading, *differences, advice]))
    saved_fsdp = 'sharded' in checkpoint # what the file holds, whatever its run's flags said
    if saved_fsdp != fsdp:
        raise ConfigError(f"fsdp={fsdp}: {ckpt_path} was saved by a run with fsdp={saved_fsdp}, "
                          f"whose model and optimizer state it holds in that run's layout; "
                          f"resume with --fsdp={saved_fsdp} (at any number of processes under "
                          f"FSDP; the model weights alone load either way, as sample.py does)")
    saved_optimizer = checkpoint['config'].get('optimizer', 'adamw')
    if saved_optimizer != config['optimizer']:
        raise ConfigError(f"optimizer={config['optimizer']!r}: {ckpt_path} was trained with "
                          f"optimizer={saved_optimizer!r}, whose state it holds; resume with that "
                          f"optimizer")
    changed = []
    for key, saved in checkpoint['config'].items():
        if key != 'init_from' and key in config and config[key] != saved:
            changed.append(f"{key} {saved!r} -> {config[key]!r}")
    if changed and master_process:
        print(f"resuming with settings changed from the checkpoint's run: "
              f"{', '.join(changed)}")
    return checkpoint

if init_from == 'resume':
    checkpoint = load_checkpoint()
    iter_num = checkpoint['iter_num']
    best_val_loss = checkpoint['best_val_loss']
    skipped_steps = checkpoint['skipped_steps']
else:
    checkpoint = None
    iter_num = 0
    best_val_loss = 1e9
    skipped_steps = 0 # non-finite steps skipped (skip_nonfinite)
start_iter = iter_num # a save at start_iter would only rewrite the checkpoint we started from
# the same init on every process: FSDP shards each process's copy, and has no broadcast of
# rank 0's as DDP has. Then dropout differs per process; the batches come from data_rng.
torch.manual_seed(seed)
model = GPT(gptconf)
torch.manual_seed(seed + ddp_rank)
if checkpoint is not None and not fsdp: # under FSDP each process reads its shards, below
    model.load_state_dict(checkpoint['model'])
model.to(device)
if master_process:
    backends = {block.attn.resolve_backend(torch.device(device)) for block in model.transformer.h}
    if gptconf.mup_base_width:
        parametrization = f"muP, base width {gptconf.mup_base_width}, m = {gptconf.width_mult:g}"
    else:
        parametrization = "SP"
    print(f"number of parameters: {model.get_num_params() / 1e6:.2f}M")
    print(f"model: {parametrization}; attention {gptconf.attn_mod} on the "
          f"{'/'.join(sorted(backends))} backend; device {device}, {dtype}")

# FSDP2: every Block, then the root (embeddings, ln_f, the readout), holds its parameters
# sharded across the processes and gathers them only for its forward and backward. The muP
# param groups were decided by name before (GPT._classify_params), so sharding changes none.
if fsdp:
    if ptdtype == torch.bfloat16:
        # bf16 compute, the gradients reduced in fp32
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        policy = MixedPrecisionPolicy()
    for block in model.transformer.h:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)

# initialize a GradScaler. If enabled=False scaler is a no-op
scaler = torch.amp.GradScaler(device_type, enabled=(dtype == 'float16'))

# optimizer: one param group per muP treatment, each with its lr_scale. From here on
# `optimizer` is the optimizer; the setting's value stays in config['optimizer'].
optimizer = model.configure_optimizers(
    weight_decay=weight_decay, learning_rate=learning_rate, betas=(beta1, beta2),
    device_type=device_type, eps=adam_eps, optimizer=config['optimizer'],
    muon_lr_mult=muon_lr_mult, muon_momentum=muon_momentum)
# the optimizers inside it: Muon and AdamW stepped as one, or AdamW alone
optimizer_parts = getattr(optimizer, 'optimizers', [optimizer])
if checkpoint is not None:
    # load_state_dict also restores the saved hyperparameters (weight_decay, betas): keep this
    # run's, take only the state (moments, step counts)
    settings = []
    for group in optimizer.param_groups:
        settings.append({key: value for key, value in group.items() if key != 'params'})
    if fsdp: # each process reads its shards of the model and of the optimizer state
        checkpoints.load_shards(checkpoint, out_dir, model, optimizer_parts)
    else:
        optimizer.load_state_dict(checkpoint['optimizer'])
    for group, setting in zip(optimizer.param_groups, settings):
        group.update(setting)
if master_process:
    for group in optimizer.param_groups:
        n_params = sum(p.numel() for p in group['params'])
        print(f"param group {group['name']}: {len(group['params'])} tensors, "
              f"{n_params:,} parameters, lr_scale {group['lr_scale']:.4g}, "
              f"weight_decay {group['weight_decay']:.4g}, eps_scale {group['eps_scale']:.4g}")

# compile the model
raw_model = model
if compile:
    if master_process:
        print("compiling the model... (takes a ~minute)")
    model = torch.compile(model)

# wrap model into DDP container
if ddp and not fsdp:
    if device_type == 'cuda':
        model = DDP(model, device_ids=[ddp_local_rank])
    else:
        model = DDP(model)

if wandb_log and master_process:
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

def groups_with_nonfinite_grads():
    """The names of the param groups with an inf or a nan in a gradient, for the report."""
    names = set()
    for group in optimizer.param_groups:
        for p in group['params']:
            grad = p.grad
            if isinstance(grad, DTensor): # FSDP: this process's shard
                grad = grad.to_local()
            if grad is not None and not torch.isfinite(grad).all():
                names.add(group['name'])
    return sorted(names)

def local_megabytes(tensors):
    """The memory these tensors take on this process: under FSDP, its shards only."""
    total = 0
    for t in tensors:
        if isinstance(t, DTensor):
            t = t.to_local()
        total += t.numel() * t.element_size()
    return total / 2**20

def rng_states():
    """Every process's RNG states (python, numpy, torch, CUDA), gathered from all processes,
    so a resumed run draws the same dropout masks. A collective under DDP: every process must
    call it."""
    state = {
        'python': random.getstate(),
        'numpy': np.random.get_state(),
        'torch': torch.get_rng_state(),
        'cuda': None,
    }
    if device_type == 'cuda':
        state['cuda'] = torch.cuda.get_rng_state()
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
    """out_dir/ckpt.pt, written atomically by checkpoints.write; under FSDP every process first
    writes its shards into a new directory, which ckpt.pt then names. Called on every
    process under FSDP, on the master alone otherwise."""
    checkpoint = {
        'model_args': model_args,
        'iter_num': iter_num,
        'best_val_loss': best_val_loss,
        'config': config,
        'skipped_steps': skipped_steps,
        'data_rng_state': batch_rng_state, # what drew this iteration's batches, not the next
        'rng_states': rng,
    }
    if fsdp:
        checkpoint['sharded'] = checkpoints.write_shards(out_dir, iter_num, raw_model,
                                                         optimizer_parts, master_process)
    else:
        checkpoint['model'] = raw_model.state_dict()
        checkpoint['optimizer'] = optimizer.state_dict()
    if not master_process:
        return
    saved = checkpoints.write(checkpoint, out_dir, keep_last_n)
    if fsdp:
        saved.append(os.path.join(out_dir, checkpoint['sharded']))
    print(f"saved checkpoint to {' and '.join(saved)}")

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
    set_rng_states(checkpoint['rng_states'])
checkpoint = None # free up memory
batch_rng_state = data_rng.get_state() # what drew `batches`: a checkpoint stores it
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
        # under FSDP every process takes part in each forward: all evaluate (the same batches,
        # so the same losses and the same decision to save), the master reports
        if master_process or fsdp:
            losses = estimate_loss()
            train_loss = losses['train']
            val_loss = losses['val']
            if master_process:
                print(f"step {iter_num}: train loss {train_loss:.4f}, val loss {val_loss:.4f}")
            if wandb_log and master_process:
                wandb.log({"iter": iter_num, "train/loss": train_loss, "val/loss": val_loss})
            # a non-finite eval loss (skip_nonfinite after a blow-up) must not replace the last
            # good checkpoint
            improved = val_loss < best_val_loss
            if math.isfinite(val_loss) and (improved or always_save_checkpoint):
                best_val_loss = min(best_val_loss, val_loss)
                if iter_num > start_iter:
                    save_checkpoint(rng)
    if iter_num == 0 and eval_only:
        break

    # forward backward update, with optional gradient accumulation to simulate larger batch size
    # and using the GradScaler if data type is float16
    loss_sum = torch.zeros((), device=device)
    for micro_step, (X, Y) in enumerate(batches):
        # only sync gradients at the last micro step of the global batch
        last_micro_step = micro_step == local_accum_steps - 1
        if fsdp:
            raw_model.set_requires_gradient_sync(last_micro_step)
        elif ddp:
            model.require_backward_grad_sync = last_micro_step
        with ctx:
            logits, loss = model(X, Y)
            # mean over this process's micro-batches; DDP (or FSDP's reduce-scatter) then averages
            # over processes, which makes the gradient the mean over the global batch
            loss = loss / local_accum_steps
        loss_sum += loss.detach()
        scaler.scale(loss).backward()
    batch_rng_state = data_rng.get_state()
    # the next batch, while the GPU is busy
    batches = get_batch('train', data_rng, local_accum_steps)

    # One sync per step: the global batch's loss, the gradient norm (the same on every process
    # after DDP's all-reduce) and whether any process was asked to stop, so that all act alike.
    scaler.unscale_(optimizer)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    grad_norm = torch.nn.utils.get_total_norm(grads) # a DTensor under FSDP, over all shards
    stop_flag = torch.tensor(float(stop_signal is not None), device=device)
    step_stats = torch.stack([loss_sum, stop_flag])
    if ddp:
        torch.distributed.all_reduce(step_stats)
    loss_total, n_stopping = step_stats.tolist()
    lossf = loss_total / ddp_world_size
    stop_requested = n_stopping > 0
    if isinstance(grad_norm, DTensor):
        grad_normf = grad_norm.full_tensor().item()
    else:
        grad_normf = grad_norm.item()

    # the non-finite guard; fp16's GradScaler expects overflowing gradients now and then and
    # skips those steps itself
    loss_ok = math.isfinite(lossf)
    grads_ok = math.isfinite(grad_normf) or scaler.is_enabled()
    if loss_ok and grads_ok:
        if grad_clip != 0.0:
            torch.nn.utils.clip_grads_with_norm_(model.parameters(), grad_clip, grad_norm)
        scaler.step(optimizer)
    else:
        bad_groups = ', '.join(groups_with_nonfinite_grads()) or 'none'
        what = (f"iter {iter_num}: non-finite loss {lossf} or gradient norm {grad_normf} "
                f"(param groups with non-finite gradients: {bad_groups})")
        if not skip_nonfinite:
            if not master_process:
                sys.exit(1) # the master says why
            if os.path.exists(ckpt_path):
                last = f"last good checkpoint: {ckpt_path}"
            else:
                last = "no checkpoint saved yet"
            sys.exit(f"{what}. Stopped; {last}. Lower the learning rate or check the data; "
                     f"--skip_nonfinite=True skips such steps instead")
        skipped_steps += 1
        if master_process:
            print(f"{what}: step skipped ({skipped_steps} skipped so far)")
    scaler.update()
    # flush the gradients as soon as we can, no need for this memory anymore
    optimizer.zero_grad(set_to_none=True)

    if local_iter_num == 0 and master_process: # the optimizer's state exists after its first step
        state = []
        for part in optimizer_parts:
            for param_state in part.state.values():
                state += [v for v in param_state.values() if isinstance(v, torch.Tensor)]
        print(f"training state on this process: parameters "
              f"{local_megabytes(model.parameters()):.2f} MB, optimizer state "
              f"{local_megabytes(state):.2f} MB")

    # timing and logging
    t1 = time.time()
    dt = t1 - t0
    t0 = t1
    if iter_num % log_interval == 0 and master_process:
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
    if stop_requested:
        rng = rng_states()
        if master_process or fsdp:
            save_checkpoint(rng)
        if master_process:
            reason = stop_signal or 'stop requested by another process'
            print(f"{reason}: stopped before iter {iter_num}; checkpoint in {ckpt_path}, "
                  f"continue with --init_from=resume")
        break
    # termination conditions
    if iter_num > max_iters:
        break

if ddp:
    # Free what holds the process group (DDP's reducer, FSDP's modules and the parameters the
    # optimizer holds) while the interpreter is whole: left to its exit, gloo's teardown aborted
    # about 1 run in 10 on a loaded 2-core machine ("terminate called without an active
    # exception"), 0 in 30 with this.
    del model, raw_model, optimizer, optimizer_parts
    gc.collect()
    torch.distributed.barrier() # no process tears down while another still talks to it
    destroy_process_group()
