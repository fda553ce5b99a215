"""NUMA fit: can this VM go onto that host, onto which cells, with which CPUs?

``fit_host`` answers for one VM and one host with either a :class:`Fit` or a
:class:`Miss` naming the constraint that stopped it. The rules, cheapest first:

1. anti-affinity: no VM of the same group on the host;
2. vCPU budget of the host;
3. cells:
   * a VM with vNUMA maps its guest cells 1:1 onto distinct host cells, each
     holding that guest cell's memory (or hugepages) and pinned CPUs; memory of
     the VM outside its guest cells is spread over them (``guest_cell_mib``);
   * any other VM goes into one cell; only when ``allow_remote`` (no single-cell
     fit anywhere) may it be spread over several cells, reported NUMA-remote;
   * a pinned VM needs as many free, unpinned host CPUs in the chosen cells as
     it pins today (vcpupin, emulatorpin, iothreadpin and the ``<vcpu cpuset>``);
     the ``cpu_map`` says which new CPU replaces which old one.

A ``numatune`` nodeset (strict or not) is rewritten to the chosen cells, and
the chosen cells each hold their share of the memory, so a strict nodeset
always holds the VM's memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hostmaint.models import Vm
from hostmaint.placement.ledger import CellLoad, Fit, HostLoad, pages_for


@dataclass(frozen=True)
class Miss:
    """Why a VM does not fit a host: a constraint name (as in ``Blocker.constraint``) and words."""

    constraint: str
    reason: str


@dataclass(frozen=True)
class Demand:
    """What a VM asks of cells: memory and pinned source CPUs per group (one group per guest cell)."""

    mib: tuple[int, ...]
    cpus: tuple[tuple[int, ...], ...]
    page_kib: int  # 0 = ordinary memory

    @property
    def total_mib(self) -> int:
        return sum(self.mib)


def demand_of(vm: Vm) -> Demand:
    """Split a VM into what each target cell must hold (one part per guest cell, or one part)."""
    pinned: dict[int, tuple[int, ...]] = vm.vcpupin if vm.pinned else {}
    if vm.vnuma:
        cells = sorted(vm.vnuma, key=lambda g: g.id)
        groups: list[list[int]] = []
        taken: set[int] = set()
        for g in cells:
            cpus: set[int] = set()
            for vcpu in g.vcpus:
                cpus.update(pinned.get(vcpu, ()))
            cpus -= taken
            taken |= cpus
            groups.append(sorted(cpus))
        # CPUs pinned by vCPUs that no guest cell lists, emulator and I/O threads and the <vcpu
        # cpuset> (which guest cell's vCPUs run where in it is not recorded) go with guest cell 0
        rest: set[int] = set()
        for cpuset in pinned.values():
            rest.update(cpuset)
        if vm.pinned:
            rest.update(vm.emulatorpin)
            rest.update(vm.vcpu_cpuset)
            for cpuset in vm.iothreadpin.values():
                rest.update(cpuset)
        groups[0] = sorted(set(groups[0]) | (rest - taken))
        return Demand(guest_cell_mib(vm), tuple(tuple(g) for g in groups), vm.hugepage_kib)
    held: set[int] = set()
    for cpuset in pinned.values():
        held.update(cpuset)
    if vm.pinned:
        held.update(vm.emulatorpin)
        held.update(vm.vcpu_cpuset)
        for cpuset in vm.iothreadpin.values():
            held.update(cpuset)
    return Demand((vm.memory_mib,), (tuple(sorted(held)),), vm.hugepage_kib)


def guest_cell_mib(vm: Vm) -> tuple[int, ...]:
    """Memory each guest cell of ``vm`` needs on its host cell, in guest-cell order, adding up to
    ``vm.memory_mib``.

    A domain's memory may exceed its guest cells: hot-plugged DIMMs, and the MiB each cell's size
    loses to rounding. That memory is on the host all the same, and the snapshot does not say
    which guest cell holds it, so it is spread over the cells in proportion to their size (an
    estimate: a DIMM sits in one guest cell). More in the cells than in the VM is refused when the
    snapshot is loaded.
    """
    listed = [g.memory_mib for g in sorted(vm.vnuma, key=lambda g: g.id)]
    extra = vm.memory_mib - sum(listed)
    if extra <= 0:
        return tuple(listed)
    total = sum(listed)
    shares = [extra * m // total for m in listed]
    # the MiB lost to rounding down go to the first cells, so the parts add up exactly
    for i in range(extra - sum(shares)):
        shares[i] += 1
    return tuple(m + share for m, share in zip(listed, shares, strict=True))


def _room_mib(cell: CellLoad, page_kib: int) -> float:
    """Memory a cell can still take for this kind of VM (hugepages of one size, or ordinary)."""
    if page_kib:
        return cell.hugepages.get(page_kib, 0) * page_kib / 1024
    return cell.avail_mib


# The cell and host rules below are the planner's one definition of "fits": the greedy asks them
# per VM (``fit_host``), the exact stage (exact.py) turns the same numbers into linear constraints.


def pool_room(cell: CellLoad, page_kib: int) -> int:
    """What a cell's pool for this kind of memory still holds, in the units it is drawn in: free
    hugepages of ``page_kib``, or whole MiB of plannable ordinary memory (0 = ordinary)."""
    if page_kib:
        return max(cell.hugepages.get(page_kib, 0), 0)
    return max(math.floor(cell.avail_mib), 0)


def pool_draw(mib: float, page_kib: int) -> int:
    """What ``mib`` MiB of a VM draws from a cell's pool, in :func:`pool_room`'s units."""
    return pages_for(mib, page_kib) if page_kib else math.ceil(mib)


def free_cpu_count(cell: CellLoad) -> int:
    """Host CPUs of the cell a pinned VM may still take."""
    return len(cell.free_cpus())


def cell_holds(cell: CellLoad, mib: float, ncpus: int, page_kib: int) -> bool:
    """Whether the cell alone takes ``mib`` of this kind of memory and ``ncpus`` pinned CPUs."""
    if pool_room(cell, page_kib) < pool_draw(mib, page_kib):
        return False
    return ncpus == 0 or free_cpu_count(cell) >= ncpus


def host_miss(vm: Vm, host: HostLoad) -> Miss | None:
    """The host-wide rules (anti-affinity, vCPU budget): the one that stops ``vm`` on ``host``, if any."""
    if vm.anti_affinity and host.groups.get(vm.anti_affinity, 0) > 0:
        return Miss("anti-affinity",
                    f"{host.name} already runs a VM of anti-affinity group {vm.anti_affinity!r}")
    if host.vcpus_used + vm.vcpus > host.vcpu_budget:
        return Miss("vcpu", f"{host.name} has {host.vcpu_budget - host.vcpus_used:g} vCPUs of budget left, "
                            f"{vm.name} needs {vm.vcpus}")
    return None


def vcpu_room(host: HostLoad) -> int:
    """vCPUs the host's budget still takes (``host_miss`` in the exact stage's integer terms)."""
    return max(math.floor(host.vcpu_budget) - host.vcpus_used, 0)


def _after_util(cell: CellLoad, mib: float) -> float:
    return (cell.used_mib + mib) / cell.memory_mib if cell.memory_mib else 1.0


def could_fit(vm: Vm, need: Demand, host: HostLoad) -> bool:
    """A cheap screen: False only when ``fit_host`` would surely say Miss (used to skip hosts fast)."""
    if host_miss(vm, host) is not None:
        return False
    part = max(need.mib)
    if need.page_kib:
        pages = part * 1024 / need.page_kib
        return any(c.hugepages.get(need.page_kib, 0) >= pages for c in host.cells)
    return any(c.avail_mib >= part for c in host.cells)


def fit_host(vm: Vm, host: HostLoad, *, allow_remote: bool = False, need: Demand | None = None) -> Fit | Miss:
    """The best way ``vm`` fits ``host`` now (least-loaded cells), or the constraint that stops it.

    ``need`` is ``demand_of(vm)``, passed in when the caller weighs many hosts for one VM.
    """
    miss = host_miss(vm, host)
    if miss is not None:
        return miss
    need = need or demand_of(vm)
    if vm.vnuma:
        return _fit_vnuma(vm, host, need)
    mib, ncpus = need.mib[0], len(need.cpus[0])
    best: CellLoad | None = None
    for cell in host.cells:
        if cell_holds(cell, mib, ncpus, need.page_kib) and (
                best is None or _after_util(cell, mib) < _after_util(best, mib)):
            best = cell
    if best is not None:
        return Fit(host.name, (best.id,), (float(mib),), True, _map_cpus(need.cpus[0], [best]))
    miss = _total_miss(vm, host, need)
    if miss is not None:
        return miss
    if not allow_remote:
        return Miss("numa", f"no single cell of {host.name} holds {mib} MiB"
                            + (f" with {ncpus} free unpinned CPUs" if ncpus else ""))
    return _fit_spread(vm, host, need)


def _total_miss(vm: Vm, host: HostLoad, need: Demand) -> Miss | None:
    """The constraint that fails even with every cell of the host together, if any."""
    room = sum(max(_room_mib(c, need.page_kib), 0.0) for c in host.cells)
    if room < need.total_mib:
        if need.page_kib:
            return Miss("hugepages", f"{host.name} has {room:.0f} MiB free in {need.page_kib} KiB hugepages, "
                                     f"{vm.name} needs {need.total_mib}")
        return Miss("memory",
                    f"{host.name} has {room:.0f} MiB plannable memory, {vm.name} needs {need.total_mib}")
    ncpus = sum(len(g) for g in need.cpus)
    free = sum(len(c.free_cpus()) for c in host.cells)
    if free < ncpus:
        return Miss("pinning", f"{host.name} has {free} free unpinned CPUs, {vm.name} pins {ncpus}")
    return None


def _fit_spread(vm: Vm, host: HostLoad, need: Demand) -> Fit | Miss:
    """NUMA-remote: fill the roomiest cells until the memory is covered; pinned CPUs from those cells."""
    order = sorted(host.cells, key=lambda c: (-_room_mib(c, need.page_kib), c.id))
    # in the pools' own units (whole MiB, or whole pages), as the exact stage draws them: the parts
    # add up to the VM and no cell is charged a fraction of a MiB past what it can plan
    left = pool_draw(need.total_mib, need.page_kib)
    unit = need.page_kib / 1024 if need.page_kib else 1.0
    chosen: list[CellLoad] = []
    parts: list[float] = []
    for cell in order:
        if left <= 0:
            break
        take = min(pool_room(cell, need.page_kib), left)
        if take <= 0:
            continue
        chosen.append(cell)
        parts.append(take * unit)
        left -= take
    if left > 0:
        return Miss("memory", f"{host.name} cannot hold {vm.name} even across cells")
    ncpus = len(need.cpus[0])
    if sum(len(c.free_cpus()) for c in chosen) < ncpus:
        return Miss("pinning",
                    f"the cells of {host.name} that hold {vm.name}'s memory lack {ncpus} free CPUs")
    return Fit(host.name, tuple(c.id for c in chosen), tuple(parts), False, _map_cpus(need.cpus[0], chosen))


def _fit_vnuma(vm: Vm, host: HostLoad, need: Demand) -> Fit | Miss:
    """Guest cells 1:1 onto distinct host cells: greedy on the least loaded, then exact matching."""
    if len(host.cells) < len(need.mib):
        return Miss("numa", f"{vm.name} has {len(need.mib)} guest cells, {host.name} only {len(host.cells)}")
    ok = [[c for c in host.cells if cell_holds(c, need.mib[g], len(need.cpus[g]), need.page_kib)]
          for g in range(len(need.mib))]
    # largest guest cell first, each onto its least-loaded fitting cell not yet used
    assign: dict[int, CellLoad] = {}
    used: set[int] = set()
    for g in sorted(range(len(need.mib)), key=lambda g: (-need.mib[g], g)):
        free = [c for c in ok[g] if c.id not in used]
        if not free:
            break
        best = min(free, key=lambda c: (_after_util(c, need.mib[g]), c.id))
        assign[g] = best
        used.add(best.id)
    if len(assign) < len(need.mib):
        matched = _match(ok)
        if matched is None:
            miss = _total_miss(vm, host, need)
            return miss or Miss("numa", f"no {len(need.mib)} distinct cells of {host.name} each hold "
                                        f"one guest cell of {vm.name} "
                                        f"({', '.join(str(m) for m in need.mib)} MiB)")
        assign = matched
    cells = [assign[g] for g in range(len(need.mib))]
    cpu_map: dict[int, int] = {}
    for g, cell in enumerate(cells):
        cpu_map.update(_map_cpus(need.cpus[g], [cell]))
    return Fit(host.name, tuple(c.id for c in cells), tuple(float(m) for m in need.mib), True, cpu_map)


def _match(ok: list[list[CellLoad]]) -> dict[int, CellLoad] | None:
    """A perfect matching guest cell -> host cell (Kuhn's augmenting paths); None when none exists."""
    owner: dict[int, int] = {}  # host cell id -> guest cell
    by_id = {c.id: c for opts in ok for c in opts}

    def augment(g: int, seen: set[int]) -> bool:
        for c in ok[g]:
            if c.id in seen:
                continue
            seen.add(c.id)
            if c.id not in owner or augment(owner[c.id], seen):
                owner[c.id] = g
                return True
        return False

    for g in range(len(ok)):
        if not augment(g, set()):
            return None
    return {g: by_id[cid] for cid, g in owner.items()}


def _map_cpus(source: tuple[int, ...], cells: list[CellLoad]) -> dict[int, int]:
    """Old pinned host CPUs -> free CPUs of the target cells, both ascending."""
    if not source:
        return {}
    free = [cpu for cell in cells for cpu in cell.free_cpus()]
    return dict(zip(source, free[: len(source)], strict=True))
