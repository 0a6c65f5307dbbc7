"""train.py's checkpoints, written and read in one place: train.py saves and resumes them, and
load_run is how every other script (sample.py, export_hf.py, analyze_jacobian.py) loads a run.

A checkpoint is out_dir/ckpt.pt. On one process or under DDP it holds everything: the model's and
the optimizer's state dicts, the settings, the iteration and the RNG states. Under FSDP each
process holds only its shards of the model and of the optimizer state, and gathering them would
need the whole of both in one process's memory. So each process writes its own shards, with
torch.distributed.checkpoint, into a directory ckpt_<iter>_<token>.dcp beside ckpt.pt (a new name
at every save), and ckpt.pt holds the rest and names that directory under 'sharded'.
torch.distributed.checkpoint reshards on load: such a checkpoint resumes at any number of FSDP
processes, and sample.py reads it on one.

ckpt.pt is always written last, to a temporary file renamed over the old one: a kill at any moment
leaves the previous checkpoint whole, with its directory, which no save overwrites. Directories
that neither ckpt.pt nor a numbered ckpt_<iter>.pt names any more (the previous save's, or a save
killed half-way) are removed after the next save. A sharded checkpoint is ckpt.pt and the
directory it names: copy both. Across nodes out_dir must be on a filesystem they all share.

torch.distributed.checkpoint is imported by the functions that read or write shards: it takes a
second to import, which every run without FSDP (and every test that starts one) would pay.
"""
import os
import pickle
import re
import shutil
import warnings
from dataclasses import asdict

import torch

from errors import UserError, first_line
from model import GPT, GPTConfig

INTACT_COPY = ("use an intact copy: a numbered ckpt_<iter>.pt kept by train.py's keep_last_n, "
               "copied over ckpt.pt with `cp --remove-destination` (ckpt.pt is a hard link of the "
               "newest numbered file, which a plain cp would overwrite too)")


TRAINING_STATE = ('model', 'optimizer', 'model_args', 'iter_num', 'best_val_loss', 'config',
                  'skipped_steps', 'data_rng_state', 'rng_states')


def save(state, out_dir, model, optimizer, fsdp, is_master, keep_last_n):
    """train.py's save: `state` (the settings, the iteration, the RNG states) with the model's and
    the optimizer's state, written atomically by write(); under FSDP every process first writes
    its shards into a new directory, which ckpt.pt then names (call it on every process then; on
    the master alone otherwise). Returns the paths written (the master's; [] on the others)."""
    checkpoint = dict(state)
    if fsdp:
        optimizers = getattr(optimizer, 'optimizers', [optimizer])
        checkpoint['sharded'] = write_shards(out_dir, state['iter_num'], model, optimizers, is_master)
    else:
        checkpoint['model'] = model.state_dict()
        checkpoint['optimizer'] = optimizer.state_dict()
    if not is_master:
        return []
    saved = write(checkpoint, out_dir, keep_last_n)
    if fsdp:
        saved.append(os.path.join(out_dir, checkpoint['sharded']))
    return saved


def resume(out_dir, device, model_args, config, fsdp):
    """The checkpoint train.py resumes, after checking that this run can continue it: the same
    model settings (only attn_backend, another kernel for the same function, may change), the same
    optimizer, and FSDP or not as it was saved. Returns (checkpoint, the other settings that
    changed since, as 'key old -> new' strings). Each mismatch is a UserError that names it."""
    ckpt_path = os.path.join(out_dir, 'ckpt.pt')
    if not os.path.exists(ckpt_path):
        raise UserError(f"init_from='resume', but {ckpt_path} does not exist: train with "
                          f"init_from='scratch' first, or point --out_dir at the run to resume")
    checkpoint = read(out_dir, device, TRAINING_STATE)
    # a setting newer than the checkpoint has the default, which is how the model was built then
    saved_args = {**asdict(GPTConfig()), **checkpoint['model_args']}
    differences = []
    for key, requested in model_args.items():
        saved = saved_args[key]
        # attn_backend is another kernel for the same function; vocab_size is the model's (the
        # data's tokens are checked against it), not a setting
        if key not in ('attn_backend', 'vocab_size') and saved != requested:
            differences.append(f"  {key}: checkpoint {saved!r} vs requested {requested!r}")
    if differences:
        heading = f"cannot resume {ckpt_path}: the model settings differ from the checkpoint's:"
        advice = ("Resume with the config file and flags of the run that wrote it (only "
                  "attn_backend may change).")
        raise UserError("\n".join([heading, *differences, advice]))
    saved_fsdp = 'sharded' in checkpoint # what the file holds, whatever its run's flags said
    if saved_fsdp != fsdp:
        raise UserError(f"fsdp={fsdp}: {ckpt_path} was saved by a run with fsdp={saved_fsdp}, "
                          f"whose model and optimizer state it holds in that run's layout; "
                          f"resume with --fsdp={saved_fsdp} (at any number of processes under "
                          f"FSDP; the model weights alone load either way, as sample.py does)")
    saved_optimizer = checkpoint['config'].get('optimizer', 'adamw')
    if saved_optimizer != config['optimizer']:
        raise UserError(f"optimizer={config['optimizer']!r}: {ckpt_path} was trained with "
                          f"optimizer={saved_optimizer!r}, whose state it holds; resume with that "
                          f"optimizer")
    changed = []
    for key, saved in checkpoint['config'].items():
        if key != 'init_from' and key in config and config[key] != saved:
            changed.append(f"{key} {saved!r} -> {config[key]!r}")
    return checkpoint, changed


