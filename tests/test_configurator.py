import math
import re
import runpy
import sys
import types

import pytest

from configurator import configure
from errors import UserError


def defaults():
    # stands in for a script's globals(): only the plain-valued public names are keys
    return {
        'batch_size': 12,
        'learning_rate': 6e-4,
        'compile': True,
        'device': 'cuda',
        'init_from': 'scratch',
        'widths': (64, 128),
        'betas': [0.9, 0.95],
        'names': ('a', 'b'),
        '_private': 1,
        '__name__': '__main__',
        'math': math,
        'helper': print,
        'Thing': type('Thing', (), {}),
        'nothing': None,
        'table': {'a': 1},
    }


def run(*argv, config=None):
    config = defaults() if config is None else config
    return configure(config, list(argv), verbose=False), config


def write(tmp_path, text, name='cfg.py'):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_no_args_returns_only_configurable_keys():
    out, config = run()
    assert out == {
        'batch_size': 12, 'learning_rate': 6e-4, 'compile': True, 'device': 'cuda',
        'init_from': 'scratch', 'widths': (64, 128), 'betas': [0.9, 0.95], 'names': ('a', 'b'),
    }
    assert config['batch_size'] == 12 and config['_private'] == 1


def test_overrides_mutate_config_in_place():
    out, config = run('--batch_size=32', '--device=cpu', '--learning_rate=1e-3')
    assert config['batch_size'] == 32 and config['device'] == 'cpu' and config['learning_rate'] == 1e-3
    assert out['batch_size'] == 32 and out['device'] == 'cpu'


def test_verbose_prints_overrides(capsys, tmp_path):
    path = write(tmp_path, "batch_size = 8\n")
    configure(defaults(), [path, '--device=cpu'], verbose=True)
    printed = capsys.readouterr().out
    assert f"Overriding config with {path}" in printed
    assert "Overriding: batch_size = 8" in printed
    assert "Overriding: device = 'cpu'" in printed
    configure(defaults(), [path, '--device=cpu'], verbose=False)
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize('text, expected', [
    ('True', True), ('False', False), ('true', True), ('FALSE', False), ('1', True), ('0', False),
])
def test_bool(text, expected):
    out, _ = run(f'--compile={text}')
    assert out['compile'] is expected


@pytest.mark.parametrize('text', ['yes', '2', '1.0', 'None', ''])
def test_bool_rejects_other_values(text):
    with pytest.raises(ValueError, match=r"'compile' expects bool"):
        run(f'--compile={text}')


def test_int_rejects_bool_float_and_text():
    for text in ['1.5', 'True', 'big', '[1]']:
        with pytest.raises(ValueError, match=r"'batch_size' expects int, got " + text.replace('[', r'\[')):
            run(f'--batch_size={text}')


def test_int_rejects_scientific_notation_with_hint():
    with pytest.raises(ValueError, match=r"expects int, got 1e3 \(a float; write 1000 for an int\)"):
        run('--batch_size=1e3')


def test_float_accepts_int_and_converts():
    out, _ = run('--learning_rate=1')
    assert out['learning_rate'] == 1.0 and type(out['learning_rate']) is float
    out, _ = run('--learning_rate=3e-4')
    assert out['learning_rate'] == 3e-4


@pytest.mark.parametrize('text', ['fast', 'True', '[0.1]'])
def test_float_rejects_non_numbers(text):
    with pytest.raises(ValueError, match=r"'learning_rate' expects float"):
        run(f'--learning_rate={text}')


@pytest.mark.parametrize('text, expected', [
    ('resume', 'resume'),              # not a literal: raw text
    ('"ROMEO:"', 'ROMEO:'),            # quoted literal
    ('ROMEO:', 'ROMEO:'),              # what the shell passes for --start="ROMEO:"
    ('123', '123'),                    # a literal of another type: raw text
    ('None', 'None'),
    ('FILE:prompt.txt', 'FILE:prompt.txt'),
    ('a=b', 'a=b'),                    # only the first '=' separates key and value
])
def test_str_takes_raw_text(text, expected):
    out, _ = run(f'--init_from={text}')
    assert out['init_from'] == expected


@pytest.mark.parametrize('text, expected', [
    ('256,512,1024', (256, 512, 1024)),
    ('[32, 64]', (32, 64)),
    ('(8,)', (8,)),
    ('16', (16,)),
])
def test_tuple_of_int(text, expected):
    out, _ = run(f'--widths={text}')
    assert out['widths'] == expected and type(out['widths']) is tuple


def test_list_of_float_promotes_ints_and_keeps_list_type():
    out, _ = run('--betas=0.8,1')
    assert out['betas'] == [0.8, 1.0] and type(out['betas']) is list
    assert all(type(b) is float for b in out['betas'])


def test_tuple_of_str():
    out, _ = run('--names=x,y,z')
    assert out['names'] == ('x', 'y', 'z')


@pytest.mark.parametrize('text', ['64,abc', '1.5,2', '[64, True]'])
def test_tuple_rejects_bad_elements(text):
    with pytest.raises(ValueError, match=r"'widths' expects tuple of int"):
        run(f'--widths={text}')


def test_unknown_key_suggests_closest():
    with pytest.raises(ValueError, match=r"unknown config key 'batch_szie'.*did you mean batch_size\?"):
        run('--batch_szie=4')


def test_unknown_key_without_close_match_points_to_help():
    with pytest.raises(ValueError, match=r"unknown config key 'zzz'.*--help"):
        run('--zzz=4')


