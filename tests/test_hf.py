"""Into and out of Hugging Face transformers (hf.py, export_hf.py, train.py's init_from), without
any download: small random transformers models saved to temporary directories. GPT-2's weights
load as a GPT whose logits are transformers'; any exportable GPT, muP's multipliers and
CompleteP's included, becomes a transformers model with our logits and our greedy tokens; an
option with no counterpart, or no transformers, is one line and nothing written."""
import os
import sys

import pytest
import torch

import hf
from conftest import ROOT, TINY_TRAIN, ok, run_script, stops_with
from model import GPT, GPTConfig

transformers = pytest.importorskip('transformers') # a requirement (requirements.txt): present in CI


def saved_gpt2(directory, activation='gelu_new', vocab_size=100, seed=0):
    """A random transformers GPT-2 (2 layers, 64 wide), saved as save_pretrained saves GPT-2."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=vocab_size, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                     activation_function=activation)
    model = transformers.GPT2LMHeadModel(config).eval()
    model.save_pretrained(directory)
    return model


# ---- in: GPT-2's weights

@pytest.mark.parametrize('activation', ['gelu', 'gelu_new'])
def test_gpt2_weights_give_transformers_logits(tmp_path, activation):
    reference = saved_gpt2(tmp_path, activation)
    ours = hf.from_pretrained(str(tmp_path)).eval()
    assert ours.config.mlp == ('gelu' if activation == 'gelu' else 'gelu_tanh') and ours.config.bias
    x = torch.randint(100, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        difference = (ours(x, x)[0] - reference(x).logits).abs().max().item()
    assert difference <= 1e-5, difference # measured: 0.0 (gelu), 2.4e-7 (gelu_new)


def test_gpt2_weights_make_an_sp_model_or_mup_at_its_own_width(tmp_path):
    saved_gpt2(tmp_path)
    same = hf.from_pretrained(str(tmp_path), mup_base_width=64, dropout=0.1)
    assert same.config.width_mult == 1 and same.config.dropout == 0.1
    with pytest.raises(ValueError, match="mup_base_width=16: GPT-2's weights make an SP model"):
        hf.from_pretrained(str(tmp_path), mup_base_width=16)
    with pytest.raises(ValueError, match="pos_emb='rope': GPT-2's weights are for GPT-2's block"):
        hf.from_pretrained(str(tmp_path), pos_emb='rope')


def test_offline_gpt2_says_how_to_pass_a_directory(monkeypatch):
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True) # no network, at once
    with pytest.raises(ValueError, match=r"offline, save them .* and pass init_from=DIR"):
        hf.load_gpt2('gpt2-xl')


def test_init_from_a_gpt2_directory_trains_and_resumes(workdir, tmp_path):
    """config/finetune_shakespeare.py's way, on the tiny dataset: the architecture from the
    checkpoint (the run asked for another), the positions cropped to the run's block_size, one
    training step, a resume."""
    saved_gpt2(tmp_path / 'gpt2')
    out_dir = tmp_path / 'out'
    finetune = [f'{ROOT}/config/finetune_shakespeare.py', *TINY_TRAIN, f'--init_from={tmp_path / "gpt2"}', '--n_embd=64',
                '--n_head=4', '--n_layer=2', '--batch_size=2', '--gradient_accumulation_steps=1', '--eval_iters=2',
                '--eval_interval=2', f'--out_dir={out_dir}']
    out = ok(run_script('train.py', *finetune, '--max_iters=2', cwd=workdir, env={**os.environ, 'OMP_NUM_THREADS': '1'}))
    assert "initializing from" in out and "mlp='gelu_tanh'" in out and 'block_size=32' in out
    assert 'iter 1: loss' in out
    resumed = ok(run_script('train.py', *finetune, '--max_iters=4', '--init_from=resume', cwd=workdir))
    assert 'iter 4: loss' in resumed


# ---- out: every exportable GPT computes the same in transformers

EXPORTS = {
    'sp': ('GPT2LMHeadModel', dict()),
    'mup': ('GPT2LMHeadModel', dict(mup_base_width=16, mup_input_mult=1.5, mup_output_mult=2.0, mup_attn_mult=0.7)),
    'completep_untied': ('GPT2LMHeadModel', dict(mup_base_width=16, mup_base_depth=1, mup_input_mult=1.5,
                                                 mup_output_mult=2.0, mup_attn_mult=0.7, tie_weights=False,
                                                 bias=True, mlp='gelu_tanh')),
    'llama': ('LlamaForCausalLM', dict(pos_emb='rope', norm='rmsnorm', mlp='swiglu', n_kv_head=2, mup_base_width=16,
                                       mup_input_mult=1.5, mup_output_mult=2.0, mup_attn_mult=0.7)),
    'qwen3': ('Qwen3ForCausalLM', dict(pos_emb='rope', norm='rmsnorm', norm_gain=False, qk_norm=True, mlp='swiglu',
                                       n_kv_head=1, mup_base_width=16, mup_base_depth=1, mup_attn_mult=0.7,
                                       tie_weights=False)),
    'mixtral': ('MixtralForCausalLM', dict(pos_emb='rope', norm='rmsnorm', mlp='swiglu', n_kv_head=2, n_expert=4,
                                           n_expert_active=2, expert_width_mult=0.5, mup_base_width=16,
                                           mup_base_depth=1, mup_input_mult=1.5)),
    'qwen3_moe': ('Qwen3MoeForCausalLM', dict(pos_emb='rope', norm='rmsnorm', qk_norm=True, mlp='swiglu', n_expert=8,
                                              n_expert_active=3, expert_width_mult=0.75, mup_base_width=16, mup_attn_mult=0.7,
                                              tie_weights=False)),
}


def trained_like(seed=0, **settings):
    """A GPT (2 layers x 64, m = 4 where muP) whose weights moved off their init, as training
    leaves them (an untied readout at zero would hide its multiplier)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**dict(block_size=64, vocab_size=100, n_layer=2, n_head=4, n_embd=64, bias=False,
                                    init_std=0.1), **settings}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize('name', list(EXPORTS))
