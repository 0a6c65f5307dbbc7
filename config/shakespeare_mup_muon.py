# muP with Muon on Tiny Shakespeare characters: config/shakespeare_mup.py's model, data and
# schedule, with Muon (muon.py) for the hidden matrices and AdamW for the rest (docs/mup.md, Muon).
# The lr and Muon's lr multiplier were tuned at the base width and are used unchanged at the full width.
import os

import torch

exec(open(os.path.join(os.path.dirname(__file__), 'shakespeare_mup.py')).read())
out_dir = 'out-shakespeare-mup-muon'
optimizer = 'muon'
if torch.cuda.is_available():
    muon_lr_mult = 4.0 # not tuned on a GPU: the CPU recipe's multiplier, as a start
else:
    # the best (lr, muon_lr_mult) at width 64 on this schedule: docs/mup-study.md, "The main job with Muon"
    learning_rate = 2 ** -6
    muon_lr_mult = 4.0
    min_lr = learning_rate / 10
