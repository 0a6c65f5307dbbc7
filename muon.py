"""
Muon (Keller Jordan, 2024): SGD with Nesterov momentum whose update for each matrix is replaced by
the nearest semi-orthogonal matrix, found by a Newton-Schulz iteration.

The math is torch.optim.Muon's (torch 2.9+) step for step: the momentum buffer as an exponential
average, Nesterov's look-ahead, the quintic Newton-Schulz iteration with its coefficients and
5 steps, the 'original' lr adjustment sqrt(max(1, fan_out / fan_in)), and decoupled weight decay
lr * wd. Two things differ, and they are why this file exists:
- torch's Muon casts every matrix to bfloat16 for Newton-Schulz. On a CPU without bf16 matmul
  instructions (AVX2 only) that made one training step 10x slower than in fp32. Here the
  iteration runs in the dtype the device is fast in: bf16 on CUDA and on CPUs with AVX-512 BF16
  or AMX, fp32 elsewhere (`ns_dtype` overrides).
- The orthogonalization is one function, `orthogonalize`, always applied to a whole matrix: under
  FSDP (each process holding rows of a matrix, a DTensor) the update is gathered, orthogonalized
  whole on every process, and each keeps its own rows (`orthogonalize_whole`). The orthogonal
  factor of a shard is not a shard of the orthogonal factor: torch's Muon, which orthogonalizes
  each process's shard, trains another model there (tests/test_fsdp.py).
Why Muon's lr needs no 1/m under muP: docs/mup.md, Muon.
"""

import math

import torch

# Keller Jordan's quintic coefficients (also torch.optim.Muon's): they maximize the slope at
# zero, so 5 steps bring every singular value into roughly [0.7, 1.2], which trains as well as
# exactly 1 would.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
NS_EPS = 1e-7


def orthogonalize(matrix, dtype, steps=NS_STEPS, coefficients=NS_COEFFICIENTS, eps=NS_EPS):
    """An approximation of U V^T, where matrix = U S V^T is the SVD, computed in `dtype`.

    The Frobenius normalization puts every singular value in [0, 1], where the iteration
    x -> a x + b x^3 + c x^5 pushes it towards 1. It runs on the wide orientation, so the Gram
    matrix X X^T is the smaller square."""
    a, b, c = coefficients
    x = matrix.to(dtype)
    tall = matrix.size(0) > matrix.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        polynomial = torch.addmm(gram, gram, gram, beta=b, alpha=c)  # b X X^T + c (X X^T)^2
        x = torch.addmm(x, polynomial, x, beta=a)  # a X + (b X X^T + c (X X^T)^2) X
    if tall:
        x = x.T
    return x


def orthogonalize_each(update, dtype):
    """orthogonalize(update) for a matrix; for a stack of them (n_expert, fan_out, fan_in), each
    expert's matrix on its own."""
    if update.dim() == 3:
        return torch.stack([orthogonalize(matrix, dtype) for matrix in update])
    return orthogonalize(update, dtype)


def orthogonalize_whole(update, dtype):
    """orthogonalize_each(update), on the whole matrix also when `update` is sharded across
    processes (an FSDP DTensor): gathered, orthogonalized on every process (the same result
    everywhere), and cut back to this process's rows without communication. Each process holds
    one full matrix at a time and does all the Newton-Schulz work (docs/mup.md, Muon)."""
    if hasattr(update, 'full_tensor'): # a DTensor; its module is imported only where there are some
        from torch.distributed.tensor import distribute_tensor
        whole = orthogonalize_each(update.full_tensor(), dtype)
        return distribute_tensor(whole, update.device_mesh, update.placements, src_data_rank=None)
    return orthogonalize_each(update, dtype)


def update_scale(shape):
    """Keller Jordan's lr adjustment for a (fan_out, fan_in) matrix (or a stack of them, the
    experts': the last two dims): an orthogonal update has RMS 1/sqrt(max(fan_out, fan_in)); this
    keeps the per-coordinate change of the layer's output the same for tall matrices. It does not
    grow with width at a fixed aspect ratio, which is what lets Muon's lr transfer across width
    without a 1/m (docs/mup.md, Muon)."""
    fan_out, fan_in = shape[-2:]
    return math.sqrt(max(1.0, fan_out / fan_in))


def cpu_has_bf16_matmul():
    """Whether this CPU multiplies bf16 matrices in hardware (AVX-512 BF16 or AMX). Without it a
    bf16 matmul is emulated: 26.6 ms against 0.51 ms in fp32 for 256^3 on an AVX2-only EPYC.
    Asked of the hardware, not timed, so that a run and its resume always pick the same dtype."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def default_ns_dtype(device):
    """The dtype Newton-Schulz runs in: bf16 where the device has fast bf16 matmuls (CUDA, and
    CPUs with bf16 instructions, where torch's Muon's choice is the faster one), fp32 elsewhere."""
    if device.type == 'cuda':
        return torch.bfloat16
    if device.type == 'cpu' and cpu_has_bf16_matmul():
        return torch.bfloat16
    return torch.float32


class Muon(torch.optim.Optimizer):
    """Muon for 2-d parameters (the hidden matrices) and 3-d stacks of them (a mixture of
    experts' (n_expert, fan_out, fan_in), each expert orthogonalized on its own). The other
    parameters belong on AdamW.

    ns_dtype: the dtype of the Newton-Schulz iteration; None picks default_ns_dtype(device) for
    each parameter. With ns_dtype=torch.bfloat16 the step equals torch.optim.Muon's with
    adjust_lr_fn='original' (tested)."""

    def __init__(self, params, lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True,
                 ns_dtype=None):
        if not 0.0 <= lr:
            raise ValueError(f"Muon: lr={lr} must be >= 0")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"Muon: momentum={momentum} must be in [0, 1)")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Muon: weight_decay={weight_decay} must be >= 0")
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov)
        super().__init__(params, defaults)
        self.ns_dtype = ns_dtype
        for group in self.param_groups:
            for p in group['params']:
                if p.dim() not in (2, 3):
                    raise ValueError(f"Muon steps matrices (or stacks of them) only, got a parameter of "
                                     f"shape {tuple(p.shape)}: put it on AdamW")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum = group['lr'], group['momentum']
            for p in group['params']:
                if p.grad is None:
                    continue
                state = self.state[p]
                if 'momentum_buffer' not in state:
                    state['momentum_buffer'] = torch.zeros_like(p.grad)
                buffer = state['momentum_buffer']
                buffer.lerp_(p.grad, 1 - momentum)  # an exponential average of the gradients
                if group['nesterov']:
                    update = p.grad.lerp(buffer, momentum)  # look one momentum step ahead
                else:
                    update = buffer
                ns_dtype = self.ns_dtype or default_ns_dtype(p.device)
                update = orthogonalize_whole(update, ns_dtype)
                p.mul_(1 - lr * group['weight_decay'])  # decoupled, as AdamW
                p.add_(update, alpha=-lr * update_scale(p.shape))
        return loss
