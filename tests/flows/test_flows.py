"""The maintenance flows on a SIMULATED fleet, under a real temporary Prefect server.

These prove orchestration: order of steps, guards, state, audit, resume. The
drivers themselves are proven against the real lab in tests/lab.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import pytest

from flows.evacuate_host import evacuate_host
from flows.patch_host import patch_host
from flows.patch_window import patch_window
from flows.rebalance_cluster import rebalance_cluster
from hostmaint.audit import AuditTrail
from hostmaint.db import open_engine
from hostmaint.drivers.memory import SimulatedFleet
from hostmaint.errors import StepError
from hostmaint.maintenance import RunContext, audited, check_invariants
from hostmaint.models import EvacuationPlan, FleetSnapshot, HostState, Step, StepOutcome, Trigger
from hostmaint.runtime import open_runtime
from hostmaint.simulated_fleet import demo_packages, demo_snapshot, write_simulated_fleet

pytestmark = pytest.mark.usefixtures("prefect_server")


def fleet_of(inventory: Path) -> SimulatedFleet:
    return SimulatedFleet.load(inventory.parent / "fleet-state.json")


def where(inventory: Path) -> dict[str, list[str]]:
    """vm -> hosts it runs on, read from the simulated fleet's state file."""
    out: dict[str, list[str]] = {}
    for host, vms in fleet_of(inventory).running.items():
        for vm in vms:
            out.setdefault(vm, []).append(host)
    return out


def assert_each_vm_runs_once(inventory: Path, expected: set[str]) -> None:
    placement = where(inventory)
    assert set(placement) == expected
    assert all(len(hosts) == 1 for hosts in placement.values()), placement
    assert fleet_of(inventory).lost == []


def audit() -> AuditTrail:
    return AuditTrail(open_engine())


def states(inventory: Path) -> dict[str, HostState]:
    rt = open_runtime(inventory)
    return {h.name: rt.states.state(h.name) for h in rt.inventory.hosts}


ALL_VMS = {v.name for v in demo_snapshot(4, 12).vms}


def test_patch_host_end_to_end(sim_inventory: Path) -> None:
    before = fleet_of(sim_inventory)
    home = {vm for vm in before.running["hv02"]}
    old_boot = before.packages["hv02"].boot_id

    result = patch_host(host="hv02", operator="alice", reason="monthly", inventory=str(sim_inventory),
                        trigger=Trigger.TEST)

    assert result.outcome is StepOutcome.OK
    assert result.rebooted  # hv02 carries the pending kernel update
    assert result.packages_changed == 2
    after = fleet_of(sim_inventory)
    assert after.packages["hv02"].boot_id != old_boot
    assert after.running["hv02"] == home  # every VM that left came home
    assert_each_vm_runs_once(sim_inventory, ALL_VMS)
    assert states(sim_inventory)["hv02"] is HostState.ACTIVE
    steps = [r.step for r in audit().records(host="hv02")]
    for step in ("cordon", "plan", "drain", "confirm-empty", "preflight", "update", "reboot-decision", "reboot",
                 "verify", "uncordon", "return-vms"):
        assert step in steps, f"no audit record for {step}: {steps}"
    assert steps.index("confirm-empty") < steps.index("reboot")
    records = audit().records(host="hv02")
    assert {r.operator for r in records} == {"alice"}
    drain = next(r for r in records if r.step == "drain")
    # the scheduler's decisions are in the record, not only their results: in-flight over time
    in_flight = [n for _, n in drain.details["concurrency"]]
    assert in_flight and max(in_flight) == drain.details["max_concurrency"] and in_flight[-1] == 0
    assert drain.details["decisions"] == []  # nothing escalated, aborted or skipped in this drain
    update = next(r for r in records if r.step == "update")
    upgraded = {c["package"].split(".")[0] for c in update.details["package_diff"]["upgraded"]}
    assert {"openssl"} <= upgraded
    assert audit().verify().ok


def test_failed_update_leaves_host_failed_and_vms_running(sim_inventory: Path) -> None:
    fleet = fleet_of(sim_inventory)
    fleet.packages["hv01"].fail_update = True
    fleet.save()

    with pytest.raises(Exception, match="update"):
        patch_host(host="hv01", operator="bob", inventory=str(sim_inventory), trigger=Trigger.TEST)

    assert states(sim_inventory)["hv01"] is HostState.FAILED
    assert fleet_of(sim_inventory).running["hv01"] == set()  # drained before the update, not refilled
    assert_each_vm_runs_once(sim_inventory, ALL_VMS)
    failed = [r for r in audit().records(host="hv01") if r.outcome == "failed"]
    assert failed and failed[0].step == "update"
    assert "simulated" in str(failed[0].details).lower() or failed[0].details.get("error")


def test_unplaceable_vm_stops_evacuation_before_any_migration(tmp_path: Path, hostmaint_db: Path) -> None:
    snap = demo_snapshot(4, 12)
    inventory = write_simulated_fleet(tmp_path / "f", snap, demo_packages(snap), time_scale=0.001,
                                      vm_policies=[{"match": {"name": "app-03"}, "migratable": False}])
    home = {vm: hosts for vm, hosts in where(inventory).items()}

    with pytest.raises(Exception, match="app-03"):
        evacuate_host(host="hv01", operator="carol", inventory=str(inventory), trigger=Trigger.TEST)

    assert where(inventory) == home  # nothing moved
    assert not [r for r in audit().records() if r.step in ("drain", "migrate")]
    plan = next(r for r in audit().records(host="hv01") if r.step == "plan")
    assert plan.outcome == "failed"
    assert "unmigratable" in str(plan.details)
    assert states(inventory)["hv01"] is HostState.CORDONED  # safe, and says why


def test_dry_run_changes_nothing_but_its_record(sim_inventory: Path) -> None:
    placement = where(sim_inventory)
    before = len(audit().records())

    result = evacuate_host(host="hv03", dry_run=True, operator="dave", inventory=str(sim_inventory),
                           trigger=Trigger.TEST)

    assert result.outcome is StepOutcome.DRY_RUN
    assert "hv03" in result.detail
    assert where(sim_inventory) == placement
    assert set(states(sim_inventory).values()) == {HostState.ACTIVE}
    new = audit().records()[before:]
    assert [(r.step, r.outcome) for r in new] == [("plan", "dry-run")]


def approved(inventory: Path, host: str) -> tuple[EvacuationPlan, FleetSnapshot]:
    """A plan as an approval form shows it: made on a snapshot of the cluster now."""
    from hostmaint.maintenance import snapshot
    from hostmaint.placement import plan_evacuation

    snap = snapshot(open_runtime(inventory), "demo")
    return plan_evacuation(snap, [host]), snap


def test_the_approved_plan_is_the_plan_that_runs(sim_inventory: Path) -> None:
    plan, snap = approved(sim_inventory, "hv01")

    result = evacuate_host(host="hv01", operator="ivan", inventory=str(sim_inventory), trigger=Trigger.TEST,
                           approved_plan=plan, approved_on=snap)

    assert result.outcome is StepOutcome.OK
    assert {(m.vm, m.target) for m in result.migrations} == {(p.vm, p.target) for p in plan.placements}
    assert not [r for r in audit().records() if r.step == "replan"]
    assert_each_vm_runs_once(sim_inventory, ALL_VMS)


