"""
Prepare the Tiny Shakespeare dataset with the GPT-2 BPE tokenizer.
Writes train.bin and val.bin (uint16 token ids; GPT-2's 50,257 ids fit).

$ python data/shakespeare/prepare.py                    # downloads input.txt
$ python data/shakespeare/prepare.py --input input.txt  # uses a local copy
"""
import argparse
import os
import urllib.request

import numpy as np
import tiktoken

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

    # split the text, not the tokens, so val starts at the same place as shakespeare_char's
    n = len(data)
    enc = tiktoken.get_encoding("gpt2")
    # encode_ordinary: '<|endoftext|>' in the text is plain text, not the special token
    train_ids = np.array(enc.encode_ordinary(data[:int(n * 0.9)]), dtype=np.uint16)
    val_ids = np.array(enc.encode_ordinary(data[int(n * 0.9):]), dtype=np.uint16)
    print(f"train has {len(train_ids):,} tokens")
    print(f"val has {len(val_ids):,} tokens")

    train_ids.tofile(os.path.join(out_dir, 'train.bin'))
    val_ids.tofile(os.path.join(out_dir, 'val.bin'))

if __name__ == '__main__':
    parser = argparse.ArgumentParser(description="Encode Tiny Shakespeare with GPT-2 BPE.")
    parser.add_argument('--input', help="local copy of input.txt (default: download it into --out_dir)")
    parser.add_argument('--out_dir', default=HERE, help="where to write train.bin and val.bin")
    args = parser.parse_args()
    prepare(args.input, args.out_dir)
