"""
Train a GPT, SP or muP. Runs on one CPU/GPU, or several with DDP:
$ python train.py config/shakespeare_mup.py
$ python train.py config/train_shakespeare_char.py --device=cpu --compile=False --max_iters=2000
$ torchrun --standalone --nproc_per_node=4 train.py config/shakespeare_mup.py
Across nodes (run on each; master's IP in --master_addr):
$ torchrun --nproc_per_node=8 --nnodes=2 --node_rank=0 --master_addr=10.0.0.1 --master_port=1234 train.py ...
"""

import math
import os
import pickle
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
from torch.distributed import destroy_process_group, init_process_group
from torch.nn.parallel import DistributedDataParallel as DDP

from configurator import configure
from model import GPT, GPTConfig, device_peak_flops

# -----------------------------------------------------------------------------
# default config values, every one overridable by a config file or --key=value
# I/O
out_dir = 'out'
eval_interval = 250
log_interval = 10
eval_iters = 200
eval_only = False # if True, script exits right after the first eval
always_save_checkpoint = True # if True, always save a checkpoint after each eval
init_from = 'scratch' # 'scratch' or 'resume'
# wandb logging
wandb_log = False
wandb_project = 'mupgpt'
wandb_run_name = 'run'
# data
dataset = 'shakespeare_char'
gradient_accumulation_steps = 1 # global: split across DDP processes
batch_size = 12 # micro-batch size per process
block_size = 256
# model
n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.0 # for pretraining 0 is good, for finetuning try 0.1+
bias = False # do we use bias inside LayerNorm and Linear layers?
tie_weights = True
attn_mod = 'causal'
attn_backend = 'auto'
# muP (MUP.md): 0 = SP; otherwise the width the hyperparameters below were tuned at
mup_base_width = 0
mup_base_head_dim = 0
init_std = 0.02
mup_input_mult = 1.0
mup_output_mult = 1.0
mup_attn_mult = 1.0
mup_scale_weight_decay = True
# adamw optimizer
learning_rate = 1e-3 # max learning rate (the base lr; muP groups scale it by their lr_scale)
max_iters = 5000 # total number of training iterations
weight_decay = 1e-1
beta1 = 0.9
beta2 = 0.99
grad_clip = 1.0 # clip gradients at this value, or disable if == 0.0
# learning rate decay settings
decay_lr = True # whether to decay the learning rate
warmup_iters = 100 # how many steps to warm up for
lr_decay_iters = 5000 # should be ~= max_iters per Chinchilla
min_lr = 1e-4 # minimum learning rate, should be ~= learning_rate/10 per Chinchilla
# system
device = 'auto' # 'auto' (cuda > mps > cpu), or 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = 'auto' # 'auto': bfloat16 where the GPU supports it, else float16 on CUDA, float32 elsewhere
compile = 'auto' # 'auto' (on for CUDA, off elsewhere), 'True' or 'False'
seed = 1337
# -----------------------------------------------------------------------------
config = configure(globals(), sys.argv[1:])
# -----------------------------------------------------------------------------

# various inits, derived attributes, I/O setup
ddp = int(os.environ.get('RANK', -1)) != -1 # is this a ddp run?
if device == 'auto':
    device = 'cuda' if torch.cuda.is_available() else 'mps' if torch.backends.mps.is_available() else 'cpu'
device_type = 'cuda' if 'cuda' in device else 'mps' if 'mps' in device else 'cpu'
if ddp:
    init_process_group(backend='nccl' if device_type == 'cuda' else 'gloo')
    ddp_rank = int(os.environ['RANK'])
    ddp_local_rank = int(os.environ['LOCAL_RANK'])
    ddp_world_size = int(os.environ['WORLD_SIZE'])
    if device_type == 'cuda':
        device = f'cuda:{ddp_local_rank}'
        torch.cuda.set_device(device)
    master_process = ddp_rank == 0 # this process will do logging, checkpointing etc.
    if gradient_accumulation_steps % ddp_world_size:
        raise ValueError(f"gradient_accumulation_steps={gradient_accumulation_steps} must be a multiple of the "
                         f"number of processes ({ddp_world_size}): it counts micro-batches of the global batch")