def test_an_approved_plan_the_cluster_changed_under_is_re_made_and_recorded(sim_inventory: Path) -> None:
    plan, snap = approved(sim_inventory, "hv01")
    gone = sorted({p.target for p in plan.placements})[0]
    open_runtime(sim_inventory).states.transition(gone, HostState.CORDONED, "another operator")

    result = evacuate_host(host="hv01", operator="ivan", inventory=str(sim_inventory), trigger=Trigger.TEST,
                           approved_plan=plan, approved_on=snap)

    assert result.outcome is StepOutcome.OK
    assert gone not in {m.target for m in result.migrations}
    (replan,) = [r for r in audit().records() if r.step == "replan"]
    assert any(gone in why for why in replan.inputs["reasons"]), replan.inputs
    assert_each_vm_runs_once(sim_inventory, ALL_VMS)


def test_an_approved_plan_of_another_host_changes_nothing(sim_inventory: Path) -> None:
    from hostmaint.errors import InputError

    plan, snap = approved(sim_inventory, "hv02")
    before = where(sim_inventory)

    with pytest.raises(InputError, match="approved_plan: it evacuates hv02, not hv01"):
        evacuate_host(host="hv01", operator="ivan", inventory=str(sim_inventory), trigger=Trigger.TEST,
                      approved_plan=plan, approved_on=snap)

    assert where(sim_inventory) == before
    assert states(sim_inventory)["hv01"] is HostState.ACTIVE
    assert not [r for r in audit().records() if r.step == "cordon"]


def test_evacuate_then_patch_resumes_from_drained(sim_inventory: Path) -> None:
    evacuated = evacuate_host(host="hv04", operator="erin", inventory=str(sim_inventory), trigger=Trigger.TEST)
    assert evacuated.outcome is StepOutcome.OK
    assert states(sim_inventory)["hv04"] is HostState.DRAINED
    moved = len(fleet_of(sim_inventory).running["hv04"])
    assert moved == 0
    drains_before = len([r for r in audit().records(host="hv04") if r.step == "drain"])

    result = patch_host(host="hv04", operator="erin", inventory=str(sim_inventory), trigger=Trigger.TEST)

    assert result.outcome is StepOutcome.OK
    drains_after = len([r for r in audit().records(host="hv04") if r.step == "drain"])
    assert drains_after == drains_before  # not drained twice
    assert states(sim_inventory)["hv04"] is HostState.ACTIVE
    assert len(fleet_of(sim_inventory).running["hv04"]) == 3  # its VMs came home
    assert_each_vm_runs_once(sim_inventory, ALL_VMS)


def test_a_vm_shut_down_by_its_policy_starts_again_when_a_later_run_finishes_the_host(
        tmp_path: Path, hostmaint_db: Path) -> None:
    # app-06 cannot migrate and its policy says: shut down, start again after. The evacuation stops it
    # and leaves hv04 drained; the patch run that finishes hv04 has no plan of that stop (it resumes
    # from drained), yet must start it: the record, not the plan, says what maintenance stopped.
    snap = demo_snapshot(4, 12)
    inventory = write_simulated_fleet(tmp_path / "fleet", snap, demo_packages(snap), time_scale=0.001,
                                      vm_policies=[{"match": {"name": "app-06"}, "migratable": False,
                                                    "on_unmigratable": "shutdown"}])
    evacuated = evacuate_host(host="hv04", operator="erin", inventory=str(inventory), trigger=Trigger.TEST)
    assert evacuated.outcome is StepOutcome.OK
    assert "app-06" not in where(inventory)  # stopped, as its policy allows
    assert open_runtime(inventory).states.stopped_on("hv04") == ["app-06"]

    result = patch_host(host="hv04", operator="erin", inventory=str(inventory), trigger=Trigger.TEST)

    assert result.outcome is StepOutcome.OK
    assert where(inventory)["app-06"] == ["hv04"]  # running again, where it was
    assert_each_vm_runs_once(inventory, ALL_VMS)
    assert open_runtime(inventory).states.stopped_on("hv04") == []
    starts = [r for r in audit().records(host="hv04") if r.step == "start-vm"]
    assert [(r.vm, r.outcome) for r in starts] == [("app-06", StepOutcome.OK)]


def test_window_rerun_skips_patched_hosts(sim_inventory: Path) -> None:
    first = patch_window(cluster="demo", window_id="w1", operator="sched", inventory=str(sim_inventory),
                         trigger=Trigger.TEST, rebalance_moves=0)
    assert {o.host: o.outcome for o in first} == {h: StepOutcome.OK for h in ("hv01", "hv02", "hv03", "hv04")}
    assert_each_vm_runs_once(sim_inventory, ALL_VMS)
    migrations = len(fleet_of(sim_inventory).migration_log) + len(
        [r for r in audit().records() if r.step == "migrate"])

    second = patch_window(cluster="demo", window_id="w1", operator="sched", inventory=str(sim_inventory),
                          trigger=Trigger.TEST, rebalance_moves=0)

    assert {o.outcome for o in second} == {StepOutcome.SKIPPED}
    assert len([r for r in audit().records() if r.step == "migrate"]) + len(
        fleet_of(sim_inventory).migration_log) == migrations


def test_window_stops_after_failure_limit(sim_inventory: Path) -> None:
    fleet = fleet_of(sim_inventory)
    for host in fleet.packages:
        fleet.packages[host].fail_update = True
    fleet.save()

    outcomes = patch_window(cluster="demo", window_id="w-fail", max_failed_hosts=0, operator="sched",
                            inventory=str(sim_inventory), trigger=Trigger.TEST)

    by_outcome = [o.outcome for o in outcomes]
    assert by_outcome.count(StepOutcome.FAILED) == 1
    assert by_outcome.count(StepOutcome.SKIPPED) == 3
    assert all("failure limit" in o.detail for o in outcomes if o.outcome is StepOutcome.SKIPPED)
    assert_each_vm_runs_once(sim_inventory, ALL_VMS)


def test_window_that_has_ended_starts_no_host(sim_inventory: Path) -> None:
    from datetime import UTC, datetime, timedelta

    # a window that started no host fails (CLI exit 1), saying what is left and how to resume
    with pytest.raises(StepError, match="window w-late started no host: 4 host"):
        patch_window(cluster="demo", window_id="w-late", operator="sched", inventory=str(sim_inventory),
                     trigger=Trigger.TEST, window_end=datetime.now(UTC) + timedelta(seconds=30))

    assert not [r for r in audit().records() if r.step == "cordon"]


def test_rebalance_moves_within_budget(tmp_path: Path, hostmaint_db: Path) -> None:
    snap = demo_snapshot(4, 12)
    # Pile every VM onto two hosts so there is something to level.
    vms = tuple(v.model_copy(update={"host": "hv01" if i % 2 else "hv02"}) for i, v in enumerate(snap.vms))
    snap = snap.model_copy(update={"vms": vms})
    inventory = write_simulated_fleet(tmp_path / "f", snap, demo_packages(snap), time_scale=0.001,
                                      vm_policies=[])

    result = rebalance_cluster(cluster="demo", max_moves=3, operator="frank", inventory=str(inventory),
                               trigger=Trigger.TEST)

    assert result.outcome is StepOutcome.OK
    assert 1 <= len(result.migrations) <= 3
    assert_each_vm_runs_once(inventory, {v.name for v in snap.vms})
    running = fleet_of(inventory).running
    assert running["hv03"] or running["hv04"]


