"""The CLI's rich consoles: complete output whether a terminal or a pipe reads it.

rich fits its output to the terminal, and with no terminal to 80 columns (or ``$COLUMNS``): in a
pipe or a log file every table column was cut to "…" and each message on stderr wrapped mid-sentence.
Without a terminal these consoles are wide enough for any table (a table takes only the width it
needs) and never wrap a message; in a terminal rich sizes to it as usual. ``--json`` is still the
format for programs.
"""

from __future__ import annotations

import sys

from rich.console import Console

NO_TERMINAL_WIDTH = 10_000  # wider than any row hostmaint prints; rich pads nothing to it


def make_console(*, stderr: bool = False) -> Console:
    """A console for stdout (or stderr) that cuts and wraps nothing when no terminal reads it."""
    stream = sys.stderr if stderr else sys.stdout
    if stream.isatty():
        return Console(stderr=stderr, highlight=False)
    return Console(stderr=stderr, highlight=False, width=NO_TERMINAL_WIDTH, soft_wrap=True)
