"""Is the window's valid lower bound at most the optimum? Exact optima of tiny windows by CP-SAT.

Not a test: prints a table (markdown). For small random windows (3-5 hosts, 1-2 VMs each) it
computes the shortest schedule exactly and compares :func:`window_floor_bound` with it, and with
what the simulator's window (the flows' schedule) takes on the same hosts.

  .venv/bin/python benchmarks/night_bound.py            # 12 windows
  .venv/bin/python benchmarks/night_bound.py --count 30
  .venv/bin/python benchmarks/night_bound.py --schedules   # the night's schedules tried, ÷ the valid bound

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
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ortools.sat.python import cp_model  # noqa: E402

from hostmaint.migration.policy import SchedulerPolicy  # noqa: E402
from hostmaint.migration.simulate import (  # noqa: E402
    SimParams,
    parallel_capacity,
    simulate_window,
    window_floor_bound,
)
from hostmaint.models import Cell, FleetSnapshot, Host, Limits, Vm  # noqa: E402

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

    def snapshot(self) -> FleetSnapshot:
        hs = tuple(Host(name=h, cluster="t", cells=(Cell(id=0, memory_mib=1 << 20, free_mib=1 << 20),))
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
        for j in range(moves):
            a = m.new_int_var(0, horizon, f"a_{name}_{j}")
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
    m.minimize(makespan)
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = time_limit_s
    solver.parameters.num_workers = 1
    status = solver.solve(m)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        raise RuntimeError(f"no schedule found: {solver.status_name(status)}")
    return int(solver.value(makespan)), status == cp_model.OPTIMAL


PARAMS = SimParams(default_link_mib_s=STREAM, setup_s=SETUP)


def tiny(seed: int) -> Tiny:
    """A random tiny window: 3-6 hosts, 1-2 VMs of 1-4 × 600 MiB each, k 1-2 (2 from 4 hosts), C 1-3,
    patch 10-40 s."""
    rng = random.Random(seed)
    hosts = tuple(f"h{i}" for i in range(rng.randint(3, 6)))
    vms = tuple((f"{h}v{j}", h, rng.randint(1, 4) * int(STREAM)) for h in hosts for j in range(rng.randint(1, 2)))
    return Tiny(hosts=hosts, vms=vms, k=2 if len(hosts) >= 4 else 1, slots=rng.randint(1, 3),
                patch_s=rng.choice((10, 20, 40)))


def compare(w: Tiny, moves: int) -> tuple[float, int, bool, float, float]:
    """The valid bound, the optimum (and whether proven), the simulator's window, CP-SAT's seconds."""
    snap = w.snapshot()
    names = list(w.hosts)
    bound = window_floor_bound(snap, names, w.k, patch_s=w.patch_s, policy=SchedulerPolicy(), params=PARAMS).total_s
    started = time.monotonic()
    best, proven = optimum(w, moves)
    took = time.monotonic() - started
    # in the flows' order: emptiest first (plan_window), as the night benchmark runs it
    emptiest = sorted(names, key=lambda h: (sum(mib for _, on, mib in w.vms if on == h), h))
    sim = simulate_window(snap, emptiest, parallel=w.k, patch_s=w.patch_s, params=PARAMS, rebalance_within=None)
    return bound, best, proven, sim.makespan_s, took


def schedules(clusters: int = 10, patch_s: float = 420.0) -> str:
    """The night's clusters (benchmarks/drain.py) under the window schedules the flows could run, each
    ÷ the valid bound: host orders and how many drains run at once. Deterministic."""
    from drain import night_cluster

    def variants(snap: FleetSnapshot, k: int) -> list[tuple[str, list[str], int | None, bool]]:
        mem = {h.name: sum(v.memory_mib for v in snap.vms_on(h.name)) for h in snap.hosts}
        e = sorted(mem, key=lambda n: (mem[n], n))
        rest = e[k:]
        alternate = [x for pair in zip(rest[::-1], rest, strict=True) for x in pair][:len(rest)]
        return [("emptiest first (the flows)", e, None, False),
                ("a host enters only when a migration slot is free", e, None, True),
                ("every host in maintenance drains", e, len(e), False),
                ("first wave emptiest, then fullest first", e[:k] + rest[::-1], None, False),
                ("first wave emptiest, then fullest and emptiest in turn", e[:k] + alternate, None, False),
                ("the same, every host in maintenance drains", e[:k] + alternate, len(e), False)]

    rows: dict[str, list[float]] = {}
    for c in range(clusters):
        snap, dirty = night_cluster(1000 + c, f"c{c:02d}", 30, 20)
        names = [h.name for h in snap.hosts]
        k = parallel_capacity(snap, names)
        bound = window_floor_bound(snap, names, k, patch_s=patch_s).total_s
        for name, order, at_once, jit in variants(snap, k):
            est = simulate_window(snap, order, dirty_rate=dirty, patch_s=patch_s, drains_at_once=at_once,
                                  just_in_time=jit, rebalance_within=None)
            rows.setdefault(name, []).append(est.makespan_s / bound)
    lines = ["| schedule | " + " | ".join(f"c{c:02d}" for c in range(clusters)) + " | worst |",
             "|---|" + "---|" * (clusters + 1)]
    for name, ratios in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{r:.3f}" for r in ratios) + f" | {max(ratios):.3f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=12)
    ap.add_argument("--moves", type=int, default=3, help="most moves per VM in the exact model")
    ap.add_argument("--schedules", action="store_true", help="the night's schedules tried, ÷ the valid bound")
    args = ap.parse_args(argv)
    if args.schedules:
        print(schedules())
        return 0
    print("| window | hosts | VMs | k | C | patch s | valid bound s | optimum s | bound ÷ optimum "
          "| simulated (the flows' schedule) s | ÷ optimum | CP-SAT s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    worst = 0.0
    beaten: list[int] = []
    for seed in range(args.count):
        w = tiny(seed)
        bound, best, proven, sim, took = compare(w, args.moves)
        worst = max(worst, bound / best)
        if sim < best - 1e-6:
            beaten.append(seed)
        print(f"| {seed} | {len(w.hosts)} | {len(w.vms)} | {w.k} | {w.slots} | {w.patch_s} | {bound:.1f} | "
              f"{best}{'' if proven else ' (not proven)'} | {bound / best:.3f} | {sim:.1f} | {sim / best:.3f} | "
              f"{took:.1f} |")
    print(f"\nHighest bound ÷ optimum: {worst:.3f} ({'never above' if worst <= 1.0 + 1e-9 else 'ABOVE'} the "
          f"optimum). The simulator's window is one schedule within the same rules: an optimum above it would "
          f"mean the exact model forbids something the flows do ({'never' if not beaten else beaten}).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
