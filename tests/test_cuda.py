"""Checks that need a CUDA device, where flex attention has a backward: deselected by default
(pytest.ini); run them on a GPU machine with `python -m pytest -q -m cuda`."""
import pytest
import torch

from bench import CATALOG
from model import GPTConfig, MuPFlexAttention

pytestmark = pytest.mark.cuda

B, T, N_HEAD, N_EMBD = 2, 256, 4, 256


def layer_grads(spec, backend, device):
    """{'input' or parameter name: gradient} of one attention layer of attn_mod `spec` on `backend`,
    for a fixed input and a fixed random weighting of its output. The input's std is 3, so that the
    scores are large enough for every catalog mod to matter: on the dense backend (CPU) each mod
    changes these gradients by 0.18 (soft_cap:20) to 1.2 of the largest, against causal attention;
    at std 1 soft_cap:20 changes them by 6e-5, and a backend ignoring it would pass."""
    torch.manual_seed(0)
    attn = MuPFlexAttention(GPTConfig(block_size=T, n_head=N_HEAD, n_embd=N_EMBD, attn_mod=spec,
                                      attn_backend=backend)).to(device)
    g = torch.Generator().manual_seed(1)
    x = (3 * torch.randn(B, T, N_EMBD, generator=g)).to(device).requires_grad_()
    weights = torch.randn(B, T, N_EMBD, generator=g).to(device)
    (attn(x, attn.make_mask(B, T, device)) * weights).sum().backward()
    return {'input': x.grad, **{name: p.grad for name, p in attn.named_parameters()}}


@pytest.mark.parametrize('spec', CATALOG)
def test_flex_gradients_equal_dense_gradients(spec, monkeypatch):
    """Flex's fused backward against the dense reference, float32 with TF32 off (the kernels' math,
    not TF32's rounding), for every catalog mod: input and every parameter. Each difference is
    taken over the layer's largest gradient: the key bias's own gradient is zero up to rounding
    (it shifts every score of a row alike), so a per-tensor ratio would compare noise with noise.
    Float32 rounding at this input size: 1e-6 (dense float32 against float64, CPU); flex against
    dense at std 1 on an H200 (bench.py before this test): 1e-7 to 6.5e-6."""
    monkeypatch.setattr(torch.backends.cuda.matmul, 'allow_tf32', False)
    device = torch.device('cuda')
    dense, flex = layer_grads(spec, 'dense', device), layer_grads(spec, 'flex', device)
    assert set(flex) == set(dense)
    largest = max(grad.abs().max() for grad in dense.values())
    diffs = {name: ((flex[name] - dense[name]).abs().max() / largest).item() for name in dense}
    assert max(diffs.values()) < 1e-3, diffs
