"""How the flows drain a host: under its targets' locks, beside other hosts' drains.

Used by evacuate-host and patch-host (and so by windows and runbooks). Not a flow itself.
"""

from __future__ import annotations

from dataclasses import replace

from prefect import get_run_logger

from flows import locks
from hostmaint.errors import LockHeldError, PlanError, TargetsUnreachable, TargetsWithdrawn
from hostmaint.maintenance import RunContext, drain_share
from hostmaint.migration import DrainReport
from hostmaint.models import EvacuationPlan, FleetSnapshot, MigrationResult
from tasks import maintenance as t
from tasks.common import RuntimeRef

# A plan re-made onto hosts it did not hold locks for is taken up again with those; each round
# needs another drain to have filled a target meanwhile, so a few rounds are plenty.
RETARGET_ROUNDS = 4
# How long to wait for the targets' locks before looking at the cluster again: a target that went
# into maintenance meanwhile holds its lock for the whole maintenance, and the plan must change.
TARGET_WAIT_S = 30.0
# ... or this long when none of its targets looked busy just before: another run took one in the
# moment between (every host of a window plans at once), and a plan that moves off it can start now.
RACE_WAIT_S = 3.0
# Targets that stop answering mid-drain: the VMs that did not move are re-planned onto the others this
# many times (each time without every host lost so far), then the drain fails.
LOST_TARGET_ROUNDS = 2


def _targets(plan: EvacuationPlan) -> list[str]:
    return sorted({p.target for p in plan.placements})


def drain_planned(ref: RuntimeRef, run: RunContext, plan: EvacuationPlan, planned_on: FleetSnapshot,
                  avoid: list[str] | None = None, focus: bool = False,
                  hosts_at_once: int = 1) -> tuple[EvacuationPlan, DrainReport]:
    """Drain ``plan`` (made on ``planned_on``); return the plan that ran and its report.

    Holds the ``inbound:`` lock of every target and this drain's share of the cluster's migration
    slots (``drain_share``: what its sources' links can use, without the set-up slot when the
    ``hosts_at_once`` of a window could not all have one; flows/locks.py), so other hosts of the
    cluster drain at the same time onto other targets. Holding them, it discovers the cluster again:
    a plan that no longer fits is re-made and recorded (step ``replan``); one re-made onto targets it
    does not hold is taken up again with those; only these re-plans count against
    :data:`RETARGET_ROUNDS`. Before taking the locks, and again while targets are busy (another drain
    sends there, a host went into maintenance: every :data:`TARGET_WAIT_S`, or :data:`RACE_WAIT_S`
    when they were free a moment before), it looks at the cluster: a plan that no longer fits is
    re-made, and one that fits is moved off the busy hosts when the cluster has room for that
    (``retarget``, recorded too); otherwise it waits on. A target that stops answering while the drain
    runs (:class:`TargetsUnreachable`) is left out and what did not move is re-planned onto the other
    hosts (recorded, step ``replan``), at most :data:`LOST_TARGET_ROUNDS` times; so is what was meant for
    a target that left service meanwhile (:class:`TargetsWithdrawn`: cordoned by an operator, in another
    run's maintenance), on a discovery that shows it out of service; the report returned then holds
    every drain's migrations.
    """
    logger = get_run_logger()
    rt = ref.open()
    hosts = [h.name for h in rt.inventory.hosts_of(plan.cluster)]
    # its sources' links decide how many slots the drain can use; the rest are for the drains beside it
    share = drain_share(rt, plan, hosts_at_once)
    rounds = 0
    lost: list[str] = []  # targets that stopped answering during a drain of this run
    lost_rounds = 0
    earlier: tuple[MigrationResult, ...] = ()  # what the drains before those losses did
    while rounds < RETARGET_ROUNDS:
        busy = locks.busy_targets(hosts)
        wait_s = RACE_WAIT_S
        if set(_targets(plan)) & set(busy):
            # Another drain fills a target now (a window's hosts all plan at its start): has the
            # cluster changed under the plan, and if not, is there room off the busy hosts?
            fresh, now = t.recheck_plan(ref, run, plan, planned_on, avoid or [], focus, lost)
            planned_on = now
            if fresh != plan:
                plan = fresh
                rounds += 1
                continue
            plan = t.retarget_plan(ref, run, plan, now, busy, avoid or [], focus)
            if plan == fresh:
                wait_s = TARGET_WAIT_S  # no room elsewhere: wait for those drains
            else:
                logger.info("%s: targets busy with other drains; re-planned onto %s", ", ".join(plan.hosts),
                            ", ".join(_targets(plan)))
        held = _targets(plan)
        try:
            with locks.drain_slots(plan.cluster, held, share, wait_seconds=wait_s):
                plan, now = t.recheck_plan(ref, run, plan, planned_on, avoid or [], focus, lost)
                if set(_targets(plan)) <= set(held):
                    report = t.drain_host(ref, run, plan, now, share)
                    return plan, replace(report, results=earlier + report.results)
            logger.info("the re-made plan for %s sends VMs to %s as well: taking those", ", ".join(plan.hosts),
                        ", ".join(sorted(set(_targets(plan)) - set(held))))
        except LockHeldError:
            continue  # still busy after the wait: look at the cluster and the busy hosts again
        except TargetsWithdrawn as exc:
            # an operator cordoned a target (or a run took it into maintenance) while VMs went there: the
            # fresh discovery has it out of service, and the re-plan (recorded) sends the rest elsewhere
            if lost_rounds >= LOST_TARGET_ROUNDS:
                raise
            logger.warning("%s: %s left service during the drain; re-planning what did not move onto the "
                           "other hosts", ", ".join(plan.hosts), ", ".join(exc.hosts))
            lost_rounds += 1
            earlier += exc.report.results
            planned_on = now
            continue
        except TargetsUnreachable as exc:
            if lost_rounds >= LOST_TARGET_ROUNDS or set(exc.hosts) <= set(lost):
                raise
            logger.warning("%s: %s stopped answering during the drain; re-planning what did not move onto "
                           "the other hosts", ", ".join(plan.hosts), ", ".join(exc.hosts))
            lost_rounds += 1
            lost = sorted({*lost, *exc.hosts})
            earlier += exc.report.results
            planned_on = now
            continue
        planned_on = now
        rounds += 1
    raise PlanError(f"the plan for {', '.join(plan.hosts)} kept changing while other drains filled its targets "
                    f"({RETARGET_ROUNDS} re-plans); nothing of it ran. Run again when the cluster is quieter.")
