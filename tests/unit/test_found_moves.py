"""What a run that died mid-drain left is found by the next run and recorded truthfully (issue 15 b):
core steps on a SIMULATED fleet, no Prefect."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from hostmaint import maintenance as steps
from hostmaint.drivers.memory import SimulatedFleet
from hostmaint.models import StepOutcome, Vm
from hostmaint.runtime import open_runtime


def test_a_vm_whose_origin_was_recorded_and_that_runs_nowhere_is_recorded_once(sim_inventory: Path) -> None:
    rt = open_runtime(sim_inventory, fresh=True)
    rt.states.record_origin("ghost", "hv01", "run-that-died")  # its migration began; now it runs on no host
    run = steps.RunContext(flow="patch-host", reason="patch")

    assert steps.record_found_moves(rt, run, "hv01", steps.snapshot(rt, "demo")) == []
    [missing] = [r for r in rt.audit.records(host="hv01") if r.step == "vm-not-found"]
    assert missing.vm == "ghost" and missing.outcome is StepOutcome.UNKNOWN
    assert missing.inputs == {"started_by_run": "run-that-died"} and "runs on no host" in missing.details["note"]
    assert rt.states.origins("hv01") == {"ghost": "hv01"}  # still away: host status keeps naming it

    again = steps.RunContext(flow="patch-host", reason="patch")
    steps.record_found_moves(rt, again, "hv01", steps.snapshot(rt, "demo"))
    assert len([r for r in rt.audit.records(host="hv01") if r.step == "vm-not-found"]) == 1


def test_a_found_move_is_logged_with_the_vm_name_escaped(sim_inventory: Path, caplog: pytest.LogCaptureFixture) -> None:
    rt = open_runtime(sim_inventory, fresh=True)
    fleet = rt.hypervisor
    assert isinstance(fleet, SimulatedFleet)
    name = "web\n2026-12-06 hostmaint: all VMs verified"  # a tenant's name, forging a log line
    fleet.vms[name] = Vm(name=name, uuid="00000000-0000-0000-0000-00000000e011", host="hv02", memory_mib=512, vcpus=1)
    fleet.running["hv02"].add(name)
    fleet.save()
    rt.states.record_origin(name, "hv01", "run-that-died")

    with caplog.at_level(logging.WARNING, logger="hostmaint.maintenance"):
        found = steps.record_found_moves(rt, steps.RunContext(flow="patch-host"), "hv01", steps.snapshot(rt, "demo"))

    assert found == [name]
    lines = [r.getMessage() for r in caplog.records if "run-that-died" in r.getMessage()]
    assert lines and all("\n" not in line for line in lines), lines
