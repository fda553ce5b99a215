"""The maintenance flows on the real lab: real libvirtd, live migrations, sshd, dnf and reboots.

Runs as root (skipped with the reason otherwise; CI runs it). One fresh lab for the module,
torn down at the end even on failure, leaving nothing behind.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from hostmaint.lab import LabInfo, kill_libvirtd, start_libvirtd
from hostmaint.models import HostState, StepOutcome, Trigger
from tests.lab.labkit import HOST_MEMORY_MIB, WORKDIR, all_vms, fresh_lab

pytestmark = [pytest.mark.lab, pytest.mark.usefixtures("prefect_server")]


@pytest.fixture(scope="module")
def flow_lab(prefect_server: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabInfo]:
    with fresh_lab(tmp_path_factory.mktemp("lab-flows") / "hostmaint.db") as info:
        yield info


@pytest.fixture
def rt(flow_lab: LabInfo) -> object:
    from hostmaint.runtime import open_runtime

    return open_runtime(flow_lab.inventory_path)


def boot_id(rt: object, host: str) -> str:
    return rt.shell.run(host, ["cat", "/proc/sys/kernel/random/boot_id"]).stdout.strip()  # type: ignore[attr-defined]


def test_patch_host_on_the_lab_end_to_end(flow_lab: LabInfo, rt: object) -> None:
    from flows.patch_host import patch_host

    before = all_vms(rt)
    assert all(len(h) == 1 for h in before.values())
    home = sorted(vm for vm, hosts in before.items() if hosts == ["hv02"])
    assert home, "the lab puts guests on hv02"
    old_boot = boot_id(rt, "hv02")

    result = patch_host(host="hv02", operator="lab-test", reason="lab patch", inventory=str(flow_lab.inventory_path),
                        trigger=Trigger.TEST)

    assert result.outcome is StepOutcome.OK, result.detail
    assert result.rebooted  # kernel-lab 6.1.0-2 was pending
    assert result.packages_changed >= 2
    assert boot_id(rt, "hv02") != old_boot
    kernel = rt.shell.run("hv02", ["uname", "-r"]).stdout.strip()  # type: ignore[attr-defined]
    assert kernel == "6.1.0-2.lab.x86_64"
    after = all_vms(rt)
    assert set(after) == set(before) and all(len(h) == 1 for h in after.values()), after
    assert sorted(vm for vm, hosts in after.items() if hosts == ["hv02"]) == home  # they came home
    assert rt.states.state("hv02") is HostState.ACTIVE  # type: ignore[attr-defined]
    records = rt.audit.records(host="hv02")  # type: ignore[attr-defined]
    migrations = [r for r in rt.audit.records() if r.step == "migrate"]  # type: ignore[attr-defined]
    assert {r.vm for r in migrations} >= set(home)
    assert all(r.details["seconds"] > 0 for r in migrations)
    reboot = next(r for r in records if r.step == "reboot")
    assert reboot.details["reboot"]["new_boot_id"] != reboot.details["reboot"]["old_boot_id"]
    # the drain measured every guest it moved, and the scheduler got those rates
    drain = next(r for r in records if r.step == "drain")
    assert set(drain.details["dirty_rate_mib_s"]) == set(home), drain.details
    busy = [vm for vm in home if vm in {v.name for v in flow_lab.vms if v.linux}]
    assert all(drain.details["dirty_rate_mib_s"][vm] > 1.0 for vm in busy), drain.details
    steps = [r.step for r in records]
    assert steps.index("confirm-empty") < steps.index("reboot") < steps.index("verify")
    assert rt.audit.verify().ok  # type: ignore[attr-defined]


def test_evacuation_rides_out_a_target_libvirtd_crash(flow_lab: LabInfo, rt: object) -> None:
    from flows.evacuate_host import evacuate_host

    before = all_vms(rt)
    kill_libvirtd("hv03", WORKDIR)
    restarter = threading.Timer(4.0, start_libvirtd, args=("hv03", WORKDIR))
    restarter.start()
    started = time.monotonic()
    try:
        result = evacuate_host(host="hv01", operator="lab-test", reason="libvirtd crash",
                               inventory=str(flow_lab.inventory_path), trigger=Trigger.TEST)
    finally:
        restarter.join()

    assert time.monotonic() - started > 3.5  # it had to wait for hv03's libvirtd to come back
    assert result.outcome is StepOutcome.OK, result.detail
    after = all_vms(rt)
    assert set(after) == set(before) and all(len(h) == 1 for h in after.values()), after
    assert not [vm for vm, hosts in after.items() if "hv01" in hosts]
    assert rt.states.state("hv01") is HostState.DRAINED  # type: ignore[attr-defined]


def lab_free_mib(flow_lab: LabInfo, rt: object, host: str) -> int:
    """Room left in a lab host's guest-memory tmpfs (what really limits it, unlike libvirt's report)."""
    size = dict(zip(("hv01", "hv02", "hv03"), HOST_MEMORY_MIB, strict=True))[host]
    used = sum(vm.memory_mib for vm in rt.hypervisor.discover(host).vms)  # type: ignore[attr-defined]
    return size - used


def test_a_big_guest_without_room_stops_the_evacuation_safely(flow_lab: LabInfo, rt: object) -> None:
    """A guest no remaining host can hold: the flow stops with the host cordoned, the guest still on
    its source and every VM running once; the failed step (plan, or the migration the target
    refused) names the guest."""
    from flows.evacuate_host import evacuate_host
    from hostmaint.lab import add_guest, remove_guest

    big = min(700, lab_free_mib(flow_lab, rt, "hv02") - 40)
    assert big > 300, "hv02 has room for a big guest"
    added = []
    try:
        add_guest(flow_lab, "big02", "hv02", memory_mib=big)
        added.append("big02")
        fill = lab_free_mib(flow_lab, rt, "hv03") - 150
        if fill > 0:
            add_guest(flow_lab, "fill03", "hv03", memory_mib=fill)
            added.append("fill03")
        assert lab_free_mib(flow_lab, rt, "hv03") < big
        before = all_vms(rt)
        assert rt.states.state("hv01") is not HostState.ACTIVE  # type: ignore[attr-defined]  # hv03 is the only target

        with pytest.raises(Exception, match="big02"):
            evacuate_host(host="hv02", operator="lab-test", reason="overcommit",
                          inventory=str(flow_lab.inventory_path), trigger=Trigger.TEST)

        after = all_vms(rt)
        assert set(after) == set(before) and all(len(h) == 1 for h in after.values()), after
        assert after["big02"] == ["hv02"]  # refused by the target, still running on its source
        assert rt.states.state("hv02") is HostState.CORDONED  # type: ignore[attr-defined]
        failed = [r for r in rt.audit.records(host="hv02")  # type: ignore[attr-defined]
                  if r.outcome == "failed" and r.step in ("plan", "drain")]
        assert failed and "big02" in failed[-1].details["error"]
    finally:
        for name in added:
            remove_guest(flow_lab, name)


def test_a_guest_that_cannot_converge_is_escalated_then_aborted_while_others_finish(flow_lab: LabInfo,
                                                                                    rt: object) -> None:
    """lnx01 rewrites 128 MiB in a loop; capped at 8 MiB/s it can never converge. The scheduler
    must escalate it (auto-converge) and then abort it, leaving it running on its source, while a
    small guest beside it migrates normally."""
    from hostmaint.migration import EventKind, SchedulerPolicy, drain
    from hostmaint.models import EvacuationPlan, Limits, MigrationOptions, Placement

    hv = rt.hypervisor  # type: ignore[attr-defined]
    (source,) = hv.locate("lnx01")
    companions = [vm for vm in hv.running_vms(source) if vm.startswith("vm")]
    assert companions, f"a small guest runs beside lnx01 on {source}"
    target = next(h for h in ("hv01", "hv02", "hv03") if h != source)
    moving = ["lnx01", companions[0]]
    memory = {v.name: v.memory_mib for v in hv.discover(source).vms}
    plan = EvacuationPlan(cluster="lab", hosts=(source,), snapshot_digest="lab-test", placements=tuple(
        Placement(vm=vm, source=source, target=target, memory_mib=memory[vm]) for vm in moving))
    before = all_vms(rt)

    report = drain(plan, hv, Limits(migrations_per_source=4, migrations_per_target=4),
                   options=MigrationOptions(bandwidth_mib_s=8, stall_seconds=4, min_budget_seconds=60),
                   policy=SchedulerPolicy(allow_post_copy=False))

    outcome = {r.vm: r.outcome for r in report.results}
    assert outcome[companions[0]] is StepOutcome.OK
    assert outcome["lnx01"] in (StepOutcome.FAILED, StepOutcome.ABORTED)
    kinds = [(e.kind, e.vm) for e in report.events]
    assert (EventKind.ESCALATED, "lnx01") in kinds
    escalated_at = min(i for i, k in enumerate(kinds) if k == (EventKind.ESCALATED, "lnx01"))
    assert any(k[1] == "lnx01" and k[0] in (EventKind.ABORTED, EventKind.FAILED) and i > escalated_at
               for i, k in enumerate(kinds))
    after = all_vms(rt)
    assert after["lnx01"] == [source]  # abort is the safe end: it still runs where it was
    assert after[companions[0]] == [target]
    assert set(after) == set(before) and all(len(h) == 1 for h in after.values()), after


def _inventory_with(flow_lab: LabInfo, tmp_path: object, host: str, policy: dict[str, object]) -> str:
    """A copy of the lab's inventory with one host's policy overridden."""
    import yaml

    data = yaml.safe_load(flow_lab.inventory_path.read_text())
    for entry in data["hosts"]:
        if entry["name"] == host:
            entry["policy"] = policy
    path = tmp_path / "inventory.yaml"  # type: ignore[operator]
    path.write_text(yaml.safe_dump(data))
    from flows.locks import ensure_limits

    ensure_limits(path)
    return str(path)


def _reactivate(rt: object, *hosts: str) -> None:
    """Earlier tests leave hosts drained or cordoned; an operator would uncordon them."""
    for host in hosts:
        if rt.states.state(host) is HostState.FAILED:  # type: ignore[attr-defined]
            rt.states.transition(host, HostState.CORDONED, "test: operator reset")  # type: ignore[attr-defined]
        if rt.states.state(host) is not HostState.ACTIVE:  # type: ignore[attr-defined]
            rt.states.transition(host, HostState.ACTIVE, "test: operator uncordon")  # type: ignore[attr-defined]


def test_a_failing_verify_check_leaves_the_host_failed_and_its_vms_elsewhere(flow_lab: LabInfo, rt: object,
                                                                             tmp_path: object) -> None:
    from flows.patch_host import patch_host

    _reactivate(rt, "hv01", "hv02", "hv03")
    inventory = _inventory_with(flow_lab, tmp_path, "hv03", {"verify": [
        {"name": "storage mounted", "argv": ["test", "-e", "/hostmaint-lab/no-such-mount"], "expect_exit": 0}]})
    before = all_vms(rt)

    with pytest.raises(Exception, match="storage mounted"):
        patch_host(host="hv03", operator="lab-test", reason="verify fails", inventory=inventory,
                   trigger=Trigger.TEST)

    assert rt.states.state("hv03") is HostState.FAILED  # type: ignore[attr-defined]
    after = all_vms(rt)
    assert set(after) == set(before) and all(len(h) == 1 for h in after.values()), after
    assert not [vm for vm, hosts in after.items() if "hv03" in hosts]  # it stays empty, never refilled
    verify = [r for r in rt.audit.records(host="hv03") if r.step == "verify"]  # type: ignore[attr-defined]
    assert verify and verify[-1].outcome == "failed" and "storage mounted" in verify[-1].details["error"]


def test_a_host_that_does_not_come_back_in_time_is_failed(flow_lab: LabInfo, rt: object, tmp_path: object) -> None:
    from flows.patch_host import patch_host

    _reactivate(rt, "hv01", "hv02", "hv03")
    # The lab host is down for ~3 s; a 1 s timeout makes it a host that "never" returns.
    inventory = _inventory_with(flow_lab, tmp_path, "hv01", {"reboot_timeout_s": 1})
    before = all_vms(rt)

    with pytest.raises(Exception, match="hv01"):
        patch_host(host="hv01", operator="lab-test", reason="slow reboot", inventory=inventory,
                   trigger=Trigger.TEST)

    assert rt.states.state("hv01") is HostState.FAILED  # type: ignore[attr-defined]
    reboot = [r for r in rt.audit.records(host="hv01") if r.step == "reboot"]  # type: ignore[attr-defined]
    assert reboot and reboot[-1].outcome == "failed"
    time.sleep(5)  # let the lab host finish booting before looking at every host
    after = all_vms(rt)
    assert set(after) == set(before) and all(len(h) == 1 for h in after.values()), after
    assert not [vm for vm, hosts in after.items() if "hv01" in hosts]


def test_a_hosts_link_is_learned_from_its_drains(flow_lab: LabInfo, rt: object, tmp_path: object) -> None:
    """The inventory gives no link bandwidth. lnx01's host gets a 64 MiB/s link (a token bucket on its
    NIC); its first evacuation uses the default figure and measures the link, saturated, near 64 MiB/s;
    the state keeps that, and the next evacuation of the same host schedules with the measured figure."""
    import yaml

    from flows.evacuate_host import evacuate_host
    from hostmaint.lab.network import limit_egress
    from hostmaint.maintenance import link_figures
    from hostmaint.models import MigrationOptions

    limit = 64.0
    # lnx01 rewrites memory at 2-60 MiB/s (it varies from run to run), so over 64 MiB/s it may not
    # converge: an 8 s stall period gets it auto-converge, then post-copy, which always completes
    data = yaml.safe_load(flow_lab.inventory_path.read_text())
    data["clusters"][0]["migration"].update({"stall_seconds": 8, "allow_post_copy": True})  # keeps the lab's tls: off
    inventory = tmp_path / "inventory.yaml"  # type: ignore[operator]
    inventory.write_text(yaml.safe_dump(data))
    from flows.locks import ensure_limits

    ensure_limits(inventory)
    _reactivate(rt, "hv01", "hv02", "hv03")
    hv = rt.hypervisor  # type: ignore[attr-defined]
    (source,) = hv.locate("lnx01")
    assert flow_lab.vms and rt.inventory.cluster("lab").link_bandwidth_mib_s is None  # type: ignore[attr-defined]
    limit_egress(source, limit)
    try:
        before = all_vms(rt)
        first = evacuate_host(host=source, operator="lab-test", reason="link", inventory=str(inventory),
                              trigger=Trigger.TEST)
        assert first.outcome is StepOutcome.OK, first.detail
        drain_1 = [r for r in rt.audit.records(host=source) if r.step == "drain"][-1]  # type: ignore[attr-defined]
        assert drain_1.details["links"][source]["basis"] == "default", drain_1.details["links"]
        assert drain_1.details["migration_settings"]["stall_seconds"] == 8
        seen = {o["host"]: o for o in drain_1.details["links_observed"]}
        assert seen[source]["saturated"], seen  # one stream could push ~600 MiB/s; the link let 64 through
        assert 0.6 * limit <= seen[source]["peak_mib_s"] <= 1.1 * limit, seen
        figure = link_figures(rt.inventory, rt.states, "lab")[source]  # type: ignore[attr-defined]
        assert (figure.basis, figure.mib_s) == ("measured", seen[source]["peak_mib_s"])

        # lnx01 goes back (an operator's move), and the host is drained again
        (elsewhere,) = hv.locate("lnx01")
        hv.migrate("lnx01", elsewhere, source, MigrationOptions())
        _reactivate(rt, source)
        second = evacuate_host(host=source, operator="lab-test", reason="link again", inventory=str(inventory),
                               trigger=Trigger.TEST)
        assert second.outcome is StepOutcome.OK, second.detail
        drain_2 = [r for r in rt.audit.records(host=source) if r.step == "drain"][-1]  # type: ignore[attr-defined]
        assert drain_2.details["links"][source] == {"mib_s": figure.mib_s, "basis": "measured",
                                                    "note": figure.note}
        after = all_vms(rt)
        assert set(after) == set(before) and all(len(h) == 1 for h in after.values()), after
        assert not [vm for vm, hosts in after.items() if source in hosts]
    finally:
        limit_egress(source, None)


def test_two_workers_on_two_machines_share_locks_state_and_audit(flow_lab: LabInfo, rt: object, postgres: object,
                                                                 tmp_path: object) -> None:
    """Scale-out as docs/deployments.md sets it up: a process work pool, one `prefect worker` per machine,
    each machine with its own copy of the inventory and working directory, the hostmaint database on
    PostgreSQL. Two machines are two worker processes here (one run at a time each); patch-host runs for
    hv01 and hv02 start together. The cluster's one maintenance slot is held across the machines, so the
    hosts are in maintenance one after the other; both finish, every VM runs once, and both runs wrote
    one audit chain that verifies."""
    import subprocess
    from pathlib import Path

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    from deployments.serve import ROOT, build_deployments
    from deployments.server import ensure_work_pool, prefect_executable
    from hostmaint.audit import AuditTrail
    from hostmaint.db import open_engine

    db_url = postgres.url  # type: ignore[attr-defined]
    postgres.reset()  # type: ignore[attr-defined]
    before = all_vms(rt)
    pool = "hostmaint-lab-machines"
    ensure_work_pool(pool)
    [dep] = [d for d in build_deployments(flow_lab.inventory_path, source=ROOT) if d.name == "patch-host"]
    dep.name = "patch-host-two-machines"  # its own deployment: nothing else serves it
    deployment_id = dep.apply(work_pool_name=pool)
    machines: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
    started = datetime.now(UTC)
    try:
        for name in ("machine-a", "machine-b"):
            home = Path(tmp_path) / name  # type: ignore[arg-type]
            home.mkdir()
            inventory = home / "inventory.yaml"
            inventory.write_text(flow_lab.inventory_path.read_text())
            env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "HOSTMAINT_INVENTORY": str(inventory),
                   "HOSTMAINT_DB": db_url, "PREFECT_WORKER_QUERY_SECONDS": "1",
                   "PREFECT_WORKER_PREFETCH_SECONDS": "1", "PREFECT_LOGGING_LEVEL": "INFO"}  # names the runs it takes
            log = home / "worker.log"
            with log.open("w") as out:
                machines[name] = (subprocess.Popen(
                    [prefect_executable(), "worker", "start", "--pool", pool, "--type", "process", "--name", name,
                     "--limit", "1"], cwd=home, env=env, stdout=out, stderr=subprocess.STDOUT), log)
        # both machines polling before the runs exist: a worker that came up late (its start hit a busy
        # server) would take its run only after the other had finished, and show nothing of the locks
        deadline = time.monotonic() + 120
        with get_client(sync_client=True) as client:
            while {w.name for w in client.read_workers_for_work_pool(pool)
                   if w.last_heartbeat_time and w.last_heartbeat_time > started} < set(machines):
                for worker, log in machines.values():
                    assert worker.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, "\n".join(log.read_text()[-2000:] for _, log in machines.values())
                time.sleep(0.5)
            runs = {host: client.create_flow_run_from_deployment(deployment_id, parameters={"request": {
                "host": host, "reason": "two machines", "operator": f"op-{host}", "dry_run": False}})
                for host in ("hv01", "hv02")}
        deadline = time.monotonic() + 300
        with get_client(sync_client=True) as client:
            while not all((state := client.read_flow_run(r.id).state) and state.is_final() for r in runs.values()):
                for worker, log in machines.values():
                    assert worker.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, "\n".join(log.read_text()[-2000:] for _, log in machines.values())
                time.sleep(1)
            finished = {host: client.read_flow_run(r.id) for host, r in runs.items()}
            states = {host: run.state for host, run in finished.items()}
    finally:
        for worker, _ in machines.values():
            worker.terminate()
        for worker, _ in machines.values():
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait(10)
    logs = {name: log.read_text() for name, (_, log) in machines.items()}
    for host, state in states.items():
        assert state is not None and state.is_completed(), f"{host}: {state}\n{logs}"
    # each machine ran one of the runs (both workers may pick a run up; the server lets one of them
    # have it and the other logs that it aborted the submission)
    ran = {name: {host for host, r in runs.items() if f"submitting flow run '{r.id}'" in text
                  and f"Aborted submission of flow run '{r.id}'" not in text} for name, text in logs.items()}
    assert sorted(map(len, ran.values())) == [1, 1] and set().union(*ran.values()) == {"hv01", "hv02"}, ran

    after = all_vms(rt)
    assert set(after) == set(before) and all(len(h) == 1 for h in after.values()), after
    trail = AuditTrail(open_engine(db_url))
    assert trail.verify().ok
    spans: dict[str, tuple[int, int]] = {}
    for host in ("hv01", "hv02"):
        records = trail.records(host=host)
        cordon = next(r for r in records if r.step == "cordon")
        uncordon = next(r for r in records if r.step == "uncordon")
        assert cordon.operator == uncordon.operator == f"op-{host}"  # whose form started it, on either machine
        spans[host] = (cordon.seq, uncordon.seq)
    (_, first_uncordoned), (second_cordoned, _) = sorted(spans.values())
    # one host in maintenance at a time, though two machines ran them: the chain orders their records
    assert first_uncordoned < second_cordoned, spans
    # ... and not because they happened to run one after the other: both runs were running at once
    starts = [run.start_time for run in finished.values()]
    ends = [run.end_time for run in finished.values()]
    assert None not in starts and None not in ends and max(starts) < min(ends), finished  # type: ignore[operator]
