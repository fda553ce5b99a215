"""The runbooks and the approval pause, under the session's Prefect test server, on a SIMULATED fleet.

A paused run is resumed the way the UI does it (``resume_flow_run`` with the
``ApprovalInput`` fields); the audit trail must name whoever answered.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from prefect.client.schemas.objects import State, StateType
from prefect.events import DeploymentEventTrigger
from prefect.events.schemas.events import ReceivedEvent
from prefect.flow_runs import resume_flow_run
from prefect.server.utilities.user_templates import render_user_template_sync
from prefect_support import ALL_VMS, in_background, lost, wait_paused, where

from deployments.serve import DEGRADED_EVENT, HARDWARE_EVENT, degraded_trigger, hardware_trigger, host_event_resource
from flows.common import HostOutcome
from flows.params import EvacuationRequest
from flows.run_display import PlanRejected
from flows.runbooks.degraded_host import degraded_host_runbook
from flows.runbooks.hardware_check import hardware_check_failed_runbook
from flows.runbooks.on_request import evacuate_on_request
from hostmaint.audit import AuditTrail
from hostmaint.db import open_engine
from hostmaint.errors import InputError
from hostmaint.models import HostState, StepOutcome
from hostmaint.runtime import open_runtime

FAST = {"poll_interval_s": 1, "approval_timeout_s": 120}


def state(inventory: Path, host: str) -> HostState:
    return open_runtime(inventory).states.state(host)


def rejected_outcome(final: State) -> HostOutcome:
    """The outcome of a run whose plan was not approved; its state says so (not green Completed)."""
    assert final.type is StateType.CANCELLED and final.name == "Rejected", final
    error = final.result(raise_on_failure=False)
    assert isinstance(error, PlanRejected), error
    return error.outcome


def records(host: str | None = None, step: str | None = None) -> list:
    out = AuditTrail(open_engine()).records(host=host)
    return [r for r in out if step is None or r.step == step]


def test_degraded_rejected_leaves_host_cordoned_and_vms_untouched(fleet: Path) -> None:
    before = where(fleet)
    box = in_background(degraded_host_runbook, host="hv01", reason="ECC errors rising", severity="warning",
                        inventory=str(fleet), return_state=True, **FAST)
    paused = wait_paused("degraded-host-runbook", box=box)
    # cordoned before anyone is asked: nothing new lands on a degraded host meanwhile
    assert state(fleet, "hv01") is HostState.CORDONED
    resume_flow_run(paused.id, run_input={"operator": "carol", "approve": False, "comment": "vendor is on it"})
    outcome = rejected_outcome(box.join())

    assert outcome.outcome is StepOutcome.SKIPPED
    assert "carol" in outcome.detail
    assert state(fleet, "hv01") is HostState.CORDONED
    assert where(fleet) == before  # not one VM moved
    [approval] = records("hv01", "approval")
    assert approval.operator == "carol"
    assert approval.outcome is StepOutcome.SKIPPED
    assert approval.details["approve"] is False and approval.details["comment"] == "vendor is on it"
    assert records("hv01", "migrate") == []
    assert records("hv01", "drain") == []


def test_degraded_approved_evacuates_under_the_approvers_name(fleet: Path) -> None:
    on_hv02 = {vm for vm, hosts in where(fleet).items() if "hv02" in hosts}
    box = in_background(degraded_host_runbook, host="hv02", reason="fan failure", severity="warning",
                        inventory=str(fleet), **FAST)
    paused = wait_paused("degraded-host-runbook", box=box)
    resume_flow_run(paused.id, run_input={"operator": "dave", "approve": True, "comment": "go"})
    outcome = box.join()

    assert outcome.outcome is StepOutcome.OK, outcome.detail
    assert "approved by dave" in outcome.detail
    placement = where(fleet)
    assert set(placement) == set(ALL_VMS) and all(len(h) == 1 for h in placement.values())
    assert not any("hv02" in hosts for hosts in placement.values())
    assert lost(fleet) == []
    rt = open_runtime(fleet)
    assert rt.states.state("hv02") is HostState.CORDONED
    assert rt.states.get("hv02").reason == "degraded: fan failure"
    [approval] = records("hv02", "approval")
    assert approval.operator == "dave" and approval.outcome is StepOutcome.OK
    migrations = [r for r in records(step="migrate") if r.vm in on_hv02]
    assert {r.vm for r in migrations} == on_hv02
    assert {r.operator for r in migrations} == {"dave"}
    # what ran is the plan dave saw, not one made again after his yes
    [shown] = [r for r in records("hv02", "plan") if r.outcome is StepOutcome.DRY_RUN]
    assert {(r.vm, r.inputs["target"]) for r in migrations} == {
        (p["vm"], p["target"]) for p in shown.details["plan"]["placements"]}
    assert records(step="replan") == []


def test_critical_severity_acts_at_once(fleet: Path) -> None:
    outcome = degraded_host_runbook(host="hv03", reason="disk controller offline", severity="CRITICAL",
                                    inventory=str(fleet), **FAST)
    assert outcome.outcome is StepOutcome.OK
    assert not any("hv03" in hosts for hosts in where(fleet).values())
    [approval] = records("hv03", "approval")
    assert approval.operator.startswith("automatic: severity critical")
    assert approval.details["automatic"] is True


def test_hardware_check_cordons_at_once_and_keeps_the_reason(fleet: Path) -> None:
    box = in_background(hardware_check_failed_runbook, host="hv04", check="memtest", detail="DIMM B2",
                        inventory=str(fleet), **FAST)
    paused = wait_paused("hardware-check-failed-runbook", box=box)
    assert state(fleet, "hv04") is HostState.CORDONED
    assert any("hv04" in hosts for hosts in where(fleet).values())  # nothing moved before the yes
    resume_flow_run(paused.id, run_input={"operator": "erin", "approve": True, "comment": ""})
    outcome = box.join()

    assert outcome.outcome is StepOutcome.OK
    rt = open_runtime(fleet)
    assert rt.states.state("hv04") is HostState.CORDONED
    assert rt.states.get("hv04").reason == "hardware check failed: memtest: DIMM B2"
    assert rt.hypervisor.running_vms("hv04") == ()
    assert records("hv04", "approval")[0].operator == "erin"
    assert records("hv04", "incident")[0].inputs["check"] == "memtest"


def test_on_request_dry_run_changes_nothing(fleet: Path) -> None:
    before = where(fleet)
    req = EvacuationRequest(host="hv01", reason="test dry run", operator="frank", inventory=str(fleet))
    outcome = evacuate_on_request(request=req)
    assert outcome.outcome is StepOutcome.DRY_RUN
    assert where(fleet) == before
    assert state(fleet, "hv01") is HostState.ACTIVE


def test_on_request_with_approval_rejected_changes_nothing(fleet: Path) -> None:
    before = where(fleet)
    req = EvacuationRequest(host="hv01", reason="INC-42", operator="grace", dry_run=False, approval_required=True,
                            inventory=str(fleet))
    box = in_background(evacuate_on_request, request=req, return_state=True, **FAST)
    paused = wait_paused("evacuate-on-request", box=box)
    resume_flow_run(paused.id, run_input={"operator": "heidi", "approve": False, "comment": "not in business hours"})
    outcome = rejected_outcome(box.join())
    assert outcome.outcome is StepOutcome.SKIPPED
    assert where(fleet) == before
    assert state(fleet, "hv01") is HostState.ACTIVE
    assert records("hv01", "approval")[0].operator == "heidi"


@pytest.mark.parametrize("flow_name", ["degraded-host-runbook"])
def test_unknown_host_fails_before_anything(fleet: Path, flow_name: str) -> None:
    with pytest.raises(Exception, match="unknown host 'hv99'"):
        degraded_host_runbook(host="hv99", reason="x", inventory=str(fleet), **FAST)
    assert records("hv99") == []


def test_no_answer_in_time_counts_as_no(fleet: Path) -> None:
    before = where(fleet)
    outcome = rejected_outcome(degraded_host_runbook(host="hv02", reason="flapping link", inventory=str(fleet),
                                                     poll_interval_s=1, approval_timeout_s=3, return_state=True))
    assert outcome.outcome is StepOutcome.SKIPPED
    assert where(fleet) == before
    assert state(fleet, "hv02") is HostState.CORDONED
    [approval] = records("hv02", "approval")
    assert approval.operator == "nobody" and approval.details["timed_out"] is True


def parameters_from_event(trigger: DeploymentEventTrigger, event: str, host: str,
                          payload: dict[str, Any]) -> dict[str, Any]:
    """The run parameters the deployment's trigger gives for this event, rendered as the server renders them."""
    now = datetime.now(UTC)
    received = ReceivedEvent(event=event, resource=host_event_resource(host, "demo"), payload=payload,
                             occurred=now, received=now)
    return {name: render_user_template_sync(template, {"event": received})
            for name, template in trigger.parameters.items()}


