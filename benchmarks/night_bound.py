"""Is the window's valid lower bound at most the optimum? Exact optima of tiny windows by CP-SAT.

Not a test: prints a table (markdown). For small random windows (3-6 hosts, 1-2 VMs each) it
computes the shortest schedule exactly and compares :func:`window_floor_bound` and the tightest
valid bound (with :func:`~hostmaint.migration.window_bound.window_slot_bound`) with it, and with
what the simulator's window (the flows' schedule) takes on the same hosts.

  .venv/bin/python benchmarks/night_bound.py            # 12 windows
  .venv/bin/python benchmarks/night_bound.py --count 30
  .venv/bin/python benchmarks/night_bound.py --schedules   # the night's schedules tried, ÷ the valid bound
  .venv/bin/python benchmarks/night_bound.py --probe       # would integrality or the cluster's slots lift it?
  .venv/bin/python benchmarks/night_bound.py --waste       # where the flows' window spends its slots' time
  .venv/bin/python benchmarks/night_bound.py --memory      # would the VMs' memory over time lift it?
  .venv/bin/python benchmarks/night_bound.py --memory-tiny --count 20   # and is it valid on tiny windows?

The tiny windows are chosen so that the model is a pure scheduling problem and CP-SAT can solve it
exactly: a link carries one stream (L = b), one migration at a time per source and per target, no
dirty pages, memory to spare on every host. Then every migration runs at b, for set-up + M ÷ b, and a
schedule is: when each host is in maintenance (at most k at once), and for each VM its moves. The
rules are the product's and the bound's assumptions: a VM leaves a host only while that host is in
maintenance and before its patch; no VM lands on a host in maintenance; a VM whose move is its last
lands on a patched host (every host is patched, empty, and the VM stays); a migration holds its slot
(one of the cluster's C, one of its source's and of its target's) from its set-up until what it has
left fits the look-ahead (2 s: the executor then lets the next one set up), and a link sends one
migration at a time. Each VM moves at most ``--moves`` times (3 by default) and links are not shared
at once: the optimum is over those schedules, so it is at least the true one, and a bound above it
would be wrong; an optimum above the simulator's window (one schedule under the product's rules, links
shared) would show the model forbidding something the flows do.
"""

from __future__ import annotations

import argparse
import itertools
import math
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from ortools.sat.python import cp_model  # noqa: E402

from hostmaint.migration.policy import SchedulerPolicy  # noqa: E402
from hostmaint.migration.simulate import (  # noqa: E402
    SimParams,
    parallel_capacity,
    simulate_window,
    window_floor_bound,
)
from hostmaint.migration.window_bound import (  # noqa: E402
    SlotColumn,
    SlotHost,
    slot_columns,
    slot_hosts,
    window_slot_bound,
)
from hostmaint.models import Cell, FleetSnapshot, Host, Limits, StepOutcome, Vm  # noqa: E402

STREAM = 600.0  # MiB/s: one stream fills the link (L = b)
SETUP = 2.0  # s, so that every migration lasts a whole number of seconds
LOOKAHEAD = SchedulerPolicy().lookahead_s  # s: a migration frees its slot when its rest fits it


@dataclass(frozen=True)
class Tiny:
    """A tiny window: hosts, each VM's host and memory (a multiple of STREAM MiB), k, C, the patch."""

    hosts: tuple[str, ...]
    vms: tuple[tuple[str, str, int], ...]  # name, host, MiB
    k: int
    slots: int
    patch_s: int
    room: tuple[int, ...] = ()  # MiB each host has free beside its own VMs; () plenty (1 TiB)

    def own(self, host: str) -> int:
        return sum(mib for _, on, mib in self.vms if on == host)

    def capacity(self, host: str) -> int:
        """The most VM memory the host may hold."""
        return self.own(host) + self.room[self.hosts.index(host)] if self.room else 1 << 20

    def snapshot(self) -> FleetSnapshot:
        hs = tuple(Host(name=h, cluster="t", cells=(Cell(id=0, memory_mib=self.capacity(h),
                                                         free_mib=self.capacity(h) - self.own(h)),))
                   for h in self.hosts)
        vms = tuple(Vm(name=n, uuid=n, host=h, memory_mib=m, vcpus=1) for n, h, m in self.vms)
        limits = Limits(memory_headroom_pct=0, max_hosts_in_maintenance=self.k, migrations_per_cluster=self.slots,
                        migrations_per_source=1, migrations_per_target=1)
        return FleetSnapshot(cluster="t", taken_at="t", source="benchmark", limits=limits, hosts=hs, vms=vms)

    def seconds(self, mib: int) -> int:
        return int(SETUP + mib / STREAM)


