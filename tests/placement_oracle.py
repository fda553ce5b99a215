"""An independent judge of placement plans, for the oracle tests and the placement benchmark.

Written from docs/planner.md, docs/snapshot.md and the models, sharing no code with
``hostmaint.placement`` (a bug copied into a judge is a bug it cannot see):

* :func:`breaches`: every documented limit a plan breaks, each placement charged against what the
  snapshot says is free;
* :func:`reference`: an exact CP-SAT model of the same rules, solved lexicographically as the issue
  asks of the planner: VMs placed, then NUMA-local, then the highest host utilisation. Its first
  stage alone (:func:`oracle_max_placed`) says how many VMs can be placed at all.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

from ortools.sat.python import cp_model

from hostmaint.models import Blocker, EvacuationPlan, FleetSnapshot, HostState, Placement, Vm

Uses = dict[Any, list[Any]]  # a cell's (or pool's) key -> CP-SAT terms drawing on it


# --- the rules, read from the docs ----------------------------------------------------------------------


def held_cpus(vm: Vm) -> set[int]:
    """Host CPUs a VM holds: every CPU its vcpupin, emulatorpin, iothreadpin and <vcpu cpuset> name."""
    held = set(vm.emulatorpin) | set(vm.vcpu_cpuset)
    for cpus in (*vm.vcpupin.values(), *vm.iothreadpin.values()):
        held |= set(cpus)
    return held


def guest_parts(vm: Vm) -> list[int]:
    """docs/planner.md: memory outside the guest cells is spread over them in proportion to their size
    (integer MiB, leftovers to the first cells), so the parts add up to memory_mib."""
    listed = [g.memory_mib for g in sorted(vm.vnuma, key=lambda g: g.id)]
    extra = vm.memory_mib - sum(listed)
    if extra <= 0:
        return listed
    shares = [extra * m // sum(listed) for m in listed]
    for i in range(extra - sum(shares)):
        shares[i] += 1
    return [m + s for m, s in zip(listed, shares, strict=True)]


def pages(mib: float, page_kib: int) -> int:
    return math.ceil(round(mib * 1024) / page_kib)


def targets_of(s: FleetSnapshot, vm: Vm, drained: set[str]) -> list[str]:
    """Active hosts, not drained, in the source's cluster and CPU group."""
    src = s.host(vm.host)
    return [h.name for h in s.hosts if h.state is HostState.ACTIVE and h.name not in drained
            and h.cpu_group == src.cpu_group and h.cluster == src.cluster]


class Free:
    """What the snapshot leaves free for planning, per the table in docs/planner.md."""

    def __init__(self, s: FleetSnapshot) -> None:
        head = s.limits.memory_headroom_pct / 100
        self.mem: dict[tuple[str, int], float] = {}
        self.pages: dict[tuple[str, int, int], int] = {}
        self.cpus: dict[tuple[str, int], set[int]] = {}  # free unpinned
        self.cell_cpus: dict[tuple[str, int], set[int]] = {}
        self.vcpus: dict[str, float] = {}
        self.groups: dict[str, Counter[str]] = defaultdict(Counter)
        for h in s.hosts:
            total = sum(c.memory_mib for c in h.cells)
            taken: set[int] = set()
            for vm in s.vms_on(h.name):
                taken |= held_cpus(vm)
                if vm.anti_affinity:
                    self.groups[h.name][vm.anti_affinity] += 1
            self.vcpus[h.name] = sum(len(c.cpus) for c in h.cells) * s.limits.vcpu_overcommit - sum(
                vm.vcpus for vm in s.vms_on(h.name))
            for c in h.cells:
                self.mem[h.name, c.id] = (c.free_mib - h.reserved_memory_mib * c.memory_mib / total
                                          - head * c.memory_mib)
                for hp in c.hugepages:
                    self.pages[h.name, c.id, hp.size_kib] = hp.free
                self.cpus[h.name, c.id] = set(c.cpus) - taken
                self.cell_cpus[h.name, c.id] = set(c.cpus)