def test_drain_keeps_a_progress_artifact(sim_inventory: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterType
    from prefect.client.schemas.sorting import ArtifactSort

    moving = len(fleet_of(sim_inventory).running["hv02"])
    evacuate_host(host="hv02", operator="ivy", inventory=str(sim_inventory), trigger=Trigger.TEST)

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(type=ArtifactFilterType(any_=["progress"])),
                                          sort=ArtifactSort.CREATED_DESC, limit=5)
    latest = artifacts[0]
    assert latest.data == 100.0
    assert f"{moving} of {moving} VM(s) done" in (latest.description or "")
    assert "GiB moved" in (latest.description or "")


def run_logs(flow_run_id: object) -> list[Any]:
    """The log entries the Prefect server holds for one flow run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all()  # logs travel in batches
    with get_client(sync_client=True) as client:
        return list(client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))))


def run_log(flow_run_id: object) -> list[str]:
    return [entry.message for entry in run_logs(flow_run_id)]


def test_the_core_librarys_log_lines_reach_the_runs_log(sim_inventory: Path) -> None:
    state = patch_host(host="hv02", operator="jo", inventory=str(sim_inventory), trigger=Trigger.TEST,
                       return_state=True)
    assert state.is_completed()
    logs = run_logs(state.state_details.flow_run_id)
    # hostmaint.patching narrates the reboot; the operator reads it in the run's log in the UI
    core = [entry.message for entry in logs if entry.name.startswith("hostmaint")]
    assert any(m.startswith("hv02: rebooting (boot id ") for m in core), core
    assert any(m.startswith("hv02: back after ") for m in core), core
    # and it is filed under the task that rebooted, not only under the flow
    reboot = [entry for entry in logs if entry.message.startswith("hv02: rebooting")]
    assert all(entry.task_run_id is not None for entry in reboot)


# --- several hosts at once -------------------------------------------------------------------------


def crowded_fleet(tmp_path: Path, hosts: int, vms: int, max_in_maintenance: int, *, time_scale: float = 0.001
                  ) -> tuple[Path, FleetSnapshot]:
    """A SIMULATED cluster fuller than the demo: N+1 lets fewer hosts out than the limit names."""
    snap = demo_snapshot(hosts, vms)
    snap = snap.model_copy(update={"limits": snap.limits.model_copy(update={
        "max_hosts_in_maintenance": max_in_maintenance, "migrations_per_cluster": 8})})
    inventory = write_simulated_fleet(tmp_path / "crowded", snap, demo_packages(snap), time_scale=time_scale)
    from flows.locks import ensure_limits

    ensure_limits(inventory)
    return inventory, snap


def host_utils(inventory: Path, snap: FleetSnapshot) -> dict[str, float]:
    """Each host's memory use over its memory, from the VMs the simulated fleet runs now."""
    memory = {v.name: v.memory_mib for v in snap.vms}
    return {h.name: sum(memory[v] for v in fleet_of(inventory).running.get(h.name, ())) / h.memory_mib
            for h in snap.hosts}


