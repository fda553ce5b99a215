"""The record and the states tell the truth under faults (issue 15), on a SIMULATED fleet.

Each test stages one fault the way it shows to hostmaint (a VM that appeared, a run that died, a
connection that dropped) and checks what the host state, ``host status`` and the audit say after it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from flows.patch_host import patch_host
from hostmaint.audit import AuditTrail
from hostmaint.db import open_engine
from hostmaint.drivers.memory import SimulatedFleet
from hostmaint.errors import PlanError
from hostmaint.models import HostDiscovery, HostState, StepOutcome, Trigger, Vm
from hostmaint.runtime import open_runtime
from hostmaint.simulated_fleet import demo_packages, demo_snapshot, write_simulated_fleet

pytestmark = pytest.mark.usefixtures("prefect_server")


def audit() -> AuditTrail:
    return AuditTrail(open_engine())


def fleet(rt: Any) -> SimulatedFleet:
    assert isinstance(rt.hypervisor, SimulatedFleet)
    return rt.hypervisor


def land(real: SimulatedFleet, vms: Any, source: str, target: str) -> None:
    """Move ``vms`` as libvirt would finish their migrations with no run of ours watching (the run that
    started them was killed): only the hypervisor knows."""
    for vm in list(vms):
        real.running[source].discard(vm)
        real.running[target].add(vm)
    real.save()


def crowded(tmp_path: Path, hosts: int = 3, vms: int = 30) -> Path:
    """A SIMULATED cluster so full that N+1 lets no host out."""
    from flows.locks import ensure_limits

    snap = demo_snapshot(hosts, vms)
    snap = snap.model_copy(update={"limits": snap.limits.model_copy(update={"migrations_per_cluster": 8})})
    inventory = write_simulated_fleet(tmp_path / "crowded", snap, demo_packages(snap), time_scale=0.001)
    ensure_limits(inventory)
    return inventory


# --- a. the cluster changed between plan and migration -------------------------------------------------


class _UntouchedMemory:
    """The sim fleet, with a guest that started on ``host`` a moment ago and has touched none of its
    memory yet: the host's free memory does not show it (as libvirt's does not)."""

    def __init__(self, real: SimulatedFleet, host: str, vm: Vm) -> None:
        self.real, self.host, self.vm = real, host, vm

    def discover(self, host: str) -> HostDiscovery:
        found = self.real.discover(host)
        if host != self.host:
            return found
        share = self.vm.memory_mib // len(found.cells)
        cells = tuple(c.model_copy(update={"free_mib": min(c.memory_mib, c.free_mib + share)}) for c in found.cells)
        return found.model_copy(update={"cells": cells})

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def test_a_replan_counts_a_vm_that_arrived_though_free_memory_does_not_show_it(sim_inventory: Path) -> None:
    from hostmaint import maintenance as steps

    rt = open_runtime(sim_inventory)
    run = steps.RunContext(flow="test", trigger=Trigger.TEST, operator="kim", reason="waits")
    steps.cordon(rt, run, "hv01")
    planned_on = steps.snapshot(rt, "demo")
    plan = steps.plan_drain(rt, run, "hv01", snap=planned_on)
    target = plan.placements[0].target
    # while the plan waits, a big guest starts on its target; its memory is not in the free figure yet
    real = fleet(rt)
    filler = Vm(name="filler", uuid="00000000-0000-0000-0000-00000000f111", host=target, memory_mib=56 * 1024,
                vcpus=1)
    real.vms["filler"] = filler
    real.running[target].add("filler")
    rt.hypervisor = _UntouchedMemory(real, target, filler)  # type: ignore[assignment]
    try:
        fresh, _ = steps.recheck_plan(rt, run, plan, planned_on)
    finally:
        rt.hypervisor = real

    [replan] = [r for r in audit().records(host="hv01") if r.step == "replan"]
    assert replan.inputs["reasons"] == [f"{target} received filler"]
    # the re-plan counts the guest's memory: nothing more goes to the host it fills
    assert fresh.feasible and target not in {p.target for p in fresh.placements}, fresh.placements


def displace(rt: Any, host: str, count: int, to: str) -> list[str]:
    """What a run that died after moving ``count`` VMs off ``host`` left: the host cordoned by it,
    their origins recorded, the VMs running on ``to``."""
    rt.states.begin_maintenance(host, "run-that-died", "patch")
    moved = sorted(fleet(rt).running[host])[:count]
    for vm in moved:
        rt.states.record_origin(vm, host, "run-that-died")
        fleet(rt).running[host].discard(vm)
        fleet(rt).running[to].add(vm)
    fleet(rt).save()
    return moved


def test_a_re_run_that_cannot_plan_leaves_a_host_whose_vms_are_away_cordoned(tmp_path: Path,
                                                                               hostmaint_db: Path) -> None:
    from hostmaint_cli.main import app

    inventory = crowded(tmp_path)
    rt = open_runtime(inventory)
    moved = displace(rt, "hv01", 2, "hv02")

    with pytest.raises(PlanError, match="N\\+1"):
        patch_host(host="hv01", operator="lee", inventory=str(inventory), trigger=Trigger.TEST)

    # never patched, two of its VMs away: not active, and the reason says so
    record = rt.states.get("hv01")
    assert record.state is HostState.CORDONED, record
    assert "not patched" in record.reason and all(f"{vm} (on hv02)" in record.reason for vm in moved), record
    steps = [(r.step, r.outcome) for r in audit().records(host="hv01")]
    assert ("uncordon", StepOutcome.OK) not in steps, steps
    [kept] = [r for r in audit().records(host="hv01") if r.step == "keep-cordoned"]
    assert kept.details["displaced"] == {vm: "hv02" for vm in moved}
    # host status lists them
    result = CliRunner().invoke(app, ["host", "status", "-i", str(inventory), "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["host"]: r for r in json.loads(result.stdout)}
    assert rows["hv01"]["state"] == "cordoned" and rows["hv01"]["vms_away"] == moved


def test_a_refused_plan_with_nothing_moved_still_puts_the_host_back(tmp_path: Path, hostmaint_db: Path) -> None:
    inventory = crowded(tmp_path)
    rt = open_runtime(inventory)

    with pytest.raises(PlanError, match="N\\+1"):
        patch_host(host="hv01", operator="lee", inventory=str(inventory), trigger=Trigger.TEST)

    assert rt.states.state("hv01") is HostState.ACTIVE  # it never left service
    assert "nothing moved" in rt.states.get("hv01").reason


def test_uncordon_refuses_a_host_that_was_not_verified(sim_inventory: Path) -> None:
    from hostmaint import maintenance as steps
    from hostmaint.errors import StepError

    rt = open_runtime(sim_inventory)
    run = steps.RunContext(flow="test", trigger=Trigger.TEST, operator="kim", reason="patch")
    steps.cordon(rt, run, "hv03")
    rt.states.transition("hv03", HostState.DRAINING, "draining", run.run_id)
    rt.states.transition("hv03", HostState.DRAINED, "drained", run.run_id)

    with pytest.raises(StepError, match="not verified"):
        steps.uncordon(rt, run, "hv03")
    assert rt.states.state("hv03") is HostState.DRAINED


# --- d. a VM started on the host during its drain -------------------------------------------------------


def tenant_vm(name: str, host: str, n: int) -> Vm:
    """A tenant's 1 GiB VM, not hostmaint's, to start on ``host`` mid-maintenance."""
    return Vm(name=name, uuid=f"00000000-0000-0000-0000-{n:012x}", host=host, memory_mib=1024, vcpus=1)


def start_tenant(fleet: SimulatedFleet, vm: Vm) -> None:
    fleet.vms[vm.name] = vm
    fleet.start(vm.name, vm.host)


class _StartsDuringDrain:
    """The sim fleet, where a tenant starts ``vm`` on ``host`` as the first migration off it runs."""

    def __init__(self, real: SimulatedFleet, host: str, vm: Vm) -> None:
        self.real, self.host, self.vm, self.started = real, host, vm, False

    def migrate(self, vm: str, source: str, *args: Any, **kwargs: Any) -> Any:
        if source == self.host and not self.started:
            self.started = True
            start_tenant(self.real, self.vm)
        return self.real.migrate(vm, source, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def test_a_vm_started_during_the_drain_keeps_the_host_from_being_called_drained(sim_inventory: Path) -> None:
    from hostmaint.errors import StepError
    from hostmaint_cli.main import app

    rt = open_runtime(sim_inventory)
    real = fleet(rt)
    boot = real.packages["hv03"].boot_id
    intruder = tenant_vm("tenant-new", "hv03", 0xaa)
    rt.hypervisor = _StartsDuringDrain(real, "hv03", intruder)  # type: ignore[assignment]
    try:
        with pytest.raises(StepError, match="tenant-new"):
            patch_host(host="hv03", operator="lee", inventory=str(sim_inventory), trigger=Trigger.TEST)
    finally:
        rt.hypervisor = real

    assert "tenant-new" in real.running["hv03"] and real.packages["hv03"].boot_id == boot  # never rebooted
    record = rt.states.get("hv03")
    assert record.state is HostState.CORDONED and "tenant-new" in record.reason, record
    # no state of the host said drained while tenant-new ran on it
    assert [h.state for h in rt.states.history("hv03")].count(HostState.DRAINED) == 0
    result = CliRunner().invoke(app, ["host", "status", "-i", str(sim_inventory), "--json"])
    row = {r["host"]: r for r in json.loads(result.stdout)}["hv03"]
    assert row["state"] == "cordoned" and "tenant-new" in row["reason"]


def test_a_failed_drain_names_every_vm_on_the_host_with_one_started_during_it(sim_inventory: Path) -> None:
    # round 642953836: the drain's migrations failed (the target filled up) while a tenant started a VM
    # on the host; the reason named the plan's VMs, not the tenant's that ran there too
    from hostmaint.errors import StepError

    rt = open_runtime(sim_inventory)
    real = fleet(rt)
    planned = sorted(real.running["hv03"])
    real.fail_migrations.update(planned)
    intruder = tenant_vm("tenant-mid", "hv03", 0xac)
    rt.hypervisor = _StartsDuringDrain(real, "hv03", intruder)  # type: ignore[assignment]
    try:
        with pytest.raises(StepError, match="drain of hv03 failed"):
            patch_host(host="hv03", operator="lee", inventory=str(sim_inventory), trigger=Trigger.TEST)
    finally:
        rt.hypervisor = real
        real.fail_migrations.clear()

    record = rt.states.get("hv03")
    assert record.state is HostState.CORDONED, record
    assert record.reason == f"drain failed: {', '.join(sorted([*planned, 'tenant-mid']))} still on it", record


class _StartsDuringUpdate:
    """The sim fleet's shell, where a tenant starts ``vm`` on ``host`` while its package update runs."""

    def __init__(self, real: Any, fleet: SimulatedFleet, host: str, vm: Vm) -> None:
        self.real, self.fleet, self.host, self.vm, self.started = real, fleet, host, vm, False

    def run(self, host: str, argv: Any, timeout: float = 60.0) -> Any:
        result = self.real.run(host, argv, timeout)
        if host == self.host and "update" in argv and not self.started:
            self.started = True
            start_tenant(self.fleet, self.vm)
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def test_a_vm_started_during_the_update_is_refused_recorded_and_drained_by_the_re_run(sim_inventory: Path) -> None:
    # hv02 has a kernel update. A VM started after the drain, before the reboot: the host said 'patching'
    # while the tenant's VM ran on it, and the refusal left no failed record (chaos round 1505616293)
    from hostmaint.errors import StepError

    rt = open_runtime(sim_inventory)
    real = fleet(rt)
    boot = real.packages["hv02"].boot_id
    intruder = tenant_vm("tenant-late", "hv02", 0xab)
    shell = rt.shell
    rt.shell = _StartsDuringUpdate(shell, real, "hv02", intruder)  # type: ignore[assignment]
    try:
        with pytest.raises(StepError, match="tenant-late"):
            patch_host(host="hv02", operator="lee", inventory=str(sim_inventory), trigger=Trigger.TEST)
    finally:
        rt.shell = shell

    assert "tenant-late" in real.running["hv02"] and real.packages["hv02"].boot_id == boot  # never rebooted
    record = rt.states.get("hv02")
    assert record.state is HostState.CORDONED and "tenant-late" in record.reason, record
    refused = [r for r in audit().records(host="hv02") if r.step == "confirm-empty" and r.outcome is StepOutcome.FAILED]
    assert refused and refused[-1].inputs == {"before": "reboot"}, refused

    again = patch_host(host="hv02", operator="lee", inventory=str(sim_inventory), trigger=Trigger.TEST)

    assert again.outcome is StepOutcome.OK, again.detail
    assert rt.states.state("hv02") is HostState.ACTIVE and real.packages["hv02"].boot_id != boot
    assert sum("tenant-late" in vms for vms in real.running.values()) == 1
    moved = [m for m in again.migrations if m.vm == "tenant-late"]
    assert moved and moved[0].source == "hv02" and moved[0].outcome is StepOutcome.OK, again.migrations


