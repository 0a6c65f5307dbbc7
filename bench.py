"""
Benchmarks, nanoGPT-bench style: median time of a training step (forward, backward, AdamW)
after warm-up, tokens/s and MFU, for every attention backend that applies and for SP vs muP;
and an attention-only benchmark of every mod of the catalog across sequence lengths.
Rows are timed in interleaved rounds, so a change in machine load hits all of them alike and
the ratios stay fair. Prints tables and writes everything to `out_file` (JSON).

$ python bench.py                                   # training steps and attention, this machine
$ python bench.py --attn_mod=alibi --compile=both   # a score_mod model; eager vs torch.compile
$ python bench.py --modes=attention --seq_lens=256  # attention only
$ python bench.py --modes=train --optimizers=adamw,muon  # a training step with AdamW and with Muon
$ python bench.py --modes=gpu                       # CUDA only: flex vs flash, flex vs dense
                                                    # gradients, GPT-2 124M with compile and bf16
"""

import contextlib
import io
import json
import os
import statistics
import sys
import time
from dataclasses import replace

import torch
from torch.nn import functional as F

from configurator import configure
from attn_mods import ATTN_MODS, parse_attn_mod
from model import GPT, GPTConfig, MuPFlexAttention, device_peak_flops

# -----------------------------------------------------------------------------
modes = ('train', 'attention') # any of 'train', 'attention', 'gpu' (CUDA only)
# the model of the training-step benchmark (shakespeare_char's vocabulary; random tokens)
batch_size = 8
block_size = 256
vocab_size = 65
n_layer = 4
n_head = 6
n_embd = 384
bias = False
attn_mod = 'causal'
attn_backend = 'all' # 'all' (every backend that applies here) or one of 'auto', 'sdpa', 'flex', 'dense'
parameterization = 'both' # 'sp', 'mup' or 'both'
mup_base_width = 96 # the muP rows: muP relative to this width (a multiple of n_head), SP otherwise
compile = 'False' # 'False', 'True' or 'both': torch.compile the model (train) and attend() (attention); rows say which
optimizers = ('adamw',) # the training-step rows' optimizers, any of 'adamw', 'muon' (Muon for the hidden matrices)
# the attention-only benchmark: (batch_size, n_head, T, n_embd // n_head) inputs, every catalog mod
seq_lens = (64, 256, 1024)
# the GPU checks (modes=gpu)
gpu_batch_size = 12 # GPT-2 124M as nanoGPT trains it: 12 x 1024 tokens per micro-batch
# timing
warmup = 3 # untimed steps per row first (compilation, mask building, allocator warm-up)
iters = 10 # timed steps per row; the median is reported
device = 'auto' # 'auto' (cuda > mps > cpu), 'cpu', 'cuda', ...
dtype = 'auto' # 'auto': bfloat16 on CUDA where supported, float32 elsewhere
seed = 1337
out_file = 'bench.json'
# -----------------------------------------------------------------------------

# every mod of the catalog, with an example argument where it takes one
CATALOG = ('causal', 'sliding_window:128', 'prefix_lm:32', 'alibi', 'alibi:learned', 'soft_cap:20')
BACKENDS = ('auto', 'sdpa', 'flex', 'dense')


class DirectSDPA(MuPFlexAttention):
    """The reference the backends are measured against: causal attention that calls SDPA and
    nothing else (no backend choice, no mask, no mods), with the same muP logit scale."""
    def make_mask(self, B, T, device):
        return None

    def attend(self, q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale,
                                              dropout_p=self.dropout if self.training else 0.0)


def catalog_specs():
    missing = set(ATTN_MODS) - {parse_attn_mod(spec)[0] for spec in CATALOG}
    if missing:
        raise ValueError(f"catalog mods {sorted(missing)} are not benchmarked: add them to bench.CATALOG")
    return CATALOG


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