@pytest.mark.parametrize('name', ['_private', 'math', 'helper', 'Thing', 'nothing', 'table'])
def test_non_configurable_names_are_unknown(name):
    with pytest.raises(ValueError, match=f"unknown config key '{name}'"):
        run(f'--{name}=1')


def test_key_without_value_explains_form():
    with pytest.raises(ValueError, match=r"--compile=True"):
        run('--compile')
    with pytest.raises(ValueError, match=r"--key=value"):
        run('--batch_size')
    with pytest.raises(ValueError, match=r"--key=value"):
        run('-x')


def test_config_file(tmp_path):
    path = write(tmp_path, (
        "import os\n"
        "from math import sqrt\n"
        "def _twice(x):\n"
        "    return 2 * x\n"
        "class Helper:\n"
        "    pass\n"
        "_scratch = 3\n"
        "batch_size = _twice(16)\n"
        "learning_rate = 1\n"
        "widths = [int(sqrt(16)), 8]\n"
        "init_from = os.path.basename(__file__)\n"
    ))
    out, config = run(path)
    assert out['batch_size'] == 32
    assert out['learning_rate'] == 1.0 and type(out['learning_rate']) is float
    assert out['widths'] == (4, 8)
    assert out['init_from'] == 'cfg.py'
    assert 'os' not in out and '_scratch' not in config and 'Helper' not in config


def test_later_arguments_win(tmp_path):
    first = write(tmp_path, "batch_size = 8\ndevice = 'mps'\n", 'first.py')
    second = write(tmp_path, "batch_size = 16\n", 'second.py')
    out, _ = run(first, '--batch_size=4', second)
    assert out['batch_size'] == 16 and out['device'] == 'mps'
    out, _ = run(first, second, '--batch_size=4')
    assert out['batch_size'] == 4


def test_config_file_unknown_key_names_file_and_suggests(tmp_path):
    path = write(tmp_path, "lerning_rate = 1e-3\n")
    with pytest.raises(ValueError) as e:
        run(path)
    message = str(e.value)
    assert path in message and "'lerning_rate'" in message and "did you mean learning_rate?" in message


def test_config_file_values_are_type_checked(tmp_path):
    path = write(tmp_path, "batch_size = 5e3\n")
    with pytest.raises(ValueError, match=r"cfg\.py: config key 'batch_size' expects int, got 5000\.0"):
        run(path)
    # the command-line conveniences don't apply to Python values
    path = write(tmp_path, "compile = 'false'\n")
    with pytest.raises(ValueError, match=r"'compile' expects bool .*, got 'false'"):
        run(path)
    path = write(tmp_path, "device = 0\n")
    with pytest.raises(ValueError, match=r"'device' expects str, got 0"):
        run(path)


def test_missing_config_file(tmp_path):
    missing = str(tmp_path / 'nope.py')
    with pytest.raises(UserError, match=r"nope\.py.*config/"):
        run(missing)


def test_forgotten_dashes_hint():
    with pytest.raises(UserError, match=r"did you mean --batch_size=4\?"):
        run('batch_size=4')


@pytest.mark.parametrize('flag', ['-h', '--help'])
def test_help_lists_keys_and_exits_zero(flag, capsys):
    with pytest.raises(SystemExit) as e:
        run('--batch_size=4', flag)
    assert e.value.code == 0
    printed = capsys.readouterr().out
    assert re.search(r"--batch_size=12 +int\n", printed)  # the defaults, not the overrides
    assert re.search(r"--device='cuda' +str\n", printed)
    assert re.search(r"--compile=True +bool", printed)
    assert re.search(r"--widths=\(64, 128\) +tuple of int", printed)
    assert 'math' not in printed and '_private' not in printed


def test_help_says_what_each_setting_means(tmp_path, monkeypatch, capsys):
    """A setting's --help is its comment: at the end of its line, or the lines just above it (not
    a section's heading); a model setting's is its comment in model.GPTConfig."""
    script = write(tmp_path, "import sys\n"
                             "from configurator import configure, model_settings\n"
                             "# ---- a section\n"
                             "steps = 10 # how many steps\n"
                             "# the grid of\n"
                             "# learning rates\n"
                             "lrs = [1, 2]\n"
                             "globals().update(model_settings(n_layer=2))\n"
                             "configure(globals(), sys.argv[1:])\n"
                             "steps = 3 # a later assignment, not the setting\n", name='script.py')
    monkeypatch.setattr(sys, 'argv', [script, '--help'])
    monkeypatch.setattr(sys, 'excepthook', sys.excepthook)
    with pytest.raises(SystemExit):
        runpy.run_path(script, run_name='__main__')
    lines = {line.split()[0].split('=')[0]: line for line in capsys.readouterr().out.splitlines()
             if line.startswith('  --')}
    assert lines['--steps'].endswith('int; how many steps')
    assert lines['--lrs'].endswith('list of int (e.g. 1,2,3 or [1,2,3]); the grid of learning rates')
    assert lines['--n_layer'].endswith('int; transformer blocks') and '--n_layer=2' in lines['--n_layer']
    assert '--vocab_size' not in lines # never a setting: the data's and 'a section' not in ''.join(lines.values())


def test_script_style_usage():
    # the way a script uses it: module globals in, module globals changed
    module = types.ModuleType('script')
    exec("batch_size = 12\ndevice = 'cuda'\n", module.__dict__)
    out = configure(vars(module), ['--batch_size=2'], verbose=False)
    assert module.batch_size == 2 and out == {'batch_size': 2, 'device': 'cuda'}
