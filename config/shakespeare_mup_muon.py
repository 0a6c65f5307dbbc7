# muP with Muon on Tiny Shakespeare characters: config/shakespeare_mup.py's model, data and
# schedule, with torch's Muon for the hidden matrices and AdamW for the rest (docs/mup.md, Muon).
# The lr and Muon's lr multiplier were tuned at the base width and are used unchanged at the full width.
import os

import torch

exec(open(os.path.join(os.path.dirname(__file__), 'shakespeare_mup.py')).read())
out_dir = 'out-shakespeare-mup-muon'
optimizer = 'muon'
if torch.cuda.is_available():
    muon_lr_mult = 4.0 # not tuned on a GPU: the CPU recipe's multiplier, as a start
else:
    # Tuned at width 64 (4 layers, this schedule, 2200 iters, init_std 0.08 as the AdamW recipe).
    # Val loss at iter 2200 for (lr, muon_lr_mult): (2^-7, 8) 1.678, (2^-6, 2) 1.623, (2^-6, 4) 1.569,
    # (2^-5, 2) 1.576, (2^-5, 4) 1.702; at (2^-6, 4): init_std 0.04 1.683, 0.16 1.668; momentum 0.9 1.591.
    learning_rate = 2 ** -6
    muon_lr_mult = 4.0
    min_lr = learning_rate / 10
