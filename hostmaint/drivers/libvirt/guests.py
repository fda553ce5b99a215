"""What the driver does to guests besides moving them: shut down, start, measure dirty rates, autostart."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import libvirt

from hostmaint.drivers.libvirt.connections import Connections, is_running, lookup
from hostmaint.errors import DriverError


class Guests:
    """Power and dirty-rate sampling of the guests on the hosts of ``connections``."""

    def __init__(self, connections: Connections, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self._connections = connections
        self._clock = clock
        self._sleep = sleep

    def shutdown(self, vm: str, host: str, timeout: float = 120.0) -> None:
        """ACPI shutdown, then wait until it stopped. DriverError when it did not within ``timeout``.

        A transient domain is refused before anything is sent: libvirt forgets a transient domain
        the moment it stops, so ``start`` could never bring it back after the maintenance.
        """
        def request(conn: libvirt.virConnect) -> bool:
            dom = lookup(conn, vm)
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

        call = self._connections.call
        if not call(host, f"shutting down {vm}", request):
            return  # already stopped
        deadline = self._clock() + timeout
        while self._clock() < deadline:
            if not call(host, f"waiting for {vm} to stop", lambda c: is_running(c, vm)):
                return
            self._sleep(min(1.0, timeout / 10))
        raise DriverError(f"{vm} did not shut down within {timeout:g}s", host)

    def resume(self, vm: str, host: str) -> None:
        """Let a paused ``vm`` run again on ``host`` (no-op when it runs; DriverError when it is not there)."""
        def run(conn: libvirt.virConnect) -> None:
            dom = lookup(conn, vm)
            if dom is None or not dom.isActive():
                raise DriverError(f"{vm} is not running on {host}: nothing to resume", host)
            if dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED:
                dom.resume()

        self._connections.call(host, f"resuming {vm}", run)

    def discard_stale(self, vm: str, host: str, running_on: str) -> None:
        """Destroy ``vm``'s copy on ``host``, paused for a migration with no job left, when ``running_on``
        runs it (running, not paused); its definition goes too when the running copy is persistent (the
        migration's UNDEFINE_SOURCE, which the source's dead libvirtd never did). DriverError, with
        nothing done, when either is not so any more."""
        def running_there(conn: libvirt.virConnect) -> bool:
            dom = lookup(conn, vm)
            if dom is None or dom.state()[0] != libvirt.VIR_DOMAIN_RUNNING:
                raise DriverError(f"{vm} does not run on {running_on}: its copy on {host} is kept", running_on)
            return bool(dom.isPersistent())

        persistent_there = self._connections.call(running_on, f"checking {vm} runs", running_there)

        def discard(conn: libvirt.virConnect) -> None:
            dom = lookup(conn, vm)
            if dom is None or not dom.isActive():
                return  # gone already
            state, reason = dom.state()
            if (state != libvirt.VIR_DOMAIN_PAUSED or reason != libvirt.VIR_DOMAIN_PAUSED_MIGRATION
                    or dom.jobInfo()[0] != libvirt.VIR_DOMAIN_JOB_NONE):
                raise DriverError(f"{vm} on {host} is no longer a copy a migration left paused: kept", host)
            dom.destroy()
            if persistent_there and dom.isPersistent():
                dom.undefine()

        self._connections.call(host, f"removing the stale copy of {vm}", discard)

    def start(self, vm: str, host: str) -> None:
        """Start a defined, stopped VM (no-op when it runs)."""
        def create(conn: libvirt.virConnect) -> None:
            dom = lookup(conn, vm)
            if dom is None:
                raise DriverError(f"{vm} is not defined on {host}", host)
            if not dom.isActive():
                dom.create()

        self._connections.call(host, f"starting {vm}", create)

    def autostarts(self, host: str) -> dict[str, bool]:
        """Persistent VMs defined on ``host`` (running or not) -> whether each starts with the host."""
        def flags(conn: libvirt.virConnect) -> dict[str, bool]:
            out = {}
            for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_PERSISTENT):
                try:
                    out[dom.name()] = bool(dom.autostart())
                except libvirt.libvirtError as exc:
                    if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                        continue  # undefined between listing and asking
                    raise
            return dict(sorted(out.items()))

        return self._connections.call(host, "reading which VMs start with the host", flags)

    def set_autostart(self, vm: str, host: str, autostart: bool) -> None:
        """Make ``vm``'s definition on ``host`` start with its host, or not; DriverError when it has none."""
        def set_flag(conn: libvirt.virConnect) -> None:
            dom = lookup(conn, vm)
            if dom is None or not dom.isPersistent():
                raise DriverError(f"{vm} is not defined on {host}", host)
            dom.setAutostart(int(autostart))

        self._connections.call(host, f"setting the autostart of {vm}", set_flag)

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

        call = self._connections.call
        pending = set(call(host, "starting dirty-rate sampling", start))
        rates: dict[str, float] = {}
        self._sleep(period)
        deadline = self._clock() + period + 5.0
        while pending:
            for vm, (status, rate) in call(host, "reading dirty rates", read).items():
                if vm in pending and status == libvirt.VIR_DOMAIN_DIRTYRATE_MEASURED:
                    rates[vm] = rate
                    pending.discard(vm)
            if not pending or self._clock() >= deadline:
                break
            self._sleep(0.2)
        return rates
