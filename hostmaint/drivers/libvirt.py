"""The real hypervisor driver: libvirt, one connection per host per thread.

The only module that imports ``libvirt``. libvirt errors are translated here, once:

* the connection failed or dropped → ``TransientDriverError`` naming host and URI (after reconnect
  attempts with tenacity; the caller may retry the operation);
* a live migration failed, was aborted or could not be confirmed → ``MigrationError`` naming the VM,
  source and target;
* host output the parsers of :mod:`hostmaint.drivers.domain_xml` cannot read (malformed XML, a
  number or unit they do not know, a domain without a name) → ``DriverError`` naming the host, the
  domain if there is one, and what was wrong; never a snapshot built from a guess;
* anything else → ``DriverError`` naming the host.

A migration runs ``migrateToURI3`` (``LIVE | PEER2PEER | PERSIST_DEST | UNDEFINE_SOURCE``) in a worker
thread while the calling thread polls ``jobStats()`` for progress, applies the stall rule of
:mod:`hostmaint.drivers.stall` and aborts when it says so. ``abortJob`` runs in its own thread with
a timeout and is resent from a fresh connection when it blocks: QEMU can sit in "cancelling" and
block an abort for ten minutes (see the lab notes).
"""

from __future__ import annotations

import logging
import math
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import libvirt
from pydantic import ValidationError
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from hostmaint.display import visible
from hostmaint.drivers.base import ProgressCallback
from hostmaint.drivers.domain_xml import (
    HostCapabilities,
    parse_capabilities,
    parse_domain,
    rewrite_for_target,
    with_free_memory,
)
from hostmaint.drivers.stall import stall_decision, stall_reason
from hostmaint.errors import DriverError, MigrationError, TransientDriverError
from hostmaint.inventory import Inventory
from hostmaint.models import (
    Cell,
    HostDiscovery,
    MigrationOptions,
    MigrationProgress,
    MigrationResult,
    StepOutcome,
    Vm,
)

__all__ = ["LibvirtHypervisor", "stall_decision", "stall_reason"]

T = TypeVar("T")
log = logging.getLogger(__name__)

# Why a domain is paused while a live migration moves it (libvirt's virDomainPausedReason)
_MIGRATION_PAUSES = frozenset({libvirt.VIR_DOMAIN_PAUSED_MIGRATION, libvirt.VIR_DOMAIN_PAUSED_STARTING_UP,
                               libvirt.VIR_DOMAIN_PAUSED_POSTCOPY})

DEFAULT_FLAGS = (libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER | libvirt.VIR_MIGRATE_PERSIST_DEST
                 | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE)
# Errors that mean "the connection, not the operation, failed".
_CONNECTION_DOMAINS = {libvirt.VIR_FROM_RPC, libvirt.VIR_FROM_REMOTE}
_CONNECTION_CODES = {libvirt.VIR_ERR_NO_CONNECT, libvirt.VIR_ERR_INVALID_CONN}
# How QEMU/libvirt say that the destination could not allocate the guest's memory.
_OUT_OF_MEMORY = ("preallocating memory failed", "Cannot allocate memory", "cannot allocate memory",
                  "Out of memory", "unable to map backing store")


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


def _message(exc: libvirt.libvirtError) -> str:
    return str(exc.get_error_message() or exc).strip()


# What the domain_xml parsers raise on host output they cannot read: XML that does not parse, a
# number or size unit they do not know (ValueError), a model the output leaves invalid
# (ValidationError, itself a ValueError).
_UNREADABLE = (ET.ParseError, ValueError)
_EXCERPT = 60  # characters of host output or of a bad value quoted in an error


