"""
The error a user can fix: a bad setting or a bad input file. Its message names the problem and
the fix; a script that called configurator.configure() prints it as one line, without a
traceback, and exits non-zero (a bug keeps its traceback). Library code raises it where the
cause is the user's input (checkpoints.py, data.py) without depending on the command line.
"""


class UserError(ValueError):
    """A bad setting or input file: the message names it, its value and the fix."""


def first_line(error):
    """The first line of an exception's message, to quote in a one-line error ('' if it has
    none)."""
    return (str(error).strip().splitlines() or [''])[0]
