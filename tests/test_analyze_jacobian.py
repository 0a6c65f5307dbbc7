"""analyze_jacobian.py: the two backward rules, the statistics' zero-norm conventions, the capture
through the model's attention, the data/checkpoint plumbing, and a tiny end-to-end run."""
import dataclasses
import json
import math
import re

import matplotlib.image
import pytest
import torch

import analyze_jacobian as aj
import checkpoints
from conftest import make_gpt, tokens
from errors import UserError
from model import GPT, MuPFlexAttention

TINY = dict(block_size=16, n_layer=2, n_head=2, n_embd=32)


def make(seed=0, **kw):
    return make_gpt(seed, **{**TINY, **kw})


def causal_mask(B, H, T):
    return torch.ones(T, T, dtype=torch.bool).tril().expand(B, H, T, T)


# ---- the backward rules

def test_g_full_is_autograds_softmax_backward():
    gen = torch.Generator().manual_seed(0)
    mask = causal_mask(2, 3, 8)
    s = (3 * torch.randn(2, 3, 8, 8, generator=gen)).masked_fill(~mask, float('-inf')).requires_grad_()
    g = torch.randn(2, 3, 8, 8, generator=gen)
    A = torch.softmax(s, dim=-1)
    A.backward(g)
    g_full = aj.softmax_backward(A.detach(), g)
    assert (g_full - s.grad).abs().max() <= 1e-6
    assert (g_full[~mask] == 0).all()
    # and the diagonal rule is really something else (else this test would prove little)
    assert (aj.diagonal_backward(A.detach(), g) - s.grad).abs().max() > 0.1


def test_rules_are_the_jacobian_and_its_diagonal():
    gen = torch.Generator().manual_seed(1)
    s, g = torch.randn(6, generator=gen, dtype=torch.float64), torch.randn(6, generator=gen, dtype=torch.float64)
    J = torch.autograd.functional.jacobian(lambda t: torch.softmax(t, -1), s) # J[i, j] = dA_i / ds_j
    A = torch.softmax(s, -1)
    torch.testing.assert_close(aj.softmax_backward(A, g), J.T @ g, rtol=0, atol=1e-12)
    torch.testing.assert_close(aj.diagonal_backward(A, g), J.diagonal() * g, rtol=0, atol=1e-12)


def test_two_key_row_by_hand():
    # A = [1/2, 1/2], g = [1, 0]: g_full = [1/4, -1/4], g_diag = [1/4, 0]
    A = torch.tensor([0.5, 0.5]).view(1, 1, 1, 2)
    g = torch.tensor([1.0, 0.0]).view(1, 1, 1, 2)
    stats = aj.attention_stats(A, g, torch.ones(1, 1, 1, 2, dtype=torch.bool))
    expected = {'mean_A': 0.5, 'entropy': math.log(2), 'r_diag': 0.5, '1-r_diag': 0.5,
                'cos_diag': 1 / math.sqrt(2), 'cos_ste': 1 / math.sqrt(2)}
    assert list(stats) == list(expected)
    for name, value in expected.items():
        assert stats[name].item() == pytest.approx(value, abs=1e-7), name


def test_one_hot_rows_give_zero_g_full_and_nan_free_stats():
    B, H, T = 2, 2, 8
    mask = causal_mask(B, H, T)
    gen = torch.Generator().manual_seed(2)
    A = torch.eye(T).expand(B, H, T, T).clone() # head 0: every query attends only to itself
    A[:, 1] = mask[:, 1] / mask[:, 1].sum(-1, keepdim=True) # head 1: uniform over the causal keys
    g = torch.randn(B, H, T, T, generator=gen)
    assert (aj.softmax_backward(A[:, 0], g[:, 0]) == 0).all()
    stats = aj.attention_stats(A, g, mask)
    for name, values in stats.items():
        assert torch.isfinite(values).all(), name
    # one-hot: both rules give exactly 0, so the diagonal rule is exact; straight-through is not
    assert stats['r_diag'][0] == 1 and stats['cos_diag'][0] == 1 and stats['cos_ste'][0] == 0
    assert stats['entropy'][0] == 0
    # uniform causal rows: entropy is the mean of log(q + 1)
    assert stats['entropy'][1].item() == pytest.approx(sum(math.log(q + 1) for q in range(T)) / T, rel=1e-6)
    assert 0 < stats['r_diag'][1] < 1 and -1 <= stats['cos_diag'][1] < 1
    # g on masked entries (dL/dA is defined there too) takes no part in any statistic
    noisy = aj.attention_stats(A, g + 100 * ~mask, mask)
    for name in stats:
        torch.testing.assert_close(noisy[name], stats[name], rtol=0, atol=1e-12)


