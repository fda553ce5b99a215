"""Cancelling hostmaint runs through the Prefect API (issue 19 item 1), on a SIMULATED fleet.

A patch-host served by ``serve`` in its own process (as deployments/ run it) is cancelled mid-drain
the way the UI does it (state Cancelling, here with a name, as ``hostmaint run cancel`` writes it):
the runner sends SIGTERM, the drain stops admitting, aborts what runs and settles, the host stays
cordoned "cancelled by X", every VM runs once, the run ends Cancelled, the locks are free (a re-run
takes them at once) and the re-run finishes the host.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.cancel import request_cancel
from hostmaint.models import HostState, StepOutcome
from hostmaint.runtime import open_runtime
from tasks import cancellation

pytestmark = pytest.mark.usefixtures("prefect_server")

ROOT = Path(__file__).resolve().parents[2]
# as deployments/serve.py serves them: loaded from the source tree, each run in its own process
SERVE = """
import sys
from prefect import Flow
Flow.from_source(source=sys.argv[2], entrypoint=sys.argv[3]).serve(name=sys.argv[1], limit=2)
"""


def _slow_fleet(tmp_path: Path) -> Path:
    from hostmaint.simulated_fleet import demo_packages, demo_snapshot, write_simulated_fleet

    snap = demo_snapshot(4, 12)
    # 2 GiB guests at 1100 MiB/s on a time scale of 3: each migration takes ~5 s, a drain many
    return write_simulated_fleet(tmp_path / "fleet", snap, demo_packages(snap), time_scale=3.0)


def _state(run_id: str) -> str | None:
    return cancellation.run_state(run_id)[0]


def _stop_worker(worker: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after 30 s: under load Prefect's worker has taken longer to wind down after
    the run ended (its heartbeats to a busy SQLite server retried), and a worker left running took the
    next test's run from the shared pool, which then crashed. Each test also has its own pool."""
    worker.terminate()
    try:
        worker.wait(30)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait(30)


