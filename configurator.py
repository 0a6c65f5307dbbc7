"""
Command-line configuration for the scripts, nanoGPT style:

$ python train.py config/train_shakespeare_char.py --batch_size=32 --compile=False

A script declares its defaults as module-level globals and then calls
    config = configure(globals(), sys.argv[1:])
Arguments without '--' are config files (plain Python, run in order), and
'--key=value' arguments override single keys. Unlike nanoGPT's exec-based
version, every key and value is checked against the defaults, so a typo fails
loudly instead of silently training with the default. A bad setting or input
raises UserError, which a script that called configure() reports in one line,
without a traceback, and exits non-zero (real bugs keep their traceback).
`python <script>.py --help` lists the settings with their defaults and meanings (comments()).
model_settings() makes every field of model.GPTConfig a setting of a script, and model_config()
builds the GPTConfig from them, so a field added there is a flag of every script.

The rest is what the scripts share about the machine: resolve_device turns a `device` setting
('auto' included) into a device this machine has, or a UserError that says what to pass instead;
resolve_dtype and autocast the precision; device_peak_flops what MFU is measured against.
"""

import ast
import difflib
import io
import os
import sys
import time
import tokenize
import traceback
import types
from dataclasses import fields

from errors import UserError


def _report(exc_type, exc, tb):
    if issubclass(exc_type, UserError):
        print(f"error: {exc}", file=sys.stderr)
    else:
        sys.__excepthook__(exc_type, exc, tb)

_SCALARS = (bool, int, float, str)

def _is_configurable(name, value):
    if name.startswith('_') or name.isupper(): # private, or a constant (an imported table of choices)
        return False
    if isinstance(value, (tuple, list)):
        return all(isinstance(v, _SCALARS) for v in value)
    return isinstance(value, _SCALARS)

def _type_name(default):
    if isinstance(default, (tuple, list)):
        of = f" of {type(default[0]).__name__}" if default else ""
        return f"{type(default).__name__}{of} (e.g. 1,2,3 or [1,2,3])"
    if isinstance(default, bool):
        return "bool (True or False)"
    return type(default).__name__

def _parse(text):
    # not every value is a Python literal: --device=cpu should not need quotes
    try:
        return ast.literal_eval(text)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return text

def _check(key, value, default, raw=None):
    """Return value converted to the type of default, or raise UserError.
    raw is the command-line text; it allows conveniences (bare strings, true/1,
    comma-separated lists) that would be too loose in a Python config file."""
    def bad(hint=""):
        given = raw if raw is not None else repr(value)
        return UserError(f"config key '{key}' expects {_type_name(default)}, got {given}{hint}")

    if isinstance(default, (tuple, list)):
        if raw is not None and isinstance(value, str):
            items = [(_parse(s.strip()), s.strip()) for s in value.split(',') if s.strip()]
        elif isinstance(value, (tuple, list)):
            items = [(v, None) for v in value]
        elif raw is not None:
            items = [(value, raw)]  # a single element: --widths=64
        else:
            raise bad()
        if not default:  # no element to take a type from
            return type(default)(v for v, _ in items)
        try:
            return type(default)(_check(key, v, default[0], r) for v, r in items)
        except ValueError:
            raise bad() from None
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if raw is not None and raw.strip().lower() in ('true', 'false', '1', '0'):
            return raw.strip().lower() in ('true', '1')
        raise bad()
    if isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            raise bad(f" (a float; write {int(value)} for an int)")
        raise bad()
    if isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise bad()
    # a str key takes the text as typed, even when it happens to look like a number
    if isinstance(value, str):
        return value
    if raw is not None:
        return raw
    raise bad()

def _unknown(key, keys, where):
    close = difflib.get_close_matches(key, keys, n=3)
    hint = f"did you mean {' or '.join(close)}?" if close else "run with --help to list the valid keys"
    return UserError(f"unknown config key '{key}' {where}; {hint}")

def comments(source, before=None):
    """{name: what it means}, for the assignments in `source` (a script's settings, a dataclass's
    fields) and its name=value arguments (a dict(...) of settings), before line `before` if given: the comment at the end of the assignment, else the
    comment lines just above it. A comment that heads a section ('# ---- ...') belongs to none.
    The first assignment of a name outside functions (in the order the statements nest, the
    outermost first) is the one that counts."""
    line_comments = {token.start[0]: token.string.lstrip('#').strip()
                     for token in tokenize.generate_tokens(io.StringIO(source).readline)
                     if token.type == tokenize.COMMENT}
    lines = [line.strip() for line in source.splitlines()]
    found = {}
    for node in outside_functions(ast.parse(source)):
        if not isinstance(node, (ast.Assign, ast.AnnAssign, ast.keyword)) or (before and node.lineno >= before):
            continue
        text = line_comments.get(node.end_lineno) # at the end of the statement's last line
        if text is None:
            above = []
            number = node.lineno - 1
            while number >= 1 and lines[number - 1].startswith('#') and not lines[number - 1].startswith('# --'):
                above.insert(0, line_comments[number])
                number -= 1
            text = ' '.join(above)
        if isinstance(node, ast.keyword): # name=value in a call, as in a dict(...) of settings
            names = [node.arg] if node.arg else []
        else:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names = [target.id for target in targets if isinstance(target, ast.Name)]
        for name in names:
            if text:
                found.setdefault(name, text)
    return found