def quietly(fn, *args, **kwargs):
    """GPT and configure_optimizers print their sizes and groups: keep them out of the tables."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kwargs)


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
    ctx = (contextlib.nullcontext() if ptdtype == torch.float32
           else torch.amp.autocast(device_type=device.type, dtype=ptdtype))
    steps, models = {}, {}
    for row in rows:
        direct = row['backend'] == 'sdpa-direct'
        row_cfg = replace(cfg, attn_backend='auto' if direct else row['backend'],
                          attn_mod='causal' if direct else cfg.attn_mod,
                          mup_base_width=base_width if row['param'] == 'mup' else 0)
        torch.manual_seed(seed)
        model = quietly(GPT, row_cfg, DirectSDPA if direct else MuPFlexAttention).to(device)
        optimizer = quietly(model.configure_optimizers, 0.1, 1e-3, (0.9, 0.95), device.type, optimizer=row['optimizer'])
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
    """What one training step spends on attention masks: GPT.forward builds one per pattern (the
    backend's choice included), every step."""
    patterns = {(type(block.attn), block.attn.attn_mod): block.attn for block in model.transformer.h}
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        for attn in patterns.values():
            attn.make_mask(B, T, device)
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
            for backend in backends:
                cfg = GPTConfig(block_size=T, n_head=n_head, n_embd=n_head * head_dim, attn_mod=spec,
                                attn_backend=backend)
                attn = MuPFlexAttention(cfg).to(device, ptdtype)
                if backend == 'sdpa' and parse_attn_mod(spec)[0] != 'causal':
                    continue
                mask = attn.make_mask(B, T, device) # built once per forward in GPT: not timed here
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


# ---- GPU only

def gpu_checks(device, ptdtype):
    """Flex vs flash (causal, T=1024, bf16, fwd+bwd); flex vs dense gradients for every mod;
    GPT-2 124M tokens/s and MFU with compile and bf16, SP and muP, auto (flash) and flex."""
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
    block_mask = flex.make_mask(B, T, device)
    fns = {'flash': fwd_bwd(flash, q, k, v, grad_out),
           'flex': fwd_bwd(lambda q, k, v: flex.attend(q, k, v, block_mask), q, k, v, grad_out)}
    times = time_interleaved(fns, device, warmup, iters)
    results['flex_vs_flash'] = dict(B=B, H=H, T=T, head_dim=D, dtype='bfloat16',
                                    flash_ms=statistics.median(times['flash']), flex_ms=statistics.median(times['flex']),
                                    flex_over_flash=paired_ratio(times['flex'], times['flash']))
    print(f"\ncausal attention fwd+bwd, B={B} H={H} T={T} bf16: flash {results['flex_vs_flash']['flash_ms']:.3f} ms, "
          f"flex {results['flex_vs_flash']['flex_ms']:.3f} ms ({results['flex_vs_flash']['flex_over_flash']:.2f}x)")

    results['flex_vs_dense_grads'] = []
    torch.backends.cuda.matmul.allow_tf32 = False # compare the kernels' math, not TF32 rounding
    print("\nflex vs dense gradients (float32, B=2 H=4 T=256 head_dim=64), max |diff| / the largest |grad|:")
    for spec in catalog_specs():
        grads = {}
        for backend in ('dense', 'flex'):
            torch.manual_seed(seed)
            attn = MuPFlexAttention(GPTConfig(block_size=256, n_head=4, n_embd=256, attn_mod=spec,
                                              attn_backend=backend)).to(device)
            g = torch.Generator().manual_seed(seed)
            x = torch.randn(2, 256, 256, generator=g).to(device).requires_grad_()
            (attn(x, attn.make_mask(2, 256, device)) * torch.randn(2, 256, 256, generator=g).to(device)).sum().backward()
            grads[backend] = {'input': x.grad, **{n: p.grad for n, p in attn.named_parameters()}}
        # over the largest gradient of the layer: the key bias's own gradient is zero up to rounding (it
        # shifts every score of a row alike), so dividing by it would compare noise with noise
        largest = max(grad.abs().max() for grad in grads['dense'].values())
        rel = {n: ((grads['flex'][n] - grads['dense'][n]).abs().max() / largest).item() for n in grads['dense']}
        results['flex_vs_dense_grads'].append(dict(mod=spec, max_rel_diff=max(rel.values()), per_tensor=rel))
        print(f"  {spec:<20}{max(rel.values()):.2e}")
    torch.backends.cuda.matmul.allow_tf32 = True

    gpt2 = GPTConfig(block_size=1024, vocab_size=50304, n_layer=12, n_head=12, n_embd=768, bias=False)
    # auto is flash attention here; muP relative to a 4x narrower base (192 = 12 heads of 16)
    rows, peak = train_rows(gpt2, ['auto', 'flex'], ['sp', 'mup'], [True], gpu_batch_size, device, ptdtype, 192)
    results['gpt2_124m'] = dict(rows=rows, peak_flops=peak, ratios=train_ratios(rows))
    print(f"\nGPT-2 124M, batch {gpu_batch_size} x 1024, compiled, {ptdtype}:")
    print_train(rows, results['gpt2_124m']['ratios'])
    return results


def check_settings():
    unknown = [m for m in modes if m not in ('train', 'attention', 'gpu')]
    if unknown or not modes:
        raise ValueError(f"modes={modes}: choose from 'train', 'attention', 'gpu', e.g. --modes=train,attention")
    if not optimizers or any(o not in ('adamw', 'muon') for o in optimizers):
        raise ValueError(f"optimizers={optimizers}: choose from 'adamw', 'muon', e.g. --optimizers=adamw,muon")
    if attn_backend != 'all' and attn_backend not in BACKENDS:
        raise ValueError(f"attn_backend={attn_backend!r}: use 'all' or one of {BACKENDS}")
    if parameterization not in ('sp', 'mup', 'both'):
        raise ValueError(f"parameterization={parameterization!r}: use 'sp', 'mup' or 'both'")
    if compile not in ('False', 'True', 'both'):
        raise ValueError(f"compile={compile!r}: use False, True or both")
    if warmup < 1 or iters < 1:
        raise ValueError(f"warmup={warmup}, iters={iters}: both must be >= 1 (warm-up builds masks and compiles)")
    parse_attn_mod(attn_mod)


if __name__ == '__main__':
    config = configure(globals(), sys.argv[1:])
    check_settings()
    if device == 'auto':
        device = 'cuda' if torch.cuda.is_available() else 'mps' if torch.backends.mps.is_available() else 'cpu'
    device = torch.device(device)
    if device.type != 'cuda' and attn_backend == 'flex' and 'train' in modes:
        raise SystemExit(f"attn_backend=flex: flex attention has no backward on {device.type}, so it cannot "
                         f"train here; use --attn_backend=all (the backends that apply) or run on CUDA")
    if 'gpu' in modes and device.type != 'cuda':
        raise SystemExit(f"modes=gpu needs a CUDA device (flex's fused kernels, its backward, flash attention, "
                         f"bf16 GPT-2 124M), but this run is on {device.type}: run the gpu mode on a "
                         f"machine with a GPU, or drop it from --modes")
    if dtype == 'auto':
        dtype = 'bfloat16' if device.type == 'cuda' and torch.cuda.is_bf16_supported() else 'float32'
    ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype]
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
        cfg = GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=n_layer, n_head=n_head,
                        n_embd=n_embd, bias=bias, dropout=0.0, attn_mod=attn_mod)
        plain_causal = parse_attn_mod(attn_mod)[0] == 'causal'
        if attn_backend == 'all': # flex has no backward on CPU; SDPA runs plain causal attention only
            backends = [b for b in BACKENDS if (b != 'flex' or device.type == 'cuda') and (b != 'sdpa' or plain_causal)]
        else:
            backends = [attn_backend]
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
        backends = ['sdpa', 'dense'] + (['flex'] if device.type == 'cuda' else []) # flex: no backward on CPU
        report['attention'] = attention_rows(catalog_specs(), seq_lens, batch_size, n_head, n_embd // n_head,
                                             device, ptdtype, backends, compiles)
        print_attention(report['attention'])

    if 'gpu' in modes:
        report['gpu'] = gpu_checks(device, ptdtype)

    report['environment']['load_average_end'] = os.getloadavg()
    with open(out_file, 'w') as f:
        json.dump(report, f, indent=1)
    print(f"\nwrote {out_file}")
