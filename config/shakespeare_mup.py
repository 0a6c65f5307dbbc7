# muP on Tiny Shakespeare characters. The hyperparameters were tuned on a narrow base model
# (mup_base_width) and are used unchanged at the full width: that is muTransfer.
# On a GPU: nanoGPT's baby GPT (6 x 384). Elsewhere: a model that trains in ~10 min on 2 CPU cores.
# (To run the CPU recipe on a GPU machine, pass its sizes on the command line.)
import torch

out_dir = 'out-shakespeare-mup'
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
    # Tuned at width 96 (head dim 16), same depth, data and schedule, 5000 iters, lr grid 2^-9..2^-4:
    # val 1.519 1.514 1.461 1.451 1.479 1.554 -> 2^-6. (Not yet checked at 384: the full-width
    # runs of that sweep did not finish in the GPU time available.)
    mup_base_width = 96
    learning_rate = 2 ** -6
    min_lr = learning_rate / 10
else:
    compile = False # the timings below are eager; compiling on a CPU costs a minute up front
    n_layer, n_head, n_embd = 4, 4, 192
    dropout = 0.0
    batch_size, block_size = 16, 128
    max_iters = lr_decay_iters = 2200
    eval_interval, eval_iters, log_interval = 550, 25, 100
    # Tuned at width 64 (head dim 16), same depth, data and schedule, 2500 iters (on a GPU in
    # fp32, same math): lr grid 2^-10..2^-3 gave val 1.925 1.842 1.733 1.674 1.723 1.715 1.807
    # 2.740 -> 2^-7; then init_std 0.01/0.02/0.04/0.08 at 2^-8..2^-6 -> 0.08 (1.606 at 2^-7).
    # Output, attention and input multipliers x0.5/x2 changed the base loss by < 0.02: left at 1.
    # At 192 (m = 3) with these values: val 1.551 after 2500 iters (11 min on 2 cores), 1.544
    # after this 2200-iter schedule (8 min).
    mup_base_width = 64
    init_std = 0.08
    learning_rate = 2 ** -7
    min_lr = learning_rate / 10