def test_exported_model_gives_our_logits_and_our_greedy_tokens(name):
    kind, settings = EXPORTS[name]
    ours = trained_like(**settings)
    theirs = hf.to_transformers(ours)
    assert type(theirs).__name__ == kind
    x = torch.randint(100, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        difference = (ours(x, x)[0] - theirs(x).logits).abs().max().item()
    assert difference <= 1e-5, difference # measured up to 8e-7
    prompt = x[:1, :8]
    expected = ours.generate(prompt, 50, temperature=0)
    generated = theirs.generate(prompt, max_new_tokens=50, do_sample=False)
    assert torch.equal(generated, expected)


@pytest.mark.parametrize('settings, named', [
    (dict(attn_mod='alibi'), "attn_mod='alibi'"),
    (dict(pos_emb='rope', norm='rmsnorm', mlp='relu2'), "mlp='relu2' with pos_emb='rope'"),
    (dict(qk_norm=True), "qk_norm=True with pos_emb='learned'"),
    (dict(n_kv_head=2), "n_kv_head=2 with pos_emb='learned'"),
    (dict(pos_emb='rope', norm='layernorm', mlp='swiglu'), "norm='layernorm' with pos_emb='rope'"),
    (dict(pos_emb='rope', norm='rmsnorm', mlp='swiglu', n_expert=4, n_shared_expert=1), 'n_shared_expert=1: Mixtral'),
    (dict(n_expert=4), "n_expert=4 with pos_emb='learned', norm='layernorm', mlp='gelu': transformers'"),
    (dict(pos_emb='rope', norm='rmsnorm', mlp='swiglu', n_expert=4, bias=False), 'expert width 85 is not a multiple of 8'),
])
def test_an_option_without_a_counterpart_is_named(settings, named):
    with pytest.raises(ValueError, match=named.replace('(', r'\(')):
        hf.target(GPTConfig(**{**dict(n_layer=2, n_head=4, n_embd=64), **settings}))


@pytest.fixture(scope='module')
def trained_mup(workdir):
    """A train.py run: muP at m = 2 with every multiplier away from 1, CompleteP, untied."""
    out_dir = workdir / 'out-export'
    ok(run_script('train.py', *TINY_TRAIN, '--mup_base_width=16', '--mup_base_depth=1', '--mup_input_mult=1.5',
                  '--mup_output_mult=2.0', '--mup_attn_mult=0.7', '--tie_weights=False', '--max_iters=10',
                  '--eval_interval=10', f'--out_dir={out_dir}', cwd=workdir))
    return out_dir


def exported_logits_difference(out_dir, hf_dir):
    """Max |logits of transformers on hf_dir - ours on out_dir's checkpoint|."""
    import checkpoints
    checkpoint = checkpoints.read(str(out_dir), 'cpu')
    ours = GPT(GPTConfig(**checkpoint['model_args']))
    checkpoints.load_model(checkpoint, str(out_dir), ours)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir)).eval()
    x = torch.randint(ours.config.vocab_size, (2, ours.config.block_size), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return (ours.eval()(x, x)[0] - theirs(x).logits).abs().max().item()


def test_export_hf_writes_a_transformers_directory(workdir, trained_mup, tmp_path):
    hf_dir = tmp_path / 'hf'
    out = ok(run_script('export_hf.py', f'--out_dir={trained_mup}', f'--hf_dir={hf_dir}', cwd=workdir))
    assert f"wrote {hf_dir}: GPT2LMHeadModel, safetensors, without a tokenizer" in out
    assert sorted(os.listdir(hf_dir)) == ['config.json', 'generation_config.json', 'model.safetensors']
    assert exported_logits_difference(trained_mup, hf_dir) <= 1e-5
    assert not [name for name in os.listdir(tmp_path) if name.startswith('.export_')]


def test_export_of_an_unexportable_checkpoint_is_one_line_and_writes_nothing(workdir, tmp_path):
    out_dir = tmp_path / 'out'
    ok(run_script('train.py', *TINY_TRAIN, '--attn_mod=alibi', '--max_iters=2', '--eval_interval=2',
                  f'--out_dir={out_dir}', cwd=workdir))
    proc = run_script('export_hf.py', f'--out_dir={out_dir}', f'--hf_dir={tmp_path / "hf"}', cwd=workdir)
    assert proc.returncode != 0 and 'Traceback' not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: {out_dir / 'ckpt.pt'}: attn_mod='alibi': transformers' "
                                                f"GPT-2, Llama and Qwen3 attend causally only; a model with another "
                                                f"mask or score cannot be exported"]
    assert sorted(os.listdir(tmp_path)) == ['out']


def test_export_without_transformers_says_how_to_install_it(workdir, trained_mup, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, 'transformers', None) # import transformers raises ImportError
    line = stops_with('export_hf.py', f'--out_dir={trained_mup}', f'--hf_dir={tmp_path / "hf"}', cwd=workdir,
                      monkeypatch=monkeypatch)
    assert line.endswith("this needs Hugging Face transformers: pip install transformers safetensors")
    assert not os.listdir(tmp_path)


def test_export_refuses_an_existing_directory(workdir, trained_mup, tmp_path, monkeypatch):
    (tmp_path / 'hf').mkdir()
    line = stops_with('export_hf.py', f'--out_dir={trained_mup}', f'--hf_dir={tmp_path / "hf"}', cwd=workdir,
                      monkeypatch=monkeypatch)
    assert "exists: pass a new directory" in line
