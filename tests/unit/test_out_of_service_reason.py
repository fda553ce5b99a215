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


def test_a_refused_re_run_keeps_out_a_host_its_maintenance_patched_but_never_verified(sim_inventory: Path) -> None:
    # An empty host an earlier run patched, then held before the reboot (monitoring, a pre-reboot hook):
    # nothing of it is away, but its packages changed and nothing verified it
    rt = open_runtime(sim_inventory, fresh=True)
    fleet = rt.hypervisor
    for vm in sorted(fleet.running["hv04"]):  # type: ignore[attr-defined]
        fleet.running["hv04"].discard(vm)  # type: ignore[attr-defined]
        fleet.running["hv03"].add(vm)  # type: ignore[attr-defined]
    fleet.save()  # type: ignore[attr-defined]
    first = RunContext(flow="patch-host", reason="patch")
    maintenance.cordon(rt, first, "hv04")
    for step in (HostState.DRAINING, HostState.DRAINED, HostState.PATCHING):
        rt.states.transition("hv04", step, step.value, first.run_id)
    rt.states.keep_out("hv04", "not rebooted, held by monitoring: alert firing", first.run_id)

    # the re-run's plan is refused (N+1): the host must not go back into service unverified
    again = RunContext(flow="patch-host", reason="patch")
    maintenance.cordon(rt, again, "hv04")
    snap = maintenance.snapshot(rt, "demo")
    assert maintenance.end_unstarted(rt, again, "hv04", "N+1 would not hold", snap) is HostState.CORDONED

    after = rt.states.get("hv04")
    assert after.state is HostState.CORDONED and after.prior_state is HostState.ACTIVE, after
    assert "not verified" in after.reason and "N+1 would not hold" in after.reason, after.reason
    [kept] = [r for r in rt.audit.records(host="hv04") if r.step == "keep-cordoned"]
    assert kept.details["reached"] == ["patching"]


def test_keeping_out_an_operators_cordoned_host_keeps_it_the_operators(sim_inventory: Path) -> None:
    # hv02 was set aside by an incident; a drain of a maintenance of it failed, which ends that
    # maintenance on the spot (cordoned is where it started), and then the run kept it out
    rt = open_runtime(sim_inventory, fresh=True)
    rt.states.set_aside("hv02", "degraded: fan", "incident-run")
    run = RunContext(flow="patch-host", reason="patch")
    maintenance.cordon(rt, run, "hv02")
    rt.states.transition("hv02", HostState.DRAINING, "draining", run.run_id)
    rt.states.transition("hv02", HostState.CORDONED, "drain failed", run.run_id)
    rt.states.keep_out("hv02", "maintenance cannot go on: no plan", run.run_id)
    assert rt.states.get("hv02").prior_state is HostState.CORDONED

    # so the maintenance that finishes it later leaves it cordoned, as the operator had it
    later = RunContext(flow="patch-host", reason="patch")
    maintenance.cordon(rt, later, "hv02")
    for step in (HostState.DRAINING, HostState.DRAINED, HostState.PATCHING, HostState.VERIFYING):
        rt.states.transition("hv02", step, step.value, later.run_id)
    assert maintenance.uncordon(rt, later, "hv02") is HostState.CORDONED


def _move(rt: object, vm: str, source: str, target: str) -> None:
    fleet = rt.hypervisor  # type: ignore[attr-defined]
    fleet.running[source].discard(vm)
    fleet.running[target].add(vm)
    fleet.save()


