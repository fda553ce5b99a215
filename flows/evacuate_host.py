"""evacuate-host: cordon → N+1 check → plan → drain → confirm the host is empty."""

from __future__ import annotations

import time

from prefect import flow, get_run_logger

from flows import locks
from flows.cancel import stand_down_hook, stops_safely
from flows.common import ExactBudget, HostOutcome, WaitSeconds, default_inventory, publish_report, run_context
from flows.draining import drain_planned
from flows.run_display import label_run, publish_plan
from hostmaint.cancel import RunCancelled
from hostmaint.errors import HostmaintError, InputError, PlanError
from hostmaint.hooks import HookPoint
from hostmaint.models import EvacuationPlan, FleetSnapshot, StepOutcome, Trigger
from hostmaint.monitoring import GatePoint, WorkKind
from hostmaint.placement import render_plan
from hostmaint.placement.exact import DEFAULT_BUDGET
from tasks import integrations as ti
from tasks import maintenance as t
from tasks.common import RuntimeRef


@flow(name="evacuate-host", log_prints=True, on_cancellation=[stand_down_hook])
@stops_safely  # Cancel stops it safely, cordoned "cancelled by X": flows/cancel.py
def evacuate_host(host: str, dry_run: bool = False, operator: str = "unknown", reason: str = "",
                  inventory: str | None = None, trigger: Trigger = Trigger.UI,
                  lock_wait_s: WaitSeconds | None = 60, approved_plan: EvacuationPlan | None = None,
                  approved_on: FleetSnapshot | None = None, exact_budget: ExactBudget = DEFAULT_BUDGET,
                  incident: bool = False) -> HostOutcome:
    """Move every VM off ``host`` and leave it cordoned and empty.

    With ``dry_run`` the plan is printed and nothing changes (one audit record says so).
    Otherwise the run holds ``host:<host>`` and a ``maintenance:<cluster>`` slot throughout
    (flows/locks.py); another run on the host makes it wait ``lock_wait_s``, then refuse.

    ``approved_plan`` (made on ``approved_on``): the plan a human approved. It is what runs, unless
    the cluster changed under it since (then the re-made plan runs and is recorded, step ``replan``,
    as any plan that waited); an approved plan that was not feasible is refused before anything moves.
    ``exact_budget``: deterministic seconds for the planner's exact stage (0: greedy only).

    The operator's world (docs/integrations.md): the cluster's monitoring gates are asked before the
    cordon (held: the host is skipped, nothing changed), except by an ``incident`` evacuation (an
    incident runbook's: it runs because the host is failing), where the gate record says they were
    bypassed and why; the host's alerts are silenced while it is out of service (until return-host,
    at most ``evacuation_silence_s``); ``pre_drain`` hooks run once the plan holds, before the drain
    (a failure leaves the host cordoned, nothing moved).
    """
    started = time.monotonic()
    ref = RuntimeRef(inventory or default_inventory(), exact_budget=exact_budget)
    rt = ref.open()
    run = run_context("evacuate-host", trigger, operator, reason)
    cluster = rt.cluster_of(host)
    label_run("evacuate", ref.inventory, host=host, cluster=cluster, dry_run=dry_run)
    logger = get_run_logger()
    if dry_run:
        plan = t.plan_evacuation(ref, run, host, dry_run=True)
        logger.info("dry run, nothing changes:\n%s", render_plan(plan))
        publish_plan(plan, host)
        outcome = HostOutcome(host=host, outcome=StepOutcome.DRY_RUN, state=rt.states.state(host),
                              detail=render_plan(plan), simulated=rt.simulated)
        publish_report(f"evacuate {host} (dry run)", [outcome])
        return outcome
    if approved_plan is not None:
        approved_plan = _approved(host, approved_plan, approved_on)  # before anything changes
    with locks.host_maintenance(host, cluster, wait_seconds=lock_wait_s, holder=rt.states.get(host).run_id):
        # migration.tls: required and a host that cannot: refused here, before anything changed
        t.precheck_transport(ref, run, host)
        # alerts firing: not now, for a planned evacuation; an incident's goes on (recorded bypassed)
        held = ti.gate_host(ref, run, host, GatePoint.BEFORE_DRAIN,
                            WorkKind.INCIDENT if incident else WorkKind.EVACUATION)
        if held:
            skipped = HostOutcome(host=host, outcome=StepOutcome.SKIPPED, state=rt.states.state(host),
                                  detail=held, simulated=rt.simulated, seconds=time.monotonic() - started)
            publish_report(f"evacuate {host}", [skipped])
            return skipped
        ti.open_evacuation_silence(ref, run, host)  # kept while the host is out; return-host ends it
        t.cordon_host(ref, run, host)
        # One discovery, after the cordon and before anything moves, is both the list of VMs the
        # invariants expect and the plan's view of the cluster (the plan used to discover again).
        snapshot = t.discover(ref, cluster)
        # migrations an earlier run started and never recorded (it died while they ran)
        t.record_found_moves(ref, run, host, snapshot)
        # VMs an earlier run shut down on this host stay down until a patch run verifies it
        stopped = rt.states.stopped_on(host)
        expected = [v.name for v in snapshot.vms]
        expected += [vm for vm in stopped if vm not in expected]
        try:
            if approved_plan is not None:
                plan, planned_on = approved_plan, approved_on or snapshot
                logger.info("the approved plan:\n%s", render_plan(plan))
            else:
                # hosts another drain fills right now come last, so this drain can run beside it; not
                # focused: the VMs stay where they land, so they are balanced over every host
                busy = locks.busy_targets([h.name for h in rt.inventory.hosts_of(cluster)])
                plan, planned_on = t.plan_evacuation(ref, run, host, snapshot=snapshot, busy=busy), snapshot
                logger.info("plan:\n%s", render_plan(plan))
            publish_plan(plan, host)
            ti.run_hooks(ref, run, host, HookPoint.PRE_DRAIN)  # failed: cordoned, nothing moved
            plan, report = drain_planned(ref, run, plan, planned_on)
            t.check_invariants(ref, cluster, expected, stopped, run=run)
            stopped = sorted({*stopped, *t.stop_unmigratable(ref, run, plan)})
            t.confirm_empty(ref, run, host)
            t.check_invariants(ref, cluster, expected, stopped, run=run)
        except HostmaintError as exc:
            outcome = HostOutcome(host=host, outcome=StepOutcome.ABORTED if isinstance(exc, RunCancelled)
                                  else StepOutcome.FAILED, state=rt.states.state(host),
                                  detail=str(exc), simulated=rt.simulated, seconds=time.monotonic() - started)
            publish_report(f"evacuate {host}", [outcome])
            raise
        outcome = HostOutcome(host=host, outcome=StepOutcome.OK, state=rt.states.state(host),
                              migrations=list(report.results), simulated=rt.simulated,
                              seconds=time.monotonic() - started,
                              detail=report.summary() + "; host left cordoned")
        publish_report(f"evacuate {host}", [outcome])
        return outcome


def _approved(host: str, plan: EvacuationPlan, planned_on: FleetSnapshot | None) -> EvacuationPlan:
    """The approved plan, if it is one this run may carry out: of ``host`` alone, made on the snapshot
    given with it, and feasible when it was shown (a dry-run plan is printed even when it is not)."""
    if plan.hosts != (host,):
        raise InputError(f"approved_plan: it evacuates {', '.join(plan.hosts) or 'no host'}, not {host}")
    if planned_on is None or planned_on.digest() != plan.snapshot_digest:
        raise InputError("approved_on: the snapshot the approved plan was made on is required, and must be that one")
    if not plan.feasible:
        raise PlanError(f"the approved plan for {host} cannot be carried out: " + "; ".join(plan.refusals))
    return plan
