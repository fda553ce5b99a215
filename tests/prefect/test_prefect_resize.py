"""The vm-starved runbook under the session's Prefect test server, on a SIMULATED fleet: started with
the parameters its deployment's trigger renders from a memory-pressure event, it proposes the resize,
pauses for approval, and grows the VM only on a yes (the audit trail names who approved)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from prefect.events.schemas.events import ReceivedEvent
from prefect.flow_runs import resume_flow_run
from prefect.server.utilities.user_templates import render_user_template_sync
from prefect_support import in_background, wait_paused

from deployments.serve import MEMORY_PRESSURE_EVENT, VM_LABEL, VM_RESOURCE_PREFIX, vm_starved_trigger
from flows.run_display import PlanRejected
from flows.runbooks.vm_starved import vm_starved_runbook
from hostmaint.audit import AuditTrail
from hostmaint.db import open_engine
from hostmaint.drivers.memory import SimulatedFleet
from hostmaint.models import Step, StepOutcome
from hostmaint.simulated_fleet import demo_snapshot

FAST = {"poll_interval_s": 1, "approval_timeout_s": 120}


@pytest.fixture
def growable(growable_inventory: Path, prefect_server: None) -> tuple[Path, str]:
    from flows.locks import ensure_limits

    ensure_limits(growable_inventory)
    return growable_inventory, demo_snapshot(4, 12).vms[0].name


def memory_of(inventory: Path, vm: str) -> int:
    return SimulatedFleet.load(inventory.parent / "fleet-state.json").vms[vm].memory_mib


def from_event(vm: str, payload: dict[str, Any]) -> dict[str, Any]:
    trigger = vm_starved_trigger(MEMORY_PRESSURE_EVENT)
    now = datetime.now(UTC)
    received = ReceivedEvent(event=MEMORY_PRESSURE_EVENT, payload=payload, occurred=now, received=now,
                             resource={"prefect.resource.id": f"{VM_RESOURCE_PREFIX}{vm}", VM_LABEL: vm})
    return {name: render_user_template_sync(template, {"event": received})
            for name, template in trigger.parameters.items()}


@pytest.mark.parametrize("approve", [True, False])
def test_memory_pressure_proposes_a_resize_and_waits_for_approval(growable: tuple[Path, str], approve: bool) -> None:
    inventory, vm = growable
    before = memory_of(inventory, vm)
    params = from_event(vm, {"reason": "OOM kills", "source": "alertmanager"})
    assert params["vm"] == vm and params["memory"] == "" and params["event"] == MEMORY_PRESSURE_EVENT
    box = in_background(vm_starved_runbook, **params, inventory=str(inventory), **FAST)
    paused = wait_paused("vm-starved-runbook", box=box)
    assert memory_of(inventory, vm) == before  # nothing before the answer
    resume_flow_run(paused.id, run_input={"operator": "dave", "approve": approve, "comment": "ok" if approve else "no"})
    if not approve:
        with pytest.raises(PlanRejected, match="not approved by dave: no; nothing changed"):
            box.join()
    else:
        final = box.join()
    trail = AuditTrail(open_engine()).records()
    [approval] = [r for r in trail if r.step == Step.APPROVAL]
    assert approval.operator == "dave"
    if approve:
        assert final.outcome is StepOutcome.OK, final.detail
        assert memory_of(inventory, vm) == -(-(before * 5 // 4) // 256) * 256
        [resize] = [r for r in trail if r.step == Step.RESIZE]
        assert resize.inputs["approved_by"] == "dave" and resize.inputs["requested_by"] == "alertmanager"
        assert resize.details["after"]["memory_mib"] == memory_of(inventory, vm)
    else:
        assert memory_of(inventory, vm) == before
        assert [r for r in trail if r.step == Step.RESIZE] == []
