# muP on Tiny Shakespeare characters with the modern block: rotary positions, QK-norm, RMSNorm
# without gains, ReLU^2, grouped-query attention (2 key/value heads for 4 query heads) and an
# untied readout (docs/mup.md, modern blocks). config/shakespeare_mup.py's model size, data and
# schedule; the lr (and the other muTransfer values) tuned on the narrow base model with
# lr_sweep.py and used unchanged at the full width: docs/mup-study.md, "The modern main job".
import os

exec(open(os.path.join(os.path.dirname(__file__), 'shakespeare_mup.py')).read())
out_dir = 'out-shakespeare-mup-modern'
pos_emb = 'rope'
qk_norm = True
norm = 'rmsnorm'
norm_gain = False
mlp = 'relu2'
n_kv_head = n_head // 2
tie_weights = False
