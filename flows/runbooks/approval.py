"""Plan → ask a human → record the answer. Shared by the runbooks and the evacuate-host deployment.

The run pauses with ``pause_flow_run(wait_for_input=ApprovalInput)``: the process
stays up (so it keeps its host lock) and the Prefect UI shows a Resume form with
the fields below. Prefect OSS records no user identity, so the approver types
their name; it goes into the audit trail with the answer and the comment.
"""

from __future__ import annotations

from dataclasses import replace
from enum import StrEnum

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import State
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from pydantic import Field

from flows import locks
from flows.common import HostOutcome, default_inventory, run_context
from flows.evacuate_host import evacuate_host
from flows.params import check_host
from flows.run_display import label_run, rejected, running_again_after_pause_timeout, shown_here
from hostmaint.display import markdown_code, markdown_text, visible
from hostmaint.errors import PlanError
from hostmaint.maintenance import RunContext, audited
from hostmaint.models import EvacuationPlan, HostState, Step, StepOutcome, Trigger
from hostmaint.placement import render_plan
from hostmaint.resize import ResizePlan
from hostmaint.runtime import Runtime
from tasks.common import RuntimeRef
from tasks.maintenance import cordon_host, discover, plan_evacuation


class Severity(StrEnum):
    """How bad an incident is. Only ``critical`` acts without waiting for a human."""

    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"

    @classmethod
    def parse(cls, value: str | None) -> Severity:
        """Read a severity from an event; anything unknown asks for approval (``warning``)."""
        try:
            return cls((value or "").strip().lower())
        except ValueError:
            return cls.WARNING


class ApprovalInput(RunInput):
    """What the approver fills in on the paused run's Resume form."""

    operator: str = Field(min_length=1, max_length=120, pattern=r"\S", title="Your name",
                          description="Who decides; written into the audit trail.")
    approve: bool = Field(default=False, title="Approve",
                          description="Yes: carry out the plan shown in the run's artifacts. No: change nothing more.")
    comment: str = Field(default="", max_length=1000, title="Comment", description="Why; kept in the audit trail.")


def show_plan(plan: EvacuationPlan, host: str, why: str) -> str:
    """Print the plan to the run log and publish it as the run's artifact; return the text."""
    text = render_plan(plan)
    get_run_logger().info("plan for %s (%s):\n%s", visible(host), visible(why), text)
    # the reason comes from an event and the plan names VMs: neither may format the page the approver reads
    create_markdown_artifact(f"# Evacuation plan for {markdown_text(host)}\n\nWhy: {markdown_text(why)}\n\n"
                             f"{markdown_code(text)}",
                             key=f"plan-{host.lower().replace('.', '-').replace('_', '-')}",
                             description=f"evacuation plan for {host}")
    return text


def ask_approval(rt: Runtime, run: RunContext, host: str, plan: EvacuationPlan | ResizePlan, *, timeout_s: int,
                 poll_interval_s: int, automatic: str | None = None) -> ApprovalInput:
    """Pause for an :class:`ApprovalInput` (or approve at once when ``automatic`` gives the reason); audit it.

    A pause that times out counts as "not approved". The audit record ``approval``
    carries the approver as its operator, the answer, the comment and the plan digest.
    """
    timed_out = False
    if automatic is not None:
        answer = ApprovalInput(operator=f"automatic: {automatic}", approve=True, comment=automatic)
    else:
        get_run_logger().info("waiting for approval of the plan for %s: open this run in the Prefect UI, "
                              "menu ⋮ → Resume, and answer (times out after %ss)", host, timeout_s)
        try:
            answer = pause_flow_run(wait_for_input=ApprovalInput, timeout=timeout_s, poll_interval=poll_interval_s,
                                    key=f"approve-{host}")
        except FlowPauseTimeout:
            running_again_after_pause_timeout()
            timed_out = True
            answer = ApprovalInput(operator="nobody", approve=False,
                                   comment=f"no answer within {timeout_s}s; nothing was approved")
    decided = replace(run, operator=answer.operator)
    with audited(rt, decided, Step.APPROVAL, host=host,
                 inputs={"plan_digest": plan.snapshot_digest,
                         "placements": len(plan.placements) if isinstance(plan, EvacuationPlan) else int(
                             plan.migration is not None),
                         "requested_by": run.operator}) as rec:
        rec.details.update({"approve": answer.approve, "approver": answer.operator, "comment": answer.comment,
                            "automatic": automatic is not None, "timed_out": timed_out})
        rec.outcome = StepOutcome.OK if answer.approve else StepOutcome.SKIPPED
    get_run_logger().info("%s by %s%s", "approved" if answer.approve else "NOT approved", visible(answer.operator),
                          f": {visible(answer.comment)}" if answer.comment else "")
    return answer