def breaches(s: FleetSnapshot, plan: EvacuationPlan) -> list[str]:
    """Every documented limit the plan breaks, judged against the snapshot alone (empty: none)."""
    out: list[str] = []
    vms = {v.name: v for v in s.vms}
    hosts = {h.name: h for h in s.hosts}
    drained = set(plan.hosts)
    free = Free(s)
    seen: set[str] = set()
    for p in plan.placements:
        vm = vms.get(p.vm)
        if vm is None:
            out.append(f"{p.vm}: not a VM of the snapshot")
            continue
        where = f"{p.vm} -> {p.target} {p.target_cells}"
        if p.vm in seen:
            out.append(f"{p.vm}: placed twice")
        seen.add(p.vm)
        if not vm.migratable or vm.host not in drained or p.source != vm.host:
            out.append(f"{where}: not a migratable VM of a drained host (on {vm.host})")
        if p.target not in targets_of(s, vm, drained):
            out.append(f"{where}: not a target (state, drained, cluster or CPU group)")
            continue
        cells = {c.id: c for c in hosts[p.target].cells}
        if (len(p.target_cells) != len(set(p.target_cells)) or len(p.cell_memory_mib) != len(p.target_cells)
                or not set(p.target_cells) <= set(cells)):
            out.append(f"{where}: target cells not distinct cells of the host, one memory each")
            continue
        if any(mib <= 0 for mib in p.cell_memory_mib):
            # a cell that holds none of its memory (lending only CPUs) is no cell of its placement: the
            # strict nodeset over it would let the kernel put memory there that nothing counted
            out.append(f"{where}: a target cell holds none of its memory {p.cell_memory_mib}")
        if sum(p.cell_memory_mib) != vm.memory_mib:
            out.append(f"{where}: cell memory {p.cell_memory_mib} does not add up to {vm.memory_mib}")
        if vm.vnuma:
            parts = guest_parts(vm)
            if len(p.target_cells) != len(parts) or not p.numa_local:
                out.append(f"{where}: {len(parts)} guest cells not mapped 1:1")
            elif any(m < g.memory_mib for m, g in zip(p.cell_memory_mib, sorted(vm.vnuma, key=lambda g: g.id),
                                                      strict=True)):
                out.append(f"{where}: a target cell holds less than its guest cell")
        elif p.numa_local and len(p.target_cells) != 1:
            out.append(f"{where}: NUMA-local but over {len(p.target_cells)} cells")
        for cid, mib in zip(p.target_cells, p.cell_memory_mib, strict=True):
            if vm.hugepage_kib:
                key = (p.target, cid, vm.hugepage_kib)
                free.pages[key] = free.pages.get(key, 0) - pages(mib, vm.hugepage_kib)
                if mib > 0 and free.pages[key] < 0:
                    out.append(f"{where}: {vm.hugepage_kib} KiB hugepages of cell {cid} overdrawn by "
                               f"{-free.pages[key]}")
            else:
                free.mem[p.target, cid] -= mib
                if mib > 0 and free.mem[p.target, cid] < -1e-6:
                    out.append(f"{where}: memory of cell {cid} overdrawn by {-free.mem[p.target, cid]:.0f} MiB")
        free.vcpus[p.target] -= vm.vcpus
        if free.vcpus[p.target] < -1e-9:
            out.append(f"{where}: vCPU budget overdrawn by {-free.vcpus[p.target]:g}")
        if vm.anti_affinity:
            if free.groups[p.target][vm.anti_affinity]:
                out.append(f"{where}: anti-affinity group {vm.anti_affinity!r} already there")
            free.groups[p.target][vm.anti_affinity] += 1
        out += _pin_breaches(vm, p, where, free)
        if vm.numatune is not None and set(p.numatune_nodeset or ()) != set(p.target_cells):
            out.append(f"{where}: numatune nodeset {p.numatune_nodeset} is not the target cells")
    decided = seen | {b.vm for b in plan.blocked} | {a.vm for a in plan.vm_actions}
    skipped = set(plan.skipped_hosts)
    for h in drained - skipped:
        for vm in s.vms_on(h):
            if vm.name not in decided:
                out.append(f"{vm.name}: on drained host {h} but neither placed, blocked nor acted on")
    return out


