"""Building and walking large acyclic data (a snapshot of ~100,000 VMs): without the cycle collector,
and giving back the C heap's memory freed on the way."""

from __future__ import annotations

import functools
import gc
import os
import select
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def collector_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector around a bulk build of acyclic data.

    Parsing a snapshot, or dumping it for its digest, allocates millions of dicts, lists and models
    that hold no reference cycles; every burst of allocations starts a collection that walks each
    live object (the snapshot included), which made loading and hashing superlinear in the fleet's
    size (2-5× the work at 1,000 hosts). Reference counting still frees everything; the collector
    runs again afterwards (unless it was off before)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def release_freed_memory() -> None:
    """Return the C heap's free pages to the system (glibc's ``malloc_trim``; nothing elsewhere).

    Reading a snapshot parses each piece of its text into pydantic-core's own tree, made and freed in
    the C heap between the models Python keeps: at 5,000 hosts ~35 MiB of it stayed free but held
    when the load ended (peak memory 1.96 x the file; with a trim every few pieces 1.68 x)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    import ctypes

    try:
        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim  # the process's C library
    except (OSError, AttributeError):  # not glibc: musl, macOS
        return None
    return trim


class Forked:
    """Bytes a forked child computes from what the parent holds, read once (:meth:`result`).

    A large snapshot's digest (~0.3 s at 5,000 hosts, a core's work that needs nothing but the frozen
    models) can run on the machine's second core while the parent plans: fork shares the models
    copy-on-write instead of sending them anywhere. Only where that is safe: a process of one thread
    (a fork copies no other thread, and a lock another thread held stays held in the child)."""

    def __init__(self, pid: int, fd: int) -> None:
        self._pid, self._fd = pid, fd
        self._done = False

    @classmethod
    def start(cls, work: Callable[[], bytes]) -> Forked | None:
        """``work`` begun in a child, or None where no child can be forked safely (the caller then
        computes it itself): no ``os.fork``, or more than one thread in this process."""
        if not hasattr(os, "fork") or _threads() != 1:
            return None
        read, write = os.pipe()
        try:
            pid = os.fork()
        except OSError:
            os.close(read)
            os.close(write)
            return None
        if pid == 0:  # the child: its answer down the pipe, then gone without the parent's exit handlers
            code = 1
            try:
                os.close(read)
                out = memoryview(work())
                while out:
                    out = out[os.write(write, out):]
                code = 0
            except BaseException:  # noqa: BLE001 - anything: the parent computes it itself
                pass
            finally:
                os._exit(code)
        os.close(write)
        return cls(pid, read)

    def result(self, timeout_s: float = 120.0) -> bytes | None:
        """What the child wrote, once it exited cleanly; None if it failed, was cancelled or gave no
        answer within ``timeout_s`` (it is then stopped): the caller computes it itself."""
        if self._done:
            return None
        parts = []
        deadline = time.monotonic() + timeout_s
        waiting = select.poll()  # not select(): it refuses descriptors past 1,024
        waiting.register(self._fd, select.POLLIN)
        while True:
            if not waiting.poll(max(0, int((deadline - time.monotonic()) * 1000))):
                # stuck (stopped, starved): not worth waiting longer than computing it here
                self.cancel()
                return None
            chunk = os.read(self._fd, 1 << 16)
            if not chunk:
                break
            parts.append(chunk)
        self._done = True
        os.close(self._fd)
        _, status = os.waitpid(self._pid, 0)
        return b"".join(parts) if os.waitstatus_to_exitcode(status) == 0 else None

    def cancel(self) -> None:
        """Stop the child if it still runs, and reap it (no zombie is left)."""
        if self._done:
            return
        self._done = True
        os.close(self._fd)
        try:
            os.kill(self._pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(self._pid, 0)


def _threads() -> int:
    """Threads of this process: the kernel's count where there is one (it sees threads Python did not
    start, a C library's pool), else Python's."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return threading.active_count()