# --- f. what the precheck saw, and shut-off VMs on a patched host ----------------------------------------


def test_the_precheck_records_the_updates_pending_and_a_shut_off_vm_is_reported(sim_inventory: Path) -> None:
    rt = open_runtime(sim_inventory)
    real = fleet(rt)
    # an operator shut this VM down before the maintenance; it stays defined on hv02
    off = sorted(real.running["hv02"])[0]
    real.running["hv02"].discard(off)
    real.stopped[off] = "hv02"
    real.save()

    result = patch_host(host="hv02", operator="lee", inventory=str(sim_inventory), trigger=Trigger.TEST)

    assert result.outcome is StepOutcome.OK
    records = audit().records(host="hv02")
    [precheck] = [r for r in records if r.step == "precheck"]
    pending = {u["package"].split(".")[0] for u in precheck.details["precheck"]["updates"]}
    assert {"openssl", "kernel-core"} <= pending, precheck.details
    [report] = [r for r in records if r.step == "shut-off-vms"]
    assert report.details["vms"] == [off]
    assert off in result.detail and "shut-off" in result.detail
    assert real.stopped == {off: "hv02"} and off not in {vm for vms in real.running.values() for vm in vms}


# --- e. a window that can start no host, and one host's estimate ----------------------------------------


class _SlowUpdate:
    """The sim fleet's shell, where ``dnf update`` on ``host`` takes ``seconds`` (a slow mirror)."""

    def __init__(self, real: Any, host: str, seconds: float) -> None:
        self.real, self.host, self.seconds = real, host, seconds

    def run(self, host: str, argv: Any, timeout: float = 60.0) -> Any:
        if host == self.host and "update" in argv:
            import time

            time.sleep(self.seconds)
        return self.real.run(host, argv, timeout)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def test_a_host_starts_only_when_its_own_estimate_fits_what_is_left(sim_inventory: Path) -> None:
    from datetime import UTC, datetime, timedelta

    from flows.patch_window import patch_window
    from hostmaint import maintenance as steps
    from hostmaint.window import estimate_host_seconds

    rt = open_runtime(sim_inventory)
    snap = steps.snapshot(rt, "demo")
    # hv01 and hv03 carry the same memory: the same estimate (drain + update + the reboot timeout)
    estimate = estimate_host_seconds(snap, "hv01", rt.inventory)
    assert estimate == estimate_host_seconds(snap, "hv03", rt.inventory)
    real_shell = rt.shell
    rt.shell = _SlowUpdate(real_shell, "hv01", 5.0)  # type: ignore[assignment]
    rt.shell = _SlowUpdate(rt.shell, "hv03", 5.0)  # type: ignore[assignment]
    try:
        # room for one host's estimate (and a little); the first host is done far sooner than its
        # estimate, but what is left then is less than the second host's own estimate
        outcomes = patch_window(cluster="demo", hosts=["hv01", "hv03"], window_id="w-tight", operator="sched",
                                inventory=str(sim_inventory), trigger=Trigger.TEST, rebalance_moves=0,
                                window_end=datetime.now(UTC) + timedelta(seconds=estimate + 4))
    finally:
        rt.shell = real_shell

    by_outcome = sorted(o.outcome.value for o in outcomes)
    assert by_outcome == ["ok", "skipped"], outcomes
    [left] = [o for o in outcomes if o.outcome is StepOutcome.SKIPPED]
    assert "window would end" in left.detail
    assert rt.states.state(left.host) is HostState.ACTIVE  # never cordoned


