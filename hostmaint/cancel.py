"""Stopping a run safely: the cancellation signal the core checks, and the error a stopped step raises.

A :class:`Cancellation` is a ``threading.Event`` that also says who asked. The drain checks it in
its admission loop and its monitor (``hostmaint.migration.drain``: once set, nothing new starts and
what runs is aborted, except post-copy migrations, which finish); the maintenance steps check it
between steps. Whatever sets it (a signal handler, a poll of the orchestrator's run state, a test)
lives outside the core: this module knows nothing of Prefect.
"""

from __future__ import annotations

import threading

from hostmaint.errors import StepError
from hostmaint.models import Step

UNKNOWN = "an operator (not recorded)"
# How long a stopped step waits, before it writes its record, for a name still being looked up (a signal
# says only that someone asked; who is on the orchestrator): within the runner's grace period, and
# a wait only when a lookup is under way
NAMING_WAIT_S = 10.0


class Cancellation(threading.Event):
    """A request to stop: set once, by someone, for a reason; never cleared."""

    def __init__(self) -> None:
        super().__init__()
        self.by = UNKNOWN
        self._named = threading.Event()
        self._named.set()  # no lookup of who asked is under way

    def cancel(self, by: str | None = None) -> None:
        """Ask the run to stop; the first caller who names themselves is who cancelled it."""
        if by and (not self.is_set() or self.by == UNKNOWN):
            self.by = by
        self.set()

    def naming(self) -> None:
        """Someone is finding out who asked (before :meth:`cancel` without a name): :meth:`who` waits
        for :meth:`named`, so a record written meanwhile does not say "not recorded" of a name that was."""
        self._named.clear()

    def named(self, by: str | None = None) -> None:
        """The lookup :meth:`naming` announced is over, with ``by`` if it found who."""
        self.cancel(by)
        self._named.set()

    def who(self, wait_s: float = NAMING_WAIT_S) -> str:
        """Who asked, once a lookup under way has ended (at most ``wait_s`` later)."""
        self._named.wait(wait_s)
        return self.by

    @property
    def reason(self) -> str:
        """The host's reason for staying out of service: ``cancelled by X``."""
        return f"cancelled by {self.by}"

    def check(self, host: str | None = None, step: Step | None = None) -> None:
        """Raise :class:`RunCancelled` if the run was asked to stop (between steps)."""
        if self.is_set():
            raise RunCancelled(self.reason, host, step)


class RunCancelled(StepError):
    """The run was cancelled; its host was left out of service with the reason, every VM on one host."""