def _pin_breaches(vm: Vm, p: Placement, where: str, free: Free) -> list[str]:
    """A pinned VM keeps as many CPUs as it pins, free and unpinned ones of its target cells (for vNUMA,
    each guest cell's vCPUs on that guest cell's host cell), each old CPU always onto the same new one."""
    old = held_cpus(vm)
    if not old:
        return []
    fields = (("vcpupin", vm.vcpupin, p.vcpupin), ("iothreadpin", vm.iothreadpin, p.iothreadpin))
    mapping: dict[int, int] = {}
    out: list[str] = []

    def pair(olds: tuple[int, ...], news: tuple[int, ...], what: str) -> None:
        if len(set(olds)) != len(set(news)):
            out.append(f"{where}: {what} pins {len(set(news))} CPUs, had {len(set(olds))}")
            return
        for a, b in zip(sorted(set(olds)), sorted(set(news)), strict=True):
            if mapping.setdefault(a, b) != b:
                out.append(f"{where}: {what}: old CPU {a} mapped to {mapping[a]} and {b}")

    for name, before, after in fields:
        if set(before) != set(after):
            out.append(f"{where}: {name} rewrites vCPUs/threads {sorted(after)}, had {sorted(before)}")
            continue
        for k in before:
            pair(before[k], after[k], f"{name}[{k}]")
    if vm.emulatorpin:
        pair(vm.emulatorpin, p.emulatorpin, "emulatorpin")
    if vm.vcpu_cpuset:
        pair(vm.vcpu_cpuset, p.vcpu_cpuset, "vcpu_cpuset")
    new = set(mapping.values())
    target, cells = p.target, p.target_cells
    if len(new) != len(old):
        out.append(f"{where}: holds {len(new)} CPUs on the target, {len(old)} on the source")
    free_there = set().union(*(free.cpus[target, c] for c in cells))
    if not new <= free_there:
        out.append(f"{where}: pinned to CPUs {sorted(new - free_there)}, not free unpinned CPUs of its cells")
    for c in cells:
        free.cpus[target, c] -= new
    for g, cell in zip(sorted(vm.vnuma, key=lambda g: g.id), cells, strict=False):
        for v in g.vcpus:
            if v in p.vcpupin and not set(p.vcpupin[v]) <= free.cell_cpus[target, cell]:
                out.append(f"{where}: vCPU {v} of guest cell {g.id} pinned outside host cell {cell}")
    return out


# --- the oracle: an exact model of the same rules ----------------------------------------------------------


@dataclass(frozen=True)
class Reference:
    """What the exact model established for one drain (None where a stage found nothing in its budget)."""

    movers: int
    placed: int | None  # the most VMs that can be placed together
    local: int | None  # the most of them NUMA-local, with that many placed
    peak_util: float | None  # the lowest highest host utilisation, with both of the above
    proven: bool  # every stage that ran was solved to optimality
    witness: EvacuationPlan | None = None  # the placement it found, for breaches() to judge


