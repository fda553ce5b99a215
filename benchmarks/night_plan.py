"""A planned window for the night's clusters, checked in the simulator, against the tightest valid bound.

Not a test: prints a table (markdown). The flows run a rolling window: hosts enter as maintenance
slots free up, and each drain places its VMs when it begins. The slot LP (`window_slot_bound`)
reaches its bound with whole hosts in chains, one chain a maintenance slot: a few chains led by a
host drained before anything is patched (*early*), onto hosts whose maintenance has not begun
(*absorbers*, with the slack to send it again); the other chains begin once the first hosts are
patched, every host of them drained onto patched hosts. This script builds such a plan by two exact
models and replays it under the simulator's rules:

1. *Chains* (an integer programme, SCIP, over every chain of 1-3 hosts, as the slot LP's columns):
   the hosts in at most ``k`` chains by a makespan ``T``, a host lasting its own drain at the pace
   the simulator's drains really send (``RATE``, not the link's 1,100 MiB/s) and the patch; early-led
   chains from 0, late-led ones from the first patch + ``LATE_AFTER_S``; what the chains can take in
   (free memory, at that pace, in their slack) at least what their early leaders leave; at most 8
   early leaders. The least ``T`` (to 5 s), then the chains with the most to spare.
2. *Times and targets* (CP-SAT over the fixed chains, integer GiB and seconds): when each host enters
   (its drain begins then); how much of each early leader's memory goes to which absorber, and which
   later drains send all of theirs to absorbers (the last hosts of the chains) instead of patched
   hosts; an absorber takes in at most its free memory, only from drains done before its maintenance,
   one drain at a time (its inbound lock), and drains that much longer; at most 8 drains at once (each
   holds 2 of the cluster's 16 slots); the drains onto patched hosts at no moment more than the hosts
   patched by then (one target each, its lock), and their memory within what those hosts hold (half
   counted from the drain's start, half from its end). Least makespan.
3. *Replay*: ``simulate.py``'s ``_WindowScheduler``, four rules patched in memory (a subclass): a host
   enters at its planned time, once the host before it in its chain is patched and every drain planned
   onto it is done (``_can_start``; ``run`` wakes at the planned times); a drain with planned absorbers
   sends each VM to the one furthest below its planned amount that holds it, every other drain to the
   host before it in its chain if that holds all of it, else to the patched host that holds all of it
   with least to spare, else largest VMs first to the patched hosts with most free memory, never to a
   host another drain fills (``_place``); a host whose targets are not free does not hold up the
   drains behind it (``_begin_drains``). Everything else is the simulator's: the engine, admission
   (slots, shares, the per-target limit, target memory), the patch. Each replay is checked from its
   migrations: every host patched, every move off its source within that host's drain, none landing on
   a host in maintenance, every VM ending on a host patched before it landed there.

  .venv/bin/python benchmarks/night_plan.py --cluster c05 [--trace]
  .venv/bin/python benchmarks/night_plan.py --all

Deterministic: SCIP, and CP-SAT on one worker with a deterministic time limit (``--budget``).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ortools.sat.python import cp_model  # noqa: E402

from hostmaint.migration.policy import SchedulerPolicy  # noqa: E402
from hostmaint.migration.simulate import (  # noqa: E402
    SimParams,
    WindowEstimate,
    _WindowScheduler,
    _WindowSettings,
    parallel_capacity,
    simulate_window,
)
from hostmaint.migration.window_bound import window_slot_bound  # noqa: E402
from hostmaint.models import FleetSnapshot, MigrationOptions, Placement, StepOutcome  # noqa: E402

PATCH_S = 420
GIB = 1024
# What a drain really sends per second in the simulator: its link's 1,100 MiB/s less what dirty pages
# and the last VMs' tails cost (the flows' night: 950-1,040 MiB/s of memory moved per second of drain)
RATE = 960.0
SETUP_S = 2  # a drain's first set-up, rounded up
DRAINS_AT_ONCE = 8  # 16 cluster slots, a drain's share 2 on 10 GbE
LATE_AFTER_S = 50  # a late-led chain begins this long after the first patch (its leader needs a patched target)


@dataclass(frozen=True)
class PlanHost:
    name: str
    own_gib: int
    largest_mib: int
    usable_gib: int  # the most VM memory it may hold (the simulator's reading), whole GiB down

    @property
    def room_gib(self) -> int:
        return max(0, self.usable_gib - self.own_gib)

    def drain_s(self, taken_gib: float = 0.0) -> int:
        return math.ceil(SETUP_S + max((self.own_gib + taken_gib) * GIB / RATE, self.largest_mib / 600))

    @property
    def hold_s(self) -> int:
        return self.drain_s() + PATCH_S


@dataclass
class Plan:
    chains: list[list[str]]
    start: dict[str, int]  # planned entry (= drain start)
    end: dict[str, int]  # planned patched
    absorb: dict[str, dict[str, int]] = field(default_factory=dict)  # early leader -> absorber -> GiB
    early: set[str] = field(default_factory=set)  # the leaders drained before the first patch
    makespan_s: int = 0
    chains_s: float = 0.0  # the chains' model's T


def plan_hosts(snap: FleetSnapshot) -> dict[str, PlanHost]:
    head = snap.limits.memory_headroom_pct / 100
    out = {}
    for h in snap.hosts:
        vms = snap.vms_on(h.name)
        usable = (h.memory_mib - h.reserved_memory_mib) * (1 - head)
        out[h.name] = PlanHost(h.name, sum(v.memory_mib for v in vms) // GIB, max(v.memory_mib for v in vms),
                               int(usable // GIB))
    return out


def _columns(hosts: dict[str, PlanHost], t: float, first: float) -> list[tuple[tuple[str, ...], bool, int]]:
    """Every chain of 1-3 hosts that ends by ``t``: (its hosts, leader first; early-led; what it can
    take in of the early leaders' memory, less what its own early leader leaves, GiB).

    Early-led: the leader drains from 0 onto hosts whose maintenance has not begun; the hosts after it
    can take in (their free memory, at the rate they send, in the chain's slack). Late-led: the chain
    begins at ``first`` (when the first leaders are patched: its leader drains onto one of them), and
    every host of it can take in."""
    names = sorted(hosts, key=lambda n: (hosts[n].hold_s, n))

    def take(members: Sequence[str], slack: float) -> int:
        return min(sum(hosts[m].room_gib for m in members), int(max(0.0, slack) * RATE / GIB))

    out = []
    for a in names:
        if hosts[a].hold_s > t:
            break
        rest = [b for b in names if b != a]
        out.append(((a,), True, -hosts[a].own_gib))
        if first + hosts[a].hold_s <= t:
            out.append(((a,), False, take([a], t - first - hosts[a].hold_s)))
        for j, b in enumerate(rest):
            two = hosts[a].hold_s + hosts[b].hold_s
            if two > t:
                break
            out.append(((a, b), True, take([b], t - two) - hosts[a].own_gib))
            if first + two <= t and a < b:
                out.append(((a, b), False, take([a, b], t - first - two)))
            for c in rest[j + 1:]:
                three = two + hosts[c].hold_s
                if three > t:
                    break
                out.append(((a, b, c), True, take([b, c], t - three) - hosts[a].own_gib))
                if first + three <= t and a < b:
                    out.append(((a, b, c), False, take([a, b, c], t - first - three)))
    return out


def _chains_fit(hosts: dict[str, PlanHost], k: int, t: float,
                first: float) -> tuple[float, list[tuple[tuple[str, ...], bool]]] | None:
    """Whole chains (SCIP) holding every host once in ``k`` slots by ``t``, taking in what their
    early leaders leave, at most 8 early leaders (8 drains at once): the chains with the most to
    spare, or None."""
    from ortools.linear_solver import pywraplp

    columns = _columns(hosts, t, first)
    solver = pywraplp.Solver.CreateSolver("SCIP")
    y = [solver.BoolVar("") for _ in columns]
    for h in hosts:
        solver.Add(sum(y[j] for j, (c, _, _) in enumerate(columns) if h in c) == 1)
    solver.Add(sum(y) <= k)
    early = sum(y[j] for j, (_, e, _) in enumerate(columns) if e)
    solver.Add(early >= 1)
    solver.Add(early <= DRAINS_AT_ONCE)
    value = sum(v * y[j] for j, (_, _, v) in enumerate(columns))
    solver.Add(value >= 0)
    solver.Maximize(value)
    if solver.Solve() != pywraplp.Solver.OPTIMAL:
        return None
    return solver.Objective().Value(), [(c, e) for j, (c, e, _) in enumerate(columns) if y[j].solution_value() > 0.5]


def plan_chains(hosts: dict[str, PlanHost], k: int,
                lower: float) -> tuple[float, list[tuple[tuple[str, ...], bool]]]:
    """The least makespan (to 5 s) whole chains fit by, from ``lower``, and their chains."""
    first = min(h.hold_s for h in hosts.values()) + LATE_AFTER_S
    t = lower
    while _chains_fit(hosts, k, t, first) is None:
        t += 25.0
    lo, hi = t - 25.0, t
    while hi - lo > 5.0:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if _chains_fit(hosts, k, mid, first) is not None else (mid, hi)
    found = _chains_fit(hosts, k, hi, first)
    assert found is not None
    return hi, found[1]


def plan_times(hosts: dict[str, PlanHost], chains: Sequence[tuple[Sequence[str], bool]],
               budget: float = 120.0) -> Plan:
    """CP-SAT over the fixed chains: when each host enters (and drains), how much of each early
    leader's memory goes to which absorber (a host not early, its maintenance after that drain), and
    how much of every other host's to which patched host (patched before that drain begins); integer
    GiB, one drain into a host at a time (its inbound lock), at most 8 drains at once; least makespan."""
    m = cp_model.CpModel()
    horizon = 4000
    start, drain, drained, end = {}, {}, {}, {}
    intervals = []
    early = {c[0] for c, e in chains if e}
    for h, ph in hosts.items():
        start[h] = m.new_int_var(0, horizon, f"s_{h}")
        drain[h] = m.new_int_var(ph.drain_s(), horizon, f"d_{h}")
        drained[h] = m.new_int_var(0, horizon, f"f_{h}")
        end[h] = m.new_int_var(0, horizon, f"e_{h}")
        m.add(end[h] == drained[h] + PATCH_S)
        intervals.append(m.new_interval_var(start[h], drain[h], drained[h], f"i_{h}"))
    for c, _ in chains:
        for a, b in zip(c, c[1:], strict=False):
            m.add(start[b] >= end[a])
    m.add_cumulative(intervals, [1] * len(intervals), DRAINS_AT_ONCE)
    last = {c[-1] for c, _ in chains}
    into: dict[str, list[cp_model.IntervalVar]] = {h: [] for h in hosts}
    taken: dict[str, list[cp_model.IntVar]] = {h: [] for h in hosts}
    outs: dict[str, list[tuple[cp_model.IntVar, cp_model.IntVar]]] = {h: [] for h in hosts}
    flows: dict[tuple[str, str], cp_model.IntVar] = {}
    for g in hosts:
        # an early leader sends onto hosts whose maintenance has not begun (any host not early); any
        # other host onto patched hosts, or all of it onto the last hosts of the chains (not yet in
        # maintenance, with the slack to send it again)
        for a in sorted(hosts):
            if a == g or a in early or hosts[a].room_gib <= 0 or (g not in early and a not in last):
                continue
            use = m.new_bool_var(f"u_{g}_{a}")
            x = m.new_int_var(0, hosts[a].room_gib, f"x_{g}_{a}")
            m.add(x == 0).only_enforce_if(use.Not())
            m.add(x >= 8).only_enforce_if(use)  # no scraps: a few VMs at least
            m.add(drained[g] <= start[a]).only_enforce_if(use)  # done before a's maintenance
            into[a].append(m.new_optional_interval_var(start[g], drain[g], drained[g], use, ""))
            taken[a].append(x)
            flows[g, a] = x
            outs[g].append((use, x))
    carried: dict[str, cp_model.IntVar | int] = {}
    patched_target: dict[str, cp_model.IntVar] = {}
    for h, ph in hosts.items():
        carried[h] = ph.own_gib
        if taken[h]:
            carried[h] = m.new_int_var(ph.own_gib, max(ph.usable_gib, ph.own_gib), f"w_{h}")
            m.add(carried[h] == ph.own_gib + sum(taken[h]))
            m.add(sum(taken[h]) <= ph.room_gib)
            m.add(int(RATE) * (drain[h] - SETUP_S) >= GIB * carried[h])
            m.add_no_overlap(into[h])  # one drain into a host at a time (its inbound lock)
        m.add(sum(u for u, _ in outs[h]) <= 3)  # a focused drain: few targets
        if h in early:
            m.add(sum(x for _, x in outs[h]) == ph.own_gib)
            continue
        patched_target[h] = p = m.new_bool_var(f"pt_{h}")
        if outs[h]:
            m.add(sum(x for _, x in outs[h]) == carried[h]).only_enforce_if(p.Not())
            for u, _ in outs[h]:
                m.add_implication(p, u.Not())
        else:
            m.add(p == 1)
    # a drain onto patched hosts takes one of its own (the inbound lock): at every moment no more of
    # them run than hosts are patched (the hosts not yet patched and these drains, at most all hosts);
    # and what they land fits the patched hosts' memory (half a drain's memory counted from its start,
    # the rest from its end: it lands at its link's pace in between)
    unpatched = [m.new_interval_var(0, end[h], end[h], f"n_{h}") for h in hosts]
    onto = [m.new_optional_interval_var(start[h], drain[h], drained[h], p, f"o_{h}") for h, p in patched_target.items()]
    m.add_cumulative(unpatched + onto, [1] * (len(unpatched) + len(onto)), len(hosts))
    held = [m.new_interval_var(0, end[h], end[h], f"p_{h}") for h in hosts]
    landing, amounts = [], []
    for h, p in patched_target.items():
        half = m.new_int_var(0, max(hosts[h].usable_gib, hosts[h].own_gib), f"h_{h}")
        m.add(2 * half >= carried[h]).only_enforce_if(p)
        landing.append(m.new_optional_interval_var(start[h], horizon - start[h], horizon, p, f"a_{h}"))
        landing.append(m.new_optional_interval_var(drained[h], horizon - drained[h], horizon, p, f"b_{h}"))
        amounts += [half, half]
    m.add_cumulative(held + landing, [hosts[h].usable_gib for h in hosts] + amounts,
                     sum(ph.usable_gib for ph in hosts.values()))
    makespan = m.new_int_var(0, horizon, "T")
    m.add_max_equality(makespan, list(end.values()))
    m.minimize(makespan)
    solver = cp_model.CpSolver()
    solver.parameters.num_workers = 1
    solver.parameters.max_deterministic_time = budget
    solver.parameters.random_seed = 1
    status = solver.solve(m)
    print(f"  CP-SAT {solver.status_name(status)} {solver.objective_value:.0f} "
          f"(its bound {solver.best_objective_bound:.0f})", file=sys.stderr)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        raise RuntimeError(f"no times for these chains: {solver.status_name(status)}")
    plan = Plan([list(c) for c, _ in chains], {h: solver.value(start[h]) for h in hosts},
                {h: solver.value(end[h]) for h in hosts}, early=early, makespan_s=solver.value(makespan))
    for (g, a), x in flows.items():
        if solver.value(x):
            plan.absorb.setdefault(g, {})[a] = solver.value(x)
    for g, a in sorted(plan.absorb.items()):
        print(f"    {g} ({'early' if g in early else 'later'}) -> {a}", file=sys.stderr)
    return plan


class PlannedWindow(_WindowScheduler):
    """The simulator's window run with a plan's entry times, chains and targets (the three rules of
    the module docstring); the rest is :class:`_WindowScheduler`'s."""

    def __init__(self, snapshot: FleetSnapshot, plan: Plan, settings: _WindowSettings, k: int) -> None:
        order = sorted(plan.start, key=lambda h: (plan.start[h], h))
        super().__init__(snapshot, order, order, k, settings)
        self.plan = plan
        self.before = {c[i]: c[i - 1] for c in plan.chains for i in range(1, len(c))}
        self.stuck: list[str] = []
        # a host whose targets are not free yet does not hold up the hosts behind it (each host's run
        # waits for its own targets' locks in the flows)
        self.first_come_first_served = False
        self.senders: dict[str, set[str]] = {}
        for g, targets in plan.absorb.items():
            for a in targets:
                self.senders.setdefault(a, set()).add(g)

    def _wake_at(self) -> list[float]:
        return [self.plan.start[w] for w in self.waiting if self.plan.start[w] > self.engine.t + 1e-9]

    def _nothing_to_wait_for(self) -> None:
        # nothing running, nothing due: the plan is stuck (a drain waits for a target that will never
        # free); the hosts left are given up and counted as the plan's failure
        self.stuck = sorted(self.waiting + self.in_maint)
        for name in self.in_maint:
            job = self.jobs[name]
            job.failed = True
            job.end = job.drained = self.engine.t
        self.in_maint.clear()
        self._give_up_waiting()

    def _can_start(self, name: str) -> bool:
        if self.engine.t + 1e-9 < self.plan.start[name]:
            return False
        before = self.before.get(name)
        if before is not None and before not in self.patched:
            return False
        return all(self.jobs[g].drained >= 0 for g in self.senders.get(name, ()))

    def _place(self, name: str, busy: set[str]) -> list[Placement] | None:
        out = self._choose(name, busy, dict(self.free))
        if out is not None:
            for p in out:
                self.free[p.target] -= p.memory_mib
        return out

    def _choose(self, name: str, busy: set[str], free: dict[str, float]) -> list[Placement] | None:
        vms = sorted((v for v, h in self.location.items() if h == name), key=lambda v: (-self.memory[v], v))
        out: list[Placement] = []
        if name in self.plan.absorb:  # onto its planned absorbers, each VM to the one furthest below its share
            share = {a: gib * GIB for a, gib in self.plan.absorb[name].items()}
            for vm in vms:
                fits = [a for a in share if a not in busy and a not in self.in_maint and a not in self.patched
                        and free[a] >= self.memory[vm]]
                if not fits:
                    return None
                want = max(fits, key=lambda a: (share[a], a))
                share[want] -= self.memory[vm]
                free[want] -= self.memory[vm]
                out.append(Placement(vm=vm, source=name, target=want, memory_mib=self.memory[vm], reason="planned"))
        else:  # onto patched hosts: the one before it in its chain if it holds it all, else the best fit
            need = sum(self.memory[v] for v in vms)
            targets = [t for t in sorted(self.patched) if t not in busy and t not in self.in_maint]
            whole = [t for t in targets if free[t] >= need]
            first = self.before.get(name)
            if first in whole:
                order = [first]
            elif whole:
                order = [min(whole, key=lambda t: (free[t], t))]
            else:
                order = sorted(targets, key=lambda t: (-free[t], t))
            for vm in vms:
                fits = [t for t in order if free[t] >= self.memory[vm]]
                if not fits:
                    return None
                free[fits[0]] -= self.memory[vm]
                out.append(Placement(vm=vm, source=name, target=fits[0], memory_mib=self.memory[vm],
                                     reason="planned"))
        return out


def check(snap: FleetSnapshot, est_hosts: Sequence, migrations: Sequence) -> list[str]:
    """The product's rules, from outside the run: every host patched, every VM moved onto a host
    patched before it landed or left again before that host's maintenance, nothing landed on a host
    in maintenance, each host empty when its drain ended."""
    problems = []
    span = {h.host: (h.start_s, h.drained_s, h.end_s) for h in est_hosts}
    problems += [f"{h.host} not patched" for h in est_hosts if h.outcome is not StepOutcome.OK]
    where = {v.name: v.host for v in snap.vms}
    for m in sorted(migrations, key=lambda m: (m.end_s, m.vm)):
        if m.outcome is not StepOutcome.OK:
            problems.append(f"{m.vm} {m.outcome}")
            continue
        s0, drained, _ = span[m.source]
        t0, _, t1 = span[m.target]
        if where[m.vm] != m.source:
            problems.append(f"{m.vm} moved from {m.source}, where it was not")
        if m.start_s < s0 - 0.01 or m.end_s > drained + 0.01:
            problems.append(f"{m.vm} left {m.source} outside its drain")
        if not (m.end_s <= t0 + 0.01 or m.start_s >= t1 - 0.01):
            problems.append(f"{m.vm} landed on {m.target} in maintenance")
        where[m.vm] = m.target
    moved_last = {}
    for m in sorted(migrations, key=lambda m: m.end_s):
        if m.outcome is StepOutcome.OK:
            moved_last[m.vm] = m
    for v, h in where.items():
        last = moved_last.get(v)
        if last is None:
            problems.append(f"{v} never moved")
        elif last.start_s < span[h][2] - 0.01:
            problems.append(f"{v} ends on {h}, which it reached before that host's patch")
    return problems


@dataclass(frozen=True)
class Row:
    cluster: str
    k: int
    bound_s: float
    flows_s: float
    chains_s: float
    planned_s: int
    simulated_s: float
    leaders: int
    absorbed_gib: int
    problems: int
    seconds: float


def run_cluster(c: int, budget: float = 120.0) -> tuple[Row, Plan, WindowEstimate | None]:
    from drain import night_cluster

    started = time.monotonic()
    snap, dirty = night_cluster(1000 + c, f"c{c:02d}", 30, 20)
    names = [h.name for h in snap.hosts]
    k = parallel_capacity(snap, names)
    bound = window_slot_bound(snap, names, k, patch_s=PATCH_S).bound_s
    mem = {n: sum(v.memory_mib for v in snap.vms_on(n)) for n in names}
    flows = simulate_window(snap, sorted(names, key=lambda n: (mem[n], n)), dirty_rate=dirty, patch_s=PATCH_S,
                            rebalance_within=None, yardsticks=False)
    hosts = plan_hosts(snap)
    chains_s, chains = plan_chains(hosts, k, bound)
    print(f"  {snap.cluster}: chains by {chains_s:.0f} s ({time.monotonic() - started:.0f} s)", file=sys.stderr)
    plan = plan_times(hosts, chains, budget)
    plan.chains_s = chains_s
    print(f"  {snap.cluster}: planned {plan.makespan_s} s ({time.monotonic() - started:.0f} s)", file=sys.stderr)
    settings = _WindowSettings(SchedulerPolicy(), MigrationOptions(), dirty, SimParams(), PATCH_S, False, None, True)
    est_hosts, migs, makespan = PlannedWindow(snap, plan, settings, k).run()
    problems = check(snap, est_hosts, migs)
    for p in problems[:10]:
        print("  !", p, file=sys.stderr)
    row = Row(snap.cluster, k, bound, flows.makespan_s, chains_s, plan.makespan_s, makespan, len(chains),
              sum(sum(a.values()) for a in plan.absorb.values()), len(problems), time.monotonic() - started)
    est = WindowEstimate(cluster=snap.cluster, hosts=est_hosts, makespan_s=makespan, parallel=k, serial_s=0.0,
                         lower_bound_s=0.0, migrations=migs)
    return row, plan, est


def table(rows: Sequence[Row]) -> str:
    lines = ["| cluster | k | tightest valid bound s | flows s | ÷ bound | chains' T s | planned s | simulated s "
             "| ÷ bound | chains | GiB sent to absorbers | rule breaks | s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.cluster} | {r.k} | {r.bound_s:.0f} | {r.flows_s:.0f} | {r.flows_s / r.bound_s:.3f} | "
                     f"{r.chains_s:.0f} | {r.planned_s} | {r.simulated_s:.0f} | {r.simulated_s / r.bound_s:.3f} | "
                     f"{r.leaders} | {r.absorbed_gib} | {r.problems} | {r.seconds:.0f} |")
    return "\n".join(lines)


def trace(plan: Plan, est: WindowEstimate) -> str:
    """Per host: planned entry and patch against the simulated ones."""
    lines = ["| chain | host | planned start | simulated start | drain start | drained | planned end | simulated end |",
             "|---|---|---|---|---|---|---|---|"]
    by = {h.host: h for h in est.hosts}
    for i, chain in enumerate(plan.chains):
        for h in chain:
            e = by[h]
            lines.append(f"| {i} | {h} | {plan.start[h]} | {e.start_s:.0f} | {e.drain_start_s:.0f} | "
                         f"{e.drained_s:.0f} | {plan.end[h]} | {e.end_s:.0f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cluster", nargs="+", default=["c05"], help="the night's clusters, c00-c09")
    ap.add_argument("--all", action="store_true", help="all ten clusters")
    ap.add_argument("--trace", action="store_true", help="with --cluster: each host planned against simulated")
    ap.add_argument("--budget", type=float, default=120.0, help="CP-SAT's deterministic time per cluster")
    args = ap.parse_args(argv)
    clusters = range(10) if args.all else [int(c.lstrip("c")) for c in args.cluster]
    rows = []
    for c in clusters:
        row, plan, est = run_cluster(c, args.budget)
        rows.append(row)
        print(table([row]).splitlines()[-1], file=sys.stderr, flush=True)
        if args.trace and est is not None:
            print(trace(plan, est))
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