def _clip(text: str, limit: int = _EXCERPT) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _what_was_wrong(exc: Exception, text: str) -> str:
    """One short line saying what in ``text`` (host output) the parser could not read."""
    if isinstance(exc, ValidationError):
        err = exc.errors()[0]  # the first is enough to find the fault; the cause keeps them all
        field = ".".join(str(part) for part in err["loc"]) or "value"
        return f"{field}: {err['msg']} (got {_clip(repr(err['input']))})"
    if isinstance(exc, ET.ParseError):
        line, column = exc.position
        lines = text.splitlines() or [""]
        row = lines[min(max(line, 1), len(lines)) - 1]
        near = row[max(0, column - _EXCERPT // 2):column + _EXCERPT // 2]
        return f"not well-formed XML: {exc} (near {_clip(near)!r})"
    return _clip(str(exc), 2 * _EXCERPT)


def _is_connection_error(exc: libvirt.libvirtError) -> bool:
    return exc.get_error_domain() in _CONNECTION_DOMAINS or exc.get_error_code() in _CONNECTION_CODES


class _ConnectionLost(TransientDriverError):
    """The cached connection broke during a call; tenacity reconnects and retries."""


def _lookup(conn: libvirt.virConnect, vm: str) -> libvirt.virDomain | None:
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


def _running(conn: libvirt.virConnect, vm: str) -> bool:
    dom = _lookup(conn, vm)
    if dom is None:
        return False
    try:
        return bool(dom.isActive())
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return False  # it left while we looked
        raise


def progress_from_job_stats(vm: str, elapsed: float, stats: Mapping[str, Any]) -> MigrationProgress | None:
    """libvirt ``jobStats()`` → MigrationProgress; None when no migration job is running."""
    if stats.get("type", libvirt.VIR_DOMAIN_JOB_NONE) == libvirt.VIR_DOMAIN_JOB_NONE:
        return None
    page = int(stats.get("memory_page_size", 4096) or 4096)
    return MigrationProgress(
        vm=vm, elapsed_s=elapsed,
        data_total=int(stats.get("data_total", 0)), data_processed=int(stats.get("data_processed", 0)),
        data_remaining=int(stats.get("data_remaining", 0)),
        dirty_rate_bps=int(stats.get("memory_dirty_rate", 0)) * page,
        iterations=int(stats.get("memory_iteration", 0)),
        throttle_pct=int(stats.get("auto_converge_throttle", 0) or 0),
    )


@dataclass
class _Worker:
    """The thread that runs the blocking migrateToURI3 call."""

    done: threading.Event = field(default_factory=threading.Event)
    error: libvirt.libvirtError | DriverError | None = None


class LibvirtHypervisor:
    """The ``Hypervisor`` (and ``MigrationControl``) over libvirt.

    ``uris`` maps inventory host names to libvirt URIs (``qemu+tcp://10.213.7.11/system``); the
    target's URI is also what the source's libvirtd dials for a peer-to-peer migration.
    ``clock`` and ``sleep`` drive polling, reconnect back-off and the stall rule.
    """

    def __init__(self, uris: Mapping[str, str], *, connect_retries: int = 3,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
                 poll_interval: float = 0.5, abort_timeout: float = 20.0, abort_attempts: int = 3,
                 shared_storage_prefixes: Mapping[str, Sequence[str]] | None = None, keepalive_interval: int = 5,
                 keepalive_count: int = 3, close_timeout: float = 5.0, capabilities_ttl_s: float = 60.0) -> None:
        _ensure_event_loop()
        self._uris = dict(uris)
        self._keepalive = (keepalive_interval, keepalive_count)
        self._close_timeout = close_timeout
        self._retries = max(1, connect_retries)
        self._clock = clock
        self._sleep = sleep
        self._poll = poll_interval
        self._abort_timeout = abort_timeout
        self._abort_attempts = abort_attempts
        # per host: a path is shared only among the hosts of the cluster that declares it
        self._shared = {h: tuple(p) for h, p in (shared_storage_prefixes or {}).items()}
        self._local = threading.local()
        self._lock = threading.Lock()
        self._opened: list[libvirt.virConnect] = []
        self._owner: dict[int, threading.Thread] = {}  # id(cached connection) -> the thread it serves
        self._post_copy: set[tuple[str, str]] = set()  # (vm, source) switched to post-copy
        # getCapabilities costs ~0.2 s on the lab and a run discovers a host about ten times; its
        # topology only changes with a reboot, its hugepage pools when an admin resizes them (the TTL
        # bounds that; free memory and pages are read live). A reboot ends every connection, but a
        # thread that opens its first one cannot tell that from a reboot, so any new connection to a
        # host forgets its capabilities. The generation counts those forgettings: a read that began
        # before one is not cached (it may have come over a connection to the host before its reboot).
        self._caps_ttl = capabilities_ttl_s
        self._caps: dict[str, tuple[float, HostCapabilities]] = {}
        self._caps_generation: dict[str, int] = {}

    @classmethod
    def from_inventory(cls, inv: Inventory, cluster: str, **kwargs: Any) -> LibvirtHypervisor:
        """A driver for the hosts of ``cluster`` in ``inv``, with their cluster's shared storage."""
        kwargs.setdefault("shared_storage_prefixes", {h.name: inv.shared_storage_for(h.name)
                                                      for h in inv.hosts_of(cluster)})
        return cls({h.name: h.libvirt_uri for h in inv.hosts_of(cluster)}, **kwargs)

    # --- connections ------------------------------------------------------------

    def uri(self, host: str) -> str:
        try:
            return self._uris[host]
        except KeyError:
            raise DriverError(f"unknown host (not in this driver's inventory: {', '.join(self._uris)})",
                              host) from None

    def _open(self, host: str) -> libvirt.virConnect:
        """A new connection, retried with back-off. Raises TransientDriverError naming host and URI."""
        uri = self.uri(host)

        def attempt() -> libvirt.virConnect:
            try:
                conn = libvirt.open(uri)
            except libvirt.libvirtError as exc:
                raise TransientDriverError(f"cannot connect to libvirt at {uri}: {_message(exc)}", host) from exc
            try:
                conn.setKeepAlive(*self._keepalive)  # a vanished host fails calls instead of hanging them
            except libvirt.libvirtError as exc:
                if exc.get_error_code() not in (libvirt.VIR_ERR_NO_SUPPORT, libvirt.VIR_ERR_OPERATION_UNSUPPORTED):
                    raise TransientDriverError(f"keepalive on {uri}: {_message(exc)}", host) from exc
            with self._lock:
                self._opened.append(conn)
                self._forget_capabilities(host)  # the host may have rebooted since they were read
            return conn

        retrying = Retrying(stop=stop_after_attempt(self._retries), wait=wait_exponential(multiplier=0.2, max=2.0),
                            retry=retry_if_exception_type(TransientDriverError), sleep=self._sleep, reraise=True)
        return retrying(attempt)

    def _conn(self, host: str) -> libvirt.virConnect:
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
        conn = self._open(host)
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

    def _capabilities(self, host: str, conn: libvirt.virConnect) -> HostCapabilities:
        """The host's parsed capabilities, read again when older than the TTL or once a connection to the
        host was lost or opened since."""
        now = self._clock()
        with self._lock:
            cached = self._caps.get(host)
            generation = self._caps_generation.get(host, 0)
        if cached is not None and now - cached[0] < self._caps_ttl:
            return cached[1]
        xml = conn.getCapabilities()
        try:
            caps = parse_capabilities(xml)
        except _UNREADABLE as exc:
            raise DriverError(f"cannot read the capabilities from {self.uri(host)}: {_what_was_wrong(exc, xml)}",
                              host) from exc
        with self._lock:
            if self._caps_generation.get(host, 0) == generation:  # no new connection since the read began
                self._caps[host] = (now, caps)
        return caps

    def _forget_capabilities(self, host: str) -> None:
        """Drop ``host``'s cached capabilities; the caller holds ``_lock``."""
        self._caps.pop(host, None)
        self._caps_generation[host] = self._caps_generation.get(host, 0) + 1

    def _drop(self, host: str) -> None:
        with self._lock:
            self._forget_capabilities(host)  # libvirtd restarted or the host rebooted: its topology may differ
        conns: dict[str, libvirt.virConnect] = self._local.__dict__.setdefault("conns", {})
        conn = conns.pop(host, None)
        if conn is not None:
            self._close(conn)

    def _close(self, conn: libvirt.virConnect) -> None:
        with self._lock:
            if not any(c is conn for c in self._opened):
                return  # already claimed and closed by another thread or by close()
            self._opened = [c for c in self._opened if c is not conn]
            self._owner.pop(id(conn), None)
        self._close_bounded([conn])

    def _close_bounded(self, conns: list[libvirt.virConnect]) -> None:
        """Close connections without waiting longer than ``close_timeout``.

        virConnectClose sends a request and waits for the answer: to a host that vanished it would
        wait as long as TCP does. The close runs in a daemon thread that is left behind if it blocks.
        """
        def close_all() -> None:
            for conn in conns:
                try:
                    conn.close()
                except libvirt.libvirtError:
                    pass  # closing a broken connection fails; it is gone either way

        if conns:
            closer = threading.Thread(target=close_all, name="libvirt-close", daemon=True)
            closer.start()
            closer.join(self._close_timeout)

    def close(self) -> None:
        """Close every connection this driver opened, in every thread."""
        with self._lock:
            conns, self._opened = self._opened, []
            self._owner.clear()
        self._close_bounded(conns)

    def _call(self, host: str, what: str, fn: Callable[[libvirt.virConnect], T]) -> T:
        """Run ``fn`` on this thread's connection to ``host``; reconnect and retry if it dropped.

        Other libvirt errors become DriverError("<what> on <uri>: <message>").
        """
        uri = self.uri(host)

        def once() -> T:
            conn = self._conn(host)
            try:
                return fn(conn)
            except libvirt.libvirtError as exc:
                if _is_connection_error(exc):
                    self._drop(host)
                    raise _ConnectionLost(f"{what}: connection to {uri} lost: {_message(exc)}", host) from exc
                raise DriverError(f"{what} on {uri}: {_message(exc)}", host) from exc

        retrying = Retrying(stop=stop_after_attempt(self._retries), wait=wait_exponential(multiplier=0.2, max=2.0),
                            retry=retry_if_exception_type(_ConnectionLost), sleep=self._sleep, reraise=True)
        try:
            return retrying(once)
        except _ConnectionLost as exc:
            raise TransientDriverError(str(exc).split(": ", 1)[-1], host) from exc.__cause__

    # --- discovery ----------------------------------------------------------------

    def discover(self, host: str) -> HostDiscovery:
        """NUMA cells (memory, CPUs, hugepages, free memory) and every running VM of ``host``."""

        def read(conn: libvirt.virConnect) -> HostDiscovery:
            caps = self._capabilities(host, conn)
            if caps.cells:
                # Each cell is asked for by its own node id: ids can be sparse ({0, 2} with a node
                # offline), and libvirt reads a range start..start+n-1 by id, so asking for the first n
                # gave cell 2 the numbers of node 1 or failed on a node the host does not have.
                ids = [c.id for c in caps.cells]
                free = [conn.getCellsFreeMemory(cell, 1)[0] for cell in ids]  # in the order of caps.cells
                sizes = sorted({hp.size_kib for c in caps.cells for hp in c.hugepages})
                pages = self._free_pages(conn, sizes, ids)
                cells = with_free_memory(caps, free, pages)
            else:  # no NUMA topology reported: one cell with the whole host
                info = conn.getInfo()
                cells = (Cell(id=0, memory_mib=int(info[1]), free_mib=conn.getFreeMemory() // 2**20,
                              cpus=tuple(range(int(info[2])))),)
            vms = []
            for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
                vm = self._describe(dom, host)
                if vm is not None:
                    vms.append(vm)
            return HostDiscovery(host=host, hostname=conn.getHostname(), host_uuid=caps.host_uuid,
                                 cells=cells, vms=tuple(sorted(vms, key=lambda v: v.name)))

        return self._call(host, "discovery", read)

    @staticmethod
    def _free_pages(conn: libvirt.virConnect, sizes: list[int], cells: list[int]) -> dict[int, dict[int, int]]:
        """Free hugepages per NUMA node id and page size (KiB), asked node by node (ids can be sparse)."""
        if not sizes:
            return {}
        out: dict[int, dict[int, int]] = {}
        for cell in cells:
            try:
                answer = conn.getFreePages(sizes, cell, 1)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() in (libvirt.VIR_ERR_NO_SUPPORT, libvirt.VIR_ERR_OPERATION_UNSUPPORTED):
                    return {}  # the driver cannot tell: free hugepages stay 0, the planner will not count on them
                raise
            # One node was asked for, so the one entry is that node's, whatever index the binding keys it by.
            out[cell] = {int(size): int(count) for size, count in next(iter(answer.values()), {}).items()}
        return out

    def _describe(self, dom: libvirt.virDomain, host: str) -> Vm | None:
        try:
            xml = dom.XMLDesc(0)
            vcpus = int(dom.info()[3])
            persistent = bool(dom.isPersistent())
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None  # migrated away or stopped between listing and reading
            raise
        try:
            vm = parse_domain(xml, host, vcpus_live=vcpus, shared_storage_prefixes=self._shared.get(host, ()))
            return vm if persistent else vm.model_copy(update={"persistent": False})
        except _UNREADABLE as exc:
            # One domain the parser cannot read fails the discovery: a snapshot without it would plan a
            # host as emptier than it is.
            raise DriverError(f"cannot read the XML of domain {dom.name()}: {_what_was_wrong(exc, xml)}",
                              host) from exc

    def running_vms(self, host: str) -> tuple[str, ...]:
        """Names of the VMs running on ``host``."""
        return self._call(host, "listing running VMs", lambda c: tuple(sorted(
            d.name() for d in c.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE))))

    def shut_off_vms(self, host: str) -> tuple[str, ...]:
        """Names of the persistent VMs defined on ``host`` that are not running."""
        flags = libvirt.VIR_CONNECT_LIST_DOMAINS_INACTIVE | libvirt.VIR_CONNECT_LIST_DOMAINS_PERSISTENT
        return self._call(host, "listing shut-off VMs", lambda c: tuple(sorted(
            d.name() for d in c.listAllDomains(flags))))

    def in_migration(self, host: str) -> tuple[str, ...]:
        """VMs on ``host`` paused because a live migration moves them: the destination's copy before it
        takes over (reasons "migration", "starting up"), a source in post-copy. Seen on the lab."""
        def moving(conn: libvirt.virConnect) -> tuple[str, ...]:
            out = []
            for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
                try:
                    state, reason = dom.state()
                except libvirt.libvirtError:
                    continue  # it left while we looked
                if state == libvirt.VIR_DOMAIN_PAUSED and reason in _MIGRATION_PAUSES:
                    out.append(dom.name())
            return tuple(sorted(out))

        return self._call(host, "listing VMs in migration", moving)

    def locate(self, vm: str) -> tuple[str, ...]:
        """Hosts where ``vm`` runs now.

        An unreachable host is skipped when the VM was found elsewhere (a VM runs on one host);
        when it was found nowhere and some host did not answer, that is TransientDriverError.
        """
        found, unreachable = [], []
        for host in self._uris:
            try:
                if self._call(host, f"looking up {vm}", lambda c: _running(c, vm)):
                    found.append(host)
            except TransientDriverError as exc:
                unreachable.append(exc)
        if not found and unreachable:
            raise TransientDriverError(f"{vm} not found on the reachable hosts; unreachable: "
                                       + "; ".join(str(e) for e in unreachable))
        return tuple(found)

    # --- migration ----------------------------------------------------------------

    def migrate(self, vm: str, source: str, target: str, options: MigrationOptions,
                on_progress: ProgressCallback | None = None) -> MigrationResult:
        """Live-migrate ``vm`` from ``source`` to ``target`` and confirm where it runs afterwards."""
        where = f"{vm} from {source} to {target}"
        if source == target:
            raise MigrationError(f"migrating {where}: source and target are the same host", source, vm, target)
        started = self._clock()
        xml = self._call(source, f"reading {vm}", lambda c: self._migratable_xml(c, vm))
        if xml is None:
            raise MigrationError(f"migrating {where}: {vm} is not running on {source}", source, vm, target)
        self._call(target, "checking the migration target", lambda c: c.getHostname())
        try:
            flags, params = self._request(xml, options)
        except _UNREADABLE as exc:
            raise MigrationError(f"migrating {where}: cannot read the XML of {vm}: {_what_was_wrong(exc, xml)}",
                                 source, vm, target) from exc

        worker = _Worker()
        threading.Thread(target=self._run_migration, args=(worker, vm, source, target, flags, params),
                         name=f"migrate-{vm}", daemon=True).start()

        history: list[MigrationProgress] = []
        abort_reason: str | None = None
        try:
            abort_reason = self._monitor(vm, source, options, on_progress, started, worker, history)
        except BaseException:
            # the caller's progress callback failed (or we were interrupted): never leave a
            # migration running unwatched
            if not worker.done.is_set():
                self._abort_quietly(vm, source)
            raise
        finally:
            with self._lock:
                self._post_copy.discard((vm, source))

        seconds = round(self._clock() - started, 3)
        if worker.done.is_set() and worker.error is None:
            return self._confirm_success(vm, source, target, seconds, history)
        return self._failure(vm, source, target, worker, abort_reason)

    def _monitor(self, vm: str, source: str, options: MigrationOptions, on_progress: ProgressCallback | None,
                 started: float, worker: _Worker, history: list[MigrationProgress]) -> str | None:
        """Poll progress until the worker is done; apply the stall rule. Returns why it aborted, if it did.

        A stalled migration that may use post-copy is switched to it once instead of aborted; one in
        post-copy is never aborted (the VM already runs on the target).
        """
        while not worker.done.is_set():
            elapsed = self._clock() - started
            sample = self._sample(vm, source, elapsed)
            if sample is not None:
                history.append(sample)
                if on_progress is not None:
                    on_progress(sample)
            reason = stall_reason(history, elapsed, options)
            if reason is not None and not self._in_post_copy(vm, source):
                if options.post_copy:
                    try:
                        self.start_post_copy(vm, source)
                        continue
                    except DriverError:
                        pass  # could not switch (e.g. it just finished): the abort below decides
                self._abort_quietly(vm, source)
                worker.done.wait(max(60.0, self._abort_timeout * self._abort_attempts))
                return reason
            self._sleep(self._poll)
        return None

    def _in_post_copy(self, vm: str, source: str) -> bool:
        with self._lock:
            return (vm, source) in self._post_copy

    def _abort_quietly(self, vm: str, source: str) -> None:
        """Abort; a failed abort is not raised here: the migration's own outcome is what counts."""
        try:
            self._abort_job(vm, source)
        except MigrationError:
            pass  # the worker's result (and the location check after it) decides what happened

    def _migratable_xml(self, conn: libvirt.virConnect, vm: str) -> str | None:
        dom = _lookup(conn, vm)
        if dom is None or not dom.isActive():
            return None
        return str(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_MIGRATABLE))

    @staticmethod
    def _request(xml: str, options: MigrationOptions) -> tuple[int, dict[str, Any]]:
        """Flags and typed parameters for migrateToURI3 from the options."""
        flags = DEFAULT_FLAGS
        params: dict[str, Any] = {}
        if options.bandwidth_mib_s is not None:
            params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] = options.bandwidth_mib_s
        if options.auto_converge:
            flags |= libvirt.VIR_MIGRATE_AUTO_CONVERGE
            if options.auto_converge_initial_pct is not None:
                params[libvirt.VIR_MIGRATE_PARAM_AUTO_CONVERGE_INITIAL] = options.auto_converge_initial_pct
            if options.auto_converge_increment_pct is not None:
                params[libvirt.VIR_MIGRATE_PARAM_AUTO_CONVERGE_INCREMENT] = options.auto_converge_increment_pct
        if options.post_copy:
            flags |= libvirt.VIR_MIGRATE_POSTCOPY
        if options.parallel_connections > 1:
            flags |= libvirt.VIR_MIGRATE_PARALLEL
            params[libvirt.VIR_MIGRATE_PARAM_PARALLEL_CONNECTIONS] = options.parallel_connections
        placement = options.placement
        if placement is not None and placement.rewrites_domain:
            dest_xml = rewrite_for_target(xml, placement)
            params[libvirt.VIR_MIGRATE_PARAM_DEST_XML] = dest_xml
            params[libvirt.VIR_MIGRATE_PARAM_PERSIST_XML] = dest_xml  # the persistent config gets it too
        return flags, params

    def _run_migration(self, worker: _Worker, vm: str, source: str, target: str, flags: int,
                       params: dict[str, Any]) -> None:
        """Worker thread: the blocking migrateToURI3 on its own connection to the source."""
        conn = None
        try:
            conn = self._open(source)
            dom = _lookup(conn, vm)
            if dom is None:
                raise DriverError(f"{vm} vanished from {source} before the migration started", source)
            dom.migrateToURI3(self.uri(target), params, flags)
        except (libvirt.libvirtError, DriverError) as exc:
            worker.error = exc
        finally:
            if conn is not None:
                self._close(conn)
            worker.done.set()

    def _sample(self, vm: str, source: str, elapsed: float) -> MigrationProgress | None:
        def stats(conn: libvirt.virConnect) -> dict[str, Any] | None:
            dom = _lookup(conn, vm)
            if dom is None:
                return None  # already undefined on the source: the migration is finishing
            try:
                return dict(dom.jobStats())
            except libvirt.libvirtError as exc:
                if exc.get_error_code() in (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_OPERATION_INVALID):
                    return None
                raise

        try:
            raw = self._call(source, f"reading migration progress of {vm}", stats)
        except DriverError:
            # Progress is best effort: the worker's own result decides success or failure.
            return None
        return progress_from_job_stats(vm, elapsed, raw) if raw is not None else None

    def _confirm_success(self, vm: str, source: str, target: str, seconds: float,
                         history: list[MigrationProgress]) -> MigrationResult:
        on_target = self._call(target, f"confirming {vm}", lambda c: _running(c, vm))
        on_source = self._call(source, f"confirming {vm}", lambda c: _running(c, vm))
        if not on_target or on_source:
            raise MigrationError(
                f"migrating {vm} from {source} to {target} reported success, but the VM runs on "
                f"{'both hosts' if on_target and on_source else source if on_source else 'neither host'}",
                source, vm, target)
        stats = self._call(target, f"reading migration stats of {vm}", lambda c: self._completed_stats(c, vm))
        last = history[-1] if history else None
        return MigrationResult(
            vm=vm, source=source, target=target, outcome=StepOutcome.OK, seconds=seconds,
            downtime_ms=float(stats["downtime"]) if "downtime" in stats else None,
            data_bytes=int(stats.get("data_processed", last.data_processed if last else 0)),
            iterations=int(stats.get("memory_iteration", last.iterations if last else 0)),
        )

    @staticmethod
    def _completed_stats(conn: libvirt.virConnect, vm: str) -> dict[str, Any]:
        dom = _lookup(conn, vm)
        if dom is None:
            return {}
        try:
            return dict(dom.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED))
        except libvirt.libvirtError as exc:
            if exc.get_error_code() in (libvirt.VIR_ERR_NO_SUPPORT, libvirt.VIR_ERR_OPERATION_INVALID):
                return {}  # stats are for the audit record; their absence does not fail a migration
            raise

    def _failure(self, vm: str, source: str, target: str, worker: _Worker,
                 abort_reason: str | None) -> MigrationResult:
        """The migration failed or was aborted: find out where the VM runs and raise MigrationError."""
        err = worker.error
        if isinstance(err, libvirt.libvirtError):
            detail = _message(err)
            if err.get_error_code() == libvirt.VIR_ERR_OPERATION_ABORTED and abort_reason is None:
                detail = f"aborted ({detail})"
        elif err is not None:
            detail = str(err)
        else:
            detail = "the migration call did not return after the abort"
        if abort_reason is not None:
            detail = f"aborted by the stall rule: {abort_reason}"
        elif any(sign in detail for sign in _OUT_OF_MEMORY):
            detail = f"{target} lacks the memory for {vm} ({detail})"
        on_source = self._call(source, f"checking {vm} after a failed migration", lambda c: _running(c, vm))
        if on_source:
            raise MigrationError(f"migrating {vm} from {source} to {target} failed: {detail}; "
                                 f"{vm} still runs on {source}", source, vm, target) from err
        on_target = self._call(target, f"checking {vm} after a failed migration", lambda c: _running(c, vm))
        if on_target:
            raise MigrationError(f"migrating {vm} from {source} to {target} reported failure ({detail}), "
                                 f"but {vm} runs on {target}", source, vm, target) from err
        raise MigrationError(f"migrating {vm} from {source} to {target} failed: {detail}; {vm} runs on "
                             f"neither host", source, vm, target) from err

    # --- abort and escalation -------------------------------------------------------

    def abort(self, vm: str, source: str) -> None:
        """Abort a running migration of ``vm`` on ``source``; returns at once when none runs."""
        self._abort_job(vm, source)

    def _abort_job(self, vm: str, source: str) -> None:
        """abortJob in its own thread with a timeout, resent from a fresh connection while it blocks."""
        errors: list[str] = []
        for attempt in range(1, self._abort_attempts + 1):
            done = threading.Event()
            outcome: dict[str, Exception] = {}

            threading.Thread(target=self._send_abort, args=(vm, source, done, outcome),
                             name=f"abort-{vm}-{attempt}", daemon=True).start()
            if not done.wait(self._abort_timeout):
                errors.append(f"abortJob blocked for {self._abort_timeout:g}s")
                # Worth an operator's eye: QEMU stuck in "cancelling" is rare, and a resend clears it.
                log.warning("aborting the migration of %s on %s: abortJob blocked for %gs (try %d of %d)%s",
                            visible(vm), source, self._abort_timeout, attempt, self._abort_attempts,
                            "; resending from a fresh connection" if attempt < self._abort_attempts else "")
                continue
            error = outcome.get("error")
            if error is None:
                return
            if isinstance(error, libvirt.libvirtError) and not _is_connection_error(error):
                raise MigrationError(f"aborting the migration of {vm} on {source}: {_message(error)}",
                                     source, vm) from error
            errors.append(str(error))
        raise MigrationError(f"could not abort the migration of {vm} on {source} after "
                             f"{self._abort_attempts} tries: {'; '.join(errors)}", source, vm)

    def _send_abort(self, vm: str, source: str, done: threading.Event, outcome: dict[str, Exception]) -> None:
        conn = None
        try:
            conn = self._open(source)  # never the cached one: it may be the one that blocks
            dom = _lookup(conn, vm)
            if dom is not None:
                dom.abortJob()
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != libvirt.VIR_ERR_OPERATION_INVALID:  # "no job is active"
                outcome["error"] = exc
        except DriverError as exc:
            outcome["error"] = exc
        finally:
            if conn is not None:
                self._close(conn)
            done.set()

    def start_post_copy(self, vm: str, source: str) -> None:
        """Switch a running migration (started with post_copy) to post-copy."""
        def switch(conn: libvirt.virConnect) -> None:
            dom = _lookup(conn, vm)
            if dom is None:
                raise MigrationError(f"{vm} is not on {source}: no migration to switch to post-copy", source, vm)
            dom.migrateStartPostCopy(0)

        try:
            self._call(source, f"switching {vm} to post-copy", switch)
            with self._lock:
                self._post_copy.add((vm, source))  # from now on an abort would lose the VM
        except DriverError as exc:
            if isinstance(exc, MigrationError | TransientDriverError):
                raise
            raise MigrationError(str(exc), source, vm) from exc

    def enable_auto_converge(self, vm: str, source: str, max_downtime_ms: int = 2000) -> None:
        """Help a running migration converge: allow a longer final pause (as Nova does).

        libvirt cannot turn on auto-converge for a running job; raising the downtime limit lets the
        last pass start with more data left.
        """
        def raise_downtime(conn: libvirt.virConnect) -> None:
            dom = _lookup(conn, vm)
            if dom is None:
                raise MigrationError(f"{vm} is not on {source}", source, vm)
            dom.migrateSetMaxDowntime(max_downtime_ms, 0)

        try:
            self._call(source, f"raising the downtime limit of {vm}", raise_downtime)
        except DriverError as exc:
            if isinstance(exc, MigrationError | TransientDriverError):
                raise
            raise MigrationError(str(exc), source, vm) from exc

    # --- power --------------------------------------------------------------------

    def shutdown(self, vm: str, host: str, timeout: float = 120.0) -> None:
        """ACPI shutdown, then wait until it stopped. DriverError when it did not within ``timeout``.

        A transient domain is refused before anything is sent: libvirt forgets a transient domain
        the moment it stops, so ``start`` could never bring it back after the maintenance.
        """
        def request(conn: libvirt.virConnect) -> bool:
            dom = _lookup(conn, vm)
            if dom is None or not dom.isActive():
                return False
            if not dom.isPersistent():
                # Defining it persistently here would change the VM behind the operator's back; left
                # running, it keeps the host from being emptied, and the run stops there, which is safe.
                raise DriverError(
                    f"refusing to shut down {vm}: it is a transient domain (not defined "
                    f"persistently), and libvirt forgets a transient domain once it stops, so it could never "
                    f"be started again; define it persistently (virsh dumpxml {vm} > {vm}.xml; virsh define "
                    f"{vm}.xml) or set its on_unmigratable policy to block or skip-host in the inventory", host)
            dom.shutdown()
            return True

        if not self._call(host, f"shutting down {vm}", request):
            return  # already stopped
        deadline = self._clock() + timeout
        while self._clock() < deadline:
            if not self._call(host, f"waiting for {vm} to stop", lambda c: _running(c, vm)):
                return
            self._sleep(min(1.0, timeout / 10))
        raise DriverError(f"{vm} did not shut down within {timeout:g}s", host)

    def measure_dirty_rates(self, host: str, seconds: float = 1.0) -> dict[str, float]:
        """MiB/s per running VM of ``host``: ``startDirtyRateCalc`` on every guest at once (page sampling:
        the guest is not slowed), wait, then read the ``dirtyrate.*`` domain stats. A guest whose QEMU
        cannot measure, or did not finish in time, is left out."""
        period = max(1, math.ceil(seconds))  # QEMU takes whole seconds

        def start(conn: libvirt.virConnect) -> list[str]:
            started = []
            for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
                try:
                    dom.startDirtyRateCalc(period, 0)
                    started.append(dom.name())
                except libvirt.libvirtError as exc:
                    if exc.get_error_code() in (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_OPERATION_INVALID,
                                                libvirt.VIR_ERR_NO_SUPPORT, libvirt.VIR_ERR_OPERATION_UNSUPPORTED,
                                                libvirt.VIR_ERR_OPERATION_FAILED):
                        continue  # gone, not running, or this QEMU cannot: its rate stays unknown
                    raise
            return started

        def read(conn: libvirt.virConnect) -> dict[str, tuple[int, float]]:
            out = {}
            for dom, stats in conn.getAllDomainStats(libvirt.VIR_DOMAIN_STATS_DIRTYRATE,
                                                     libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_ACTIVE):
                status = int(stats.get("dirtyrate.calc_status", libvirt.VIR_DOMAIN_DIRTYRATE_UNSTARTED))
                out[dom.name()] = (status, float(stats.get("dirtyrate.megabytes_per_second", 0)))
            return out

        pending = set(self._call(host, "starting dirty-rate sampling", start))
        rates: dict[str, float] = {}
        self._sleep(period)
        deadline = self._clock() + period + 5.0
        while pending:
            for vm, (status, rate) in self._call(host, "reading dirty rates", read).items():
                if vm in pending and status == libvirt.VIR_DOMAIN_DIRTYRATE_MEASURED:
                    rates[vm] = rate
                    pending.discard(vm)
            if not pending or self._clock() >= deadline:
                break
            self._sleep(0.2)
        return rates

    def start(self, vm: str, host: str) -> None:
        """Start a defined, stopped VM (no-op when it runs)."""
        def create(conn: libvirt.virConnect) -> None:
            dom = _lookup(conn, vm)
            if dom is None:
                raise DriverError(f"{vm} is not defined on {host}", host)
            if not dom.isActive():
                dom.create()

        self._call(host, f"starting {vm}", create)