def outside_functions(tree):
    """ast.walk's nodes (outermost first) but those inside a function: a variable there is not a
    setting."""
    todo = [tree]
    while todo:
        node = todo.pop(0)
        yield node
        todo.extend(child for child in ast.iter_child_nodes(node)
                    if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))


def settings_comments(source):
    """comments() of a script's settings, those assigned before it calls configure(); of a
    module that calls no configure(), of everything (model.py's GPTConfig, a dict of settings)."""
    calls = [node.lineno for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Call)
             and isinstance(node.func, ast.Name) and node.func.id == 'configure']
    return comments(source, before=min(calls, default=None))


def _print_help(config, keys, documented_in):
    if config.get('__doc__'): # what the script does, before the keys it takes
        print(config['__doc__'].strip() + '\n')
    # a setting's meaning is its comment where it is defined: model.GPTConfig's fields, the files
    # the script names (sweep_runner.py's REFERENCE, say), and the script itself, whose word
    # counts most
    model_py = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'model.py')
    meanings = {}
    for path in (model_py, *documented_in, config.get('__file__')):
        if path and os.path.isfile(path):
            with open(path) as f:
                meanings.update(settings_comments(f.read()))
    print("usage: python <script>.py [config/<file>.py ...] [--key=value ...]")
    print("settings, with their defaults and what they mean:")
    for k in keys:
        flag = f"--{k}={config[k]!r}"
        meaning = f"{_type_name(config[k])}; {meanings[k]}" if k in meanings else _type_name(config[k])
        print(f"  {flag:<32} {meaning}" if len(flag) <= 32 else f"  {flag}\n  {'':<32} {meaning}")

def _run_config_file(path, config, keys, verbose):
    if not os.path.isfile(path):
        hint = f"; did you mean --{path}?" if '=' in path else ""
        raise UserError(
            f"config file '{path}' not found: config files live under config/ "
            f"(e.g. config/<name>.py) and overrides are written --key=value{hint}")
    if verbose:
        print(f"Overriding config with {path}")
    namespace = {'__file__': path, '__name__': '__config__'}
    try:
        with open(path) as f:
            exec(compile(f.read(), path, 'exec'), namespace)
    except Exception as e: # the user's file, not our code: name the file and the line
        line = e.lineno if isinstance(e, SyntaxError) else [f.lineno for f in traceback.extract_tb(e.__traceback__)
                                                             if f.filename == path][-1]
        raise UserError(f"config file {path}, line {line}: {type(e).__name__}: {e}") from None
    for k, v in namespace.items():
        # config files may import and define helpers to compute their values
        if k.startswith('_') or isinstance(v, types.ModuleType) or callable(v):
            continue
        if k not in keys:
            raise _unknown(k, keys, f"in {path}")
        try:
            config[k] = _check(k, v, config[k])
        except UserError as e:
            raise UserError(f"{path}: {e}") from None
        if verbose:
            print(f"Overriding: {k} = {config[k]!r}")

def configure(config: dict, argv: list[str], verbose: bool = True, documented_in=()) -> dict:
    """Apply config files and --key=value overrides from argv to config (a
    script's globals()) in place; return a dict of the configurable keys.
    documented_in: files whose comments say what some settings mean (--help)."""
    sys.excepthook = _report
    keys = [k for k, v in config.items() if _is_configurable(k, v)]
    if '-h' in argv or '--help' in argv:
        _print_help(config, keys, documented_in)
        raise SystemExit(0)
    for arg in argv:
        if not arg.startswith('-'):
            _run_config_file(arg, config, keys, verbose)
            continue
        if not arg.startswith('--') or '=' not in arg:
            example = f"{arg}=True" if arg[2:] in keys and isinstance(config[arg[2:]], bool) else "--key=value"
            raise UserError(f"can't parse argument '{arg}': overrides are written {example}")
        key, raw = arg[2:].split('=', 1)
        if key not in keys:
            raise _unknown(key, keys, f"(from {arg})")
        config[key] = _check(key, _parse(raw), config[key], raw)
        if verbose:
            print(f"Overriding: {key} = {config[key]!r}")
    return {k: config[k] for k in keys}


