"""Showing text that came from hosts (names, reasons, command output) as data, never as formatting.

VM names come from libvirt, so in a self-service cloud a tenant chooses them; host output
and error messages quote whatever the host said. None of it may change what an operator sees:
not a table's rows, not the colours or links of the console, not a markdown artifact, not a
spreadsheet's formulas. Each output has one function here:

- :func:`visible` — one line of plain text: control characters, line breaks, ANSI escapes and
  invisible formatting characters (bidi overrides such as U+202E, zero-width spaces) written
  as visible escapes (``\\n``, ``\\x1b``, ``\\u202e``), and ``\\`` as ``\\\\`` so that an escape
  cannot be faked. Plain text tables (plan rendering) and log lines use it.
- :func:`masked` and :func:`command_line` — for log lines that quote host output or a command:
  secrets masked first (:mod:`hostmaint.redaction`, as the audit record masks them), then
  :func:`visible`. A debug line is still a log line: it reaches the worker's terminal and files.
- :func:`cell` and :func:`labelled` — rich ``Text`` built from that, which rich never reads as
  markup (``[bold]``, ``[/]``, ``[link=...]``) or emoji codes (``:warning:``).
- :func:`markdown_text` and :func:`markdown_code` — for Prefect's markdown artifacts: a table cell
  cannot end its cell or row, nor open emphasis, a link, inline HTML or a code span; a code
  block cannot be closed by the text it holds.
- :func:`spreadsheet_cell` — a CSV cell a spreadsheet will not take as a formula (OWASP's
  guidance on CSV injection: a cell starting with ``= + - @``, tab or CR gets a leading ``'``).

Exports meant for programs (``--json``, JSON lines) carry the exact data and use none of this.
"""

from __future__ import annotations

import re
import shlex
import unicodedata
from collections.abc import Sequence

from rich.text import Text

from hostmaint.redaction import redact_argv, redact_text

# C0/C1 controls and DEL, the invisible "format" characters (bidi embeddings, overrides and isolates,
# zero-width spaces and joiners, the BOM, soft hyphen), the Unicode line and paragraph separators, and
# lone surrogates (a name decoded with surrogateescape), which no terminal can even be sent
_HIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}
# what is read as syntax in a markdown table cell or paragraph: emphasis, code spans, links and
# images, strikethrough, the cell separator, and a heading or list marker should it start a line
_MARKDOWN_SYNTAX = re.compile(r"([\\`*_{}\[\]()#+\-!|~])")
_HTML = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}
# the first characters that make a spreadsheet evaluate a cell (OWASP, "CSV Injection")
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _escape(char: str) -> str:
    named = _NAMED_ESCAPES.get(char)
    if named is not None:
        return named
    if unicodedata.category(char) not in _HIDDEN_CATEGORIES:
        return char
    code = ord(char)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def visible(text: object) -> str:
    """``text`` as one line in which every character shows: controls and invisible characters escaped.

    ``"web\\n01"`` (with a real line break) becomes ``web\\\\n01`` as it would be typed; an ANSI
    colour code or a right-to-left override shows as ``\\x1b`` or ``\\u202e`` instead of acting.
    Printable text, non-Latin scripts included, is unchanged.
    """
    return "".join(_escape(c) for c in str(text))


def masked(text: object) -> str:
    """``text`` for a log line: its secrets masked (:func:`~hostmaint.redaction.redact_text`), then :func:`visible`.

    Masking comes first: a line break escaped first would join two lines into one value
    (``mode=1\\npassword=x``) and leave the second line's secret readable.
    """
    return visible(redact_text(str(text)))


def command_line(argv: Sequence[str]) -> str:
    """``argv`` as the one line a log shows for a command: each word masked as the audit masks a hook's
    argv (so the log and the record hide the same), the words quoted as a shell would take them
    (``shlex.join``), then :func:`visible`.
    """
    return visible(shlex.join(redact_argv(argv)))


def cell(text: object, style: str = "") -> Text:
    """A rich table cell or printable showing ``text`` literally (see :func:`visible`): no markup, no emoji."""
    return Text(visible(text), style=style)


def labelled(label: str, style: str, text: object, lines: Sequence[object] = ()) -> Text:
    """``label`` in ``style``, a space and ``text`` on one line, then each of ``lines`` on its own,
    indented: the CLI's ``error: ...`` messages. Only ``lines`` break lines: a line break in a
    name a message quotes is shown as ``\\n``, so it cannot start a line that looks like another message.
    """
    return Text.assemble((label, style), " ", visible(text), *(f"\n  {visible(line)}" for line in lines))


def markdown_text(text: object) -> str:
    """``text`` for a markdown table cell or paragraph: one line, its markdown syntax and HTML escaped."""
    plain = visible(text)
    plain = "".join(_HTML.get(c, c) for c in plain)
    return _MARKDOWN_SYNTAX.sub(r"\\\1", plain)


def markdown_code(text: str, info: str = "") -> str:
    """``text`` as a fenced markdown code block that nothing in it can close.

    The fence is one backtick longer than the longest run of backticks in the text (CommonMark's
    rule); control and invisible characters are escaped line by line, so the block shows what the
    text holds. A ``\\`` stays as it is (a code block shows it literally): text already made
    :func:`visible`, such as a rendered plan, is not escaped twice.
    """
    body = "\n".join("".join(c if c == "\\" else _escape(c) for c in line) for line in text.split("\n"))
    longest = max((len(run) for run in re.findall(r"`+", body)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{info}\n{body}\n{fence}\n"


def spreadsheet_cell(value: object) -> object:
    """``value`` for a CSV cell: a string a spreadsheet would evaluate gets a leading ``'`` (numbers stay).

    Applied to the export only: the stored record, and the JSON export, keep the exact text.
    """
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


__all__ = ["FORMULA_STARTS", "cell", "command_line", "labelled", "markdown_code", "markdown_text", "masked",
           "spreadsheet_cell", "visible"]