class _Model:
    """The drain of ``drained`` as a CP-SAT program: for each VM a host (or none), its memory and
    pinned CPUs in that host's cells. With ``remote`` a VM without vNUMA may be spread over several
    cells (NUMA-remote: a feasible drain may need that); without, every VM is NUMA-local (a much
    smaller model, exact whenever it places every VM)."""

    def __init__(self, s: FleetSnapshot, drained: set[str], *, remote: bool = True) -> None:
        self.m = cp_model.CpModel()
        self.free = Free(s)
        hosts = {h.name: h for h in s.hosts}
        self.movers = sorted((v for h in sorted(drained) for v in s.vms_on(h) if v.migratable), key=lambda v: v.name)
        self.placed: list[Any] = []
        self.local: list[Any] = []
        self.on: dict[str, list[tuple[Any, int]]] = defaultdict(list)  # host -> (is there, memory MiB)
        self.readers: dict[str, list[tuple[str, Any, Any]]] = defaultdict(list)  # VM -> (host, is there, read)
        self.solver: Any = None
        self.drained = sorted(drained)
        self.cluster = s.cluster
        mem_use: Uses = defaultdict(list)
        page_use: Uses = defaultdict(list)
        cpu_use: Uses = defaultdict(list)
        vcpu_use: Uses = defaultdict(list)
        group_on: Uses = defaultdict(list)
        m = self.m
        receivers: set[str] = set()
        for vm in self.movers:
            there = []
            for name in targets_of(s, vm, drained):
                receivers.add(name)
                if vm.anti_affinity and self.free.groups[name][vm.anti_affinity]:
                    continue
                if vm.vcpus > self.free.vcpus[name] + 1e-9:
                    continue
                cells = [c.id for c in hosts[name].cells]
                if not remote and not vm.vnuma:
                    cells = [c for c in cells if self._holds_alone(vm, name, c, vm.memory_mib, len(held_cpus(vm)))]
                    if not cells:
                        continue
                y = m.NewBoolVar(f"{vm.name}@{name}")
                there.append(y)
                self.on[name].append((y, vm.memory_mib))
                vcpu_use[name].append(vm.vcpus * y)
                if vm.anti_affinity:
                    group_on[vm.anti_affinity, name].append(y)
                if vm.vnuma:
                    read = _guest_cells(m, vm, name, cells, y, mem_use, page_use, cpu_use, self._holds_alone)
                    self.local.append(y)
                elif remote:
                    local, read = _any_cells(m, vm, name, cells, y, mem_use, page_use, cpu_use)
                    self.local.append(local)
                else:
                    read = _one_cell(m, vm, name, cells, y, mem_use, page_use, cpu_use)
                    self.local.append(y)
                self.readers[vm.name].append((name, y, read))
            v = m.NewBoolVar(f"placed {vm.name}")
            m.Add(sum(there) == v)
            self.placed.append(v)
        free = self.free
        for (h, c), terms in mem_use.items():
            m.Add(sum(terms) <= max(math.floor(free.mem[h, c] + 1e-9), 0))
        for key, terms in page_use.items():
            m.Add(sum(terms) <= max(free.pages.get(key, 0), 0))
        for key, terms in cpu_use.items():
            m.Add(sum(terms) <= len(free.cpus[key]))
        for h, terms in vcpu_use.items():
            m.Add(sum(terms) <= max(math.floor(free.vcpus[h] + 1e-9), 0))
        for terms in group_on.values():
            m.Add(sum(terms) <= 1)
        self.receivers = sorted(receivers)
        self.used = {h: used_mib(hosts[h]) for h in self.receivers}
        self.memory = {h: sum(c.memory_mib for c in hosts[h].cells) for h in self.receivers}

    def _holds_alone(self, vm: Vm, host: str, cell: int, mib: int, ncpus: int) -> bool:
        """Whether the cell, as the snapshot leaves it, could take this part with nothing else."""
        if vm.hugepage_kib:
            room = self.free.pages.get((host, cell, vm.hugepage_kib), 0) >= pages(mib, vm.hugepage_kib)
        else:
            room = self.free.mem[host, cell] + 1e-9 >= mib
        return room and len(self.free.cpus[host, cell]) >= ncpus

    def solve(self, seconds: float) -> tuple[bool, int | None]:
        """(proven optimal, objective) of the objective set now."""
        solver = cp_model.CpSolver()
        solver.parameters.num_workers = 1
        solver.parameters.random_seed = 7
        solver.parameters.max_deterministic_time = seconds
        status = solver.Solve(self.m)
        if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            return False, None
        self.solver = solver
        return status == cp_model.OPTIMAL, round(solver.ObjectiveValue())


def used_mib(host: Any) -> float:
    """Memory in use on a host as the planner's utilisation counts it: free hugepages are free."""
    return sum(c.memory_mib - c.free_mib - sum(hp.free * hp.size_kib for hp in c.hugepages) / 1024
               for c in host.cells)


UTIL_SCALE = 100_000  # utilisation in the peak stage, in 1/100,000


def oracle_max_placed(s: FleetSnapshot, drained: set[str], seconds: float = 20.0) -> int | None:
    """How many migratable VMs of ``drained`` can be placed together under the documented rules
    (None when CP-SAT could not prove it within its budget)."""
    model = _Model(s, drained)
    model.m.Maximize(sum(model.placed))
    proven, best = model.solve(seconds)
    return best if proven else None


