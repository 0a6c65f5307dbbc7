"""
Benchmarks, nanoGPT-bench style: median time of a training step (forward, backward, AdamW)
after warm-up, tokens/s and MFU, for every attention backend that applies and for SP vs muP;
an attention-only benchmark of every mod of the catalog across sequence lengths; and, with
--modes, generation with and without the KV cache, train.py under torchrun with DDP and FSDP,
and CUDA-only runs.
Rows are timed in interleaved rounds, so a change in machine load hits all of them alike and
the ratios stay fair. Prints tables and writes everything to `out_file` (JSON).

$ python bench.py                                   # training steps and attention, this machine
$ python bench.py --attn_mod=alibi --compile=both   # a score_mod model; eager vs torch.compile
$ python bench.py --modes=attention --seq_lens=256  # attention only
$ python bench.py --modes=train --optimizers=adamw,muon  # a training step with AdamW and with Muon
$ python bench.py --modes=decode                    # generation: KV cache vs recompute, tokens/s
$ python bench.py --modes=distributed               # train.py under torchrun: DDP vs FSDP, 2 and 4 processes
$ python bench.py --modes=gpu                       # CUDA only: flex vs flash, GPT-2 124M training (compile, bf16) and generation
"""

import functools
import itertools
import json
import os
import re
import runpy
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace

import torch
from torch.nn import functional as F
from torch.nn.attention.flex_attention import flex_attention

from configurator import (DTYPES, autocast, configure, device_peak_flops, model_config, model_settings, require,
                          resolve_device, resolve_dtype)
from errors import UserError, first_line
from attn_mods import ATTN_MODS, parse_attn_mod
from generate import KVCache, cache_slides
from model import GPT, GPTConfig, MuPFlexAttention

# -----------------------------------------------------------------------------
modes = ('train', 'attention') # any of 'train', 'attention', 'block', 'decode', 'distributed', 'gpu' (CUDA only)
# ---- the model of the training-step benchmark: every field of model.GPTConfig is a setting, at
# its default there but for these (its comment there is its --help), and the rows set two
# themselves: the backend and muP's base width
batch_size = 8 # sequences per step, of random tokens
vocab_size = 65 # shakespeare_char's vocabulary
globals().update(model_settings('attn_backend', 'mup_base_width', n_layer=4, n_head=6, n_embd=384,
                                block_size=256, bias=False))
attn_backend = 'all' # 'all' (every backend that applies here) or one of 'auto', 'sdpa', 'flex', 'dense'
parameterization = 'both' # 'sp', 'mup' or 'both'
mup_base_width = 96 # the muP rows: muP relative to this width (a multiple of n_head), SP otherwise
compile = 'False' # 'False', 'True' or 'both': torch.compile the model (train) and attend() (attention); rows say which
optimizers = ('adamw',) # the training-step rows' optimizers, any of 'adamw', 'muon' (Muon for the hidden matrices)
# the attention-only benchmark: (batch_size, n_head, T, n_embd // n_head) inputs, every catalog mod
seq_lens = (64, 256, 1024)
# the generation benchmark (modes=decode): a 4 x 192 model (4 heads), batch 1, greedy, per
# block size and mod, with the KV cache and recomputing the context
decode_block_sizes = (1024, 128) # 128: the main job's; 1000 tokens pass it, so the cache re-prefills
decode_mods = ('causal', 'alibi') # alibi: a score_mod, on the dense backend off CUDA
# the blocks of the generation rows: GPT-2's (learned positions: a full cache is prefilled anew),
# RoPE (the cache slides), RoPE with a quarter of the key/value heads (GQA: a quarter of the cache)
decode_blocks = ('gpt2', 'rope', 'rope+gqa')
decode_prompt = 16
decode_tokens = 1000
# the distributed benchmark (modes=distributed): train.py on config/shakespeare_mup.py's model
# under torchrun, DDP and FSDP, one micro-batch per process (data/shakespeare_char prepared)
distributed_procs = (2, 4)
distributed_iters = 20
# the GPU benchmarks (modes=gpu)
gpu_batch_size = 12 # GPT-2 124M as nanoGPT trains it: 12 x 1024 tokens per micro-batch
# timing
warmup = 3 # untimed steps per row first (compilation, mask building, allocator warm-up)
iters = 10 # timed steps per row; the median is reported
device = 'auto' # 'auto' (cuda > mps > cpu), 'cpu', 'cuda', ...
dtype = 'auto' # 'auto': as train.py (bfloat16 on CUDA where supported, float16 on older GPUs, float32 elsewhere)
seed = 1337
out_file = 'bench.json'
# -----------------------------------------------------------------------------

