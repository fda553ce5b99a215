"""Seeded fleets of the shapes real clusters have, for the placement benchmark and the oracle tests.

``hostmaint.placement.synthetic.generate_fleet`` makes one kind of cluster (2- and 4-cell hosts of
one size, one 1 GiB pool); issue 16 found the planner wrong on fleets it never generated. A
:class:`Shape` says what a family of fleets looks like:

* hosts of 2, 4 or 8 NUMA cells, of mixed sizes in one cluster (cell memory and CPUs per host);
* 2 MiB and 1 GiB hugepage pools side by side in every cell, VMs backed by either;
* pinned VMs, some filling a whole cell's CPUs; vNUMA guests of 2-4 cells (pinned per guest cell);
* anti-affinity groups of nearly as many VMs as there are hosts;
* VM sizes from a fixed menu or heavy-tailed (Pareto);
* clusters right at the N+1 edge (the drain barely passes the capacity check).

Every VM sits on real cells of its host: ``free_mib`` (pools excluded, as libvirt reports it), free
pages and pins agree with the VMs listed, and every snapshot passes the snapshot's load checks.
Host ``h0000`` carries ``drain_vms`` VMs to evacuate. Same seed, same fleet. This module shares
no code with the planner.
"""

from __future__ import annotations

import heapq
import math
import random
from dataclasses import dataclass, field, replace

from hostmaint.models import Cell, FleetSnapshot, GuestCell, Host, HostState, HugePages, Limits, Numatune, Vm

GIB = 1024
PAGE_2M = 2048
PAGE_1G = 1024 * 1024
DRAINED = "h0000"
OVERHEAD_MIB = 1024  # per cell: the kernel and QEMU themselves
FLAVOURS = (1, 2, 4, 8, 16, 32, 64, 128, 192)  # GiB, the old menu: many small VMs, few large
FLAVOUR_WEIGHTS = (8, 20, 25, 22, 15, 9, 5, 3, 1)


@dataclass(frozen=True)
class Shape:
    """What one family of fleets looks like (every choice is drawn per host or per VM)."""

    name: str
    cells: tuple[int, ...] = (2,)  # NUMA cells per host
    cell_gib: tuple[int, ...] = (192,)  # memory of each cell of a host
    cpus_per_cell: tuple[int, ...] = (24,)
    pools: tuple[int, ...] = (PAGE_1G,)  # page sizes (KiB) with a pool in every cell
    pool_share: float = 0.2  # of each cell's memory, split over the pools
    heavy_tail: bool = False  # Pareto sizes instead of the menu
    vnuma_share: float = 0.0  # VMs given 2-4 guest cells although they would fit one
    pinned_share: float = 0.1
    whole_cell_share: float = 0.0  # of pinned VMs: take every CPU of one cell
    hugepage_share: float = 0.2
    group_share: float = 0.3  # VMs in an anti-affinity group
    group_near_hosts: bool = False  # groups of hosts-1 or hosts-2 members (else 2-4)
    fill: tuple[float, float] = (0.45, 0.75)
    n_plus_one_edge: bool = False  # top the other hosts up until the drain barely passes N+1
    reserved_gib: tuple[int, ...] = (0,)
    cordoned: int = 0  # hosts (not h0000) in state cordoned
    limits: Limits = field(default_factory=Limits)


# The benchmark's families. The first is the old generator's shape, for comparison.
FAMILIES: dict[str, Shape] = {s.name: s for s in (
    Shape("uniform-2cell"),
    Shape("cells-2-4-8", cells=(2, 4, 8), cell_gib=(96,), cpus_per_cell=(16,)),
    Shape("mixed-sizes", cells=(2, 4), cell_gib=(64, 128, 256), cpus_per_cell=(12, 24, 32), reserved_gib=(0, 8)),
    Shape("pools-2m-1g", cells=(2, 4), pools=(PAGE_2M, PAGE_1G), pool_share=0.35, hugepage_share=0.45),
    Shape("pinned-cells", cells=(2, 4), cpus_per_cell=(8, 16), pinned_share=0.35, whole_cell_share=0.5),
    Shape("vnuma-wide", cells=(4, 8), cell_gib=(64, 128), vnuma_share=0.25, pinned_share=0.2),
    Shape("anti-affinity", group_share=0.6, group_near_hosts=True),
    # no pools: N+1 counts free pool pages as room that ordinary VMs cannot use
    Shape("n+1-edge", cells=(2, 4), fill=(0.5, 0.7), n_plus_one_edge=True, pools=(), hugepage_share=0.0),
    Shape("heavy-tail", cells=(2, 4), heavy_tail=True),
    Shape("real-mix", cells=(2, 4, 8), cell_gib=(64, 96, 192), cpus_per_cell=(12, 16, 24),
          pools=(PAGE_2M, PAGE_1G), pool_share=0.3, heavy_tail=True, vnuma_share=0.15, pinned_share=0.25,
          whole_cell_share=0.3, hugepage_share=0.3, group_share=0.4, group_near_hosts=True,
          reserved_gib=(0, 4), cordoned=1),
)}