def restore(checkpoint, out_dir, model, optimizer):
    """Load a checkpoint that resume() returned into the model and the optimizer, whole or each
    process its shards (a collective then). The optimizer keeps this run's hyperparameters (lr,
    weight decay, betas): only its state (moments, step counts) comes from the checkpoint."""
    settings = [{key: value for key, value in group.items() if key != 'params'}
                for group in optimizer.param_groups]
    if 'sharded' in checkpoint:
        load_shards(checkpoint, out_dir, model, getattr(optimizer, 'optimizers', [optimizer]))
    else:
        model.load_state_dict(checkpoint['model'])
        optimizer.load_state_dict(checkpoint['optimizer'])
    for group, setting in zip(optimizer.param_groups, settings):
        group.update(setting)


def load_run(path, device, setting='out_dir', **changes):
    """(model, checkpoint): the model of a train.py run, with its weights, on `device`. `path` is
    the run's out_dir or a checkpoint file in it (its ckpt.pt, or a numbered ckpt_<iter>.pt that
    keep_last_n kept), whole or sharded (the shards are put together on this process). The
    model has the run's settings, its attention class included, with `changes` (another
    attn_backend, say). A missing or unreadable checkpoint, or one whose model cannot be built
    here (its attention class's file is not here), is a UserError that names `setting`, the
    script's name for the path."""
    ckpt_path = checkpoint_file(path)
    if not os.path.exists(ckpt_path):
        raise UserError(f"{setting}={path!r}: no checkpoint at {ckpt_path}: pass the out_dir of a "
                        f"train.py run, or its ckpt.pt (train one first: python train.py ...)")
    checkpoint = read(ckpt_path, device, required=('model', 'model_args'))
    try:
        model = GPT(GPTConfig(**{**checkpoint['model_args'], **changes}))
    except ValueError as e:
        raise UserError(f"{ckpt_path}: {e}") from None
    load_model(checkpoint, os.path.dirname(ckpt_path), model)
    return model.to(device), checkpoint


def trained_on(checkpoint):
    """The dataset a checkpoint's run trained on: its train.py config's, else shakespeare_char."""
    return checkpoint.get('config', {}).get('dataset', 'shakespeare_char')


def data_dir_of(checkpoint, path, split):
    """data/<the run's dataset>, relative to the working directory as train.py's, once its
    <split>.bin is found there; a UserError naming the run (`path`) and the fix otherwise."""
    dataset = trained_on(checkpoint)
    data_dir = os.path.join('data', dataset)
    if not os.path.exists(os.path.join(data_dir, f'{split}.bin')):
        raise UserError(f"{path} was trained on dataset={dataset!r}, whose {data_dir}/{split}.bin is not here: "
                        f"run from the directory it was trained in, or prepare it with "
                        f"`python data/{dataset}/prepare.py`")
    return data_dir


def checkpoint_file(path):
    """The checkpoint file `path` names: itself if it is a file, else the ckpt.pt of a directory."""
    if os.path.isfile(path):
        return path
    return os.path.join(path, 'ckpt.pt')


