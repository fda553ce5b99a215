"""Connections to the hosts' libvirtd: one per host per thread, opened through an injected connector,
and the capabilities cache that lives and dies with them.

libvirt errors of the connection itself are mapped here: a connection that failed or dropped is
``TransientDriverError`` naming host and URI (after reconnect attempts with tenacity); any other
libvirt error of a call is ``DriverError`` naming the host and what was being done.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol, TypeVar

import libvirt
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from hostmaint.drivers.domain_xml import HostCapabilities
from hostmaint.drivers.libvirt.lifecycle import StopJournal
from hostmaint.errors import DriverError, TransientDriverError, without_host

T = TypeVar("T")

# Errors that mean "the connection, not the operation, failed".
_CONNECTION_DOMAINS = {libvirt.VIR_FROM_RPC, libvirt.VIR_FROM_REMOTE}
_CONNECTION_CODES = {libvirt.VIR_ERR_NO_CONNECT, libvirt.VIR_ERR_INVALID_CONN}


def _silence_libvirt(_ctx: object, _err: object) -> None:
    """libvirt prints every error to stderr by default; ours are raised as exceptions instead."""


libvirt.registerErrorHandler(_silence_libvirt, None)

_event_loop_lock = threading.Lock()
_event_loop_started = False


def _ensure_event_loop() -> None:
    """Run libvirt's default event loop in a daemon thread (once per process).

    Keepalive needs it: without keepalive a call to a host that vanished (powered off, its
    network gone) waits for TCP to give up, which takes many minutes.
    """
    global _event_loop_started
    with _event_loop_lock:
        if _event_loop_started:
            return
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=run, name="libvirt-events", daemon=True).start()
        _event_loop_started = True


class Connector(Protocol):
    """Opens a libvirt connection to ``uri``; raises ``libvirt.libvirtError`` when it cannot."""

    def __call__(self, uri: str) -> libvirt.virConnect: ...


def open_libvirt(uri: str) -> libvirt.virConnect:
    """The real connector: ``libvirt.open``, with libvirt's event loop running for keepalive."""
    _ensure_event_loop()
    return libvirt.open(uri)


def message(exc: libvirt.libvirtError) -> str:
    """libvirt's own message of ``exc``, stripped."""
    return str(exc.get_error_message() or exc).strip()


def is_connection_error(exc: libvirt.libvirtError) -> bool:
    """True when ``exc`` says the connection failed, not the operation."""
    return exc.get_error_domain() in _CONNECTION_DOMAINS or exc.get_error_code() in _CONNECTION_CODES


def lookup(conn: libvirt.virConnect, vm: str) -> libvirt.virDomain | None:
    """The domain ``vm`` on ``conn``, or None when the host has no such domain."""
    for attempt in range(3):
        try:
            return conn.lookupByName(vm)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            if exc.get_error_code() in (None, libvirt.VIR_ERR_OK) and attempt < 2:
                # failed without saying why: seen on the lab while an aborted migration's incoming
                # domain was torn down on the target; a moment later the answer is a real one
                time.sleep(0.2)
                continue
            raise
    return None  # not reached: the last attempt returns or raises


def is_running(conn: libvirt.virConnect, vm: str) -> bool:
    """True when ``vm`` is defined on ``conn``'s host and running there."""
    dom = lookup(conn, vm)
    if dom is None:
        return False
    try:
        return bool(dom.isActive())
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return False  # it left while we looked
        raise


class _ConnectionLost(TransientDriverError):
    """The cached connection broke during a call; tenacity reconnects and retries."""


@dataclass(frozen=True)
class ConnectionSettings:
    """How connections are opened, kept and closed.

    ``retries``: attempts to open a connection, or to redo a call whose connection dropped.
    ``keepalive_*``: libvirt keepalive, so a call to a vanished host fails instead of hanging.
    ``close_timeout_s``: how long a close may wait for a host that does not answer.
    ``capabilities_ttl_s``: how long a host's parsed capabilities are reused.
    """

    retries: int = 3
    keepalive_interval_s: int = 5
    keepalive_count: int = 3
    close_timeout_s: float = 5.0
    capabilities_ttl_s: float = 60.0


