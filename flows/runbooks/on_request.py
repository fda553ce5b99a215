"""Flows behind the UI forms: a pydantic request model in, the lead's flow out.

Each takes one request model (flows/params.py), so the Prefect UI shows a form
with titles, descriptions and validation, and the run checks the host or cluster
against the inventory before anything happens.
"""

from __future__ import annotations

from prefect import flow
from prefect.client.schemas.objects import State

from flows import locks
from flows.cancel import stand_down_hook, stops_safely
from flows.common import ApprovalSeconds, HostOutcome, PollSeconds, WaitSeconds, default_inventory, run_context
from flows.evacuate_host import evacuate_host
from flows.params import EvacuationRequest, PatchRequest, RebalanceRequest, ReturnRequest
from flows.patch_host import patch_host
from flows.rebalance_cluster import rebalance_cluster
from flows.return_host import return_host
from flows.run_display import label_run, rejected, shown_here
from flows.runbooks.approval import ask_approval, nothing_to_approve, show_plan
from hostmaint.models import EvacuationPlan, FleetSnapshot, StepOutcome, Trigger
from tasks.common import RuntimeRef
from tasks.maintenance import discover, plan_evacuation


@flow(name="evacuate-on-request", log_prints=True, on_cancellation=[stand_down_hook])
@stops_safely  # Cancel stops its host's subflow safely (flows/cancel.py)
def evacuate_on_request(request: EvacuationRequest, approval_timeout_s: ApprovalSeconds = 3600,
                        poll_interval_s: PollSeconds = 10, lock_wait_s: WaitSeconds | None = 60) -> HostOutcome | State:
    """Evacuate one host as asked in the form; with approval required, show the plan and wait for a yes."""
    inv = request.inventory or default_inventory()
    label_run("evacuate", inv, host=request.host, dry_run=request.dry_run)

    def evacuate(dry_run: bool = False, approved: tuple[EvacuationPlan, FleetSnapshot] | None = None
                 ) -> HostOutcome:
        plan, snapshot = approved if approved is not None else (None, None)
        return shown_here(f"evacuate {request.host}" + (" (dry run)" if dry_run else ""), evacuate_host(
            host=request.host, dry_run=dry_run, operator=request.operator, reason=request.reason, inventory=inv,
            trigger=Trigger.UI, lock_wait_s=lock_wait_s, approved_plan=plan, approved_on=snapshot,
            exact_budget=request.exact_budget))

    if request.dry_run:
        return evacuate(dry_run=True)
    if not request.approval_required:
        return evacuate()
    ref = RuntimeRef(inv, exact_budget=request.exact_budget)
    rt = ref.open()
    run = run_context("evacuate-on-request", Trigger.UI, request.operator, request.reason)
    with locks.host_maintenance(request.host, rt.cluster_of(request.host), wait_seconds=lock_wait_s):
        # the plan shown is the plan that runs once approved (or a recorded re-plan if the cluster
        # changed meanwhile)
        snapshot = discover(ref, rt.cluster_of(request.host))
        plan = plan_evacuation(ref, run, request.host, dry_run=True, snapshot=snapshot)
        show_plan(plan, request.host, request.reason)
        nothing_to_approve(plan, request.host, "nothing changed")
        answer = ask_approval(rt, run, request.host, plan, timeout_s=approval_timeout_s,
                              poll_interval_s=poll_interval_s)
        if not answer.approve:
            return rejected(HostOutcome(host=request.host, outcome=StepOutcome.SKIPPED, simulated=rt.simulated,
                                        state=rt.states.state(request.host),
                                        detail=f"not approved by {answer.operator}: {answer.comment}; "
                                               "nothing changed"))
        return evacuate(approved=(plan, snapshot))


@flow(name="patch-on-request", log_prints=True, on_cancellation=[stand_down_hook])
@stops_safely  # Cancel stops its host's subflow safely (flows/cancel.py)
def patch_on_request(request: PatchRequest, lock_wait_s: WaitSeconds | None = 60) -> HostOutcome:
    """Patch one host as asked in the form."""
    label_run("patch", request.inventory or default_inventory(), host=request.host, dry_run=request.dry_run)
    return shown_here(f"patch {request.host}", patch_host(
        host=request.host, operator=request.operator, reason=request.reason, dry_run=request.dry_run,
        inventory=request.inventory or default_inventory(), trigger=Trigger.UI, return_vms=request.return_vms,
        lock_wait_s=lock_wait_s, exact_budget=request.exact_budget))


@flow(name="rebalance-on-request", log_prints=True, on_cancellation=[stand_down_hook])
@stops_safely  # Cancel stops its rebalance subflow safely (flows/cancel.py)
def rebalance_on_request(request: RebalanceRequest) -> HostOutcome:
    """Rebalance one cluster as asked in the form."""
    label_run("rebalance", request.inventory or default_inventory(), cluster=request.cluster, dry_run=request.dry_run)
    return shown_here(f"rebalance {request.cluster}", rebalance_cluster(
        cluster=request.cluster, max_moves=request.max_moves, dry_run=request.dry_run, operator=request.operator,
        inventory=request.inventory or default_inventory(), trigger=Trigger.UI, exact_budget=request.exact_budget))


@flow(name="return-on-request", log_prints=True, on_cancellation=[stand_down_hook])
@stops_safely  # Cancel stops its return-host subflow safely (flows/cancel.py)
def return_on_request(request: ReturnRequest, lock_wait_s: WaitSeconds | None = 60) -> HostOutcome:
    """End a host's evacuation as asked in the form: verify, put back, return its VMs (or rebalance)."""
    label_run("return", request.inventory or default_inventory(), host=request.host)
    return shown_here(f"return {request.host}", return_host(
        host=request.host, operator=request.operator, reason=request.reason, then=request.then,
        inventory=request.inventory or default_inventory(), trigger=Trigger.UI, lock_wait_s=lock_wait_s))
