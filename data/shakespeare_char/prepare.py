"""
Prepare the Tiny Shakespeare dataset for character-level language modeling.
Instead of encoding with GPT-2 BPE tokens, we map each character to an int.
Writes train.bin and val.bin (uint16 token ids) and meta.pkl with the
vocabulary, needed to turn ids back into text when sampling.

$ python data/shakespeare_char/prepare.py                    # downloads input.txt
$ python data/shakespeare_char/prepare.py --input input.txt  # uses a local copy
"""
import argparse
import os
import pickle
import urllib.request

import numpy as np

DATA_URL = 'https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt'
HERE = os.path.dirname(os.path.abspath(__file__))

def download(path):
    try:
        with urllib.request.urlopen(DATA_URL, timeout=60) as response:
            data = response.read()
    except OSError as e:  # URLError, HTTPError and timeouts are all OSErrors
        raise RuntimeError(f"could not download {DATA_URL} ({e}); download it elsewhere "
                           f"and pass --input PATH to use a local copy") from None
    # write only once the download is complete, so a failed one leaves no partial input.txt
    with open(path, 'wb') as f:
        f.write(data)

def prepare(input_path=None, out_dir=HERE):
    os.makedirs(out_dir, exist_ok=True)
    if input_path is None:
        input_path = os.path.join(out_dir, 'input.txt')
        if not os.path.exists(input_path):
            download(input_path)
    with open(input_path, encoding='utf-8') as f:
        data = f.read()
    print(f"length of dataset in characters: {len(data):,}")

    # the vocabulary is every character that occurs in the text
    chars = sorted(set(data))
    vocab_size = len(chars)
    if vocab_size > 2**16:
        raise ValueError(f"{input_path} has {vocab_size:,} distinct characters, too many for uint16 ids")
    print("all the unique characters:", ''.join(chars))
    print(f"vocab size: {vocab_size:,}")
    stoi = {ch: i for i, ch in enumerate(chars)}
    itos = {i: ch for i, ch in enumerate(chars)}

    n = len(data)
    train_ids = np.array([stoi[c] for c in data[:int(n * 0.9)]], dtype=np.uint16)
    val_ids = np.array([stoi[c] for c in data[int(n * 0.9):]], dtype=np.uint16)
    print(f"train has {len(train_ids):,} tokens")
    print(f"val has {len(val_ids):,} tokens")

    train_ids.tofile(os.path.join(out_dir, 'train.bin'))
    val_ids.tofile(os.path.join(out_dir, 'val.bin'))
    with open(os.path.join(out_dir, 'meta.pkl'), 'wb') as f:
        pickle.dump({'vocab_size': vocab_size, 'itos': itos, 'stoi': stoi}, f)

if __name__ == '__main__':
    parser = argparse.ArgumentParser(description="Encode Tiny Shakespeare character by character.")
    parser.add_argument('--input', help="local copy of input.txt (default: download it into --out_dir)")
    parser.add_argument('--out_dir', default=HERE, help="where to write train.bin, val.bin and meta.pkl")
    args = parser.parse_args()
    prepare(args.input, args.out_dir)
