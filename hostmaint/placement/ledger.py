"""The planner's working copy of a fleet: what is free on every host and cell.

A ``FleetSnapshot`` is frozen; planning needs a ledger it can charge as it
decides. ``Ledger`` is built once from the snapshot and then only ever charged
through :meth:`Ledger.apply`, so every plan is checked against the same numbers
the lead's contract names:

* plannable memory of a cell = ``free_mib`` - its share of the host's
  ``reserved_memory_mib`` (split by cell size) - headroom % of ``memory_mib``
  - memory already planned onto it;
* hugepage-backed VMs draw pages of their size from the cell's free pool
  instead (libvirt's free memory already excludes the pool);
* vCPU budget of a host = ``cpu_count * vcpu_overcommit`` - vCPUs of the VMs
  on it, planned ones included;
* a pinned VM needs host CPUs no other VM pins (vcpupin, emulatorpin,
  iothreadpin or the ``<vcpu cpuset>``).

Utilisation (for the balance objective and reports) is raw: used memory over
cell size, where free hugepages count as free.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from hostmaint.models import FleetSnapshot, Host, HostState, Vm


@dataclass(slots=True)  # one per cell of every host: 20,000 at 5,000 hosts
class CellLoad:
    """One host cell as the planner sees it while it charges placements."""

    id: int
    memory_mib: int
    avail_mib: float  # plannable ordinary memory left
    used_mib: float  # raw used memory (hugepage pool pages in use included), for utilisation
    hugepages: dict[int, int]  # page size KiB -> free pages
    cpus: tuple[int, ...]
    pinned: set[int] = field(default_factory=set)

    @property
    def util(self) -> float:
        return self.used_mib / self.memory_mib if self.memory_mib else 0.0

    def free_cpus(self) -> list[int]:
        """Host CPUs of this cell no VM pins, ascending."""
        return [c for c in self.cpus if c not in self.pinned]


@dataclass(slots=True)
class HostLoad:
    """One host's free capacity and what already runs there."""

    name: str
    cluster: str
    cpu_group: str
    state: HostState
    cells: list[CellLoad]
    vcpu_budget: float
    vcpus_used: int = 0
    groups: Counter[str] = field(default_factory=Counter)  # anti-affinity group -> VMs on the host
    vm_count: int = 0
    weight: float = 1.0  # memory relative to the cluster's mean host: the objective's weight

    memory_mib: int = 0  # the sum of the cells' memory, set at construction

    def __post_init__(self) -> None:
        self.memory_mib = sum(c.memory_mib for c in self.cells)

    @property
    def used_mib(self) -> float:
        return sum(c.used_mib for c in self.cells)

    @property
    def util(self) -> float:
        mem = self.memory_mib
        return self.used_mib / mem if mem else 0.0

    @property
    def avail_mib(self) -> float:
        return sum(max(c.avail_mib, 0.0) for c in self.cells)

    def cell(self, cell_id: int) -> CellLoad:
        for c in self.cells:
            if c.id == cell_id:
                return c
        raise KeyError(cell_id)


def pinned_cpus(vm: Vm) -> set[int]:
    """Host CPUs a pinned VM holds (vcpupin, emulatorpin, iothreadpin, vcpu cpuset); empty for a
    floating VM."""
    if not vm.pinned:
        return set()
    held: set[int] = set(vm.emulatorpin) | set(vm.vcpu_cpuset)
    for cpus in (*vm.vcpupin.values(), *vm.iothreadpin.values()):
        held.update(cpus)
    return held


def _host_load(host: Host, vms: Sequence[Vm], headroom_pct: float, overcommit: float) -> HostLoad:
    total = host.memory_mib
    cells: list[CellLoad] = []
    for c in sorted(host.cells, key=lambda c: c.id):
        reserved_share = host.reserved_memory_mib * c.memory_mib / total if total else 0.0
        hp_free_mib = sum(hp.free * hp.size_kib for hp in c.hugepages) / 1024
        cells.append(CellLoad(
            id=c.id,
            memory_mib=c.memory_mib,
            avail_mib=c.free_mib - reserved_share - headroom_pct / 100 * c.memory_mib,
            used_mib=max(c.memory_mib - c.free_mib - hp_free_mib, 0.0),
            hugepages={hp.size_kib: hp.free for hp in c.hugepages},
            cpus=_ascending(c.cpus),
        ))
    load = HostLoad(name=host.name, cluster=host.cluster, cpu_group=host.cpu_group, state=host.state, cells=cells,
                    vcpu_budget=host.cpu_count * overcommit)
    # every host of the fleet is booked, most of them only weighed: a map of its CPUs only when a
    # VM there pins one
    cpu_cell: dict[int, CellLoad] | None = None
    for vm in vms:
        load.vcpus_used += vm.vcpus
        if vm.anti_affinity:
            load.groups[vm.anti_affinity] += 1
        if vm.pinned:
            if cpu_cell is None:
                cpu_cell = {cpu: cell for cell in cells for cpu in cell.cpus}
            for cpu in pinned_cpus(vm):
                if cpu in cpu_cell:
                    cpu_cell[cpu].pinned.add(cpu)
    load.vm_count = len(vms)
    return load


def _ascending(cpus: tuple[int, ...]) -> tuple[int, ...]:
    # the host's own tuple where it is in order already (as discovery lists CPUs): not a copy per cell
    ordered = tuple(sorted(cpus))
    return cpus if ordered == cpus else ordered


