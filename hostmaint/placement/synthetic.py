"""A seeded generator of realistic fleets, for the benchmark and the property tests.

Hosts have 2 or 4 NUMA cells of 192 GiB (24 CPUs each) with a pool of 1 GiB
hugepages per cell; each host is filled to a random level (uniform in
``fill``) with VMs of 2–192 GiB at 2–8 GiB per vCPU. Wide VMs (more than half
a cell) get a vNUMA topology of 2 or 4 guest cells; about 10 % are pinned
1:1 to dedicated CPUs, about 20 % use 1 GiB hugepages and about 30 % belong
to anti-affinity groups of 2–4 VMs (never two of a group on one host).

The generator places every VM on real cells of its host, so ``free_mib``,
free hugepages and pinned CPUs are consistent with the VMs it lists. Same
seed, same fleet.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from hostmaint.models import Cell, FleetSnapshot, GuestCell, Host, HugePages, Limits, Numatune, Vm

GIB = 1024
CELL_GIB = 192
CPUS_PER_CELL = 24
HUGEPAGE_KIB = 1024 * 1024
HOST_OVERHEAD_MIB = 2 * GIB  # per cell: kernel, qemu and libvirt themselves
# VM sizes (GiB) and how common they are: many small VMs, a few very large ones
FLAVOURS = (2, 4, 8, 16, 32, 64, 128, 192)
WEIGHTS = (20, 25, 22, 15, 9, 5, 3, 1)


@dataclass
class _Cell:
    id: int
    cpus: list[int]
    pool_pages: int
    free_pages: int
    normal_used: int = HOST_OVERHEAD_MIB
    pinned: set[int] | None = None

    @property
    def normal_free(self) -> int:
        return CELL_GIB * GIB - self.normal_used - self.pool_pages * GIB

    def free_cpus(self) -> list[int]:
        return [c for c in self.cpus if c not in (self.pinned or set())]


@dataclass
class _Host:
    name: str
    cells: list[_Cell]
    vcpus: int = 0
    groups: set[str] | None = None

    @property
    def memory_mib(self) -> int:
        return len(self.cells) * CELL_GIB * GIB

    @property
    def used_mib(self) -> int:
        return sum(c.normal_used + (c.pool_pages - c.free_pages) * GIB for c in self.cells)


def _new_host(name: str, ncells: int, base_cpu: int = 0) -> _Host:
    cells = []
    for i in range(ncells):
        cpus = list(range(i * CPUS_PER_CELL, (i + 1) * CPUS_PER_CELL))
        pool = CELL_GIB // 5  # ~20 % of each cell is a 1 GiB hugepage pool
        cells.append(_Cell(id=i, cpus=cpus, pool_pages=pool, free_pages=pool, pinned=set()))
    return _Host(name=name, cells=cells, groups=set())


def _draw_vm(rng: random.Random, idx: int, cap_gib: int) -> dict[str, object]:
    choices = [(f, w) for f, w in zip(FLAVOURS, WEIGHTS, strict=True) if f <= cap_gib] or [(2, 1)]
    gib = rng.choices([f for f, _ in choices], weights=[w for _, w in choices])[0]
    per_vcpu = rng.choice((2, 4, 8))
    vcpus = max(1, gib // per_vcpu)
    return {"name": f"vm{idx:05d}", "gib": gib, "vcpus": vcpus,
            "pinned": vcpus <= 8 and rng.random() < 0.10,
            "hugepages": rng.random() < 0.20,
            "group": rng.random() < 0.30}


def _try_place(host: _Host, spec: dict[str, object], rng: random.Random, overcommit: float) -> Vm | None:
    """Put a drawn VM onto real cells of ``host``; None when it does not fit."""
    gib = int(spec["gib"])  # type: ignore[call-overload]
    vcpus = int(spec["vcpus"])  # type: ignore[call-overload]
    if host.vcpus + vcpus > len(host.cells) * CPUS_PER_CELL * overcommit:
        return None
    hp = bool(spec["hugepages"])
    pinned = bool(spec["pinned"])
    nguest = 1
    if gib * 2 > CELL_GIB:
        nguest = 2 if gib <= CELL_GIB else 4
        if nguest > len(host.cells):
            return None
    part = gib // nguest
    part_vcpus = max(1, vcpus // nguest)
    vcpus = part_vcpus * nguest

    def room(c: _Cell) -> int:
        return c.free_pages * GIB if hp else c.normal_free

    order = sorted(host.cells, key=lambda c: (-room(c), c.id))
    chosen = [c for c in order if room(c) >= part * GIB and (not pinned or len(c.free_cpus()) >= part_vcpus)]
    if len(chosen) < nguest:
        return None
    chosen = chosen[:nguest]
    vcpupin: dict[int, tuple[int, ...]] = {}
    guest_cells = []
    for g, cell in enumerate(chosen):
        if hp:
            cell.free_pages -= part
        else:
            cell.normal_used += part * GIB
        vlist = tuple(range(g * part_vcpus, (g + 1) * part_vcpus))
        if pinned:
            free = cell.free_cpus()[:part_vcpus]
            for v, cpu in zip(vlist, free, strict=True):
                vcpupin[v] = (cpu,)
                assert cell.pinned is not None
                cell.pinned.add(cpu)
        guest_cells.append(GuestCell(id=g, memory_mib=part * GIB, vcpus=vlist))
    host.vcpus += vcpus
    name = str(spec["name"])
    nodeset = tuple(sorted(c.id for c in chosen))
    return Vm(name=name, uuid=f"00000000-0000-4000-8000-{int(name[2:]):012d}", host=host.name,
              memory_mib=gib * GIB, vcpus=vcpus,
              vnuma=tuple(guest_cells) if nguest > 1 else (),
              vcpupin=vcpupin, emulatorpin=vcpupin[0] if pinned else (),
              numatune=Numatune(mode="strict", nodeset=nodeset) if (pinned or nguest > 1 or hp) else None,
              hugepage_kib=HUGEPAGE_KIB if hp else 0)


def generate_fleet(seed: int, hosts: int, *, fill: tuple[float, float] = (0.45, 0.75),
                   drain_vms: int | None = None, cluster: str = "bench", limits: Limits | None = None,
                   four_cell_share: float = 0.5) -> FleetSnapshot:
    """A fleet of ``hosts`` hosts filled to a level uniform in ``fill``.

    With ``drain_vms``, host ``h0000`` carries exactly that many VMs (small and medium ones) so a
    one-host evacuation of that size can be measured.
    """
    rng = random.Random(seed)
    limits = limits or Limits()
    made: list[_Host] = []
    vms: list[Vm] = []
    idx = 0
    groups: list[tuple[str, int]] = []  # open anti-affinity groups: (name, members still wanted)
    made_groups = 0
    for h in range(hosts):
        ncells = 4 if rng.random() < four_cell_share else 2
        if drain_vms is not None and h == 0:
            ncells = 4
        host = _new_host(f"h{h:04d}", ncells)
        made.append(host)
        target = rng.uniform(*fill) * host.memory_mib
        wanted = drain_vms if (drain_vms is not None and h == 0) else None
        misses = 0
        count = 0
        while misses < 30 and (host.used_mib < target if wanted is None else count < wanted):
            spec = _draw_vm(rng, idx, 64 if wanted is not None else 192)
            if wanted is not None:
                spec["gib"] = min(int(spec["gib"]), 32)  # type: ignore[call-overload]
            group = None
            if spec["group"]:
                open_groups = [g for g in groups if g[0] not in (host.groups or set())]
                if open_groups and rng.random() < 0.7:
                    group = open_groups[0][0]
                else:
                    group = f"aa{made_groups:04d}"
                    made_groups += 1
                    groups.append((group, rng.randint(2, 4)))
            too_full = host.used_mib + int(spec["gib"]) * GIB > fill[1] * host.memory_mib  # type: ignore[call-overload]
            vm = None if (wanted is None and too_full) else _try_place(host, spec, rng, limits.vcpu_overcommit)
            if vm is None:
                misses += 1
                continue
            if group is not None:
                vm = vm.model_copy(update={"anti_affinity": group})
                assert host.groups is not None
                host.groups.add(group)
                groups = [(g, n - 1) if g == group else (g, n) for g, n in groups]
                groups = [(g, n) for g, n in groups if n > 0]
            vms.append(vm)
            idx += 1
            count += 1
    snapshot_hosts = []
    for host in made:
        cells = tuple(Cell(id=c.id, memory_mib=CELL_GIB * GIB, free_mib=c.normal_free, cpus=tuple(c.cpus),
                           hugepages=(HugePages(size_kib=HUGEPAGE_KIB, total=c.pool_pages, free=c.free_pages),))
                      for c in host.cells)
        snapshot_hosts.append(Host(name=host.name, cluster=cluster, cells=cells, reserved_memory_mib=0))
    return FleetSnapshot(cluster=cluster, taken_at="2026-01-01T00:00:00Z", source="synthetic", limits=limits,
                         hosts=tuple(snapshot_hosts), vms=tuple(vms))

