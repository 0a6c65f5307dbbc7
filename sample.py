"""
Sample from a trained model:
$ python sample.py --out_dir=out-shakespeare-mup --start="ROMEO:" --num_samples=3
"""
import os
import pickle
import sys

import torch

from configurator import ConfigError, configure
from model import GPT, GPTConfig

# -----------------------------------------------------------------------------
out_dir = 'out' # the train.py out_dir holding ckpt.pt
start = "\n" # or "<|endoftext|>" etc. Can also specify a file, use as: "FILE:prompt.txt"
num_samples = 3 # number of samples to draw
max_new_tokens = 500 # number of tokens generated in each sample
temperature = 0.8 # 1.0 = no change, < 1.0 = less random, > 1.0 = more random; 0 = greedy (the most likely token)
top_k = 200 # retain only the top_k most likely tokens, clamp others to have 0 probability (0 = off)
seed = 1337
device = 'auto' # 'auto' (cuda > mps > cpu), 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = 'auto' # 'auto': bfloat16 where the GPU supports it, float32 elsewhere
attn_backend = 'auto' # the training run's choice is a runtime detail; pick again here
# -----------------------------------------------------------------------------
configure(globals(), sys.argv[1:])
# -----------------------------------------------------------------------------
for key, ok, must_be in [('num_samples', num_samples >= 1, 'an integer >= 1'),
                         ('max_new_tokens', max_new_tokens >= 0, 'an integer >= 0'),
                         ('temperature', 0 <= temperature < float('inf'), 'a finite number >= 0 (0 = greedy)'),
                         ('top_k', top_k >= 0, 'an integer >= 0 (0 = off)'),
                         ('dtype', dtype in ('auto', 'float32', 'bfloat16', 'float16'), "'auto', 'float32', 'bfloat16' or 'float16'")]:
    if not ok:
        raise ConfigError(f"{key}={globals()[key]!r}: must be {must_be}")

torch.manual_seed(seed)
if device == 'auto':
    device = 'cuda' if torch.cuda.is_available() else 'mps' if torch.backends.mps.is_available() else 'cpu'
device_type = 'cuda' if 'cuda' in device else 'mps' if 'mps' in device else 'cpu'
if dtype == 'auto':
    dtype = 'bfloat16' if device_type == 'cuda' and torch.cuda.is_bf16_supported() else 'float32'
ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype]
ctx = torch.amp.autocast(device_type=device_type, dtype=ptdtype, enabled=ptdtype != torch.float32)

# model
ckpt_path = os.path.join(out_dir, 'ckpt.pt')
if not os.path.exists(ckpt_path):
    raise ConfigError(f"out_dir={out_dir!r}: no checkpoint at {ckpt_path}: train first (python train.py ...) or pass "
                      f"--out_dir=<the train.py out_dir>")
checkpoint = torch.load(ckpt_path, map_location=device, weights_only=False)
model = GPT(GPTConfig(**{**checkpoint['model_args'], 'attn_backend': attn_backend}))
model.load_state_dict(checkpoint['model'])
model.eval()
model.to(device)

# encoding: the dataset's meta.pkl for char-level data, GPT-2 BPE otherwise
dataset = checkpoint['config'].get('dataset', '')
meta_path = os.path.join('data', dataset, 'meta.pkl')
if dataset and os.path.exists(meta_path):
    print(f"Loading meta from {meta_path}...")
    with open(meta_path, 'rb') as f:
        meta = pickle.load(f)
    stoi, itos = meta['stoi'], meta['itos']
    unknown = sorted(set(start) - set(stoi)) if not start.startswith('FILE:') else []
    if unknown:
        raise ConfigError(f"start={start!r} contains characters not in the {dataset} vocabulary: {unknown}")
    encode = lambda s: [stoi[c] for c in s]
    decode = lambda l: ''.join([itos[i] for i in l])
else:
    print("No meta.pkl found, assuming GPT-2 encodings...")
    import tiktoken
    enc = tiktoken.get_encoding("gpt2")
    encode = lambda s: enc.encode(s, allowed_special={"<|endoftext|>"})
    decode = lambda l: enc.decode(l)

# encode the beginning of the prompt
if start.startswith('FILE:'):
    if not os.path.isfile(start[5:]):
        raise ConfigError(f"start={start!r}: the prompt file {start[5:]!r} does not exist")
    with open(start[5:], 'r', encoding='utf-8') as f:
        start = f.read()
start_ids = encode(start)
x = torch.tensor(start_ids, dtype=torch.long, device=device)[None, ...]

# run generation
with torch.no_grad():
    with ctx:
        for k in range(num_samples):
            y = model.generate(x, max_new_tokens, temperature=temperature, top_k=top_k or None)
            print(decode(y[0].tolist()))
            print('---------------')