class CapabilitiesCache:
    """Each host's parsed capabilities, kept for a TTL and forgotten whenever a connection to the host
    is opened anew or lost.

    getCapabilities costs ~0.2 s on the lab and a run discovers a host about ten times; its topology
    only changes with a reboot, its hugepage pools when an admin resizes them (the TTL bounds that;
    free memory and pages are read live). A reboot ends every connection, but a thread that opens its
    first one cannot tell that from a reboot, so any new connection to a host forgets its
    capabilities. The generation counts those forgettings: a read that began before one is not kept
    (it may have come over a connection to the host before its reboot).
    """

    def __init__(self, ttl_s: float, clock: Callable[[], float]) -> None:
        self._ttl = ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[float, HostCapabilities]] = {}
        self._generation: dict[str, int] = {}

    def get(self, host: str, read: Callable[[], HostCapabilities]) -> HostCapabilities:
        """The cached capabilities of ``host``, or what ``read`` returns (kept unless forgotten meanwhile)."""
        now = self._clock()
        with self._lock:
            cached = self._entries.get(host)
            generation = self._generation.get(host, 0)
        if cached is not None and now - cached[0] < self._ttl:
            return cached[1]
        caps = read()
        with self._lock:
            if self._generation.get(host, 0) == generation:  # no new connection since the read began
                self._entries[host] = (now, caps)
        return caps

    def forget(self, host: str) -> None:
        """Drop ``host``'s capabilities: it may have rebooted or its libvirtd restarted."""
        with self._lock:
            self._entries.pop(host, None)
            self._generation[host] = self._generation.get(host, 0) + 1