def model_settings(*set_by_script, **defaults):
    """Every field of model.GPTConfig as a script setting: {name: default}, with the script's own
    defaults for some, to put among its globals before configure(). A field added to GPTConfig
    is then a --flag of every script that does this, its comment there the flag's --help.
    Not settings: vocab_size (the data says it) and the fields in `set_by_script` (a width the
    script sweeps, say)."""
    from model import GPTConfig
    settings = {f.name: f.default for f in fields(GPTConfig)
                if f.name != 'vocab_size' and f.name not in set_by_script}
    unknown = set(defaults) - set(settings)
    if unknown:
        raise TypeError(f"model_settings: {sorted(unknown)} are not GPTConfig settings")
    return {**settings, **defaults}


def model_config(config, **changes):
    """The GPTConfig of a script's settings (config: what configure() returned), with `changes`
    on top (vocab_size, a width the script sweeps); a setting GPTConfig rejects is a UserError."""
    from model import GPTConfig
    args = {f.name: config[f.name] for f in fields(GPTConfig) if f.name in config}
    try:
        return GPTConfig(**{**args, **changes})
    except ValueError as e:
        raise UserError(str(e)) from None


def resolve_device(device):
    """The device a script's `device` setting names, checked before any work: 'auto' is the best
    this machine has (cuda > mps > cpu); another name must exist here, or a UserError says what
    to pass instead."""
    import torch
    if device == 'auto':
        if torch.cuda.is_available():
            return 'cuda'
        if torch.backends.mps.is_available():
            return 'mps'
        return 'cpu'
    try:
        asked = torch.device(device)
    except RuntimeError:
        asked = None # not a device name at all
    if asked is None or asked.type not in ('cpu', 'cuda', 'mps'):
        raise UserError(f"device={device!r}: use 'auto', 'cpu', 'cuda', 'cuda:<index>' or 'mps'")
    if asked.type == 'cuda' and not torch.cuda.is_available():
        raise UserError(f"device={device!r}, but this machine has no CUDA device: "
                          f"use --device=cpu (or auto)")
    n_gpus = torch.cuda.device_count()
    if asked.type == 'cuda' and asked.index is not None and asked.index >= n_gpus:
        raise UserError(f"device={device!r}, but this machine has {n_gpus} CUDA device(s): "
                          f"use cuda:0 to cuda:{n_gpus - 1}")
    if asked.type == 'mps' and not torch.backends.mps.is_available():
        raise UserError(f"device={device!r}, but MPS is not available here: "
                          f"use --device=cpu (or auto)")
    return device


# -----------------------------------------------------------------------------
# Checks and settings the scripts share (train.py, sample.py, bench.py)

def require(config, key, ok, must_be):
    """A UserError `key=value: must be ...` unless ok; config holds the script's settings."""
    if not ok:
        raise UserError(f"{key}={config[key]!r}: must be {must_be}")


DTYPES = ('auto', 'float32', 'bfloat16', 'float16')


def resolve_dtype(dtype, device):
    """The torch dtype a script's `dtype` setting (one of DTYPES) names on `device`: 'auto' is
    bfloat16 on a GPU that supports it, float16 on an older GPU (train.py scales its loss then),
    float32 on CPU and MPS (bf16 matmuls are slow on many CPUs)."""
    import torch
    if dtype == 'auto':
        if torch.device(device).type != 'cuda':
            dtype = 'float32'
        elif torch.cuda.is_bf16_supported():
            dtype = 'bfloat16'
        else:
            dtype = 'float16'
    return {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype]


def autocast(device, ptdtype):
    """The context the forward runs in: autocast to ptdtype, or nothing in float32."""
    import torch
    return torch.amp.autocast(device_type=torch.device(device).type, dtype=ptdtype,
                              enabled=ptdtype != torch.float32)


# bf16 dense peaks of common GPUs (vendor datasheets, without sparsity)
GPU_PEAK_FLOPS = {'H200': 989e12, 'H100': 989e12, 'A100': 312e12, 'L4': 121e12, 'A10': 125e12,
                  'RTX 4090': 165e12, 'RTX 3090': 71e12, 'V100': 125e12, 'T4': 65e12}


def device_peak_flops(device, dtype=None):
    """What MFU is measured against: a GPU's datasheet bf16 peak (an unknown GPU: A100's, as
    nanoGPT); elsewhere (CPU, MPS), the best rate of a 1024^2 matmul in `dtype` over 5 tries,
    so that CPU MFU reads as a fraction of what this machine's GEMM reaches."""
    import torch
    dtype = dtype or torch.float32
    device = torch.device(device)
    if device.type == 'cuda':
        name = torch.cuda.get_device_name(device)
        for key, flops in GPU_PEAK_FLOPS.items():
            if key in name:
                return flops
        return 312e12
    a = torch.randn(1024, 1024, device=device, dtype=dtype)
    best = float('inf')
    for _ in range(5):
        t0 = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t0)
    return 2 * 1024 ** 3 / best
