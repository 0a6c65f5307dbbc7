# muP on Tiny Shakespeare characters: hyperparameters tuned on a narrow base model, used
# unchanged at the full width (muTransfer). Sized by device.
import torch

out_dir = 'out-shakespeare-mup'
dataset = 'shakespeare_char'
always_save_checkpoint = False
dropout = 0.0
bias = False
mup_base_width = 64

if torch.cuda.is_available():
    # nanoGPT's baby GPT shape
    n_layer, n_head, n_embd = 6, 6, 384
    mup_base_width = 96 # head dim 16 at the base
    batch_size, block_size = 64, 256
    max_iters = lr_decay_iters = 5000
    eval_interval, eval_iters, log_interval = 250, 200, 10
    learning_rate, min_lr = 1e-2, 1e-3
    dropout = 0.2
else:
    # a model that trains within 10 minutes on 2 CPU cores
    n_layer, n_head, n_embd = 4, 4, 256
    batch_size, block_size = 16, 128
    max_iters = lr_decay_iters = 2500
    eval_interval, eval_iters, log_interval = 500, 50, 50
    learning_rate, min_lr = 1e-2, 1e-3
warmup_iters = 100
weight_decay = 0.1
beta2 = 0.99