class Connections:
    """This driver's connections: ``call(host, what, fn)`` runs ``fn`` on the calling thread's
    connection to ``host``, reconnecting when it dropped.

    ``uris`` maps inventory host names to libvirt URIs (``qemu+tcp://10.213.7.11/system``).
    """

    def __init__(self, uris: Mapping[str, str], *, connector: Connector = open_libvirt,
                 settings: ConnectionSettings = ConnectionSettings(),
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> None:
        self._uris = dict(uris)
        self._connector = connector
        self._settings = settings
        self._retries = max(1, settings.retries)
        self._sleep = sleep
        self.capabilities = CapabilitiesCache(settings.capabilities_ttl_s, clock)
        # where each domain last stopped, as every connection's lifecycle events tell it (a transient
        # guest a tenant destroys leaves no other trace)
        self.stops = StopJournal()
        self._local = threading.local()
        self._lock = threading.Lock()
        self._opened: list[libvirt.virConnect] = []
        self._owner: dict[int, threading.Thread] = {}  # id(cached connection) -> the thread it serves
        self._idle: dict[str, list[libvirt.virConnect]] = {}  # lent connections given back, per host

    @property
    def hosts(self) -> tuple[str, ...]:
        """The hosts this driver knows, in inventory order."""
        return tuple(self._uris)

    def uri(self, host: str) -> str:
        """The libvirt URI of ``host``; DriverError naming it when it is not in the inventory."""
        try:
            return self._uris[host]
        except KeyError:
            raise DriverError(f"unknown host (not in this driver's inventory: {', '.join(self._uris)})",
                              host) from None

    def open(self, host: str) -> libvirt.virConnect:
        """A new connection of its own (not this thread's cached one), retried with back-off; close it
        with :meth:`close_one`. Raises TransientDriverError naming host and URI."""
        uri = self.uri(host)

        def attempt() -> libvirt.virConnect:
            try:
                conn = self._connector(uri)
            except libvirt.libvirtError as exc:
                raise TransientDriverError(f"cannot connect to libvirt at {uri}: {message(exc)}", host) from exc
            try:
                # a vanished host fails calls instead of hanging them
                conn.setKeepAlive(self._settings.keepalive_interval_s, self._settings.keepalive_count)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() not in (libvirt.VIR_ERR_NO_SUPPORT, libvirt.VIR_ERR_OPERATION_UNSUPPORTED):
                    raise TransientDriverError(f"keepalive on {uri}: {message(exc)}", host) from exc
            self.stops.listen(conn, host)
            with self._lock:
                self._opened.append(conn)
            self.capabilities.forget(host)  # the host may have rebooted since they were read
            return conn

        retrying = Retrying(stop=stop_after_attempt(self._retries), wait=wait_exponential(multiplier=0.2, max=2.0),
                            retry=retry_if_exception_type(TransientDriverError), sleep=self._sleep, reraise=True)
        return retrying(attempt)

    @contextmanager
    def lend(self, host: str) -> Iterator[libvirt.virConnect]:
        """A connection for one long call that has it to itself (a migration job's), given back afterwards
        for the next one: opening one costs a round trip and forgets the host's capabilities, once per
        migration. One that broke is closed instead. Raises TransientDriverError like :meth:`open`."""
        with self._lock:
            idle = self._idle.get(host, [])
            conn = idle.pop() if idle else None
        if conn is not None:
            try:
                # a round trip, not isAlive(): after a libvirtd restart a connection looks alive until
                # keepalive notices, and the job it was lent to would fail
                conn.getLibVersion()
            except libvirt.libvirtError:
                self.close_one(conn)
                conn = None
        if conn is None:
            conn = self.open(host)
        try:
            yield conn
        except Exception as exc:
            if isinstance(exc, libvirt.libvirtError) and is_connection_error(exc):
                self.close_one(conn)
            else:
                self._give_back(host, conn)
            raise
        except BaseException:
            self.close_one(conn)  # interrupted mid-call: what the connection is in is unknown
            raise
        else:
            self._give_back(host, conn)

    def _give_back(self, host: str, conn: libvirt.virConnect) -> None:
        with self._lock:
            if any(c is conn for c in self._opened):  # not closed meanwhile by close()
                self._idle.setdefault(host, []).append(conn)

    def _cached(self, host: str) -> libvirt.virConnect:
        """This thread's connection to ``host``, opened on first use or after it broke."""
        conns: dict[str, libvirt.virConnect] = self._local.__dict__.setdefault("conns", {})
        conn = conns.get(host)
        if conn is not None:
            try:
                if conn.isAlive():
                    return conn
            except libvirt.libvirtError:
                pass  # a dead connection: replaced below
            self._drop(host)
        self._close_connections_of_finished_threads()
        conn = self.open(host)
        conns[host] = conn
        with self._lock:
            self._owner[id(conn)] = threading.current_thread()
        return conn

    def _close_connections_of_finished_threads(self) -> None:
        """Close the cached connections of threads that have ended (drain workers come and go)."""
        # Claim them under the lock: two threads closing one connection would free it twice (a segfault).
        with self._lock:
            finished = [c for c in self._opened if (t := self._owner.get(id(c))) is not None and not t.is_alive()]
            for conn in finished:
                self._opened.remove(conn)
                self._owner.pop(id(conn), None)
        self._close_bounded(finished)

    def _drop(self, host: str) -> None:
        self.capabilities.forget(host)  # libvirtd restarted or the host rebooted: its topology may differ
        conns: dict[str, libvirt.virConnect] = self._local.__dict__.setdefault("conns", {})
        conn = conns.pop(host, None)
        if conn is not None:
            self.close_one(conn)

    def close_one(self, conn: libvirt.virConnect) -> None:
        """Close one connection this driver opened (once, whoever else tries too)."""
        with self._lock:
            if not any(c is conn for c in self._opened):
                return  # already claimed and closed by another thread or by close()
            self._opened = [c for c in self._opened if c is not conn]
            self._owner.pop(id(conn), None)
            for idle in self._idle.values():
                if any(c is conn for c in idle):
                    idle[:] = [c for c in idle if c is not conn]
        self._close_bounded([conn])

    def _close_bounded(self, conns: list[libvirt.virConnect]) -> None:
        """Close connections without waiting longer than ``close_timeout_s``.

        virConnectClose sends a request and waits for the answer: to a host that vanished it would
        wait as long as TCP does. The close runs in a daemon thread that is left behind if it blocks.
        """
        def close_all() -> None:
            for conn in conns:
                self.stops.unlisten(conn)
                try:
                    conn.close()
                except libvirt.libvirtError:
                    pass  # closing a broken connection fails; it is gone either way

        if conns:
            closer = threading.Thread(target=close_all, name="libvirt-close", daemon=True)
            closer.start()
            closer.join(self._settings.close_timeout_s)

    def close(self) -> None:
        """Close every connection this driver opened, in every thread."""
        with self._lock:
            conns, self._opened = self._opened, []
            self._owner.clear()
            self._idle.clear()
        self._close_bounded(conns)

    def call(self, host: str, what: str, fn: Callable[[libvirt.virConnect], T]) -> T:
        """Run ``fn`` on this thread's connection to ``host``; reconnect and retry if it dropped.

        Other libvirt errors become DriverError("<what> on <uri>: <message>").
        """
        uri = self.uri(host)

        def once() -> T:
            conn = self._cached(host)
            try:
                return fn(conn)
            except libvirt.libvirtError as exc:
                if is_connection_error(exc):
                    self._drop(host)
                    raise _ConnectionLost(f"{what}: connection to {uri} lost: {message(exc)}", host) from exc
                raise DriverError(f"{what} on {uri}: {message(exc)}", host) from exc

        retrying = Retrying(stop=stop_after_attempt(self._retries), wait=wait_exponential(multiplier=0.2, max=2.0),
                            retry=retry_if_exception_type(_ConnectionLost), sleep=self._sleep, reraise=True)
        try:
            return retrying(once)
        except _ConnectionLost as exc:
            # its words without the host it names (the new error names it once): not cut at the first
            # colon, which loses the message's start when it names the host another way ("host hv01 ...")
            raise TransientDriverError(without_host(exc, host), host) from exc.__cause__
