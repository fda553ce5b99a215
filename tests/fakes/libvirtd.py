"""Fake libvirt hosts for the libvirt driver's unit tests, injected as its connector (no monkeypatching).

``FakeHost`` is one host's libvirtd: its domains, capabilities, free memory and pages, with libvirt's
semantics where the driver relies on them (an unknown domain is VIR_ERR_NO_DOMAIN, a transient domain is
undefined when it stops, free memory is read by NUMA node id). ``FakeConnector`` opens ``FakeConn``s onto
one host or a host per URI and keeps every connection it opened, so tests can see which were closed.
A migration between fake hosts blocks in ``migrateToURI3`` until its ``FakeJob`` completes, is aborted or
switches to post-copy; its progress is what the job's ``stats`` function says at the caller's clock.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import libvirt

CAPS_ONE_CELL = ("<capabilities><host><uuid>4c4c4544-0000-0000-0000-000000000001</uuid><topology><cells num='1'>"
                 "<cell id='0'><memory unit='KiB'>8388608</memory><cpus num='2'><cpu id='0'/><cpu id='1'/></cpus>"
                 "</cell></cells></topology></host></capabilities>")


class FakeError(libvirt.libvirtError):
    """A libvirt error with the code, domain and message libvirt would give."""

    def __init__(self, code: int, message: str, domain: int = libvirt.VIR_FROM_QEMU) -> None:
        super().__init__(message)
        self._code, self._domain, self._message = code, domain, message

    def get_error_code(self) -> int:
        return self._code

    def get_error_domain(self) -> int:
        return self._domain

    def get_error_message(self) -> str:
        return self._message


def no_domain(name: str) -> FakeError:
    return FakeError(libvirt.VIR_ERR_NO_DOMAIN, f"Domain not found: no domain with matching name '{name}'")


def connection_reset() -> FakeError:
    """What a call gets when libvirtd went away under the connection."""
    return FakeError(libvirt.VIR_ERR_SYSTEM_ERROR, "Cannot recv data: Connection reset by peer", libvirt.VIR_FROM_RPC)


def domain_xml(name: str = "web1", *, extra: str = "", memory_kib: int = 1048576) -> str:
    return (f"<domain type='kvm'><name>{name}</name><uuid>uuid-{name}</uuid><memory unit='KiB'>{memory_kib}</memory>"
            f"<vcpu>2</vcpu>{extra}</domain>")


@dataclass
class FakeJob:
    """A live migration in progress. ``stats()`` gives its jobStats() now (tests read their clock);
    ``finish`` ends it as migrated; an abort ends it with VIR_ERR_OPERATION_ABORTED."""

    stats: Callable[[], dict[str, Any]]
    ended: threading.Event = field(default_factory=threading.Event)
    outcome: str = ""  # "migrated" or "aborted"
    post_copy: bool = False
    max_downtime_ms: int | None = None
    # what migrateToURI3 raises once aborted, where not libvirt's "operation aborted" (code, message): on
    # real hosts the target's QEMU can fail first on the stream the source cut, and that error comes back
    abort_error: tuple[int, str] | None = None

    def finish(self, outcome: str = "migrated") -> None:
        if not self.ended.is_set():
            self.outcome = outcome
            self.ended.set()


class FakeDomain:
    """A domain on a fake host."""

    def __init__(self, host: FakeHost | None, name: str, xml: str | None = None, *, persistent: bool = True,
                 active: bool = True, vcpus: int = 2) -> None:
        self.host, self._name = host, name
        self.xml = xml if xml is not None else domain_xml(name)
        self.persistent, self.active, self.vcpus = persistent, active, vcpus
        self.autostarts = False
        self.paused_reason: int | None = None  # active but paused, for this reason (libvirt's)
        self.calls: list[str] = []
        # one per abortJob call, the last repeated: what each does (block, raise, ...)
        self.aborts: list[Callable[[], None]] = []
        self.job: FakeJob | None = None

    def name(self) -> str:
        return self._name

    def isActive(self) -> int:
        return int(self.active)

    def isPersistent(self) -> int:
        return int(self.persistent)

    def XMLDesc(self, flags: int) -> str:
        return self.xml

    def autostart(self) -> int:
        return int(self.autostarts)

    def setAutostart(self, autostart: int) -> int:
        if not self.persistent:
            raise FakeError(libvirt.VIR_ERR_OPERATION_INVALID, "cannot set autostart for transient domain")
        self.autostarts = bool(autostart)
        return 0

    def info(self) -> list[int]:
        return [libvirt.VIR_DOMAIN_RUNNING if self.active else libvirt.VIR_DOMAIN_SHUTOFF, 1048576, 1048576,
                self.vcpus, 0]

    def state(self) -> tuple[int, int]:
        if self.active and self.paused_reason is not None:
            return libvirt.VIR_DOMAIN_PAUSED, self.paused_reason
        return (libvirt.VIR_DOMAIN_RUNNING, 1) if self.active else (libvirt.VIR_DOMAIN_SHUTOFF, 1)

    def shutdown(self) -> int:
        self.calls.append("shutdown")
        self.active = False
        if self.host is not None:
            if not self.persistent:
                del self.host.domains[self._name]  # libvirt forgets a transient domain once it stops
            self.host.emit(self, libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN)
        return 0

    def create(self) -> int:
        self.calls.append("create")
        self.active = True
        if self.host is not None:
            self.host.emit(self, libvirt.VIR_DOMAIN_EVENT_STARTED, libvirt.VIR_DOMAIN_EVENT_STARTED_BOOTED)
        return 0

    def destroy(self, detail: int = libvirt.VIR_DOMAIN_EVENT_STOPPED_DESTROYED) -> int:
        """What a tenant's ``virsh destroy`` does (``detail``: or how else it stopped): libvirt tells every
        connection registered for lifecycle events, and forgets a transient domain."""
        self.calls.append("destroy")
        self.active = False
        self.paused_reason = None
        if self.host is not None:
            if not self.persistent:
                self.host.domains.pop(self._name, None)
            self.host.emit(self, libvirt.VIR_DOMAIN_EVENT_STOPPED, detail)
        return 0

    def abortJob(self) -> int:
        self.calls.append("abortJob")
        if self.aborts:
            self.aborts[min(self.calls.count("abortJob"), len(self.aborts)) - 1]()
        if self.job is None or self.job.ended.is_set():
            raise FakeError(libvirt.VIR_ERR_OPERATION_INVALID, "Requested operation is not valid: no job is active")
        if self.job.post_copy:
            raise FakeError(libvirt.VIR_ERR_OPERATION_FAILED, "cannot abort migration in post-copy mode")
        self.job.finish("aborted")
        return 0

    def jobStats(self, flags: int = 0) -> dict[str, Any]:
        if self.job is None or self.job.ended.is_set():
            return {"type": libvirt.VIR_DOMAIN_JOB_NONE}
        return {"type": libvirt.VIR_DOMAIN_JOB_UNBOUNDED, **self.job.stats()}

    def migrateToURI3(self, uri: str, params: dict[str, Any], flags: int) -> int:
        """Blocks until the job ends; a migrated domain moves to the host at ``uri``."""
        assert self.host is not None and self.host.network is not None, "a migration needs a FakeNetwork"
        target = self.host.network[uri]
        self.calls.append("migrateToURI3")
        job = self.job = self.host.network.new_job(self, target, params, flags)
        job.ended.wait(30)
        if job.outcome != "migrated":
            if job.abort_error is not None:
                raise FakeError(*job.abort_error)
            raise FakeError(libvirt.VIR_ERR_OPERATION_ABORTED,
                            "operation aborted: migration out job: canceled by client")
        source = self.host
        del source.domains[self._name]
        self.host = target
        target.domains[self._name] = self
        self.autostarts = False  # as libvirt's PERSIST_DEST defines it on the target: without the flag
        # as libvirt tells it: the incoming copy started and resumed on the target, the source stopped
        target.emit(self, libvirt.VIR_DOMAIN_EVENT_STARTED, libvirt.VIR_DOMAIN_EVENT_STARTED_MIGRATED)
        target.emit(self, libvirt.VIR_DOMAIN_EVENT_RESUMED, libvirt.VIR_DOMAIN_EVENT_RESUMED_MIGRATED)
        source.emit(self, libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_STOPPED_MIGRATED)
        return 0

    def migrateStartPostCopy(self, flags: int) -> int:
        if self.job is None or self.job.ended.is_set():
            raise FakeError(libvirt.VIR_ERR_OPERATION_INVALID, "Requested operation is not valid: no job is active")
        self.job.post_copy = True  # the job's stats function decides when it has pulled the rest
        return 0

    def migrateSetMaxDowntime(self, downtime_ms: int, flags: int) -> int:
        if self.job is not None:
            self.job.max_downtime_ms = downtime_ms
        return 0


class FakeHost:
    """One host's libvirtd. ``failures`` maps a connection method's name to the error it raises."""

    def __init__(self, name: str = "hv01", *, caps: str = CAPS_ONE_CELL, free: dict[int, int] | None = None,
                 pages: dict[int, dict[int, int]] | None = None, hostname: str | None = None) -> None:
        self.name = name
        self.caps = caps
        self.free = free if free is not None else {0: 2**30}
        self.pages = pages or {}
        self.hostname = hostname if hostname is not None else name
        self.domains: dict[str, FakeDomain] = {}
        self.failures: dict[str, libvirt.libvirtError] = {}
        self.after: dict[str, Callable[[], None]] = {}  # runs after a method computed its answer
        self.calls: list[str] = []
        self.network: FakeNetwork | None = None
        # lifecycle event registrations: id -> (connection, callback, opaque)
        self.listeners: dict[int, tuple[FakeConn, Callable[..., object], object]] = {}

    def emit(self, dom: FakeDomain, event: int, detail: int) -> None:
        """A lifecycle event, to every open connection registered for them (as libvirt's event loop
        would call them)."""
        for conn, callback, opaque in list(self.listeners.values()):
            if not conn.closed:
                callback(conn, dom, event, detail, opaque)

    def add(self, name: str, xml: str | None = None, **kw: Any) -> FakeDomain:
        dom = FakeDomain(self, name, xml, **kw)
        self.domains[name] = dom
        return dom


class FakeConn:
    """A connection onto a ``FakeHost``; ``reset()`` makes every later call fail as a dropped connection."""

    def __init__(self, host: FakeHost, uri: str) -> None:
        self.host, self.uri = host, uri
        self.closed = False
        self.broken = False

    def reset(self) -> None:
        self.broken = True

    def _enter(self, method: str) -> None:
        if self.broken:
            raise connection_reset()
        if method in self.host.failures:
            raise self.host.failures[method]

    def _answer(self, method: str, value: Any) -> Any:
        self.host.calls.append(method)
        if method in self.host.after:
            self.host.after[method]()
        return value

    def setKeepAlive(self, interval: int, count: int) -> int:
        return 0

    def domainEventRegisterAny(self, dom: FakeDomain | None, event_id: int, callback: Callable[..., object],
                               opaque: object) -> int:
        self._enter("domainEventRegisterAny")
        assert dom is None and event_id == libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE
        key = max(self.host.listeners, default=0) + 1
        self.host.listeners[key] = (self, callback, opaque)
        return key

    def domainEventDeregisterAny(self, callback_id: int) -> int:
        self._enter("domainEventDeregisterAny")
        if callback_id not in self.host.listeners:
            raise FakeError(libvirt.VIR_ERR_INVALID_ARG, f"could not find event callback {callback_id} for deletion")
        del self.host.listeners[callback_id]
        return 0

    def getLibVersion(self) -> int:
        self._enter("getLibVersion")
        return 9000000

    def isAlive(self) -> bool:
        return not self.closed

    def close(self) -> int:
        self.closed = True
        return 0

    def lookupByName(self, name: str) -> FakeDomain:
        self._enter("lookupByName")
        if name not in self.host.domains:
            raise no_domain(name)
        return self.host.domains[name]

    def listAllDomains(self, flags: int = 0) -> list[FakeDomain]:
        self._enter("listAllDomains")
        doms = list(self.host.domains.values())
        if flags & libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE:
            doms = [d for d in doms if d.active]
        if flags & libvirt.VIR_CONNECT_LIST_DOMAINS_INACTIVE:
            doms = [d for d in doms if not d.active]
        if flags & libvirt.VIR_CONNECT_LIST_DOMAINS_PERSISTENT:
            doms = [d for d in doms if d.persistent]
        if flags & libvirt.VIR_CONNECT_LIST_DOMAINS_RUNNING:
            doms = [d for d in doms if d.active and d.paused_reason is None]
        return self._answer("listAllDomains", doms)

    def getCapabilities(self) -> str:
        self._enter("getCapabilities")
        return self._answer("getCapabilities", self.host.caps)

    def getCellsFreeMemory(self, start: int, n: int) -> list[int]:
        self._enter("getCellsFreeMemory")
        # libvirt reads nodes start .. start+n-1 by id, and fails on a node the host does not have
        missing = [i for i in range(start, start + n) if i not in self.host.free]
        if missing:
            raise libvirt.libvirtError(f"Failed to query memory for NUMA node {missing[0]}")
        return self._answer("getCellsFreeMemory", [self.host.free[i] for i in range(start, start + n)])

    def getFreePages(self, sizes: list[int], start: int, n: int) -> dict[int, dict[int, int]]:
        self._enter("getFreePages")
        if any(i not in self.host.free for i in range(start, start + n)):
            raise libvirt.libvirtError("no such NUMA node")
        return {i: {s: self.host.pages.get(i, {}).get(s, 0) for s in sizes} for i in range(start, start + n)}

    def getHostname(self) -> str:
        self._enter("getHostname")
        return self.host.hostname


class FakeNetwork(dict[str, FakeHost]):
    """Fake hosts by URI, among which domains migrate. ``on_job`` builds each new migration's job."""

    def __init__(self, hosts: Mapping[str, FakeHost]) -> None:
        super().__init__(hosts)
        for host in hosts.values():
            host.network = self
        self.on_job: Callable[[FakeDomain, FakeHost, dict[str, Any], int], FakeJob] = (
            lambda dom, target, params, flags: FakeJob(lambda: {}))
        self.jobs: list[tuple[FakeJob, dict[str, Any], int]] = []

    def new_job(self, dom: FakeDomain, target: FakeHost, params: dict[str, Any], flags: int) -> FakeJob:
        job = self.on_job(dom, target, params, flags)
        self.jobs.append((job, params, flags))
        return job


