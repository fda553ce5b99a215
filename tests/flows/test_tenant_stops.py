"""A tenant stops a VM while its host is in maintenance (a SIMULATED fleet, under a real Prefect server).

The guest shuts itself down, or someone runs ``virsh destroy``, between the plan and the VM's migration.
hostmaint did not stop it and must not say it lost it, nor start it again; the run goes on, the record
says what happened, and only evidence (libvirt's reason) makes a VM that runs nowhere a tenant's doing.
The same fault on real libvirt: tests/lab/test_lab_others.py.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import hostmaint.maintenance as steps
from flows.evacuate_host import evacuate_host
from flows.patch_host import patch_host
from hostmaint.audit import AuditTrail
from hostmaint.db import open_engine
from hostmaint.drivers.memory import SimulatedFleet
from hostmaint.errors import StepError
from hostmaint.models import HostState, Step, StepOutcome, Trigger
from hostmaint.runtime import open_runtime

pytestmark = pytest.mark.usefixtures("prefect_server")


def fleet_of(inventory: Path) -> SimulatedFleet:
    return SimulatedFleet.load(inventory.parent / "fleet-state.json")


def on_host(inventory: Path, host: str) -> list[str]:
    return sorted(fleet_of(inventory).running[host])


def just_before_the_migrations(monkeypatch: pytest.MonkeyPatch, act: Callable[[SimulatedFleet], None]) -> None:
    """Run ``act`` on the flow's own fleet once its drain has recorded the plan, before any VM moves."""
    original = steps.probe_dirty_rates

    def probe(hv: Any, *args: Any, **kwargs: Any) -> Any:
        act(hv)
        return original(hv, *args, **kwargs)

    monkeypatch.setattr(steps, "probe_dirty_rates", probe)


def records(step: Step, vm: str | None = None) -> list[Any]:
    return [r for r in AuditTrail(open_engine()).records() if r.step == step and (vm is None or r.vm == vm)]


@pytest.mark.parametrize("reason", ["destroyed", "shutdown", "saved"])
def test_an_evacuation_goes_on_past_a_vm_its_tenant_stopped_and_records_it(
        sim_inventory: Path, monkeypatch: pytest.MonkeyPatch, reason: str) -> None:
    victim, *others = on_host(sim_inventory, "hv01")
    just_before_the_migrations(monkeypatch, lambda hv: hv.stop_outside(victim, reason))

    result = evacuate_host(host="hv01", operator="alice", reason="test", inventory=str(sim_inventory),
                           trigger=Trigger.TEST)

    assert result.outcome is StepOutcome.OK, result.detail
    assert f"{len(others)} VM(s) moved; stopped outside hostmaint, not moved: {victim} ({reason})" in result.detail
    fleet = fleet_of(sim_inventory)
    assert fleet.stopped == {victim: "hv01"} and fleet.lost == []
    assert fleet.running["hv01"] == set()
    running = [vm for names in fleet.running.values() for vm in names]
    assert len(running) == len(set(running)) == 11  # every other VM once
    (migrate,) = records(Step.MIGRATE, victim)
    assert migrate.outcome is StepOutcome.SKIPPED and migrate.details["stopped_outside"] == reason
    # found by both invariant checks of the run, recorded once
    (found,) = records(Step.VM_STOPPED_OUTSIDE)
    assert (found.vm, found.host, found.details["reason"]) == (victim, "hv01", reason)
    rt = open_runtime(sim_inventory)
    assert rt.states.state("hv01") is HostState.DRAINED
    assert victim not in rt.states.origins()  # nothing to bring back to hv01
    assert rt.audit.verify().ok


