"""An operator cordons a target while a drain sends VMs to it (a SIMULATED fleet, real Prefect server).

"No VM is placed on a cordoned host" holds at every migration's start, not only when the plan was
made: what was planned for the host that left service is re-planned onto the others (recorded), or
the drain stops with the source cordoned naming what is still on it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import hostmaint.maintenance as steps
from flows.evacuate_host import evacuate_host
from hostmaint.audit import AuditTrail
from hostmaint.db import open_engine
from hostmaint.drivers.memory import SimulatedFleet
from hostmaint.models import HostState, Step, StepOutcome, Trigger
from hostmaint.runtime import open_runtime

pytestmark = pytest.mark.usefixtures("prefect_server")


def fleet_of(inventory: Path) -> SimulatedFleet:
    return SimulatedFleet.load(inventory.parent / "fleet-state.json")


def test_a_target_the_operator_cordons_mid_drain_gets_no_vm_and_the_rest_is_re_planned(
        sim_inventory: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = "hv01"
    home = sorted(fleet_of(sim_inventory).running[source])
    cordoned: list[str] = []
    original = steps.probe_dirty_rates

    def operator_cordons_a_target(hv: Any, *args: Any, **kwargs: Any) -> Any:
        rt = open_runtime(sim_inventory)
        plan = [r for r in rt.audit.records(host=source) if r.step in (Step.PLAN, Step.REPLAN)][-1]
        target = plan.details["plan"]["placements"][-1]["target"]
        if not cordoned:
            rt.states.set_aside(target, "disk errors", "operator-run")
            cordoned.append(target)
        return original(hv, *args, **kwargs)

    monkeypatch.setattr(steps, "probe_dirty_rates", operator_cordons_a_target)
    result = evacuate_host(host=source, operator="alice", reason="test", inventory=str(sim_inventory),
                           trigger=Trigger.TEST)

    (target,) = cordoned
    fleet = fleet_of(sim_inventory)
    landed = sorted(set(home) & fleet.running[target])
    assert landed == [], f"{landed} were placed on {target} after the operator cordoned it"
    assert all(m.target != target for m in fleet.migration_log), [m.vm for m in fleet.migration_log]
    assert result.outcome is StepOutcome.OK, result.detail
    assert fleet.running[source] == set()
    rt = open_runtime(sim_inventory)
    assert rt.states.state(target) is HostState.CORDONED and rt.states.get(target).reason == "disk errors"
    replans = [r for r in AuditTrail(open_engine()).records(host=source) if r.step == Step.REPLAN]
    assert replans and f"{target} is cordoned now" in replans[-1].inputs["reasons"], [r.inputs for r in replans]
    assert target not in {p["target"] for p in replans[-1].details["plan"]["placements"]}
    refused = [r for r in AuditTrail(open_engine()).records(host=source) if r.step == Step.MIGRATE
               and r.outcome is StepOutcome.FAILED]
    assert refused and all(r.details["target"] == target and "not started: " + target + " is cordoned (disk errors)"
                           in r.details["error"] for r in refused), [r.details for r in refused]