# (case, runbook, its trigger, event, payload, the field named)
BLANK_FIELDS: list[tuple[str, Callable[..., Any], DeploymentEventTrigger, str, dict[str, Any], str]] = [
    ("hardware: no check", hardware_check_failed_runbook, hardware_trigger(), HARDWARE_EVENT,
     {"detail": "DIMM B2"}, "check"),
    ("hardware: blank check", hardware_check_failed_runbook, hardware_trigger(), HARDWARE_EVENT,
     {"check": "  ", "detail": "DIMM B2"}, "check"),
    # critical: would evacuate at once, nobody asked
    ("degraded: no reason", degraded_host_runbook, degraded_trigger(), DEGRADED_EVENT,
     {"severity": "critical"}, "reason"),
    ("degraded: empty reason", degraded_host_runbook, degraded_trigger(), DEGRADED_EVENT,
     {"reason": "", "severity": "warning"}, "reason"),
]


@pytest.mark.parametrize(("case", "runbook", "trigger", "event", "payload", "field"), BLANK_FIELDS,
                         ids=[c[0] for c in BLANK_FIELDS])
def test_an_event_missing_a_required_field_is_refused_before_anything(
        fleet: Path, case: str, runbook: Callable[..., Any], trigger: DeploymentEventTrigger, event: str,
        payload: dict[str, Any], field: str) -> None:
    # the trigger renders a payload key the event lacks as "": the host would be cordoned for no named cause
    params = parameters_from_event(trigger, event, "hv01", payload)
    assert params["host"] == "hv01" and params[field].strip() == ""
    before = where(fleet)

    with pytest.raises(InputError, match=rf"^{event} for host 'hv01' .*: '{field}' is empty .*nothing was changed"):
        runbook(**params, inventory=str(fleet), **FAST)

    assert state(fleet, "hv01") is HostState.ACTIVE
    assert where(fleet) == before
    assert records("hv01") == []  # refused like an unknown host: before the incident is recorded