def test_a_window_run_again_finishes_the_host_it_left_in_maintenance_before_taking_another_out(
        sim_inventory: Path) -> None:
    # round 1388221267: the window left hv02 cordoned (its plan was refused while a target was full); run
    # again, it started hv03 first, whose N+1 then counted hv02 as lost and refused it
    from flows.patch_window import patch_window
    from hostmaint import maintenance as steps
    from hostmaint.window import window_order

    rt = open_runtime(sim_inventory)
    order, _ = window_order(steps.snapshot(rt, "demo"))
    last = order[-1]
    rt.states.begin_maintenance(last, "run-refused", "window w-again")
    rt.states.keep_out(last, "cannot evacuate: N+1 refused", "run-refused")
    first_seq = max((r.seq for r in audit().records()), default=0)

    outcomes = patch_window(cluster="demo", window_id="w-again", operator="sched", inventory=str(sim_inventory),
                            trigger=Trigger.TEST, rebalance_moves=0, max_hosts_in_parallel=1)

    assert all(o.outcome is StepOutcome.OK for o in outcomes), outcomes
    cordons = [r.host for r in audit().records() if r.seq > first_seq and r.step == "cordon"]
    assert cordons[0] == last and sorted(cordons) == sorted(order), (cordons, order)


@pytest.mark.parametrize("named", [False, True])
def test_a_window_run_again_finishes_the_host_a_killed_run_left_rebooting(sim_inventory: Path, named: bool) -> None:
    # round 1126511108: the window's run was killed while hv03 rebooted; the discovery leaves a rebooting
    # host out, so the re-run saw two hosts to patch, never named hv03, and N+1 refused both
    from flows.patch_window import patch_window
    from hostmaint import maintenance as steps
    from hostmaint.window import window_order

    rt = open_runtime(sim_inventory)
    order, _ = window_order(steps.snapshot(rt, "demo"))
    last = order[-1]
    # drained onto the first host before it was patched
    land(fleet(rt), sorted(fleet(rt).running[last]), last, order[0])
    rt.states.begin_maintenance(last, "run-killed", "patch window w-reboot")
    for step in (HostState.DRAINING, HostState.DRAINED, HostState.PATCHING, HostState.REBOOTING):
        rt.states.transition(last, step, step.value, "run-killed")
    first_seq = max((r.seq for r in audit().records()), default=0)

    outcomes = patch_window(cluster="demo", window_id="w-reboot", operator="sched", inventory=str(sim_inventory),
                            trigger=Trigger.TEST, rebalance_moves=0, max_hosts_in_parallel=1,
                            hosts=[last] if named else None)

    if named:  # the operator named it alone: only it is patched
        order = [last]
    assert sorted(o.host for o in outcomes) == sorted(order), outcomes
    assert all(o.outcome is StepOutcome.OK for o in outcomes), outcomes
    assert rt.states.state(last) is HostState.ACTIVE
    hosts_worked = [r.host for r in audit().records() if r.seq > first_seq and r.host in order
                    and r.step in ("cordon", "reboot", "verify")]
    assert hosts_worked[0] == last, hosts_worked  # finished before another host went out