# every mod of the catalog, with an example argument where it takes one
CATALOG = ('causal', 'sliding_window:128', 'prefix_lm:32', 'alibi', 'alibi:learned', 'soft_cap:20')
BACKENDS = ('auto', 'sdpa', 'flex', 'dense')


class DirectSDPA(MuPFlexAttention):
    """The reference the backends are measured against: causal attention that calls SDPA and
    nothing else (no backend choice, no mask, no mods), with the same muP logit scale."""
    def make_mask(self, B, T, device, q_offset=0): # training steps only: q_offset is always 0
        return None

    def attend(self, q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale,
                                              dropout_p=self.dropout if self.training else 0.0)


def catalog_specs():
    missing = set(ATTN_MODS) - {parse_attn_mod(spec)[0] for spec in CATALOG}
    if missing:
        raise ValueError(f"catalog mods {sorted(missing)} are not benchmarked: add them to bench.CATALOG")
    return CATALOG


def trains_here(spec, backend, device):
    """Whether `backend` can run a training step of a layer of attn_mod `spec` on `device`, as the
    model decides: the layer refuses SDPA for anything but plain causal attention, and flex trains
    where 'auto' picks it for a layer with a mod (CUDA: flex has no backward on CPU)."""
    def layer(spec, backend):
        return MuPFlexAttention(GPTConfig(block_size=1, n_head=1, n_embd=1, attn_mod=spec, attn_backend=backend))
    try:
        layer(spec, backend).resolve_backend(device)
    except ValueError:
        return False
    return backend != 'flex' or layer('alibi', 'auto').resolve_backend(device) == 'flex'