class FakeConnector:
    """The driver's connector: opens a ``FakeConn`` onto the host of the URI (or the one host), or raises
    ``refuse``. ``opened`` keeps every connection; ``on_open(conn, n)`` runs on the n-th (from 0)."""

    def __init__(self, hosts: FakeHost | Mapping[str, FakeHost], *, refuse: libvirt.libvirtError | None = None,
                 on_open: Callable[[FakeConn, int], None] | None = None) -> None:
        self.hosts = hosts
        self.refuse = refuse
        self.on_open = on_open
        self.opened: list[FakeConn] = []
        self.uris: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, uri: str) -> FakeConn:
        with self._lock:
            self.uris.append(uri)
            if self.refuse is not None:
                raise self.refuse
            host = self.hosts if isinstance(self.hosts, FakeHost) else self.hosts[uri]
            conn = FakeConn(host, uri)
            if self.on_open is not None:
                self.on_open(conn, len(self.opened))
            self.opened.append(conn)
            return conn


class FakeClock:
    """Test time: ``sleep``, and ``wait`` for an event that is not set, advance it at once."""

    def __init__(self, start: float = 0.0) -> None:
        self.now = start
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds

    def wait(self, event: threading.Event, seconds: float) -> bool:
        if event.wait(0.001):  # a moment of real time for the thread that sets it
            return True
        self.sleep(seconds)
        return event.is_set()
