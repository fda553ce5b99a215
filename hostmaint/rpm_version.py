"""How rpm orders versions: ``rpmvercmp`` on version segments, ``[E:]V-R`` strings, and the newest
of installed kernels (``uname -r`` style). Pure; the patching steps and the simulated hosts share it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


def _alnum(c: str) -> bool:
    return c.isascii() and c.isalnum()


def rpmvercmp(a: str, b: str) -> int:
    """rpm's version segment comparison (``rpmvercmp``): -1, 0 or 1. Handles ``~`` and ``^``."""
    if a == b:
        return 0
    i = j = 0
    while i < len(a) or j < len(b):
        while i < len(a) and not _alnum(a[i]) and a[i] not in "~^":
            i += 1
        while j < len(b) and not _alnum(b[j]) and b[j] not in "~^":
            j += 1
        ca = a[i] if i < len(a) else ""
        cb = b[j] if j < len(b) else ""
        if ca == "~" or cb == "~":  # tilde sorts before everything, even the end
            if ca != "~":
                return 1
            if cb != "~":
                return -1
            i, j = i + 1, j + 1
            continue
        if ca == "^" or cb == "^":  # caret sorts after the end but before anything else
            if not ca:
                return -1
            if not cb:
                return 1
            if ca != "^":
                return 1
            if cb != "^":
                return -1
            i, j = i + 1, j + 1
            continue
        if not (ca and cb):
            break
        numeric = ca.isdigit()
        kind = (lambda c: c.isascii() and c.isdigit()) if numeric else (lambda c: c.isascii() and c.isalpha())
        si, sj = i, j
        while i < len(a) and kind(a[i]):
            i += 1
        while j < len(b) and kind(b[j]):
            j += 1
        seg_a, seg_b = a[si:i], b[sj:j]
        if not seg_b:  # different segment types: numeric is newer
            return 1 if numeric else -1
        if numeric:
            seg_a, seg_b = seg_a.lstrip("0"), seg_b.lstrip("0")
            if len(seg_a) != len(seg_b):
                return 1 if len(seg_a) > len(seg_b) else -1
        if seg_a != seg_b:
            return 1 if seg_a > seg_b else -1
    if i >= len(a) and j >= len(b):
        return 0
    return -1 if i >= len(a) else 1


def split_evr(evr: str) -> tuple[int, str, str]:
    """``[E:]V[-R]`` → (epoch, version, release)."""
    epoch = 0
    if ":" in evr:
        e, evr = evr.split(":", 1)
        # ASCII digits only: str.isdigit() is true of "²", which int() refuses (a ValueError out of a
        # host's package list); anything else is no epoch, as rpm's EPOCHNUM never prints one
        epoch = int(e) if e.isascii() and e.isdigit() else 0
    version, _, release = evr.rpartition("-") if "-" in evr else (evr, "", "")
    return epoch, version, release


def evr_compare(a: str, b: str) -> int:
    """Compare two ``[E:]V-R`` strings the way rpm orders packages."""
    ea, va, ra = split_evr(a)
    eb, vb, rb = split_evr(b)
    if ea != eb:
        return 1 if ea > eb else -1
    return rpmvercmp(va, vb) or rpmvercmp(ra, rb)


def newest(versions: Sequence[str], compare: Callable[[str, str], int] = evr_compare) -> str:
    """The newest of ``versions`` (not empty) by ``compare``; of equals, the first."""
    best = versions[0]
    for v in versions[1:]:
        if compare(v, best) > 0:
            best = v
    return best


def kernel_compare(a: str, b: str) -> int:
    """Compare two ``uname -r`` style strings (``V-R.arch``) by version-release."""
    return evr_compare(a.rsplit(".", 1)[0], b.rsplit(".", 1)[0])


def newest_kernel(kernels: Sequence[str]) -> str:
    """The newest of ``uname -r`` style strings (``V-R.arch``)."""
    return newest(kernels, kernel_compare)


