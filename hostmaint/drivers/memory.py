"""A SIMULATED fleet: an in-memory Hypervisor (and, through memory_shell, a HostShell).

Nothing here touches a real host. It exists for the quick demo, for flow tests
that need no root, and for benchmarks at scale; every snapshot it produces says
``source: simulated``. Migrations take ``memory / bandwidth`` simulated seconds
(scaled by ``time_scale`` into real ones), a target without room refuses them,
and a host that reboots while VMs are on it loses them — so a flow that breaks
the rules is caught, not forgiven.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

from hostmaint.drivers.base import GuestSize, ProgressCallback
from hostmaint.drivers.memory_shell import SimHostPackages, SimulatedShell
from hostmaint.errors import DriverError, MigrationError, TransientDriverError
from hostmaint.models import (
    QEMU_DOWNTIME_LIMIT_MS,
    Cell,
    CommandResult,
    FleetSnapshot,
    HostDiscovery,
    MigrationOptions,
    MigrationProgress,
    MigrationResult,
    StepOutcome,
    Vm,
)

SIM_FORMAT = "hostmaint.simfleet/1"
MIB = 1024 * 1024


class SimulatedFleet:
    """A simulated cluster implementing ``Hypervisor``; ``shell`` is its ``HostShell``.

    State can be persisted to a JSON file so that separate CLI commands see the
    same simulated fleet (VMs stay where the last command moved them).
    """

    def __init__(self, snapshot: FleetSnapshot, packages: dict[str, SimHostPackages], *,
                 bandwidth_mib_s: float = 1100.0, time_scale: float = 0.001,
                 state_file: Path | None = None, clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.base = snapshot
        self.cells: dict[str, tuple[Cell, ...]] = {h.name: h.cells for h in snapshot.hosts}
        self.vms: dict[str, Vm] = {v.name: v for v in snapshot.vms}
        self.running: dict[str, set[str]] = {h.name: set() for h in snapshot.hosts}
        for v in snapshot.vms:
            self.running[v.host].add(v.name)
        self.stopped: dict[str, str] = {}  # vm -> host where it was shut down
        # vm -> why it is shut off, as libvirt words it ("shutdown": asked to, or by its guest;
        # "destroyed": by a tenant, stop_outside); "unknown" once its host has rebooted, as libvirtd forgets
        self.stop_reasons: dict[str, str] = {}
        self.lost: list[str] = []
        # the VMs whose definition starts with its host (libvirt's autostart flag); migrate keeps it, as the
        # libvirt driver puts back what PERSIST_DEST drops; a move that lands behind the driver's back loses it
        self.autostart: set[str] = set()
        self.packages = packages
        self.bandwidth_mib_s = bandwidth_mib_s
        self.time_scale = time_scale
        self.state_file = state_file
        self.clock = clock
        self.sleep = sleep
        self.fail_migrations: set[str] = set()  # VMs whose migration fails (tests)
        self.slow_migrations: dict[str, float] = {}  # VM -> factor (a stalled migration)
        # source host -> what its switch-over takes beyond QEMU's limit (tests): each pause is then the
        # migration's limit spent in full and that (else the model's 30 ms)
        self.slow_switchover_ms: dict[str, float] = {}
        self._aborts: set[str] = set()
        self._lock = threading.RLock()
        self._seen_boot: dict[str, str] = {h: p.boot_id for h, p in packages.items()}
        self.shell = SimulatedShell(packages, clock=clock)
        self.migration_log: list[MigrationResult] = []
        self._base_dump: tuple[FleetSnapshot, dict[str, object]] | None = None

    # --- persistence ---------------------------------------------------------------

    def to_json(self) -> str:
        with self._lock:
            data = {
                "format": SIM_FORMAT,
                "simulated": True,
                "snapshot": self._base_json(),
                "running": {h: sorted(v) for h, v in self.running.items()},
                "stopped": self.stopped,
                "stop_reasons": self.stop_reasons,
                "lost": self.lost,
                "autostart": sorted(self.autostart),
                "packages": {h: asdict(p) for h, p in self.packages.items()},
                "seen_boot": self._seen_boot,
                "bandwidth_mib_s": self.bandwidth_mib_s,
                "time_scale": self.time_scale,
            }
        return json.dumps(data, indent=2, sort_keys=True)

    def _base_json(self) -> dict[str, object]:
        # every change saves the whole fleet, and the snapshot in it (frozen) changes only when a resize
        # replaces it: dumped once per snapshot object (in the flow tests ~10 % of the test process's CPU)
        if self._base_dump is None or self._base_dump[0] is not self.base:
            self._base_dump = (self.base, self.base.model_dump(mode="json"))
        return self._base_dump[1]

    def save(self) -> None:
        # two patch runs of a window save side by side: one temporary file each, or one renames the
        # other's away and the second rename fails
        if self.state_file is not None:
            with self._lock:
                text = self.to_json()
            tmp = self.state_file.with_name(f"{self.state_file.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            tmp.write_text(text)
            tmp.replace(self.state_file)

    @classmethod
    def load(cls, path: Path, *, time_scale: float | None = None, **kwargs: object) -> SimulatedFleet:
        """Load a fleet saved by ``save`` (or written by ``hostmaint demo``).

        ``time_scale``: the inventory's (``simulation.time_scale``), where the docs tell operators to set
        the speed; it wins over the value the state file was first written with.
        """
        data = json.loads(path.read_text())
        if data.get("format") != SIM_FORMAT:
            raise DriverError(f"{path}: not a simulated fleet state file (format {data.get('format')!r})")
        snapshot = FleetSnapshot.model_validate(data["snapshot"])
        packages = {h: SimHostPackages(**p) for h, p in data["packages"].items()}
        fleet = cls(snapshot, packages, bandwidth_mib_s=data["bandwidth_mib_s"],
                    time_scale=data["time_scale"] if time_scale is None else time_scale, state_file=path,
                    **kwargs)  # type: ignore[arg-type]
        fleet.running = {h: set(v) for h, v in data["running"].items()}
        fleet.stopped = dict(data["stopped"])
        fleet.stop_reasons = dict(data.get("stop_reasons", {}))  # absent in files of older versions
        fleet.lost = list(data["lost"])
        fleet.autostart = set(data.get("autostart", []))  # absent in files of older versions
        fleet._seen_boot = dict(data["seen_boot"])
        return fleet

    # --- Hypervisor ----------------------------------------------------------------

    def _reachable(self, host: str) -> None:
        if host not in self.running:
            raise DriverError("unknown host in the simulated fleet", host)
        pkg = self.packages.get(host)
        if pkg is None:
            return
        if pkg.down_until is not None and self.clock() < pkg.down_until:
            raise TransientDriverError("libvirtd unreachable (simulated host is rebooting)", host)
        if pkg.never_returns and pkg.down_until is not None:
            raise TransientDriverError("libvirtd unreachable (simulated host never came back)", host)
        if self._seen_boot.get(host) != pkg.boot_id:
            # The host rebooted: whatever ran on it is gone, exactly as on real iron.
            self.lost.extend(sorted(self.running[host]))
            self.running[host] = set()
            for vm, on in self.stopped.items():
                if on == host:
                    self.stop_reasons[vm] = "unknown"
            self._seen_boot[host] = pkg.boot_id
            self.save()

    def _free_cells(self, host: str, extra: dict[str, int] | None = None) -> list[tuple[Cell, int]]:
        used = sum(self.vms[v].memory_mib for v in self.running[host]) + sum((extra or {}).values())
        total = sum(c.memory_mib for c in self.cells[host])
        out = []
        for c in self.cells[host]:
            share = used * c.memory_mib // total if total else 0
            out.append((c, max(0, c.memory_mib - share)))
        return out

    def discover(self, host: str) -> HostDiscovery:
        with self._lock:
            self._reachable(host)
            cells = tuple(c.model_copy(update={"free_mib": free}) for c, free in self._free_cells(host))
            vms = tuple(self.vms[v].model_copy(update={"host": host}) for v in sorted(self.running[host]))
            return HostDiscovery(host=host, hostname=host, host_uuid=f"sim-{host}", cells=cells, vms=vms)

    def running_vms(self, host: str) -> tuple[str, ...]:
        with self._lock:
            self._reachable(host)
            return tuple(sorted(self.running[host]))

    def shut_off_vms(self, host: str) -> tuple[str, ...]:
        with self._lock:
            self._reachable(host)
            return tuple(sorted(vm for vm, h in self.stopped.items() if h == host))

    def shut_off_reasons(self, host: str) -> dict[str, str]:
        with self._lock:
            self._reachable(host)
            return {vm: self.stop_reasons.get(vm, "unknown") for vm, h in sorted(self.stopped.items()) if h == host}

    def _defined_on(self, host: str) -> list[str]:
        """The persistent VMs defined on ``host``: running there, or shut off there."""
        names = self.running[host] | {vm for vm, h in self.stopped.items() if h == host}
        return sorted(vm for vm in names if vm in self.vms and self.vms[vm].persistent)

    def autostarts(self, host: str) -> dict[str, bool]:
        with self._lock:
            self._reachable(host)
            return {vm: vm in self.autostart for vm in self._defined_on(host)}

    def set_autostart(self, vm: str, host: str, autostart: bool) -> None:
        with self._lock:
            self._reachable(host)
            if vm not in self._defined_on(host):
                raise DriverError(f"{vm} is not defined on {host}", host)
            if autostart:
                self.autostart.add(vm)
            else:
                self.autostart.discard(vm)
            self.save()

    def land_unwatched(self, vm: str, target: str) -> None:
        """``vm``'s migration to ``target`` completes with no driver left to see it end (its run died): it
        runs there, defined without its autostart flag, as libvirt's PERSIST_DEST leaves it. Tests."""
        with self._lock:
            for names in self.running.values():
                names.discard(vm)
            self.running[target].add(vm)
            self.autostart.discard(vm)
            self.save()

    def locate(self, vm: str) -> tuple[str, ...]:
        with self._lock:
            out = []
            for host, names in sorted(self.running.items()):
                try:
                    self._reachable(host)
                except TransientDriverError:
                    continue
                if vm in names:
                    out.append(host)
            return tuple(out)

    def migrate(self, vm: str, source: str, target: str, options: MigrationOptions,
                on_progress: ProgressCallback | None = None) -> MigrationResult:
        with self._lock:
            self._reachable(source)
            self._reachable(target)
            if vm not in self.running[source]:
                raise MigrationError(f"VM {vm} is not running on {source}", source, vm, target)
            mem = self.vms[vm].memory_mib
            room = sum(free for _, free in self._free_cells(target))
            if room < mem:
                raise MigrationError(f"migrating {vm} to {target}: target has {room} MiB free, "
                                     f"VM needs {mem} MiB", source, vm, target)
            self._aborts.discard(vm)
        factor = self.slow_migrations.get(vm, 1.0)
        sim_seconds = mem / self.bandwidth_mib_s * factor
        start = self.clock()
        steps = 10
        for i in range(1, steps + 1):
            self.sleep(sim_seconds * self.time_scale / steps)
            elapsed = (i / steps) * sim_seconds
            if on_progress is not None:
                done = int(mem * MIB * i / steps / factor) if factor > 1 else int(mem * MIB * i / steps)
                on_progress(MigrationProgress(vm=vm, elapsed_s=elapsed, data_total=mem * MIB,
                                              data_processed=done, data_remaining=mem * MIB - done,
                                              iterations=1))
            budget = max(options.min_budget_seconds, options.seconds_per_gib * mem / 1024)
            if vm in self._aborts or elapsed > budget:
                self._aborts.discard(vm)
                raise MigrationError(f"migration of {vm} to {target} aborted after {elapsed:.1f}s "
                                     f"(budget {budget:.0f}s); it still runs on {source}", source, vm, target)
        with self._lock:
            if vm in self.fail_migrations:
                raise MigrationError(f"migration of {vm} to {target} failed (simulated fault); "
                                     f"it still runs on {source}", source, vm, target)
            self._reachable(target)
            self.running[source].discard(vm)
            self.running[target].add(vm)
            self.save()
        pause = 30.0
        if source in self.slow_switchover_ms:
            pause = (options.downtime_limit_ms or QEMU_DOWNTIME_LIMIT_MS) + self.slow_switchover_ms[source]
        result = MigrationResult(vm=vm, source=source, target=target, outcome=StepOutcome.OK,
                                 seconds=round(sim_seconds, 3), downtime_ms=pause, data_bytes=mem * MIB,
                                 iterations=2)
        self.migration_log.append(result)
        del start
        return result

    def abort(self, vm: str, source: str) -> None:
        self._aborts.add(vm)

    def shutdown(self, vm: str, host: str, timeout: float = 120.0) -> None:
        with self._lock:
            self._reachable(host)
            if vm not in self.running[host]:
                raise DriverError(f"VM {vm} is not running here", host)
            self.running[host].discard(vm)
            self.stopped[vm] = host
            self.stop_reasons[vm] = "shutdown"
            self.save()

    def stop_outside(self, vm: str, reason: str = "destroyed") -> str:
        """A tenant stops ``vm`` wherever it runs (``virsh destroy``, or its guest shuts down: reason
        "shutdown"), behind hostmaint's back; returns the host it stays defined on. Tests and demos."""
        with self._lock:
            host = next((h for h, names in self.running.items() if vm in names), None)
            if host is None:
                raise DriverError(f"VM {vm} is not running anywhere")
            self.running[host].discard(vm)
            self.stopped[vm] = host
            self.stop_reasons[vm] = reason
            self.save()
            return host

    def start(self, vm: str, host: str) -> None:
        with self._lock:
            self._reachable(host)
            self.stopped.pop(vm, None)
            self.stop_reasons.pop(vm, None)
            self.running[host].add(vm)
            self.save()

    # --- GuestResize: a simulated guest grows as libvirt would let it ----------------

    def _running(self, vm: str, host: str) -> Vm:
        self._reachable(host)
        if vm not in self.running[host]:
            raise DriverError(f"{vm} is not running on {host}", host)
        return self.vms[vm]

    def _resized(self, vm: Vm, **update: object) -> None:
        new = vm.model_copy(update=update)
        self.vms[vm.name] = new
        self.base = self.base.model_copy(update={"vms": tuple(new if v.name == vm.name else v
                                                             for v in self.base.vms)})
        self.save()

    def guest_size(self, vm: str, host: str, *, persistent: bool = False) -> GuestSize:
        with self._lock:
            v = self._running(vm, host)
            vmem = v.virtio_mem
            return GuestSize(vcpus=v.vcpus, max_vcpus=v.max_vcpus or v.vcpus, memory_mib=v.memory_mib,
                             vcpupin=dict(v.vcpupin), dimms=((0, 0),) * v.memory_slots_used,
                             virtio_mem_requested_mib=vmem.requested_mib if vmem else None,
                             virtio_mem_size_mib=vmem.size_mib if vmem else 0)

    def set_vcpus(self, vm: str, host: str, count: int) -> None:
        with self._lock:
            v = self._running(vm, host)
            if not 1 <= count <= (v.max_vcpus or v.vcpus):
                raise DriverError(f"setting {vm} to {count} vCPUs: it has at most {v.max_vcpus or v.vcpus}", host)
            self._resized(v, vcpus=count)

    def pin_vcpus(self, vm: str, host: str, pins: Mapping[int, Sequence[int]]) -> None:
        with self._lock:
            v = self._running(vm, host)
            self._resized(v, vcpupin={**v.vcpupin, **{k: tuple(sorted(c)) for k, c in pins.items()}})

    def add_dimm(self, vm: str, host: str, mib: int, node: int, page_kib: int = 0) -> None:
        with self._lock:
            v = self._running(vm, host)
            if v.max_memory_mib is None or v.memory_slots_used >= v.memory_slots \
                    or v.memory_mib + mib > v.max_memory_mib:
                raise DriverError(f"adding a {mib} MiB DIMM to {vm}: no free slot or over its maxMemory", host)
            room = sum(free for _, free in self._free_cells(host))
            if room < mib:
                raise DriverError(f"adding a {mib} MiB DIMM to {vm}: {host} has {room} MiB free", host)
            self._resized(v, memory_mib=v.memory_mib + mib, memory_slots_used=v.memory_slots_used + 1)

    def set_virtio_mem(self, vm: str, host: str, requested_mib: int) -> None:
        with self._lock:
            v = self._running(vm, host)
            if v.virtio_mem is None or requested_mib > v.virtio_mem.size_mib:
                raise DriverError(f"setting {vm}'s virtio-mem to {requested_mib} MiB: no such room", host)
            self._resized(v, virtio_mem=v.virtio_mem.model_copy(update={"requested_mib": requested_mib}))

    # --- HostShell, delegated (so one object can serve both seams) ------------------

    def run(self, host: str, argv: Sequence[str], timeout: float = 60.0) -> CommandResult:
        result = self.shell.run(host, argv, timeout)
        self.save()
        return result

    def close(self) -> None:
        self.save()
