"""Why a host is out of service survives a maintenance that leaves it out (issue 18): an incident's
cordon reason stays until an operator clears it, whatever patched the host meanwhile."""

from __future__ import annotations

from pathlib import Path

from hostmaint import maintenance
from hostmaint.maintenance import RunContext
from hostmaint.models import HostState
from hostmaint.runtime import open_runtime


def test_a_patch_leaves_an_incidents_reason_on_a_host_it_leaves_cordoned(sim_inventory: Path) -> None:
    rt = open_runtime(sim_inventory, fresh=True)
    rt.states.set_aside("hv03", "degraded: ECC errors rising", "incident-run")
    run = RunContext(flow="patch-window", reason="patch window demo:2026-12-08")

    maintenance.cordon(rt, run, "hv03")
    for step in (HostState.DRAINING, HostState.DRAINED, HostState.PATCHING, HostState.VERIFYING):
        rt.states.transition("hv03", step, step.value, run.run_id)
    assert maintenance.uncordon(rt, run, "hv03") is HostState.CORDONED

    after = rt.states.get("hv03")
    assert after.state is HostState.CORDONED and after.prior_state is None  # the operator's to clear
    assert after.reason == "degraded: ECC errors rising"
    # and the next maintenance keeps it as well
    run2 = RunContext(flow="patch-host", reason="patch")
    maintenance.cordon(rt, run2, "hv03")
    for step in (HostState.DRAINING, HostState.DRAINED, HostState.PATCHING, HostState.VERIFYING):
        rt.states.transition("hv03", step, step.value, run2.run_id)
    maintenance.uncordon(rt, run2, "hv03")
    assert rt.states.get("hv03").reason == "degraded: ECC errors rising"


def test_a_maintenance_that_never_started_leaves_the_reason_too(sim_inventory: Path) -> None:
    rt = open_runtime(sim_inventory, fresh=True)
    rt.states.set_aside("hv02", "hardware check failed: memtest: DIMM B2", "incident-run")
    run = RunContext(flow="patch-host", reason="patch")
    maintenance.cordon(rt, run, "hv02")
    snap = maintenance.snapshot(rt, "demo")

    assert maintenance.end_unstarted(rt, run, "hv02", "no safe plan", snap) is HostState.CORDONED
    assert rt.states.get("hv02").reason == "hardware check failed: memtest: DIMM B2"
