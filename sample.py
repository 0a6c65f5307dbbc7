"""
Sample from a trained model:
$ python sample.py --out_dir=out-shakespeare-mup --start="ROMEO:" --num_samples=3
"""
import os
import sys

import torch

import checkpoints
from configurator import DTYPES, autocast, configure, require, resolve_device, resolve_dtype
from data import read_meta
from errors import UserError

# -----------------------------------------------------------------------------
out_dir = 'out' # the train.py out_dir holding ckpt.pt (or a checkpoint file in it)
start = "\n" # or "<|endoftext|>" etc. Can also specify a file, use as: "FILE:prompt.txt"
num_samples = 3 # number of samples to draw
batch_size = 16 # samples drawn together, one KV cache for all (its memory grows with it)
max_new_tokens = 500 # number of tokens generated in each sample
temperature = 0.8 # 1.0 = no change, < 1.0 = less random, > 1.0 = more random; 0 = greedy
top_k = 200 # retain only the top_k most likely tokens, clamp others to 0 probability (0 = off)
seed = 1337
device = 'auto' # 'auto' (cuda > mps > cpu), 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = 'auto' # 'auto': bfloat16 where the GPU supports it, float16 on older GPUs, float32 off CUDA
attn_backend = 'auto' # the training run's choice is a runtime detail; pick again here
# -----------------------------------------------------------------------------
config = configure(globals(), sys.argv[1:])
# -----------------------------------------------------------------------------

# every setting and input is checked, in order, before the model generates anything
require(config, 'num_samples', num_samples >= 1, 'an integer >= 1')
require(config, 'batch_size', batch_size >= 1, 'an integer >= 1')
require(config, 'max_new_tokens', max_new_tokens >= 0, 'an integer >= 0')
require(config, 'temperature', 0 <= temperature < float('inf'), 'a finite number >= 0 (0 = greedy)')
require(config, 'top_k', top_k >= 0, 'an integer >= 0 (0 = off)')
require(config, 'dtype', dtype in DTYPES, "'auto', 'float32', 'bfloat16' or 'float16'")
device = resolve_device(device) # 'auto' becomes cuda, mps or cpu

# the prompt: the text of --start, or of the file it names
if start.startswith('FILE:'):
    prompt_path = start[len('FILE:'):]
    if not os.path.isfile(prompt_path):
        raise UserError(f"start={start!r}: the prompt file {prompt_path!r} does not exist")
    try:
        with open(prompt_path, 'r', encoding='utf-8') as f:
            prompt = f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"start={start!r}: the prompt file {prompt_path!r} is not UTF-8 text "
                          f"({e.reason} at byte {e.start}): save it as UTF-8") from None
    except OSError as e:
        raise UserError(f"start={start!r}: the prompt file {prompt_path!r} cannot be read "
                          f"({e.strerror})") from None
    prompt_source = f"the prompt file {prompt_path!r}"
else:
    prompt = start
    prompt_source = f"start={start!r}"

torch.manual_seed(seed)
ctx = autocast(device, resolve_dtype(dtype, device))

# the model as trained (its attention class too), on this run's attention backend
model, checkpoint = checkpoints.load_run(out_dir, device, attn_backend=attn_backend)
model.eval()

# encoding: the dataset's meta.pkl for char-level data, GPT-2 BPE otherwise
dataset = checkpoint.get('config', {}).get('dataset', '')
meta = read_meta(os.path.join('data', dataset)) if dataset else None
if meta is not None:
    print(f"Loading meta from data/{dataset}/meta.pkl...")
    stoi, itos = meta['stoi'], meta['itos']
    unknown = sorted(set(prompt) - set(stoi))
    if unknown:
        raise UserError(f"{prompt_source} contains characters not in the {dataset} "
                          f"vocabulary: {unknown}")
    encode = lambda s: [stoi[c] for c in s]
    decode = lambda l: ''.join([itos[i] for i in l])
else:
    print("No meta.pkl found, assuming GPT-2 encodings...")
    import tiktoken
    enc = tiktoken.get_encoding("gpt2")
    encode = lambda s: enc.encode(s, allowed_special={"<|endoftext|>"})
    decode = lambda l: enc.decode(l)

# encode the beginning of the prompt
start_ids = encode(prompt)
if not start_ids:
    raise UserError(f"{prompt_source} is empty: the model needs at least one token to "
                      f"continue; give it some text (the default --start is a newline)")
x = torch.tensor(start_ids, dtype=torch.long, device=device)[None, ...]

# run generation: the samples in batches, each decoded with the KV cache (model.generate)
with torch.no_grad():
    with ctx:
        for first in range(0, num_samples, batch_size):
            n = min(batch_size, num_samples - first)
            y = model.generate(x.repeat(n, 1), max_new_tokens, temperature=temperature,
                               top_k=top_k or None)
            for sample in y.tolist():
                print(decode(sample))
                print('---------------')