def _leave_one_target(fleet: Path, host: str) -> None:
    """Cordon every other host but one: evacuating ``host`` then fails N+1, whatever anyone approves."""
    rt = open_runtime(fleet)
    others = [h.name for h in rt.inventory.hosts if h.name != host]
    for other in others[1:]:
        rt.states.set_aside(other, "test: out of service", "test")


def test_an_infeasible_plan_is_refused_at_once_not_sent_for_approval(fleet: Path) -> None:
    # It paused for approval (paging a human, holding the host's lock for up to an hour) and failed only
    # once someone said yes: "the approved plan for hv03 cannot be carried out".
    _leave_one_target(fleet, "hv03")
    before = where(fleet)
    started = datetime.now(UTC)
    with pytest.raises(Exception, match="no evacuation of hv03 to approve: .*N\\+1.*the host stays cordoned"):
        degraded_host_runbook(host="hv03", reason="ECC errors rising", inventory=str(fleet),
                              poll_interval_s=1, approval_timeout_s=30)
    assert (datetime.now(UTC) - started).total_seconds() < 25  # it did not wait for an answer
    assert records("hv03", "approval") == []
    assert where(fleet) == before
    assert state(fleet, "hv03") is HostState.CORDONED
    assert "ECC errors rising" in open_runtime(fleet).states.get("hv03").reason

    req = EvacuationRequest(host="hv03", reason="INC-43", operator="ivan", dry_run=False, approval_required=True,
                            inventory=str(fleet))
    with pytest.raises(Exception, match="no evacuation of hv03 to approve: .*nothing changed"):
        evacuate_on_request(request=req, **FAST)
    assert records("hv03", "approval") == []