else:
    ddp_rank, ddp_world_size, master_process = 0, 1, True
local_accum_steps = gradient_accumulation_steps // ddp_world_size
tokens_per_iter = gradient_accumulation_steps * batch_size * block_size
if master_process:
    print(f"tokens per iteration will be: {tokens_per_iter:,}")
    os.makedirs(out_dir, exist_ok=True)
torch.manual_seed(seed + ddp_rank) # dropout differs per process; batches come from data_rng below
torch.backends.cuda.matmul.allow_tf32 = True # allow tf32 on matmul
torch.backends.cudnn.allow_tf32 = True # allow tf32 on cudnn
if dtype == 'auto':
    dtype = ('bfloat16' if torch.cuda.is_bf16_supported() else 'float16') if device_type == 'cuda' else 'float32'
ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype]
ctx = nullcontext() if ptdtype == torch.float32 else torch.amp.autocast(device_type=device_type, dtype=ptdtype)
use_compile = device_type == 'cuda' if compile == 'auto' else compile == 'True'
if compile not in ('auto', 'True', 'False'):
    raise ValueError(f"compile={compile!r}: use 'auto', True or False")

# data: uint16 token files written by data/<dataset>/prepare.py
data_dir = os.path.join('data', dataset) # relative to the working directory, as nanoGPT
for split in ('train', 'val'):
    if not os.path.exists(os.path.join(data_dir, f'{split}.bin')):
        raise FileNotFoundError(f"{data_dir}/{split}.bin not found: prepare the dataset first with "
                                f"`python data/{dataset}/prepare.py` (offline: add --input PATH/TO/input.txt)")
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
    for rows in ix[ddp_rank * n_micro:(ddp_rank + 1) * n_micro]:
        x = torch.stack([torch.from_numpy(data[i:i+block_size].astype(np.int64)) for i in rows.tolist()])
        y = torch.stack([torch.from_numpy(data[i+1:i+1+block_size].astype(np.int64)) for i in rows.tolist()])
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

# model init
model_field_names = ['n_layer', 'n_head', 'n_embd', 'block_size', 'bias', 'vocab_size', 'dropout', 'tie_weights',
                     'attn_mod', 'attn_backend', 'mup_base_width', 'mup_base_head_dim', 'init_std',
                     'mup_input_mult', 'mup_output_mult', 'mup_attn_mult', 'mup_scale_weight_decay']
model_args = {k: config[k] for k in model_field_names if k in config}
model_args['vocab_size'] = meta_vocab_size if meta_vocab_size is not None else 50304
iter_num = 0
best_val_loss = 1e9
checkpoint = None
ckpt_path = os.path.join(out_dir, 'ckpt.pt')
if init_from == 'resume':
    print(f"Resuming training from {out_dir}")
    if not os.path.exists(ckpt_path):
        raise FileNotFoundError(f"init_from='resume' but {ckpt_path} does not exist: train with "
                                f"init_from='scratch' first, or point --out_dir at the run to resume")
    checkpoint = torch.load(ckpt_path, map_location=device, weights_only=False)
    # the checkpoint's architecture wins (the backend is a runtime choice and may change)
    for k in model_field_names:
        if k != 'attn_backend' and k in checkpoint['model_args']:
            model_args[k] = checkpoint['model_args'][k]
    iter_num = checkpoint['iter_num']
    best_val_loss = checkpoint['best_val_loss']
    data_rng.set_state(checkpoint['data_rng_state'])
    torch.set_rng_state(checkpoint['torch_rng_state'])
elif init_from != 'scratch':
    raise ValueError(f"init_from={init_from!r}: use 'scratch' or 'resume'")
model = GPT(GPTConfig(**model_args))
if checkpoint is not None:
    model.load_state_dict(checkpoint['model'])
if block_size < model.config.block_size:
    model.crop_block_size(block_size)
    model_args['block_size'] = block_size # so that the checkpoint will have the right value
