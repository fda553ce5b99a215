"""Masking secrets in text and data before anyone sees them: audit records, errors, logs, the CLI.

Kept apart from the audit trail so that the exception tree (hostmaint.errors) can mask every
error message when it is made: an error quoting dnf's output carries the repository URL with its
password, and it reaches host states, run results, Prefect's logs and the UI.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

REDACTED = "***redacted***"
SECRET_KEY_PARTS = ("password", "passphrase", "secret", "token", "privatekey", "keymaterial", "apikey",
                    "authorization")
# scheme://user:password@ : the password runs to the last "@" before the path or a space, so one that
# holds a raw "@" is still masked whole (the user part stays: it says which account leaked nothing).
# The scheme is at most 32 characters, and a name starts where a run of name characters starts: both
# patterns read host output, and unbounded there they tried every position of a long "a.a.a..." token
# again (quadratic: 40 kB of one line took 50 s, in every error that quoted it)
_URL_PASSWORD = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]{0,31}://[^\s/:@]*):(?P<password>[^\s/]*)@")
# name=value pairs (URL query parameters, key=value lines): redacted when the name looks secret
_NAMED_VALUE = re.compile(r"(?<![A-Za-z0-9_.-])(?P<name>[A-Za-z0-9_.-]+)=(?P<value>\"[^\"]*\"|'[^']*'|[^&\s#;,'\"]+)")


def is_secret_name(key: object) -> bool:
    """Whether a field or parameter of this name holds a secret (see :func:`redact`)."""
    squashed = str(key).lower().replace("_", "").replace("-", "")
    return any(part in squashed for part in SECRET_KEY_PARTS)


def holds_private_key(text: str) -> bool:
    """Whether ``text`` holds a PEM/OpenSSH private key."""
    return "-----BEGIN" in text and "PRIVATE KEY" in text


def redact_text(text: str) -> str:
    """``text`` with the credentials it carries masked; the rest stays readable.

    A string holding a PEM private key becomes ``"***redacted***"`` whole. In any other,
    a URL's password is masked (``https://svc:***@repo.corp/...``: dnf and librepo print
    repository URLs with their credentials when a download fails) and so is the value of
    any ``name=value`` whose name looks secret (``?token=***``, ``password=***``). The same
    text always gives the same result, so a redacted record hashes the same on every check.
    Use it on any text built from host output or errors that is shown to people.
    """
    if holds_private_key(text):
        return REDACTED
    text = _URL_PASSWORD.sub(lambda m: f"{m['head']}:***@", text)
    return _NAMED_VALUE.sub(lambda m: f"{m['name']}=***" if is_secret_name(m["name"])
                            else f"{m['name']}={_inner_masked(m['value'])}", text)


_NOT_NAME = re.compile(r"[^A-Za-z0-9_.-]")


def _inner_masked(value: str) -> str:
    """The value of a ``name=value`` whose name is not secret, with what follows a secret name inside it
    masked: an option's value can be a pair itself (``--setopt=repo.password=X``, ``--data=token=X``).
    One pass over its ``=``-separated parts (a loop over nested matches would be quadratic in host output
    such as ``a=a=a=...``)."""
    if "=" not in value:
        return value
    parts = value.split("=")
    for i, part in enumerate(parts[:-1]):
        if is_secret_name(_NOT_NAME.split(part)[-1]):
            return "=".join(parts[:i + 1]) + "=***"
    return value


def redact_argv(argv: Sequence[str]) -> list[str]:
    """A command's words with their secrets masked: each word as :func:`redact_text` masks it, and the word
    after an option whose name looks secret (``--password X``, ``--api-token X``) whole."""
    out: list[str] = []
    secret_next = False
    for word in argv:
        out.append(REDACTED if secret_next else redact_text(word))
        secret_next = word.startswith("-") and "=" not in word and is_secret_name(word)
    return out


def redact(value: Any) -> Any:
    """A copy of ``value`` with secrets replaced by ``"***redacted***"``.

    The value of any key that looks secret (password, passphrase, secret, token,
    private_key, key_material, api_key, authorization; any case, as a substring, ``-``
    and ``_`` ignored) is replaced whole, whatever it holds; every other string goes
    through :func:`redact_text` (PEM keys whole, URL passwords and secret ``name=value``
    pairs masked). Dicts, lists and tuples are walked recursively.
    """
    if isinstance(value, Mapping):
        return {k: (REDACTED if is_secret_name(k) else redact(v)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        if value and all(isinstance(v, str) for v in value):
            return redact_argv(value)  # a command's words: "--password X" hides X
        return [redact(v) for v in value]
    if isinstance(value, str):
        return redact_text(value)
    return value


__all__ = ["REDACTED", "SECRET_KEY_PARTS", "holds_private_key", "is_secret_name", "redact", "redact_argv",
           "redact_text"]
