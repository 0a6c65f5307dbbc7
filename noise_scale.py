"""
The critical batch of a trained run, from its gradient noise scale (McCandlish et al. 2018, "An
Empirical Model of Large-Batch Training", arXiv 1812.06162, appendix A). Past the critical batch
a larger batch stops buying fewer steps: train.py's critical_batch_tokens bounds the batch rule
there (transfer.py; docs/mup.md, "Beyond width and depth").

With G the true gradient and S = tr(Σ) the per-sequence gradient noise, a batch of B sequences
has E|G_B|² = |G|² + S / B. Measured at a small and a big batch, the two unbiased estimates
    |G|² = (B_big |G_big|² - B_small |G_small|²) / (B_big - B_small)
    S    = (|G_small|² - |G_big|²) / (1 / B_small - 1 / B_big)
are averaged over `draws` batches each, and the simple noise scale B_simple = S / |G|² (in
sequences, times block_size in tokens) estimates the critical batch. It is the plain
gradient's (SGD's) noise scale; Adam's preconditioning weighs the parameters otherwise. It
falls as the loss falls early on and grows late: measure it on the proxy at the end of its run.

$ python noise_scale.py --ckpt=out-proxy                  # the proxy's out_dir (or its ckpt.pt)
$ python noise_scale.py --ckpt=out-proxy --draws=50 --big_batch=128
"""

import sys

import torch

import checkpoints
from configurator import configure, resolve_device
from data import get_batch
from errors import UserError

# -----------------------------------------------------------------------------
# ---- settings, each overridable with --key=value
ckpt = ''        # the run: its out_dir or a checkpoint file in it
small_batch = 4  # sequences in the small batch
big_batch = 64   # sequences in the big batch
draws = 20       # batches of each size: the estimates are averaged over them
split = 'train'  # the token file the batches come from
seed = 1337
device = 'auto'  # 'auto' (cuda > mps > cpu), 'cpu', 'cuda', ...
# -----------------------------------------------------------------------------


def squared_gradient_norm(model, x, y):
    """|dL/dθ|² over every parameter, L the mean loss of the batch (x, y)."""
    model.zero_grad(set_to_none=True)
    _, loss = model(x, y)
    loss.backward()
    return sum(p.grad.double().pow(2).sum().item() for p in model.parameters() if p.grad is not None)


def noise_scale(small, big, small_batch, big_batch):
    """(B_simple in sequences, |G|², S) from the mean |G_B|² of the small and the big batches."""
    gradient = (big_batch * big - small_batch * small) / (big_batch - small_batch)
    noise = (small - big) / (1 / small_batch - 1 / big_batch)
    return noise / gradient, gradient, noise


if __name__ == '__main__':
    configure(globals(), sys.argv[1:])
    if not ckpt:
        raise UserError("ckpt is not set: pass a train.py run, --ckpt=OUT_DIR (its out_dir or its ckpt.pt)")
    if not 0 < small_batch < big_batch:
        raise UserError(f"small_batch={small_batch}, big_batch={big_batch}: need 0 < small_batch < big_batch")
    device = resolve_device(device)
    model, checkpoint = checkpoints.load_run(ckpt, device, setting='ckpt')
    model.eval() # no dropout: the noise measured is the data's
    data_dir = checkpoints.data_dir_of(checkpoint, ckpt, split)
    block_size = model.config.block_size
    generator = torch.Generator().manual_seed(seed)
    mean_squared_norm = lambda batch: sum(
        squared_gradient_norm(model, *get_batch(data_dir, split, batch, block_size, generator, device)[0])
        for _ in range(draws)) / draws
    sequences, gradient, noise = noise_scale(mean_squared_norm(small_batch), mean_squared_norm(big_batch),
                                             small_batch, big_batch)
    config = checkpoint.get('config', {})
    run_batch = config.get('batch_size', 0) * config.get('gradient_accumulation_steps', 1) * block_size
    print(f"|G|^2 = {gradient:.4g}, tr(Sigma) = {noise:.4g} per sequence ({draws} draws of {small_batch} and "
          f"{big_batch} sequences of {block_size} tokens, from {data_dir}/{split}.bin)")
    if gradient <= 0:
        print("the gradient's estimate is not positive: the noise swamps it; raise draws or big_batch")
        sys.exit(1)
    print(f"B_simple = {sequences:.1f} sequences = {sequences * block_size:,.0f} tokens a step "
          f"(the run trained at {run_batch:,}): pass --critical_batch_tokens={round(sequences * block_size)}")