def optimum(w: Tiny, moves: int = 3, time_limit_s: float = 60.0) -> tuple[int, bool]:
    """The shortest schedule of ``w`` (each VM moving at most ``moves`` times) and whether CP-SAT proved it."""
    m = cp_model.CpModel()
    hosts = list(w.hosts)
    horizon = sum(w.seconds(mib) for _, _, mib in w.vms) * moves + len(hosts) * (w.patch_s + 1)
    start = {h: m.new_int_var(0, horizon, f"s_{h}") for h in hosts}
    end = {h: m.new_int_var(0, horizon, f"e_{h}") for h in hosts}
    size = {h: m.new_int_var(w.patch_s, horizon, f"d_{h}") for h in hosts}
    maint = {h: m.new_interval_var(start[h], size[h], end[h], f"m_{h}") for h in hosts}
    m.add_cumulative([maint[h] for h in hosts], [1] * len(hosts), w.k)
    makespan = m.new_int_var(0, horizon, "T")
    m.add_max_equality(makespan, [end[h] for h in hosts])
    every: list[cp_model.IntervalVar] = []
    held_mem: dict[str, list[tuple[cp_model.IntervalVar, int]]] = {h: [] for h in hosts}
    out: dict[str, list[cp_model.IntervalVar]] = {h: [] for h in hosts}
    into: dict[str, list[cp_model.IntervalVar]] = {h: [] for h in hosts}
    sends: dict[str, list[cp_model.IntervalVar]] = {h: [] for h in hosts}
    receives: dict[str, list[cp_model.IntervalVar]] = {h: [] for h in hosts}
    for name, origin, mib in w.vms:
        d = w.seconds(mib)
        # the slots (cluster, source, target) are held from the set-up until the rest fits the look-ahead
        # (then the next migration may set up), the links while it sends
        held = int(SETUP + max(0.0, mib / STREAM - LOOKAHEAD))
        present = [m.new_bool_var(f"y_{name}_{j}") for j in range(moves)]
        m.add(present[0] == 1)  # every host is patched empty: every VM moves at least once
        for j in range(1, moves):
            m.add_implication(present[j], present[j - 1])
        where: dict[str, cp_model.IntVar] | None = None  # the target of the previous move; None: the origin
        previous_a: cp_model.IntVar | None = None
        starts = [m.new_int_var(0, horizon, f"a_{name}_{j}") for j in range(moves)]
        if w.room:
            # memory: on its origin until its first move begins, on a target from landing until its next
            # move begins (in flight it counts on neither: a relaxation, so the optimum stays a floor)
            stay = m.new_interval_var(0, starts[0], starts[0], f"st_{name}")
            held_mem[origin].append((stay, mib))
        for j in range(moves):
            a = starts[j]
            if previous_a is not None:
                m.add(a >= previous_a + d).only_enforce_if(present[j])
            # its last move: present and no next one
            last = m.new_bool_var(f"last_{name}_{j}")
            if j + 1 < moves:
                m.add_bool_and([present[j], present[j + 1].Not()]).only_enforce_if(last)
                m.add_bool_or([present[j].Not(), present[j + 1], last])
            else:
                m.add(last == present[j])
            every.append(m.new_optional_fixed_size_interval_var(a, held, present[j], f"mv_{name}_{j}"))
            target = {h: m.new_bool_var(f"t_{name}_{j}_{h}") for h in hosts}
            m.add(sum(target.values()) == present[j])
            for h in hosts:
                # from h: h is in maintenance for the whole move and not yet patching
                if where is None:
                    if h != origin:
                        continue
                    src: cp_model.IntVar = present[j]
                else:
                    src = m.new_bool_var(f"src_{name}_{j}_{h}")
                    m.add_bool_and([where[h], present[j]]).only_enforce_if(src)
                    m.add_bool_or([where[h].Not(), present[j].Not(), src])
                m.add(start[h] <= a).only_enforce_if(src)
                m.add(a + d <= end[h] - w.patch_s).only_enforce_if(src)
                m.add(target[h] == 0).only_enforce_if(src)
                out[h].append(m.new_optional_fixed_size_interval_var(a, held, src, f"o_{name}_{j}_{h}"))
                sends[h].append(m.new_optional_fixed_size_interval_var(a + int(SETUP), d - int(SETUP), src,
                                                                       f"so_{name}_{j}_{h}"))
            for h in hosts:
                # lands outside the target's maintenance: before it (and must leave again) or after it
                before = m.new_bool_var(f"b_{name}_{j}_{h}")
                m.add(a + d <= start[h]).only_enforce_if([target[h], before])
                m.add(a >= end[h]).only_enforce_if([target[h], before.Not()])
                m.add_bool_or([before.Not(), last.Not()]).only_enforce_if(target[h])  # its last: a patched host
                into[h].append(m.new_optional_fixed_size_interval_var(a, held, target[h], f"i_{name}_{j}_{h}"))
                if w.room:
                    leave = m.new_int_var(0, horizon, f"lv_{name}_{j}_{h}")
                    if j + 1 < moves:
                        m.add(leave == starts[j + 1]).only_enforce_if([target[h], present[j + 1]])
                        m.add(leave == horizon).only_enforce_if([target[h], present[j + 1].Not()])
                    else:
                        m.add(leave == horizon).only_enforce_if(target[h])
                    size = m.new_int_var(0, horizon, f"sz_{name}_{j}_{h}")
                    held_mem[h].append((m.new_optional_interval_var(a + d, size, leave, target[h],
                                                                    f"on_{name}_{j}_{h}"), mib))
                receives[h].append(m.new_optional_fixed_size_interval_var(a + int(SETUP), d - int(SETUP), target[h],
                                                                          f"si_{name}_{j}_{h}"))
            where = target
            previous_a = a
    for h in hosts:
        m.add_no_overlap(out[h])  # one migration's slot at a time from a source
        m.add_no_overlap(into[h])  # and into a target
        m.add_no_overlap(sends[h])  # a link carries one stream: one sends at a time, out
        m.add_no_overlap(receives[h])  # and in
    m.add_cumulative(every, [1] * len(every), w.slots)
    if w.room:
        for h in hosts:
            m.add_cumulative([i for i, _ in held_mem[h]], [mib for _, mib in held_mem[h]], w.capacity(h))
    m.minimize(makespan)
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = time_limit_s
    solver.parameters.num_workers = 1
    status = solver.solve(m)
    if status == cp_model.INFEASIBLE:
        return -1, True  # no schedule at all (too little free memory)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        raise RuntimeError(f"no schedule found: {solver.status_name(status)}")
    return int(solver.value(makespan)), status == cp_model.OPTIMAL


