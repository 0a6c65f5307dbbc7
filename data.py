"""
The token files of a dataset's directory (data/<dataset>, relative to the working directory, as
nanoGPT's): {train,val}.bin, uint16 tokens written by its prepare.py, and meta.pkl where the
dataset has its own vocabulary (character-level data). Here are the checks a run makes of them
before any work, and the one batch reader every script uses.
"""

import os
import pickle

import numpy as np
import torch

from errors import UserError, first_line

def prepare_command(data_dir):
    return f"`python {os.path.join(data_dir, 'prepare.py')}`"


def read_meta(data_dir):
    """data_dir/meta.pkl (vocab_size, and stoi/itos for char-level data) as a dict, or None where
    the dataset has none (GPT-2 BPE). A file that cannot be read is a UserError naming it."""
    path = os.path.join(data_dir, 'meta.pkl')
    if not os.path.exists(path):
        return None
    try:
        with open(path, 'rb') as f:
            meta = pickle.load(f)
        vocab_size = meta['vocab_size']
    except Exception as e: # the dataset's file is at fault, not our code: name the file
        raise UserError(f"{path} cannot be read ({type(e).__name__}: {first_line(e)}): prepare "
                        f"the dataset again with {prepare_command(data_dir)}") from None
    if not isinstance(vocab_size, int) or vocab_size < 1:
        raise UserError(f"{path}: vocab_size={vocab_size!r} is not a positive integer: prepare "
                        f"the dataset again with {prepare_command(data_dir)}")
    return meta


def check_token_files(data_dir, block_size, vocab_size, has_meta):
    """data_dir/{train,val}.bin exist, hold uint16 tokens, more than block_size of them,
    and none outside the vocabulary (else an IndexError on the CPU, a device-side assert on
    CUDA, mid-training). One pass over each file at memory speed (a 300 MB file takes
    milliseconds once cached). Each problem is a UserError that names the file and the fix."""
    meta_path = os.path.join(data_dir, 'meta.pkl')
    prepare = prepare_command(data_dir)
    if has_meta:
        vocab_source = f"vocab_size in {meta_path}"
        vocab_fix = (f"the .bin files and meta.pkl come from different preparations; prepare the "
                     f"dataset again with {prepare}")
    else:
        vocab_source = f"GPT-2's, padded, as there is no {meta_path}"
        vocab_fix = ("a dataset with another vocabulary needs a meta.pkl holding its vocab_size "
                     "beside the .bin files, as data/shakespeare_char/prepare.py writes")
    for split in ('train', 'val'):
        path = os.path.join(data_dir, f'{split}.bin')
        if not os.path.exists(path):
            raise UserError(f"dataset={os.path.basename(data_dir)!r}: {path} not found; prepare the dataset first "
                            f"with {prepare} (offline: add --input PATH/TO/input.txt)")
        n_bytes = os.path.getsize(path)
        if n_bytes % 2:
            raise UserError(f"{path} is {n_bytes} bytes, an odd number, so not a file of uint16 "
                            f"tokens (2 bytes each): it is truncated or not from prepare.py; "
                            f"prepare the dataset again with {prepare}")
        n_tokens = n_bytes // 2
        if n_tokens <= block_size:
            raise UserError(f"block_size={block_size}: {path} holds only {n_tokens} tokens; a "
                            f"training sequence needs block_size + 1 of them: lower block_size")
        largest_token = int(np.memmap(path, dtype=np.uint16, mode='r').max())
        if largest_token >= vocab_size:
            raise UserError(f"{path} holds token id {largest_token}, but the vocabulary has only "
                            f"{vocab_size} ids ({vocab_source}): {vocab_fix}")


def get_batch(data_dir, split, batch_size, block_size, generator, device='cpu', n_micro=1,
              rank=0, world_size=1):
    """n_micro micro-batches (x, y) of batch_size random windows of block_size tokens from
    data_dir/<split>.bin, y shifted by one, as a list. Under several processes every one draws
    the starts of the whole global batch (n_micro x world_size micro-batches) from `generator`
    and keeps its own share, so the generator advances alike everywhere and N processes see the
    micro-batches one process sees with N x accumulation."""
    # recreate np.memmap every batch to avoid a memory leak, as per
    # https://stackoverflow.com/a/61472122
    data = np.memmap(os.path.join(data_dir, f'{split}.bin'), dtype=np.uint16, mode='r')
    starts = torch.randint(len(data) - block_size, (n_micro * world_size, batch_size),
                           generator=generator)
    batches = []
    for row in starts[rank * n_micro:(rank + 1) * n_micro].tolist():
        x = torch.stack([torch.from_numpy(data[i:i+block_size].astype(np.int64)) for i in row])
        y = torch.stack([torch.from_numpy(data[i+1:i+1+block_size].astype(np.int64)) for i in row])
        if torch.device(device).type == 'cuda':
            # pin arrays x,y, which allows us to move them to GPU asynchronously
            x = x.pin_memory().to(device, non_blocking=True)
            y = y.pin_memory().to(device, non_blocking=True)
        else:
            x = x.to(device)
            y = y.to(device)
        batches.append((x, y))
    return batches
