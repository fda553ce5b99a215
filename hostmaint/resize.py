"""Plan a live resize of one VM: where its new vCPUs and memory go, and whether its host holds them.

``plan_resize`` is pure and deterministic, like every plan. Given a snapshot, a VM and a target
size it decides:

* which guest NUMA node gets the new vCPUs (the one the domain's ``<cpu><numa>`` already lists them
  in: libvirt fixes that when the domain is defined) and the new memory (virtio-mem's own node; for
  a DIMM the node of the new vCPUs, else the guest node whose host cell has the most room);
* which host cell holds them (the cell the VM's pins or ``numatune`` bind that guest node to; a
  floating VM's growth goes to the roomiest cell), which host CPUs the new vCPUs of a pinned VM are
  pinned to (free ones of that cell, as the old ones are: one each, or the same shared set), and
  which pool the memory is drawn from (the VM's hugepage size, or ordinary memory);
* whether the host holds that with the cluster's headroom (the planner's own cell and vCPU rules,
  :mod:`hostmaint.placement.fit`), and whether N+1 still holds with the grown VM
  (:func:`~hostmaint.placement.evacuate.check_capacity` on the grown snapshot).

When the host cannot hold the grown VM the plan is a live migration first, to the host the planner
picks for the grown VM (:func:`~hostmaint.placement.evacuate.choose`, fit rules unchanged), then the
resize there. A VM defined without room to grow is refused with what to change at its next restart;
so is a memory shrink (it needs the guest's cooperation). A refused plan changes nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from enum import StrEnum

from hostmaint.display import visible
from hostmaint.errors import InputError
from hostmaint.models import (
    CapacityCheck,
    Cell,
    FleetSnapshot,
    Frozen,
    GuestCell,
    HostState,
    Placement,
    Vm,
)
from hostmaint.placement.evacuate import blocker_for, check_capacity, choose, placement_for
from hostmaint.placement.fit import Miss, cell_holds, pool_room, vcpu_room
from hostmaint.placement.ledger import HostLoad, Ledger

# QEMU maps a DIMM in whole pages of its backing; on x86-64 libvirt aligns DIMMs to 2 MiB
DIMM_ALIGN_KIB = 2048
MAX_VCPUS = 4096  # no hypervisor we drive runs more; larger is a typo
MAX_MEMORY_MIB = 64 * 1024 * 1024  # 64 TiB


class MemoryMethod(StrEnum):
    """How memory is hot-plugged."""

    DIMM = "dimm"  # a <memory model='dimm'> device on a guest node, in a <maxMemory> slot
    VIRTIO_MEM = "virtio-mem"  # raise the virtio-mem device's <requested> size


class NewVcpu(Frozen):
    """One vCPU brought online: its guest node, the host cell it runs in and its pin (if pinned)."""

    vcpu: int
    guest_cell: int | None = None
    host_cell: int | None = None
    pin: tuple[int, ...] = ()


class MemoryGrowth(Frozen):
    """Memory hot-plugged: how, how much, on which guest node and host cell, from which pool."""

    method: MemoryMethod
    mib: int
    guest_cell: int
    host_cell: int | None = None
    page_kib: int = 0  # 0: ordinary memory
    requested_mib: int = 0  # virtio-mem: the device's new <requested> size


class ResizePlan(Frozen):
    """A VM's live resize, printed before anything changes. ``refusals`` non-empty: nothing runs."""

    cluster: str
    snapshot_digest: str
    vm: str
    host: str
    vcpus_before: int
    vcpus_after: int
    memory_mib_before: int
    memory_mib_after: int
    new_vcpus: tuple[NewVcpu, ...] = ()
    removed_vcpus: tuple[int, ...] = ()  # hot-plugged vCPUs taken offline, highest first
    memory: MemoryGrowth | None = None
    migration: Placement | None = None  # the live migration that comes first, if the host cannot hold it
    capacity: CapacityCheck | None = None
    refusals: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def feasible(self) -> bool:
        return not self.refusals

    @property
    def target_host(self) -> str:
        """Where the resize happens: the migration's target, or the VM's host."""
        return self.migration.target if self.migration is not None else self.host

    @property
    def changes(self) -> bool:
        return bool(self.new_vcpus or self.removed_vcpus or self.memory)


