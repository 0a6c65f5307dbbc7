# muP on Tiny Shakespeare characters with GPT-2's block and AdamW: the recipe to compare with
# nanoGPT's (config/train_shakespeare_char.py); the main job is config/shakespeare_mup.py. The
# hyperparameters were tuned on a narrow base model (mup_base_width) and are used unchanged at the
# full width: that is muTransfer. The sweeps: docs/mup-study.md, "Tuning the config recipes".
# With Muon for the hidden matrices (tuned at width 64): --optimizer=muon --learning_rate=0.015625
# --muon_lr_mult=4.
# On a GPU: nanoGPT's baby GPT (6 x 384). Elsewhere: a model that trains in ~10 min on 2 CPU cores.
# (To run the CPU recipe on a GPU machine, pass its sizes on the command line.)
import torch

out_dir = 'out-shakespeare-mup-gpt2'
dataset = 'shakespeare_char'
always_save_checkpoint = False # we overfit on this small dataset: keep the best val checkpoint
bias = False
warmup_iters = 100
weight_decay = 0.1
beta2 = 0.99

if torch.cuda.is_available():
    n_layer, n_head, n_embd = 6, 6, 384
    dropout = 0.2
    batch_size, block_size = 64, 256
    max_iters = lr_decay_iters = 5000
    eval_interval, eval_iters, log_interval = 250, 200, 10
    mup_base_width = 96 # head dim 16, as the CPU recipe's base
    learning_rate = 2 ** -6 # the best at width 96
    min_lr = learning_rate / 10
else:
    compile = False # the recipe's timings are eager; compiling on a CPU costs a minute up front
    n_layer, n_head, n_embd = 4, 4, 192
    dropout = 0.0
    batch_size, block_size = 16, 128
    max_iters = lr_decay_iters = 2200
    eval_interval, eval_iters, log_interval = 550, 25, 100
    mup_base_width = 64 # head dim 16
    init_std = 0.08 # a muTransfer hyperparameter too: tuned at width 64 with the lr
    learning_rate = 2 ** -7 # the best at width 64
    min_lr = learning_rate / 10
