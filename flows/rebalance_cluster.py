"""rebalance-cluster: level memory load with at most ``max_moves`` live migrations."""

from __future__ import annotations

from prefect import flow, get_run_logger

from flows import locks
from flows.common import HostOutcome, default_inventory, publish_report, run_context
from hostmaint.models import StepOutcome, Trigger
from hostmaint.placement import render_plan
from tasks import maintenance as t
from tasks.common import RuntimeRef


@flow(name="rebalance-cluster", log_prints=True)
def rebalance_cluster(cluster: str, max_moves: int = 10, dry_run: bool = False, operator: str = "unknown",
                      inventory: str | None = None, trigger: Trigger = Trigger.UI) -> HostOutcome:
    """Plan a rebalance, print it, and (unless dry run) carry it out, holding ``migrations:<cluster>``."""
    ref = RuntimeRef(inventory or default_inventory())
    rt = ref.open()
    run = run_context("rebalance-cluster", trigger, operator, f"rebalance {cluster}")
    expected = [v.name for v in t.discover(ref, cluster).vms]
    plan = t.plan_rebalance_task(ref, cluster, max_moves)
    get_run_logger().info("rebalance plan:\n%s", render_plan(plan))
    if dry_run:
        return HostOutcome(host=cluster, outcome=StepOutcome.DRY_RUN, state="-", detail=render_plan(plan),
                           simulated=rt.simulated)
    with locks.cluster_migrations(cluster, [m.placement.target for m in plan.moves]):
        report = t.rebalance(ref, run, plan)
    t.check_invariants(ref, cluster, expected)
    result = HostOutcome(host=cluster, outcome=StepOutcome.OK if report is None or report.ok else StepOutcome.FAILED,
                         state="-", migrations=list(report.results) if report else [], simulated=rt.simulated,
                         detail=f"{len(plan.moves)} move(s); balance {plan.balance_before:.4f} → "
                                f"{plan.balance_after:.4f}")
    publish_report(f"rebalance {cluster}", [result])
    return result
