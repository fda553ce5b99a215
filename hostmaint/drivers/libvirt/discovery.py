"""What runs where: a host's NUMA cells and running VMs, and where a VM runs, read from libvirt.

Host output the parsers of :mod:`hostmaint.drivers.domain_xml` cannot read (malformed XML, a number
or unit they do not know, a domain without a name) is ``DriverError`` naming the host, the domain if
there is one, and what was wrong; never a snapshot built from a guess.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence

import libvirt
from pydantic import ValidationError

from hostmaint.drivers.base import SHUTOFF_REASONS
from hostmaint.drivers.domain_xml import HostCapabilities, parse_capabilities, parse_domain, with_free_memory
from hostmaint.drivers.libvirt.connections import Connections, is_running
from hostmaint.errors import DriverError, TransientDriverError
from hostmaint.models import Cell, HostDiscovery, Vm

# Why a domain is paused while a live migration moves it (libvirt's virDomainPausedReason)
MIGRATION_PAUSES = frozenset({libvirt.VIR_DOMAIN_PAUSED_MIGRATION, libvirt.VIR_DOMAIN_PAUSED_STARTING_UP,
                               libvirt.VIR_DOMAIN_PAUSED_POSTCOPY})

def _job_ended(dom: libvirt.virDomain, reason: int) -> bool:
    """Whether ``dom``, paused for a migration (``reason``), has no migration job any more: left paused
    by one that ended. An incoming copy's job is readable only on the source (libvirt refuses):
    not ended; nor is anything libvirt cannot answer."""
    if reason != libvirt.VIR_DOMAIN_PAUSED_MIGRATION:
        return False
    try:
        return bool(dom.jobInfo()[0] == libvirt.VIR_DOMAIN_JOB_NONE)
    except libvirt.libvirtError:
        return False


def _migration_pauses(conn: libvirt.virConnect) -> list[tuple[str, bool]]:
    """(name, whether its migration job has ended) of each domain paused for a live migration, sorted."""
    out = []
    for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_PAUSED):
        try:
            state, reason = dom.state()
        except libvirt.libvirtError:
            continue  # it left while we looked
        if state == libvirt.VIR_DOMAIN_PAUSED and reason in MIGRATION_PAUSES:
            out.append((dom.name(), _job_ended(dom, reason)))
    return sorted(out)


# What the domain_xml parsers raise on host output they cannot read: XML that does not parse, a
# number or size unit they do not know (ValueError), a model the output leaves invalid
# (ValidationError, itself a ValueError).
UNREADABLE = (ET.ParseError, ValueError)
_EXCERPT = 60  # characters of host output or of a bad value quoted in an error


def _clip(text: str, limit: int = _EXCERPT) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def what_was_wrong(exc: Exception, text: str) -> str:
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


class Discovery:
    """Reads hosts and domains. ``shared_storage_prefixes``: per host, the paths shared among the
    hosts of its cluster (a disk there does not block a live migration)."""

    def __init__(self, connections: Connections,
                 shared_storage_prefixes: Mapping[str, Sequence[str]] | None = None) -> None:
        self._connections = connections
        self._shared = {h: tuple(p) for h, p in (shared_storage_prefixes or {}).items()}

    def discover(self, host: str) -> HostDiscovery:
        """NUMA cells (memory, CPUs, hugepages, free memory) and every running VM of ``host``."""

        def read(conn: libvirt.virConnect) -> HostDiscovery:
            caps = self._connections.capabilities.get(host, lambda: self._read_capabilities(host, conn))
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

        return self._connections.call(host, "discovery", read)

    def _read_capabilities(self, host: str, conn: libvirt.virConnect) -> HostCapabilities:
        xml = conn.getCapabilities()
        try:
            return parse_capabilities(xml)
        except UNREADABLE as exc:
            raise DriverError(f"cannot read the capabilities from {self._connections.uri(host)}: "
                              f"{what_was_wrong(exc, xml)}", host) from exc

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
        except UNREADABLE as exc:
            # One domain the parser cannot read fails the discovery: a snapshot without it would plan a
            # host as emptier than it is.
            raise DriverError(f"cannot read the XML of domain {dom.name()}: {what_was_wrong(exc, xml)}",
                              host) from exc

    def running_vms(self, host: str) -> tuple[str, ...]:
        """Names of the VMs running on ``host``."""
        stops = self._connections.stops

        def names(conn: libvirt.virConnect) -> tuple[str, ...]:
            listed_at = stops.now()
            active = tuple(sorted(d.name() for d in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)))
            if stops.names().intersection(active):
                # running again (not a migration's paused copy): a stop seen before is past
                stops.running([d.name() for d in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_RUNNING)],
                              listed_at)
            return active

        return self._connections.call(host, "listing running VMs", names)

    def shut_off_vms(self, host: str) -> tuple[str, ...]:
        """Names of the persistent VMs defined on ``host`` that are not running."""
        flags = libvirt.VIR_CONNECT_LIST_DOMAINS_INACTIVE | libvirt.VIR_CONNECT_LIST_DOMAINS_PERSISTENT
        return self._connections.call(host, "listing shut-off VMs", lambda c: tuple(sorted(
            d.name() for d in c.listAllDomains(flags))))

    def shut_off_reasons(self, host: str) -> dict[str, str]:
        """Persistent VMs defined on ``host`` and shut off -> why (libvirt's state reason, as a word of
        ``SHUTOFF_REASONS``). libvirtd keeps a reason only while it runs: after its restart (a host's
        reboot) an inactive domain's reason reads "unknown".

        And domains that stopped there and left no definition (a transient guest destroyed or shut
        down), as this driver's connections saw them stop (:class:`StopJournal`): libvirt itself keeps
        nothing of them."""
        stops = self._connections.stops
        flags = libvirt.VIR_CONNECT_LIST_DOMAINS_INACTIVE | libvirt.VIR_CONNECT_LIST_DOMAINS_PERSISTENT

        def reasons(conn: libvirt.virConnect) -> dict[str, str]:
            out: dict[str, str] = {}
            for dom in conn.listAllDomains(flags):
                try:
                    state, reason = dom.state()
                except libvirt.libvirtError as exc:
                    if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                        continue  # undefined between listing and asking
                    raise
                if state != libvirt.VIR_DOMAIN_SHUTOFF:
                    continue  # started between listing and asking
                out[dom.name()] = SHUTOFF_REASONS[reason] if 0 <= reason < len(SHUTOFF_REASONS) else "unknown"
            seen = {name: reason for name, reason in stops.stopped_on(host).items() if name not in out}
            if seen:  # gone from the host, if it is not running there again
                active = {d.name() for d in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)}
                out.update((name, reason) for name, reason in seen.items() if name not in active)
            return dict(sorted(out.items()))

        return self._connections.call(host, "reading why VMs are shut off", reasons)

    def in_migration(self, host: str) -> tuple[str, ...]:
        """VMs on ``host`` paused because a live migration moves them: the destination's copy before it
        takes over (reasons "migration", "starting up"), a source in post-copy. Seen on the lab."""
        return self._connections.call(host, "listing VMs in migration", lambda c: tuple(
            name for name, ended in _migration_pauses(c) if not ended))

    def stranded(self, host: str) -> tuple[str, ...]:
        """VMs on ``host`` paused for a live migration (reason "migration") with no migration job: the
        job ended and left the domain paused (seen on the lab: the source's libvirtd killed at the
        switch-over; restarted, it kept the domain paused with no job and the target had none). An
        incoming copy is not one: its job is only readable on the source, which libvirt refuses."""
        return self._connections.call(host, "listing VMs a migration left paused", lambda c: tuple(
            name for name, ended in _migration_pauses(c) if ended))

    def locate(self, vm: str) -> tuple[str, ...]:
        """Hosts where ``vm`` runs now.

        An unreachable host is skipped when the VM was found elsewhere (a VM runs on one host);
        when it was found nowhere and some host did not answer, that is TransientDriverError.
        """
        found, unreachable = [], []
        for host in self._connections.hosts:
            try:
                if self._connections.call(host, f"looking up {vm}", lambda c: is_running(c, vm)):
                    found.append(host)
            except TransientDriverError as exc:
                unreachable.append(exc)
        if not found and unreachable:
            raise TransientDriverError(f"{vm} not found on the reachable hosts; unreachable: "
                                       + "; ".join(str(e) for e in unreachable))
        return tuple(found)