def test_a_window_that_starts_no_host_fails_and_says_how_to_resume(sim_inventory: Path) -> None:
    from datetime import UTC, datetime, timedelta

    from typer.testing import CliRunner

    from hostmaint_cli.main import app

    end = (datetime.now(UTC) + timedelta(seconds=60)).strftime("%Y-%m-%dT%H:%M:%S")
    result = CliRunner().invoke(app, ["window", "run", "demo", "-i", str(sim_inventory), "--window-end", end,
                                      "--window-id", "w-short"])

    text = " ".join(result.output.split())
    assert result.exit_code == 1, text
    assert "window w-short started no host: 4 host(s) of demo left unpatched" in text, text
    assert "hostmaint window run demo --window-id w-short --window-end" in text, text
    assert not [r for r in audit().records() if r.step == "cordon"]


# --- c. the SSH connection dropped during the update -----------------------------------------------------


class _DropsDuringUpdate:
    """The sim fleet's shell, where the connection to ``host`` drops while ``dnf update`` runs: the update
    completes on the host, the caller never hears how it ended."""

    def __init__(self, real: Any, host: str) -> None:
        self.real, self.host, self.dropped = real, host, False

    def run(self, host: str, argv: Any, timeout: float = 60.0) -> Any:
        from hostmaint.errors import TransientDriverError

        result = self.real.run(host, argv, timeout)
        if host == self.host and "update" in argv and not self.dropped:
            self.dropped = True
            raise TransientDriverError("connection lost while the command ran (it may have run)", host)
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def test_an_update_whose_connection_dropped_is_unknown_and_the_re_run_records_what_changed(
        sim_inventory: Path) -> None:
    from hostmaint.errors import StepError

    rt = open_runtime(sim_inventory)
    real_shell = rt.shell
    rt.shell = _DropsDuringUpdate(real_shell, "hv01")  # type: ignore[assignment]
    try:
        with pytest.raises(StepError, match="outcome is unknown"):
            patch_host(host="hv01", operator="lee", inventory=str(sim_inventory), trigger=Trigger.TEST)
    finally:
        rt.shell = real_shell

    # the update ran to its end on the host; the record says its outcome is unknown, not failed
    assert fleet(rt).packages["hv01"].installed["openssl"] == "1:3.0.7-28.el9"
    [update] = [r for r in audit().records(host="hv01") if r.step == "update"]
    assert update.outcome is StepOutcome.UNKNOWN and "connection lost" in update.details["error"]
    record = rt.states.get("hv01")
    assert record.state is HostState.PATCHING and "outcome unknown" in record.reason, record

    result = patch_host(host="hv01", operator="lee", inventory=str(sim_inventory), trigger=Trigger.TEST)

    assert result.outcome is StepOutcome.OK and result.packages_changed == 1
    [recovered] = [r for r in audit().records(host="hv01") if r.step == "update-recovered"]
    assert recovered.outcome is StepOutcome.OK and recovered.inputs["update_run"] == update.run_id
    assert [c["package"].split(".")[0] for c in recovered.details["package_diff"]["upgraded"]] == ["openssl"]
    assert rt.states.state("hv01") is HostState.ACTIVE


# --- b. a run killed mid-drain ---------------------------------------------------------------------------


def test_migrations_that_completed_after_their_run_died_are_found_and_recorded(sim_inventory: Path) -> None:
    rt = open_runtime(sim_inventory)
    # a run cordoned hv01, recorded the origins of its drain and was killed while two migrations
    # were in flight; libvirt finished them: the VMs run on hv02, and no record says so
    moved = displace(rt, "hv01", 2, "hv02")
    rt.states.transition("hv01", HostState.DRAINING, "draining", "run-that-died")
    left = sorted(fleet(rt).running["hv01"])
    rt.states.record_origin(left[0], "hv01", "run-that-died")  # its migration never completed

    result = patch_host(host="hv01", operator="lee", inventory=str(sim_inventory), trigger=Trigger.TEST)

    assert result.outcome is StepOutcome.OK
    found = [r for r in audit().records(host="hv01") if r.step == "migration-found"]
    assert sorted(r.vm or "" for r in found) == moved
    assert all(r.inputs == {"target": "hv02", "started_by_run": "run-that-died"} for r in found), found
    assert all("run-that-died" in r.details["note"] for r in found)
    assert fleet(rt).running["hv01"] >= set(moved)  # and they came home with the others
    assert not rt.states.origins("hv01")  # the origin of the VM that never left is gone too
    assert audit().verify().ok


