# GPT-2 124M (12 x 768, 12 heads, block 1024) on OpenWebText, with muP relative to a 12 x 192
# proxy (the same 12 heads, of dim 16: m = 4). muTransfer in two steps (README, "Scaling up"):
# tune the muTransfer hyperparameters on the proxy with mup_payoff.py --study=tune, on this data,
# then train this model with the values found. The proxy this config expects: width 192, 12 layers,
# 12 sequences of 1024 tokens a step (12,288 tokens), 2,000 steps (24.6M tokens), weight decay 0.1
# and beta2 0.95 as below. Width and depth carry by muP; the batch (40x) and the length (12,000x)
# by the rules of transfer.py (base_batch_tokens, base_train_tokens below): train.py derives this
# run's lr, betas, eps and weight decay from the proxy's values and prints them.
# Tuned here: nothing yet. The learning rate, mup_output_mult, mup_attn_mult, mup_input_mult and
# init_std below are the neutral defaults and nanoGPT's SP lr, not values measured on the proxy:
# replace them with the proxy's (or pass them as --key=value). The batch, schedule, betas and
# weight decay are nanoGPT's train_gpt2.py recipe, not tuned either.
# Prepare the data first: python data/openwebtext/prepare.py --num_proc=8
# $ torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2_mup.py

out_dir = 'out-gpt2-mup'
dataset = 'openwebtext'
wandb_project = 'owt'
wandb_run_name = 'gpt2-124M-mup'

# the model: GPT-2 small, without biases (a bit better and faster, as nanoGPT suggests)
n_layer = 12
n_head = 12
n_embd = 768
block_size = 1024
bias = False
dropout = 0.0
mup_base_width = 192 # the proxy's width: 12 heads of 16, so widening grows the head dim

# 12 sequences x 1024 tokens x 40 micro-batches = 491,520 tokens per step (nanoGPT's ~0.5M),
# over 8 GPUs 5 micro-batches each; gradient_accumulation_steps counts the global batch's
batch_size = 12
gradient_accumulation_steps = 5 * 8

# the schedule: 300B tokens, as nanoGPT
max_iters = 600000
lr_decay_iters = 600000
warmup_iters = 2000
eval_interval = 1000
eval_iters = 200
log_interval = 10

# the muTransfer hyperparameters: NOT tuned (see above). Under muP the hidden matrices get
# learning_rate / 4 and the rest learning_rate (docs/mup.md).
learning_rate = 6e-4
min_lr = 6e-5
init_std = 0.02
mup_output_mult = 1.0
mup_attn_mult = 1.0
mup_input_mult = 1.0

# AdamW as nanoGPT's GPT-2 recipe: the values the proxy runs with
weight_decay = 1e-1
beta1 = 0.9
beta2 = 0.95

# the proxy's batch and length: the values above are the proxy's, this run derives its own
base_batch_tokens = 12 * 1024
base_train_tokens = 12 * 1024 * 2000