def reference(s: FleetSnapshot, drained: set[str], seconds: float = 10.0) -> Reference:
    """The exact optimum, stage by stage (each stage's optimum fixed for the next): VMs placed,
    NUMA-local, the highest utilisation over the hosts that may receive. ``seconds`` of
    deterministic CP-SAT work per stage."""
    model = _Model(s, drained, remote=False)
    m = model.m
    m.Maximize(sum(model.placed))
    proven, placed = model.solve(seconds)
    if placed == len(model.movers):  # all placed and all local: nothing can do better on either
        local, proven = placed, True
    else:
        model = _Model(s, drained)
        m = model.m
        m.Maximize(sum(model.placed))
        proven, placed = model.solve(seconds)
        if placed is None:
            return Reference(len(model.movers), None, None, None, False)
        m.Add(sum(model.placed) >= placed)
        m.Maximize(sum(model.local))
        ok, local = model.solve(seconds)
        proven = proven and ok
        if local is None:
            return Reference(len(model.movers), placed, None, None, False)
        m.Add(sum(model.local) >= local)
    m.Add(sum(model.placed) >= placed)
    top = m.NewIntVar(0, 2 * UTIL_SCALE, "peak")
    for h in model.receivers:
        moved = sum(mib * y for y, mib in model.on[h])
        m.Add(UTIL_SCALE * math.ceil(model.used[h]) + UTIL_SCALE * moved <= top * model.memory[h])
    m.Minimize(top)
    ok, peak = model.solve(seconds)
    return Reference(len(model.movers), placed, local, None if peak is None else peak / UTIL_SCALE,
                     proven and ok, _witness(model))


def _witness(model: _Model) -> EvacuationPlan | None:
    """The last solution as a plan: cells, memory per cell, pins mapped onto free CPUs of the cells
    the model gave them (a guest cell's vCPUs onto its own host cell)."""
    solver = model.solver
    if solver is None:
        return None
    free = {k: sorted(v) for k, v in model.free.cpus.items()}
    placements, blocked = [], []
    for vm in model.movers:
        chosen = [(h, read) for h, y, read in model.readers[vm.name] if solver.Value(y)]
        if not chosen:
            blocked.append(Blocker(vm=vm.name, host=vm.host, constraint="capacity", reason="reference"))
            continue
        host, read = chosen[0]
        parts = read(solver.Value)
        cells = tuple(c for c, _, _ in parts)
        mapping: dict[int, int] = {}
        olds = sorted(held_cpus(vm))
        if vm.vnuma:
            for g, (c, _, _) in zip(sorted(vm.vnuma, key=lambda g: g.id), parts, strict=True):
                for v in g.vcpus:
                    for old in vm.vcpupin.get(v, ()):
                        if old not in mapping:
                            mapping[old] = free[host, c].pop(0)
        else:
            left = list(olds)
            for c, _, n in parts:
                for old in left[:n]:
                    mapping[old] = free[host, c].pop(0)
                left = left[n:]
        for old in olds:  # pins of no guest cell: any chosen cell with a free CPU
            if old not in mapping:
                mapping[old] = free[host, next(c for c in cells if free[host, c])].pop(0)

        def mapped(cpus: tuple[int, ...], mapping: dict[int, int] = mapping) -> tuple[int, ...]:
            return tuple(sorted(mapping[c] for c in cpus))
        placements.append(Placement(
            vm=vm.name, source=vm.host, target=host, target_cells=cells,
            numa_local=bool(vm.vnuma) or len(cells) == 1,
            vcpupin={v: mapped(c) for v, c in vm.vcpupin.items()}, emulatorpin=mapped(vm.emulatorpin),
            vcpu_cpuset=mapped(vm.vcpu_cpuset), iothreadpin={k: mapped(c) for k, c in vm.iothreadpin.items()},
            numatune_nodeset=tuple(sorted(cells)) if vm.numatune is not None else None,
            memory_mib=vm.memory_mib, cell_memory_mib=tuple(mib for _, mib, _ in parts), reason="reference"))
    return EvacuationPlan(cluster=model.cluster, hosts=tuple(model.drained), snapshot_digest="",
                          placements=tuple(placements), blocked=tuple(blocked))


def _part_need(vm: Vm, mib: int) -> int:
    """What a part of ``mib`` MiB draws from a cell: pages of the VM's size, or MiB."""
    return pages(mib, vm.hugepage_kib) if vm.hugepage_kib else mib


def _charge(vm: Vm, host: str, cell: int, amount: Any, mem_use: Uses, page_use: Uses) -> None:
    if vm.hugepage_kib:
        page_use[host, cell, vm.hugepage_kib].append(amount)
    else:
        mem_use[host, cell].append(amount)


