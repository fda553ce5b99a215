"""rebalance-cluster: level memory load with at most ``max_moves`` live migrations."""

from __future__ import annotations

from prefect import flow, get_run_logger

from flows import locks
from flows.cancel import stand_down_hook, stops_safely
from flows.common import ExactBudget, HostOutcome, Moves, default_inventory, publish_report, run_context
from flows.draining import RETARGET_ROUNDS
from flows.run_display import label_run
from hostmaint.cancel import RunCancelled
from hostmaint.errors import PlanError
from hostmaint.maintenance import RunContext
from hostmaint.migration import DrainReport
from hostmaint.models import FleetSnapshot, RebalancePlan, StepOutcome, Trigger
from hostmaint.placement import render_plan
from hostmaint.placement.exact import DEFAULT_BUDGET
from tasks import maintenance as t
from tasks.common import RuntimeRef


@flow(name="rebalance-cluster", log_prints=True, on_cancellation=[stand_down_hook])
@stops_safely  # Cancel stops its moves safely, every VM once (flows/cancel.py)
def rebalance_cluster(cluster: str, max_moves: Moves = 10, dry_run: bool = False, operator: str = "unknown",
                      inventory: str | None = None, trigger: Trigger = Trigger.UI,
                      exact_budget: ExactBudget = DEFAULT_BUDGET) -> HostOutcome:
    """Plan a rebalance, print it, and (unless dry run) carry it out, holding ``migrations:<cluster>``.
    ``exact_budget``: deterministic seconds for the planner's exact stage (0: greedy only)."""
    ref = RuntimeRef(inventory or default_inventory(), exact_budget=exact_budget)
    rt = ref.open()
    run = run_context("rebalance-cluster", trigger, operator, f"rebalance {cluster}")
    label_run("rebalance", ref.inventory, cluster=cluster, dry_run=dry_run)
    snapshot = t.discover(ref, cluster)
    expected = [v.name for v in snapshot.vms]
    plan = t.plan_rebalance_task(ref, cluster, max_moves, snapshot=snapshot)
    get_run_logger().info("rebalance plan:\n%s", render_plan(plan))
    if dry_run:
        return HostOutcome(host=cluster, outcome=StepOutcome.DRY_RUN, detail=render_plan(plan),
                           simulated=rt.simulated)
    try:
        plan, report = rebalance_locked(ref, run, plan, snapshot, max_moves)
    except RunCancelled as exc:
        publish_report(f"rebalance {cluster}", [HostOutcome(host=cluster, outcome=StepOutcome.ABORTED,
                                                            detail=str(exc), simulated=rt.simulated)])
        raise
    t.check_invariants(ref, cluster, expected, run=run)
    result = HostOutcome(host=cluster, outcome=StepOutcome.OK if report is None or report.ok else StepOutcome.FAILED,
                         migrations=list(report.results) if report else [], simulated=rt.simulated,
                         detail=f"{len(plan.moves)} move(s); balance {plan.balance_before:.4f} → "
                                f"{plan.balance_after:.4f}")
    publish_report(f"rebalance {cluster}", [result])
    return result


def rebalance_locked(ref: RuntimeRef, run: RunContext, plan: RebalancePlan, planned_on: FleetSnapshot,
                     max_moves: int | None, prefer_origin: bool = True,
                     within: float | None = None) -> tuple[RebalancePlan, DrainReport | None]:
    """Carry out ``plan`` (made on ``planned_on`` with these settings) holding the cluster's whole
    migration limit and its targets' ``inbound:`` locks; return the plan that ran and its report.

    The locks can take long to get (drains run meanwhile), so with them held the cluster is looked at
    again: a plan whose targets went into maintenance or filled up, or whose VMs moved, is re-made and
    recorded (``recheck_rebalance``), and one re-made onto hosts it does not hold is taken up again
    with those."""
    for _ in range(RETARGET_ROUNDS):
        held = sorted({m.placement.target for m in plan.moves})
        with locks.cluster_migrations(plan.cluster, held):
            plan, planned_on = t.recheck_rebalance(ref, run, plan, planned_on, max_moves, prefer_origin, within)
            if {m.placement.target for m in plan.moves} <= set(held):
                return plan, t.rebalance(ref, run, plan)
    raise PlanError(f"the rebalance of {plan.cluster} kept changing while drains filled its targets "
                    f"({RETARGET_ROUNDS} re-plans); nothing more of it ran. Run it again when the cluster is quieter.")