def small(shape: Shape) -> Shape:
    """The same family with small cells and few CPUs: fleets an exhaustive search can check."""
    return replace(shape, cell_gib=tuple(sorted({max(8, g // 8) for g in shape.cell_gib})),
                   cpus_per_cell=tuple(sorted({max(2, c // 4) for c in shape.cpus_per_cell})),
                   reserved_gib=tuple(min(r, 1) for r in shape.reserved_gib))


@dataclass
class _Cell:
    id: int
    gib: int
    cpus: list[int]
    pool_pages: dict[int, int]  # page KiB -> pages in the pool
    free_pages: dict[int, int]
    used_mib: int = OVERHEAD_MIB  # ordinary memory in use
    pinned: set[int] = field(default_factory=set)

    @property
    def pool_mib(self) -> int:
        return sum(n * kib for kib, n in self.pool_pages.items()) // 1024

    @property
    def free_mib(self) -> int:
        return self.gib * GIB - self.used_mib - self.pool_mib

    def room_mib(self, page_kib: int) -> int:
        return self.free_pages.get(page_kib, 0) * page_kib // 1024 if page_kib else self.free_mib

    def free_cpus(self) -> list[int]:
        return [c for c in self.cpus if c not in self.pinned]


@dataclass
class _Host:
    name: str
    cells: list[_Cell]
    reserved_mib: int
    vcpus: int = 0
    groups: set[str] = field(default_factory=set)

    @property
    def memory_mib(self) -> int:
        return sum(c.gib for c in self.cells) * GIB

    @property
    def used_mib(self) -> int:
        """Memory in use as the planner's utilisation counts it (pool pages in use included)."""
        return sum(c.used_mib + sum((c.pool_pages[k] - c.free_pages[k]) * k for k in c.pool_pages) // 1024
                   for c in self.cells)

    @property
    def cpu_count(self) -> int:
        return sum(len(c.cpus) for c in self.cells)


def _new_host(rng: random.Random, shape: Shape, name: str, *, largest: bool = False) -> _Host:
    ncells, gib, ncpu = rng.choice(shape.cells), rng.choice(shape.cell_gib), rng.choice(shape.cpus_per_cell)
    if largest:  # the drained host: room for its drain_vms VMs
        ncells, gib, ncpu = max(shape.cells), max(shape.cell_gib), max(shape.cpus_per_cell)
    cells = []
    for i in range(ncells):
        pools = {kib: int(gib * GIB * 1024 * shape.pool_share / len(shape.pools)) // kib for kib in shape.pools}
        cells.append(_Cell(id=i, gib=gib, cpus=list(range(i * ncpu, (i + 1) * ncpu)), pool_pages=dict(pools),
                           free_pages=dict(pools)))
    return _Host(name=name, cells=cells, reserved_mib=rng.choice(shape.reserved_gib) * GIB)


@dataclass
class _Spec:
    name: str
    mib: int
    vcpus: int
    page_kib: int
    pinned: bool
    whole_cell: bool
    nguest: int
    group: str | None = None


def _draw(rng: random.Random, shape: Shape, host: _Host, name: str, cap_gib: int) -> _Spec:
    cell_gib = host.cells[0].gib
    cap = max(1, min(cap_gib, cell_gib * len(host.cells)))
    if shape.heavy_tail:
        gib = min(cap, max(1, int(rng.paretovariate(1.1) * max(1, cell_gib // 96))))
    else:
        menu = [(f, w) for f, w in zip(FLAVOURS, FLAVOUR_WEIGHTS, strict=True) if f <= cap] or [(1, 1)]
        gib = rng.choices([f for f, _ in menu], weights=[w for _, w in menu])[0]
    vcpus = max(1, min(gib // rng.choice((2, 4, 8)) or 1, 32))
    page = rng.choice(shape.pools) if shape.pools and rng.random() < shape.hugepage_share else 0
    pinned = rng.random() < shape.pinned_share
    whole = pinned and rng.random() < shape.whole_cell_share
    nguest = 1
    if len(host.cells) > 1 and (gib * 2 > cell_gib or (gib >= 2 and rng.random() < shape.vnuma_share)):
        nguest = min(len(host.cells), rng.choice((2, 2, 3, 4)) if gib <= cell_gib else 4)
        nguest = max(nguest, math.ceil(gib * 1.25 / cell_gib))
        if nguest > len(host.cells):
            nguest = len(host.cells)
        whole = False
        vcpus = max(vcpus, nguest)
    return _Spec(name, gib * GIB, vcpus, page, pinned, whole, nguest)


def _place(host: _Host, spec: _Spec, overcommit: float, uuid: int) -> Vm | None:
    """Put a drawn VM onto real cells of ``host`` (the roomiest that hold it); None when it does not fit."""
    part_vcpus = spec.vcpus // spec.nguest
    if spec.whole_cell:
        candidates = [c for c in host.cells if len(c.free_cpus()) == len(c.cpus)]
        part_vcpus = len(candidates[0].cpus) if candidates else spec.vcpus
    vcpus = part_vcpus * spec.nguest
    if host.vcpus + vcpus > host.cpu_count * overcommit:
        return None
    part = spec.mib // spec.nguest
    if spec.page_kib:
        part -= part % (spec.page_kib // 1024) if spec.page_kib >= 1024 else 0
        if part <= 0:
            return None
    order = sorted(host.cells, key=lambda c: (-c.room_mib(spec.page_kib), c.id))
    chosen = [c for c in order if c.room_mib(spec.page_kib) >= part
              and (not spec.pinned or len(c.free_cpus()) >= part_vcpus)
              and (not spec.whole_cell or len(c.free_cpus()) == len(c.cpus))][: spec.nguest]
    if len(chosen) < spec.nguest:
        return None
    vcpupin: dict[int, tuple[int, ...]] = {}
    guests = []
    for g, cell in enumerate(chosen):
        if spec.page_kib:
            cell.free_pages[spec.page_kib] -= part * 1024 // spec.page_kib
        else:
            cell.used_mib += part
        ids = tuple(range(g * part_vcpus, (g + 1) * part_vcpus))
        if spec.pinned:
            for v, cpu in zip(ids, cell.free_cpus()[:part_vcpus], strict=True):
                vcpupin[v] = (cpu,)
                cell.pinned.add(cpu)
        guests.append(GuestCell(id=g, memory_mib=part, vcpus=ids))
    host.vcpus += vcpus
    if spec.group:
        host.groups.add(spec.group)
    bound = spec.pinned or spec.nguest > 1 or bool(spec.page_kib)
    return Vm(name=spec.name, uuid=f"00000000-0000-4000-8000-{uuid:012d}", host=host.name,
              memory_mib=part * spec.nguest, vcpus=vcpus, vnuma=tuple(guests) if spec.nguest > 1 else (),
              vcpupin=vcpupin, emulatorpin=vcpupin[0] if spec.pinned else (),
              numatune=Numatune(mode="strict", nodeset=tuple(sorted(c.id for c in chosen))) if bound else None,
              hugepage_kib=spec.page_kib, anti_affinity=spec.group)


def margin_mib(hosts: list[_Host], limits: Limits, drained: str, demand_mib: int) -> float:
    """The N+1 margin as docs/planner.md defines it: usable capacity of the remaining active hosts,
    less their ``spare_hosts`` largest, less their load and the moved memory."""
    head = limits.memory_headroom_pct / 100
    rest = [h for h in hosts if h.name != drained]
    caps = sorted((h.memory_mib * (1 - head) - h.reserved_mib for h in rest), reverse=True)
    return sum(caps) - sum(caps[: limits.spare_hosts]) - sum(h.used_mib for h in rest) - demand_mib


def generate(shape: Shape, seed: int, hosts: int, drain_vms: int = 40, cluster: str = "shapes") -> FleetSnapshot:
    """A fleet of ``hosts`` hosts of ``shape``; host ``h0000`` carries ``drain_vms`` VMs to evacuate."""
    rng = random.Random(f"{shape.name}/{seed}/{hosts}/{drain_vms}")
    limits = shape.limits
    made = [_new_host(rng, shape, f"h{h:04d}", largest=h == 0) for h in range(hosts)]
    vms: list[Vm] = []
    open_groups: dict[str, int] = {}  # group -> members still wanted
    made_groups = 0

    def group_for(host: _Host) -> str | None:
        nonlocal made_groups
        if rng.random() >= shape.group_share:
            return None
        # the oldest open group this host has no member of (dicts keep insertion order)
        free = next((g for g in open_groups if g not in host.groups), None)
        if free is not None and rng.random() < 0.8:
            return free
        size = max(2, hosts - rng.choice((1, 2))) if shape.group_near_hosts else rng.randint(2, 4)
        name = f"aa{made_groups:03d}"
        made_groups += 1
        open_groups[name] = size
        return name

    def add(host: _Host, cap_gib: int) -> bool:
        spec = _draw(rng, shape, host, f"vm{len(vms):05d}", cap_gib)
        spec.group = group_for(host)
        vm = _place(host, spec, limits.vcpu_overcommit, len(vms))
        if vm is None:
            return False
        if spec.group:
            open_groups[spec.group] -= 1
            if not open_groups[spec.group]:
                del open_groups[spec.group]
        vms.append(vm)
        return True

    # the drained host first, so its groups have members to meet on the others
    drained = made[0]
    misses = 0
    count = 0
    while count < drain_vms and misses < 200:
        if add(drained, max(1, min(32, drained.cells[0].gib // 3))):
            count += 1
        else:
            misses += 1
    for host in made[1:]:
        target = rng.uniform(*shape.fill) * host.memory_mib
        misses = 0
        while host.used_mib < target and misses < 30:
            misses += 0 if add(host, 10**6) else 1
    if shape.n_plus_one_edge:
        _top_up_to_the_edge(rng, shape, made, vms, limits)
    by_name = {h.name: h for h in made}
    cordon = set(rng.sample([h.name for h in made[1:]], min(shape.cordoned, len(made) - 1)))
    return FleetSnapshot(
        cluster=cluster, taken_at="2026-01-01T00:00:00Z", source="fleet-shapes", limits=limits,
        hosts=tuple(Host(name=h.name, cluster=cluster, reserved_memory_mib=h.reserved_mib,
                         state=HostState.CORDONED if h.name in cordon else HostState.ACTIVE,
                         cells=tuple(Cell(id=c.id, memory_mib=c.gib * GIB, free_mib=c.free_mib, cpus=tuple(c.cpus),
                                          hugepages=tuple(HugePages(size_kib=k, total=c.pool_pages[k],
                                                                    free=c.free_pages[k])
                                                          for k in sorted(c.pool_pages)))
                                     for c in h.cells))
                    for h in by_name.values()),
        vms=tuple(vms))


def _top_up_to_the_edge(rng: random.Random, shape: Shape, made: list[_Host], vms: list[Vm], limits: Limits) -> None:
    """Add small plain VMs to the emptiest other hosts while the drain still passes N+1."""
    demand = sum(v.memory_mib for v in vms if v.host == DRAINED)
    left = margin_mib(made, limits, DRAINED, demand)
    emptiest = [(h.used_mib / h.memory_mib, h.name, h) for h in made[1:]]
    heapq.heapify(emptiest)
    while emptiest:
        # large steps while far from the edge, 1 GiB at the end
        gib = max(1, min(64, int(left / GIB / (4 * len(emptiest))))) if left > 8 * GIB else 1
        if left < gib * GIB:
            return
        _, name, host = heapq.heappop(emptiest)
        spec = _Spec(f"vm{len(vms):05d}", gib * GIB, max(1, gib // 4), 0, False, False, 1)
        vm = _place(host, spec, limits.vcpu_overcommit, len(vms))
        if vm is None:
            continue  # full: it leaves the heap
        vms.append(vm)
        left -= vm.memory_mib
        heapq.heappush(emptiest, (host.used_mib / host.memory_mib, name, host))