def _check_input(snapshot: FleetSnapshot, vm_name: object, vcpus: object, memory_mib: object) -> Vm:
    if not isinstance(vm_name, str) or not vm_name:
        raise InputError(f"vm: give a VM name, got {vm_name!r}")
    if vcpus is None and memory_mib is None:
        raise InputError("vcpus, memory: give a new vCPU count or memory size (or both)")
    for field, value, top in (("vcpus", vcpus, MAX_VCPUS), ("memory", memory_mib, MAX_MEMORY_MIB)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"{field}: must be a whole number, got {value!r}")
        if not 1 <= value <= top:
            raise InputError(f"{field}: must be between 1 and {top}, got {value}")
    found = [v for v in snapshot.vms if v.name == vm_name]
    if not found:
        raise InputError(f"vm: {vm_name!r} is not running in the snapshot of cluster {snapshot.cluster!r}")
    return found[0]


def plan_resize(snapshot: FleetSnapshot, vm_name: str, *, vcpus: int | None = None,
                memory_mib: int | None = None) -> ResizePlan:
    """The plan to bring ``vm_name`` to ``vcpus`` vCPUs and ``memory_mib`` MiB live (None: unchanged).

    Bad input (an unknown VM, a count that is not a positive whole number) is InputError naming the
    field. What cannot be done live is a plan with ``refusals``, each saying what to change at the
    VM's next restart; it changes nothing.
    """
    vm = _check_input(snapshot, vm_name, vcpus, memory_mib)
    want_vcpus = vm.vcpus if vcpus is None else vcpus
    has = guest_memory_mib(vm)
    want_mib = has if memory_mib is None else memory_mib
    refusals: list[str] = []
    notes: list[str] = []
    removed: tuple[int, ...] = ()
    most = vm.max_vcpus or vm.vcpus
    if want_vcpus > most:
        refusals.append(
            f"vcpus: {vm.name} is defined with at most {most} vCPUs (<vcpu>{most}</vcpu>), and {want_vcpus} were "
            f"asked; at its next restart define <vcpu current='{vm.vcpus}'>{want_vcpus}</vcpu> (its guest NUMA "
            f"cells listing the new vCPUs) so they can be hot-plugged later")
    elif want_vcpus < vm.vcpus:
        floor = vm.fixed_vcpus or 1
        if want_vcpus < floor:
            refusals.append(
                f"vcpus: {vm.name} had {floor} vCPUs at boot and libvirt cannot unplug those live; only the "
                f"hot-plugged ones ({floor} to {vm.vcpus - 1}) can go. Lower <vcpu current> at its next restart")
        else:
            removed = tuple(range(vm.vcpus - 1, want_vcpus - 1, -1))
            if vm.fixed_vcpus is None:
                notes.append("which vCPUs were hot-plugged is not known: libvirt refuses to unplug one present "
                             "at boot, and then nothing changes")
    growth_mib = 0
    method: MemoryMethod | None = None
    if want_mib < has:
        refusals.append(
            f"memory: shrinking {vm.name} from {has} to {want_mib} MiB needs the guest's cooperation "
            f"(it must give the memory back: balloon or virtio-mem unplug), which hostmaint does not drive; "
            f"lower <memory> at its next restart")
    elif want_mib > has:
        method, growth_mib, why = _memory_method(vm, want_mib - has)
        if method is None:
            refusals.append(why)
        elif growth_mib != want_mib - has:
            notes.append(why)
    base = dict(cluster=snapshot.cluster, snapshot_digest=snapshot.digest(), vm=vm.name, host=vm.host,
                vcpus_before=vm.vcpus, vcpus_after=want_vcpus, memory_mib_before=has,
                memory_mib_after=has + growth_mib, removed_vcpus=removed, notes=tuple(notes))
    host = snapshot.host(vm.host)
    if host.state is not HostState.ACTIVE:
        refusals.append(f"host: {vm.host} is {host.state.value} (in maintenance): no resize runs there until it "
                        f"is active again")
    if refusals:
        return ResizePlan(**base, refusals=tuple(refusals))  # type: ignore[arg-type]
    if want_vcpus <= vm.vcpus and not growth_mib:
        return ResizePlan(**base)  # type: ignore[arg-type]
    return _place_growth(snapshot, vm, want_vcpus, growth_mib, method, base)