def _wait(what: str, predicate, timeout: float = 120.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


@pytest.mark.parametrize("served", ["patch-host", "patch-on-request"])
def test_a_served_patch_host_cancelled_mid_drain_stops_safely_and_a_rerun_finishes(
        served: str, tmp_path: Path, hostmaint_db: Path) -> None:
    """Served alone, and as the UI's form runs it (patch-on-request, with patch-host as its subflow)."""
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL

    from flows.patch_host import patch_host

    inventory = _slow_fleet(tmp_path)
    host = "hv01"
    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()), "HOSTMAINT_DB": str(hostmaint_db),
           "HOSTMAINT_INVENTORY": str(inventory), "PREFECT_RUNNER_POLL_FREQUENCY": "1",
           "PYTHONPATH": str(ROOT)}
    name = f"cancel-{tmp_path.name}"
    entrypoint = {"patch-host": "flows/patch_host.py:patch_host",
                  "patch-on-request": "flows/runbooks/on_request.py:patch_on_request"}[served]
    server = subprocess.Popen([sys.executable, "-c", SERVE, name, str(ROOT), entrypoint], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=(tmp_path / "serve.log").open("w"))
    try:
        _wait("the deployment", lambda: _deployment_exists(f"{served}/{name}"), 60)
        parameters = {"host": host, "inventory": str(inventory), "operator": "tester"}
        if served == "patch-on-request":
            parameters = {"request": {**parameters, "dry_run": False, "reason": "cancel test"}}
        run = run_deployment(f"{served}/{name}", parameters=parameters, timeout=0)
        run_id = str(run.id)
        rt = open_runtime(inventory, fresh=True)
        on_host = len(rt.hypervisor.running_vms(host))
        # mid-drain: a VM has landed elsewhere and others are still on the host
        _wait("the drain", lambda: len(open_runtime(inventory, fresh=True).hypervisor.running_vms(host)) < on_host)
        assert open_runtime(inventory, fresh=True).states.state(host) is HostState.DRAINING
        assert request_cancel(run_id, "mallory (hostmaint run cancel)") == "RUNNING"
        _wait("the run to end", lambda: _state(run_id) in ("CANCELLED", "FAILED", "CRASHED", "COMPLETED"), 90)
        assert _state(run_id) == "CANCELLED", (tmp_path / "serve.log").read_text()[-3000:]
        if served == "patch-host":
            # the on_cancellation hook ran in the serve process after the run's own stand-down: its
            # second stand-down is on record ("already stopped safely"), so serve has nothing left to do
            _wait("the hook's stand-down", lambda: len(_cancel_records(inventory, run_id)) == 2, 60)
            assert _cancel_records(inventory, run_id)[1].details["note"] == "already stopped safely"
    finally:
        _stop(server)

    rt = open_runtime(inventory, fresh=True)
    record = rt.states.get(host)
    assert record.state is HostState.CORDONED
    assert record.reason.startswith("cancelled by mallory (hostmaint run cancel)")
    where = {vm: rt.hypervisor.locate(vm) for vm in rt.hypervisor.vms}  # type: ignore[attr-defined]
    assert all(len(hosts) == 1 for hosts in where.values()), where
    assert any(hosts == (host,) for hosts in where.values()), "the drain was not stopped"
    records = rt.audit.records(host=host)
    host_run = next(r.run_id for r in records if r.step == "cordon")  # the subflow's, under the form's run
    cancel = [r for r in records if r.step == "cancel" and r.run_id == host_run]
    assert cancel and cancel[0].operator.startswith("mallory")
    migrated = [r for r in records if r.step == "migrate" and r.run_id == host_run]
    assert any(r.outcome is StepOutcome.ABORTED for r in migrated)
    # the drain itself was stopped in the run's process (SIGTERM became its Cancellation), not killed
    (drain,) = [r for r in records if r.step == "drain" and r.run_id == host_run]
    assert "cancelled_by" in drain.details

    # the locks are free (strict, no waiting) and a re-run finishes the host: verified, then active (on a
    # fast clock: what is proven here is that it finishes, not how long moving the rest takes)
    _time_scale(inventory, 0.001)
    open_runtime(inventory, fresh=True)
    outcome = patch_host(host=host, inventory=str(inventory), operator="tester", lock_wait_s=0, return_vms=False)
    assert outcome.outcome is StepOutcome.OK
    rt = open_runtime(inventory, fresh=True)
    assert rt.states.state(host) is HostState.ACTIVE
    assert all(len(rt.hypervisor.locate(vm)) == 1 for vm in rt.hypervisor.vms)  # type: ignore[attr-defined]


def _cancel_records(inventory: Path, run_id: str) -> list:  # type: ignore[type-arg]
    return [r for r in open_runtime(inventory, fresh=True).audit.records(run_id=run_id) if r.step == "cancel"]


def _stop(server: subprocess.Popen) -> None:  # type: ignore[type-arg]
    """Stop a serve process whose run has ended and been stood down (its graceful shutdown takes seconds,
    and up to 10 on a loaded machine, for nothing left to do)."""
    server.kill()
    server.wait(30)


def _deployment_exists(name: str) -> bool:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        try:
            client.read_deployment_by_name(name)
        except Exception:  # noqa: BLE001 - not there yet
            return False
    return True


