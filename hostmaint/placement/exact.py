"""The exact stage: CP-SAT behind the greedy planner, and the proof every plan states.

The greedy (evacuate.py) places VMs one at a time and can use up the only host that fits a later
VM; it then refuses a drain that can be done. This stage models the same placement as one
constraint program, with the fit rules of fit.py (``cell_holds``, ``host_miss``, ``pool_room``,
``pool_draw``, ``free_cpu_count``, ``vcpu_room``) turned into linear constraints:

* each guest part (one for a plain VM, one per guest cell for vNUMA) onto a host cell that alone
  holds it: ordinary memory after reserve and headroom, or free hugepages of its page size; its
  pinned CPUs from the cell's free unpinned CPUs; guest cells 1:1 onto distinct host cells;
* a NUMA-remote spread over cells (a plain VM, only where not everything was local already):
  with pinned CPUs, a part and the CPUs per cell; without, one row per host (memory splits over
  any cells in whole units, so it fits when the cells together keep room after the local parts);
* the host's vCPU budget; one VM of an anti-affinity group per host (none where the group runs);
* targets are exactly the greedy's (active, not drained, same cluster and CPU group), charged
  from the same ledger, so migrations in flight already count on their targets.

The objective is lexicographic, solved as stages (each stage's optimum fixed for the next): VMs
placed, NUMA-local, the targets' ranks (focus, due for maintenance, busy), the highest host
utilisation, then the spread (Σ weight × utilisation above the mean, hosts and cells weighted as in
objective.py; linear, so its optimum is proven). The greedy result is the hint and the answer
whenever this stage finds nothing better (by the same key, evacuate._key). CP-SAT
runs with one worker, a fixed seed and a *deterministic* time budget (never wall time), so the
same snapshot gives the same plan and the same proof on any machine.

When the first stage proves that not every VM fits, :func:`refusal_core` names, for each VM
left out, a set of VMs that cannot all be placed together (by a count of what the hosts they can
reach hold, else narrowed by CP-SAT's sufficient assumptions, then shrunk by deletion to a minimal
set, each check bounded) and the rules whose relaxation alone would let that set fit; the
blocker's reason and hint follow from that set. :func:`solve_rebalance` is the same model for a rebalance's moves.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hostmaint.models import PlanProof, Vm
from hostmaint.placement.fit import (
    Demand,
    cell_holds,
    demand_of,
    fit_host,
    free_cpu_count,
    host_miss,
    pool_draw,
    pool_room,
    vcpu_room,
)
from hostmaint.placement.ledger import CellLoad, Fit, HostLoad, Ledger
from hostmaint.placement.objective import CELL_WEIGHT

if TYPE_CHECKING:
    from ortools.sat.python import cp_model


def _cp():  # type: ignore[no-untyped-def]
    """OR-Tools' CP-SAT, imported when the exact stage first runs: the import takes most of a second
    (numpy, pandas), which a greedy-only plan or a CLI start need not pay."""
    from ortools.sat.python import cp_model

    return cp_model


# Deterministic seconds of CP-SAT work a plan may spend (a unit of solver work that is about a
# second on a typical core, the same on every machine). 0: greedy only.
DEFAULT_BUDGET = 1.0
STAGE_SHARE = 0.6  # of the budget left, what one stage of the objective may spend
# Above this many VM-host candidate pairs an optimisation (the greedy placed every VM) stays
# greedy: the model would cost more to build than it gains (benchmarks/exact.py). A refusal is
# always searched, whatever the size.
MAX_PAIRS = 2500
WORKERS = 1
SEED = 1
CORES = 8  # VMs left out that get a refusal core of their own; the rest state the proven bound
# Deterministic seconds one "can these all be placed?" check of a core's shrink may spend: many
# small checks, each bounded, instead of a few that take what the budget has left
CHECK_BUDGET = 0.05

# Rules the exact stage can relax one at a time to say which one a refusal core runs into.
RULES = ("numa", "anti-affinity", "pinning", "hugepages", "vcpu", "memory")
UTIL_SCALE = 10_000  # utilisation in the peak stage, in 1/10,000
SPREAD_SCALE = 1_000  # and in the spread stage, in 1/1,000: coarser, so its optimum is proven sooner


@dataclass(frozen=True)
class Option:
    """One host a VM could go to: for each guest part the cells that alone hold it, and whether a
    NUMA-remote spread over the host's cells is modelled."""

    host: str
    local: tuple[tuple[int, ...], ...]  # per guest part; empty tuple = no local fit on this host
    remote: bool


