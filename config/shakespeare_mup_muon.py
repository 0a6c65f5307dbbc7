# muP with Muon on Tiny Shakespeare characters: config/shakespeare_mup.py's model, data and schedule,
# with torch's Muon for the hidden matrices and AdamW for the rest (docs/mup.md, Muon). The
# hyperparameters below were tuned at the base width (mup_base_width) and are used unchanged at
# the full width.
import torch

out_dir = 'out-shakespeare-mup-muon'
dataset = 'shakespeare_char'
always_save_checkpoint = False # we overfit on this small dataset: keep the best val checkpoint
bias = False
warmup_iters = 100
weight_decay = 0.1
beta2 = 0.99
optimizer = 'muon'

if torch.cuda.is_available():
    n_layer, n_head, n_embd = 6, 6, 384
    dropout = 0.2
    batch_size, block_size = 64, 256
    max_iters = lr_decay_iters = 5000
    eval_interval, eval_iters, log_interval = 250, 200, 10
    mup_base_width = 96
    # not tuned on a GPU: the CPU recipe's values below, for a start
    learning_rate = 2 ** -6
    muon_lr_mult = 4.0
    min_lr = learning_rate / 10
else:
    compile = False # the timings below are eager; compiling on a CPU costs a minute up front
    n_layer, n_head, n_embd = 4, 4, 192
    dropout = 0.0
    batch_size, block_size = 16, 128
    max_iters = lr_decay_iters = 2200
    eval_interval, eval_iters, log_interval = 550, 25, 100
    mup_base_width = 64
    init_std = 0.08
    learning_rate = 2 ** -7
    muon_lr_mult = 4.0
    min_lr = learning_rate / 10