def synchronize(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def time_interleaved(fns, device, warmup, iters):
    """{name: [milliseconds per round]} of calling each fn: after `warmup` untimed calls each, the
    fns are called in turn for `iters` rounds, so slow phases of a shared machine hit every row
    alike (compare rows with `paired_ratio`)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            synchronize(device)
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(1e3 * (time.perf_counter() - t0))
    return times


def paired_ratio(times, reference):
    """Median over rounds of time / reference time in the same round: a load change between
    rounds cancels, unlike in a ratio of medians."""
    return statistics.median(t / r for t, r in zip(times, reference))


# ---- training steps

def train_rows(cfg, backends, parameterizations, compiles, batch_size, device, ptdtype, base_width, opts=('adamw',)):
    """One row per (backend, parameterization, compile, optimizer). Backend 'sdpa-direct' is DirectSDPA."""
    rows = []
    for backend in backends:
        for param in parameterizations:
            for compiled in compiles:
                for opt in opts:
                    rows.append(dict(backend=backend, param=param, compile=compiled, optimizer=opt,
                                     label=f"{backend}/{param}" + ("/compiled" if compiled else "") +
                                           ("/muon" if opt == 'muon' else "")))
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(cfg.vocab_size, (batch_size, cfg.block_size + 1), generator=g).to(device)
    x, y = data[:, :-1].contiguous(), data[:, 1:].contiguous()
    ctx = autocast(device, ptdtype)
    steps, models = {}, {}
    for row in rows:
        direct = row['backend'] == 'sdpa-direct'
        row_cfg = replace(cfg, attn_backend='auto' if direct else row['backend'],
                          attn_mod='causal' if direct else cfg.attn_mod,
                          mup_base_width=base_width if row['param'] == 'mup' else 0)
        torch.manual_seed(seed)
        model = GPT(row_cfg, DirectSDPA if direct else MuPFlexAttention).to(device)
        optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), device.type, optimizer=row['optimizer'])
        scaler = torch.amp.GradScaler(device.type, enabled=ptdtype == torch.float16)
        step_model = torch.compile(model) if row['compile'] else model
        row['resolved'] = 'sdpa (direct)' if direct else model.transformer.h[0].attn.resolve_backend(device)

        def step(step_model=step_model, optimizer=optimizer, scaler=scaler, row=row):
            with ctx:
                _, loss = step_model(x, y)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if 'first_loss' not in row: # same seed and data: for plain causal, every backend's must agree
                row['first_loss'] = loss.item()
        steps[row['label']], models[row['label']] = step, model
    times = time_interleaved(steps, device, warmup, iters)
    peak = device_peak_flops(device, ptdtype)
    for row in rows:
        row['times_ms'], model = times[row['label']], models[row['label']]
        row['ms_per_step'] = statistics.median(row['times_ms'])
        row['tokens_per_s'] = batch_size * cfg.block_size / (row['ms_per_step'] / 1e3)
        row['mfu'] = model.estimate_mfu(batch_size, row['ms_per_step'] / 1e3, peak)
        row.update(mask_overheads(model, batch_size, cfg.block_size, device))
        row['mask_pct'] = 100 * row['mask_ms'] / row['ms_per_step']
    return rows, peak


def mask_overheads(model, B, T, device, repeats=20):
    """What one training step spends on attention masks, as GPT.forward gets them: one per
    pattern, built once for masks that read no data (then fetched), every step for the others.
    The first fetch, which builds, is before the timing, as in a training run's later steps."""
    patterns = {block.attn.pattern: block.attn for block in model.transformer.h}
    for attn in patterns.values():
        model.mask_for(attn, B, T, device)
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        for attn in patterns.values():
            model.mask_for(attn, B, T, device)
    synchronize(device)
    return dict(mask_ms=1e3 * (time.perf_counter() - t0) / repeats)


def train_ratios(rows):
    """The ratios the targets are stated in, from rows timed side by side (paired by round)."""
    by = {(r['backend'], r['param'], r['compile'], r['optimizer']): r for r in rows}
    ratios = {'mup_over_sp': {}, 'over_direct_sdpa': {}, 'compiled_over_eager': {}, 'muon_over_adamw': {}}
    for (backend, param, compiled, opt), r in by.items():
        name = backend + ("/compiled" if compiled else "") + ("/muon" if opt == 'muon' else "")
        vs = lambda key: paired_ratio(r['times_ms'], by[key]['times_ms'])
        if param == 'mup' and (backend, 'sp', compiled, opt) in by:
            ratios['mup_over_sp'][name] = vs((backend, 'sp', compiled, opt))
        if backend != 'sdpa-direct' and ('sdpa-direct', param, compiled, opt) in by:
            ratios['over_direct_sdpa'][f"{name}/{param}"] = vs(('sdpa-direct', param, compiled, opt))
        if compiled and (backend, param, False, opt) in by:
            ratios['compiled_over_eager'][f"{name}/{param}"] = vs((backend, param, False, opt))
        if opt == 'muon' and (backend, param, compiled, 'adamw') in by:
            ratios['muon_over_adamw'][f"{backend}/{param}" + ("/compiled" if compiled else "")] = \
                vs((backend, param, compiled, 'adamw'))
    return {k: v for k, v in ratios.items() if v}


def print_train(rows, ratios):
    print(f"\n{'backend':<13}{'runs on':<15}{'param':<6}{'compile':<9}{'optim':<7}{'ms/step':>9}{'tokens/s':>10}"
          f"{'MFU':>8}{'loss@0':>9}{'mask/step':>14}")
    for r in rows:
        print(f"{r['backend']:<13}{r['resolved']:<15}{r['param']:<6}{str(r['compile']):<9}{r['optimizer']:<7}{r['ms_per_step']:9.1f}"
              f"{r['tokens_per_s']:10.0f}{100 * r['mfu']:7.1f}%{r['first_loss']:9.4f}{r['mask_ms']:7.3f}ms"
              f" {r['mask_pct']:5.2f}%")
    for name, values in ratios.items():
        print(f"{name}: " + ", ".join(f"{k} {v:.3f}" for k, v in values.items()))


# ---- attention only

def fwd_bwd(attend, q, k, v, grad_out):
    """A function running attend(q, k, v) forward and backward."""
    def run():
        q.grad = k.grad = v.grad = None
        attend(q, k, v).backward(grad_out)
    return run


def attention_rows(specs, seq_lens, B, n_head, head_dim, device, ptdtype, backends, compiles):
    """Forward + backward of attend() for every mod, backend, compile choice and T, against causal
    SDPA (called directly, eager) at the same T."""
    rows = []
    for T in seq_lens:
        g = torch.Generator().manual_seed(seed)
        q, k, v = (torch.randn(B, n_head, T, head_dim, generator=g).to(device, ptdtype).requires_grad_()
                   for _ in range(3))
        grad_out = torch.randn(B, n_head, T, head_dim, generator=g).to(device, ptdtype)
        fns = {'sdpa-direct': fwd_bwd(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                                      q, k, v, grad_out)}
        rows.append(dict(mod='causal', backend='sdpa-direct', T=T))
        for spec in specs:
            for backend in (b for b in backends if trains_here(spec, b, device)):
                cfg = GPTConfig(block_size=T, n_head=n_head, n_embd=n_head * head_dim, attn_mod=spec,
                                attn_backend=backend)
                attn = MuPFlexAttention(cfg).to(device, ptdtype)
                mask = attn.make_mask(B, T, device) # GPT.mask_for builds it once per length: not timed here
                for compiled in compiles:
                    name = backend + ('+compile' if compiled else '')
                    attend = torch.compile(attn.attend) if compiled else attn.attend
                    fns[f"{spec} {name}"] = fwd_bwd(lambda q, k, v, attend=attend, mask=mask: attend(q, k, v, mask),
                                                    q, k, v, grad_out)
                    rows.append(dict(mod=spec, backend=name, T=T))
        times = time_interleaved(fns, device, warmup, iters)
        for row, t in zip(rows[-len(fns):], times.values()):
            row['fwd_bwd_ms'] = statistics.median(t)
            row['over_sdpa_causal'] = paired_ratio(t, times['sdpa-direct'])
    return rows


def print_attention(rows):
    lens = sorted({r['T'] for r in rows})
    print("\nattention forward+backward, ms (x causal SDPA at the same T)")
    print(f"{'mod':<20}{'backend':<15}" + "".join(f"{'T=' + str(T):>18}" for T in lens))
    for key in dict.fromkeys((r['mod'], r['backend']) for r in rows):
        cells = {r['T']: r for r in rows if (r['mod'], r['backend']) == key}
        print(f"{key[0]:<20}{key[1]:<15}" + "".join(
            f"{cells[T]['fwd_bwd_ms']:10.2f} ({cells[T]['over_sdpa_causal']:4.2f})" if T in cells else f"{'-':>18}"
            for T in lens))


# ---- the modern block beside GPT-2's

def modern_block():
    """The block settings of the main job (config/shakespeare_mup.py, the modern block), read from
    the config file itself."""
    keys = ('pos_emb', 'rope_base', 'norm', 'norm_gain', 'qk_norm', 'mlp', 'n_kv_head', 'tie_weights')
    recipe = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'config',
                                         'shakespeare_mup.py'))
    return {key: recipe[key] for key in keys if key in recipe}


