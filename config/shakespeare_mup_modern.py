# muP on Tiny Shakespeare characters with the modern block: rotary positions, QK-norm, RMSNorm
# without gains, ReLU^2, grouped-query attention (2 key/value heads for 4 query heads) and an
# untied readout (docs/mup.md, modern blocks), trained with Muon for the hidden matrices.
# config/shakespeare_mup.py's model size and data. The lr, Muon's lr multiplier, the init std, the
# attention multiplier and the decay to zero were tuned on the narrow base model (width 64) and are
# used unchanged at the full width: docs/mup-study.md, "The modern main job".
import os

import torch

exec(open(os.path.join(os.path.dirname(__file__), 'shakespeare_mup.py')).read())
out_dir = 'out-shakespeare-mup-modern'
pos_emb = 'rope'
qk_norm = True
norm = 'rmsnorm'
norm_gain = False
mlp = 'relu2'
n_kv_head = n_head // 2
tie_weights = False
optimizer = 'muon'
# QK-norm without gains bounds every attention logit by mup_attn_mult * sqrt(base head dim), 4 at
# both recipes' base head dim 16 (docs/mup.md, modern blocks): x2 lets the heads sharpen
mup_attn_mult = 2.0
min_lr = 0.0 # the cosine decays to zero
if torch.cuda.is_available():
    muon_lr_mult = 1.0 # not tuned on a GPU: the CPU recipe's values, as a start
else:
    # the best at width 64 on the 2200-step schedule (AdamW's best, 2^-8, ended 0.10 higher)
    learning_rate = 2 ** -6
    muon_lr_mult = 1.0
    init_std = 0.04
    # 1800 steps, not the GPT-2 block's 2200: the job's 10 minutes on a 2-core CPU
    max_iters = lr_decay_iters = 1800
    eval_interval = 450
