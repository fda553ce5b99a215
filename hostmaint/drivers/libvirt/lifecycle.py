"""Where and why each domain last stopped, as libvirt's lifecycle events told this driver's connections.

A persistent domain that stops keeps its definition and libvirt's reason (``shut_off_reasons`` reads
it). A transient one leaves nothing behind: once a tenant destroys it, or its guest shuts down, libvirt
no longer knows it existed, and a drain that finds it running nowhere could only call it lost. Every
connection the driver opens registers for lifecycle events (one call, on libvirt's event loop that
keepalive runs already), so a stop that happens while any connection to its host is open is known:
on which host, and libvirt's word for why.

What is kept is the last word per domain name: a start anywhere (or a listing that finds it running)
clears its stop, so an old stop of the same name never explains a later disappearance. A stop no
connection saw (none was open to that host then, or it happened in another process) is not known here,
and the caller treats the VM as it did before: missing."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable

import libvirt

from hostmaint.drivers.base import SHUTOFF_REASONS

# virDomainEventStoppedDetailType -> the word of SHUTOFF_REASONS libvirt gives the same stop as a state reason
_STOPPED_DETAIL = {
    libvirt.VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN: "shutdown",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_DESTROYED: "destroyed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_MIGRATED: "migrated",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_SAVED: "saved",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_FAILED: "failed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_FROM_SNAPSHOT: "from-snapshot",
}
assert set(_STOPPED_DETAIL.values()) <= set(SHUTOFF_REASONS)


class StopJournal:
    """Domain name -> host -> the reason of its last stop there this process saw, until it starts again.

    Per host, because one migration stops a domain twice: a tenant destroys it on its source and the
    target then tears down the incoming copy ("failed"); the source's word is the one that explains it.
    Bounded: past ``limit`` names the oldest are forgotten (such a VM reads as missing, as without
    the journal)."""

    def __init__(self, limit: int = 65536, clock: Callable[[], float] = time.monotonic) -> None:
        self._limit = limit
        self._clock = clock
        self._lock = threading.Lock()
        self._stops: dict[str, dict[str, tuple[str, float]]] = {}
        self._callbacks: dict[int, int] = {}  # id(connection) -> its registration
        self._incoming: set[tuple[str, str]] = set()  # (name, host): a migration's copy, not running yet

    def listen(self, conn: libvirt.virConnect, host: str) -> None:
        """Register for ``conn``'s lifecycle events, told as stops on ``host``. A connection that cannot
        (a driver without events) is used as before: its stops are not known here. Call
        :meth:`unlisten` before closing it."""
        register: Callable[..., int] | None = getattr(conn, "domainEventRegisterAny", None)
        if register is None:
            return
        try:
            callback = register(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._event, host)
        except libvirt.libvirtError:
            return  # the connection still serves; only this journal is the poorer
        with self._lock:
            self._callbacks[id(conn)] = callback

    def unlisten(self, conn: libvirt.virConnect) -> None:
        """Deregister ``conn``'s callback: a registration holds a reference to the connection, and
        libvirt's close leaves the connection (its socket) open until it goes."""
        with self._lock:
            callback = self._callbacks.pop(id(conn), None)
        if callback is None:
            return
        try:
            conn.domainEventDeregisterAny(callback)
        except libvirt.libvirtError:
            pass  # a broken connection: closing it ends the registration with it

    def _event(self, _conn: libvirt.virConnect, dom: libvirt.virDomain, event: int, detail: int, host: str) -> None:
        # on libvirt's event loop thread: nothing here may call back into libvirt over the network
        try:
            name = dom.name()
        except libvirt.libvirtError:
            return
        if event == libvirt.VIR_DOMAIN_EVENT_STOPPED:
            with self._lock:
                # an incoming migration's copy that never took over: libvirt tears it down when the move
                # fails, and words that "destroyed" (seen on the lab) though nobody destroyed a running VM.
                # The mark stays until it runs there: every connection to the host hears each event
                reason = "failed" if (name, host) in self._incoming else _STOPPED_DETAIL.get(detail, "unknown")
                hosts = self._stops.pop(name, {})  # re-inserted last: the dict's order is the stops' order
                hosts[host] = (reason, self._clock())
                self._stops[name] = hosts
                while len(self._stops) > self._limit:
                    del self._stops[next(iter(self._stops))]
        elif event == libvirt.VIR_DOMAIN_EVENT_STARTED and detail == libvirt.VIR_DOMAIN_EVENT_STARTED_MIGRATED:
            with self._lock:
                if len(self._incoming) >= self._limit:  # ends missed (no connection saw them): start afresh
                    self._incoming.clear()
                self._incoming.add((name, host))
        elif event in (libvirt.VIR_DOMAIN_EVENT_STARTED, libvirt.VIR_DOMAIN_EVENT_RESUMED):
            # it runs again (started, or a migration's copy resumed where it landed, or its source after a
            # failed one): what stopped before is past. Not an incoming copy's start: it comes when the
            # migration begins, before its source may stop (a failed move's source stop is the word)
            with self._lock:
                self._incoming.discard((name, host))  # a copy that took over runs there now
                self._stops.pop(name, None)

    def now(self) -> float:
        """The journal's clock, read before a listing whose result is given to :meth:`running`."""
        return self._clock()

    def running(self, names: Iterable[str], listed_at: float) -> None:
        """``names`` were found running (not paused) by a listing begun at ``listed_at``: stops recorded
        before it are past (they started again where no connection of ours saw it)."""
        with self._lock:
            for name in names:
                hosts = self._stops.get(name)
                if hosts is not None and all(at < listed_at for _, at in hosts.values()):
                    del self._stops[name]

    def stopped_on(self, host: str) -> dict[str, str]:
        """Domains whose last stop on ``host`` has not been followed by a start -> libvirt's reason."""
        with self._lock:
            return {name: hosts[host][0] for name, hosts in self._stops.items() if host in hosts}

    def names(self) -> set[str]:
        """The names with a stop kept (a listing asks :meth:`running` only about those)."""
        with self._lock:
            return set(self._stops)