def block_rows(device, ptdtype):
    """The training step of the modern main job's block beside GPT-2's and beside the modern block
    with a mixture of experts at its active parameters (8 experts, top-2, each half the MLP's
    width), at the main job's shape (its CPU model: 4 x 192, batch 16 x 128, muP base width 64;
    AdamW for all), timed interleaved. Returns the rows and the ratios of the median step times
    {'modern / GPT-2', 'MoE / modern'}."""
    base = GPTConfig(block_size=128, vocab_size=vocab_size, n_layer=4, n_head=4, n_embd=192, bias=False,
                     dropout=0.0, mup_base_width=64)
    modern = replace(base, **modern_block())
    blocks = {'gpt2': base, 'modern': modern, 'moe': replace(modern, n_expert=8, n_expert_active=2)}
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(vocab_size, (16, 129), generator=g).to(device)
    x, y = data[:, :-1].contiguous(), data[:, 1:].contiguous()
    ctx = autocast(device, ptdtype)
    steps = {}
    for name, cfg in blocks.items():
        torch.manual_seed(seed)
        model = GPT(cfg).to(device)
        optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), device.type)

        def step(model=model, optimizer=optimizer):
            with ctx:
                _, loss = model(x, y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        steps[name] = step
    times = time_interleaved(steps, device, warmup, iters)
    rows = [dict(block=name, settings={k: v for k, v in vars(cfg).items() if getattr(base, k) != v},
                 ms_per_step=statistics.median(times[name])) for name, cfg in blocks.items()]
    ratios = {'modern / GPT-2': paired_ratio(times['modern'], times['gpt2']),
              'MoE / modern': paired_ratio(times['moe'], times['modern'])}
    return rows, ratios


def print_blocks(rows, ratios):
    print(f"\n{'block':<8}{'ms/step':>9}  settings")
    for r in rows:
        print(f"{r['block']:<8}{r['ms_per_step']:9.1f}  {r['settings'] or 'GPT-2 (learned positions, LayerNorm, GELU)'}")
    for name, ratio in ratios.items():
        print(f"{name} step time: {ratio:.3f} (median of the paired per-round ratios)")


# ---- generation

DECODE_BLOCKS = {'gpt2': dict(), 'rope': dict(pos_emb='rope'), 'rope+gqa': dict(pos_emb='rope', n_kv_head=1)}


def decode_rows(block_sizes, mods, prompt_len, new_tokens, device, ptdtype, n_layer=4, n_head=4, n_embd=192,
                backends=('auto',), blocks=('gpt2',)):
    """Tokens/s of greedy generation of `new_tokens` after a `prompt_len`-token prompt, batch 1, with
    the KV cache and recomputing the (cropped) context every step, side by side for every block size,
    mod, backend and block (DECODE_BLOCKS), with the KV cache's size. Both give the same tokens within
    block_size (tests/test_kv_cache.py); past it the cache of a RoPE model slides, the others are
    prefilled anew (tests/test_modern_block.py)."""
    rows = []
    ctx = autocast(device, ptdtype)
    for block, spec, backend, block_name in itertools.product(block_sizes, mods, backends, blocks):
        cfg = GPTConfig(block_size=block, vocab_size=vocab_size, n_layer=n_layer, n_head=n_head,
                        n_embd=n_embd, bias=False, attn_mod=spec, attn_backend=backend,
                        **DECODE_BLOCKS[block_name])
        torch.manual_seed(seed)
        model = GPT(cfg).to(device).eval()
        prompt = torch.randint(vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(seed))
        prompt = prompt.to(device)
        slots = KVCache(n_layer, block, cache_slides(model)).capacity # a sliding cache has 2 blocks
        row = dict(block_size=block, mod=spec, block=block_name,
                   backend=model.transformer.h[0].attn.resolve_backend(device),
                   cache_mb=2 * n_layer * cfg.kv_heads * slots * cfg.head_dim * ptdtype.itemsize / 2**20)
        for path, kv_cache in (('cached', True), ('recompute', False)):
            with ctx:
                model.generate(prompt, 8, temperature=0, kv_cache=kv_cache) # warm-up
                synchronize(device)
                t0 = time.perf_counter()
                model.generate(prompt, new_tokens, temperature=0, kv_cache=kv_cache)
                synchronize(device)
            row[f'{path}_tokens_per_s'] = new_tokens / (time.perf_counter() - t0)
        row['speedup'] = row['cached_tokens_per_s'] / row['recompute_tokens_per_s']
        rows.append(row)
        print_decode([row], header=len(rows) == 1)
    return rows


def print_decode(rows, header=True):
    if header:
        print(f"\n{'block':>6}  {'mod':<10}{'model':<10}{'backend':<9}{'cache MB':>9}{'cached tok/s':>14}"
              f"{'recompute tok/s':>17}{'speedup':>9}")
    for r in rows:
        print(f"{r['block_size']:>6}  {r['mod']:<10}{r['block']:<10}{r['backend']:<9}{r['cache_mb']:9.2f}"
              f"{r['cached_tokens_per_s']:14.1f}{r['recompute_tokens_per_s']:17.1f}{r['speedup']:8.1f}x", flush=True)


# ---- DDP and FSDP

def distributed_rows(procs, iters, device):
    """Median ms/iter (iterations 5 on) and the training state per process (parameters and
    optimizer state, as train.py prints it) of train.py under torchrun with DDP and with FSDP,
    for each number of processes, one after the other (the runs cannot be interleaved)."""
    train_py = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'train.py')
    rows = []
    for n in procs:
        for parallel in ('ddp', 'fsdp'):
            with tempfile.TemporaryDirectory() as out_dir:
                command = [sys.executable, '-m', 'torch.distributed.run', '--standalone',
                           f'--nproc_per_node={n}', train_py, 'config/shakespeare_mup.py',
                           f'--max_iters={iters}', '--eval_interval=100000', '--eval_iters=1',
                           '--log_interval=1', f'--gradient_accumulation_steps={n}',
                           f'--fsdp={parallel == "fsdp"}', f'--device={device.type}',
                           f'--out_dir={out_dir}']
                proc = subprocess.run(command, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"{' '.join(command)} failed:\n{proc.stderr[-2000:]}")
            times = [float(ms) for it, ms in re.findall(r'^iter (\d+): loss \S+, time ([\d.]+)ms',
                                                        proc.stdout, flags=re.M) if int(it) >= 5]
            memory = re.search(r'parameters ([\d.]+) MB, optimizer state ([\d.]+) MB', proc.stdout)
            rows.append(dict(processes=n, parallel=parallel, ms_per_iter=statistics.median(times),
                             parameters_mb=float(memory[1]), optimizer_state_mb=float(memory[2])))
    return rows


