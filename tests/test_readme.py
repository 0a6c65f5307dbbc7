"""The README is a guide that runs as written: every command it shows names scripts, config files
and --flags that exist (a flag removed from a script fails here), and every relative link in it
and in docs/ resolves, to a file and to a heading of it where it names one."""
import contextlib
import functools
import io
import os
import re
import runpy
import shlex
import sys

import pytest

from conftest import ROOT


def read(path):
    with open(os.path.join(ROOT, path), encoding='utf-8') as f:
        return f.read()


def shell_commands(markdown):
    """The commands of the shell code blocks (continued lines joined, comments dropped) and of the
    inline code spans that start with python or torchrun, each split at && and |."""
    lines, language = [], None # language: the open code block's, None outside one
    for line in markdown.splitlines():
        if line.startswith('```'):
            language = line[3:].strip() if language is None else None
        elif language in ('sh', 'bash', ''):
            lines.append(line)
    lines = '\n'.join(lines).replace('\\\n', ' ').splitlines()
    lines += re.findall(r"`((?:python|torchrun) [^`]+)`", markdown)
    commands = []
    for line in lines:
        line = re.sub(r"\s#.*$", '', line).strip() # a comment after the command
        commands += [part.strip() for part in re.split(r'&&|\|', line) if part.strip()]
    return commands


def script_and_args(command):
    """(the project's script a command runs, its arguments), or None for other programs (pip,
    lm_eval, python -m pytest, python -c)."""
    words = shlex.split(command)
    if len(words) < 2 or '<' in words[1]:
        return None # `python <script>.py --help`: a pattern, not a command
    if words[0] in ('python', 'python3') and len(words) > 1 and not words[1].startswith('-'):
        return words[1], words[2:]
    if words[0] == 'torchrun':
        scripts = [i for i, word in enumerate(words) if word.endswith('.py')]
        return words[scripts[0]], words[scripts[0] + 1:]
    return None


@functools.cache
def settings(script):
    """The --flags `script` takes, from its --help (the configurator's list, or argparse's)."""
    out = io.StringIO()
    argv, excepthook, path = sys.argv, sys.excepthook, list(sys.path)
    sys.argv = [script, '--help']
    cwd = os.getcwd()
    try:
        os.chdir(ROOT)
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
            runpy.run_path(os.path.join(ROOT, script), run_name='__main__')
    finally:
        os.chdir(cwd)
        sys.argv, sys.excepthook, sys.path[:] = argv, excepthook, path
    return set(re.findall(r'^ {2}--(\w+)', out.getvalue(), flags=re.M))


def project_commands():
    found = script_and_args
    return [(command, *found(command)) for command in shell_commands(read('README.md')) if found(command)]


def test_the_readme_shows_commands_of_the_project():
    scripts = {script for _, script, _ in project_commands()}
    assert {'train.py', 'sample.py', 'coord_check.py', 'lr_sweep.py', 'export_hf.py',
            'data/shakespeare_char/prepare.py'} <= scripts, scripts


@pytest.mark.parametrize('command, script, args', project_commands(), ids=lambda value: str(value)[:60])
def test_every_readme_command_names_a_script_config_and_flags_that_exist(command, script, args):
    assert os.path.isfile(os.path.join(ROOT, script)), f"{command}: no {script}"
    for arg in args:
        if arg.startswith('--'):
            flag = arg[2:].split('=', 1)[0]
            assert flag in settings(script), f"{command}: {script} has no --{flag}"
        elif arg.endswith('.py'):
            assert os.path.isfile(os.path.join(ROOT, arg)), f"{command}: no config file {arg}"


def slug(heading):
    """A heading's anchor, as GitHub makes it: lower case, punctuation dropped, spaces to '-'."""
    text = re.sub(r'[^\w\- ]', '', heading.strip().lower().replace('`', ''))
    return text.replace(' ', '-')


def anchors(path):
    return {slug(heading) for heading in re.findall(r'^#+ (.+)$', read(path), flags=re.M)}


@pytest.mark.parametrize('document', ['README.md', 'docs/mup.md', 'docs/mup-study.md'])
def test_every_relative_link_resolves(document):
    here = os.path.dirname(document)
    for target in re.findall(r'\]\(([^)\s]+)\)', read(document)):
        if re.match(r'[a-z]+:', target):
            continue # http(s), mailto: not relative
        path, _, anchor = target.partition('#')
        path = os.path.normpath(os.path.join(here, path)) if path else document
        assert os.path.exists(os.path.join(ROOT, path)), f"{document}: ({target}) names no file"
        if anchor and path.endswith('.md'):
            assert anchor in anchors(path), f"{document}: ({target}) names no heading of {path}"