def test_a_patch_reboots_past_a_vm_its_guest_shut_down_and_leaves_it_down(
        sim_inventory: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    victim = on_host(sim_inventory, "hv02")[0]
    just_before_the_migrations(monkeypatch, lambda hv: hv.stop_outside(victim, "shutdown"))

    result = patch_host(host="hv02", operator="alice", reason="monthly", inventory=str(sim_inventory),
                        trigger=Trigger.TEST)

    assert result.outcome is StepOutcome.OK, result.detail
    assert result.rebooted
    assert result.detail.endswith(f"; stopped outside hostmaint during its drain: {victim} (shutdown); "
                                  f"shut-off VMs left defined on it: {victim}"), result.detail
    fleet = fleet_of(sim_inventory)
    # after the reboot libvirtd no longer knows why it is off ("unknown"): the run's own record does
    assert fleet.stopped == {victim: "hv02"} and fleet.stop_reasons == {victim: "unknown"}
    assert fleet.lost == [] and victim not in {vm for names in fleet.running.values() for vm in names}
    assert len(records(Step.VM_STOPPED_OUTSIDE)) == 1
    (shut_off,) = records(Step.SHUT_OFF_VMS)
    assert shut_off.details["vms"] == [victim]  # the operator is told it stays down on the patched host
    assert open_runtime(sim_inventory).states.state("hv02") is HostState.ACTIVE


def vanish(hv: SimulatedFleet, vm: str) -> None:
    """The VM is gone without a trace: undefined, or lost. Nothing says it was its tenant."""
    for names in hv.running.values():
        names.discard(vm)
    hv.save()


@pytest.mark.parametrize("how", ["vanished", "crashed", "migrated"])
def test_a_vm_that_runs_nowhere_without_its_tenant_stopping_it_is_a_broken_invariant(
        sim_inventory: Path, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    victim = on_host(sim_inventory, "hv01")[0]

    def act(hv: SimulatedFleet) -> None:
        if how == "vanished":
            vanish(hv, victim)
        else:
            hv.stop_outside(victim, how)

    just_before_the_migrations(monkeypatch, act)
    said = "defined on no host" if how == "vanished" else f"shut off on hv01 ({how})"
    with pytest.raises(StepError, match=re.escape(f"invariant broken: {victim} runs 0 times (nowhere; {said})")):
        evacuate_host(host="hv01", operator="alice", reason="test", inventory=str(sim_inventory),
                      trigger=Trigger.TEST)
    assert records(Step.VM_STOPPED_OUTSIDE) == []
    # the trail says why the run stopped, not only its log
    (breach,) = records(Step.INVARIANTS)
    assert breach.outcome is StepOutcome.FAILED and breach.cluster == "demo"
    assert breach.details["problems"] == [f"{victim} runs 0 times (nowhere; {said})"]


def test_a_vm_another_hosts_tenant_stops_during_a_drain_is_recorded_on_its_own_host(
        sim_inventory: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bystander = on_host(sim_inventory, "hv04")[0]
    just_before_the_migrations(monkeypatch, lambda hv: hv.stop_outside(bystander, "shutdown"))

    result = evacuate_host(host="hv01", operator="alice", reason="test", inventory=str(sim_inventory),
                           trigger=Trigger.TEST)

    assert result.outcome is StepOutcome.OK, result.detail
    (found,) = records(Step.VM_STOPPED_OUTSIDE)
    assert (found.vm, found.host, found.details["reason"]) == (bystander, "hv04", "shutdown")


def test_the_one_host_where_libvirt_says_it_stopped_is_the_evidence_and_the_run_remembers_it(
        sim_inventory: Path) -> None:
    rt = open_runtime(sim_inventory)
    run = steps.RunContext(flow="patch-host", trigger=Trigger.TEST, operator="alice")
    off = {"a": {"hv01": "migrated", "hv02": "destroyed"},  # a stale definition another tool left on hv01
           "b": {"hv01": "destroyed", "hv02": "shutdown"},  # two places claim it: no evidence of where
           "c": {"hv03": "crashed"}}  # not a tenant's doing
    assert steps.stopped_outside(rt, run, off) == {"a": ("hv02", "destroyed")}
    # after hv02's reboot libvirtd no longer knows why: this run's record does, and is not written twice
    assert steps.stopped_outside(rt, run, {"a": {"hv02": "unknown"}}) == {"a": ("hv02", "destroyed")}
    (found,) = records(Step.VM_STOPPED_OUTSIDE)
    assert (found.vm, found.host, found.run_id) == ("a", "hv02", run.run_id)
    # another run has no such record: "unknown" is no evidence for it
    other = steps.RunContext(flow="patch-host", trigger=Trigger.TEST, operator="bob")
    assert steps.stopped_outside(rt, other, {"a": {"hv02": "unknown"}}) == {}