def print_distributed(rows):
    print(f"\n{'processes':>9}  {'parallel':<9}{'ms/iter':>9}{'params MB':>11}{'optim MB':>10}  (per process)")
    for r in rows:
        print(f"{r['processes']:>9}  {r['parallel']:<9}{r['ms_per_iter']:9.1f}{r['parameters_mb']:11.2f}"
              f"{r['optimizer_state_mb']:10.2f}")


# ---- GPU only

def gpu_benchmarks(device, ptdtype):
    """Flex vs flash (causal, T=1024, bf16, fwd+bwd), flex on its Triton kernel (what the model
    runs) and on the FLASH backend where this torch has it; GPT-2 124M tokens/s and MFU with
    compile and bf16, SP and muP, auto (flash) and flex, causal and sliding_window:256. (That
    flex's gradients equal dense's is a test: tests/test_cuda.py.)"""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    results = {}
    B, H, T, D = gpu_batch_size, 12, 1024, 64
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, D, generator=g).to(device, torch.bfloat16).requires_grad_() for _ in range(3))
    grad_out = torch.randn(B, H, T, D, generator=g).to(device, torch.bfloat16)
    flex = MuPFlexAttention(GPTConfig(block_size=T, n_head=H, n_embd=H * D, attn_backend='flex')).to(device)
    def flash(q, k, v):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION): # fail rather than time another kernel
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=flex.scale)
    mask = flex.make_mask(B, T, device)
    block_mask = mask.data
    fns = {'flash': fwd_bwd(flash, q, k, v, grad_out),
           'flex': fwd_bwd(lambda q, k, v: flex.attend(q, k, v, mask), q, k, v, grad_out)}
    # the FLASH backend needs flash-attn's CuTe kernels installed: try it, and say why not
    flex_flash_backend = torch.compile(functools.partial(
        flex_attention, block_mask=block_mask, scale=flex.scale, kernel_options={'BACKEND': 'FLASH'}))
    try:
        out = flex_flash_backend(q, k, v)
        out.backward(grad_out) # the backward too: it may be the part this torch lacks
        difference = (out - flex.attend(q, k, v, mask)).abs().max().item()
        fns['flex FLASH backend'] = fwd_bwd(flex_flash_backend, q, k, v, grad_out)
        flash_backend_note = f"max |output difference| from flex's Triton kernel {difference:.3g}"
    except Exception as e: # whatever torch raises when the backend cannot be used here
        flash_backend_note = f"not available: {type(e).__name__}: {first_line(e)[:200]}"
    times = time_interleaved(fns, device, warmup, iters)
    results['flex_vs_flash'] = dict(B=B, H=H, T=T, head_dim=D, dtype='bfloat16', flex_flash_backend=flash_backend_note,
                                    **{f'{name}_ms': statistics.median(t) for name, t in times.items()},
                                    **{f'{name}_over_flash': paired_ratio(t, times['flash'])
                                       for name, t in times.items() if name != 'flash'})
    print(f"\ncausal attention fwd+bwd, B={B} H={H} T={T} bf16 (x flash, paired):")
    for name, t in times.items():
        ratio = '' if name == 'flash' else f" ({paired_ratio(t, times['flash']):.2f}x)"
        print(f"  {name:<20}{statistics.median(t):8.3f} ms{ratio}")
    print(f"  flex FLASH backend: {flash_backend_note}")

    gpt2 = GPTConfig(block_size=1024, vocab_size=50304, n_layer=12, n_head=12, n_embd=768, bias=False)
    # auto is flash attention here; muP relative to a 4x narrower base (192 = 12 heads of 16)
    for mod, backends in [('causal', ['auto', 'flex']), ('sliding_window:256', ['flex'])]:
        rows, peak = train_rows(replace(gpt2, attn_mod=mod), backends, ['sp', 'mup'], [True], gpu_batch_size,
                                device, ptdtype, 192)
        results[f'gpt2_124m {mod}'] = dict(rows=rows, peak_flops=peak, ratios=train_ratios(rows))
        print(f"\nGPT-2 124M, {mod}, batch {gpu_batch_size} x 1024, compiled, {ptdtype}:")
        print_train(rows, results[f'gpt2_124m {mod}']['ratios'])
    print(f"\nGPT-2 124M generation, 200 tokens after 16, batch 1, eager, {ptdtype}:")
    results['gpt2_124m_decode'] = decode_rows([1024], ['causal', 'sliding_window:256'], 16, 200, device, ptdtype,
                                              n_layer=12, n_head=12, n_embd=768, backends=('sdpa', 'flex'))
    return results