def guest_memory_mib(vm: Vm) -> int:
    """The memory the guest has: ``<memory>`` counts a virtio-mem device at its full size (libvirt's
    total, what ``dominfo`` shows), the guest has only what it plugged (its requested size)."""
    vmem = vm.virtio_mem
    return vm.memory_mib - (vmem.size_mib - vmem.requested_mib) if vmem is not None else vm.memory_mib


def _memory_method(vm: Vm, more_mib: int) -> tuple[MemoryMethod | None, int, str]:
    """How ``more_mib`` MiB can be hot-plugged into ``vm``: the method, the MiB it really adds
    (rounded up to what the device takes), and a note or, with no method, the refusal."""
    vmem = vm.virtio_mem
    if vmem is not None:
        block_mib = max(vmem.block_kib // 1024, 1)
        mib = math.ceil(more_mib / block_mib) * block_mib
        if vmem.requested_mib + mib <= vmem.size_mib:
            return (MemoryMethod.VIRTIO_MEM, mib,
                    f"memory: rounded up to {mib} MiB (virtio-mem blocks of {block_mib} MiB)")
    page_kib = max(vm.hugepage_kib, DIMM_ALIGN_KIB)
    mib = math.ceil(more_mib * 1024 / page_kib) * page_kib // 1024
    free_slots = vm.memory_slots - vm.memory_slots_used
    if vm.vnuma and vm.max_memory_mib is not None and free_slots > 0 and vm.memory_mib + mib <= vm.max_memory_mib:
        return MemoryMethod.DIMM, mib, f"memory: rounded up to {mib} MiB (a DIMM is whole {page_kib} KiB pages)"
    want = guest_memory_mib(vm) + more_mib
    if vmem is not None:
        missing = (f"its virtio-mem device has {vmem.size_mib - vmem.requested_mib} MiB left of {vmem.size_mib}; "
                   f"at its next restart give it a larger <target><size> (at least {vmem.requested_mib + mib} MiB)")
    elif not vm.vnuma:
        missing = ("it has no guest NUMA topology, which memory hot-plug needs; at its next restart define "
                   "<cpu><numa><cell .../></numa></cpu> and <maxMemory slots='16'> (or a virtio-mem device)")
    elif vm.max_memory_mib is None:
        missing = (f"it was defined without <maxMemory slots>; at its next restart add <maxMemory slots='16' "
                   f"unit='MiB'>{want}</maxMemory> or more (or a virtio-mem device)")
    elif free_slots <= 0:
        missing = (f"all {vm.memory_slots} memory slots of <maxMemory> are in use; at its next restart raise "
                   f"slots (or add a virtio-mem device)")
    else:
        missing = (f"<maxMemory> is {vm.max_memory_mib} MiB; at its next restart raise it to {vm.memory_mib + mib} "
                   f"MiB or more")
    return None, 0, f"memory: {vm.name} cannot grow to {want} MiB live: {missing}"


def _guest_cell_of(vm: Vm, vcpu: int) -> int | None:
    for g in vm.vnuma:
        if vcpu in g.vcpus:
            return g.id
    return None


def _home_cell(vm: Vm, guest_cell: int | None, host: HostLoad) -> int | None:
    """The host cell the VM's definition binds ``guest_cell`` (or the whole VM) to: its pins' cell,
    else its numatune's node; None when nothing binds it (the roomiest cell is chosen)."""
    cpu_cell = {cpu: c.id for c in host.cells for cpu in c.cpus}
    vcpus = [v for v in range(vm.vcpus) if guest_cell is None or _guest_cell_of(vm, v) == guest_cell]
    pinned = [cpu for v in vcpus for cpu in vm.vcpupin.get(v, vm.vcpu_cpuset)]
    if pinned:
        counts: dict[int, int] = {}
        for cpu in pinned:
            if cpu in cpu_cell:
                counts[cpu_cell[cpu]] = counts.get(cpu_cell[cpu], 0) + 1
        if counts:
            return min(counts, key=lambda c: (-counts[c], c))
    if vm.numatune is not None and vm.numatune.nodeset:
        nodes = sorted(vm.numatune.nodeset)
        ids = sorted(g.id for g in vm.vnuma)
        if guest_cell is not None and len(nodes) == len(ids):
            return nodes[ids.index(guest_cell)]
        return max(nodes, key=lambda n: (pool_room(host.cell(n), vm.hugepage_kib), -n)) if len(nodes) > 1 \
            else nodes[0]
    return None


def _pin_style(vm: Vm, guest_cell: int | None) -> tuple[bool, tuple[int, ...]]:
    """How the online vCPUs of ``guest_cell`` are pinned: (one CPU each, the shared set otherwise)."""
    pins = [vm.vcpupin[v] for v in range(vm.vcpus)
            if v in vm.vcpupin and (guest_cell is None or _guest_cell_of(vm, v) == guest_cell)]
    if not pins:
        return False, ()
    single = all(len(p) == 1 for p in pins) and len({p[0] for p in pins}) == len(pins)
    return single, () if single else tuple(sorted({c for p in pins for c in p}))


def _place_growth(snapshot: FleetSnapshot, vm: Vm, want_vcpus: int, growth_mib: int,
                  method: MemoryMethod | None, base: dict[str, object]) -> ResizePlan:
    ledger = Ledger.from_snapshot(snapshot)
    host = ledger.hosts[vm.host]
    new = list(range(vm.vcpus, want_vcpus))
    groups = sorted({_guest_cell_of(vm, v) for v in new}, key=lambda g: -1 if g is None else g)
    mem_guest = _memory_guest_cell(vm, method, groups, host)
    miss = _fits_here(vm, host, new, growth_mib, mem_guest)
    if isinstance(miss, Miss):
        return _migrate_first(snapshot, ledger, vm, want_vcpus, growth_mib, method, mem_guest, base, miss)
    cells, pins, mem_cell = miss
    new_vcpus = tuple(NewVcpu(vcpu=v, guest_cell=_guest_cell_of(vm, v), host_cell=cells[_guest_cell_of(vm, v)],
                              pin=pins.get(v, ())) for v in new)
    memory = _memory_growth(vm, method, growth_mib, mem_guest, mem_cell)
    grown = _grown_snapshot(snapshot, vm, want_vcpus, growth_mib, pins, vm.host, mem_cell)
    capacity = check_capacity(grown, [])
    refusals = () if capacity.ok else (f"capacity: with {vm.name} grown, {capacity.reason}",)
    return ResizePlan(**base, new_vcpus=new_vcpus, memory=memory, capacity=capacity,  # type: ignore[arg-type]
                      refusals=refusals)


def _memory_guest_cell(vm: Vm, method: MemoryMethod | None, groups: Sequence[int | None], host: HostLoad) -> int:
    if method is MemoryMethod.VIRTIO_MEM and vm.virtio_mem is not None:
        return vm.virtio_mem.node
    if method is None or not vm.vnuma:
        return 0
    if len(groups) == 1 and groups[0] is not None:
        return groups[0]  # the memory goes where the new vCPUs run

    def room(g: GuestCell) -> tuple[int, int]:
        cell = _home_cell(vm, g.id, host)
        return (pool_room(host.cell(cell), vm.hugepage_kib) if cell is not None else 0, -g.id)
    return max(vm.vnuma, key=room).id


def _fits_here(vm: Vm, host: HostLoad, new: Sequence[int], growth_mib: int, mem_guest: int
               ) -> tuple[dict[int | None, int | None], dict[int, tuple[int, ...]], int | None] | Miss:
    """Whether ``host`` holds the growth: host cell per guest node, pins of the new vCPUs, the
    memory's host cell; or the Miss (the fit rules' constraint) that stops it."""
    if vcpu_room(host) < len(new):
        return Miss("vcpu", f"{host.name} has {vcpu_room(host)} vCPUs of budget left, {vm.name} needs "
                            f"{len(new)} more")
    demand: dict[int, tuple[float, int]] = {}  # host cell -> (MiB, new pinned CPUs)
    cells: dict[int | None, int | None] = {}
    pins: dict[int, tuple[int, ...]] = {}
    taken: set[int] = set()
    by_guest: dict[int | None, list[int]] = {}
    for v in new:
        by_guest.setdefault(_guest_cell_of(vm, v), []).append(v)
    mem_key: int | None = mem_guest if vm.vnuma else None
    for guest in sorted({*by_guest, *([mem_key] if growth_mib else [])}, key=lambda g: -1 if g is None else g):
        vcpus = by_guest.get(guest, [])
        mib = growth_mib if growth_mib and guest == mem_key else 0
        single, shared = _pin_style(vm, guest)
        ncpus = len(vcpus) if single else 0
        cell_id = _home_cell(vm, guest, host)
        if cell_id is None:
            fitting = [c for c in host.cells if cell_holds(c, mib, ncpus, vm.hugepage_kib)]
            if not fitting:
                return Miss("memory" if mib else "pinning",
                            f"no cell of {host.name} holds {mib} MiB more"
                            + (f" and {ncpus} free CPUs" if ncpus else ""))
            cell_id = max(fitting, key=lambda c: (pool_room(c, vm.hugepage_kib), -c.id)).id
        cell = host.cell(cell_id)
        had_mib, had_cpus = demand.get(cell_id, (0.0, 0))
        if not cell_holds(cell, had_mib + mib, had_cpus + ncpus, vm.hugepage_kib):
            what = "hugepages" if vm.hugepage_kib and mib else ("pinning" if ncpus and not mib else "numa")
            return Miss(what, f"cell {cell_id} of {host.name}, where {vm.name}'s guest node "
                              f"{'-' if guest is None else guest} lives, lacks room for {had_mib + mib:.0f} MiB"
                              + (f" and {had_cpus + ncpus} free CPUs" if ncpus else ""))
        demand[cell_id] = (had_mib + mib, had_cpus + ncpus)
        cells[guest] = cell_id
        free = [c for c in cell.free_cpus() if c not in taken]
        for i, v in enumerate(vcpus):
            if single:
                pins[v] = (free[i],)
                taken.add(free[i])
            elif shared:
                pins[v] = shared
    return cells, pins, cells.get(mem_key) if growth_mib else None


def _memory_growth(vm: Vm, method: MemoryMethod | None, mib: int, guest: int, host_cell: int | None
                   ) -> MemoryGrowth | None:
    if method is None or not mib:
        return None
    requested = vm.virtio_mem.requested_mib + mib if method is MemoryMethod.VIRTIO_MEM and vm.virtio_mem else 0
    return MemoryGrowth(method=method, mib=mib, guest_cell=guest, host_cell=host_cell, page_kib=vm.hugepage_kib,
                        requested_mib=requested)


def _grown_vm(vm: Vm, want_vcpus: int, growth_mib: int, pins: dict[int, tuple[int, ...]], host: str,
              mem_guest: int) -> Vm:
    vnuma = tuple(g.model_copy(update={"memory_mib": g.memory_mib + growth_mib}) if g.id == mem_guest else g
                  for g in vm.vnuma)
    return vm.model_copy(update={"vcpus": want_vcpus, "memory_mib": vm.memory_mib + growth_mib, "host": host,
                                 "vcpupin": {**vm.vcpupin, **pins}, "vnuma": vnuma})


def _debit(cell: Cell, mib: float, page_kib: int) -> Cell:
    if page_kib:
        pages = math.ceil(mib * 1024 / page_kib)
        pools = tuple(hp.model_copy(update={"free": max(hp.free - pages, 0)}) if hp.size_kib == page_kib else hp
                      for hp in cell.hugepages)
        return cell.model_copy(update={"hugepages": pools})
    return cell.model_copy(update={"free_mib": max(cell.free_mib - math.ceil(mib), 0)})


def _credit(cell: Cell, mib: float, page_kib: int) -> Cell:
    if page_kib:
        pages = math.floor(mib * 1024 / page_kib)
        pools = tuple(hp.model_copy(update={"free": min(hp.free + pages, hp.total)}) if hp.size_kib == page_kib
                      else hp for hp in cell.hugepages)
        return cell.model_copy(update={"hugepages": pools})
    return cell.model_copy(update={"free_mib": min(cell.free_mib + math.floor(mib), cell.memory_mib)})


def _grown_snapshot(snapshot: FleetSnapshot, vm: Vm, want_vcpus: int, growth_mib: int,
                    pins: dict[int, tuple[int, ...]], host: str, mem_cell: int | None,
                    landing: Sequence[tuple[int, float]] = ()) -> FleetSnapshot:
    """The snapshot as it will be after the resize: the grown VM on ``host``, its growth (or, after a
    migration, its whole memory: ``landing``) taken from the cells that hold it, its old cells credited."""
    # the guest cells keep their boot memory: a DIMM or virtio-mem is memory beside them
    grown = _grown_vm(vm, want_vcpus, growth_mib, pins, host, mem_guest=-1)
    hosts = []
    for h in snapshot.hosts:
        cells = list(h.cells)
        if h.name == vm.host and host != vm.host:  # it left: its memory comes back, spread by cell size
            cells = [_credit(c, vm.memory_mib * c.memory_mib / h.memory_mib, vm.hugepage_kib) for c in cells]
        if h.name == host:
            charges = list(landing) or ([(mem_cell if mem_cell is not None else cells[0].id, float(growth_mib))]
                                        if growth_mib else [])
            for cell_id, mib in charges:
                cells = [_debit(c, mib, vm.hugepage_kib) if c.id == cell_id else c for c in cells]
        hosts.append(h.model_copy(update={"cells": tuple(cells)}))
    vms = tuple(grown if v.name == vm.name else v for v in snapshot.vms)
    return snapshot.model_copy(update={"hosts": tuple(hosts), "vms": vms})


def _migrate_first(snapshot: FleetSnapshot, ledger: Ledger, vm: Vm, want_vcpus: int, growth_mib: int,
                   method: MemoryMethod | None, mem_guest: int, base: dict[str, object], here: Miss) -> ResizePlan:
    """The host cannot hold the grown VM: plan it onto the host the planner picks, migrate, then grow."""
    why_here = f"{vm.host} cannot hold it grown ({here.constraint}: {here.reason})"
    if not vm.migratable:
        return ResizePlan(**base, refusals=(f"placement: {why_here}, and {vm.name} cannot live-migrate: "  # type: ignore[arg-type]
                                            f"{vm.not_migratable_reason or 'not migratable'}",))
    source = ledger.hosts[vm.host]
    targets = [h for name, h in sorted(ledger.hosts.items())
               if name != vm.host and h.state is HostState.ACTIVE and h.cluster == source.cluster
               and h.cpu_group == source.cpu_group]
    # The new vCPUs of a pinned VM need CPUs of their own on the target: stand-in source CPU ids
    # (beyond any host's) make the fit rules count and map them like the VM's other pins.
    top = max((cpu for h in snapshot.hosts for c in h.cells for cpu in c.cpus), default=0)
    stand_in: dict[int, tuple[int, ...]] = {}
    for v in range(vm.vcpus, want_vcpus):
        single, shared = _pin_style(vm, _guest_cell_of(vm, v))
        if single:
            top += 1
            stand_in[v] = (top,)
        elif shared:
            stand_in[v] = shared
    grown = _grown_vm(vm, want_vcpus, growth_mib, stand_in, vm.host, mem_guest)
    got = choose(grown, targets, {})
    if not isinstance(got, list) and not got.fit.numa_local and not vm.vnuma:
        got = [Miss("numa", "only NUMA-remote fits: a resize does not split a VM over cells")]
    if isinstance(got, list):
        blocker = blocker_for(grown, got, len(targets))
        return ResizePlan(**base, refusals=(  # type: ignore[arg-type]
            f"placement: {why_here}, and no other host holds it: {blocker.constraint}: {blocker.reason}"
            + (f" ({blocker.hint})" if blocker.hint else ""),))
    placement = placement_for(grown, got)
    fit = got.fit
    pins = {v: placement.vcpupin[v] for v in stand_in if v in placement.vcpupin}
    guests = sorted(vm.vnuma, key=lambda g: g.id)
    cell_of_guest: dict[int | None, int] = {g.id: fit.cells[i] for i, g in enumerate(guests)} if guests \
        else {None: fit.cells[0]}
    new_vcpus = tuple(NewVcpu(vcpu=v, guest_cell=_guest_cell_of(vm, v),
                              host_cell=cell_of_guest.get(_guest_cell_of(vm, v), fit.cells[0]), pin=pins.get(v, ()))
                      for v in range(vm.vcpus, want_vcpus))
    mem_cell = cell_of_guest.get(mem_guest if vm.vnuma else None, fit.cells[0])
    migration = placement.model_copy(update={
        "memory_mib": vm.memory_mib,
        "vcpupin": {v: cpus for v, cpus in placement.vcpupin.items() if v not in stand_in},
        "reason": f"{why_here}; {placement.reason}"})
    landing = list(zip(fit.cells, fit.cell_mib, strict=True))
    after = _grown_snapshot(snapshot, vm, want_vcpus, growth_mib, pins, fit.host, mem_cell, landing)
    capacity = check_capacity(after, [])
    refusals = () if capacity.ok else (f"capacity: with {vm.name} grown, {capacity.reason}",)
    return ResizePlan(**base, new_vcpus=new_vcpus, memory=_memory_growth(vm, method, growth_mib, mem_guest,  # type: ignore[arg-type]
                                                                          mem_cell),
                      migration=migration, capacity=capacity, refusals=refusals)


def render_resize(plan: ResizePlan) -> list[str]:
    """The plan as lines for a terminal or an approval form (names from hosts shown as data)."""
    out = [f"resize {visible(plan.vm)} on {visible(plan.host)}: {plan.vcpus_before} -> {plan.vcpus_after} vCPUs, "
           f"{plan.memory_mib_before} -> {plan.memory_mib_after} MiB"]
    if plan.migration is not None:
        m = plan.migration
        out.append(f"  1. live-migrate to {visible(m.target)} cell(s) {','.join(map(str, m.target_cells))} first: "
                   f"{visible(m.reason)}")
    for v in plan.new_vcpus:
        pin = f", pinned to CPU(s) {','.join(map(str, v.pin))}" if v.pin else ""
        out.append(f"  + vCPU {v.vcpu}: guest node {'-' if v.guest_cell is None else v.guest_cell}, host cell "
                   f"{'-' if v.host_cell is None else v.host_cell}{pin}")
    if plan.removed_vcpus:
        out.append(f"  - vCPUs {', '.join(map(str, plan.removed_vcpus))} taken offline (hot-plugged ones)")
    if plan.memory is not None:
        mem = plan.memory
        pool = f"{mem.page_kib} KiB hugepages" if mem.page_kib else "ordinary memory"
        how = f"virtio-mem requested -> {mem.requested_mib} MiB" if mem.method is MemoryMethod.VIRTIO_MEM else "a DIMM"
        out.append(f"  + {mem.mib} MiB as {how} on guest node {mem.guest_cell}, host cell "
                   f"{'-' if mem.host_cell is None else mem.host_cell}, from {pool}")
    if plan.capacity is not None:
        out.append(f"  N+1: {plan.capacity.reason}")
    for note in plan.notes:
        out.append(f"  note: {visible(note)}")
    for refusal in plan.refusals:
        out.append(f"  REFUSED: {visible(refusal)}")
    if plan.feasible and not plan.changes:
        out.append("  nothing to change")
    return out


_SIZE_UNITS_MIB = {"": 1, "m": 1, "mib": 1, "mb": 1, "g": 1024, "gib": 1024, "gb": 1024, "t": 1024 * 1024,
                   "tib": 1024 * 1024, "tb": 1024 * 1024}


def parse_size_mib(text: str, field: str = "memory") -> int:
    """A memory size as operators write it (``8G``, ``8GiB``, ``512M``, ``4096`` = MiB) in MiB; anything
    else is InputError naming ``field``."""
    raw = text.strip().lower().replace(" ", "")
    digits = raw.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = raw[len(digits):]
    if not (digits.isascii() and digits.isdigit()) or unit not in _SIZE_UNITS_MIB or len(digits) > 12:
        raise InputError(f"{field}: {visible(text)!r} is not a size (write e.g. 8G, 8GiB, 512M or 4096 for MiB)")
    mib = int(digits) * _SIZE_UNITS_MIB[unit]
    if not 1 <= mib <= MAX_MEMORY_MIB:
        raise InputError(f"{field}: {visible(text)!r} must be between 1 MiB and {MAX_MEMORY_MIB // 1024 // 1024} TiB")
    return mib


class Shortage(StrEnum):
    """What monitoring says a VM is short of (the events ``hostmaint.vm.cpu-starved`` / ``memory-pressure``)."""

    CPU = "cpu"
    MEMORY = "memory"


MEMORY_STEP_MIB = 256  # a proposed memory grow is whole steps of this


def propose(vm: Vm, shortage: Shortage) -> tuple[int | None, int | None]:
    """The resize a runbook proposes for a VM short of CPU (one vCPU more) or memory (a quarter more,
    in whole 256 MiB steps): (vCPUs, MiB), None where unchanged. Beyond what the VM was defined with,
    the plan refuses it with what to change at its next restart."""
    if shortage is Shortage.CPU:
        return vm.vcpus + 1, None
    has = guest_memory_mib(vm)
    return None, -(-(has * 5 // 4) // MEMORY_STEP_MIB) * MEMORY_STEP_MIB
