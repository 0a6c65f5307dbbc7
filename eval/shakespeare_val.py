"""
Bits per byte of a train.py run on Tiny Shakespeare's val text, and the same text as a local
lm-evaluation-harness task (eval/shakespeare_val.yaml), so that the harness run on the run's
export (export_hf.py) can be checked against the model's own loss. Run from the repository root:

$ python eval/shakespeare_val.py --out_dir=out-shakespeare
$ lm_eval --model hf --model_args pretrained=hf-shakespeare --include_path eval --tasks shakespeare_val --device cpu

Writes eval/shakespeare_val.jsonl: the val split of data/<dataset>/input.txt (its last 10%, as
prepare.py splits it) in documents of whole lines of at most block_size - 1 GPT-2 tokens each.
The harness's rolling loglikelihood then scores each document in one window after GPT-2's
<|endoftext|>, as this script does: bits per byte = the sum over the documents of
-log2 p(token | <|endoftext|>, the tokens before it), over their UTF-8 bytes.
"""

import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__)))) # the repository's modules

import checkpoints
from configurator import configure, resolve_device
from errors import UserError

# -----------------------------------------------------------------------------
out_dir = 'out-shakespeare' # the train.py run (its out_dir or ckpt.pt) to score, trained on GPT-2 BPE
dataset = 'shakespeare' # data/<dataset>/input.txt holds the text
jsonl = 'eval/shakespeare_val.jsonl' # where the documents go (eval/shakespeare_val.yaml reads it)
device = 'auto' # 'auto' (cuda > mps > cpu), 'cpu', 'cuda', ...
# -----------------------------------------------------------------------------


def documents(text, encode, max_tokens):
    """text cut at line ends into documents of at most max_tokens tokens each."""
    docs, lines = [], []
    for line in text.splitlines(keepends=True):
        if lines and len(encode(''.join(lines + [line]))) > max_tokens:
            docs.append(''.join(lines))
            lines = []
        lines.append(line)
    if lines:
        docs.append(''.join(lines))
    too_long = [doc for doc in docs if len(encode(doc)) > max_tokens]
    if too_long:
        raise UserError(f"a line of the text has more than {max_tokens} tokens: use a run with a longer block_size")
    return docs


@torch.no_grad()
def bits_per_byte(model, docs, encode, end_of_text):
    """Sum of -log2 p over every document's tokens, each after end_of_text, over their bytes."""
    device = model.lm_head.weight.device
    nats = 0.0
    for doc in docs:
        tokens = torch.tensor([end_of_text, *encode(doc)], device=device)[None]
        _, loss = model(tokens[:, :-1], tokens[:, 1:]) # the mean over the document's tokens
        nats += loss.double().item() * (tokens.size(1) - 1)
    return nats / math.log(2) / sum(len(doc.encode('utf-8')) for doc in docs)


if __name__ == '__main__':
    configure(globals(), sys.argv[1:])
    import tiktoken
    device = resolve_device(device)
    input_path = os.path.join('data', dataset, 'input.txt')
    if not os.path.exists(input_path):
        raise UserError(f"{input_path} not found: prepare the dataset first with `python data/{dataset}/prepare.py`")
    model, checkpoint = checkpoints.load_run(out_dir, device)
    model.eval()
    if model.config.vocab_size < 50257:
        raise UserError(f"{out_dir} has a vocabulary of {model.config.vocab_size} tokens, not GPT-2's: score a "
                        f"run trained on GPT-2 BPE data (data/shakespeare, not shakespeare_char)")
    with open(input_path, encoding='utf-8') as f:
        text = f.read()
    val = text[int(len(text) * 0.9):] # prepare.py's split
    enc = tiktoken.get_encoding('gpt2')
    docs = documents(val, enc.encode_ordinary, model.config.block_size - 1)
    with open(jsonl, 'w') as f:
        for doc in docs:
            f.write(json.dumps({'text': doc}) + '\n')
    bpb = bits_per_byte(model, docs, enc.encode_ordinary, enc.eot_token)
    print(f"wrote {jsonl}: {len(docs)} documents, {sum(len(d.encode('utf-8')) for d in docs):,} bytes")
    print(f"bits per byte of {out_dir}: {bpb:.8f}")
