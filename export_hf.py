"""
Export a train.py checkpoint as a Hugging Face transformers model directory: safetensors weights,
config.json, and for a GPT-2 BPE dataset the tokenizer's files. SP or muP at any width, CompleteP,
tied or untied, a whole or an FSDP-sharded checkpoint: muP's constants are folded into the weights
(hf.py), so transformers, lm-evaluation-harness or vLLM compute what this project computed.

$ python export_hf.py --out_dir=out-shakespeare-mup --hf_dir=hf-shakespeare-mup
$ python -c "import transformers; print(transformers.pipeline('text-generation', model='hf-gpt2')('Hello')"
$ lm_eval --model hf --model_args pretrained=hf-gpt2 --tasks lambada_openai

GPT-2's block becomes GPT2LMHeadModel; RoPE + RMSNorm + SwiGLU (any n_kv_head) LlamaForCausalLM, and
with QK-norm Qwen3ForCausalLM. A setting none of them has (an attention mod, your attention class,
ReLU^2 with RoPE, ...) stops with one line that names it, and nothing is written: --hf_dir appears
only once it is complete.
"""

import base64
import os
import shutil
import sys
import tempfile

import torch

import checkpoints
import hf
from configurator import configure
from data import read_meta
from errors import UserError

# -----------------------------------------------------------------------------
out_dir = 'out' # the train.py out_dir holding ckpt.pt (and the shard directory it names, under FSDP), or a checkpoint file in it
hf_dir = '' # the directory to write; it must not exist yet
# -----------------------------------------------------------------------------


def gpt2_tokenizer():
    """GPT-2's BPE as a transformers tokenizer, built from tiktoken's encoding (no download but
    tiktoken's own, or TIKTOKEN_CACHE_DIR): the tokens this project's GPT-2 data was encoded with."""
    import tiktoken
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.tiktoken import TikTokenConverter
    encoding = tiktoken.get_encoding('gpt2')
    with tempfile.TemporaryDirectory() as work:
        ranks = os.path.join(work, 'gpt2.tiktoken')
        with open(ranks, 'w') as f:
            for token, rank in encoding._mergeable_ranks.items():
                f.write(f"{base64.b64encode(token).decode()} {rank}\n")
        converted = TikTokenConverter(vocab_file=ranks, pattern=encoding._pat_str,
                                      extra_special_tokens=encoding._special_tokens).converted()
    end = '<|endoftext|>'
    return PreTrainedTokenizerFast(tokenizer_object=converted, eos_token=end, bos_token=end, unk_token=end)


def export(out_dir, hf_dir):
    """Write hf_dir from out_dir's checkpoint; returns (the transformers class, whether a tokenizer
    was written). Every check comes before the first byte is written; the files go to a temporary
    directory beside hf_dir, renamed to it when complete."""
    if not hf_dir:
        raise UserError("hf_dir is not set: pass --hf_dir=<a new directory>")
    if os.path.exists(hf_dir):
        raise UserError(f"hf_dir={hf_dir!r} exists: pass a new directory (nothing is overwritten)")
    model, checkpoint = checkpoints.load_run(out_dir, 'cpu', attn_backend='auto')
    try:
        hf.target(model.config) # an option with no transformers counterpart stops here
        hf.transformers_module()
    except ValueError as e:
        raise UserError(f"{checkpoints.checkpoint_file(out_dir)}: {e}") from None
    exported = hf.to_transformers(model.float())
    dataset = checkpoint.get('config', {}).get('dataset', '')
    tokenizer = gpt2_tokenizer() if dataset and read_meta(os.path.join('data', dataset)) is None else None
    parent = os.path.dirname(os.path.abspath(hf_dir))
    work = tempfile.mkdtemp(prefix='.export_', dir=parent)
    try:
        exported.save_pretrained(work, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(work)
        os.rename(work, hf_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return type(exported).__name__, tokenizer is not None


if __name__ == '__main__':
    configure(globals(), sys.argv[1:])
    torch.manual_seed(0)
    name, with_tokenizer = export(out_dir, hf_dir)
    what = "with GPT-2's tokenizer" if with_tokenizer else "without a tokenizer (the dataset's is char-level: meta.pkl)"
    print(f"wrote {hf_dir}: {name}, safetensors, {what}")
