"""Cancelling a real patch-host mid-drain through the Prefect API (issue 19 item 1), on the lab.

The run is served as deployments/serve.py serves it (loaded from the source tree, its own process),
its migrations capped at 1 MiB/s so the drain is still moving guests when the cancel comes. The
runner's SIGTERM stops the drain: libvirt then shows every guest running exactly once, the host is
cordoned "cancelled by X", the run is Cancelled; a re-run finishes the host (verified, active).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from hostmaint.lab import LabInfo
from hostmaint.models import HostState, StepOutcome, Trigger
from tests.lab.labkit import all_vms, fresh_lab

pytestmark = [pytest.mark.lab, pytest.mark.usefixtures("prefect_server")]

ROOT = Path(__file__).resolve().parents[2]
SERVE = """
import sys
from prefect import Flow
Flow.from_source(source=sys.argv[2], entrypoint="flows/patch_host.py:patch_host").serve(name=sys.argv[1])
"""


@pytest.fixture(scope="module")
def cancel_lab(prefect_server: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LabInfo, Path]]:
    db = tmp_path_factory.mktemp("lab-cancel") / "hostmaint.db"
    with fresh_lab(db) as info:
        yield info, db


def _wait(what: str, predicate: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def test_a_patch_host_cancelled_mid_drain_leaves_every_guest_once_and_a_rerun_finishes(
        cancel_lab: tuple[LabInfo, Path], tmp_path: Path) -> None:
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL

    from flows.cancel import request_cancel
    from flows.patch_host import patch_host
    from hostmaint.runtime import open_runtime
    from tasks import cancellation

    lab, db = cancel_lab
    # the host of the Linux guest: it rewrites its memory, so at 1 MiB/s its migration is still running
    # (idle guests move in a second or two whatever the cap: their pages are zero)
    host = next(v.host for v in lab.vms if v.linux)
    data = yaml.safe_load(lab.inventory_path.read_text())
    for cluster in data["clusters"]:
        cluster.setdefault("migration", {})["bandwidth_mib_s"] = 1  # the lab's small guests take ~20 s each
    slow = tmp_path / "inventory.yaml"
    slow.write_text(yaml.safe_dump(data))
    rt = open_runtime(lab.inventory_path)
    before = all_vms(rt)
    home = sorted(vm for vm, hosts in before.items() if hosts == [host])
    assert len(home) >= 2 and all(len(h) == 1 for h in before.values()), before

    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()), "HOSTMAINT_DB": str(db),
           "HOSTMAINT_INVENTORY": str(slow), "PREFECT_RUNNER_POLL_FREQUENCY": "1", "PYTHONPATH": str(ROOT)}
    name = "lab-cancel"
    log = tmp_path / "serve.log"
    server = subprocess.Popen([sys.executable, "-c", SERVE, name, str(ROOT)], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=log.open("w"))
    try:
        run = None

        def deployed() -> bool:
            from prefect.client.orchestration import get_client

            with get_client(sync_client=True) as client:
                try:
                    client.read_deployment_by_name(f"patch-host/{name}")
                except Exception:  # noqa: BLE001 - not there yet
                    return False
            return True

        _wait("the deployment", deployed, 90)
        run = run_deployment(f"patch-host/{name}", parameters={"host": host, "inventory": str(slow),
                                                               "operator": "lab-test"}, timeout=0)
        run_id = str(run.id)
        _wait("the drain", lambda: open_runtime(lab.inventory_path).states.state(host) is HostState.DRAINING, 180)
        time.sleep(2)  # past the dirty-rate probe: migrations in flight
        assert request_cancel(run_id, "lab-operator (hostmaint run cancel)") == "RUNNING"
        _wait("the run to end", lambda: cancellation.run_state(run_id)[0] in (
            "CANCELLED", "FAILED", "CRASHED", "COMPLETED"), 120)
        assert cancellation.run_state(run_id)[0] == "CANCELLED", log.read_text()[-4000:]
    finally:
        server.terminate()
        server.wait(30)

    rt = open_runtime(lab.inventory_path)
    after = all_vms(rt)
    assert set(after) == set(before) and all(len(h) == 1 for h in after.values()), after
    records = [r for r in rt.audit.records(host=host) if r.run_id == run_id]  # type: ignore[attr-defined]
    told = [(r.step, r.outcome.value, r.vm, r.details.get("error"), r.details.get("seconds")) for r in records]
    assert any(hosts == [host] for vm, hosts in after.items() if vm in home), ("the drain was not stopped", told)
    record = rt.states.get(host)  # type: ignore[attr-defined]
    assert record.state is HostState.CORDONED, record
    assert record.reason.startswith("cancelled by lab-operator (hostmaint run cancel)"), record
    assert any(r.step == "migrate" and r.outcome is StepOutcome.ABORTED for r in records), told
    assert any(r.step == "cancel" for r in records)

    # a re-run takes the locks at once and finishes the host: drained, patched, verified, active
    result = patch_host(host=host, operator="lab-test", reason="after cancel", inventory=str(lab.inventory_path),
                        trigger=Trigger.TEST, lock_wait_s=0)
    assert result.outcome is StepOutcome.OK, result.detail
    assert rt.states.state(host) is HostState.ACTIVE  # type: ignore[attr-defined]
    final = all_vms(rt)
    assert set(final) == set(before) and all(len(h) == 1 for h in final.values()), final
    assert rt.audit.verify().ok  # type: ignore[attr-defined]


SERVE_RETURN = """
import sys
from prefect import Flow
Flow.from_source(source=sys.argv[2], entrypoint="flows/return_host.py:return_host").serve(name=sys.argv[1])
"""


def test_a_return_host_cancelled_mid_return_aborts_the_move_and_the_host_stays_verified(
        cancel_lab: tuple[LabInfo, Path], tmp_path: Path) -> None:
    """return-host served, cancelled while the Linux guest (1 MiB/s) moves home: libvirt shows every guest
    once, that guest still away (its move aborted, its origin kept), the host active (it was verified
    before any VM came back); a re-run brings the rest home."""
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL

    from flows.cancel import request_cancel
    from flows.evacuate_host import evacuate_host
    from flows.return_host import return_host
    from hostmaint.runtime import open_runtime
    from tasks import cancellation

    lab, db = cancel_lab
    host = next(v.host for v in lab.vms if v.linux)
    linux = next(v.name for v in lab.vms if v.linux)
    rt = open_runtime(lab.inventory_path)
    before = all_vms(rt)
    evacuate_host(host=host, operator="lab-test", reason="before a return", inventory=str(lab.inventory_path),
                  trigger=Trigger.TEST, lock_wait_s=0)
    away = set(open_runtime(lab.inventory_path, fresh=True).states.origins(host))
    assert linux in away, away
    data = yaml.safe_load(lab.inventory_path.read_text())
    for cluster in data["clusters"]:
        cluster.setdefault("migration", {})["bandwidth_mib_s"] = 1
    slow = tmp_path / "inventory.yaml"
    slow.write_text(yaml.safe_dump(data))

    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()), "HOSTMAINT_DB": str(db),
           "HOSTMAINT_INVENTORY": str(slow), "PREFECT_RUNNER_POLL_FREQUENCY": "1", "PYTHONPATH": str(ROOT)}
    name = "lab-cancel-return"
    log = tmp_path / "serve.log"
    server = subprocess.Popen([sys.executable, "-c", SERVE_RETURN, name, str(ROOT)], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=log.open("w"))
    try:
        def deployed() -> bool:
            from prefect.client.orchestration import get_client

            with get_client(sync_client=True) as client:
                try:
                    client.read_deployment_by_name(f"return-host/{name}")
                except Exception:  # noqa: BLE001 - not there yet
                    return False
            return True

        _wait("the deployment", deployed, 90)
        run = run_deployment(f"return-host/{name}", parameters={"host": host, "inventory": str(slow),
                                                                "operator": "lab-test"}, timeout=0)
        run_id = str(run.id)
        # verified and back in service, its VMs on their way home: the Linux guest's move takes long
        _wait("the return", lambda: any(r.step == "moves-started" for r in open_runtime(
            lab.inventory_path, fresh=True).audit.records(run_id=run_id)), 240)
        time.sleep(3)
        assert request_cancel(run_id, "lab-operator (hostmaint run cancel)") == "RUNNING"
        _wait("the run to end", lambda: cancellation.run_state(run_id)[0] in (
            "CANCELLED", "FAILED", "CRASHED", "COMPLETED"), 120)
        assert cancellation.run_state(run_id)[0] == "CANCELLED", log.read_text()[-4000:]
    finally:
        server.terminate()
        server.wait(30)

    rt = open_runtime(lab.inventory_path, fresh=True)
    after = all_vms(rt)
    assert set(after) == set(before) and all(len(h) == 1 for h in after.values()), after
    assert rt.states.state(host) is HostState.ACTIVE  # type: ignore[attr-defined]
    assert after[linux] != [host] and linux in rt.states.origins(host)  # type: ignore[attr-defined]
    records = rt.audit.records(run_id=run_id)  # type: ignore[attr-defined]
    (ret,) = [r for r in records if r.step == "return-vms"]
    assert ret.details["cancelled_by"].startswith("lab-operator")
    assert any(r.step == "migrate" and r.vm == linux and r.outcome is StepOutcome.ABORTED for r in records)

    # a re-run (at the lab's own bandwidth) brings the rest home; the host stays active
    result = return_host(host=host, operator="lab-test", inventory=str(lab.inventory_path), trigger=Trigger.TEST,
                         lock_wait_s=0)
    assert result.outcome is StepOutcome.OK, result.detail
    final = all_vms(open_runtime(lab.inventory_path, fresh=True))
    assert all(final[vm] == [host] for vm in away) and all(len(h) == 1 for h in final.values()), final
    assert rt.audit.verify().ok  # type: ignore[attr-defined]
