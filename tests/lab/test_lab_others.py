"""What others do to a host while hostmaint maintains it, on the real lab (root; CI runs it).

A tenant's ``virsh destroy`` of a guest before its migration starts, and of the Linux guest (transient)
while its migration runs (libvirt fails the migration): hostmaint did not stop them, must not call them
lost, must not start them again, and goes on; libvirt's own reason for the shut-off domain is the
evidence, and for the transient one, which leaves no domain behind, libvirt's lifecycle event.
An operator cordoning a drain's target while its migrations wait: nothing more goes there. The host's
own dnf-automatic holding the package manager's lock when the update comes: real dnf,
waited for, or the step fails naming its holder with no package changed. One fresh lab for the
module: the patches first, the evacuation (which leaves its host cordoned) last. The flows' side on a
simulated fleet: tests/flows/test_tenant_stops.py, tests/unit/test_patching.py.
"""

from __future__ import annotations

import importlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import libvirt
import pytest

from hostmaint.lab import LabInfo, faults
from hostmaint.lab.host import host_dir
from hostmaint.models import HostState, Step, StepOutcome, Trigger
from tests.lab.labkit import WORKDIR, all_vms, fresh_lab

pytestmark = [pytest.mark.lab, pytest.mark.usefixtures("prefect_server")]


@pytest.fixture(scope="module")
def tenant_lab(prefect_server: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabInfo]:
    with fresh_lab(tmp_path_factory.mktemp("lab-others") / "hostmaint.db") as info:
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


def test_an_update_waits_for_the_hosts_own_dnf_run_holding_the_lock_then_patches(tenant_lab: LabInfo) -> None:
    from flows.patch_host import patch_host
    from hostmaint.runtime import open_runtime

    rt: Any = open_runtime(tenant_lab.inventory_path)
    before = all_vms(rt)
    release = faults.hold_package_lock(WORKDIR, "hv03")  # dnf-automatic, 25 s more to run
    holder = (host_dir(WORKDIR, "hv03") / "root" / "var" / "lib" / "dnf" / "rpmdb_lock.pid").read_text()
    held_since = time.monotonic()
    timer = threading.Timer(25.0, release)
    timer.start()
    try:
        result = patch_host(host="hv03", operator="lab-test", reason="dnf busy", trigger=Trigger.TEST,
                            inventory=str(tenant_lab.inventory_path))
    finally:
        timer.cancel()
        release()
    assert result.outcome is StepOutcome.OK, result.detail
    assert time.monotonic() - held_since > 25.0  # it could not have updated before the lock was free
    assert result.rebooted and result.packages_changed >= 2
    update = rt.audit.records(host="hv03", steps=(Step.UPDATE,))[-1]
    assert update.outcome is StepOutcome.OK
    # real dnf said so, and it was waited for (if the drain outlasted the holder, this fails: then the
    # holder's 25 s must grow)
    waits = update.details["update"]["lock_waits"]
    assert waits and set(waits) == {f"RPMDB already locked by {holder}"}, waits
    after = all_vms(rt)
    assert set(after) == set(before) and all(len(h) == 1 for h in after.values()), after


def test_real_dnf_holding_the_lock_makes_the_update_fail_naming_the_holder_and_change_nothing(
        tenant_lab: LabInfo) -> None:
    from hostmaint import patching
    from hostmaint.errors import StepError
    from hostmaint.inventory import HostPolicy
    from hostmaint.runtime import open_runtime

    rt: Any = open_runtime(tenant_lab.inventory_path)
    release = faults.hold_package_lock(WORKDIR, "hv01")
    holder = (host_dir(WORKDIR, "hv01") / "root" / "var" / "lib" / "dnf" / "rpmdb_lock.pid").read_text()
    packages = faults.installed_packages(WORKDIR, "hv01")
    try:
        with pytest.raises(StepError, match=f"RPMDB already locked by {holder} .*changed no package"):
            patching.apply_updates(rt.shell, "hv01", HostPolicy(package_lock_wait_s=0))
    finally:
        release()
    assert faults.installed_packages(WORKDIR, "hv01") == packages
    assert packages != set() and any("1.0-1" in p for p in packages)  # an update was pending all along