@dataclass
class Problem:
    """What the exact stage is asked: the VMs to place, onto which hosts, from which start."""

    vms: list[Vm]
    hosts: dict[str, HostLoad]  # start state: the ledger before this plan charged anything
    targets: dict[str, list[str]]  # VM -> hosts it may go to (the greedy's targets)
    ranks: Mapping[str, int]
    remote: bool  # model NUMA-remote spreads (only when the greedy did not get every VM local)
    # the VMs run on hosts of the model already (a rebalance): a move also lowers its source's load
    internal: bool = False
    needs: dict[str, Demand] = field(default_factory=dict)
    # options per (VM, rules relaxed): a refusal's cores build many models of the same VMs
    known: dict[tuple[str, frozenset[str]], list[Option]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self.needs = {vm.name: demand_of(vm) for vm in self.vms}

    def options(self, vm: Vm, relax: frozenset[str] = frozenset()) -> list[Option]:
        """The hosts ``vm`` can go to alone (with ``relax``: those rules ignored), by the fit rules."""
        key = (vm.name, relax)
        if key not in self.known:
            self.known[key] = self._options(vm, relax)
        return self.known[key]

    def _options(self, vm: Vm, relax: frozenset[str]) -> list[Option]:
        need = self.needs[vm.name]
        out = []
        for name in self.targets[vm.name]:
            host = self.hosts[name]
            miss = host_miss(vm, host)
            if miss is not None and miss.constraint not in relax:
                continue
            local = _local_cells(vm, need, host, relax)
            spread = (self.remote or "numa" in relax) and (not vm.vnuma or "numa" in relax) and \
                len(host.cells) > 1 and _spread_room(need, host, relax)
            if local or spread:
                out.append(Option(name, local, spread))
        return out


def _holds(cell: CellLoad, mib: float, ncpus: int, page_kib: int, relax: frozenset[str]) -> bool:
    if not relax:
        return cell_holds(cell, mib, ncpus, page_kib)
    pool = "hugepages" if page_kib else "memory"
    if pool not in relax and pool_room(cell, page_kib) < pool_draw(mib, page_kib):
        return False
    return ncpus == 0 or "pinning" in relax or free_cpu_count(cell) >= ncpus


def _local_cells(vm: Vm, need: Demand, host: HostLoad, relax: frozenset[str]) -> tuple[tuple[int, ...], ...]:
    parts = len(need.mib)
    if len(host.cells) < parts:
        return ()
    per = tuple(tuple(c.id for c in host.cells if _holds(c, need.mib[g], len(need.cpus[g]), need.page_kib, relax))
                for g in range(parts))
    if any(not cells for cells in per) or len({c for cells in per for c in cells}) < parts:
        return ()
    return per


def _spread_room(need: Demand, host: HostLoad, relax: frozenset[str]) -> bool:
    pool = "hugepages" if need.page_kib else "memory"
    if pool not in relax and sum(pool_room(c, need.page_kib) for c in host.cells) < _spread_draw(need):
        return False
    ncpus = sum(len(g) for g in need.cpus)
    return "pinning" in relax or sum(free_cpu_count(c) for c in host.cells) >= ncpus


def _spread_draw(need: Demand) -> int:
    return pool_draw(need.total_mib, need.page_kib)


def _unit_mib(page_kib: int) -> float:
    """MiB of one unit of a pool (a hugepage, or 1 MiB)."""
    return page_kib / 1024 if page_kib else 1.0


def rank_weights(n: int) -> dict[int, int]:
    """Per target rank, its cost in the rank stage: busy before due before unfocused, lexicographic."""
    big = n + 1
    return {0: 0, 1: 1, 2: big, 3: big + 1, 4: big * big}


class Model:
    """The CP-SAT model of one placement problem (optionally a subset of its VMs, rules relaxed)."""

    def __init__(self, prob: Problem, vms: Sequence[Vm], relax: frozenset[str] = frozenset()) -> None:
        self.prob = prob
        self.vms = list(vms)
        self.m = _cp().CpModel()
        m = self.m
        self.placed: dict[str, cp_model.IntVar] = {}
        self.y: dict[tuple[str, str], cp_model.IntVar] = {}  # VM local on host
        self.x: dict[tuple[str, int, str, int], cp_model.IntVar] = {}  # guest part g on host cell
        self.r: dict[tuple[str, str], cp_model.IntVar] = {}  # VM spread over the host's cells
        self.part: dict[tuple[str, str, int], cp_model.IntVar] = {}  # pool units a spread draws per cell
        self.cpu: dict[tuple[str, str, int], cp_model.IntVar] = {}  # pinned CPUs a spread takes per cell
        self.z: dict[tuple[str, str, int], cp_model.IntVar] = {}  # a spread uses the cell
        self.options: dict[str, list[Option]] = {}
        pool: dict[tuple[str, int, int], list[tuple[int, cp_model.IntVar]]] = {}
        cpus: dict[tuple[str, int], list[tuple[int, cp_model.IntVar]]] = {}
        vcpus: dict[str, list[tuple[int, cp_model.IntVar]]] = {}
        groups: dict[tuple[str, str], list[cp_model.IntVar]] = {}
        spreads: dict[tuple[str, int], list[tuple[int, cp_model.IntVar]]] = {}  # host, page -> unpinned spreads
        self.spread_vars: set[tuple[str, str]] = set()  # (VM, host) spreads split when charged
        self.load: dict[str, list[tuple[int, cp_model.IntVar]]] = {}  # host -> (MiB, var)
        self.cell_load: dict[tuple[str, int], list[tuple[int, cp_model.IntVar]]] = {}
        for i, vm in enumerate(self.vms):
            need = prob.needs[vm.name]
            p = m.new_bool_var(f"p{i}")
            self.placed[vm.name] = p
            opts = prob.options(vm, relax)
            self.options[vm.name] = opts
            on: list[cp_model.IntVar] = []
            for opt in opts:
                host = prob.hosts[opt.host]
                here: list[cp_model.IntVar] = []
                if opt.local:
                    y = m.new_bool_var(f"y{i}_{opt.host}")
                    self.y[vm.name, opt.host] = y
                    here.append(y)
                    used: dict[int, list[cp_model.IntVar]] = {}
                    for g, cells in enumerate(opt.local):
                        xs = []
                        for c in cells:
                            v = m.new_bool_var(f"x{i}_{g}_{opt.host}_{c}")
                            self.x[vm.name, g, opt.host, c] = v
                            xs.append(v)
                            used.setdefault(c, []).append(v)
                            pool.setdefault((opt.host, c, need.page_kib), []).append(
                                (pool_draw(need.mib[g], need.page_kib), v))
                            if need.cpus[g]:
                                cpus.setdefault((opt.host, c), []).append((len(need.cpus[g]), v))
                            self.cell_load.setdefault((opt.host, c), []).append((need.mib[g], v))
                        m.add(sum(xs) == y)
                    for vs in used.values():
                        if len(vs) > 1:
                            m.add(sum(vs) <= 1)  # guest cells onto distinct host cells
                if opt.remote:
                    r = m.new_bool_var(f"r{i}_{opt.host}")
                    self.r[vm.name, opt.host] = r
                    here.append(r)
                    draw = _spread_draw(need)
                    ncpus = sum(len(g) for g in need.cpus)
                    if not ncpus:
                        # memory alone splits in whole units over any cells: it fits exactly when the
                        # host's cells together keep room for it after the local parts (the split is
                        # made when the plan is charged, by fit.py's spread)
                        spreads.setdefault((opt.host, need.page_kib), []).append((draw, r))
                        self.spread_vars.add((vm.name, opt.host))
                    parts, takes = [], []
                    for cell in host.cells if ncpus else ():
                        a = m.new_int_var(0, draw, f"a{i}_{opt.host}_{cell.id}")
                        self.part[vm.name, opt.host, cell.id] = a
                        parts.append(a)
                        pool.setdefault((opt.host, cell.id, need.page_kib), []).append((1, a))
                        self.cell_load.setdefault((opt.host, cell.id), []).append(
                            (max(round(_unit_mib(need.page_kib)), 1), a))
                        if ncpus:  # pinned CPUs only from the cells that hold its memory
                            z = m.new_bool_var(f"z{i}_{opt.host}_{cell.id}")
                            k = m.new_int_var(0, ncpus, f"k{i}_{opt.host}_{cell.id}")
                            self.z[vm.name, opt.host, cell.id] = z
                            self.cpu[vm.name, opt.host, cell.id] = k
                            m.add(a <= draw * z)
                            # a cell it uses holds some of its memory: a cell lending only CPUs
                            # would be listed with 0 MiB, and a strict nodeset over it would let
                            # the kernel put memory there the plan never counted
                            m.add(a >= z)
                            m.add(k <= ncpus * z)
                            m.add(z <= r)
                            takes.append(k)
                            cpus.setdefault((opt.host, cell.id), []).append((1, k))
                    if ncpus:
                        m.add(sum(parts) == draw * r)
                        m.add(sum(takes) == ncpus * r)
                for v in here:
                    on.append(v)
                    vcpus.setdefault(opt.host, []).append((vm.vcpus, v))
                    self.load.setdefault(opt.host, []).append((vm.memory_mib, v))
                    if vm.anti_affinity:
                        groups.setdefault((vm.anti_affinity, opt.host), []).append(v)
            m.add(sum(on) == p)
            if prob.internal and vm.host in prob.hosts:
                # leaving lowers its host (and each cell in proportion to what it uses, as the ledger's
                # unload does); nothing it frees is planned onto, so moves stay independent
                src = prob.hosts[vm.host]
                self.load.setdefault(vm.host, []).append((-vm.memory_mib, p))
                src_used = sum(sc.used_mib for sc in src.cells)
                for sc in src.cells:
                    share = round(min(sc.used_mib, vm.memory_mib * sc.used_mib / src_used)) if src_used > 0 else 0
                    if share:
                        self.cell_load.setdefault((vm.host, sc.id), []).append((-share, p))
        hosts = prob.hosts
        for (h, page), terms in spreads.items():
            if ("hugepages" if page else "memory") not in relax:
                local = [t for (ph, _, pp), ts in pool.items() if ph == h and pp == page for t in ts]
                m.add(sum(a * v for a, v in (*local, *terms)) <= sum(pool_room(c, page) for c in hosts[h].cells))
        for (h, c, page), terms in pool.items():
            kind = "hugepages" if page else "memory"
            if kind not in relax:
                m.add(sum(a * v for a, v in terms) <= pool_room(hosts[h].cell(c), page))
        if "pinning" not in relax:
            for (h, c), terms in cpus.items():
                m.add(sum(a * v for a, v in terms) <= free_cpu_count(hosts[h].cell(c)))
        if "vcpu" not in relax:
            for h, terms in vcpus.items():
                m.add(sum(a * v for a, v in terms) <= vcpu_room(hosts[h]))
        if "anti-affinity" not in relax:
            for vs in groups.values():
                if len(vs) > 1:
                    m.add(sum(vs) <= 1)

    # --- the objective's stages -------------------------------------------------------------------

    def n_placed(self) -> cp_model.LinearExpr:
        return sum(self.placed.values())  # type: ignore[return-value]

    def n_local(self) -> cp_model.LinearExpr:
        return sum(self.y.values())  # type: ignore[return-value]

    def rank_cost(self) -> cp_model.LinearExpr:
        w = rank_weights(len(self.vms))
        ranks = self.prob.ranks
        terms = [w[min(ranks.get(h, 0), 4)] * v for (_, h), v in (*self.y.items(), *self.r.items())
                 if ranks.get(h, 0)]
        return sum(terms)  # type: ignore[return-value]

    def peak(self) -> cp_model.IntVar:
        """The highest utilisation (in 1/UTIL_SCALE) among the hosts this plan may fill."""
        top = self.m.new_int_var(0, 2 * UTIL_SCALE, "peak")
        for name, host in sorted(self.prob.hosts.items()):
            terms = self.load.get(name, [])
            if host.memory_mib:
                used = round(host.used_mib)
                self.m.add(UTIL_SCALE * used + sum(UTIL_SCALE * a * v for a, v in terms)
                           <= top * host.memory_mib)
        return top

    def spread(self) -> cp_model.LinearExpr:
        """How far the hosts this plan may fill, and their cells, sit above their mean utilisation
        (in 1/SPREAD_SCALE, weighted as objective.py weighs hosts and cells; see :func:`spread_of`).

        Linear, so CP-SAT proves its optimum where a sum of squares would run out of budget; the
        peak stage before it already holds the fullest host down."""
        every = list(self.prob.hosts.values())
        moved = 0 if self.prob.internal else sum(vm.memory_mib for vm in self.vms)
        memory = sum(h.memory_mib for h in every)
        if not memory:
            return 0  # type: ignore[return-value]
        # the mean over every host of the problem, as spread_of takes it; hosts nothing reaches are
        # constants and left out
        mean = SPREAD_SCALE * (sum(round(h.used_mib) for h in every) + moved) // memory
        hosts = [self.prob.hosts[n] for n in sorted(self.load)]
        terms = []

        def above(used: float, size: int, load: list[tuple[int, cp_model.IntVar]], weight: float, name: str) -> None:
            if not size or weight <= 0:
                return
            u = self.m.new_int_var(0, 2 * SPREAD_SCALE, f"u_{name}")
            self.m.add(u * size >= SPREAD_SCALE * round(used) + sum(SPREAD_SCALE * a * v for a, v in load))
            e = self.m.new_int_var(0, 2 * SPREAD_SCALE, f"e_{name}")
            self.m.add(e >= u - mean)
            terms.append(max(round(100 * weight), 1) * e)

        for host in hosts:
            above(host.used_mib, host.memory_mib, self.load[host.name], host.weight, host.name)
            for c in host.cells:
                load = self.cell_load.get((host.name, c.id), [])
                above(c.used_mib, c.memory_mib, load, host.weight * CELL_WEIGHT * c.memory_mib / host.memory_mib,
                      f"{host.name}_{c.id}")
        return sum(terms)  # type: ignore[return-value]

    def level(self, within: float) -> None:
        """Every host's utilisation within ``within`` of the hosts' mean (a rebalance's target)."""
        every = [h for h in self.prob.hosts.values() if h.memory_mib]
        memory = sum(h.memory_mib for h in every)
        if not memory:
            return
        used = sum(round(h.used_mib) for h in every)
        for host in every:
            load = round(host.used_mib) + sum(a * v for a, v in self.load.get(host.name, []))
            # |load/mem - used/memory| <= within, multiplied out to integers (within in 1/UTIL_SCALE)
            w = round(within * UTIL_SCALE)
            self.m.add(UTIL_SCALE * memory * load <= (UTIL_SCALE * used + w * memory) * host.memory_mib)
            self.m.add(UTIL_SCALE * memory * load >= (UTIL_SCALE * used - w * memory) * host.memory_mib)

    # --- hints and solutions -----------------------------------------------------------------------

    def hint(self, fits: Mapping[str, Fit]) -> None:
        """Hint a placement (the greedy's, or the previous stage's) to CP-SAT."""
        self.m.clear_hints()
        for vm in self.vms:
            fit = fits.get(vm.name)
            self.m.add_hint(self.placed[vm.name], fit is not None)
            for opt in self.options[vm.name]:
                y = self.y.get((vm.name, opt.host))
                r = self.r.get((vm.name, opt.host))
                here = fit is not None and fit.host == opt.host
                if y is not None:
                    local = here and fit is not None and fit.numa_local
                    self.m.add_hint(y, local)
                    for g, cells in enumerate(opt.local):
                        for c in cells:
                            self.m.add_hint(self.x[vm.name, g, opt.host, c],
                                            local and fit is not None and fit.cells[g] == c)
                if r is not None:
                    spread = here and fit is not None and not fit.numa_local
                    self.m.add_hint(r, spread)
                    page = self.prob.needs[vm.name].page_kib
                    host = self.prob.hosts[opt.host]
                    for cell in host.cells if (vm.name, opt.host) not in self.spread_vars else ():
                        mib = dict(zip(fit.cells, fit.cell_mib, strict=True)).get(cell.id, 0.0) \
                            if spread and fit is not None else 0.0
                        taken = sum(1 for cpu in fit.cpu_map.values() if cpu in cell.cpus) \
                            if spread and fit is not None else 0
                        self.m.add_hint(self.part[vm.name, opt.host, cell.id], pool_draw(mib, page) if mib else 0)
                        if (vm.name, opt.host, cell.id) in self.z:
                            self.m.add_hint(self.z[vm.name, opt.host, cell.id], mib > 0)
                            self.m.add_hint(self.cpu[vm.name, opt.host, cell.id], taken)

    def solution(self, solver: cp_model.CpSolver) -> dict[str, Choice]:
        """The placement the solver found: VM -> host, cells, memory per cell, CPUs per cell."""
        out: dict[str, Choice] = {}
        for vm in self.vms:
            if not solver.value(self.placed[vm.name]):
                continue
            need = self.prob.needs[vm.name]
            for opt in self.options[vm.name]:
                y = self.y.get((vm.name, opt.host))
                if y is not None and solver.value(y):
                    cells = tuple(next(c for c in opt.local[g] if solver.value(self.x[vm.name, g, opt.host, c]))
                                  for g in range(len(opt.local)))
                    out[vm.name] = Choice(opt.host, cells, tuple(float(m) for m in need.mib),
                                          tuple(len(g) for g in need.cpus), True)
                    break
                r = self.r.get((vm.name, opt.host))
                if r is not None and solver.value(r) and (vm.name, opt.host) in self.spread_vars:
                    out[vm.name] = Choice(opt.host, (), (), (), False)  # split when charged
                    break
                if r is not None and solver.value(r):
                    host = self.prob.hosts[opt.host]

                    def took(c: CellLoad, name: str = vm.name, host_name: str = opt.host) -> int:
                        k = self.cpu.get((name, host_name, c.id))
                        return solver.value(k) if k is not None else 0

                    used = [c for c in host.cells if solver.value(self.part[vm.name, opt.host, c.id]) or took(c)]
                    unit = _unit_mib(need.page_kib)
                    mib = [solver.value(self.part[vm.name, opt.host, c.id]) * unit for c in used]
                    if len(used) == 1 and not vm.vnuma:
                        # a "spread" that landed wholly in one cell is a single-cell fit: the cell holds
                        # all of it (to_fit checks that again), so the plan calls it NUMA-local
                        out[vm.name] = Choice(opt.host, (used[0].id,), tuple(float(m) for m in need.mib),
                                              tuple(len(g) for g in need.cpus), True)
                        break
                    out[vm.name] = Choice(opt.host, tuple(c.id for c in used), tuple(mib),
                                          tuple(took(c) for c in used), False)
                    break
        return out


@dataclass(frozen=True)
class Choice:
    """Where the exact stage put one VM (before CPUs are mapped: see :func:`to_fit`). An unpinned
    NUMA-remote spread names no cells: it is split when charged, after the local placements."""

    host: str
    cells: tuple[int, ...]
    cell_mib: tuple[float, ...]
    cell_cpus: tuple[int, ...]  # pinned CPUs taken from each cell
    numa_local: bool


def to_fit(vm: Vm, need: Demand, host: HostLoad, choice: Choice) -> Fit | None:
    """The exact stage's choice as a Fit on ``host`` as it is charged now, checked again by the fit
    rules (None if it breaks one: the model and the rules disagree, and the greedy plan stands)."""
    if host_miss(vm, host) is not None:
        return None
    if not choice.numa_local and not choice.cells:  # an unpinned spread: split now, as the greedy would
        got = fit_host(vm, host, allow_remote=True, need=need)
        return got if isinstance(got, Fit) else None
    cpu_map: dict[int, int] = {}
    if choice.numa_local:
        for g, cid in enumerate(choice.cells):
            cell = host.cell(cid)
            if not cell_holds(cell, need.mib[g], len(need.cpus[g]), need.page_kib):
                return None
            cpu_map.update(zip(need.cpus[g], cell.free_cpus(), strict=False))
    else:
        source = [cpu for g in need.cpus for cpu in g]
        at = 0
        for cid, mib, ncpus in zip(choice.cells, choice.cell_mib, choice.cell_cpus, strict=True):
            cell = host.cell(cid)
            if pool_room(cell, need.page_kib) < pool_draw(mib, need.page_kib) or free_cpu_count(cell) < ncpus:
                return None
            cpu_map.update(zip(source[at:at + ncpus], cell.free_cpus(), strict=False))
            at += ncpus
        drawn = sum(pool_draw(m, need.page_kib) for m in choice.cell_mib)
        if at != len(source) or drawn < _spread_draw(need):
            return None
    if len(cpu_map) != sum(len(g) for g in need.cpus):
        return None
    return Fit(host.name, choice.cells, choice.cell_mib, choice.numa_local, cpu_map)


def spread_of(hosts: Sequence[HostLoad]) -> float:
    """The spread stage's measure on charged hosts, in floats: Σ weight × (utilisation above the
    hosts' mean) over hosts and, at objective.py's cell weight, their cells."""
    memory = sum(h.memory_mib for h in hosts)
    if not memory:
        return 0.0
    mean = sum(h.used_mib for h in hosts) / memory
    total = 0.0
    for h in hosts:
        if not h.memory_mib:
            continue
        total += h.weight * max(h.util - mean, 0.0)
        for c in h.cells:
            if c.memory_mib:
                total += h.weight * CELL_WEIGHT * c.memory_mib / h.memory_mib * max(c.util - mean, 0.0)
    return total


# --- solving ---------------------------------------------------------------------------------------


@dataclass
class Budget:
    """Deterministic seconds of CP-SAT work left for this plan."""

    left: float

    def solver(self, share: float = 1.0) -> cp_model.CpSolver:
        """A solver that may spend ``share`` of what is left: one worker, a fixed seed, no wall clock."""
        solver = _cp().CpSolver()
        p = solver.parameters
        p.num_workers = WORKERS
        p.random_seed = SEED
        p.max_deterministic_time = max(self.left * share, 0.0)
        # CP-SAT's own Ctrl-C handling leaves SIGINT at the OS default after each solve (Python still
        # shows its handler): a Ctrl-C after any plan then killed the process outright, mid-drain, with
        # no handler, no finally and no stand-down. The budget bounds a solve; Ctrl-C is the caller's.
        p.catch_sigint_signal = False
        return solver

    def spend(self, solver: cp_model.CpSolver) -> None:
        self.left -= solver.deterministic_time


@dataclass
class Outcome:
    """What the staged solve found: the placement, how far it is proven, and what it did."""

    choices: dict[str, Choice] | None  # None: no solution (keep the greedy's)
    proof: PlanProof
    note: str
    stages: list[str] = field(default_factory=list)  # stage: optimal | best found | kept


Stage = tuple[str, Callable[[], Any], bool, "int | None"]  # name, objective, maximise, known optimum


def _run_stages(model: Model, stages: Sequence[Stage], budget: Budget, greedy: Mapping[str, Fit],
                refusal: int | None = None) -> tuple[Outcome, Any]:
    """Solve ``stages`` in order, each optimum fixed for the next (a known optimum is fixed without a
    solve). Stops at the first stage that is not proven optimal. With ``refusal``, a first stage
    whose optimum is below it is a refusal: the second stage (NUMA-local) is still solved, since the
    plan says which VMs fit and how, and then the solve ends (peak and spread would only polish a
    plan that cannot run). Returns the outcome and the first stage's status (None if it was known)."""
    cp_model = _cp()
    model.hint(greedy)
    choices: dict[str, Choice] | None = None
    proven = True
    notes: list[str] = []
    first: Any = None
    refused: PlanProof | None = None
    for k, (name, make, up, known) in enumerate(stages):
        expr = make()
        if known is not None:
            model.m.add(expr == known)
            notes.append(f"{name}: {known} (the greedy's, the best possible)")
            continue
        if budget.left <= 0:
            proven = False
            notes.append(f"{name}: not searched (budget spent)")
            break
        if up:
            model.m.maximize(expr)
        else:
            model.m.minimize(expr)
        # a stage leaves part of the budget to the next (or, for a refusal, to its cores)
        solver = budget.solver(share=1.0 if k == len(stages) - 1 else STAGE_SHARE)
        status = solver.solve(model.m)
        budget.spend(solver)
        if k == 0:
            first = status
        if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            proven = False
            notes.append(f"{name}: impossible (proven)" if status == cp_model.INFEASIBLE
                         else f"{name}: nothing found within the budget")
            break
        value = round(solver.objective_value)
        choices = model.solution(solver)
        # the placed stage does not care for locality: from its spreads the NUMA-local stage may
        # not get far within its budget, so on a refusal it starts from them made local where it can
        model.hint(_localised(model.prob, choices) if refusal is not None and k == 0 else
                   {v: _as_fit(c) for v, c in choices.items()})
        if status == cp_model.OPTIMAL:
            model.m.add(expr == value)
            notes.append(f"{name}: {value} (optimal)")
        else:
            proven = False
            model.m.add(expr >= value if up else expr <= value)
            notes.append(f"{name}: {value} (best found; budget spent)")
        if k == 0 and refusal is not None and value < refusal:
            refused = PlanProof.INFEASIBLE if status == cp_model.OPTIMAL else PlanProof.FEASIBLE
        if refused is not None and k == 1:
            break  # a refusal: the plan cannot run, so peak and spread would only polish it
        if not proven and refused is None:
            break
    if refused is not None:
        # the proof is the placed stage's: a NUMA-local stage cut short does not weaken it
        return Outcome(choices, refused, "; ".join(notes)), first
    model.m.clear_objective()
    return Outcome(choices, PlanProof.OPTIMAL if proven else PlanProof.FEASIBLE, "; ".join(notes)), first


def solve(prob: Problem, greedy: Mapping[str, Fit], budget: Budget) -> Outcome:
    """Solve the evacuation's lexicographic objective stage by stage within ``budget``, hinted by
    ``greedy``: VMs placed, NUMA-local, target rank, peak utilisation, spread."""
    n = len(prob.vms)
    notes = ""
    if len(greedy) < n and prob.remote:
        # A refusal: first look for every VM placed NUMA-local, on the smaller model without spreads.
        # Found, it is the optimum of the first two stages at once (n placed, n local).
        local = dataclasses.replace(prob, remote=False)
        found = _place_all(local, greedy, budget)
        if found is not None:
            prob, greedy = local, {v: _as_fit(c) for v, c in found.items()}
            notes = "every VM placed NUMA-local (found without spreads); "
    g_local = sum(1 for f in greedy.values() if f.numa_local)
    w = rank_weights(n)
    g_rank = sum(w[min(prob.ranks.get(f.host, 0), 4)] for f in greedy.values())
    # The greedy at every stage's optimum already (placed and local by count, no ranked target, peak
    # and spread at their lower bounds): proven without building the model or calling the solver.
    at_bound = len(greedy) == n and g_local == n and g_rank == 0 and not prob.internal and not notes
    peak = _peak_at_bound(prob, greedy) if at_bound else None
    if peak is not None and _spread_at_bound(prob, greedy):
        return Outcome(None, PlanProof.OPTIMAL,
                       f"placed: {n}, NUMA-local: {n}, target rank: 0, peak utilisation: {peak}, spread: the "
                       f"greedy's, each at a lower bound no placement can go below (proven without a search)")
    model = Model(prob, prob.vms)
    stages: list[Stage] = [
        ("placed", model.n_placed, True, n if len(greedy) == n else None),
        ("NUMA-local", model.n_local, True, n if g_local == n else None),
        ("target rank", model.rank_cost, False, 0 if g_rank == 0 else None),
        # a peak at its bound is still solved when the spread is not: fixing it changes which of the
        # spread's equal optima CP-SAT returns, and so (by the balance tie-break) the plan
        ("peak utilisation", model.peak, False, None),
        ("spread", model.spread, False, None),
    ]
    out = _run_stages(model, stages, budget, greedy, refusal=n)[0]
    return Outcome(out.choices, out.proof, notes + out.note) if notes else out


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _greedy_loads(prob: Problem, greedy: Mapping[str, Fit]) -> tuple[dict[str, int], dict[tuple[str, int], int]]:
    """What the greedy (every VM placed NUMA-local) adds to each host and cell, as the model charges it."""
    hosts: dict[str, int] = {}
    cells: dict[tuple[str, int], int] = {}
    for vm in prob.vms:
        fit = greedy[vm.name]
        hosts[fit.host] = hosts.get(fit.host, 0) + vm.memory_mib
        for g, cid in enumerate(fit.cells):
            key = (fit.host, cid)
            cells[key] = cells.get(key, 0) + prob.needs[vm.name].mib[g]
    return hosts, cells


def _peak_at_bound(prob: Problem, greedy: Mapping[str, Fit]) -> int | None:
    """The greedy's peak utilisation in the peak stage's units when no placement of every VM can be
    lower, else None. Two lower bounds: the fullest host before the plan (a placement only adds),
    and the hosts' mean after it (the highest is at least the memory-weighted mean; every VM's
    memory lands on one of these hosts)."""
    loads, _ = _greedy_loads(prob, greedy)
    sized = [(name, h) for name, h in sorted(prob.hosts.items()) if h.memory_mib]
    if not sized:
        return None
    got = max(_ceil_div(UTIL_SCALE * (round(h.used_mib) + loads.get(name, 0)), h.memory_mib) for name, h in sized)
    before = max(_ceil_div(UTIL_SCALE * round(h.used_mib), h.memory_mib) for _, h in sized)
    mean = _ceil_div(UTIL_SCALE * (sum(round(h.used_mib) for _, h in sized) + sum(vm.memory_mib for vm in prob.vms)),
                     sum(h.memory_mib for _, h in sized))
    return got if got == max(before, mean) and got <= 2 * UTIL_SCALE else None


def _spread_at_bound(prob: Problem, greedy: Mapping[str, Fit]) -> bool:
    """Whether the greedy's spread (Model.spread, every VM placed NUMA-local) is the least any
    placement has: each term is a host's or cell's excess over the mean, which a placement can only
    raise (it adds load), so the greedy is optimal when no host or cell it loads rises above the
    mean by more than it already was (in the stage's integer units)."""
    every = list(prob.hosts.values())
    memory = sum(h.memory_mib for h in every)
    if not memory:
        return True
    loads, cell_loads = _greedy_loads(prob, greedy)
    mean = SPREAD_SCALE * (sum(round(h.used_mib) for h in every) + sum(vm.memory_mib for vm in prob.vms)) // memory

    def excess(used: float, size: int, load: int) -> int:
        u = _ceil_div(SPREAD_SCALE * (round(used) + load), size)
        return max(u - mean, 0) if u <= 2 * SPREAD_SCALE else -1  # -1: beyond the model's range

    def unchanged(used: float, size: int, weight: float, load: int) -> bool:
        if not size or weight <= 0:
            return True  # the model has no term for it
        now = excess(used, size, 0)
        return now >= 0 and excess(used, size, load) == now

    for name, load in loads.items():
        host = prob.hosts[name]
        if not unchanged(host.used_mib, host.memory_mib, host.weight, load):
            return False
    for (name, cid), load in cell_loads.items():
        host = prob.hosts[name]
        c = host.cell(cid)
        weight = host.weight * CELL_WEIGHT * c.memory_mib / host.memory_mib if host.memory_mib else 0.0
        if not unchanged(c.used_mib, c.memory_mib, weight, load):
            return False
    return True


def _place_all(prob: Problem, hint: Mapping[str, Fit], budget: Budget) -> dict[str, Choice] | None:
    """A placement of every VM of ``prob`` found within part of ``budget``, or None."""
    cp_model = _cp()
    model = Model(prob, prob.vms)
    for p in model.placed.values():
        model.m.add(p == 1)
    model.hint(hint)
    solver = budget.solver(share=STAGE_SHARE / 2)
    status = solver.solve(model.m)
    budget.spend(solver)
    return model.solution(solver) if status in (cp_model.OPTIMAL, cp_model.FEASIBLE) else None


def solve_rebalance(prob: Problem, greedy: Mapping[str, Fit], cap: int, within: float | None,
                    budget: Budget) -> Outcome:
    """A rebalance's moves (``prob.vms`` may each move once, to a host of ``prob.targets``).

    With ``within``: the fewest moves that bring every host within that many points of the mean,
    then the lowest peak and spread; when no ``cap`` moves reach it (proven), or without ``within``:
    the lowest peak, then spread, then the fewest moves, within ``cap``."""
    cp_model = _cp()
    notes = []
    if within is not None:
        model = Model(prob, prob.vms)
        model.m.add(model.n_placed() <= cap)
        model.level(within)
        out, first = _run_stages(model, [("moves to level", model.n_placed, False, None),
                                         ("peak utilisation", model.peak, False, None),
                                         ("spread", model.spread, False, None)], budget, greedy)
        if first != cp_model.INFEASIBLE:
            return out
        notes.append(f"no {cap} moves bring every host within {within:.0%} of the mean (proven)")
    model = Model(prob, prob.vms)
    model.m.add(model.n_placed() <= cap)
    out, _ = _run_stages(model, [("peak utilisation", model.peak, False, None),
                                 ("spread", model.spread, False, None),
                                 ("moves", model.n_placed, False, None)], budget, greedy)
    return Outcome(out.choices, out.proof, "; ".join([*notes, out.note]))


def _localised(prob: Problem, choices: Mapping[str, Choice]) -> dict[str, Fit]:
    """``choices`` as a hint, each NUMA-remote spread made single-cell where its host still has a
    cell that holds it with the others charged (what adopting the placement would do anyway)."""
    ledger = Ledger(copy.deepcopy(prob.hosts))
    out: dict[str, Fit] = {}
    for vm in sorted(prob.vms, key=lambda v: bool(choices.get(v.name) and not choices[v.name].numa_local)):
        pick = choices.get(vm.name)
        if pick is None:
            continue
        host = ledger.hosts[pick.host]
        need = prob.needs[vm.name]
        local = fit_host(vm, host, need=need) if not pick.numa_local else None
        fit = local if isinstance(local, Fit) else to_fit(vm, need, host, pick)
        if fit is None:  # the model and the rules disagree: hint the placement as it is
            return {v: _as_fit(c) for v, c in choices.items()}
        ledger.apply(vm, fit)
        out[vm.name] = fit
    return out


def _as_fit(c: Choice) -> Fit:
    """A choice as a hint (CPU maps do not matter to the model)."""
    return Fit(c.host, c.cells, c.cell_mib, c.numa_local, {i: i for i in range(sum(c.cell_cpus))}
               if not c.numa_local else {})


# --- refusal cores ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Core:
    """VMs that cannot all be placed together, and the rules any one of which, relaxed, would let them."""

    vms: tuple[str, ...]
    minimal: bool  # every member was shown necessary (removing it makes the rest placeable)
    causes: tuple[str, ...]  # from RULES; empty and ``tested``: no single rule, only several together
    tested: bool = True  # every rule that can matter was tried (False: the budget ran out first)


def _all_fit(prob: Problem, vms: Sequence[Vm], budget: Budget, relax: frozenset[str] = frozenset(),
             share: float = 1.0, cap: float | None = None) -> bool | None:
    """Can every one of ``vms`` be placed at once? None when the budget (``share`` of what is left,
    at most ``cap`` deterministic seconds) ran out first. A counting proof (:func:`counting_core`)
    answers no without a search."""
    cp_model = _cp()
    if not vms:
        return True
    if counting_core(prob, vms, None, relax) is not None:
        return False
    model = Model(prob, vms, relax)
    for p in model.placed.values():
        model.m.add(p == 1)
    solver = budget.solver(share)
    if cap is not None:
        solver.parameters.max_deterministic_time = min(solver.parameters.max_deterministic_time, cap)
    status = solver.solve(model.m)
    budget.spend(solver)
    if status == cp_model.INFEASIBLE:
        return False
    if status in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return True
    return None


@dataclass(frozen=True)
class _Reach:
    """Where one VM could go alone (by the fit rules, some relaxed), and what it draws there."""

    cells: frozenset[tuple[str, int]]  # host cells its memory (and pinned CPUs) may land in
    hosts: frozenset[str]
    draw: int  # units of its pool (whole MiB, or pages of its size), the least any option draws
    pins: int
    vcpus: int


def _reach(prob: Problem, vm: Vm, relax: frozenset[str]) -> _Reach:
    need = prob.needs[vm.name]
    cells: set[tuple[str, int]] = set()
    spread = False
    for opt in prob.options(vm, relax):
        if opt.remote:
            spread = True
            cells.update((opt.host, c.id) for c in prob.hosts[opt.host].cells)
        else:
            cells.update((opt.host, c) for part in opt.local for c in part)
    draw = _spread_draw(need) if spread else sum(pool_draw(m, need.page_kib) for m in need.mib)
    return _Reach(frozenset(cells), frozenset(h for h, _ in cells), draw, sum(len(g) for g in need.cpus),
                  vm.vcpus)


def counting_core(prob: Problem, vms: Sequence[Vm], keep: Vm | None,
                  relax: frozenset[str] = frozenset()) -> list[Vm] | None:
    """VMs of ``vms`` (``keep`` among them, if given) that a count proves cannot all be placed, or None.

    The proof, no search: take a region (the cells or hosts one VM could go to alone, or all of
    them) and the VMs that can go nowhere else; if they need more of one thing than the region has
    together (memory or hugepages of one size, pinned CPUs, vCPUs, hosts free of their anti-affinity
    group), they cannot all be placed. The set named is the fewest of them that still need too much
    (the largest first), the smallest such set over the regions tried. A cell's room is what it has
    before any of them, so a region's room only over-counts: the count never calls a placeable set
    impossible. This is how a large capacity refusal gets a small core at once, where a search for
    one costs more than the budget has."""
    reach = {v.name: _reach(prob, v, relax) for v in vms}
    if keep is not None and not reach[keep.name].hosts:
        return [keep]
    if keep is None:
        alone = next((v for v in vms if not reach[v.name].hosts), None)
        if alone is not None:
            return [alone]
    best: list[Vm] | None = None

    def consider(members: list[Vm], demand: Callable[[Vm], int], room: int) -> None:
        nonlocal best
        if sum(demand(v) for v in members) <= room:
            return
        first = [keep] if keep is not None and keep in members and demand(keep) > 0 else []
        if keep is not None and not first:
            return
        core, total = list(first), sum(demand(v) for v in first)
        for v in sorted((v for v in members if v not in first and demand(v) > 0),
                        key=lambda v: (-demand(v), v.name)):
            if total > room:
                break
            core.append(v)
            total += demand(v)
        if best is None or len(core) < len(best):
            best = core

    every_cell = frozenset(k for r in reach.values() for k in r.cells)
    regions = sorted({r.cells for r in reach.values()} | {every_cell}, key=lambda c: (len(c), sorted(c)))
    for region in regions:
        inside = [v for v in vms if reach[v.name].cells <= region]
        for page in sorted({prob.needs[v.name].page_kib for v in inside}):
            if ("hugepages" if page else "memory") in relax:
                continue
            room = sum(pool_room(prob.hosts[h].cell(c), page) for h, c in region)
            consider([v for v in inside if prob.needs[v.name].page_kib == page],
                     lambda v: reach[v.name].draw, room)
        if "pinning" not in relax:
            consider(inside, lambda v: reach[v.name].pins,
                     sum(free_cpu_count(prob.hosts[h].cell(c)) for h, c in region))
    every_host = frozenset(h for r in reach.values() for h in r.hosts)
    for hosts in sorted({r.hosts for r in reach.values()} | {every_host}, key=lambda h: (len(h), sorted(h))):
        inside = [v for v in vms if reach[v.name].hosts <= hosts]
        if "vcpu" not in relax:
            consider(inside, lambda v: reach[v.name].vcpus, sum(vcpu_room(prob.hosts[h]) for h in hosts))
        if "anti-affinity" not in relax:
            for group in sorted({v.anti_affinity for v in inside if v.anti_affinity}):
                consider([v for v in inside if v.anti_affinity == group], lambda v: 1, len(hosts))
    return best


def refusal_core(prob: Problem, placed: Mapping[str, str], left_out: Vm, budget: Budget) -> Core | None:
    """A set of VMs, ``left_out`` among them, that cannot all be placed together.

    The optimum placed ``placed`` (VM -> host): with ``left_out`` they are one too many, so some
    subset holding ``left_out`` is infeasible. Tried in turn, cheapest first: ``left_out`` alone;
    a count over the VMs placed and it (:func:`counting_core`: a capacity refusal's set at once, at
    any size); with the VMs the optimum put on the hosts it could go to (narrowed by CP-SAT's
    sufficient assumptions); with all of them. The first shown infeasible is shrunk by deletion
    (halves, then quarters, ... then one VM at a time) to a minimal set: each check is a count
    first, then a search of at most ``CHECK_BUDGET`` (a check it leaves open keeps the VM, and the
    set is then not called minimal). None if no infeasible set was shown within the budget.

    On all the VMs, deletion solves "place all of these" with presolve on, which proves a packing
    impossible far sooner than assumptions (which turn most of presolve off) on these models.
    """
    by_name = {v.name: v for v in prob.vms}
    alone = _all_fit(prob, [left_out], budget)  # cheap, and the commonest core: it fits nowhere
    if alone is False:
        return Core((left_out.name,), True, *_causes([left_out], prob, budget))
    if alone is None:
        return None
    everyone = [by_name[n] for n in sorted(placed)]
    # A count (no search): a large capacity refusal's core at once. The set must still fit without
    # ``left_out``: then so does every part of it, every set the shrink keeps needs ``left_out``, and
    # it ends at a minimal one. Over every VM first (other VMs left out make the smallest sets),
    # else over the VMs the optimum placed (which fit together).
    start = counting_core(prob, prob.vms, left_out)
    if start is not None and len(start) > 1 and budget.left > 0 and _all_fit(
            prob, [v for v in start if v is not left_out], budget, share=STAGE_SHARE, cap=CHECK_BUDGET) is not True:
        start = None
    if start is None or len(start) == 1:
        start = counting_core(prob, [*everyone, left_out], left_out)
    if start is None:
        near = {o.host for o in prob.options(left_out)}
        rivals = [by_name[n] for n, h in sorted(placed.items()) if h in near]
        # the few VMs on its hosts: CP-SAT's sufficient assumptions name a subset at once
        start = _assumed_core(prob, [*rivals, left_out], left_out, budget) if budget.left > 0 else None
        if start is None and budget.left > 0 and \
                _all_fit(prob, [*everyone, left_out], budget, share=STAGE_SHARE) is False:
            start = [*everyone, left_out]
    if start is None:
        return None
    core, minimal = _shrink(prob, start, left_out, budget)
    return Core(tuple(sorted(v.name for v in core)), minimal, *_causes(core, prob, budget))


def _assumed_core(prob: Problem, members: Sequence[Vm], keep: Vm, budget: Budget) -> list[Vm] | None:
    """If ``members`` cannot all be placed: the subset CP-SAT's sufficient assumptions name (with
    ``keep``). For a few VMs; on many, assumptions (which turn most of presolve off) are slow."""
    cp_model = _cp()
    model = Model(prob, members)
    model.m.add_assumptions([model.placed[v.name] for v in members])
    solver = budget.solver(share=STAGE_SHARE)
    status = solver.solve(model.m)
    budget.spend(solver)
    if status != cp_model.INFEASIBLE:
        return None
    index = {model.placed[v.name].index: v for v in members}
    core = [index[i] for i in solver.sufficient_assumptions_for_infeasibility() if i in index]
    return core if keep in core else [*core, keep]


def _shrink(prob: Problem, members: Sequence[Vm], keep: Vm, budget: Budget) -> tuple[list[Vm], bool]:
    """Drop from ``members`` (infeasible together) every VM not needed for that, ``keep`` excepted:
    chunks first, halving down to single VMs. Minimal when every single-VM test concluded."""
    core = sorted((v for v in members if v is not keep), key=lambda v: (v.memory_mib, v.vcpus, v.name)) + [keep]
    minimal = True
    chunk = max((len(core) - 1) // 2, 1)
    while True:
        i = 0
        while i < len(core) - 1:  # ``keep`` is last and stays
            cut = core[i:min(i + chunk, len(core) - 1)]
            rest = core[:i] + core[i + len(cut):]
            fits: bool | None = None
            if counting_core(prob, rest, None) is not None:
                fits = False  # counted: no budget needed
            elif budget.left > 0:
                fits = _all_fit(prob, rest, budget, share=STAGE_SHARE, cap=CHECK_BUDGET)
            if fits is False:
                core = rest  # still infeasible without them: not needed
                continue
            if fits is None and chunk == 1:
                minimal = False
            i += len(cut)
        if chunk == 1:
            return core, minimal
        chunk = max(chunk // 2, 1)


def _causes(core: Sequence[Vm], prob: Problem, budget: Budget) -> tuple[tuple[str, ...], bool]:
    """The rules any one of which, relaxed alone, lets every VM of ``core`` be placed, and whether
    every rule that can matter was tried."""
    causes = []
    tested = True
    for rule in _rules_for(core, prob):
        fits = _all_fit(prob, core, budget, frozenset({rule}), share=STAGE_SHARE) if budget.left > 0 else None
        if fits is True:
            causes.append(rule)
        elif fits is None:
            tested = False
    return tuple(causes), tested


def _rules_for(vms: Sequence[Vm], prob: Problem) -> list[str]:
    """The rules that can matter to ``vms`` (relaxing the others cannot change anything), the most
    specific first: that is the one a blocker names when several would each be enough."""
    rules = []
    if any(v.vnuma for v in vms) or not prob.remote:
        rules.append("numa")
    if any(v.anti_affinity for v in vms):
        rules.append("anti-affinity")
    if any(v.pinned for v in vms):
        rules.append("pinning")
    if any(v.hugepage_kib for v in vms):
        rules.append("hugepages")
    rules.append("vcpu")
    if any(not v.hugepage_kib for v in vms):
        rules.append("memory")
    return rules


def weakest(proofs: Iterable[PlanProof]) -> PlanProof:
    """The proof of a plan made of several (a window's steps): a proven refusal, else the least sure."""
    got = set(proofs)
    for p in (PlanProof.INFEASIBLE, PlanProof.GREEDY_ONLY, PlanProof.FEASIBLE, PlanProof.OPTIMAL):
        if p in got:
            return p
    return PlanProof.GREEDY_ONLY
