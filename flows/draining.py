"""How the flows drain a host: under its targets' locks, beside other hosts' drains.

Used by evacuate-host and patch-host (and so by windows and runbooks). Not a flow itself.
"""

from __future__ import annotations

from prefect import get_run_logger

from flows import locks
from hostmaint.errors import LockHeldError, PlanError
from hostmaint.maintenance import RunContext, drain_share
from hostmaint.migration import DrainReport
from hostmaint.models import EvacuationPlan, FleetSnapshot
from tasks import maintenance as t
from tasks.common import RuntimeRef

# A plan re-made onto hosts it did not hold locks for is taken up again with those; each round
# needs another drain to have filled a target meanwhile, so a few rounds are plenty.
RETARGET_ROUNDS = 4
# How long to wait for the targets' locks before looking at the cluster again: a target that went
# into maintenance meanwhile holds its lock for the whole maintenance, and the plan must change.
TARGET_WAIT_S = 30.0


def _targets(plan: EvacuationPlan) -> list[str]:
    return sorted({p.target for p in plan.placements})


def drain_planned(ref: RuntimeRef, run: RunContext, plan: EvacuationPlan, planned_on: FleetSnapshot,
                  avoid: list[str] | None = None) -> tuple[EvacuationPlan, DrainReport]:
    """Drain ``plan`` (made on ``planned_on``); return the plan that ran and its report.

    Holds the ``inbound:`` lock of every target and this drain's share of the cluster's migration
    slots (``drain_share``: what its sources' links can use; flows/locks.py), so other hosts of the
    cluster drain at the same time onto other targets. Holding them, it discovers the cluster again:
    a plan that no longer fits is re-made and recorded (step ``replan``); one re-made onto targets it
    does not hold is taken up again with those. Targets busy for long (another drain, a host gone
    into maintenance) make it look again every :data:`TARGET_WAIT_S`; only re-made plans count
    against :data:`RETARGET_ROUNDS`.
    """
    logger = get_run_logger()
    # its sources' links decide how many slots the drain can use; the rest are for the drains beside it
    share = drain_share(ref.open(), plan)
    rounds = 0
    while rounds < RETARGET_ROUNDS:
        held = _targets(plan)
        try:
            with locks.drain_slots(plan.cluster, held, share, wait_seconds=TARGET_WAIT_S):
                plan, now = t.recheck_plan(ref, run, plan, planned_on, avoid or [])
                if set(_targets(plan)) <= set(held):
                    return plan, t.drain_host(ref, run, plan, now, share)
            logger.info("the re-made plan for %s sends VMs to %s as well: taking those", ", ".join(plan.hosts),
                        ", ".join(sorted(set(_targets(plan)) - set(held))))
        except LockHeldError:
            # still busy: has the cluster changed under the plan (a target cordoned, say)?
            plan, now = t.recheck_plan(ref, run, plan, planned_on, avoid or [])
            if _targets(plan) == held:
                planned_on = now
                continue  # the same targets: another drain is still at work there, wait on
        planned_on = now
        rounds += 1
    raise PlanError(f"the plan for {', '.join(plan.hosts)} kept changing while other drains filled its targets "
                    f"({RETARGET_ROUNDS} re-plans); nothing of it ran. Run again when the cluster is quieter.")
