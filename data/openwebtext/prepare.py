"""
Prepare OpenWebText (Gokaslan & Cohen's open copy of GPT-2's WebText) for GPT-2 124M: every
document encoded with the GPT-2 BPE, an end-of-text token after each, all concatenated into
train.bin and val.bin (uint16 token ids, which train.py memory-maps). No meta.pkl: train.py
then takes GPT-2's vocabulary, padded to 50304.

$ python data/openwebtext/prepare.py --num_proc=8        # downloads ~55 GB of Hugging Face cache
$ python data/openwebtext/prepare.py --input=PATH         # local files (json, jsonl, parquet or txt)
                                                          # with a 'text' column, offline

Expect ~9B train tokens (~17 GB) and ~4M val tokens (~8 MB). The split holds out a 0.05 %
of the documents, drawn with a fixed seed, so that every preparation has the same val set.
"""
import argparse
import os

import numpy as np
import tiktoken
from datasets import load_dataset

HERE = os.path.dirname(os.path.abspath(__file__))
HUB_NAME = 'Skylion007/openwebtext'
LOCAL_BUILDERS = {'.json': 'json', '.jsonl': 'json', '.parquet': 'parquet', '.txt': 'text'}

enc = tiktoken.get_encoding('gpt2')


def tokenize(example):
    # encode_ordinary: '<|endoftext|>' in a document is plain text, not the special token;
    # the real one separates the documents
    ids = enc.encode_ordinary(example['text'])
    ids.append(enc.eot_token)
    return {'ids': ids, 'len': len(ids)}


def load(input_path, num_proc):
    """The documents, from the hub or from local files of one format."""
    if input_path is None:
        return load_dataset(HUB_NAME, num_proc=num_proc, split='train')
    if os.path.isdir(input_path):
        files = sorted(os.path.join(input_path, name) for name in os.listdir(input_path))
    else:
        files = [input_path]
    formats = {LOCAL_BUILDERS.get(os.path.splitext(path)[1]) for path in files}
    if len(formats) != 1 or None in formats:
        raise SystemExit(f"--input={input_path}: expected files of one format, ending in "
                         f"{', '.join(LOCAL_BUILDERS)}, with a 'text' column")
    return load_dataset(formats.pop(), data_files=files, split='train')


def write(dataset, path):
    """Concatenate the token ids of every document into a uint16 file, in shards, so that the
    whole split never sits in memory; written to a temporary name and renamed once complete."""
    total = int(np.sum(dataset['len'], dtype=np.uint64))
    tmp_path = path + '.tmp'
    out = np.memmap(tmp_path, dtype=np.uint16, mode='w+', shape=(total,))
    n_shards = min(1024, len(dataset))
    position = 0
    for shard in range(n_shards):
        batch = dataset.shard(num_shards=n_shards, index=shard, contiguous=True).with_format('numpy')
        ids = np.concatenate(batch['ids'])
        out[position:position + len(ids)] = ids
        position += len(ids)
    out.flush()
    del out
    os.replace(tmp_path, path)
    print(f"{path}: {total:,} tokens")


def prepare(input_path=None, out_dir=HERE, num_proc=8, val_fraction=0.0005):
    documents = load(input_path, num_proc)
    if 'text' not in documents.column_names:
        raise SystemExit(f"the dataset has columns {documents.column_names}, but no 'text'")
    split = documents.train_test_split(test_size=val_fraction, seed=2357, shuffle=True)
    os.makedirs(out_dir, exist_ok=True)
    for name, part in (('train', split['train']), ('val', split['test'])):
        tokenized = part.map(tokenize, remove_columns=part.column_names, num_proc=num_proc,
                             desc=f"tokenizing {name}")
        write(tokenized, os.path.join(out_dir, f'{name}.bin'))


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description="Encode OpenWebText with GPT-2 BPE.")
    parser.add_argument('--input', help="local dataset files or a folder of them "
                                        "(default: download OpenWebText from the hub)")
    parser.add_argument('--out_dir', default=HERE, help="where to write train.bin and val.bin")
    parser.add_argument('--num_proc', type=int, default=8, help="processes for tokenizing")
    parser.add_argument('--val_fraction', type=float, default=0.0005,
                        help="the fraction of documents held out for val.bin")
    args = parser.parse_args()
    prepare(args.input, args.out_dir, args.num_proc, args.val_fraction)
