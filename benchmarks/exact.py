"""Where the planner's exact stage (placement/exact.py) pays off, by cluster size.

For each size, seeded fleets from ``generate_fleet`` with a 40-VM host to drain: ``plan_evacuation``
with the exact stage off (budget 0: the greedy alone) and on (the default budget), timed end to end
(snapshot hashing included). Printed per size: the p50 wall time of each, the proofs the exact
stage reached, and what it changed (VMs placed, NUMA-local, peak host utilisation). Ratios are
against the greedy measured in the same run; nothing here is a pass/fail test.

    .venv/bin/python benchmarks/exact.py [--seeds 3] [--sizes 10,25,50,100,200,1000]
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

from hostmaint.models import EvacuationPlan  # noqa: E402
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
    args = ap.parse_args(argv)
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
    print("| seed | VMs | greedy placed | exact placed | proof | blockers with a core | exact s |")
    print("|---|---|---|---|---|---|---|")
    for seed in range(seeds + 3):
        snap = generate_fleet(seed, 12, fill=(0.55, 0.8), drain_vms=20)
        drained = ["h0000", "h0003"]
        moving = sum(1 for v in snap.vms if v.host in drained and v.migratable)
        g = plan_evacuation(snap, drained, exact_budget=0)
        e, te = _timed(lambda snap=snap, drained=drained: plan_evacuation(snap, drained, exact_budget=budget))
        cored = sum(1 for b in e.blocked if b.core)
        print(f"| {seed} | {moving} | {len(g.placements)} | {len(e.placements)} | {e.proof.label} | "
              f"{cored}/{len(e.blocked)} | {te:.2f} |", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