PARAMS = SimParams(default_link_mib_s=STREAM, setup_s=SETUP)


def tiny(seed: int, tight: bool = False) -> Tiny:
    """A random tiny window: 3-6 hosts, 1-2 VMs of 1-4 × 600 MiB each, k 1-2 (2 from 4 hosts), C 1-3,
    patch 10-40 s; ``tight``: each host with room for only 2-6 × 600 MiB more."""
    rng = random.Random(seed)
    hosts = tuple(f"h{i}" for i in range(rng.randint(3, 6)))
    vms = tuple((f"{h}v{j}", h, rng.randint(1, 4) * int(STREAM)) for h in hosts for j in range(rng.randint(1, 2)))
    room = tuple(rng.randint(2, 6) * int(STREAM) for _ in hosts) if tight else ()
    return Tiny(hosts=hosts, vms=vms, k=2 if len(hosts) >= 4 else 1, slots=rng.randint(1, 3),
                patch_s=rng.choice((10, 20, 40)), room=room)


def compare(w: Tiny, moves: int) -> tuple[float, float, int, bool, float, float]:
    """window_floor_bound, the tightest valid bound (with window_slot_bound), the optimum (and whether
    proven), the simulator's window, CP-SAT's seconds."""
    snap = w.snapshot()
    names = list(w.hosts)
    floor = window_floor_bound(snap, names, w.k, patch_s=w.patch_s, policy=SchedulerPolicy(), params=PARAMS).total_s
    tight = window_slot_bound(snap, names, w.k, patch_s=w.patch_s, policy=SchedulerPolicy(), params=PARAMS).bound_s
    started = time.monotonic()
    best, proven = optimum(w, moves)
    took = time.monotonic() - started
    # in the flows' order: emptiest first (plan_window), as the night benchmark runs it
    emptiest = sorted(names, key=lambda h: (sum(mib for _, on, mib in w.vms if on == h), h))
    sim = simulate_window(snap, emptiest, parallel=w.k, patch_s=w.patch_s, params=PARAMS, rebalance_within=None)
    # a window that left a host unpatched (a VM found no room) is no schedule of the whole window
    done = all(h.outcome is StepOutcome.OK for h in sim.hosts)
    return floor, tight, best, proven, sim.makespan_s if done else math.nan, took