def test_a_window_levels_the_cluster_it_leaves_lopsided(tmp_path: Path, hostmaint_db: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import flows.patch_window as window_flow

    inventory, snap = crowded_fleet(tmp_path, hosts=6, vms=48, max_in_maintenance=1)
    seen: list[dict[str, float]] = []
    rebalance = window_flow.rebalance_locked

    def lopsided_first(*args: Any, **kwargs: Any) -> Any:
        seen.append(host_utils(inventory, snap))  # the cluster as its hosts' patches left it
        return rebalance(*args, **kwargs)

    monkeypatch.setattr(window_flow, "rebalance_locked", lopsided_first)
    outcomes = patch_window(cluster="demo", window_id="w-level", operator="sched", inventory=str(inventory),
                            trigger=Trigger.TEST)

    # its hosts' patches left the last host empty; the window's rebalance levelled that
    (lopsided,) = seen
    mean = sum(lopsided.values()) / len(lopsided)
    assert max(abs(u - mean) for u in lopsided.values()) > 0.10, lopsided

    assert {o.outcome for o in outcomes} == {StepOutcome.OK}
    levelled = host_utils(inventory, snap)
    assert max(abs(u - mean) for u in levelled.values()) <= 0.10, levelled
    assert_each_vm_runs_once(inventory, {v.name for v in snap.vms})
    (record,) = [r for r in audit().records() if r.step == "rebalance" and r.outcome is not StepOutcome.SKIPPED]
    assert record.outcome is StepOutcome.OK and record.details["balance_after"] < record.details["balance_before"]


def most_hosts_in_maintenance_at_once() -> int:
    """From the audit chain: how many hosts were between their cordon and their uncordon at once."""
    spans: dict[str, list[int]] = {}
    for r in audit().records():
        if r.step in ("cordon", "uncordon") and r.host:
            spans.setdefault(r.host, []).append(r.seq)
    events = sorted((seq, +1 if i % 2 == 0 else -1) for seqs in spans.values() for i, seq in enumerate(seqs))
    most = now = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most


def test_a_window_runs_only_as_many_hosts_at_once_as_n_plus_1_allows(tmp_path: Path, hostmaint_db: Path) -> None:
    from hostmaint.migration.simulate import parallel_capacity

    # the limit says 3 hosts at once, but this cluster can spare only one: the window must not try 3
    inventory, snap = crowded_fleet(tmp_path, hosts=8, vms=80, max_in_maintenance=3, time_scale=0.02)
    assert parallel_capacity(snap, [h.name for h in snap.hosts]) == 1

    flow_runs = logging.getLogger("prefect.flow_runs")
    level = flow_runs.level
    flow_runs.setLevel(logging.INFO)  # the tests run Prefect at WARNING; the window says why a host waits at INFO
    try:
        state = patch_window(cluster="demo", max_hosts_in_parallel=3, window_id="w-crowded", operator="sched",
                             inventory=str(inventory), trigger=Trigger.TEST, rebalance_moves=0, return_state=True)
    finally:
        flow_runs.setLevel(level)
    outcomes = state.result()

    # none refused by its own N+1 check (which used to leave it cordoned, one more host out each time)
    assert {o.host: o.outcome for o in outcomes} == {h.name: StepOutcome.OK for h in snap.hosts}, outcomes
    assert set(states(inventory).values()) == {HostState.ACTIVE}
    assert_each_vm_runs_once(inventory, {v.name for v in snap.vms})
    assert most_hosts_in_maintenance_at_once() == 1
    # each next host was held back because N+1 said no, not because nothing else was running
    waits = [m for m in run_log(state.state_details.flow_run_id) if "waits until a host in maintenance" in m]
    assert waits and all("N+1 refused" in m for m in waits), waits


def test_a_patch_refused_by_n_plus_1_leaves_the_host_as_it_was(tmp_path: Path, hostmaint_db: Path) -> None:
    inventory, _ = crowded_fleet(tmp_path, hosts=3, vms=30, max_in_maintenance=1)
    before = where(inventory)

    with pytest.raises(Exception, match="N\\+1"):
        patch_host(host="hv01", operator="lee", inventory=str(inventory), trigger=Trigger.TEST)

    assert where(inventory) == before  # nothing moved
    assert states(inventory)["hv01"] is HostState.ACTIVE  # not left cordoned, not marked failed
    steps = [(r.step, r.outcome.value) for r in audit().records(host="hv01")]
    assert steps == [("precheck", "ok"), ("cordon", "ok"), ("plan", "failed"), ("uncordon", "ok")], steps


@pytest.mark.parametrize("broken", ["no free space", "no package manager"])
def test_a_host_that_cannot_be_patched_is_refused_before_anything_moves(sim_inventory: Path, broken: str) -> None:
    fleet = fleet_of(sim_inventory)
    if broken == "no free space":
        fleet.packages["hv03"].free_mib["/var"] = 10
    else:
        fleet.packages["hv03"].package_managers = []
    fleet.save()
    before = where(sim_inventory)

    said = "not enough free space" if broken == "no free space" else "no package manager"
    with pytest.raises(StepError, match=f"^hv03: cannot be patched, nothing changed: {said}: "):  # host named once
        patch_host(host="hv03", operator="lee", inventory=str(sim_inventory), trigger=Trigger.TEST)

    assert where(sim_inventory) == before
    assert states(sim_inventory)["hv03"] is HostState.ACTIVE  # not cordoned, not marked failed
    assert [(r.step, r.outcome) for r in audit().records(host="hv03")] == [("precheck", StepOutcome.FAILED)]


def cordoned_and_planned(inventory: Path, host: str) -> tuple[Any, Any, FleetSnapshot, Any]:
    """What a run has when it waits for its turn to drain ``host``: runtime, run, the discovery, the plan."""
    from hostmaint import maintenance as steps

    rt = open_runtime(inventory)
    run = steps.RunContext(flow="test", trigger=Trigger.TEST, operator="kim", reason="waits")
    steps.cordon(rt, run, host)
    planned_on = steps.snapshot(rt, rt.cluster_of(host))
    return rt, run, planned_on, steps.plan_drain(rt, run, host, snap=planned_on)


def test_a_drain_gives_up_its_set_up_slot_when_the_drains_beside_it_could_not_all_have_one(
        tmp_path: Path, hostmaint_db: Path) -> None:
    from hostmaint import maintenance as steps

    snap = demo_snapshot(8, 24, cluster="share")
    snap = snap.model_copy(update={"limits": snap.limits.model_copy(
        update={"max_hosts_in_maintenance": 8, "migrations_per_cluster": 16, "migrations_per_source": 8})})
    inventory = write_simulated_fleet(tmp_path / "share", snap, demo_packages(snap))
    rt, _, _, plan = cordoned_and_planned(inventory, "hv01")
    # alone: two streams fill its link, one more sets up the next migration; 5 such fit 16 slots
    assert steps.drain_share(rt, plan) == 3
    assert steps.drain_share(rt, plan, hosts_at_once=5) == 3
    # a window of 6 at once: not all would have a set-up slot, so none takes one
    assert steps.drain_share(rt, plan, hosts_at_once=6) == 2
    # the same when 6 hosts of the cluster are in maintenance and not drained, whoever started them
    for host in ("hv02", "hv03", "hv04", "hv05"):
        rt.states.transition(host, HostState.CORDONED, "test: operator cordon")
    assert steps.drain_share(rt, plan) == 3
    rt.states.transition("hv06", HostState.CORDONED, "test: operator cordon")
    rt.states.transition("hv06", HostState.DRAINING, "test: draining")
    assert steps.drain_share(rt, plan) == 2
    rt.states.transition("hv06", HostState.DRAINED, "test: drained")
    assert steps.drain_share(rt, plan) == 3


def test_a_plan_that_waited_while_another_drain_filled_its_target_is_replanned(sim_inventory: Path) -> None:
    from hostmaint import maintenance as steps
    from hostmaint.models import MigrationOptions

    rt, run, planned_on, plan = cordoned_and_planned(sim_inventory, "hv01")
    target = plan.placements[0].target
    # while the plan waits for its targets' locks, another run's drain moves a VM onto its target
    mover = next(v for v in planned_on.vms if v.host not in ("hv01", target) and not v.anti_affinity)
    rt.hypervisor.migrate(mover.name, mover.host, target, MigrationOptions())

    fresh, now = steps.recheck_plan(rt, run, plan, planned_on)
    report = steps.drain_host(rt, run, fresh, now=now)

    assert report.ok
    [replan] = [r for r in audit().records(host="hv01") if r.step == "replan"]
    assert replan.inputs["reasons"] == [f"{target} received {mover.name}"]
    assert replan.inputs["replaces"] == plan.snapshot_digest != fresh.snapshot_digest
    # what ran is the recorded re-plan, not the plan that waited
    ran = {(m.vm, m.target) for m in report.results}
    assert ran == {(p["vm"], p["target"]) for p in replan.details["plan"]["placements"]}
    assert not fleet_of(sim_inventory).running["hv01"]
    assert_each_vm_runs_once(sim_inventory, ALL_VMS)


def test_a_plan_that_still_fits_runs_as_planned(sim_inventory: Path) -> None:
    from hostmaint import maintenance as steps

    rt, run, planned_on, plan = cordoned_and_planned(sim_inventory, "hv01")

    kept, now = steps.recheck_plan(rt, run, plan, planned_on)
    report = steps.drain_host(rt, run, kept, now=now)

    assert report.ok and kept == plan
    assert not [r for r in audit().records() if r.step == "replan"]
    assert {(m.vm, m.target) for m in report.results} == {(p.vm, p.target) for p in plan.placements}


def test_two_hosts_drain_side_by_side_onto_different_targets(tmp_path: Path, hostmaint_db: Path) -> None:
    from flows.locks import ensure_limits
    from tests.side_by_side import assert_drained_at_once_onto_different_hosts, evacuate_side_by_side

    # its own cluster (and so its own limits on the session's server): 2 hosts in maintenance at once,
    # 4 migrations per cluster and 2 per source, so two drains fit side by side
    snap = demo_snapshot(6, 12, cluster="side")
    snap = snap.model_copy(update={"limits": snap.limits.model_copy(update={"max_hosts_in_maintenance": 2})})
    # slow migrations (seconds each): the first drain still runs when the second run has planned
    inventory = write_simulated_fleet(tmp_path / "six", snap, demo_packages(snap), time_scale=4.0)
    ensure_limits(inventory)
    rt = open_runtime(inventory)
    for host in ("hv01", "hv02"):  # an operator took both out of placement: neither plan targets the other
        rt.states.transition(host, HostState.CORDONED, "test: operator cordon")

    results = evacuate_side_by_side(rt, inventory, "hv01", "hv02")

    assert {h: r.outcome for h, r in results.items()} == {"hv01": StepOutcome.OK, "hv02": StepOutcome.OK}
    assert_each_vm_runs_once(inventory, {v.name for v in snap.vms})
    assert not fleet_of(inventory).running["hv01"] and not fleet_of(inventory).running["hv02"]
    records = audit().records()
    assert_drained_at_once_onto_different_hosts(records, "hv01", "hv02")
    # each drain kept to its share of the cluster's 4 migration slots
    assert {r.host: r.inputs["cluster_slots"] for r in records if r.step == "drain"} == {"hv01": 2, "hv02": 2}


def test_a_windows_hosts_drain_side_by_side_though_they_planned_at_once(tmp_path: Path, hostmaint_db: Path) -> None:
    from flows.locks import ensure_limits
    from tests.side_by_side import assert_drained_at_once_onto_different_hosts

    # A window of two at once: both hosts plan at its start, on the same cluster, before either drain
    # holds a target. Focused, each plan picks the emptiest hosts, the same ones; the second to take
    # its locks finds them busy and moves off them instead of waiting for the first drain to end.
    # 8 per source: alone, a drain would hold 3 slots (two streams fill its link, one sets up), and
    # two of 3 do not fit the cluster's 4; a window of two has each hold the 2 that fill its link
    snap = demo_snapshot(8, 24, cluster="window2")
    snap = snap.model_copy(update={"limits": snap.limits.model_copy(
        update={"max_hosts_in_maintenance": 2, "migrations_per_cluster": 4, "migrations_per_source": 8})})
    inventory = write_simulated_fleet(tmp_path / "eight", snap, demo_packages(snap), time_scale=4.0)
    ensure_limits(inventory)

    outcomes = patch_window(cluster="window2", hosts=["hv01", "hv02"], max_hosts_in_parallel=2, window_id="w-two",
                            operator="sched", inventory=str(inventory), trigger=Trigger.TEST, rebalance_moves=0)

    assert {o.host: o.outcome for o in outcomes} == {"hv01": StepOutcome.OK, "hv02": StepOutcome.OK}, outcomes
    assert_each_vm_runs_once(inventory, {v.name for v in snap.vms})
    records = audit().records()
    assert_drained_at_once_onto_different_hosts(records, "hv01", "hv02")
    assert {r.host: r.inputs["cluster_slots"] for r in records if r.step == "drain"} == {"hv01": 2, "hv02": 2}
    plans = {r.host: r for r in records if r.step == "plan"}
    assert all(p.inputs["focus"] for p in plans.values())
    # each drain went to fewer hosts than the six it could have spread over
    for host in ("hv01", "hv02"):
        assert len({r.inputs["target"] for r in records if r.step == "migrate" and r.host == host}) < 6
    moved_off = [r for r in records if r.step == "replan" and any("busy" in why for why in r.inputs["reasons"])]
    first_targets = {h: {p["target"] for p in plans[h].details["plan"]["placements"]} for h in ("hv01", "hv02")}
    # Plans that collided (both made before either drain held a target: the usual case) had one
    # re-made onto free hosts, recorded; a plan made after the other drain took its targets avoided them
    if first_targets["hv01"] & first_targets["hv02"]:
        assert len(moved_off) == 1 and moved_off[0].details["plan"]["placements"], moved_off
    else:
        assert not moved_off and any(plans[h].inputs["busy"] for h in plans), plans


def test_a_plan_whose_targets_another_drain_fills_moves_off_them_when_the_cluster_has_room(
        sim_inventory: Path) -> None:
    from hostmaint import maintenance as steps

    rt, run, planned_on, _ = cordoned_and_planned(sim_inventory, "hv01")
    plan = steps.plan_drain(rt, run, "hv01", snap=planned_on, focus=True)  # as a patch plans
    targets = sorted({p.target for p in plan.placements})
    others = sorted({h.name for h in planned_on.hosts} - {"hv01", *targets})
    assert others  # demo: 4 hosts, a focused plan sends to fewer than 3

    moved = steps.retarget(rt, run, plan, planned_on, targets, focus=True)
    assert moved.feasible and not {p.target for p in moved.placements} & set(targets)
    [record] = [r for r in audit().records() if r.step == "replan"]
    assert record.inputs["busy"] == targets and all("busy" in why for why in record.inputs["reasons"])
    assert record.details["plan"]["placements"] == [p.model_dump(mode="json") for p in moved.placements]
    # every other host busy too: nothing better, the plan stays and waits (no record)
    assert steps.retarget(rt, run, plan, planned_on, [*targets, *others], focus=True) == plan
    # none of its targets busy: nothing to do
    assert steps.retarget(rt, run, plan, planned_on, others, focus=True) == plan
    assert len([r for r in audit().records() if r.step == "replan"]) == 1


class _MidMigration:
    """The sim fleet as libvirt shows it while another run migrates: ``moving`` VMs also sit on a second
    host, paused for the migration (``incoming``), or only there at the switch-over (``switching``)."""

    def __init__(self, real: object, incoming: dict[str, str], switching: dict[str, tuple[str, str]]) -> None:
        self.real, self.incoming, self.switching = real, incoming, switching

    def running_vms(self, host: str) -> tuple[str, ...]:
        names = set(self.real.running_vms(host))  # type: ignore[attr-defined]
        names |= {vm for vm, h in self.incoming.items() if h == host}
        names -= {vm for vm, (src, _) in self.switching.items() if src != host}
        names |= {vm for vm, pair in self.switching.items() if host in pair}
        return tuple(sorted(names))

    def in_migration(self, host: str) -> tuple[str, ...]:
        return tuple(sorted({vm for vm, h in self.incoming.items() if h == host}
                            | {vm for vm, pair in self.switching.items() if host in pair}))


def test_invariants_count_a_vm_being_migrated_once_and_a_vm_running_twice_as_broken(sim_inventory: Path) -> None:
    from hostmaint import maintenance as steps
    from hostmaint.errors import StepError

    rt = open_runtime(sim_inventory)
    placement = {vm: hosts[0] for vm, hosts in where(sim_inventory).items()}
    a, b = sorted(placement)[:2]
    elsewhere = {vm: next(h for h in ("hv01", "hv02", "hv03") if h != placement[vm]) for vm in (a, b)}
    real = rt.hypervisor
    # another run moves a: its copy on the target is paused for the migration; b is at its switch-over
    rt.hypervisor = _MidMigration(real, {a: elsewhere[a]}, {b: (placement[b], elsewhere[b])})  # type: ignore[assignment]
    try:
        assert steps.check_invariants(rt, "demo", sorted(ALL_VMS))[a] == placement[a]
    finally:
        rt.hypervisor = real
    # a VM running, not paused, on two hosts is what the check is for
    twice = _MidMigration(real, {a: elsewhere[a]}, {})
    twice.in_migration = lambda host: ()  # type: ignore[method-assign]
    rt.hypervisor = twice  # type: ignore[assignment]
    try:
        with pytest.raises(StepError, match=f"{a} runs 2 times"):
            steps.check_invariants(rt, "demo", sorted(ALL_VMS))
    finally:
        rt.hypervisor = real


def shutdown_fleet(tmp_path: Path, hosts: int = 4, *, max_in_maintenance: int = 1, cluster: str = "demo") -> Path:
    """A SIMULATED cluster where app-03 cannot migrate and its policy shuts it down for maintenance.

    A cluster that lets more hosts into maintenance than the demo's needs a name of its own: the
    session's Prefect server already holds the demo's limits."""
    snap = demo_snapshot(hosts, 12, cluster=cluster)
    snap = snap.model_copy(update={"limits": snap.limits.model_copy(
        update={"max_hosts_in_maintenance": max_in_maintenance})})
    inventory = write_simulated_fleet(tmp_path / "stop", snap, demo_packages(snap), time_scale=0.001,
                                      vm_policies=[{"match": {"name": "app-03"}, "migratable": False,
                                                    "on_unmigratable": "shutdown"}])
    from flows.locks import ensure_limits

    ensure_limits(inventory)
    return inventory


def test_a_failed_host_stays_failed_when_its_patch_runs_again(tmp_path: Path, hostmaint_db: Path) -> None:
    inventory = shutdown_fleet(tmp_path)
    host = where(inventory)["app-03"][0]
    fleet = fleet_of(inventory)
    fleet.packages[host].fail_update = True
    fleet.save()
    rt = open_runtime(inventory)
    rt.states.transition(host, HostState.CORDONED, "operator: watch its fans")  # before maintenance
    # a window leaves an operator's cordon alone: patch-host run on the host itself takes it in
    with pytest.raises(Exception, match="update"):
        patch_host(host=host, operator="sched", window_id="w-fail", inventory=str(inventory), trigger=Trigger.TEST)
    assert rt.states.state(host) is HostState.FAILED

    again = patch_window(cluster="demo", hosts=[host], window_id="w-fail", inventory=str(inventory),
                         trigger=Trigger.TEST, rebalance_moves=0)

    # not cleared by a run that finds it failed: unpatched, its shut-down VM stays down, and not patched
    assert again[0].outcome is StepOutcome.FAILED and "hostmaint host reset" in again[0].detail
    assert rt.states.state(host) is HostState.FAILED
    assert host not in rt.states.patched_in("w-fail")
    assert "app-03" not in where(inventory) and rt.states.stopped_on(host) == ["app-03"]


def test_a_patch_resumed_after_its_drain_shuts_down_what_its_policy_says(tmp_path: Path, hostmaint_db: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import tasks.maintenance as steps

    inventory = shutdown_fleet(tmp_path)
    host = where(inventory)["app-03"][0]

    def worker_lost(*args: Any, **kwargs: Any) -> list[str]:
        raise RuntimeError("worker lost")

    stop = steps.stop_unmigratable
    monkeypatch.setattr(steps, "stop_unmigratable", worker_lost)  # dies after the drain, before the stop
    with pytest.raises(RuntimeError, match="worker lost"):
        patch_host(host=host, operator="a", inventory=str(inventory), trigger=Trigger.TEST)
    # not monkeypatch.undo(): that would also undo the test's own HOSTMAINT_DB
    monkeypatch.setattr(steps, "stop_unmigratable", stop)
    assert states(inventory)[host] is HostState.DRAINED and where(inventory)["app-03"] == [host]

    result = patch_host(host=host, operator="a", inventory=str(inventory), trigger=Trigger.TEST)

    assert result.outcome is StepOutcome.OK, result.detail
    assert states(inventory)[host] is HostState.ACTIVE
    assert where(inventory)["app-03"] == [host]  # shut down for the reboot, started again after verify
    assert [r.outcome for r in audit().records(host=host) if r.step == "shutdown-vm"] == [StepOutcome.OK]
    assert_each_vm_runs_once(inventory, ALL_VMS)


def test_a_vm_another_run_shuts_down_by_policy_is_no_broken_invariant(tmp_path: Path, hostmaint_db: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import tasks.maintenance as steps

    inventory = shutdown_fleet(tmp_path, hosts=6)
    other = where(inventory)["app-03"][0]
    host = next(h for h in ("hv01", "hv02", "hv03") if h != other)
    check = steps.check_invariants

    def other_run_stops_app_03(*args: Any, **kwargs: Any) -> dict[str, str]:
        # meanwhile another run (a window's second host, an evacuation) does what stop_unmigratable
        # does on its host: records app-03 as stopped by its policy, then shuts it down
        rt = open_runtime(inventory)
        if "app-03" in rt.hypervisor.running_vms(other):
            with audited(rt, RunContext(run_id="the-other-run", flow="patch-host", trigger=Trigger.TEST,
                                        operator="bob"), Step.SHUTDOWN_VM, host=other, vm="app-03"):
                rt.states.record_stopped("app-03", other, "the-other-run")
                rt.hypervisor.shutdown("app-03", other)
        return check(*args, **kwargs)

    monkeypatch.setattr(steps, "check_invariants", other_run_stops_app_03)
    result = patch_host(host=host, operator="alice", inventory=str(inventory), trigger=Trigger.TEST)

    assert "app-03" not in where(inventory)
    assert result.outcome is StepOutcome.OK, result.detail
    assert states(inventory)[host] is HostState.ACTIVE
    # its stop record lost, the trail still says hostmaint shut it down: libvirt's "shutdown" (the same
    # word for a guest's own) does not make it a tenant's, and it is missed
    rt = open_runtime(inventory)
    rt.states.clear_stopped("app-03")
    with pytest.raises(StepError, match=re.escape(f"app-03 runs 0 times (nowhere; shut off on {other} (shutdown))")):
        check_invariants(rt, "demo", sorted(ALL_VMS))


def test_a_rebalance_whose_target_went_into_maintenance_while_it_waited_is_re_made(
        tmp_path: Path, hostmaint_db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from contextlib import contextmanager

    import flows.locks as locks
    from flows.evacuate_host import evacuate_host

    snap = demo_snapshot(4, 12)
    # every VM on two hosts, so the rebalance sends VMs to the other two
    snap = snap.model_copy(update={"vms": tuple(v.model_copy(update={"host": "hv01" if i % 2 else "hv02"})
                                                 for i, v in enumerate(snap.vms))})
    inventory = write_simulated_fleet(tmp_path / "f", snap, demo_packages(snap), time_scale=0.001, vm_policies=[])
    take = locks.cluster_migrations
    evacuated: list[str] = []

    @contextmanager
    def an_evacuation_got_there_first(cluster: str, targets: Any = ()) -> Any:
        # the rebalance waits for a target's inbound lock while an evacuation of that host holds it;
        # the evacuation ends with the host cordoned and empty, and the rebalance gets the lock
        if not evacuated:
            target = sorted(targets)[0]
            evacuate_host(host=target, operator="ops", reason="suspect DIMM", inventory=str(inventory),
                          trigger=Trigger.TEST)
            evacuated.append(target)
        with take(cluster, targets):
            yield

    monkeypatch.setattr(locks, "cluster_migrations", an_evacuation_got_there_first)
    result = rebalance_cluster(cluster="demo", max_moves=3, operator="frank", inventory=str(inventory),
                               trigger=Trigger.TEST)

    (cordoned,) = evacuated
    assert result.outcome is StepOutcome.OK and result.migrations
    assert cordoned not in {m.target for m in result.migrations}
    assert where(inventory) and not any(cordoned in hosts for hosts in where(inventory).values())
    (replan,) = [r for r in audit().records() if r.step == "replan"]
    assert any(cordoned in why for why in replan.inputs["reasons"]), replan.inputs
    assert_each_vm_runs_once(inventory, {v.name for v in snap.vms})


@pytest.mark.parametrize("dies", ["before the reboot went out", "after the host came back"])
def test_a_patch_resumed_while_its_host_was_rebooting_proves_the_reboot(sim_inventory: Path, dies: str,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from hostmaint import patching

    reboot = patching.reboot_and_wait
    first_boot = fleet_of(sim_inventory).packages["hv02"].boot_id  # hv02 has a kernel update: it reboots

    def worker_lost(shell: Any, host: str, policy: Any, **kwargs: Any) -> Any:
        if dies == "before the reboot went out":
            kwargs["before_issue"](patching.read_boot_id(shell, host))
        else:
            reboot(shell, host, policy, **kwargs)
        raise RuntimeError("worker lost")

    monkeypatch.setattr(patching, "reboot_and_wait", worker_lost)
    with pytest.raises(RuntimeError, match="worker lost"):
        patch_host(host="hv02", operator="a", inventory=str(sim_inventory), trigger=Trigger.TEST)
    monkeypatch.setattr(patching, "reboot_and_wait", reboot)  # not undo(): that drops HOSTMAINT_DB too
    assert states(sim_inventory)["hv02"] is HostState.REBOOTING

    result = patch_host(host="hv02", operator="a", inventory=str(sim_inventory), trigger=Trigger.TEST)

    assert result.outcome is StepOutcome.OK, result.detail
    assert fleet_of(sim_inventory).packages["hv02"].boot_id != first_boot
    issued = [r for r in audit().records(host="hv02") if r.step == "reboot-issued"]
    reboots = [r for r in audit().records(host="hv02") if r.step == "reboot"]
    if dies == "before the reboot went out":  # found still on its old boot: rebooted now, once more asked
        assert len(issued) == 2 and reboots[-2].outcome is StepOutcome.SKIPPED
        assert reboots[-1].outcome is StepOutcome.OK
    else:  # found on a new boot: proven, not rebooted again
        assert len(issued) == 1 and reboots[-1].outcome is StepOutcome.OK and reboots[-1].inputs["resumed"]
    # its NUMA cells are compared with those recorded before the reboot, though this run never saw them
    [verify] = [r for r in audit().records(host="hv02") if r.step == "verify"]
    [numa] = [c for c in verify.details["verify"]["checks"] if c["name"] == "numa"]
    assert numa["ok"] and not numa["skipped"], numa
    assert_each_vm_runs_once(sim_inventory, ALL_VMS)


@pytest.mark.parametrize("dies", ["before the boot id was recorded", "before the reboot went out",
                                  "after the host came back"])
def test_a_resumed_reboot_passes_the_reboot_gate_and_runs_the_pre_reboot_hooks_as_a_fresh_one_does(
        sim_inventory: Path, dies: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    import yaml

    from hostmaint import patching

    # a gate at the reboot (its Prometheus does not answer and is not required: recorded, it holds
    # nothing) and a pre-reboot hook on the worker, as a Ceph noout would be set
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    doc = yaml.safe_load(sim_inventory.read_text())
    doc["clusters"][0]["monitoring"] = {"prometheus": {"url": dead, "gates": [
        {"name": "storage", "query": 'ALERTS{cluster="$cluster"}', "at": ["before-reboot"]}]}}
    doc["clusters"][0]["hooks"] = {"pre_reboot": [{"name": "noout", "on": "worker", "argv": ["true"]}]}
    sim_inventory.write_text(yaml.safe_dump(doc, sort_keys=False))
    reboot = patching.reboot_and_wait

    def worker_lost(shell: Any, host: str, policy: Any, **kwargs: Any) -> Any:
        if dies == "before the reboot went out":
            kwargs["before_issue"](patching.read_boot_id(shell, host))
        elif dies == "after the host came back":
            reboot(shell, host, policy, **kwargs)
        raise RuntimeError("worker lost")

    monkeypatch.setattr(patching, "reboot_and_wait", worker_lost)
    with pytest.raises(RuntimeError, match="worker lost"):
        patch_host(host="hv02", operator="a", inventory=str(sim_inventory), trigger=Trigger.TEST)
    monkeypatch.setattr(patching, "reboot_and_wait", reboot)  # not undo(): that drops HOSTMAINT_DB too
    assert states(sim_inventory)["hv02"] is HostState.REBOOTING

    result = patch_host(host="hv02", operator="a", inventory=str(sim_inventory), trigger=Trigger.TEST)

    assert result.outcome is StepOutcome.OK, result.detail
    resumed = audit().records(host="hv02")[-1].run_id
    steps = [(r.step, r.inputs.get("point"), r.outcome) for r in audit().records(host="hv02", run_id=resumed)]
    rebooted_now = [s for s in steps if s[0] == "reboot" and s[2] is StepOutcome.OK]
    if dies == "after the host came back":  # proven by its new boot: nothing is rebooted, nothing asked
        assert ("gate", "before-reboot", StepOutcome.OK) not in steps and ("hook", "pre-reboot", StepOutcome.OK) \
            not in steps, steps
        assert len(rebooted_now) == 1
    else:  # rebooted by this run: its gate asked and its hooks run first, as a fresh run does
        gate = steps.index(("gate", "before-reboot", StepOutcome.OK))
        hook = steps.index(("hook", "pre-reboot", StepOutcome.OK))
        issued = [i for i, s in enumerate(steps) if s[0] == "reboot-issued"]
        assert issued and gate < hook < issued[-1], steps
    assert states(sim_inventory)["hv02"] is HostState.ACTIVE
    assert_each_vm_runs_once(sim_inventory, ALL_VMS)


@pytest.mark.parametrize("dies_at", ["uncordon_host", "check_invariants"])
def test_a_window_run_again_after_a_host_was_verified_does_not_patch_it_twice(
        tmp_path: Path, hostmaint_db: Path, monkeypatch: pytest.MonkeyPatch, dies_at: str) -> None:
    import tasks.maintenance as steps

    inventory = shutdown_fleet(tmp_path)
    host = where(inventory)["app-03"][0]
    real = getattr(steps, dies_at)
    calls = {"n": 0}

    def worker_lost(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        # uncordon dies the first time; the invariant check after the uncordon (its third call) too
        if dies_at == "uncordon_host" or calls["n"] == 3:
            raise RuntimeError("worker lost")
        return real(*args, **kwargs)

    monkeypatch.setattr(steps, dies_at, worker_lost)
    with pytest.raises(RuntimeError, match="worker lost"):
        patch_host(host=host, operator="a", inventory=str(inventory), trigger=Trigger.TEST, window_id="w-again",
                   return_vms=False)
    monkeypatch.setattr(steps, dies_at, real)  # not undo(): that drops HOSTMAINT_DB too
    # its shut-down VM was started before the uncordon: never an active host with it down
    assert where(inventory)["app-03"] == [host]

    patch_window(cluster="demo", hosts=[host], window_id="w-again", inventory=str(inventory),
                 trigger=Trigger.TEST, rebalance_moves=0)

    assert states(inventory)[host] is HostState.ACTIVE
    assert host in open_runtime(inventory).states.patched_in("w-again")
    for step in ("cordon", "drain", "update"):  # one maintenance, not two
        assert len([r for r in audit().records(host=host) if r.step == step]) == 1, step
    assert_each_vm_runs_once(inventory, ALL_VMS)


def test_a_host_whose_policy_never_reboots_keeps_its_kernel_and_says_a_reboot_is_pending(
        sim_inventory: Path) -> None:
    import yaml

    doc = yaml.safe_load(sim_inventory.read_text())
    doc["clusters"][0]["host_policy"]["reboot"] = "never"
    sim_inventory.write_text(yaml.safe_dump(doc, sort_keys=False))
    boot = fleet_of(sim_inventory).packages["hv02"].boot_id  # hv02 gets a new kernel

    result = patch_host(host="hv02", operator="a", inventory=str(sim_inventory), trigger=Trigger.TEST,
                        return_state=True)

    assert result.result().outcome is StepOutcome.OK and not result.result().rebooted
    assert fleet_of(sim_inventory).packages["hv02"].boot_id == boot
    assert states(sim_inventory)["hv02"] is HostState.ACTIVE
    (verify,) = [r for r in audit().records(host="hv02") if r.step == "verify"]
    assert verify.outcome is StepOutcome.OK
    assert any("reboot pending by policy" in line for line in run_log(result.state_details.flow_run_id))


def test_a_window_that_starts_late_ends_when_it_was_scheduled_to(sim_inventory: Path) -> None:
    from datetime import UTC, datetime, timedelta

    from prefect.client.orchestration import get_client
    from prefect.flow_engine import run_flow
    from prefect.states import Scheduled

    # a 240-minute window scheduled 5 hours ago that a worker picks up only now: it ended an hour ago
    scheduled = datetime.now(UTC) - timedelta(hours=5)
    params = {"cluster": "demo", "window_minutes": 240, "window_id": "w-late-start", "operator": "sched",
              "inventory": str(sim_inventory), "trigger": Trigger.TEST}
    with get_client(sync_client=True) as client:
        flow_run = client.create_flow_run(patch_window, parameters=params,
                                          state=Scheduled(scheduled_time=scheduled))

    state = run_flow(patch_window, flow_run=flow_run, parameters=params, return_type="state")

    assert state.is_failed() and "started no host" in str(state.message)
    assert not [r for r in audit().records() if r.step == "cordon"]


def test_a_window_end_without_an_offset_is_utc(sim_inventory: Path) -> None:
    from datetime import UTC, datetime, timedelta

    naive = (datetime.now(UTC) + timedelta(seconds=30)).replace(tzinfo=None)  # as typed on the CLI

    # too short for any host (not a crash on the naive time): a window that started none
    with pytest.raises(StepError, match=r"started no host.*ending .* UTC\)"):
        patch_window(cluster="demo", window_id="w-naive", operator="sched", inventory=str(sim_inventory),
                     trigger=Trigger.TEST, window_end=naive)


def test_a_windows_summary_of_the_hosts_it_left_alone_is_logged_as_data(sim_inventory: Path) -> None:
    # the reason an evacuation gave (an operator's, or an incident event's payload) reached the window's
    # closing summary line raw: a line break forged a line of the run's log, an escape reached terminals
    reason = "fan\x1b[2J\nwindow w-x: every host patched"
    evacuate_host(host="hv04", operator="alice", reason=reason, inventory=str(sim_inventory), trigger=Trigger.TEST)
    state = patch_window(cluster="demo", window_id="w-alone", operator="sched", inventory=str(sim_inventory),
                         trigger=Trigger.TEST, rebalance_moves=0, return_state=True)
    [line] = [m for m in run_log(state.state_details.flow_run_id) if "left alone, taken out of service" in m]
    assert "\x1b" not in line and "\n" not in line and "fan\\x1b[2J\\nwindow w-x" in line


def test_a_host_an_incident_took_out_stays_out_after_its_next_patch(sim_inventory: Path) -> None:
    from flows.runbooks.degraded_host import degraded_host_runbook

    out = degraded_host_runbook(host="hv03", reason="ECC errors", severity="critical", inventory=str(sim_inventory),
                                poll_interval_s=1, approval_timeout_s=5)
    assert out.outcome is StepOutcome.OK and states(sim_inventory)["hv03"] is HostState.CORDONED

    patched = patch_host(host="hv03", operator="a", inventory=str(sim_inventory), trigger=Trigger.TEST)

    # patched, and still out of service until an operator says otherwise: not put back as 'active'
    assert patched.outcome is StepOutcome.OK
    assert states(sim_inventory)["hv03"] is HostState.CORDONED
    assert open_runtime(sim_inventory).states.get("hv03").prior_state is None
    assert not fleet_of(sim_inventory).running["hv03"]  # nothing returned to a cordoned host
    assert_each_vm_runs_once(sim_inventory, ALL_VMS)


def test_a_window_leaves_an_evacuated_host_out_of_service_and_says_why(sim_inventory: Path) -> None:
    evacuate_host(host="hv04", operator="alice", reason="fan failure", inventory=str(sim_inventory),
                  trigger=Trigger.TEST)

    # named alone, it is still left alone: the window did nothing, and says so (CLI exit 1)
    with pytest.raises(StepError, match=r"window w-held started no host: 1 host\(s\) of demo left alone.*"
                                        r"hv04 \(evacuated by alice: fan failure\)"):
        patch_window(cluster="demo", hosts=["hv04"], window_id="w-held", operator="sched",
                     inventory=str(sim_inventory), trigger=Trigger.TEST, rebalance_moves=0)
    outcomes = patch_window(cluster="demo", window_id="w-held", operator="sched", inventory=str(sim_inventory),
                            trigger=Trigger.TEST, rebalance_moves=0)

    by_host = {o.host: o for o in outcomes}
    assert {h: o.outcome for h, o in by_host.items()} == {"hv01": StepOutcome.OK, "hv02": StepOutcome.OK,
                                                          "hv03": StepOutcome.OK, "hv04": StepOutcome.SKIPPED}
    assert "evacuated by alice" in by_host["hv04"].detail and "fan failure" in by_host["hv04"].detail
    assert "hostmaint host return hv04" in by_host["hv04"].detail
    rt = open_runtime(sim_inventory)
    assert rt.states.state("hv04") is HostState.DRAINED  # not patched, not put back into service
    assert not fleet_of(sim_inventory).running["hv04"]
    assert not [r for r in audit().records(host="hv04") if r.step in ("update", "reboot", "uncordon")]
    held = [r for r in audit().records(host="hv04") if r.step == "window"]
    assert [(r.inputs["named"], r.outcome, r.details["reason"], r.details["by"]) for r in held] == [
        (True, StepOutcome.SKIPPED, "fan failure", "alice"), (False, StepOutcome.SKIPPED, "fan failure", "alice")]
    assert_each_vm_runs_once(sim_inventory, ALL_VMS)