def test_the_hook_stands_down_a_run_whose_process_was_killed(sim_inventory: Path) -> None:
    """After SIGKILL nothing in the run's process ran: Prefect's on_cancellation hook (in the serve
    process, or a worker's fresh one) stands the host down from the recorded state and the hypervisor."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelling, Running

    from flows.cancel import stand_down_hook
    from hostmaint import maintenance as steps

    @flow(name="patch-host")
    def placeholder(host: str, inventory: str) -> None:
        return None

    with get_client(sync_client=True) as client:
        fr = client.create_flow_run(placeholder, parameters={"host": "hv02", "inventory": str(sim_inventory)},
                                    state=Running())
        client.set_flow_run_state(fr.id, Cancelling(message="cancelled by zoe"), force=True)
        fr = client.read_flow_run(fr.id)
    rt = open_runtime(sim_inventory, fresh=True)
    run = steps.RunContext(run_id=str(fr.id), flow="patch-host")
    steps.cordon(rt, run, "hv02")
    plan = steps.plan_drain(rt, run, "hv02")
    first = plan.placements[0]
    rt.states.transition("hv02", HostState.DRAINING, "draining", run.run_id)
    rt.states.record_origin(first.vm, "hv02", run.run_id)
    from hostmaint.models import MigrationOptions
    rt.hypervisor.migrate(first.vm, "hv02", first.target, MigrationOptions())  # finished after the kill

    stand_down_hook(placeholder, fr, fr.state)
    rt = open_runtime(sim_inventory, fresh=True)
    record = rt.states.get("hv02")
    assert record.state is HostState.CORDONED and record.reason.startswith("cancelled by zoe")
    steps_seen = [(r.step, r.vm) for r in rt.audit.records(host="hv02") if r.run_id == str(fr.id)]
    assert ("migration-found", first.vm) in steps_seen and ("cancel", None) in steps_seen


def test_who_comes_from_the_state_message() -> None:
    assert cancellation.who("cancelled by ann (hostmaint run cancel)") == "ann (hostmaint run cancel)"
    assert cancellation.who("Flow run was cancelled") == cancellation.FROM_PREFECT
    assert cancellation.who(None) == cancellation.FROM_PREFECT


def test_the_cli_cancels_by_run_id_and_refuses_bad_input() -> None:
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.states import Completed, Running
    from typer.testing import CliRunner

    from hostmaint_cli.main import app

    @flow(name="patch-host")
    def placeholder(host: str) -> None:
        return None

    with get_client(sync_client=True) as client:
        running = client.create_flow_run(placeholder, parameters={"host": "hv01"}, state=Running())
        done = client.create_flow_run(placeholder, parameters={"host": "hv01"}, state=Completed())
    cli = CliRunner()
    bad = cli.invoke(app, ["run", "cancel", "hv01; rm -rf /"])
    assert bad.exit_code == 2 and "RUN: not a flow run id" in bad.output
    wrong = cli.invoke(app, ["window", "stop", str(running.id), "--operator", "ann"])
    assert wrong.exit_code == 2 and "is not a patch-window run" in wrong.output
    assert cancellation.run_state(str(running.id))[0] == "RUNNING"  # refused: nothing changed
    ended = cli.invoke(app, ["run", "cancel", str(done.id), "--operator", "ann"])
    assert ended.exit_code == 0 and "already ended" in ended.output
    ok = cli.invoke(app, ["run", "cancel", str(running.id), "--operator", "ann"])
    assert ok.exit_code == 0, ok.output
    assert cancellation.run_state(str(running.id)) == ("CANCELLING", "cancelled by ann")
    assert cancellation.who_cancelled(str(running.id)) == "ann"


SERVE_WINDOW = """
import sys
from prefect import Flow
Flow.from_source(source=sys.argv[2], entrypoint="flows/patch_window.py:patch_window").serve(name=sys.argv[1])
"""


def test_a_served_window_cancelled_starts_no_host_and_stops_the_one_it_holds(
        tmp_path: Path, hostmaint_db: Path) -> None:
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL

    inventory = _slow_fleet(tmp_path)
    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()), "HOSTMAINT_DB": str(hostmaint_db),
           "HOSTMAINT_INVENTORY": str(inventory), "PREFECT_RUNNER_POLL_FREQUENCY": "1",
           "PYTHONPATH": str(ROOT)}
    name = f"cancel-window-{tmp_path.name}"
    before = {vm: open_runtime(inventory, fresh=True).hypervisor.locate(vm)
              for vm in open_runtime(inventory, fresh=True).hypervisor.vms}  # type: ignore[attr-defined]
    server = subprocess.Popen([sys.executable, "-c", SERVE_WINDOW, name, str(ROOT)], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=(tmp_path / "serve.log").open("w"))
    try:
        _wait("the deployment", lambda: _deployment_exists(f"patch-window/{name}"), 60)
        run = run_deployment(f"patch-window/{name}", parameters={
            "cluster": "demo", "inventory": str(inventory), "operator": "tester", "window_id": "w-cancel",
            "trigger": "ui"}, timeout=0)
        run_id = str(run.id)

        def draining() -> list[str]:
            rt = open_runtime(inventory, fresh=True)
            return [h for h in ("hv01", "hv02", "hv03", "hv04") if rt.states.state(h) is HostState.DRAINING]

        _wait("a host's drain", lambda: bool(draining()))
        (held,) = draining()
        assert request_cancel(run_id, "wendy (hostmaint window stop)", flow="patch-window") == "RUNNING"
        _wait("the window to end", lambda: _state(run_id) in ("CANCELLED", "FAILED", "CRASHED", "COMPLETED"), 90)
        assert _state(run_id) == "CANCELLED", (tmp_path / "serve.log").read_text()[-3000:]
    finally:
        server.terminate()
        server.wait(30)
    rt = open_runtime(inventory, fresh=True)
    record = rt.states.get(held)
    assert record.state is HostState.CORDONED and record.reason.startswith("cancelled by wendy"), record
    others = [h for h in ("hv01", "hv02", "hv03", "hv04") if h != held]
    assert all(rt.states.state(h) is HostState.ACTIVE for h in others)  # no host started after the cancel
    assert not [r for h in others for r in rt.audit.records(host=h) if r.step == "cordon"]
    after = {vm: rt.hypervisor.locate(vm) for vm in rt.hypervisor.vms}  # type: ignore[attr-defined]
    assert set(after) == set(before) and all(len(h) == 1 for h in after.values()), after


def test_a_patch_host_on_a_process_worker_cancelled_mid_drain_stops_the_same_way(
        tmp_path: Path, hostmaint_db: Path) -> None:
    """A process work pool's worker instead of serve: the same SIGTERM, the hook in a fresh process."""
    from prefect import Flow
    from prefect.settings import PREFECT_API_URL

    from deployments.server import ensure_work_pool, prefect_executable

    inventory = _slow_fleet(tmp_path)
    host = "hv03"
    pool = "hostmaint-cancel-test-patch"
    ensure_work_pool(pool)
    flow = Flow.from_source(source=str(ROOT), entrypoint="flows/patch_host.py:patch_host")
    deployment_id = flow.deploy(name="cancel-on-worker", work_pool_name=pool, build=False, push=False,
                                print_next_steps=False)  # type: ignore[attr-defined]
    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()), "HOSTMAINT_DB": str(hostmaint_db),
           "HOSTMAINT_INVENTORY": str(inventory), "PREFECT_WORKER_QUERY_SECONDS": "1",
           "PREFECT_WORKER_PREFETCH_SECONDS": "1", "PYTHONPATH": str(ROOT)}
    log = tmp_path / "worker.log"
    worker = subprocess.Popen([prefect_executable(), "worker", "start", "--pool", pool, "--type", "process",
                               "--limit", "1"], cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            run = client.create_flow_run_from_deployment(deployment_id, parameters={
                "host": host, "inventory": str(inventory), "operator": "tester"})
        run_id = str(run.id)
        on_host = len(open_runtime(inventory, fresh=True).hypervisor.running_vms(host))
        _wait("the drain", lambda: len(open_runtime(inventory, fresh=True).hypervisor.running_vms(host)) < on_host,
              180)
        assert request_cancel(run_id, "victor") == "RUNNING"
        _wait("the run to end", lambda: _state(run_id) in ("CANCELLED", "FAILED", "CRASHED", "COMPLETED"), 90)
        assert _state(run_id) == "CANCELLED", log.read_text()[-3000:]
    finally:
        _stop_worker(worker)
    rt = open_runtime(inventory, fresh=True)
    record = rt.states.get(host)
    assert record.state is HostState.CORDONED and record.reason.startswith("cancelled by victor"), record
    where = {vm: rt.hypervisor.locate(vm) for vm in rt.hypervisor.vms}  # type: ignore[attr-defined]
    assert all(len(hosts) == 1 for hosts in where.values()) and any(h == (host,) for h in where.values()), where
    (drain,) = [r for r in rt.audit.records(host=host) if r.step == "drain" and r.run_id == run_id]
    assert "cancelled_by" in drain.details


# --- returns and rebalances: served, and on a worker ----------------------------------------------


def _time_scale(inventory: Path, scale: float) -> None:
    """Set the simulated fleet's time scale (read by every runtime opened after)."""
    import yaml

    data = yaml.safe_load(inventory.read_text())
    data["simulation"]["time_scale"] = scale
    inventory.write_text(yaml.safe_dump(data, sort_keys=False))


def _evacuate_quickly(inventory: Path, host: str, back_in_service: bool) -> set[str]:
    """Evacuate ``host`` on a fast clock (as evacuate-host leaves it: drained, in maintenance), or also
    put it back in service empty; returns the VMs away from it."""
    from hostmaint import maintenance as steps

    _time_scale(inventory, 0.001)
    rt = open_runtime(inventory, fresh=True)
    run = steps.RunContext(run_id=f"evacuate-{host}", flow="evacuate-host")
    steps.cordon(rt, run, host)
    steps.drain_host(rt, run, steps.plan_drain(rt, run, host))
    if back_in_service:
        rt.states.transition(host, HostState.VERIFYING, "verifying", run.run_id)
        steps.uncordon(rt, run, host)
    _time_scale(inventory, 3.0)
    return set(rt.states.origins(host))


def _no_lock_held(inventory: Path) -> None:
    """Every hostmaint limit of the fleet is free on the server (the run gave its slots back)."""
    from prefect.client.orchestration import get_client

    rt = open_runtime(inventory, fresh=True)
    names = [f"{kind}:{h.name}" for h in rt.inventory.hosts for kind in ("host", "inbound")]
    names += [f"{kind}:{c.name}" for c in rt.inventory.clusters for kind in ("maintenance", "migrations")]
    with get_client(sync_client=True) as client:
        held = {n: client.read_global_concurrency_limit_by_name(n).active_slots for n in names}
    assert not any(held.values()), held


def test_a_served_return_host_cancelled_mid_return_stops_its_moves_and_the_host_stays_verified(
        tmp_path: Path, hostmaint_db: Path) -> None:
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL

    inventory = _slow_fleet(tmp_path)
    host = "hv01"
    away = _evacuate_quickly(inventory, host, back_in_service=False)
    assert len(away) >= 2
    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()), "HOSTMAINT_DB": str(hostmaint_db),
           "HOSTMAINT_INVENTORY": str(inventory), "PREFECT_RUNNER_POLL_FREQUENCY": "1", "PYTHONPATH": str(ROOT)}
    name = f"cancel-return-{tmp_path.name}"
    server = subprocess.Popen([sys.executable, "-c", SERVE, name, str(ROOT), "flows/return_host.py:return_host"],
                              cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=(tmp_path / "serve.log").open("w"))
    try:
        _wait("the deployment", lambda: _deployment_exists(f"return-host/{name}"), 60)
        run = run_deployment(f"return-host/{name}", parameters={
            "host": host, "inventory": str(inventory), "operator": "tester"}, timeout=0)
        run_id = str(run.id)
        # mid-return: a VM is home again and others are still away
        _wait("the return", lambda: bool(open_runtime(inventory, fresh=True).hypervisor.running_vms(host)))
        assert request_cancel(run_id, "nina (hostmaint run cancel)") == "RUNNING"
        _wait("the run to end", lambda: _state(run_id) in ("CANCELLED", "FAILED", "CRASHED", "COMPLETED"), 90)
        assert _state(run_id) == "CANCELLED", (tmp_path / "serve.log").read_text()[-3000:]
        # the run's own stand-down (the host, skipped: active; its moves) and the hook's, in serve, after it
        _wait("the hook's stand-down", lambda: len(_cancel_records(inventory, run_id)) == 4, 60)
        assert [r.details.get("note") for r in _cancel_records(inventory, run_id)][3] == "already stopped safely"
    finally:
        _stop(server)
    rt = open_runtime(inventory, fresh=True)
    # verified in this return and back in service before its VMs came: active is the truth
    assert rt.states.state(host) is HostState.ACTIVE
    where = {vm: rt.hypervisor.locate(vm) for vm in rt.hypervisor.vms}  # type: ignore[attr-defined]
    assert all(len(hosts) == 1 for hosts in where.values()), where
    still_away = set(rt.states.origins(host))
    assert still_away and still_away < away, "the cancel stopped nothing, or nothing came home before it"
    assert all(where[vm] != (host,) for vm in still_away) and all(where[vm] == (host,) for vm in away - still_away)
    records = rt.audit.records(run_id=run_id)
    (ret,) = [r for r in records if r.step == "return-vms"]
    assert ret.details["cancelled_by"].startswith("nina")  # stopped in the run's process, not killed
    assert any(r.step == "migrate" and r.outcome is StepOutcome.ABORTED for r in records)
    assert [r.operator for r in records if r.step == "cancel"] and \
        all(r.operator.startswith("nina") for r in records if r.step == "cancel")
    _no_lock_held(inventory)