def schedules(clusters: int = 10, patch_s: float = 420.0, only: Sequence[int] = ()) -> str:
    """The night's clusters (benchmarks/drain.py) under the window schedules the flows could run, each
    ÷ the tightest valid bound: host orders, how many drains run at once, where the first wave's VMs
    go. ``only``: the variants to run (their numbers, from 0), else all. Deterministic."""
    from drain import night_cluster

    Variant = tuple[str, list[str], int | None, bool, list[str]]

    def variants(snap: FleetSnapshot, k: int) -> list[Variant]:
        mem = {h.name: sum(v.memory_mib for v in snap.vms_on(h.name)) for h in snap.hosts}
        e = sorted(mem, key=lambda n: (mem[n], n))
        rest = e[k:]
        alternate = [x for pair in zip(rest[::-1], rest, strict=True) for x in pair][:len(rest)]
        # As the slot bound's structure: x = n − 2k slots hold three hosts (the first wave's, then two
        # short ones), the other k − x two (the first wave's, then a long one that takes in what the
        # first wave leaves: it has the slack). In the order a rolling window fills slots as they
        # free: the first wave, x short hosts, the k − x long ones, then x short ones again.
        x = max(0, len(e) - 2 * k)
        short, long = rest[:2 * x], rest[2 * x:]
        planned = e[:k] + short[:x] + long + short[x:]
        return [("emptiest first (the flows)", e, None, False, []),
                ("a host enters only when a migration slot is free", e, None, True, []),
                ("every host in maintenance drains", e, len(e), False, []),
                ("first wave emptiest, then fullest first", e[:k] + rest[::-1], None, False, []),
                ("first wave emptiest, then fullest and emptiest in turn", e[:k] + alternate, None, False, []),
                ("the same, every host in maintenance drains", e[:k] + alternate, len(e), False, []),
                ("slots planned: first wave, short, long (taking in the first wave's VMs), short", planned, None,
                 False, long),
                ("the same, every host in maintenance drains", planned, len(e), False, long),
                ("the planned order alone (the first wave's VMs to the emptiest hosts due)", planned, None, False,
                 [])]

    rows: dict[str, list[float]] = {}
    for c in range(clusters):
        snap, dirty = night_cluster(1000 + c, f"c{c:02d}", 30, 20)
        names = [h.name for h in snap.hosts]
        k = parallel_capacity(snap, names)
        bound = window_slot_bound(snap, names, k, patch_s=patch_s).bound_s  # the tightest valid bound
        for i, (name, order, at_once, jit, absorbers) in enumerate(variants(snap, k)):
            if only and i not in only:
                continue
            est = simulate_window(snap, order, dirty_rate=dirty, patch_s=patch_s, drains_at_once=at_once,
                                  just_in_time=jit, rebalance_within=None, absorbers=absorbers, yardsticks=False)
            rows.setdefault(f"{i}. {name}", []).append(est.makespan_s / bound)
            print(f"c{c:02d} {i} {est.makespan_s:.0f} s ÷ {bound:.0f} s = {est.makespan_s / bound:.3f}",
                  file=sys.stderr, flush=True)
    lines = ["| schedule | " + " | ".join(f"c{c:02d}" for c in range(clusters)) + " | worst |",
             "|---|" + "---|" * (clusters + 1)]
    for name, ratios in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{r:.3f}" for r in ratios) + f" | {max(ratios):.3f} |")
    return "\n".join(lines)