def check_settings():
    """A setting bench.py does not know: a UserError, which configure() reports in one line."""
    unknown = [m for m in modes if m not in ('train', 'attention', 'block', 'decode', 'distributed', 'gpu')]
    if unknown or not modes:
        raise UserError(f"modes={','.join(modes)}: choose from 'train', 'attention', 'block', 'decode', "
                          f"'distributed', 'gpu', e.g. --modes=train,attention")
    if not decode_blocks or any(b not in DECODE_BLOCKS for b in decode_blocks):
        raise UserError(f"decode_blocks={','.join(decode_blocks)}: choose from {', '.join(DECODE_BLOCKS)}")
    for spec in decode_mods:
        try:
            parse_attn_mod(spec)
        except ValueError as e:
            raise UserError(f"decode_mods: {e}") from None
    if not optimizers or any(o not in ('adamw', 'muon') for o in optimizers):
        raise UserError(f"optimizers={','.join(optimizers)}: choose from 'adamw', 'muon', e.g. --optimizers=adamw,muon")
    if attn_backend != 'all' and attn_backend not in BACKENDS:
        raise UserError(f"attn_backend={attn_backend!r}: use 'all' or one of {BACKENDS}")
    if parameterization not in ('sp', 'mup', 'both'):
        raise UserError(f"parameterization={parameterization!r}: use 'sp', 'mup' or 'both'")
    if compile not in ('False', 'True', 'both'):
        raise UserError(f"compile={compile!r}: use False, True or both")
    if warmup < 1 or iters < 1:
        raise UserError(f"warmup={warmup}, iters={iters}: both must be >= 1 (warm-up builds masks and compiles)")
    try:
        parse_attn_mod(attn_mod)
    except ValueError as e: # the message names the setting and its valid values
        raise UserError(str(e)) from None


