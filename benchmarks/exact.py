"""Where the planner's exact stage (placement/exact.py) pays off, by cluster size.

For each size, seeded fleets from ``generate_fleet`` with a 40-VM host to drain: ``plan_evacuation``
with the exact stage off (budget 0: the greedy alone) and on (the default budget), timed end to end
(snapshot hashing included). Printed per size: the p50 wall time of each, the proofs the exact
stage reached, and what it changed (VMs placed, NUMA-local, peak host utilisation). Ratios are
against the greedy measured in the same run; nothing here is a pass/fail test.

    .venv/bin/python benchmarks/exact.py [--seeds 3] [--sizes 10,25,50,100,200,1000]

Parts run alone: ``--refusals`` (tight drains of generated 12-host fleets: placed, NUMA-local and
refusal cores, greedy against exact); ``--families`` (tight drains of the real-shape families of
tests/fleet_shapes.py against the exact reference of tests/placement_oracle.py: NUMA-local count
per family, refusal cores checked by the oracle's model); ``--rebalance 8,12,20,...`` (a
rebalance's moves to level and peak within a move budget, greedy against exact, by cluster size).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hostmaint.models import EvacuationPlan, FleetSnapshot  # noqa: E402
from hostmaint.placement import plan_evacuation  # noqa: E402
from hostmaint.placement.exact import DEFAULT_BUDGET  # noqa: E402
from hostmaint.placement.synthetic import generate_fleet  # noqa: E402


def _timed(run: object) -> tuple[EvacuationPlan, float]:
    t0 = time.perf_counter()
    plan = run()  # type: ignore[operator]
    return plan, time.perf_counter() - t0


def _peak(plan: EvacuationPlan) -> float:
    return plan.balance.host_max_mean if plan.balance is not None else 0.0


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--sizes", default="10,25,50,100,200,1000")
    ap.add_argument("--vms", type=int, default=40)
    ap.add_argument("--budget", type=float, default=DEFAULT_BUDGET)
    ap.add_argument("--families", action="store_true",
                    help="only the tight drains of the real-shape families against the exact reference")
    ap.add_argument("--family-seeds", type=int, default=2)
    ap.add_argument("--family-list", default="", help="only these families (comma-separated)")
    ap.add_argument("--refusals", action="store_true", help="only the tight drains of generated 12-host fleets")
    ap.add_argument("--rebalance", default="",
                    help="only the rebalance table, at these cluster sizes (e.g. 8,12,20,30,50,100)")
    ap.add_argument("--reference-seconds", type=float, default=5.0,
                    help="deterministic CP-SAT seconds per stage of the reference (tests/placement_oracle.py)")
    args = ap.parse_args(argv)
    if args.families:
        families(args.family_seeds, args.budget, args.reference_seconds,
                 [f for f in args.family_list.split(",") if f])
        return 0
    if args.rebalance:
        rebalances(args.rebalance, args.seeds, args.budget)
        return 0
    if args.refusals:
        refusals(args.seeds, args.budget)
        return 0
    print(f"exact stage budget {args.budget:g} deterministic s; {args.vms} VMs drained; p50 of {args.seeds} seeds")
    print("| hosts | greedy p50 s | with exact p50 s | ratio | proofs | more placed | more local | "
          "max/mean greedy → exact |")
    print("|---|---|---|---|---|---|---|---|")
    for size in (int(s) for s in args.sizes.split(",")):
        greedy_s, exact_s, proofs = [], [], Counter()
        placed = local = 0
        peaks = []
        for seed in range(args.seeds):
            snap = generate_fleet(seed, size, fill=(0.5, 0.8), drain_vms=args.vms)
            g, tg = _timed(lambda snap=snap: plan_evacuation(snap, ["h0000"], exact_budget=0))
            e, te = _timed(lambda snap=snap: plan_evacuation(snap, ["h0000"], exact_budget=args.budget))
            greedy_s.append(tg)
            exact_s.append(te)
            proofs[e.proof.label] += 1
            placed += len(e.placements) - len(g.placements)
            local += sum(p.numa_local for p in e.placements) - sum(p.numa_local for p in g.placements)
            peaks.append((_peak(g), _peak(e)))
        pg, pe = statistics.median(greedy_s), statistics.median(exact_s)
        peak = " ".join(f"{a:.3f}→{b:.3f}" for a, b in peaks)
        print(f"| {size} | {pg:.3f} | {pe:.3f} | {pe / pg:.1f}× | "
              f"{', '.join(f'{n} {k}' for k, n in sorted(proofs.items()))} | {placed} | {local} | {peak} |",
              flush=True)
    refusals(args.seeds, args.budget)
    return 0


def refusals(seeds: int, budget: float) -> None:
    """Tight drains (two hosts of a 12-host cluster filled to 55-80 %): what the greedy refuses, what
    the exact stage places and proves."""
    print(f"\nTight drains: 2 of 12 hosts drained, fill 0.55-0.8, budget {budget:g}")
    print("| seed | VMs | placed greedy / exact | NUMA-local greedy / exact | proof | blockers with a core "
          "| minimal | core sizes | exact s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for seed in range(seeds + 3):
        snap = generate_fleet(seed, 12, fill=(0.55, 0.8), drain_vms=20)
        drained = ["h0000", "h0003"]
        moving = sum(1 for v in snap.vms if v.host in drained and v.migratable)
        g = plan_evacuation(snap, drained, exact_budget=0)
        e, te = _timed(lambda snap=snap, drained=drained: plan_evacuation(snap, drained, exact_budget=budget))
        cored = [b for b in e.blocked if b.core]
        minimal = sum(1 for b in cored if len(b.core) == 1 or "a minimal set" in b.reason)
        print(f"| {seed} | {moving} | {len(g.placements)} / {len(e.placements)} "
              f"| {sum(p.numa_local for p in g.placements)} / {sum(p.numa_local for p in e.placements)} "
              f"| {e.proof.label} | {len(cored)}/{len(e.blocked)} | {minimal}/{len(cored)} "
              f"| {' '.join(str(len(b.core)) for b in cored) or '-'} | {te:.2f} |", flush=True)


def rebalances(sizes: str, seeds: int, budget: float) -> None:
    """A rebalance's exact stage by cluster size (generated fleets filled 30-90 %): with ``within``
    10 points, the moves to level (greedy alone against with the exact stage); with a budget of 5 %
    of the VMs and no ``within``, the highest host utilisation over the mean it reaches."""
    from hostmaint.placement import plan_rebalance

    print(f"\nRebalance: generated fleets, fill 0.3-0.9, budget {budget:g}; p50 of {seeds} seeds for times")
    print("| hosts | VMs | within 10 %: moves greedy → exact | proofs | s greedy / exact (ratio) "
          "| 5 % of VMs, no within: max/mean greedy → exact | proofs | s greedy / exact (ratio) |")
    print("|---|---|---|---|---|---|---|---|")
    for size in (int(n) for n in sizes.split(",")):
        level, peak, t_level, t_peak, proofs_level, proofs_peak, vms = [], [], [], [], Counter(), Counter(), []
        for seed in range(seeds):
            s = generate_fleet(seed, size, fill=(0.3, 0.9))
            vms.append(len(s.vms))
            g, tg = _timed(lambda s=s: plan_rebalance(s, None, prefer_origin=False, within=0.10, exact_budget=0))
            e, te = _timed(lambda s=s: plan_rebalance(s, None, prefer_origin=False, within=0.10,
                                                      exact_budget=budget))
            level.append(f"{len(g.moves)}→{len(e.moves)}")
            t_level.append((tg, te))
            proofs_level[e.proof.label] += 1
            cap = max(1, len(s.vms) // 20)
            g, tg = _timed(lambda s=s, cap=cap: plan_rebalance(s, cap, prefer_origin=False, exact_budget=0))
            e, te = _timed(lambda s=s, cap=cap: plan_rebalance(s, cap, prefer_origin=False, exact_budget=budget))
            peak.append(f"{g.spread_after.host_max_mean:.3f}→{e.spread_after.host_max_mean:.3f}"
                        if g.spread_after and e.spread_after else "-")
            t_peak.append((tg, te))
            proofs_peak[e.proof.label] += 1

        def times(ts: list[tuple[float, float]]) -> str:
            a, b = statistics.median(t for t, _ in ts), statistics.median(t for _, t in ts)
            return f"{a:.2f} / {b:.2f} ({b / a:.0f}×)"

        print(f"| {size} | {statistics.median(vms):.0f} | {' '.join(level)} "
              f"| {', '.join(f'{n} {k}' for k, n in sorted(proofs_level.items()))} | {times(t_level)} "
              f"| {' '.join(peak)} | {', '.join(f'{n} {k}' for k, n in sorted(proofs_peak.items()))} "
              f"| {times(t_peak)} |", flush=True)


def families(seeds: int, budget: float, ref_seconds: float, only_these: Sequence[str] = ()) -> None:
    """Tight drains of the real-shape families (tests/fleet_shapes.py: 8 hosts filled to 70-90 %, 40
    VMs to move) where not every VM fits, against the exact reference of tests/placement_oracle.py
    (its own CP-SAT model from the docs, no planner code: most placed, then most NUMA-local). Per
    family: VMs placed and NUMA-local, ours (the greedy alone, and with the exact stage) against
    the reference's; the refusal cores, each checked by the oracle's model (the set cannot be
    placed; for cores of up to 6 VMs, without any one member the rest can; 5 deterministic s each)."""
    from dataclasses import replace

    from tests.fleet_shapes import DRAINED, FAMILIES, generate
    from tests.placement_oracle import oracle_max_placed, reference

    def only(s: FleetSnapshot, names: set[str]) -> FleetSnapshot:
        return s.model_copy(update={"vms": tuple(v for v in s.vms if v.host != DRAINED or v.name in names)})

    print(f"\nReal-shape families, tight drains where not every VM fits: 8 hosts, fill 0.7-0.9, 40 VMs, "
          f"seeds 0-{seeds - 1}, budget {budget:g}; reference {ref_seconds:g} deterministic s per stage")
    print("| family | tight drains | placed greedy / exact / ref | NUMA-local greedy / exact / ref | local = ref "
          "| blockers with a core | minimal | core size median (max) | cores the oracle finds infeasible "
          "(minimal) | plan p50 s greedy / exact (ratio) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    equal = drains = 0
    for family in only_these or sorted(FAMILIES):
        rows = []
        for seed in range(seeds):
            s = generate(replace(FAMILIES[family], fill=(0.7, 0.9)), seed, 8, 40)
            g, tg = _timed(lambda s=s: plan_evacuation(s, [DRAINED], spare_hosts=0, exact_budget=0))
            e, te = _timed(lambda s=s: plan_evacuation(s, [DRAINED], spare_hosts=0, exact_budget=budget))
            movers = sum(1 for v in s.vms_on(DRAINED) if v.migratable)
            if len(e.placements) == movers:
                continue  # everything fits: not a tight drain
            ref = reference(s, {DRAINED}, ref_seconds)
            sizes, infeasible, minimal, checked = [], 0, 0, 0
            for b in e.blocked:
                if not b.core:
                    continue
                sizes.append(len(b.core))
                infeasible += oracle_max_placed(only(s, set(b.core)), {DRAINED}, 5.0) == len(b.core) - 1
                if len(b.core) <= 6:
                    checked += 1
                    minimal += all(oracle_max_placed(only(s, set(b.core) - {d}), {DRAINED}, 5.0) == len(b.core) - 1
                                   for d in b.core)
            rows.append((g, e, ref, tg, te, sizes, infeasible, minimal, checked))
        if not rows:
            print(f"| {family} | 0 | | | | | | | | |", flush=True)
            continue

        def local(p: EvacuationPlan) -> int:
            return sum(x.numa_local for x in p.placements)
        same = sum(1 for _, e, ref, *_ in rows if ref.placed == len(e.placements) and ref.local == local(e))
        above = sum(1 for _, e, ref, *_ in rows if (len(e.placements), local(e)) > (ref.placed or 0, ref.local or 0))
        unproven = sum(1 for _, _, ref, *_ in rows if not ref.proven)
        equal += same + above
        drains += len(rows)
        sizes = [n for r in rows for n in r[5]]
        blocked = sum(len(e.blocked) for _, e, *_ in rows)
        minimal_said = sum(1 for _, e, *_ in rows for b in e.blocked if b.core and "a minimal set" in b.reason
                           or len(b.core) == 1)
        tg = statistics.median(r[3] for r in rows)
        te = statistics.median(r[4] for r in rows)
        print(f"| {family} | {len(rows)} | {sum(len(g.placements) for g, *_ in rows)} / "
              f"{sum(len(e.placements) for _, e, *_ in rows)} / {sum(ref.placed or 0 for _, _, ref, *_ in rows)} "
              f"| {sum(local(g) for g, *_ in rows)} / {sum(local(e) for _, e, *_ in rows)} / "
              f"{sum(ref.local or 0 for _, _, ref, *_ in rows)} | {same + above}/{len(rows)}"
              f"{f' ({above} above an unproven reference)' if above else ''}"
              f"{f'; reference unproven in {unproven}' if unproven else ''} "
              f"| {len(sizes)}/{blocked} | {minimal_said}/{len(sizes)} "
              f"| {statistics.median(sizes) if sizes else '-'} ({max(sizes, default='-')}) "
              f"| {sum(r[6] for r in rows)}/{len(sizes)} ({sum(r[7] for r in rows)}/{sum(r[8] for r in rows)}) "
              f"| {tg:.2f} / {te:.2f} ({te / tg:.0f}×) |", flush=True)
    print(f"\nNUMA-local count at least the exact reference's (placed equal): {equal}/{drains} tight drains")


if __name__ == "__main__":
    raise SystemExit(main())