def waste(clusters: int = 10, patch_s: float = 420.0) -> str:
    """The night's clusters as the flows run them (emptiest first): the k maintenance slots' time (k × the
    window) split into the patches, each host's drain at its link's floor for what it sent (its own VMs
    and those the window put on it), the drains beyond that floor, hosts waiting cordoned for their drain,
    and slots left empty (at the end: no host left to start). Deterministic."""
    from drain import night_cluster

    lines = ["| cluster | k | window s | k × window | patches | drains at their floor (re-sent GiB) | drains beyond "
             "| waiting cordoned | slots empty | (patches + floor) ÷ k s | tightest valid bound s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    params = SimParams()
    for c in range(clusters):
        snap, dirty = night_cluster(1000 + c, f"c{c:02d}", 30, 20)
        names = [h.name for h in snap.hosts]
        k = parallel_capacity(snap, names)
        mem = {n: sum(v.memory_mib for v in snap.vms_on(n)) for n in names}
        order = sorted(names, key=lambda n: (mem[n], n))
        est = simulate_window(snap, order, dirty_rate=dirty, patch_s=patch_s, rebalance_within=None,
                              yardsticks=False)
        bound = window_slot_bound(snap, names, k, patch_s=patch_s).bound_s
        sent: dict[str, float] = dict.fromkeys(names, 0.0)
        for m in est.migrations:
            sent[m.source] += m.memory_mib
        span = k * est.makespan_s
        patches = patch_s * len(est.hosts)
        floor = sum(params.setup_s + sent[h.host] / params.link(h.host) for h in est.hosts if sent[h.host])
        drains = sum(h.drained_s - h.drain_start_s for h in est.hosts)
        waiting = sum(h.drain_start_s - h.start_s for h in est.hosts)
        empty = span - patches - drains - waiting
        resent = (sum(sent.values()) - sum(mem.values())) / 1024
        lines.append(f"| c{c:02d} | {k} | {est.makespan_s:.0f} | {span:.0f} | {patches / span:.1%} | "
                     f"{floor / span:.1%} ({resent:.0f}) | {(drains - floor) / span:.1%} | {waiting / span:.1%} | "
                     f"{empty / span:.1%} | {(patches + floor) / k:.0f} | {bound:.0f} |")
        print(lines[-1], file=sys.stderr, flush=True)
    return "\n".join(lines)


def _holding_rows(hosts: list[SlotHost], columns: list[SlotColumn], t: float, taus: np.ndarray,
                  patch_s: float) -> np.ndarray:
    """Step 3'' of RESULTS.md ("The night against its bound"): the most VM memory each filling's hosts can
    hold at each τ ([filling, τ]), over every order of its hosts (an early leader first, from 0; a
    late-led slot from the shortest ℓ) and every placement ending by ``t``: a host patched by τ what its
    in-link brought since (at most its usable memory), one in maintenance what it can still send by its
    patch, one patching nothing, one not yet in maintenance its own memory (the early leader: its usable
    memory), and the hosts not yet in maintenance together at most what the slot can take in (its slack)."""
    first = min(h.hold_s for h in hosts)
    out = np.zeros((len(columns), len(taus)))
    zero = np.zeros(len(taus))
    for j, column in enumerate(columns):
        lead = [column.leader] if column.early and column.leader is not None else []
        late = [i for i in column.hosts if i not in lead]
        start = 0.0 if lead else first
        after = hosts[lead[0]].hold_s if lead else first  # the late hosts begin no sooner
        take = min(sum(hosts[i].room_mib for i in late), max(hosts[i].rate for i in late) * max(
            0.0, t - after - sum(hosts[i].sends_s for i in late))) if late else 0.0
        best = np.zeros(len(taus))
        for rest in itertools.permutations(late):
            order = lead + list(rest)
            ell = [hosts[i].hold_s for i in order]
            ends = list(itertools.accumulate(ell, initial=start))[1:]  # back to back, as early as they can
            patched = [np.minimum(hosts[i].usable_mib, hosts[i].rate * np.clip(taus - e, 0.0, None))
                       for i, e in zip(order, ends, strict=True)]
            waiting = [hosts[i].usable_mib if lead and q == 0 else hosts[i].memory_mib for q, i in enumerate(order)]
            for g in range(len(order) + 1):  # hosts before g patched by τ, the rest not yet in maintenance
                ok = (taus >= (ends[g - 1] if g else -np.inf)) & (taus + sum(ell[g:]) <= t)
                parked = take if any(i in late for i in order[g:]) else 0.0
                best = np.maximum(best, np.where(ok, sum(patched[:g], zero) + sum(waiting[g:]) + parked, 0.0))
            for q, i in enumerate(order):  # host q in maintenance at τ, ending as late as the slot lets it
                before = ends[q - 1] if q else start
                end = t - sum(ell[q + 1:])
                ok = (taus >= before) & (end >= np.maximum(before + ell[q], taus))
                hold = np.minimum(hosts[i].usable_mib, hosts[i].rate * np.clip(end - patch_s - taus, 0.0, None))
                parked = take if any(x in late for x in order[q + 1:]) else 0.0
                best = np.maximum(best, np.where(ok, sum(patched[:q], zero) + hold + sum(waiting[q + 1:]) + parked,
                                                 0.0))
        out[j] = best
    return out


def _holds_everything(hosts: list[SlotHost], columns: list[SlotColumn], k: int, rows: np.ndarray,
                      memory: float) -> bool:
    """Whether the slot LP (GLOP) has room when at every τ the chosen fillings can hold ``memory``."""
    from ortools.linear_solver import pywraplp

    solver = pywraplp.Solver.CreateSolver("GLOP")
    y = [solver.NumVar(0.0, 1.0, "") for _ in columns]
    for i in range(len(hosts)):
        solver.Add(sum(y[j] for j, c in enumerate(columns) if i in c.hosts) == 1)
    solver.Add(sum(y) <= k)
    solver.Add(sum(y[j] for j, c in enumerate(columns) if c.early) >= 1)
    solver.Add(sum(c.value * y[j] for j, c in enumerate(columns)) >= 0)
    for q in range(rows.shape[1]):
        solver.Add(sum(float(rows[j, q]) * y[j] for j in range(len(columns)) if rows[j, q] > 0) >= memory)
    return solver.Solve() in (pywraplp.Solver.OPTIMAL, pywraplp.Solver.FEASIBLE)


def memory_probe(clusters: int = 10, patch_s: float = 420.0, step_s: float = 25.0) -> str:
    """Would the slot LP's bound rise if, at every τ (every ``step_s``), the chosen fillings had to hold
    every VM's memory (:func:`_holding_rows`, step 3'' of RESULTS.md, valid)? At the LP's bound + 1 s;
    and how much more VM memory (× the cluster's) the LP would still find room for (bisection, 1 %)."""

    lines = ["| cluster | k | LP bound s | tried s | + the memory over time | room up to × the VMs' memory | s |",
             "|---|---|---|---|---|---|---|"]
    policy, params = SchedulerPolicy(), SimParams()
    for c in range(clusters):
        started = time.monotonic()
        snap, k, bound, hosts, t, columns = _just_above_the_lp(c, patch_s, policy, params)
        rows = _holding_rows(hosts, columns, t, np.arange(0.0, t + 1e-9, step_s), patch_s)
        memory = sum(h.memory_mib for h in hosts)
        room = _holds_everything(hosts, columns, k, rows, memory)
        lo, hi = 1.0, 1.5
        while room and hi - lo > 0.01:
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if _holds_everything(hosts, columns, k, rows, memory * mid) else (lo, mid)
        lines.append(f"| c{c:02d} | {k} | {bound:.1f} | {t:.1f} | {'room' if room else 'NONE'} | "
                     f"{f'{lo:.2f}' if room else ''} | {time.monotonic() - started:.0f} |")
        print(lines[-1], file=sys.stderr, flush=True)
    return "\n".join(lines)


def memory_tiny(count: int = 20, step_s: float = 0.25) -> str:
    """Step 3'' on the tiny windows (seeds 0..``count`` − 1, tight memory and plenty): the slot LP with
    the memory rows (τ every second) must leave room at CP-SAT's optimum, or the rows are wrong; and
    the first makespan they leave room at, from the slot bound up in ``step_s`` steps (the slot bound
    itself is the LP's alone, to 0.5 s): where the rows lift the bound."""
    policy = SchedulerPolicy()
    lines = ["| window | room MiB | slot bound s | with the memory over time, room from s | optimum s | room at the "
             "optimum |", "|---|---|---|---|---|---|"]
    for tight in (True, False):
        for seed in range(count):
            w = tiny(seed, tight)
            snap, names = w.snapshot(), list(w.hosts)
            best, proven = optimum(w)
            if best < 0:
                continue
            lp = window_slot_bound(snap, names, w.k, patch_s=w.patch_s, policy=policy, params=PARAMS).bound_s
            hosts = slot_hosts(snap, names, patch_s=w.patch_s, policy=policy, params=PARAMS)
            memory = sum(h.memory_mib for h in hosts)

            def room(t: float, w: Tiny = w, hosts: list[SlotHost] = hosts, memory: float = memory) -> bool:
                columns = list(slot_columns(hosts, w.patch_s + SETUP, t))
                rows = _holding_rows(hosts, columns, t, np.arange(0.0, t + 1e-9, 1.0), w.patch_s)
                return bool(columns) and _holds_everything(hosts, columns, w.k, rows, memory)

            t = lp
            while t < best and not room(t):
                t += step_s
            rooms = "/".join(str(r) for r in w.room) if w.room else "plenty"
            exact = f"{best}{'' if proven else ' (not proven)'}"
            lines.append(f"| {seed} | {rooms} | {lp:.1f} | {min(t, best):.2f} | {exact} | "
                         f"{'yes' if room(float(best)) else 'NO'} |")
            print(lines[-1], file=sys.stderr, flush=True)
    return "\n".join(lines)


def _just_above_the_lp(c: int, patch_s: float, policy: SchedulerPolicy,
                       params: SimParams) -> tuple[FleetSnapshot, int, float, list[SlotHost], float, list[SlotColumn]]:
    """Night cluster ``c``: its snapshot, k, the slot LP's bound, its hosts, the time tried (the bound + 1 s)
    and the fillings a slot can have by then: what each probe starts from."""
    from drain import night_cluster

    snap, _ = night_cluster(1000 + c, f"c{c:02d}", 30, 20)
    names = [h.name for h in snap.hosts]
    k = parallel_capacity(snap, names)
    bound = window_slot_bound(snap, names, k, patch_s=patch_s).slots_s
    hosts = slot_hosts(snap, names, patch_s=patch_s, policy=policy, params=params)
    t = bound + 1.0
    return snap, k, bound, hosts, t, list(slot_columns(hosts, patch_s + params.setup_s, t))


def _sending_windows(hosts: list[SlotHost], columns: list[SlotColumn], first: float, t: float, setup: float,
                     patch_s: float, gaps: int = 5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each filling's hosts made rigid, for every order of its late hosts (the early host first) and one
    idle gap of 0, 1/(gaps − 1), ..., all of the slot's slack before its first host (a late-led slot
    starts at the first patch, ≥ the shortest ℓ): when each host may send ([start + set-up, end −
    patch], arrays [filling, way, host]) and what: its own memory and its share (by room) of the most
    the filling takes in. Every restriction (rigid hosts, a few gaps, the most taken in) can only raise
    what the filling must send within an interval: a valid interval constraint charges no more."""
    ways = 6 * gaps
    lo = np.zeros((len(columns), ways, 3))
    hi = np.zeros_like(lo)
    mib = np.zeros_like(lo)
    for j, column in enumerate(columns):
        lead = [column.leader] if column.early and column.leader is not None else []
        late = [i for i in column.hosts if i not in lead]
        taken = max(0.0, column.value + sum(hosts[i].memory_mib for i in lead))
        room = sum(hosts[i].room_mib for i in late) or 1.0
        extra = {i: taken * hosts[i].room_mib / room for i in late}
        start = 0.0 if column.early else first
        way = 0
        for rest in itertools.permutations(late):
            order = lead + list(rest)
            held = [hosts[i].hold_s + extra.get(i, 0.0) / hosts[i].rate for i in order]
            slack = max(0.0, t - start - sum(held))
            for g in range(gaps):
                at = start + slack * g / (gaps - 1)
                for pos, (i, length) in enumerate(zip(order, held, strict=True)):
                    lo[j, way, pos], hi[j, way, pos] = at + setup, at + length - patch_s
                    mib[j, way, pos] = hosts[i].memory_mib + extra.get(i, 0.0)
                    at += length
                way += 1
        lo[j, way:], hi[j, way:], mib[j, way:] = lo[j, 0], hi[j, 0], mib[j, 0]  # pad with a way already counted
    return lo, hi, mib


def _inlink_rows(hosts: list[SlotHost], columns: list[SlotColumn], first: float, t: float, setup: float,
                 patch_s: float, step_s: float = 25.0) -> list[tuple[float, np.ndarray]]:
    """Step 3' of RESULTS.md's proof ("What the cluster's slots and the patched hosts' in-links add"),
    for τ = the first patch's floor + 0, ``step_s``, ... ≤ ``t``: what the fillings must have sent
    before τ (each host its own memory, at its link, in the latest sending window its slot allows)
    is at most what the hosts patched by then can take in at their links, plus what every slot takes
    in before its hosts' maintenance. Rows (0, coefficient per filling) for :func:`_fillings_fit`."""
    taus = np.arange(first, t + 1e-9, step_s)
    rows = np.zeros((len(columns), len(taus)))
    for j, column in enumerate(columns):
        start = 0.0 if column.early else first
        lead = [column.leader] if column.early and column.leader is not None else []
        late = [i for i in column.hosts if i not in lead]
        fastest = max(hosts[i].rate for i in column.hosts)
        taken = max(0.0, min(sum(hosts[i].room_mib for i in column.hosts),
                             fastest * (t - start - sum(hosts[i].sends_s for i in column.hosts))))
        sent = np.full(len(taus), np.inf)
        into = np.zeros(len(taus))
        for rest in itertools.permutations(late):
            order = lead + list(rest)
            held = [hosts[i].hold_s for i in order]
            before, patched = np.zeros(len(taus)), np.zeros(len(taus))
            for pos, i in enumerate(order):
                lo, hi = start + sum(held[:pos]) + setup, t - sum(held[pos + 1:]) - patch_s
                before += np.clip(hosts[i].memory_mib - hosts[i].rate * np.clip(hi - np.maximum(taus, lo), 0.0, None),
                                  0.0, None)
                patched += hosts[i].rate * np.clip(taus - (start + sum(held[:pos + 1])), 0.0, None)
            sent, into = np.minimum(sent, before), np.maximum(into, patched)
        rows[j] = sent - into - taken
    return [(0.0, rows[:, q]) for q in range(len(taus))]


def _fillings_fit(hosts: list[SlotHost], columns: list[SlotColumn], k: int,
                  forced: Sequence[tuple[float, np.ndarray]] = ()) -> bool:
    """Whether whole fillings (SCIP, an integer programme) hold every host once in ``k`` slots, at least
    one early-led, taking in what the early hosts leave; and, for each (capacity, volume per filling)
    in ``forced``, the chosen fillings' volume within the capacity."""
    from ortools.linear_solver import pywraplp

    solver = pywraplp.Solver.CreateSolver("SCIP")
    y = [solver.BoolVar("") for _ in columns]
    for i in range(len(hosts)):
        solver.Add(sum(y[j] for j, c in enumerate(columns) if i in c.hosts) == 1)
    solver.Add(sum(y) <= k)
    solver.Add(sum(y[j] for j, c in enumerate(columns) if c.early) >= 1)
    solver.Add(sum(c.value * y[j] for j, c in enumerate(columns)) >= 0)
    for capacity, volume in forced:
        solver.Add(sum(float(v) * y[j] for j, v in enumerate(volume) if v != 0) <= capacity)
    return solver.Solve() in (pywraplp.Solver.OPTIMAL, pywraplp.Solver.FEASIBLE)


def probe(clusters: int = 10, patch_s: float = 420.0, grid_s: float = 50.0, longest_s: float = 1000.0) -> str:
    """Would the slot LP's bound rise if its fillings had to be whole (an integer programme), if the
    cluster's migration slots were counted in time, or the in-links of the hosts patched first? For
    each of the night's clusters, at the LP's bound + 1 s (where the LP finds room): SCIP on the
    integer programme; with, for every interval [a, b] on a ``grid_s`` grid up to ``longest_s`` long,
    the chosen fillings' forced volume within [a, b] at most C × b × (b − a) (the cluster's slots at
    their streams' rate, look-ahead tails not even counted), each filling's as
    :func:`_sending_windows` makes it (more than a valid form charges); and, apart, with
    :func:`_inlink_rows` (valid: RESULTS.md, step 3'). Room means it does not lift the bound past
    + 1 s. Not a bound: evidence of what does not bind. Deterministic (SCIP, no time limit)."""

    lines = ["| cluster | k | LP bound s | tried s | fillings | integer programme | + the cluster's slots in time "
             "(intervals that could bind) | + the patched hosts' in-links (times) | s |",
             "|---|---|---|---|---|---|---|---|---|"]
    policy, params = SchedulerPolicy(), SimParams()
    for c in range(clusters):
        started = time.monotonic()
        snap, k, bound, hosts, t, columns = _just_above_the_lp(c, patch_s, policy, params)
        lo, hi, mib = _sending_windows(hosts, columns, min(h.hold_s for h in hosts), t, params.setup_s, patch_s)
        rate = np.array([[[hosts[i].rate for i in c.hosts] + [0.0] * (3 - len(c.hosts))] for c in columns])
        cap = snap.limits.migrations_per_cluster * policy.stream_mib_s
        points = [i * grid_s for i in range(int(t // grid_s) + 1)]
        forced = []
        for a in points:
            for b in points:
                if a < b <= a + longest_s:
                    inside = np.clip(np.minimum(hi, b) - np.maximum(lo, a), 0.0, None)
                    outside = np.clip(hi - lo, 0.0, None) - inside
                    volume = np.clip(mib - rate * outside, 0.0, None).sum(axis=2).min(axis=1)
                    if np.sort(volume)[-k:].sum() > cap * (b - a):  # else no k fillings could break it
                        forced.append((cap * (b - a), volume))
        whole = _fillings_fit(hosts, columns, k)
        timed = _fillings_fit(hosts, columns, k, forced)
        inlinks = _inlink_rows(hosts, columns, min(h.hold_s for h in hosts), t, params.setup_s, patch_s)
        landing = _fillings_fit(hosts, columns, k, inlinks)
        lines.append(f"| c{c:02d} | {k} | {bound:.1f} | {t:.1f} | {len(columns)} | {'room' if whole else 'NONE'} | "
                     f"{'room' if timed else 'NONE'} ({len(forced)}) | "
                     f"{'room' if landing else 'NONE'} ({len(inlinks)}) | "
                     f"{time.monotonic() - started:.0f} |")
        print(lines[-1], file=sys.stderr, flush=True)
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=12)
    ap.add_argument("--moves", type=int, default=3, help="most moves per VM in the exact model")
    ap.add_argument("--schedules", action="store_true", help="the night's schedules tried, ÷ the valid bound")
    ap.add_argument("--probe", action="store_true",
                    help="the night's clusters: would integrality or the cluster's slots in time lift the slot LP?")
    ap.add_argument("--waste", action="store_true",
                    help="the night's clusters as the flows run them: where the slots' time goes")
    ap.add_argument("--memory", action="store_true",
                    help="the night's clusters: would the VMs' memory over time lift the slot LP?")
    ap.add_argument("--memory-tiny", action="store_true",
                    help="tiny windows: do the memory rows leave room at the exact optimum, and lift the bound?")
    ap.add_argument("--only", type=int, nargs="*", default=[], help="with --schedules: these variants only")
    ap.add_argument("--clusters", type=int, default=10, help="with --schedules: this many of the night's clusters")
    ap.add_argument("--tight", action="store_true",
                    help="hosts with room for only 2-6 x 600 MiB more (the exact model counts memory)")
    args = ap.parse_args(argv)
    if args.schedules:
        print(schedules(args.clusters, only=args.only))
        return 0
    if args.probe:
        print(probe(args.clusters))
        return 0
    if args.memory_tiny:
        print(memory_tiny(args.count))
        return 0
    if args.memory:
        print(memory_probe(args.clusters))
        return 0
    if args.waste:
        print(waste(args.clusters))
        return 0
    print("| window | hosts | VMs | k | C | patch s | room MiB | window_floor_bound s | tightest valid bound s "
          "| optimum s | floor ÷ optimum | tightest ÷ optimum | simulated (the flows' schedule) s | ÷ optimum "
          "| CP-SAT s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    worst = 0.0
    beaten: list[int] = []
    for seed in range(args.count):
        w = tiny(seed, args.tight)
        floor, bound, best, proven, sim, took = compare(w, args.moves)
        room = "/".join(str(r) for r in w.room) if w.room else "plenty"
        if best < 0:
            print(f"| {seed} | {len(w.hosts)} | {len(w.vms)} | {w.k} | {w.slots} | {w.patch_s} | {room} | "
                  f"{floor:.1f} | {bound:.1f} | none (no schedule fits the memory) | | | | | {took:.1f} |")
            continue
        worst = max(worst, bound / best)
        if sim < best - 1e-6:
            beaten.append(seed)
        simulated = "a host left unpatched" if math.isnan(sim) else f"{sim:.1f} | {sim / best:.3f}"
        print(f"| {seed} | {len(w.hosts)} | {len(w.vms)} | {w.k} | {w.slots} | {w.patch_s} | {room} | {floor:.1f} | "
              f"{bound:.1f} | {best}{'' if proven else ' (not proven)'} | {floor / best:.3f} | {bound / best:.3f} | "
              f"{simulated} | {took:.1f} |")
    print(f"\nHighest tightest bound ÷ optimum: {worst:.3f} ({'never above' if worst <= 1.0 + 1e-9 else 'ABOVE'} the "
          f"optimum). The simulator's window is one schedule within the same rules: an optimum above it would "
          f"mean the exact model forbids something the flows do ({'never' if not beaten else beaten}).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