@task(name="keep-cordoned", cache_policy=NO_CACHE)  # untagged: see tasks/maintenance.py
def keep_cordoned(ref: RuntimeRef, run: RunContext, host: str, reason: str) -> HostState:
    """Leave ``host`` cordoned with ``reason``, outside any maintenance, until an operator returns it
    to service (``hostmaint host uncordon``); audited.

    The cordon this runbook began remembered the host as ``active``: left so, the host's next patch
    would end by putting it back into service, degraded or not. Set aside, a later patch leaves it
    cordoned, as it does an operator's cordon."""
    rt = ref.open()
    with audited(rt, run, Step.KEEP_CORDONED, host=host, inputs={"reason": reason}) as rec:
        before = rt.states.get(host)
        rec.details["state_before"] = before.state.value
        rec.details["prior_state_before"] = before.prior_state.value if before.prior_state else None
        return rt.states.set_aside(host, reason, run.run_id).state


def nothing_to_approve(plan: EvacuationPlan, host: str, after: str) -> None:
    """Refuse an evacuation plan that is not feasible before asking anyone to approve it: no answer could
    move a VM (an approved plan must be feasible), so a human would be paged for nothing and the run would
    hold the host's lock until the answer or the timeout, only to fail then."""
    if not plan.feasible:
        raise PlanError(f"no evacuation of {host} to approve: " + "; ".join(plan.refusals) + f"; {after}")


def run_incident(*, flow: str, host: str, reason: str, source: str, inventory: str | None,
                 automatic: str | None, event: dict[str, object], approval_timeout_s: int, poll_interval_s: int,
                 lock_wait_s: float | None) -> HostOutcome | State:
    """The incident runbook: lock the host, cordon it, show the plan, ask, evacuate if approved, keep it cordoned.

    Rejected or timed out: the host stays cordoned and no VM moves. Approved: the
    evacuate-host flow runs as a subflow under the approver's name (the lock is
    re-entered, not waited for), and the host is left cordoned with ``reason``.
    """
    inv = inventory or default_inventory()
    check_host(host, inv)
    label_run(flow.removesuffix("-runbook").replace("-", " "), inv, host=host)
    ref = RuntimeRef(inv)
    rt = ref.open()
    run = run_context(flow, Trigger.EVENT, source, reason)
    with audited(rt, run, Step.INCIDENT, host=host, inputs={"reason": reason, **event}) as rec:
        rec.details["automatic"] = automatic
    with locks.host_maintenance(host, rt.cluster_of(host), wait_seconds=lock_wait_s):
        cordon_host(ref, run, host)
        # the plan shown is the plan that runs once approved (or a recorded re-plan if the cluster
        # changed meanwhile): it goes to the evacuation with the snapshot it was made on
        snapshot = discover(ref, rt.cluster_of(host))
        plan = plan_evacuation(ref, run, host, dry_run=True, snapshot=snapshot)
        show_plan(plan, host, reason)
        if not plan.feasible:
            keep_cordoned(ref, run, host, reason)
            nothing_to_approve(plan, host, f"the host stays cordoned ({reason})")
        answer = ask_approval(rt, run, host, plan, timeout_s=approval_timeout_s, poll_interval_s=poll_interval_s,
                              automatic=automatic)
        if not answer.approve:
            keep_cordoned(ref, run, host, reason)
            return rejected(HostOutcome(host=host, outcome=StepOutcome.SKIPPED, state=rt.states.state(host),
                                        simulated=rt.simulated,
                                        detail=f"evacuation not approved by {answer.operator}"
                                               f"{': ' + answer.comment if answer.comment else ''}; "
                                               "host left cordoned"))
        result = shown_here(f"evacuate {host}", evacuate_host(
            host=host, operator=answer.operator, reason=reason, inventory=inv, trigger=Trigger.EVENT,
            lock_wait_s=lock_wait_s, approved_plan=plan, approved_on=snapshot, incident=True))
        keep_cordoned(ref, replace(run, operator=answer.operator), host, reason)
    return result.model_copy(update={"state": rt.states.state(host).value,
                                     "detail": f"{result.detail}; approved by {answer.operator}"})