def read(path, device, required=('model', 'model_args', 'config')):
    """The checkpoint at `path` (a file, or an out_dir: its ckpt.pt), loaded onto `device`. A
    UserError that names the file and the fix when it is truncated or corrupt, lacks any of the
    keys `required`, or names a sharded directory that is not there; 'model' and 'optimizer'
    count as present when the file names such a directory. The caller checks that the file
    exists: what to do when it does not depends on the caller."""
    path = checkpoint_file(path)
    try:
        # not weights_only: a checkpoint also holds the RNG states, numpy's among them
        checkpoint = torch.load(path, map_location=device, weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise UserError(f"{path} is truncated or corrupt, it cannot be loaded "
                          f"({type(e).__name__}: {first_line(e)}): {INTACT_COPY}") from None
    if isinstance(checkpoint, dict):
        in_shards = {'model', 'optimizer'} if 'sharded' in checkpoint else set()
        missing = [key for key in required if key not in checkpoint and key not in in_shards]
    else:
        missing = list(required)
    if missing:
        raise UserError(f"{path} is not a checkpoint of train.py (missing "
                          f"{', '.join(missing)}): point out_dir at a train.py run, or "
                          f"train one")
    if 'sharded' in checkpoint:
        directory = os.path.join(os.path.dirname(path), checkpoint['sharded'])
        if not os.path.exists(os.path.join(directory, '.metadata')):
            raise UserError(f"{path} keeps its weights in {directory}, which is missing or "
                              f"incomplete: {INTACT_COPY}, with the directory it names")
    return checkpoint


def load_model(checkpoint, out_dir, model):
    """Load the checkpoint's weights into `model`, a plain (unsharded) GPT on this process. From a
    sharded checkpoint each tensor is put together from the shards of every process that wrote
    it, read by this process alone (no_dist)."""
    if 'sharded' not in checkpoint:
        model.load_state_dict(checkpoint['model'])
        return
    state = {'model': model.state_dict()}
    with warnings.catch_warnings(): # it warns that it assumes a single process, which it is
        warnings.filterwarnings('ignore', message='torch.distributed is disabled')
        read_shards(state, out_dir, checkpoint['sharded'], no_dist=True)
    model.load_state_dict(state['model'])


def write_shards(out_dir, iter_num, model, optimizers, is_master):
    """FSDP: every process writes its shards of the model and of the optimizer state into a new
    directory out_dir/ckpt_<iter>_<token>.dcp (a collective: call it on every process). Returns
    the directory's name, for ckpt.pt to record; until write() renames ckpt.pt into place,
    nothing names it. A failed write removes the directory and raises a UserError on every
    process."""
    # a name no earlier save used, even one of the same iter (a run started again in this
    # out_dir, or resumed from an older copy): the master draws it, every process writes there
    import torch.distributed.checkpoint as dcp
    names = [f'ckpt_{iter_num:06d}_{os.urandom(4).hex()}.dcp' if is_master else None]
    torch.distributed.broadcast_object_list(names, src=0)
    directory = os.path.join(out_dir, names[0])
    try:
        dcp.save(shard_state(model, optimizers), checkpoint_id=directory)
    except dcp.api.CheckpointException as e: # raised on every process, with each one's failure
        if is_master:
            shutil.rmtree(directory, ignore_errors=True)
        # a write that failed (a full disk) is an OSError; anything else is a bug
        failures = [failure for failure, _ in e.failures.values() if isinstance(failure, OSError)]
        if not failures:
            raise
        raise UserError(f"saving the shards of iter {iter_num} to {directory} failed "
                          f"({failures[0]}); removed {directory}, "
                          f"{what_is_left(out_dir)}") from None
    return names[0]


def load_shards(checkpoint, out_dir, model, optimizers):
    """FSDP resume: each process reads its shards of the model and of the optimizer state (a
    collective). The optimizers' hyperparameters come back as saved; the caller restores its own."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict
    state = shard_state(model, optimizers)
    read_shards(state, out_dir, checkpoint['sharded'])
    set_model_state_dict(model, state['model'])
    set_optimizer_state_dict(model, optimizers, state['optimizer'])


def shard_state(model, optimizers):
    """This process's shards of the model and of the optimizer state, as write_shards saves them
    and load_shards reads them in place."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    return {'model': get_model_state_dict(model),
            'optimizer': get_optimizer_state_dict(model, optimizers)}