@dataclass
class Ledger:
    """Every host of a snapshot with its free capacity; charged as the planner decides."""

    hosts: dict[str, HostLoad]

    @classmethod
    def from_snapshot(cls, snapshot: FleetSnapshot) -> Ledger:
        lim = snapshot.limits
        hosts = {h.name: _host_load(h, snapshot.vms_on(h.name), lim.memory_headroom_pct, lim.vcpu_overcommit)
                 for h in sorted(snapshot.hosts, key=lambda h: h.name)}
        mean = sum(h.memory_mib for h in hosts.values()) / len(hosts) if hosts else 0.0
        for h in hosts.values():
            h.weight = h.memory_mib / mean if mean else 1.0
        return cls(hosts)

    def apply(self, vm: Vm, fit: Fit) -> None:
        """Charge a chosen fit: memory or hugepages per cell, vCPUs, pinned CPUs, anti-affinity."""
        host = self.hosts[fit.host]
        for cell_id, mib in zip(fit.cells, fit.cell_mib, strict=True):
            cell = host.cell(cell_id)
            cell.used_mib += mib
            if vm.hugepage_kib:
                cell.hugepages[vm.hugepage_kib] = cell.hugepages.get(vm.hugepage_kib, 0) - pages_for(
                    mib, vm.hugepage_kib)
            else:
                cell.avail_mib -= mib
        cpu_cell = {cpu: cell for cell in host.cells for cpu in cell.cpus}
        for new_cpu in fit.cpu_map.values():
            cpu_cell[new_cpu].pinned.add(new_cpu)
        host.vcpus_used += vm.vcpus
        host.vm_count += 1
        if vm.anti_affinity:
            host.groups[vm.anti_affinity] += 1

    def unapply(self, vm: Vm, fit: Fit) -> None:
        """Exactly undo ``apply(vm, fit)`` (the planner changing its mind)."""
        host = self.hosts[fit.host]
        for cell_id, mib in zip(fit.cells, fit.cell_mib, strict=True):
            cell = host.cell(cell_id)
            cell.used_mib -= mib
            if vm.hugepage_kib:
                cell.hugepages[vm.hugepage_kib] += pages_for(mib, vm.hugepage_kib)
            else:
                cell.avail_mib += mib
        freed = set(fit.cpu_map.values())
        for cell in host.cells:
            cell.pinned -= freed
        host.vcpus_used -= vm.vcpus
        host.vm_count -= 1
        if vm.anti_affinity:
            host.groups[vm.anti_affinity] -= 1

    def unload(self, vm: Vm) -> None:
        """Lower the utilisation of ``vm``'s host as if it left, freeing nothing for planning.

        vCPUs, pinned CPUs, anti-affinity slots and memory stay booked, so moves planned this
        way never depend on each other and may run in any order.
        """
        for cell, mib in _cell_shares(self.hosts[vm.host], vm.memory_mib):
            cell.used_mib = max(cell.used_mib - mib, 0.0)

    def release(self, vm: Vm, *, credit_cells: bool) -> None:
        """Take a VM off its host's books (it moved away).

        Utilisation, vCPUs, pins and anti-affinity are released. Which cells held
        its memory is not in the snapshot, so plannable memory is credited back
        only when ``credit_cells`` (the host is being emptied: see
        :meth:`empty_host`); otherwise the freed memory stays unplannable, which
        is safe.
        """
        host = self.hosts[vm.host]
        share = _cell_shares(host, vm.memory_mib)
        for cell, mib in share:
            cell.used_mib = max(cell.used_mib - mib, 0.0)
            if credit_cells:
                if vm.hugepage_kib:
                    cell.hugepages[vm.hugepage_kib] = cell.hugepages.get(vm.hugepage_kib, 0) + pages_for(
                        mib, vm.hugepage_kib)
                else:
                    cell.avail_mib += mib
        self.release_bookings(vm)

    def release_bookings(self, vm: Vm, host_name: str | None = None) -> None:
        """Give back what ``vm`` held on a host (its own by default) besides memory: pinned CPUs,
        vCPUs, its anti-affinity slot."""
        host = self.hosts[host_name or vm.host]
        held = pinned_cpus(vm)
        for cell in host.cells:
            cell.pinned -= held
        host.vcpus_used -= vm.vcpus
        host.vm_count -= 1
        if vm.anti_affinity:
            host.groups[vm.anti_affinity] -= 1


def _cell_shares(host: HostLoad, memory_mib: int) -> list[tuple[CellLoad, float]]:
    """Split a departing VM's memory over cells in proportion to what each cell uses."""
    used = sum(c.used_mib for c in host.cells)
    if used <= 0:
        return [(c, 0.0) for c in host.cells]
    return [(c, min(c.used_mib, memory_mib * c.used_mib / used)) for c in host.cells]


def pages_for(mib: float, page_kib: int) -> int:
    """Hugepages of ``page_kib`` needed to back ``mib`` MiB (rounded up)."""
    kib = int(round(mib * 1024))
    return -(-kib // page_kib)


@dataclass(frozen=True)
class Fit:
    """One way a VM fits a host: target cells (guest-cell order for vNUMA), memory per cell, CPU rewrite."""

    host: str
    cells: tuple[int, ...]
    cell_mib: tuple[float, ...]
    numa_local: bool
    cpu_map: dict[int, int] = field(default_factory=dict)  # source host CPU -> target host CPU
