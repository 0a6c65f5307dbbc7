"""
What train.py needs to run as one of several processes under torchrun, as plain functions: the
process group and its teardown, DDP or FSDP2 wrapping, the gradient-sync switch of gradient
accumulation, the one all-reduce of each step's statistics, and every process's RNG states for
checkpoints. A plain `python train.py` is one process of rank 0, and each function then does
nothing or the obvious. FSDP's modules are imported where FSDP is used: they take most of a
second to import, which every other run, and every test that starts train.py, would pay.
"""

import gc
import os
import random
from typing import NamedTuple

import numpy as np
import torch
from torch.distributed import destroy_process_group, init_process_group
from torch.nn.parallel import DistributedDataParallel as DDP


class Processes(NamedTuple):
    """This process among the run's: torchrun sets RANK, LOCAL_RANK and WORLD_SIZE."""
    ddp: bool # launched by torchrun: a process group exists (DDP or FSDP)
    rank: int
    local_rank: int
    world_size: int

    @property
    def master(self):
        """The process that logs, evaluates (but under FSDP) and writes ckpt.pt."""
        return self.rank == 0


def processes():
    """The Processes of this run, from torchrun's environment; one process of rank 0 without it."""
    return Processes(ddp=int(os.environ.get('RANK', -1)) != -1,
                     rank=int(os.environ.get('RANK', 0)),
                     local_rank=int(os.environ.get('LOCAL_RANK', 0)),
                     world_size=int(os.environ.get('WORLD_SIZE', 1)))


def init(procs, device):
    """Start the process group (nccl on CUDA, gloo elsewhere) under torchrun; returns the device
    this process trains on (cuda:<local_rank> on a CUDA node)."""
    if not procs.ddp:
        return device
    if torch.device(device).type == 'cuda':
        init_process_group(backend='nccl')
        device = f'cuda:{procs.local_rank}'
        torch.cuda.set_device(device)
    else:
        init_process_group(backend='gloo')
    return device


def shard(model, ptdtype):
    """FSDP2: every Block, then the root (embeddings, ln_f, the readout), holds its parameters
    sharded across the processes and gathers them only for its forward and backward. bf16
    compute with fp32 gradient reduction when training in bf16, fp32 otherwise. The muP param
    groups were decided by name before (mup.classify_params), so sharding changes none."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    if ptdtype == torch.bfloat16:
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        policy = MixedPrecisionPolicy()
    for block in model.transformer.h:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


def replicate(model, device):
    """DDP: a replica of the model on every process, the gradients all-reduced in the backward."""
    if torch.device(device).type == 'cuda':
        return DDP(model, device_ids=[torch.device(device).index])
    return DDP(model)


def sync_gradients(model, sync):
    """Whether the next backward reduces the gradients across processes (DDP's all-reduce,
    FSDP's reduce-scatter): only on the last micro-step of gradient accumulation. `model` is
    what the loop calls, compiled or not."""
    module = getattr(model, '_orig_mod', model) # under torch.compile
    if hasattr(module, 'set_requires_gradient_sync'): # an FSDPModule
        module.set_requires_gradient_sync(sync)
    elif isinstance(module, DDP):
        module.require_backward_grad_sync = sync


def sum_over_processes(values, procs):
    """A 1-d tensor of this process's values, summed over all processes (one all-reduce), as a
    list of floats."""
    if procs.ddp:
        torch.distributed.all_reduce(values)
    return values.tolist()


def local(tensor):
    """This process's part of a tensor: under FSDP a DTensor, whose to_local() is its shard."""
    if hasattr(tensor, 'to_local'):
        return tensor.to_local()
    return tensor


def item(tensor):
    """A scalar tensor's value; for a DTensor (FSDP), the value over all its shards."""
    if hasattr(tensor, 'full_tensor'):
        return tensor.full_tensor().item()
    return tensor.item()


def local_megabytes(tensors):
    """The memory these tensors take on this process: under FSDP, its shards only."""
    return sum(local(t).numel() * local(t).element_size() for t in tensors) / 2**20


def optimizer_state(optimizers):
    """The tensors of the optimizers' state (moments, momentum buffers)."""
    return [value for optimizer in optimizers for state in optimizer.state.values()
            for value in state.values() if isinstance(value, torch.Tensor)]


def local_grads(parameters):
    """Each parameter's gradient as this process holds it (under FSDP its shard), None where it has none."""
    return [None if p.grad is None else local(p.grad) for p in parameters]


def rng_states(procs, device):
    """Every process's RNG states (python, numpy, torch, CUDA), gathered from all processes, so
    a resumed run draws the same dropout masks. A collective under torchrun: every process must
    call it."""
    state = {
        'python': random.getstate(),
        'numpy': np.random.get_state(),
        'torch': torch.get_rng_state(),
        'cuda': None,
    }
    if torch.device(device).type == 'cuda':
        state['cuda'] = torch.cuda.get_rng_state()
    if not procs.ddp:
        return [state]
    states = [None] * procs.world_size
    torch.distributed.all_gather_object(states, state)
    return states


def set_rng_states(states, procs, device):
    """Continue the RNG streams of the checkpoint's run. Returns False, and changes nothing, when
    it had another number of processes: dropout then continues from fresh seeds (the batches come
    from the data generator and are unaffected)."""
    if len(states) != procs.world_size:
        return False
    state = states[procs.rank]
    random.setstate(state['python'])
    np.random.set_state(state['numpy'])
    torch.set_rng_state(state['torch'])
    if torch.device(device).type == 'cuda' and state['cuda'] is not None:
        torch.cuda.set_rng_state(state['cuda'])
    return True


def close(procs):
    """Tear the process group down. Free what holds it first (DDP's reducer, FSDP's modules, the
    parameters the optimizer holds: `del` them in the caller): left to the interpreter's exit,
    gloo's teardown aborted about 1 run in 10 on a loaded 2-core machine ("terminate called
    without an active exception"), 0 in 30 with this."""
    if not procs.ddp:
        return
    gc.collect()
    torch.distributed.barrier() # no process tears down while another still talks to it
    destroy_process_group()