def read_shards(state, out_dir, name, no_dist=False):
    """dcp.load of out_dir/name into `state`; a shard file that is gone or unreadable is a
    UserError (on every process) that names the directory."""
    import torch.distributed.checkpoint as dcp
    directory = os.path.join(out_dir, name)
    try:
        dcp.load(state, checkpoint_id=directory, no_dist=no_dist)
    except dcp.api.CheckpointException as e:
        failure = next(iter(e.failures.values()))[0]
        raise UserError(f"{directory} cannot be read ({type(failure).__name__}: "
                          f"{first_line(failure)}): {INTACT_COPY}, with the directory it "
                          f"names") from None


def write(checkpoint, out_dir, keep_last_n):
    """Atomic: write a temporary file beside ckpt.pt, fsync, then rename it over ckpt.pt. With
    keep_last_n the file is renamed to ckpt_<iter>.pt instead and ckpt.pt becomes a second name
    (hard link) of it: no second write. Then the numbered files beyond the last keep_last_n, and
    the sharded directories that no file names, are removed. Returns the paths written. A write
    that fails (a full disk) removes the temporary file, and the shards it would have named, and
    raises a UserError, as every later save would fail the same way."""
    iter_num = checkpoint['iter_num']
    ckpt_path = os.path.join(out_dir, 'ckpt.pt')
    tmp_path = ckpt_path + '.tmp'
    numbered_path = os.path.join(out_dir, f'ckpt_{iter_num:06d}.pt')
    try:
        with open(tmp_path, 'wb') as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        if keep_last_n:
            os.replace(tmp_path, numbered_path)
            os.link(numbered_path, tmp_path)
        os.replace(tmp_path, ckpt_path)
    except (OSError, RuntimeError) as e:
        # torch's zip writer may answer a failed write with a RuntimeError raised while the
        # OSError was being handled: that OSError is the cause. Without one it is a bug.
        cause = e
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__context__
        if cause is None:
            raise
        # a partial file must not fill the disk any further, nor be taken for a checkpoint
        removed = [tmp_path]
        if os.path.lexists(tmp_path):
            os.remove(tmp_path)
        if 'sharded' in checkpoint:
            removed.append(os.path.join(out_dir, checkpoint['sharded']))
            shutil.rmtree(removed[-1], ignore_errors=True)
        raise UserError(f"saving the checkpoint of iter {iter_num} to {tmp_path} failed "
                          f"({cause}); removed {' and '.join(removed)}, "
                          f"{what_is_left(out_dir)}") from None
    written = [ckpt_path]
    numbered = entries_named(out_dir, r'ckpt_\d+\.pt')
    if keep_last_n:
        written.append(numbered_path)
        for old in numbered[:-keep_last_n]:
            os.remove(os.path.join(out_dir, old))
        numbered = numbered[-keep_last_n:]
    directories = entries_named(out_dir, r'ckpt_\d+_[0-9a-f]+\.dcp')
    if directories:
        named = {checkpoint.get('sharded')}
        for name in numbered:
            path = os.path.join(out_dir, name)
            try: # mmap: a whole (unsharded) checkpoint is not read in
                saved = torch.load(path, map_location='cpu', weights_only=False, mmap=True)
            except (RuntimeError, EOFError, pickle.UnpicklingError, OSError):
                return written # which directory it names is unknown: remove none this time
            named.add(saved.get('sharded'))
        for name in directories:
            if name not in named:
                shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)
    return written


def what_is_left(out_dir):
    """What a failed save leaves to resume from and how, in words."""
    ckpt_path = os.path.join(out_dir, 'ckpt.pt')
    if os.path.exists(ckpt_path):
        left = f"{ckpt_path} is the last good checkpoint"
    else:
        left = "no checkpoint was saved before"
    return (f"{left}. Once {out_dir} can take it (a full disk: free some space), continue with "
            f"--init_from=resume")


def entries_named(out_dir, pattern):
    """The names in out_dir that match `pattern` whole, in the order of the iteration each
    starts with."""
    names = [name for name in os.listdir(out_dir) if re.fullmatch(pattern, name)]
    return sorted(names, key=lambda name: int(re.match(r'ckpt_(\d+)', name)[1]))