def _one_cell(m: Any, vm: Vm, host: str, cells: list[int], y: Any, mem_use: Uses, page_use: Uses,
              cpu_use: Uses) -> Any:
    """NUMA-local: the whole VM in one of ``cells`` (those that could hold it alone)."""
    ncpus = len(held_cpus(vm))
    x = {c: m.NewBoolVar(f"{vm.name}@{host}/{c}") for c in cells}
    m.Add(sum(x.values()) == y)
    for c in cells:
        _charge(vm, host, c, _part_need(vm, vm.memory_mib) * x[c], mem_use, page_use)
        if ncpus:
            cpu_use[host, c].append(ncpus * x[c])
    return lambda val: [(c, vm.memory_mib, ncpus) for c in cells if val(x[c])]


def _guest_cells(m: Any, vm: Vm, host: str, cells: list[int], y: Any, mem_use: Uses, page_use: Uses,
                 cpu_use: Uses, holds: Any) -> Any:
    """Guest cells 1:1 onto distinct host cells, each holding its part and its vCPUs' pinned CPUs; pins
    of no guest cell (emulator, I/O threads) on any of the chosen cells."""
    parts = guest_parts(vm)
    guests = sorted(vm.vnuma, key=lambda g: g.id)
    counted: set[int] = set()
    pins = []
    for g in guests:
        mine = {cpu for v in g.vcpus for cpu in vm.vcpupin.get(v, ())} - counted
        counted |= mine
        pins.append(len(mine))
    rest = len(held_cpus(vm) - counted)
    x = {(g, c): m.NewBoolVar(f"{vm.name}/{g}@{host}/{c}") for g in range(len(parts)) for c in cells}
    for g, mib in enumerate(parts):
        m.Add(sum(x[g, c] for c in cells) == y)
        for c in cells:
            if not holds(vm, host, c, mib, pins[g]):  # never, whatever else moves
                m.Add(x[g, c] == 0)
        amount = _part_need(vm, mib)
        for c in cells:
            _charge(vm, host, c, amount * x[g, c], mem_use, page_use)
            if pins[g]:
                cpu_use[host, c].append(pins[g] * x[g, c])
    for c in cells:
        m.Add(sum(x[g, c] for g in range(len(parts))) <= 1)
    if rest:
        extra = {c: m.NewIntVar(0, rest, f"{vm.name} rest@{host}/{c}") for c in cells}
        for c in cells:
            m.Add(extra[c] <= rest * sum(x[g, c] for g in range(len(parts))))
            cpu_use[host, c].append(extra[c])
        m.Add(sum(extra.values()) == rest * y)
    return lambda val: [(next(c for c in cells if val(x[g, c])), mib, pins[g]) for g, mib in enumerate(parts)]


def _any_cells(m: Any, vm: Vm, host: str, cells: list[int], y: Any, mem_use: Uses, page_use: Uses,
               cpu_use: Uses) -> tuple[Any, Any]:
    """One cell, or spread over several cells of the host (NUMA-remote); pinned CPUs from the cells
    used. Returns a literal true when the VM is on this host in one cell (NUMA-local), and a reader."""
    total = _part_need(vm, vm.memory_mib)
    ncpus = len(held_cpus(vm))
    amount = {c: m.NewIntVar(0, total, f"{vm.name}@{host}/{c}") for c in cells}
    used = {c: m.NewBoolVar(f"{vm.name} uses {host}/{c}") for c in cells}
    m.Add(sum(amount.values()) == total * y)
    for c in cells:
        m.Add(amount[c] <= total * used[c])
        m.Add(amount[c] >= used[c])
        _charge(vm, host, c, amount[c], mem_use, page_use)
    cpus = {c: m.NewIntVar(0, ncpus, f"{vm.name} cpus@{host}/{c}") for c in cells}
    for c in cells:
        m.Add(cpus[c] <= ncpus * used[c])
        if ncpus:
            cpu_use[host, c].append(cpus[c])
    m.Add(sum(cpus.values()) == ncpus * y)
    local = m.NewBoolVar(f"{vm.name} local@{host}")
    m.Add(local <= y)
    m.Add(sum(used.values()) <= 1).OnlyEnforceIf(local)

    def read(val: Any) -> list[tuple[int, int, int]]:
        unit = vm.hugepage_kib / 1024 if vm.hugepage_kib else 1
        parts = [(c, int(val(amount[c]) * unit), val(cpus[c])) for c in cells if val(used[c])]
        c, mib, n = parts[-1]  # whole pages may hold a little more than the VM: the last part takes less
        parts[-1] = (c, vm.memory_mib - sum(p[1] for p in parts[:-1]), n)
        return parts
    return local, read