def test_a_rebalance_on_a_process_worker_cancelled_mid_way_stops_its_moves(tmp_path: Path,
                                                                          hostmaint_db: Path) -> None:
    from prefect import Flow
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    from deployments.server import ensure_work_pool, prefect_executable

    inventory = _slow_fleet(tmp_path)
    empty = "hv02"
    _evacuate_quickly(inventory, empty, back_in_service=True)
    before = {vm: open_runtime(inventory, fresh=True).hypervisor.locate(vm)
              for vm in open_runtime(inventory, fresh=True).hypervisor.vms}  # type: ignore[attr-defined]
    states = {h: r.state for h, r in open_runtime(inventory, fresh=True).states.all().items()}
    pool = "hostmaint-cancel-test-rebalance"
    ensure_work_pool(pool)
    flow = Flow.from_source(source=str(ROOT), entrypoint="flows/rebalance_cluster.py:rebalance_cluster")
    deployment_id = flow.deploy(name="cancel-rebalance-on-worker", work_pool_name=pool, build=False, push=False,
                                print_next_steps=False)  # type: ignore[attr-defined]
    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()), "HOSTMAINT_DB": str(hostmaint_db),
           "HOSTMAINT_INVENTORY": str(inventory), "PREFECT_WORKER_QUERY_SECONDS": "1",
           "PREFECT_WORKER_PREFETCH_SECONDS": "1", "PYTHONPATH": str(ROOT)}
    log = tmp_path / "worker.log"
    worker = subprocess.Popen([prefect_executable(), "worker", "start", "--pool", pool, "--type", "process",
                               "--limit", "1"], cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        with get_client(sync_client=True) as client:
            run = client.create_flow_run_from_deployment(deployment_id, parameters={
                "cluster": "demo", "inventory": str(inventory), "operator": "tester", "max_moves": 10})
        run_id = str(run.id)
        _wait("the rebalance", lambda: bool(open_runtime(inventory, fresh=True).hypervisor.running_vms(empty)), 180)
        assert request_cancel(run_id, "olga") == "RUNNING"
        _wait("the run to end", lambda: _state(run_id) in ("CANCELLED", "FAILED", "CRASHED", "COMPLETED"), 90)
        assert _state(run_id) == "CANCELLED", log.read_text()[-3000:]
    finally:
        _stop_worker(worker)
    rt = open_runtime(inventory, fresh=True)
    after = {vm: rt.hypervisor.locate(vm) for vm in rt.hypervisor.vms}  # type: ignore[attr-defined]
    assert set(after) == set(before) and all(len(h) == 1 for h in after.values()), after
    assert {h: r.state for h, r in rt.states.all().items()} == states  # a rebalance takes no host out
    records = rt.audit.records(run_id=run_id)
    (planned,) = [r for r in records if r.step == "moves-started"]
    moved = {vm for vm in after if after[vm] != before[vm]}
    assert moved and len(moved) < len(planned.inputs["moves"]), "the cancel stopped nothing"
    (rebalance,) = [r for r in records if r.step == "rebalance"]
    assert rebalance.details["cancelled_by"] == "olga"
    migrated = {r.vm: r.outcome for r in records if r.step == "migrate"}
    assert {vm for vm, o in migrated.items() if o is StepOutcome.OK} == moved
    assert any(r.step == "cancel" and r.operator == "olga" for r in records)
    _no_lock_held(inventory)