# ---- the capture through the model's own attention

@pytest.mark.parametrize('attn_mod', ['causal', 'sliding_window:4', 'alibi'])
def test_captured_probs_match_the_model_forward(attn_mod):
    model = make(attn_mod=attn_mod)
    x, y = tokens(T=16), tokens(T=16, seed=2)
    with torch.no_grad():
        logits, loss = model.eval()(x, y)
    diag_loss, layers = aj.capture_attention(model, x, y)
    assert diag_loss == pytest.approx(loss.item(), abs=1e-5) # capture mode computes the same model
    B, T = x.shape
    q, k = torch.arange(T).view(T, 1), torch.arange(T).view(1, T)
    allowed = (q >= k) & (q - k < 4) if attn_mod.startswith('sliding_window') else q >= k
    for A, g, mask in layers:
        assert A.shape == g.shape == mask.shape == (B, TINY['n_head'], T, T)
        assert (mask == allowed).all()
        assert (A[~mask] == 0).all() # masked entries are exactly 0
        torch.testing.assert_close(A.sum(-1), torch.ones(B, TINY['n_head'], T), rtol=0, atol=1e-5)
        assert torch.isfinite(g).all() and g[mask].abs().max() > 0
    # the capture ran on a copy: the model itself got no gradients
    assert all(p.grad is None for p in model.parameters())


def test_captured_gradient_is_dloss_dprobs_by_finite_differences():
    """g = A.grad must be dL/dA: nudge one probability of the last layer by +-eps (adding
    eps * v[key] to that query's output) and compare the change of the loss."""
    class Nudged(aj.capturing(MuPFlexAttention)):
        nudge = 0.0
        def attend(self, q, k, v, mask):
            out = super().attend(q, k, v, mask)
            out[0, 1, 5] = out[0, 1, 5] + self.nudge * v[0, 1, 2] # A[0, 1, 5, 2] += nudge
            return out
    model = make(attn_backend='dense').double()
    x, y = tokens(T=16), tokens(T=16, seed=2)
    _, layers = aj.capture_attention(model, x, y)
    nudged = GPT(model.config, Nudged).double()
    nudged.load_state_dict(model.state_dict())
    eps, losses = 1e-5, []
    for sign in (1, -1):
        nudged.transformer.h[-1].attn.nudge = sign * eps
        losses.append(nudged(x, y)[1].item())
    g = layers[-1][1]
    assert g[0, 1, 5, 2].abs() > 1e-4
    assert (losses[0] - losses[1]) / (2 * eps) == pytest.approx(g[0, 1, 5, 2].item(), rel=1e-4)


def test_capture_works_whatever_backend_was_configured():
    # the capturing copy computes A densely, even when the config names sdpa; the captured A
    # must be what the sdpa model computes
    x, y = tokens(T=16), tokens(T=16, seed=2)
    loss_sdpa = make(attn_backend='sdpa')(x, y)[1].item()
    loss, layers = aj.capture_attention(make(attn_backend='sdpa'), x, y)
    assert abs(loss - loss_sdpa) < 1e-5
    assert all(A is not None and g is not None for A, g, mask in layers)