def test_a_lock_held_by_a_dead_run_is_named_with_when_it_frees(sim_inventory: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    from flows import locks
    from hostmaint.errors import LockHeldError

    with get_client(sync_client=True) as client:
        dead = client.create_flow_run(patch_host, parameters={"host": "hv04"}, name="killed-mid-drain")
        client.set_flow_run_state(dead.id, Crashed(message="process killed"), force=True)
    rt = open_runtime(sim_inventory)
    rt.states.begin_maintenance("hv04", str(dead.id), "patch")
    # the dead run's lease on host:hv04 is still there: nothing renews it, nothing gave it back
    lease = locks._acquire([locks.host_limit("hv04")], 1, 0, "")
    assert lease is not None
    try:
        with pytest.raises(LockHeldError) as caught:
            patch_host(host="hv04", operator="lee", inventory=str(sim_inventory), trigger=Trigger.TEST,
                       lock_wait_s=1)
    finally:
        locks._release(lease.lease_id)

    text = str(caught.value)
    assert str(dead.id) in text and "killed-mid-drain" in text and "Crashed" in text, text
    assert "frees by itself by" in text, text


# --- g. a target that became unreachable mid-drain -------------------------------------------------------


class _TargetLost:
    """The sim fleet, where the link to the first target the drain of ``source`` sends to is cut as that
    migration starts, and comes back once the drain has been re-planned (the next migration)."""

    def __init__(self, real: SimulatedFleet, source: str) -> None:
        self.real, self.source = real, source
        self.lost: str | None = None
        self.replanned = False  # the cluster was discovered again since the link was cut
        self.healed = False

    def _down(self, host: str) -> None:
        from hostmaint.errors import TransientDriverError

        if host == self.lost and not self.healed:
            raise TransientDriverError("libvirtd unreachable (link cut)", host)

    def migrate(self, vm: str, source: str, target: str, *args: Any, **kwargs: Any) -> Any:
        if self.lost is None and source == self.source:
            self.lost = target
        elif self.lost is not None and self.replanned:
            self.healed = True
        self._down(target)
        return self.real.migrate(vm, source, target, *args, **kwargs)

    def discover(self, host: str) -> HostDiscovery:
        self._down(host)
        if self.lost is not None:
            self.replanned = True
        return self.real.discover(host)

    def running_vms(self, host: str) -> tuple[str, ...]:
        self._down(host)
        return self.real.running_vms(host)

    def locate(self, vm: str) -> tuple[str, ...]:
        return tuple(h for h in self.real.locate(vm) if h != self.lost or self.healed)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def test_a_drain_whose_target_stops_answering_re_plans_the_rest_onto_other_hosts(sim_inventory: Path) -> None:
    rt = open_runtime(sim_inventory)
    real = fleet(rt)
    home = set(real.running["hv01"])
    lossy = _TargetLost(real, "hv01")
    rt.hypervisor = lossy  # type: ignore[assignment]
    try:
        result = patch_host(host="hv01", operator="lee", inventory=str(sim_inventory), trigger=Trigger.TEST,
                            return_vms=False)
    finally:
        rt.hypervisor = real

    assert result.outcome is StepOutcome.OK, result.detail
    lost = lossy.lost
    records = audit().records(host="hv01")
    drains = [r for r in records if r.step == "drain"]
    assert [d.outcome for d in drains] == [StepOutcome.FAILED, StepOutcome.OK]
    assert drains[0].details["unreachable_targets"] == [lost]
    [replan] = [r for r in records if r.step == "replan"]
    assert f"{lost} stopped answering during the drain" in replan.inputs["reasons"]
    assert lost not in {p["target"] for p in replan.details["plan"]["placements"]}
    # every VM left hv01, none of the re-planned ones onto the host that was lost
    assert not real.running["hv01"] and home <= {vm for vms in real.running.values() for vm in vms}
    moved = {m.vm for m in result.migrations if m.outcome is StepOutcome.OK}
    assert moved == home, result.migrations


class _TargetLostAndRestFilled(_TargetLost):
    """As :class:`_TargetLost`, but the link is cut once two VMs have left the source and never comes
    back, and as it is cut tenants fill every other host: the re-plan of what did not move is refused
    (chaos round 1727215996: libvirtd killed on the target mid-drain, the re-plan refused by N+1)."""

    done: int = 0  # migrations off the source that ended before the link was cut

    def migrate(self, vm: str, source: str, target: str, *args: Any, **kwargs: Any) -> Any:
        if self.lost is None and source == self.source and self.done >= 2:
            self.lost = target
            for host in sorted(self.real.running):
                if host in (source, target):
                    continue
                free = sum(c.free_mib for c in self.real.discover(host).cells)
                name = f"tenant-{host}"
                self.real.vms[name] = Vm(name=name, uuid=f"00000000-0000-0000-0000-{len(host):06d}{host[-2:]:0>6}",
                                         host=host, memory_mib=free - 64, vcpus=1)
                self.real.running[host].add(name)
            self.real.save()
        self._down(target)
        result = self.real.migrate(vm, source, target, *args, **kwargs)
        if source == self.source and result.outcome is StepOutcome.OK:
            self.done += 1
        return result


def test_a_drain_refused_after_some_vms_moved_keeps_the_host_out_naming_them(sim_inventory: Path) -> None:
    # the refusal came from the drain's re-plan, after migrations had run: whether anything of the host
    # moved must be judged from where its VMs run now, not from the discovery made before the drain
    # (that one still shows them home, and the host went back active "nothing moved", unpatched)
    rt = open_runtime(sim_inventory)
    real = fleet(rt)
    lossy = _TargetLostAndRestFilled(real, "hv01")
    rt.hypervisor = lossy  # type: ignore[assignment]
    try:
        with pytest.raises(PlanError):
            patch_host(host="hv01", operator="lee", inventory=str(sim_inventory), trigger=Trigger.TEST,
                       return_vms=False)
        moved = [r.vm for r in audit().records(host="hv01") if r.step == "migrate" and r.outcome is StepOutcome.OK]
    finally:
        rt.hypervisor = real
    assert moved, "the drain moved nothing before its target was lost: the case is not exercised"
    record = rt.states.get("hv01")
    assert record.state is HostState.CORDONED, record
    assert all(vm in record.reason for vm in moved), record.reason
    # focused on one target, the VMs that moved are on the lost one: the reason says it did not answer
    assert f"not discovered now: {lossy.lost}" in record.reason, record.reason
    [kept] = [r for r in audit().records(host="hv01") if r.step == "keep-cordoned"]
    assert all(vm in json.dumps(kept.details) for vm in moved), kept.details


# --- the pure rules behind them --------------------------------------------------------------------------


@pytest.mark.parametrize(("estimate", "finished", "budget"), [
    (900.0, (), 900.0),  # nothing finished yet: the host's own estimate
    (900.0, (40.0, 75.0), 900.0),  # quick hosts before it never shorten it
    (900.0, (40.0, 1200.0), 1200.0),  # a host that took longer than the estimates raises it
])
def test_a_hosts_budget_is_its_estimate_or_longer(estimate: float, finished: tuple[float, ...],
                                                  budget: float) -> None:
    from hostmaint.window import host_budget_s

    assert host_budget_s(estimate, finished) == budget


def test_keep_out_keeps_the_maintenance_and_says_why(hostmaint_db: Path) -> None:
    from hostmaint.errors import StateError
    from hostmaint.state import HostStateStore

    states = HostStateStore(open_engine())
    states.begin_maintenance("hv01", "r1", "patch")
    states.transition("hv01", HostState.DRAINING, "draining", "r1")
    kept = states.keep_out("hv01", "cannot go on: N+1", "r2")
    assert (kept.state, kept.reason, kept.prior_state) == (HostState.CORDONED, "cannot go on: N+1", HostState.ACTIVE)
    assert states.keep_out("hv01", "cannot go on: N+1", "r2") == kept  # said once
    # only an operator puts it back: it is in maintenance, not an operator's cordon
    with pytest.raises(StateError, match="in maintenance"):
        states.return_to_service("hv01", "operator")
    noted = states.note("hv01", "still out: vm-a away", "r3")
    assert (noted.state, noted.reason, noted.prior_state) == (HostState.CORDONED, "still out: vm-a away",
                                                              HostState.ACTIVE)
    assert [h.reason for h in states.history("hv01")][-2:] == ["cannot go on: N+1", "still out: vm-a away"]


# --- return-host killed between its uncordon and the return of the VMs ----------------------------------------


def test_a_return_host_killed_after_its_uncordon_brings_the_vms_home_when_run_again(sim_inventory: Path) -> None:
    from flows.evacuate_host import evacuate_host
    from flows.return_host import AfterReturn, return_host
    from hostmaint import maintenance as steps

    rt = open_runtime(sim_inventory)
    home = set(fleet(rt).running["hv01"])
    evacuate_host(host="hv01", operator="ann", reason="RAM swap", inventory=str(sim_inventory), trigger=Trigger.TEST)
    # the return's run verified and uncordoned hv01, then died before it moved a VM back
    run = steps.RunContext(flow="return-host", trigger=Trigger.TEST, operator="ann", reason="evacuation over")
    steps.confirm_empty(rt, run, "hv01")
    steps.verify(rt, run, "hv01", None)
    steps.uncordon(rt, run, "hv01")
    assert rt.states.state("hv01") is HostState.ACTIVE and set(rt.states.origins("hv01")) == home

    again = return_host(host="hv01", operator="ann", then=AfterReturn.RETURN_VMS, inventory=str(sim_inventory),
                        trigger=Trigger.TEST)

    assert again.outcome is StepOutcome.OK, again.detail
    assert fleet(open_runtime(sim_inventory)).running["hv01"] == home
    assert not rt.states.origins("hv01")


def test_a_refused_plan_runs_no_pre_drain_hook(tmp_path: Path, hostmaint_db: Path) -> None:
    import yaml

    inventory = crowded(tmp_path)
    marker = tmp_path / "noout-set"
    data = yaml.safe_load(inventory.read_text())
    data["clusters"][0]["hooks"] = {"pre_drain": [{"name": "ceph-noout", "argv": ["touch", str(marker)],
                                                   "on": "worker"}]}
    inventory.write_text(yaml.safe_dump(data))
    rt = open_runtime(inventory)

    with pytest.raises(PlanError, match="N\\+1"):
        patch_host(host="hv01", operator="lee", inventory=str(inventory), trigger=Trigger.TEST)

    # the host went back into service and no drain happened: nothing may be left set for one
    assert rt.states.state("hv01") is HostState.ACTIVE
    assert not marker.exists()
    assert not [r for r in audit().records(host="hv01") if r.step == "hook"]


def test_a_vm_found_on_an_operator_cordoned_host_keeps_its_maintenance_open(sim_inventory: Path) -> None:
    # hv01 was cordoned by an operator before its patch; a VM started on it after its drain. Moving it
    # back to cordoned must not end the maintenance there (the state before it was cordoned too), or
    # 'host uncordon' would put an unpatched host with its VMs away into service.
    from hostmaint import maintenance as steps
    from hostmaint.errors import StepError
    from hostmaint_cli.main import app

    rt = open_runtime(sim_inventory)
    run = steps.RunContext(flow="test", trigger=Trigger.TEST, operator="kim", reason="patch")
    rt.states.set_aside("hv01", "fan noise", None)
    rt.states.begin_maintenance("hv01", run.run_id, "patch")
    rt.states.transition("hv01", HostState.DRAINING, "draining", run.run_id)
    rt.states.transition("hv01", HostState.DRAINED, "drained", run.run_id)
    assert fleet(rt).running["hv01"], "the demo fleet runs VMs on hv01"

    with pytest.raises(StepError, match="still runs"):
        steps.confirm_empty(rt, run, "hv01")

    record = rt.states.get("hv01")
    assert record.state is HostState.CORDONED and "runs on it" in record.reason, record
    assert record.prior_state is HostState.CORDONED, record  # still in maintenance, back to the operator's cordon
    refused = CliRunner().invoke(app, ["host", "uncordon", "hv01", "-i", str(sim_inventory)])
    assert refused.exit_code == 2 and rt.states.state("hv01") is HostState.CORDONED, refused.output


# --- moves of a return or a rebalance that died -------------------------------------------------------


def test_moves_a_killed_rebalance_left_unrecorded_are_found_by_the_next_rebalance(sim_inventory: Path) -> None:
    # a rebalance records its moves before it starts them; killed before it recorded them, the moves
    # that landed were recorded by nobody (only a drain's origins were ever looked for)
    from flows.rebalance_cluster import rebalance_cluster
    from hostmaint import maintenance as steps
    from hostmaint.models import Placement

    rt = open_runtime(sim_inventory)
    real = fleet(rt)
    landed, stayed = sorted(real.running["hv01"])[:2]
    dead = steps.RunContext(flow="rebalance-cluster", trigger=Trigger.TEST, operator="kim", reason="rebalance")
    steps.record_moves(rt, dead, steps.EvacuationPlan(cluster="demo", hosts=(), snapshot_digest="x", placements=(
        Placement(vm=landed, source="hv01", target="hv02"),
        Placement(vm=stayed, source="hv01", target="hv03"))))
    land(real, [landed], "hv01", "hv02")  # the first move only

    rebalance_cluster(cluster="demo", max_moves=0, operator="kim", inventory=str(sim_inventory), trigger=Trigger.TEST)

    records = audit().records()
    found = [r for r in records if r.step == "migration-found"]
    assert [(r.vm, r.host, r.inputs["target"], r.inputs["started_by_run"]) for r in found] == [
        (landed, "hv01", "hv02", dead.run_id)], found
    assert not [r for r in records if r.vm == stayed and r.step in ("migration-found", "migration-resolved")]
    # said once: a second rebalance finds nothing more to record
    rebalance_cluster(cluster="demo", max_moves=0, operator="kim", inventory=str(sim_inventory), trigger=Trigger.TEST)
    assert len([r for r in audit().records() if r.step == "migration-found"]) == 1


def test_a_returns_migration_whose_outcome_was_unknown_is_settled_by_the_next_return(sim_inventory: Path) -> None:
    from flows.evacuate_host import evacuate_host
    from flows.return_host import return_host
    from hostmaint import maintenance as steps
    from hostmaint.models import MigrationResult

    rt = open_runtime(sim_inventory)
    real = fleet(rt)
    home = sorted(real.running["hv01"])
    evacuate_host(host="hv01", operator="ann", reason="RAM swap", inventory=str(sim_inventory), trigger=Trigger.TEST)
    vm = home[0]
    [away] = [h for h, vms in real.running.items() if vm in vms]
    # an earlier return verified and uncordoned hv01, then lost sight of this VM's migration home
    # (libvirtd on the target died): unknown; the VM did land home
    dead = steps.RunContext(flow="return-host", trigger=Trigger.TEST, operator="ann", reason="evacuation over")
    steps.confirm_empty(rt, dead, "hv01")
    steps.verify(rt, dead, "hv01", None)
    steps.uncordon(rt, dead, "hv01")
    steps._audit_migration(rt, dead, "demo", MigrationResult(vm=vm, source=away, target="hv01",
                                                              outcome=StepOutcome.UNKNOWN, seconds=1.0,
                                                              error="cannot connect to libvirt on hv01"))
    land(real, [vm], away, "hv01")

    result = return_host(host="hv01", operator="ann", inventory=str(sim_inventory), trigger=Trigger.TEST)

    assert result.outcome is StepOutcome.OK, result.detail
    found = [r for r in audit().records() if r.step == "migration-found" and r.vm == vm]
    assert [(r.host, r.inputs["target"], r.inputs["started_by_run"]) for r in found] == [
        (away, "hv01", dead.run_id)], found
    assert vm not in rt.states.origins("hv01")  # home: its origin is cleared, as a finished return does
    assert set(real.running["hv01"]) == set(home)


def test_host_status_does_not_call_a_host_drained_while_a_vm_started_after_its_evacuation_runs_there(
        sim_inventory: Path) -> None:
    # chaos round 411835775: the evacuation ended (hv02 drained), then a tenant started a VM on the host;
    # nothing of ours ran to see it, and host status said drained, which an operator reads as "empty"
    from flows.evacuate_host import evacuate_host
    from hostmaint_cli.main import app

    rt = open_runtime(sim_inventory)
    evacuate_host(host="hv02", operator="ann", reason="RAM swap", inventory=str(sim_inventory), trigger=Trigger.TEST)
    assert rt.states.state("hv02") is HostState.DRAINED
    start_tenant(fleet(rt), tenant_vm("tenant-after", "hv02", 0xad))

    result = CliRunner().invoke(app, ["host", "status", "-i", str(sim_inventory), "--json"])

    row = {r["host"]: r for r in json.loads(result.stdout)}["hv02"]
    assert row["state"] == "cordoned" and "not drained: tenant-after runs on it" in row["reason"], row
    assert "recorded state drained" in row["reason"]
    assert rt.states.state("hv02") is HostState.DRAINED  # a read writes nothing
    fleet(rt).running["hv02"].discard("tenant-after")
    row = {r["host"]: r for r in json.loads(CliRunner().invoke(
        app, ["host", "status", "-i", str(sim_inventory), "--json"]).stdout)}["hv02"]
    assert row["state"] == "drained", row


def test_host_status_says_why_an_evacuated_host_is_out_and_who_asked(sim_inventory: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # the evacuation's reason was in the audit trail only; host status said "drained"
    from flows.evacuate_host import evacuate_host
    from hostmaint_cli.main import app

    monkeypatch.setenv("COLUMNS", "300")  # a row is a line
    evacuate_host(host="hv02", operator="ann", reason="replace the DIMM", inventory=str(sim_inventory),
                  trigger=Trigger.TEST)

    table = CliRunner().invoke(app, ["host", "status", "-i", str(sim_inventory)])
    [row] = [line for line in table.output.splitlines() if "hv02" in line]
    assert "replace the DIMM (evacuated by ann, evacuate-host)" in row, table.output


def test_a_host_already_out_of_service_and_empty_is_patched_though_n_plus_1_is_short(sim_inventory: Path) -> None:
    # chaos round 532732275: hv01 was reset after its reboot never came back (empty, out of service); its
    # re-run was refused by N+1, which kept the cluster's spare away longer instead of bringing it back
    from flows.evacuate_host import evacuate_host

    rt = open_runtime(sim_inventory)
    evacuate_host(host="hv01", operator="ann", reason="RAM swap", inventory=str(sim_inventory), trigger=Trigger.TEST)
    rt.states.transition("hv01", HostState.FAILED, "reboot failed: did not come back", "run-earlier")
    rt.states.transition("hv01", HostState.CORDONED, "reset by an operator", None)  # hostmaint host reset
    for other in ("hv02", "hv03"):
        rt.states.set_aside(other, "operator: fan noise", None)
    assert not fleet(rt).running["hv01"]

    result = patch_host(host="hv01", operator="lee", inventory=str(sim_inventory), trigger=Trigger.TEST)

    assert result.outcome is StepOutcome.OK, result.detail
    assert rt.states.state("hv01") is HostState.ACTIVE
    [plan] = [r for r in audit().records(host="hv01") if r.step == "plan" and r.run_id == result_run(rt, "hv01")]
    assert "out of service before this run and moves nothing" in plan.details["capacity_note"]
    # a host in service with VMs is still held to N+1
    from hostmaint.errors import PlanError

    with pytest.raises(PlanError, match="N\\+1"):
        patch_host(host="hv04", operator="lee", inventory=str(sim_inventory), trigger=Trigger.TEST)


def result_run(rt: Any, host: str) -> str:
    """The run that last changed ``host``'s state."""
    return str(rt.states.get(host).run_id)


def test_a_window_whose_host_failed_before_any_step_of_its_own_says_so_in_the_audit(
        sim_inventory: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # chaos round 222539331: the Prefect server restarted as hv02's run started; the window failed after
    # patching hv01, and no record said anything had failed
    import flows.patch_window as window_flow

    real_patch = window_flow.patch_host

    def patch_host_or_lose_the_server(**kwargs: Any) -> Any:
        if kwargs["host"] == "hv02":
            raise ConnectionError("All connection attempts failed")
        return real_patch(**kwargs)

    monkeypatch.setattr(window_flow, "patch_host", patch_host_or_lose_the_server)
    outcomes = window_flow.patch_window(cluster="demo", hosts=["hv01", "hv02"], window_id="w-lost",
                                        operator="sched", inventory=str(sim_inventory), trigger=Trigger.TEST,
                                        rebalance_moves=0)

    assert {o.host: o.outcome for o in outcomes} == {"hv01": StepOutcome.OK, "hv02": StepOutcome.FAILED}
    [record] = [r for r in audit().records() if r.step == "window" and r.host is None]
    assert record.outcome is StepOutcome.FAILED and record.inputs == {"window_id": "w-lost"}
    said = {h["host"]: h for h in record.details["hosts"]}
    assert said["hv02"]["outcome"] == "failed" and "All connection attempts failed" in said["hv02"]["detail"]
    assert said["hv01"]["outcome"] == "ok"


def test_a_patch_resumed_from_patching_drains_a_vm_started_since_the_run_died(sim_inventory: Path) -> None:
    # chaos round 337982517: the worker running hv01's patch was killed during the update; a tenant then
    # started a VM on hv01. The re-run went straight to the update, refused it, and needed one more run
    from flows.evacuate_host import evacuate_host

    rt = open_runtime(sim_inventory)
    real = fleet(rt)
    evacuate_host(host="hv02", operator="ann", reason="patch", inventory=str(sim_inventory), trigger=Trigger.TEST)
    rt.states.transition("hv02", HostState.PATCHING, "patching", "run-that-died")
    boot = real.packages["hv02"].boot_id
    start_tenant(real, tenant_vm("tenant-since", "hv02", 0xae))

    result = patch_host(host="hv02", operator="lee", inventory=str(sim_inventory), trigger=Trigger.TEST)

    assert result.outcome is StepOutcome.OK, result.detail
    assert rt.states.state("hv02") is HostState.ACTIVE and real.packages["hv02"].boot_id != boot
    moved = [m for m in result.migrations if m.vm == "tenant-since"]
    assert moved and moved[0].source == "hv02" and moved[0].outcome is StepOutcome.OK, result.migrations
    assert sum("tenant-since" in vms for vms in real.running.values()) == 1


def test_a_vm_away_already_moved_on_by_a_drain_whose_run_died_is_found_by_the_next_run(sim_inventory: Path) -> None:
    # chaos round 1888529758: vm05 had an origin from an earlier maintenance (the first one wins); the
    # worker running hv03's drain was killed with vm05 in flight; it landed, and no run recorded the move
    from hostmaint import maintenance as steps
    from hostmaint.models import Placement

    rt = open_runtime(sim_inventory)
    real = fleet(rt)
    vm = sorted(real.running["hv03"])[0]
    rt.states.record_origin(vm, "hv01", "an-earlier-maintenance")
    dead = steps.RunContext(flow="patch-host", trigger=Trigger.TEST, operator="lee", reason="patch")
    rt.states.begin_maintenance("hv03", dead.run_id, "patch")
    rt.states.transition("hv03", HostState.DRAINING, "draining", dead.run_id)
    steps.record_moves(rt, dead, steps.EvacuationPlan(cluster="demo", hosts=("hv03",), snapshot_digest="x",
                                                      placements=(Placement(vm=vm, source="hv03", target="hv02"),)),
                       "hv03", drain=True)
    land(real, [vm], "hv03", "hv02")

    result = patch_host(host="hv03", operator="lee", inventory=str(sim_inventory), trigger=Trigger.TEST)

    assert result.outcome is StepOutcome.OK, result.detail
    found = [r for r in audit().records() if r.step == "migration-found" and r.vm == vm]
    assert [(r.host, r.inputs["target"], r.inputs["started_by_run"]) for r in found] == [
        ("hv03", "hv02", dead.run_id)], found


def test_window_run_exits_non_zero_when_it_left_hosts_it_never_started(sim_inventory: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # chaos round 512318907: the window patched hv01, its end came before hv02 could fit, and the CLI
    # exited 0 with two hosts unpatched
    import hostmaint_cli.runs as runs
    from flows.common import HostOutcome
    from hostmaint_cli.main import app

    def ended(*outcomes: tuple[str, StepOutcome, str]) -> list[HostOutcome]:
        return [HostOutcome(host=h, outcome=o, state=HostState.ACTIVE, detail=d) for h, o, d in outcomes]

    done = ("hv01", StepOutcome.OK, "2 package change(s); rebooted")
    before = ("hv03", StepOutcome.SKIPPED, "already patched in window w-end")
    left = ("hv02", StepOutcome.SKIPPED, "not started: window would end before it finished")
    monkeypatch.setattr(runs, "_run_flow", lambda *a, **k: ended(done, left, before))
    result = CliRunner().invoke(app, ["window", "run", "demo", "-i", str(sim_inventory), "--window-id", "w-end"])
    assert result.exit_code == 1 and "window left 1 host(s) unpatched: hv02" in result.output, result.output
    monkeypatch.setattr(runs, "_run_flow", lambda *a, **k: ended(done, before))
    result = CliRunner().invoke(app, ["window", "run", "demo", "-i", str(sim_inventory), "--window-id", "w-end"])
    assert result.exit_code == 0, result.output
