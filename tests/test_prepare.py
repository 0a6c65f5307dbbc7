import json
import os
import pickle
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tiktoken

ROOT = Path(__file__).resolve().parents[1]
CHAR_SCRIPT = ROOT / 'data' / 'shakespeare_char' / 'prepare.py'
BPE_SCRIPT = ROOT / 'data' / 'shakespeare' / 'prepare.py'

# a few KB of text; the non-ASCII characters check the file is read as UTF-8
TEXT = "".join(
    f"ROMEO:\nLine {i}: but soft, what light through yonder window breaks?\n\n"
    f"JULIET:\nO Romeo, Romeo! wherefore art thou Romeo? (café, naïve {i * 7})\n\n"
    for i in range(40)
)


@pytest.fixture
def input_file(tmp_path):
    path = tmp_path / 'input.txt'
    path.write_text(TEXT, encoding='utf-8')
    return path


def run_script(script, input_file, out_dir):
    result = subprocess.run(
        [sys.executable, str(script), '--input', str(input_file), '--out_dir', str(out_dir)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def read_bin(path):
    # the training loop reads these with np.memmap(dtype=np.uint16), so that is what we check
    return np.fromfile(path, dtype=np.uint16)


def test_char_level(input_file, tmp_path):
    out_dir = tmp_path / 'out'
    stdout = run_script(CHAR_SCRIPT, input_file, out_dir)
    with open(out_dir / 'meta.pkl', 'rb') as f:
        meta = pickle.load(f)
    chars = sorted(set(TEXT))
    assert meta['vocab_size'] == len(chars)
    assert meta['itos'] == dict(enumerate(chars))
    assert meta['stoi'] == {c: i for i, c in enumerate(chars)}

    train, val = read_bin(out_dir / 'train.bin'), read_bin(out_dir / 'val.bin')
    split = int(len(TEXT) * 0.9)
    assert len(train) == split and len(val) == len(TEXT) - split
    assert ''.join(meta['itos'][i] for i in train) == TEXT[:split]
    assert ''.join(meta['itos'][i] for i in val) == TEXT[split:]
    assert f"vocab size: {len(chars)}" in stdout
    assert f"train has {split:,} tokens" in stdout


def test_gpt2_bpe(input_file, tmp_path):
    out_dir = tmp_path / 'out'
    stdout = run_script(BPE_SCRIPT, input_file, out_dir)
    assert sorted(p.name for p in out_dir.iterdir()) == ['train.bin', 'val.bin']

    enc = tiktoken.get_encoding('gpt2')
    train, val = read_bin(out_dir / 'train.bin'), read_bin(out_dir / 'val.bin')
    split = int(len(TEXT) * 0.9)
    assert enc.decode(train.tolist()) == TEXT[:split]
    assert enc.decode(val.tolist()) == TEXT[split:]
    assert train.tolist() == enc.encode_ordinary(TEXT[:split])
    assert f"train has {len(train):,} tokens" in stdout


@pytest.mark.parametrize('script', [CHAR_SCRIPT, BPE_SCRIPT])
def test_failed_download_says_to_use_input(script, tmp_path, offline):
    prepare = runpy.run_path(str(script))['prepare']
    with pytest.raises(RuntimeError, match=r"--input PATH"):
        prepare(out_dir=str(tmp_path))
    assert not (tmp_path / 'input.txt').exists()


@pytest.mark.parametrize('script', [CHAR_SCRIPT, BPE_SCRIPT])
def test_existing_input_in_out_dir_is_reused(script, input_file, offline):
    # input_file is <out_dir>/input.txt, as a previous download would have left it
    prepare = runpy.run_path(str(script))['prepare']
    prepare(out_dir=str(input_file.parent))
    assert (input_file.parent / 'train.bin').exists()


OWT_SCRIPT = ROOT / 'data' / 'openwebtext' / 'prepare.py'


def test_openwebtext_ids_decode_back_to_the_documents(tmp_path):
    """A small local dataset in the hub's layout (jsonl, a 'text' column), through the datasets
    loader as the real one goes: every document, followed by GPT-2's end-of-text token, lands in
    exactly one of train.bin and val.bin, and decodes back to itself."""
    documents = [f"Document {i}: <|endoftext|> is text here, café {'word ' * (i % 7)}" for i in range(400)]
    data = tmp_path / 'owt.jsonl'
    data.write_text(''.join(json.dumps({'text': text}) + '\n' for text in documents))
    out_dir = tmp_path / 'out'
    env = {**os.environ, 'HF_HOME': str(tmp_path / 'hf')} # the datasets cache, not the user's
    result = subprocess.run([sys.executable, str(OWT_SCRIPT), f'--input={data}', f'--out_dir={out_dir}',
                             '--num_proc=1', '--val_fraction=0.05'], capture_output=True, text=True,
                            timeout=300, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in out_dir.iterdir()) == ['train.bin', 'val.bin']
    enc = tiktoken.get_encoding('gpt2')
    splits = {}
    for split in ('train', 'val'):
        ids = read_bin(out_dir / f'{split}.bin').tolist()
        assert ids[-1] == enc.eot_token
        # split the ids at the special token: a document's own '<|endoftext|>' is ordinary text
        documents_here, current = [], []
        for token in ids:
            if token == enc.eot_token:
                documents_here.append(enc.decode(current))
                current = []
            else:
                current.append(token)
        splits[split] = documents_here
    assert len(splits['val']) == 20 # 5 % of 400
    assert sorted(splits['train'] + splits['val']) == sorted(documents)
