"""The real hypervisor driver: libvirt, one connection per host per thread.

The only package that imports ``libvirt``. It is built of parts, each usable alone:

* :mod:`.connections` — the connections (through an injected :class:`Connector`; the default opens
  libvirt) and the capabilities cache; the connection failed or dropped → ``TransientDriverError``
  naming host and URI, any other libvirt error of a call → ``DriverError`` naming the host;
* :mod:`.discovery` — hosts and domains read and parsed; host output the parsers cannot read →
  ``DriverError`` naming the host, the domain if there is one, and what was wrong;
* :mod:`.migration` — migration jobs and their monitor (progress, the driver's last word, abort,
  post-copy); a migration that failed, was aborted or could not be confirmed → ``MigrationError``
  naming the VM, source and target;
* :mod:`.guests` — shutdown, start, dirty-rate sampling and the autostart flag;
* :mod:`.resize` — vCPU and memory hot-plug, live and persistent, and what a guest has now.

:class:`LibvirtHypervisor` puts them together behind the ``Hypervisor`` protocol.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from hostmaint.drivers.base import GuestSize, ProgressCallback
from hostmaint.drivers.libvirt.connections import Connections, ConnectionSettings, Connector, open_libvirt
from hostmaint.drivers.libvirt.discovery import Discovery
from hostmaint.drivers.libvirt.guests import Guests
from hostmaint.drivers.libvirt.migration import Migrations, MonitorSettings, wait_for
from hostmaint.drivers.libvirt.resize import Resizes
from hostmaint.inventory import Inventory
from hostmaint.models import HostDiscovery, MigrationOptions, MigrationResult

__all__ = ["ConnectionSettings", "Connector", "LibvirtHypervisor", "MonitorSettings", "open_libvirt"]


class LibvirtHypervisor:
    """The ``Hypervisor`` (and ``MigrationControl``, ``DirtyRateProbe``, ...) over libvirt.

    ``uris`` maps inventory host names to libvirt URIs (``qemu+tcp://10.213.7.11/system``); the
    target's URI is also what the source's libvirtd dials for a peer-to-peer migration.
    ``connector`` opens a connection (tests pass fakes); ``clock``, ``sleep`` (reconnect back-off, waits
    for a guest) and ``wait`` (for an event, with a timeout: a migration's monitor between samples) are
    the driver's time.
    """

    def __init__(self, uris: Mapping[str, str], *, connector: Connector = open_libvirt,
                 connection: ConnectionSettings = ConnectionSettings(), monitor: MonitorSettings = MonitorSettings(),
                 shared_storage_prefixes: Mapping[str, Sequence[str]] | None = None,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
                 wait: Callable[[threading.Event, float], bool] = wait_for) -> None:
        self.connections = Connections(uris, connector=connector, settings=connection, clock=clock, sleep=sleep)
        self.discovery = Discovery(self.connections, shared_storage_prefixes)
        self.migrations = Migrations(self.connections, monitor, clock=clock, wait=wait)
        self.guests = Guests(self.connections, clock=clock, sleep=sleep)
        self.resizes = Resizes(self.connections)

    @classmethod
    def from_inventory(cls, inv: Inventory, cluster: str, **kwargs: Any) -> LibvirtHypervisor:
        """A driver for the hosts of ``cluster`` in ``inv``, with their cluster's shared storage."""
        kwargs.setdefault("shared_storage_prefixes", {h.name: inv.shared_storage_for(h.name)
                                                      for h in inv.hosts_of(cluster)})
        return cls({h.name: h.libvirt_uri for h in inv.hosts_of(cluster)}, **kwargs)

    def uri(self, host: str) -> str:
        """The libvirt URI of ``host``."""
        return self.connections.uri(host)

    def close(self) -> None:
        """Close every connection this driver opened, in every thread."""
        self.connections.close()

    # --- discovery ----------------------------------------------------------------

    def discover(self, host: str) -> HostDiscovery:
        """NUMA cells (memory, CPUs, hugepages, free memory) and every running VM of ``host``."""
        return self.discovery.discover(host)

    def running_vms(self, host: str) -> tuple[str, ...]:
        """Names of the VMs running on ``host``."""
        return self.discovery.running_vms(host)

    def shut_off_vms(self, host: str) -> tuple[str, ...]:
        """Names of the persistent VMs defined on ``host`` that are not running."""
        return self.discovery.shut_off_vms(host)

    def shut_off_reasons(self, host: str) -> dict[str, str]:
        """Persistent VMs defined on ``host`` and shut off -> why (libvirt's state reason)."""
        return self.discovery.shut_off_reasons(host)

    def in_migration(self, host: str) -> tuple[str, ...]:
        """VMs on ``host`` paused because a live migration moves them."""
        return self.discovery.in_migration(host)

    def locate(self, vm: str) -> tuple[str, ...]:
        """Hosts where ``vm`` runs now."""
        return self.discovery.locate(vm)

    def stranded(self, host: str) -> tuple[str, ...]:
        """VMs on ``host`` a live migration that no longer runs left paused."""
        return self.discovery.stranded(host)

    # --- migration ----------------------------------------------------------------

    def migrate(self, vm: str, source: str, target: str, options: MigrationOptions,
                on_progress: ProgressCallback | None = None) -> MigrationResult:
        """Live-migrate ``vm`` from ``source`` to ``target`` and confirm where it runs afterwards."""
        return self.migrations.migrate(vm, source, target, options, on_progress)

    def abort(self, vm: str, source: str) -> None:
        """Abort a running migration of ``vm`` on ``source``; returns at once when none runs."""
        self.migrations.abort(vm, source)

    def start_post_copy(self, vm: str, source: str) -> None:
        """Switch a running migration (started with post_copy) to post-copy."""
        self.migrations.start_post_copy(vm, source)

    def enable_auto_converge(self, vm: str, source: str, max_downtime_ms: int = 2000) -> None:
        """Help a running migration converge: allow a longer final pause."""
        self.migrations.enable_auto_converge(vm, source, max_downtime_ms)

    def set_downtime_limit(self, vm: str, source: str, downtime_ms: int) -> None:
        """QEMU's downtime limit for the running migration of ``vm`` from ``source``, from now on."""
        self.migrations.set_downtime_limit(vm, source, downtime_ms)

    # --- guests -------------------------------------------------------------------

    def shutdown(self, vm: str, host: str, timeout: float = 120.0) -> None:
        """ACPI shutdown, then wait until it stopped; a transient domain is refused."""
        self.guests.shutdown(vm, host, timeout)

    def start(self, vm: str, host: str) -> None:
        """Start a defined, stopped VM (no-op when it runs)."""
        self.guests.start(vm, host)

    def resume(self, vm: str, host: str) -> None:
        """Let a paused ``vm`` run again on ``host``."""
        self.guests.resume(vm, host)

    def discard_stale(self, vm: str, host: str, running_on: str) -> None:
        """Remove ``vm``'s copy a migration left paused on ``host``; ``running_on`` runs it."""
        self.guests.discard_stale(vm, host, running_on)

    def autostarts(self, host: str) -> dict[str, bool]:
        """Persistent VMs defined on ``host`` -> whether each starts with the host."""
        return self.guests.autostarts(host)

    def set_autostart(self, vm: str, host: str, autostart: bool) -> None:
        """Make ``vm``'s definition on ``host`` start with its host, or not."""
        self.guests.set_autostart(vm, host, autostart)

    def measure_dirty_rates(self, host: str, seconds: float = 1.0) -> dict[str, float]:
        """MiB/s per running VM of ``host``, sampled over ``seconds``."""
        return self.guests.measure_dirty_rates(host, seconds)

    # --- resize ---------------------------------------------------------------------

    def guest_size(self, vm: str, host: str, *, persistent: bool = False) -> GuestSize:
        """What ``vm`` on ``host`` has now (``persistent``: what its definition gives it at a restart)."""
        return self.resizes.guest_size(vm, host, persistent=persistent)

    def set_vcpus(self, vm: str, host: str, count: int) -> None:
        """Bring ``count`` vCPUs online, live and persistent."""
        self.resizes.set_vcpus(vm, host, count)

    def pin_vcpus(self, vm: str, host: str, pins: Mapping[int, Sequence[int]]) -> None:
        """Pin each vCPU of ``pins`` to its host CPUs, live and persistent."""
        self.resizes.pin_vcpus(vm, host, pins)

    def add_dimm(self, vm: str, host: str, mib: int, node: int, page_kib: int = 0) -> None:
        """Hot-plug a DIMM on guest node ``node``, live and persistent."""
        self.resizes.add_dimm(vm, host, mib, node, page_kib)

    def set_virtio_mem(self, vm: str, host: str, requested_mib: int) -> None:
        """Set the virtio-mem device's requested size, live and persistent."""
        self.resizes.set_virtio_mem(vm, host, requested_mib)