def test_checkpoint_is_loaded_with_a_backend_that_captures(tmp_path):
    model = make(attn_backend='sdpa')
    args = dataclasses.asdict(model.config) # as train.py saves them
    torch.save({'model': model.state_dict(), 'model_args': args, 'iter_num': 3}, tmp_path / 'ckpt.pt')
    loaded, checkpoint = checkpoints.load_run(str(tmp_path), 'cpu', setting='ckpt')
    assert checkpoints.trained_on(checkpoint) == 'shakespeare_char' # a checkpoint without train.py's config
    for (name, p), q in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(p, q), name
    from_file, _ = checkpoints.load_run(str(tmp_path / 'ckpt.pt'), 'cpu', setting='ckpt') # the file itself
    assert all(torch.equal(p, q) for p, q in zip(loaded.state_dict().values(), from_file.state_dict().values()))
    loss, stats = aj.analyze(loaded, tokens(T=16), tokens(T=16, seed=2))
    assert stats['cos_diag'].shape == (TINY['n_layer'], TINY['n_head'])
    with pytest.raises(UserError, match="ckpt='.*nowhere': no checkpoint at .*train.py run"):
        checkpoints.load_run(str(tmp_path / 'nowhere'), 'cpu', setting='ckpt')


def test_ckpt_refuses_training_settings():
    config = dict(aj._TRAINING_DEFAULTS, batch_size=32, attn_mod='alibi', device='cpu', out='unused',
                  ckpt='some_out_dir')
    with pytest.raises(ValueError, match='drop --attn_mod'):
        aj.main(config)


# ---- data preparation

TEXT = "".join(f"ROMEO:\nLine {i}: but soft, what light through yonder window breaks?\n\n" for i in range(60))


def test_unprepared_data_offline_fails_with_the_prepare_command(tmp_path, offline):
    with pytest.raises(RuntimeError, match=r"python \S*data/shakespeare_char/prepare\.py --input PATH/TO/input\.txt"):
        aj.ensure_data(str(tmp_path))


# ---- end to end

def test_end_to_end_tiny_run(tmp_path, capsys):
    data_dir = tmp_path / 'data'
    data_dir.mkdir()
    (data_dir / 'input.txt').write_text(TEXT) # prepare.py reuses it: no download
    vocab_size = aj.ensure_data(str(data_dir))
    assert vocab_size == len(set(TEXT))
    model = make(vocab_size=vocab_size)
    results = aj.run(model, str(data_dir), steps=3, batch_size=4, device='cpu', out=str(tmp_path / 'out'))
    printed = capsys.readouterr().out
    L, H, T = TINY['n_layer'], TINY['n_head'], TINY['block_size']
    assert 'diagonal-only backward' in printed and 'verdict:' in printed
    with open(tmp_path / 'out' / 'jacobian.json') as f:
        saved = json.load(f)
    assert saved['metrics'] == results['metrics'] and saved['steps'] == 3
    assert math.isfinite(saved['train_loss']) and math.isfinite(saved['diag_loss'])
    metrics = {name: torch.tensor(values) for name, values in saved['metrics'].items()}
    for values in metrics.values():
        assert values.shape == (L, H) and torch.isfinite(values).all()
    # the printed table shows the saved numbers, a row per (layer, head)
    rows = {tuple(map(int, line.split()[:2])): [float(v) for v in line.split()[2:]]
            for line in printed.splitlines() if re.match(r'\s+\d+\s+\d+\s', line)}
    assert sorted(rows) == [(l, h) for l in range(L) for h in range(H)]
    for (l, h), values in rows.items():
        assert values == pytest.approx([metrics[name][l, h].item() for name in metrics], abs=6e-5)
    assert ((metrics['entropy'] > 0) & (metrics['entropy'] <= math.log(T))).all() # nats, at most uniform
    torch.testing.assert_close(metrics['mean_A'], torch.full((L, H), 2 / (T + 1))) # rows sum to 1 over the causal keys
    # one heatmap cell per (layer, head): the figure is sized by L and H
    image = matplotlib.image.imread(tmp_path / 'out' / 'jacobian.png')
    assert image.shape[:2] == (round((1.5 + 0.6 * L) * 120), round((4 + 1.6 * H) * 120))