def test_a_target_the_operator_cordons_mid_drain_gets_no_vm_that_had_not_started(
        tenant_lab: LabInfo, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three hosts, one cordoned: N+1 leaves nowhere to re-plan, so the drain stops safely, what had not
    started still on its source and named; uncordoned, the evacuation runs again and finishes."""
    from flows.evacuate_host import evacuate_host
    from flows.return_host import return_host
    from hostmaint.errors import PlanError
    from hostmaint.lab import add_guest, remove_guest
    from hostmaint.runtime import open_runtime

    rt: Any = open_runtime(tenant_lab.inventory_path)
    # more guests than the 4 a source sends at once, so some wait for a slot when the cordon comes
    extra = [f"cdn{i}" for i in range(6)]
    for name in extra:
        add_guest(tenant_lab, name, "hv03")
    drain_module = importlib.import_module("hostmaint.migration.drain")
    on_progress = drain_module._Drain.on_progress
    cordoned: list[bool] = []

    def operator_cordons_hv02(self: Any, flight: Any, sample: Any) -> None:
        if flight.spec.target == "hv02" and not cordoned:
            rt.states.set_aside("hv02", "fan failure", "operator")
            cordoned.append(True)
        on_progress(self, flight, sample)

    monkeypatch.setattr(drain_module._Drain, "on_progress", operator_cordons_hv02)
    try:
        with pytest.raises(PlanError, match="hv02 is cordoned now"):
            evacuate_host(host="hv03", operator="lab-test", reason="cordon mid-drain", trigger=Trigger.TEST,
                          inventory=str(tenant_lab.inventory_path))
        assert cordoned, "no migration to hv02 sent a progress sample"
        records = rt.audit.records(host="hv03")
        refused = [r for r in records if r.step == Step.MIGRATE and r.outcome is StepOutcome.FAILED]
        assert refused, "every migration to hv02 had started before the cordon: the guard was not exercised"
        assert all("not started: hv02 is cordoned (fan failure)" in r.details["error"] for r in refused)
        after = all_vms(rt)
        assert all(len(h) == 1 for h in after.values()), after
        assert all(after[r.vm] == ["hv03"] for r in refused), {r.vm: after[r.vm] for r in refused}
        record = rt.states.get("hv03")
        assert record.state is HostState.CORDONED and all(r.vm in record.reason for r in refused), record
        assert "hv02 is cordoned now" in [r for r in records if r.step == Step.REPLAN][-1].inputs["reasons"]
    finally:
        monkeypatch.undo()
        rt.states.return_to_service("hv02", "fans replaced", "operator")
        for name in extra:
            remove_guest(tenant_lab, name)
    # the operator's way back: the evacuation again, then the return
    assert evacuate_host(host="hv03", operator="lab-test", reason="again", trigger=Trigger.TEST,
                         inventory=str(tenant_lab.inventory_path)).outcome is StepOutcome.OK
    return_host(host="hv03", operator="lab-test", reason="back", trigger=Trigger.TEST,
                inventory=str(tenant_lab.inventory_path))
    assert rt.states.state("hv03") is HostState.ACTIVE


def defined_on(info: LabInfo, host: str, vm: str) -> bool | None:
    """None: libvirt on ``host`` knows no ``vm``; else whether it is defined persistently there."""
    conn = libvirt.open(info.plain_uri(host))
    try:
        dom = conn.lookupByName(vm)
        return bool(dom.isPersistent())
    except libvirt.libvirtError:
        return None
    finally:
        conn.close()


def test_a_transient_guest_moves_out_and_home_and_stays_transient(tenant_lab: LabInfo) -> None:
    """A domain its owner never defined on the host (created from XML, or its definition removed) must not
    come back defined: migrating it with PERSIST_DEST defined it on every target (it outlived its stop)."""
    from flows.evacuate_host import evacuate_host
    from flows.return_host import return_host
    from hostmaint.runtime import open_runtime

    rt: Any = open_runtime(tenant_lab.inventory_path)
    before = all_vms(rt)
    guest = sorted(vm for vm, hosts in before.items() if hosts == ["hv03"])[0]
    conn = libvirt.open(tenant_lab.plain_uri("hv03"))
    try:
        dom = conn.lookupByName(guest)
        xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        dom.undefine()  # running on: now transient
    finally:
        conn.close()
    try:
        assert defined_on(tenant_lab, "hv03", guest) is False
        result = evacuate_host(host="hv03", operator="lab-test", reason="transient", trigger=Trigger.TEST,
                               inventory=str(tenant_lab.inventory_path))
        assert result.outcome is StepOutcome.OK, result.detail
        [away] = all_vms(rt)[guest]
        assert away != "hv03"
        assert defined_on(tenant_lab, away, guest) is False  # running there, still transient
        assert defined_on(tenant_lab, "hv03", guest) is None  # nothing left behind on the source
        return_host(host="hv03", operator="lab-test", reason="back", trigger=Trigger.TEST,
                    inventory=str(tenant_lab.inventory_path))
        after = all_vms(rt)
        assert after[guest] == ["hv03"] and all(len(h) == 1 for h in after.values()), after
        assert set(after) == set(before)
        assert defined_on(tenant_lab, "hv03", guest) is False
        others = [h.name for h in tenant_lab.hosts if h.name != "hv03"]
        assert [h for h in others if defined_on(tenant_lab, h, guest) is not None] == []
        assert rt.states.state("hv03") is HostState.ACTIVE and rt.audit.verify().ok
    finally:
        [home] = all_vms(rt)[guest]
        conn = libvirt.open(tenant_lab.plain_uri(home))
        try:
            conn.defineXML(xml)  # as the other tests expect it: persistent again
        finally:
            conn.close()


def test_a_host_pinned_to_its_old_kernel_boots_it_after_its_patch_and_is_back_in_service(tenant_lab: LabInfo) -> None:
    """A site keeps a host on its old kernel (a regression in the new one): grubby --set-default. The
    patch installs the new kernel, reboots (a kernel was installed since boot), and the host boots the
    pinned one. Expecting the newest failed its verify every window and kept it out of service."""
    from flows.patch_host import patch_host
    from hostmaint.runtime import open_runtime

    rt: Any = open_runtime(tenant_lab.inventory_path)
    old = faults.running_kernel(WORKDIR, "hv01")
    pinned = rt.shell.run("hv01", ["grubby", "--set-default", f"/boot/vmlinuz-{old}"])
    assert pinned.exit_code == 0, pinned
    before = all_vms(rt)
    try:
        result = patch_host(host="hv01", operator="lab-test", reason="pinned kernel", trigger=Trigger.TEST,
                            inventory=str(tenant_lab.inventory_path))
        assert result.outcome is StepOutcome.OK, result.detail
        newest = faults.newest_installed_kernel(WORKDIR, "hv01")
        assert result.rebooted and newest != old
        assert faults.running_kernel(WORKDIR, "hv01") == old  # the bootloader's choice, not the newest
        verify = rt.audit.records(host="hv01", steps=(Step.VERIFY,))[-1]
        kernel = next(c for c in verify.details["verify"]["checks"] if c["name"] == "kernel")
        assert kernel["ok"] and kernel["warning"] and f"newer kernel {newest} installed" in kernel["detail"], kernel
        assert rt.states.state("hv01") is HostState.ACTIVE
        after = all_vms(rt)
        assert after == before, after
        # nothing installed since that boot: the next window does not reboot it again
        assert rt.shell.run("hv01", ["needs-restarting", "-r"]).exit_code == 0
    finally:
        newest = faults.newest_installed_kernel(WORKDIR, "hv01")
        rt.shell.run("hv01", ["grubby", "--set-default", f"/boot/vmlinuz-{newest}"])  # the pin off again


def test_a_guest_its_tenant_saves_before_its_migration_is_recorded_stopped_outside_and_left_saved(
        tenant_lab: LabInfo, monkeypatch: pytest.MonkeyPatch) -> None:
    """virsh managedsave by a tenant mid-evacuation: libvirt says "saved", which hostmaint never does;
    before, that VM was a broken invariant ("runs 0 times") and the evacuation failed."""
    import hostmaint.maintenance as steps
    from flows.evacuate_host import evacuate_host
    from flows.return_host import return_host
    from hostmaint.runtime import open_runtime

    rt: Any = open_runtime(tenant_lab.inventory_path)
    before = all_vms(rt)
    saved = sorted(vm for vm, hosts in before.items() if hosts == ["hv02"])[0]
    probe = steps.probe_dirty_rates

    def save_then_probe(*args: Any, **kwargs: Any) -> Any:  # the plan is recorded, nothing has moved
        conn = libvirt.open(tenant_lab.plain_uri("hv02"))
        try:
            conn.lookupByName(saved).managedSave()
        finally:
            conn.close()
        return probe(*args, **kwargs)

    monkeypatch.setattr(steps, "probe_dirty_rates", save_then_probe)
    try:
        result = evacuate_host(host="hv02", operator="lab-test", reason="tenant saves", trigger=Trigger.TEST,
                               inventory=str(tenant_lab.inventory_path))
        assert result.outcome is StepOutcome.OK, result.detail
        assert f"stopped outside hostmaint, not moved: {saved} (saved)" in result.detail
        assert shut_off_reason(tenant_lab, "hv02", saved) == libvirt.VIR_DOMAIN_SHUTOFF_SAVED
        [migrate] = [r for r in rt.audit.records(steps=(Step.MIGRATE,)) if r.vm == saved and r.run_id
                     == rt.audit.records(host="hv02", steps=(Step.DRAIN,))[-1].run_id]
        assert migrate.outcome is StepOutcome.SKIPPED and migrate.details["stopped_outside"] == "saved"
        monkeypatch.undo()
        return_host(host="hv02", operator="lab-test", reason="back", trigger=Trigger.TEST,
                    inventory=str(tenant_lab.inventory_path))
        after = all_vms(rt)
        assert set(after) == set(before) - {saved} and all(len(h) == 1 for h in after.values()), after
        conn = libvirt.open(tenant_lab.plain_uri("hv02"))
        try:
            assert conn.lookupByName(saved).hasManagedSaveImage(0)  # left as its tenant left it
        finally:
            conn.close()
        assert rt.states.state("hv02") is HostState.ACTIVE and rt.audit.verify().ok
    finally:
        conn = libvirt.open(tenant_lab.plain_uri("hv02"))
        try:
            dom = conn.lookupByName(saved)
            if not dom.isActive():
                dom.create()  # restored from its save, as the tenant would: the next tests count it
        finally:
            conn.close()


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
    # the Linux guest transient (running, its definition removed): destroyed, libvirt keeps nothing of it,
    # and only the driver's lifecycle events can say it was destroyed, not lost
    conn = libvirt.open(tenant_lab.plain_uri("hv01"))
    try:
        conn.lookupByName(linux).undefine()
    finally:
        conn.close()
    assert defined_on(tenant_lab, "hv01", linux) is False
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
    migrate = rt.hypervisor.migrate

    def slowly(vm: str, source: str, target: str, options: Any, on_progress: Any = None) -> Any:
        # uncapped, the guest can finish moving before its first progress sample or the destroy (seen:
        # 12 of 20 under load): capped, the destroy surely lands while libvirt sends it
        if vm == linux:
            options = options.model_copy(update={"bandwidth_mib_s": 16})
        return migrate(vm, source, target, options, on_progress)

    monkeypatch.setattr(rt.hypervisor, "migrate", slowly)

    result = evacuate_host(host="hv01", operator="lab-test", reason="tenant stops", trigger=Trigger.TEST,
                           inventory=str(tenant_lab.inventory_path))

    assert destroyed.is_set(), "the Linux guest's migration sent no progress sample before it ended"
    assert result.outcome is StepOutcome.OK, result.detail
    moved = len(on_hv01) - 2
    assert result.detail.startswith(f"{moved} VM(s) moved; stopped outside hostmaint, not moved: ")
    after = all_vms(rt)
    assert set(after) == set(before) - {early, linux} and all(len(h) == 1 for h in after.values()), after
    assert not [vm for vm, hosts in after.items() if "hv01" in hosts]
    # the persistent one still defined where it stopped, as libvirt says: destroyed; the transient one gone
    assert shut_off_reason(tenant_lab, "hv01", early) == libvirt.VIR_DOMAIN_SHUTOFF_DESTROYED
    assert [defined_on(tenant_lab, h.name, linux) for h in tenant_lab.hosts] == [None] * len(tenant_lab.hosts)
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
