"""
Gated attention, headwise (Qiu et al. 2025, "Gated Attention for Large Language Models"): each
head's output is multiplied by its own sigmoid gate, computed from the layer's input,
y_h <- y_h * sigmoid(x W_g)_h, before the output projection. A few lines on top of
MuPFlexAttention, and the worked example of a muP 'output' weight (docs/mup.md): W_g is
nn.Linear(n_embd, n_head), whose fan-in grows with width and whose fan-out does not, so muP gives
it init std sigma/m and Adam lr eta/m. Treated as an embedding (init sigma, lr eta), its
pre-activation x W_g grows like m after a few steps and the gates of a wide model saturate.

$ python train.py config/shakespeare_mup.py --attn_cls=gated_attention.py:HeadwiseGate
$ python coord_check.py --attn_cls=gated_attention.py:HeadwiseGate --widths=64,128,256,512
"""

import torch
import torch.nn as nn

from model import MuPFlexAttention


class HeadwiseGate(MuPFlexAttention):
    """MuPFlexAttention with one sigmoid gate per head and token on the head's output."""

    def __init__(self, config):
        super().__init__(config)
        self.gate = nn.Linear(config.n_embd, config.n_head, bias=False) # muP: an output weight

    def forward(self, x, mask, rope=None, kv_cache=None):
        q, k, v = self.qkv(x, rope, kv_cache)
        y = self.attend(q, k, v, mask) # (B, n_head, T, head_dim)
        gates = torch.sigmoid(self.gate(x)) # (B, T, n_head)
        return self.output(y * gates.transpose(1, 2).unsqueeze(-1))