model.to(device)
if master_process:
    backend = model.transformer.h[0].attn.resolve_backend(torch.device(device))
    mup = f"muP, base width {model.config.mup_base_width}, m = {model.config.width_mult:g}" \
          if model.config.mup_base_width else "SP"
    print(f"model: {mup}; attention {model.config.attn_mod} on the {backend} backend; device {device}, {dtype}")

# initialize a GradScaler. If enabled=False scaler is a no-op
scaler = torch.amp.GradScaler(device_type, enabled=(dtype == 'float16'))

# optimizer: one group per muP class, each with its lr_scale
optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type)
if checkpoint is not None:
    optimizer.load_state_dict(checkpoint['optimizer'])
checkpoint = None # free up memory

# compile the model
raw_model = model
if use_compile:
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
    assert 0 <= decay_ratio <= 1
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio)) # coeff ranges 0..1
    return min_lr + coeff * (learning_rate - min_lr)

def save_checkpoint():
    """Atomic: write a temporary file beside ckpt.pt, fsync, then rename over it, so a crash at
    any moment leaves the previous checkpoint intact."""
    checkpoint = {
        'model': raw_model.state_dict(),
        'optimizer': optimizer.state_dict(),
        'model_args': model_args,
        'iter_num': iter_num,
        'best_val_loss': best_val_loss,
        'config': config,
        'data_rng_state': data_rng.get_state(),
        'torch_rng_state': torch.get_rng_state(),
    }
    tmp_path = ckpt_path + '.tmp'
    with open(tmp_path, 'wb') as f:
        torch.save(checkpoint, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp_path, ckpt_path)
    print(f"saved checkpoint to {ckpt_path}")

# logging
if wandb_log and master_process:
    import wandb
    wandb.init(project=wandb_project, name=wandb_run_name, config=config)

# training loop
peak_flops = device_peak_flops(device)
batches = get_batch('train', data_rng, local_accum_steps) # fetch the very first batch
t0 = time.time()
local_iter_num = 0 # number of iterations in the lifetime of this process
running_mfu = -1.0
while True:

    # determine and set the learning rate for this iteration: each group gets its muP lr_scale
    lr = get_lr(iter_num) if decay_lr else learning_rate
    for param_group in optimizer.param_groups:
        param_group['lr'] = lr * param_group['lr_scale']

    # evaluate the loss on train/val sets and write checkpoints
    if iter_num % eval_interval == 0 and master_process:
        losses = estimate_loss()
        print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
        if wandb_log:
            wandb.log({"iter": iter_num, "train/loss": losses['train'], "val/loss": losses['val'],
                       "lr": lr, "mfu": running_mfu*100})
        if losses['val'] < best_val_loss or always_save_checkpoint:
            best_val_loss = min(best_val_loss, losses['val'])
            if iter_num > 0:
                save_checkpoint()
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
    batches = get_batch('train', data_rng, local_accum_steps) # next batch, while the GPU is busy
    # clip the gradient
    if grad_clip != 0.0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    # step the optimizer and scaler if training in fp16
    scaler.step(optimizer)
    scaler.update()
    # flush the gradients as soon as we can, no need for this memory anymore
    optimizer.zero_grad(set_to_none=True)

    # timing and logging
    t1 = time.time()
    dt = t1 - t0
    t0 = t1
    if iter_num % log_interval == 0:
        if ddp:
            torch.distributed.all_reduce(loss_sum) # the loss of the whole global batch
        lossf = loss_sum.item() / ddp_world_size
        if master_process:
            if local_iter_num >= 5: # let the training loop settle a bit
                mfu = raw_model.estimate_mfu(batch_size * local_accum_steps, dt, peak_flops)
                running_mfu = mfu if running_mfu == -1.0 else 0.9*running_mfu + 0.1*mfu
            print(f"iter {iter_num}: loss {lossf:.4f}, time {dt*1000:.2f}ms, mfu {running_mfu*100:.2f}%")
    iter_num += 1
    local_iter_num += 1

    # termination conditions
    if iter_num > max_iters:
        break

if ddp:
    destroy_process_group()
