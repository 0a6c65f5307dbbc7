# The main job: muP on Tiny Shakespeare characters with the modern block (rotary positions,
# QK-norm, RMSNorm without gains, ReLU^2, grouped-query attention with 2 key/value heads for 4 query
# heads, an untied readout) and Muon for the hidden matrices. The lr, Muon's lr multiplier, the init
# std, the attention multiplier and the decay to zero were tuned on the narrow base model (width 64)
# and are used unchanged at the full width: that is muTransfer (docs/mup-study.md, "The modern main
# job"). On 2 CPU cores: 6-10 minutes, val 1.4605.
# On a GPU: nanoGPT's baby GPT size (6 x 384) with the CPU recipe's tuned values, untested.
# (To run the CPU recipe on a GPU machine, pass its sizes on the command line.)
import torch

out_dir = 'out-shakespeare-mup'
dataset = 'shakespeare_char'
always_save_checkpoint = False # we overfit on this small dataset: keep the best val checkpoint
# the modern block (docs/mup.md, modern blocks)
pos_emb = 'rope'
qk_norm = True
norm = 'rmsnorm'
norm_gain = False
mlp = 'relu2'
tie_weights = False
bias = False
optimizer = 'muon'
warmup_iters = 100
weight_decay = 0.1
beta2 = 0.99
# QK-norm without gains bounds every attention logit by mup_attn_mult * sqrt(base head dim), 4 at
# the base head dim 16 (docs/mup.md, modern blocks): x2 lets the heads sharpen
mup_attn_mult = 2.0
learning_rate = 2 ** -6 # the best at width 64 (AdamW's best, 2^-8, ended 0.10 higher)
muon_lr_mult = 1.0
init_std = 0.04
min_lr = 0.0 # the cosine decays to zero

if torch.cuda.is_available():
    n_layer, n_head, n_embd = 6, 6, 384
    n_kv_head = 3
    dropout = 0.2
    batch_size, block_size = 64, 256
    max_iters = lr_decay_iters = 5000
    eval_interval, eval_iters, log_interval = 250, 200, 10
    mup_base_width = 96 # head dim 16, as the CPU recipe's base
else:
    compile = False # the recipe's timings are eager; compiling on a CPU costs a minute up front
    n_layer, n_head, n_embd = 4, 4, 192
    n_kv_head = 2
    dropout = 0.0
    batch_size, block_size = 16, 128
    # 1800 steps: the job's 10 minutes on a 2-core CPU (2200, the GPT-2 block's, end 0.013 lower)
    max_iters = lr_decay_iters = 1800
    eval_interval, eval_iters, log_interval = 450, 25, 100
    mup_base_width = 64 # head dim 16
