"""
A T5-style learned relative-position bias: the README's example of your own attention class.
The file only defines the class, so that every process that builds the model (a sweep's runs,
sample.py, a resume) imports it and nothing else.

$ python train.py config/shakespeare_mup.py --attn_cls=relative_bias.py:RelativeBias
"""

import torch

from model import MuPFlexAttention


class RelativeBias(MuPFlexAttention):
    num_buckets = 32 # a class attribute: GPT builds attention as attn_cls(config)

    def __init__(self, config):
        super().__init__(config) # c_attn, c_proj, the muP logit scale, the catalog's mods
        # (buckets, heads): no dim grows with width, so muP keeps its lr as is
        self.rel_bias = torch.nn.Parameter(torch.zeros(self.num_buckets, config.n_head))

    def score_mod(self, score, b, h, q_idx, kv_idx): # score already carries the muP logit scale
        bucket = (q_idx - kv_idx).clamp(0, self.num_buckets - 1) # tensor ops only
        return score + self.rel_bias[bucket, h]