def test_a_refused_plan_puts_back_an_active_host_whose_vms_an_earlier_maintenance_left_away(
        sim_inventory: Path) -> None:
    # Round 1318253299: an earlier, verified maintenance of hv02 could not return two VMs (no room);
    # hv02 served on. A new maintenance of it was refused (N+1): it must go back to active, not stay
    # cordoned "cannot go on" for VMs that were away while it served
    rt = open_runtime(sim_inventory, fresh=True)
    [vm, *_] = sorted(rt.hypervisor.running["hv02"])  # type: ignore[attr-defined]
    earlier = RunContext(flow="patch-host", reason="last month")
    maintenance.cordon(rt, earlier, "hv02")
    rt.states.record_origin(vm, "hv02", earlier.run_id)
    _move(rt, vm, "hv02", "hv03")
    for step in (HostState.DRAINING, HostState.DRAINED, HostState.PATCHING, HostState.VERIFYING):
        rt.states.transition("hv02", step, step.value, earlier.run_id)
    assert maintenance.uncordon(rt, earlier, "hv02") is HostState.ACTIVE

    run = RunContext(flow="patch-host", reason="patch")
    maintenance.cordon(rt, run, "hv02")
    snap = maintenance.snapshot(rt, "demo")
    assert maintenance.end_unstarted(rt, run, "hv02", "N+1 would not hold", snap) is HostState.ACTIVE

    after = rt.states.get("hv02")
    assert after.state is HostState.ACTIVE, after
    assert f"{vm} (on hv03)" in after.reason and "earlier maintenance" in after.reason, after.reason
    [back] = [r for r in rt.audit.records(host="hv02") if r.step == "uncordon" and r.run_id == run.run_id]
    assert back.details["away_before"] == {vm: "hv03"}


def test_a_refused_re_run_keeps_out_a_host_whose_vms_this_maintenance_moved(sim_inventory: Path) -> None:
    # the same VM away, but moved by a run of this maintenance that died: the host never was back
    rt = open_runtime(sim_inventory, fresh=True)
    [vm, *_] = sorted(rt.hypervisor.running["hv02"])  # type: ignore[attr-defined]
    first = RunContext(flow="patch-host", reason="patch")
    maintenance.cordon(rt, first, "hv02")
    rt.states.transition("hv02", HostState.DRAINING, "draining", first.run_id)
    rt.states.record_origin(vm, "hv02", first.run_id)
    _move(rt, vm, "hv02", "hv03")

    again = RunContext(flow="patch-host", reason="patch")
    maintenance.cordon(rt, again, "hv02")
    snap = maintenance.snapshot(rt, "demo")
    assert maintenance.end_unstarted(rt, again, "hv02", "N+1 would not hold", snap) is HostState.CORDONED
    after = rt.states.get("hv02")
    assert "cannot go on" in after.reason and f"{vm} (on hv03)" in after.reason, after.reason


def test_a_refused_re_run_keeps_out_a_host_this_maintenance_moved_a_vm_off_whose_home_is_elsewhere(
        sim_inventory: Path) -> None:
    # chaos round 833846139: vm04's home was hv01 (an earlier maintenance, its origin: the first one
    # wins), it ran on hv02; hv02's drain moved it to hv03, then a tenant VM filled hv02 and the re-run's
    # plan was refused. hv02 went back to active "nothing moved": vm04 had, in this maintenance
    from hostmaint.models import MigrationResult, StepOutcome

    rt = open_runtime(sim_inventory, fresh=True)
    [vm, *_] = sorted(rt.hypervisor.running["hv02"])  # type: ignore[attr-defined]
    rt.states.record_origin(vm, "hv01", "an-earlier-maintenance")
    first = RunContext(flow="patch-window", reason="patch")
    maintenance.cordon(rt, first, "hv02")
    rt.states.transition("hv02", HostState.DRAINING, "draining", first.run_id)
    _move(rt, vm, "hv02", "hv03")
    maintenance._audit_migration(rt, first, "demo", MigrationResult(vm=vm, source="hv02", target="hv03",
                                                                    outcome=StepOutcome.OK, seconds=1.0))
    rt.states.transition("hv02", HostState.CORDONED, "drain failed: a tenant VM started on it", first.run_id)

    again = RunContext(flow="patch-window", reason="patch")
    snap = maintenance.snapshot(rt, "demo")
    assert maintenance.end_unstarted(rt, again, "hv02", "N+1 would not hold", snap) is HostState.CORDONED
    after = rt.states.get("hv02")
    assert "cannot go on" in after.reason and f"{vm} (on hv03)" in after.reason, after.reason
    assert "nothing moved" not in after.reason
    # its origin is still its home: the VM goes back there, not to hv02
    assert rt.states.origins("hv01").get(vm) is not None and vm not in rt.states.origins("hv02")