if __name__ == '__main__':
    config = configure(globals(), sys.argv[1:])
    check_settings()
    require(config, 'dtype', dtype in DTYPES, "'auto', 'float32', 'bfloat16' or 'float16'")
    device = torch.device(resolve_device(device))
    if attn_backend != 'all' and 'train' in modes and not trains_here(attn_mod, attn_backend, device):
        applies = [b for b in BACKENDS if trains_here(attn_mod, b, device)]
        raise UserError(f"attn_backend={attn_backend} cannot train attn_mod={attn_mod} on {device.type}: use "
                          f"--attn_backend=all or one of {applies}")
    if 'gpu' in modes and device.type != 'cuda':
        raise UserError(f"modes=gpu needs a CUDA device (flex's fused kernels, flash attention, bf16 GPT-2 "
                          f"124M), but this run is on {device.type}: run the gpu mode on a machine with a "
                          f"GPU, or drop it from --modes")
    ptdtype = resolve_dtype(dtype, device) # as train.py trains
    dtype = str(ptdtype).removeprefix('torch.')
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    compiles = {'False': [False], 'True': [True], 'both': [False, True]}[compile]

    report = dict(settings=config, environment=dict(
        device=torch.cuda.get_device_name(device) if device.type == 'cuda' else device.type,
        dtype=dtype, torch=torch.__version__, threads=torch.get_num_threads(), cpu_count=os.cpu_count(),
        load_average_start=os.getloadavg(), # and the allocator settings, which move the dense rows on CPU:
        allocator_env={k: v for k, v in os.environ.items() if k.startswith('MALLOC_') or k == 'LD_PRELOAD'}))
    print(f"device {report['environment']['device']}, {dtype}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, load average {report['environment']['load_average_start'][0]:.2f}")

    if 'train' in modes:
        # each row sets its backend and parameterization
        cfg = model_config(config, vocab_size=vocab_size, attn_backend='auto', mup_base_width=0)
        backends = [b for b in BACKENDS if trains_here(attn_mod, b, device)] if attn_backend == 'all' else [attn_backend]
        params = ['sp', 'mup'] if parameterization == 'both' else [parameterization]
        rows, peak = train_rows(cfg, ['sdpa-direct'] + backends, params, compiles, batch_size, device, ptdtype,
                                mup_base_width, optimizers)
        report['environment']['peak_flops'] = peak
        report['train'] = rows
        report['ratios'] = train_ratios(rows)
        print(f"\ntraining steps: {n_layer} layers, {n_head} heads, n_embd {n_embd}, batch {batch_size} x "
              f"{block_size}, attn_mod {attn_mod}; MFU against {peak / 1e9:.1f} GFLOP/s")
        print_train(rows, report['ratios'])

    if 'attention' in modes:
        report['attention'] = attention_rows(catalog_specs(), seq_lens, batch_size, n_head, n_embd // n_head,
                                             device, ptdtype, ('sdpa', 'dense', 'flex'), compiles)
        print_attention(report['attention'])

    if 'block' in modes:
        print("\nthe modern main job's block beside GPT-2's: 4 x 192, batch 16 x 128, muP (base 64), AdamW")
        report['block'], report['block_ratios'] = block_rows(device, ptdtype)
        print_blocks(report['block'], report['block_ratios'])

    if 'decode' in modes:
        print(f"\ngeneration: {decode_tokens} tokens after a {decode_prompt}-token prompt, batch 1, greedy, "
              f"4 x 192 (4 heads)")
        report['decode'] = decode_rows(decode_block_sizes, decode_mods, decode_prompt, decode_tokens, device,
                                       ptdtype, blocks=decode_blocks)

    if 'distributed' in modes:
        print(f"\ntrain.py config/shakespeare_mup.py under torchrun, one micro-batch per process, "
              f"{distributed_iters} iterations, on {device.type}")
        report['distributed'] = distributed_rows(distributed_procs, distributed_iters, device)
        print_distributed(report['distributed'])

    if 'gpu' in modes:
        report['gpu'] = gpu_benchmarks(device, ptdtype)

    report['environment']['load_average_end'] = os.getloadavg()
    with open(out_file, 'w') as f:
        json.dump(report, f, indent=1)
    print(f"\nwrote {out_file}")
