"""A tenant stops a guest while its host is in maintenance, on the real lab (root; CI runs it).

``virsh destroy`` of a guest before its migration starts, and of the Linux guest while its migration
runs (libvirt fails the migration): hostmaint did not stop them, must not call them lost, must not start
them again, and goes on; libvirt's own reason for the shut-off domain is the evidence. One fresh lab
for the module: the patch first, the evacuation (which leaves its host cordoned) after. The flows'
side on a simulated fleet: tests/flows/test_tenant_stops.py.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Iterator
from typing import Any

import libvirt
import pytest

from hostmaint.lab import LabInfo
from hostmaint.models import HostState, Step, StepOutcome, Trigger
from tests.lab.labkit import all_vms, fresh_lab

pytestmark = [pytest.mark.lab, pytest.mark.usefixtures("prefect_server")]


@pytest.fixture(scope="module")
def tenant_lab(prefect_server: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabInfo]:
    with fresh_lab(tmp_path_factory.mktemp("lab-tenant") / "hostmaint.db") as info:
        yield info


def destroy(info: LabInfo, host: str, vm: str) -> None:
    """What a tenant's ``virsh destroy`` does, over the host's own libvirtd."""
    conn = libvirt.open(info.plain_uri(host))
    try:
        conn.lookupByName(vm).destroy()
    finally:
        conn.close()


def shut_off_reason(info: LabInfo, host: str, vm: str) -> int:
    conn = libvirt.open(info.plain_uri(host))
    try:
        state, reason = conn.lookupByName(vm).state()
        assert state == libvirt.VIR_DOMAIN_SHUTOFF
        return int(reason)
    finally:
        conn.close()


def test_a_patch_reboots_a_host_past_a_guest_its_tenant_destroyed_and_leaves_it_down(
        tenant_lab: LabInfo, monkeypatch: pytest.MonkeyPatch) -> None:
    import hostmaint.maintenance as steps
    from flows.patch_host import patch_host
    from hostmaint.runtime import open_runtime

    rt: Any = open_runtime(tenant_lab.inventory_path)
    before = all_vms(rt)
    victim = sorted(vm for vm, hosts in before.items() if hosts == ["hv02"])[0]
    probe = steps.probe_dirty_rates

    def destroy_then_probe(*args: Any, **kwargs: Any) -> Any:
        destroy(tenant_lab, "hv02", victim)
        return probe(*args, **kwargs)

    monkeypatch.setattr(steps, "probe_dirty_rates", destroy_then_probe)
    result = patch_host(host="hv02", operator="lab-test", reason="tenant stops", trigger=Trigger.TEST,
                        inventory=str(tenant_lab.inventory_path))

    assert result.outcome is StepOutcome.OK, result.detail
    assert result.rebooted
    after = all_vms(rt)
    assert set(after) == set(before) - {victim} and all(len(h) == 1 for h in after.values()), after
    # libvirtd forgot why after the reboot; the run's own record, made before it, still says
    assert shut_off_reason(tenant_lab, "hv02", victim) in (libvirt.VIR_DOMAIN_SHUTOFF_DESTROYED,
                                                           libvirt.VIR_DOMAIN_SHUTOFF_UNKNOWN)
    run_id = next(r.run_id for r in rt.audit.records(host="hv02", steps=(Step.REBOOT,)))
    (found,) = rt.audit.records(run_id=run_id, steps=(Step.VM_STOPPED_OUTSIDE,))
    assert (found.vm, found.host, found.details["reason"]) == (victim, "hv02", "destroyed")
    (shut_off,) = rt.audit.records(run_id=run_id, steps=(Step.SHUT_OFF_VMS,))
    assert victim in shut_off.details["vms"]
    assert rt.states.state("hv02") is HostState.ACTIVE
    assert rt.audit.verify().ok


def test_guests_destroyed_before_and_during_their_migration_are_recorded_and_the_evacuation_finishes(
        tenant_lab: LabInfo, monkeypatch: pytest.MonkeyPatch) -> None:
    import hostmaint.maintenance as steps
    from flows.evacuate_host import evacuate_host
    drain_module = importlib.import_module("hostmaint.migration.drain")  # the package exports drain(), a function
    from hostmaint.runtime import open_runtime

    rt: Any = open_runtime(tenant_lab.inventory_path)
    before = all_vms(rt)
    on_hv01 = sorted(vm for vm, hosts in before.items() if hosts == ["hv01"])
    linux = next(vm.name for vm in tenant_lab.vms if vm.linux)
    assert linux in on_hv01, on_hv01
    early = next(vm for vm in on_hv01 if vm != linux)
    probe = steps.probe_dirty_rates

    def destroy_then_probe(*args: Any, **kwargs: Any) -> Any:  # the plan is recorded, nothing has moved
        destroy(tenant_lab, "hv01", early)
        return probe(*args, **kwargs)

    monkeypatch.setattr(steps, "probe_dirty_rates", destroy_then_probe)
    on_progress = drain_module._Drain.on_progress
    destroyed = threading.Event()

    def destroy_while_it_moves(self: Any, flight: Any, sample: Any) -> None:
        if flight.spec.vm == linux and not destroyed.is_set():
            destroyed.set()  # its first progress sample: libvirt is sending it
            destroy(tenant_lab, "hv01", linux)
        on_progress(self, flight, sample)

    monkeypatch.setattr(drain_module._Drain, "on_progress", destroy_while_it_moves)

    result = evacuate_host(host="hv01", operator="lab-test", reason="tenant stops", trigger=Trigger.TEST,
                           inventory=str(tenant_lab.inventory_path))

    assert destroyed.is_set(), "the Linux guest's migration sent no progress sample before it ended"
    assert result.outcome is StepOutcome.OK, result.detail
    moved = len(on_hv01) - 2
    assert result.detail.startswith(f"{moved} VM(s) moved; stopped outside hostmaint, not moved: ")
    after = all_vms(rt)
    assert set(after) == set(before) - {early, linux} and all(len(h) == 1 for h in after.values()), after
    assert not [vm for vm, hosts in after.items() if "hv01" in hosts]
    for vm in (early, linux):  # still defined where they stopped, as libvirt says: destroyed
        assert shut_off_reason(tenant_lab, "hv01", vm) == libvirt.VIR_DOMAIN_SHUTOFF_DESTROYED
    migrations = {r.vm: r for r in rt.audit.records(steps=(Step.MIGRATE,))}
    assert migrations[early].outcome is StepOutcome.SKIPPED
    assert "before its migration" in migrations[early].details["error"]
    assert migrations[linux].outcome is StepOutcome.SKIPPED
    assert "during its migration" in migrations[linux].details["error"]
    assert all(migrations[vm].details["stopped_outside"] == "destroyed" for vm in (early, linux))
    run_id = migrations[early].run_id
    found = {r.vm: r for r in rt.audit.records(run_id=run_id, steps=(Step.VM_STOPPED_OUTSIDE,))}
    assert set(found) == {early, linux} and {r.host for r in found.values()} == {"hv01"}
    assert rt.states.state("hv01") is HostState.DRAINED
    assert rt.audit.verify().ok
