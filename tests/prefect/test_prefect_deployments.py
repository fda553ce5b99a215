"""The deployments: served and prefect.yaml agree, schedules fire when they should, forms validate.

Schedules are checked with the server's own schedule model (the code the Prefect
scheduler runs), in the window's timezone, with the exclusion dates skipped.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import yaml
from dateutil.rrule import rrulestr
from prefect.flows import load_flow_from_entrypoint
from prefect.server.schemas.schedules import RRuleSchedule
from prefect_support import make_fleet
from pydantic import ValidationError

from deployments.serve import (
    ENTRYPOINTS,
    ROOT,
    WINDOWS_FILE,
    build_deployments,
    degraded_trigger,
    hardware_trigger,
)
from flows.params import EvacuationRequest, RebalanceRequest
from flows.runbooks.on_request import evacuate_on_request
from hostmaint.errors import InputError
from hostmaint.window_schedule import WindowConfig, load_windows, window_rrule

TOKYO = ZoneInfo("Asia/Tokyo")
PREFECT_YAML = ROOT / "deployments" / "prefect.yaml"


def next_runs(rrule: str, timezone: str, after: datetime, n: int) -> list[datetime]:
    return list(asyncio.run(RRuleSchedule(rrule=rrule, timezone=timezone).get_dates(n=n, start=after)))


@pytest.fixture
def inventory(tmp_path: Path) -> Path:
    return make_fleet(tmp_path / "fleet")


# --- served deployments --------------------------------------------------------------------------------------


def test_served_deployments_load(inventory: Path) -> None:
    deps = {d.name: d for d in build_deployments(inventory)}
    assert set(deps) == {"patch-window-demo", *ENTRYPOINTS}
    window = deps["patch-window-demo"]
    assert window.flow_name == "patch-window"
    [schedule] = window.schedules
    assert schedule.schedule.timezone == "Asia/Tokyo"
    assert schedule.parameters["cluster"] == "demo"
    assert window.parameters["window_minutes"] == 240
    assert [t.name for t in deps["degraded-host"].triggers] == ["host degraded"]
    assert [t.name for t in deps["hardware-check-failed"].triggers] == ["hardware check failed"]
    for name in ("evacuate-host", "patch-host", "rebalance-cluster"):
        assert deps[name].schedules == [] and deps[name].triggers == []
        assert list(deps[name]._parameter_openapi_schema.properties)[0] == "request"


def test_one_patch_window_per_cluster_with_overrides(tmp_path: Path) -> None:
    inv = make_fleet(tmp_path / "fleet")
    windows = tmp_path / "windows.yaml"
    windows.write_text(yaml.safe_dump({
        "default": {"rrule": "FREQ=WEEKLY;BYDAY=SA;BYHOUR=1", "timezone": "Europe/Berlin", "window_minutes": 90},
        "clusters": {"demo": {"timezone": "UTC", "max_hosts_in_parallel": 2}}}))
    [window] = [d for d in build_deployments(inv, windows=windows) if d.name.startswith("patch-window")]
    assert window.schedules[0].schedule.timezone == "UTC"
    assert window.parameters["max_hosts_in_parallel"] == 2
    assert window.parameters["window_minutes"] == 90  # inherited from the default


def test_an_override_for_a_cluster_the_inventory_lacks_is_refused(tmp_path: Path) -> None:
    # a typo of 'demo': ignored, demo would run on the default window (another timezone, one host at a time)
    inv = make_fleet(tmp_path / "fleet")
    windows = tmp_path / "windows.yaml"
    windows.write_text(yaml.safe_dump({
        "default": {"rrule": "FREQ=MONTHLY;BYDAY=+2TU;BYHOUR=22", "timezone": "Asia/Tokyo"},
        "clusters": {"dmeo": {"timezone": "UTC", "max_hosts_in_parallel": 2}, "demo": {"window_minutes": 60}}}))
    with pytest.raises(InputError, match=rf"^{windows}: clusters: 'dmeo': no cluster of the inventory is called "
                                         r"that \(its clusters: demo\); correct the name or remove the override"):
        build_deployments(inv, windows=windows)
    _, overrides = load_windows(windows)  # without an inventory there is nothing to check the names against
    assert set(overrides) == {"dmeo", "demo"}


# --- schedules ---------------------------------------------------------------------------------------------------


def test_patch_window_fires_second_tuesday_22_tokyo_skipping_exclusions() -> None:
    cfg, _ = load_windows(WINDOWS_FILE)
    runs = next_runs(window_rrule(cfg), cfg.timezone, datetime(2026, 11, 1, tzinfo=UTC), 4)
    local = [r.astimezone(TOKYO) for r in runs]
    # 2026-12-08 and 2027-01-12 are excluded in windows.yaml
    assert [d.date().isoformat() for d in local] == ["2026-11-10", "2027-02-09", "2027-03-09", "2027-04-13"]
    for d in local:
        assert (d.weekday(), d.hour, d.minute) == (1, 22, 0) and 8 <= d.day <= 14
    assert runs[0] == datetime(2026, 11, 10, 13, 0, tzinfo=UTC)  # 22:00 JST is 13:00 UTC


def test_exclusions_apply_in_the_windows_timezone() -> None:
    # 2026-12-08 22:00 in Tokyo: excluding the Tokyo date removes it, whatever the UTC date
    cfg = WindowConfig(rrule="FREQ=MONTHLY;BYDAY=+2TU;BYHOUR=22", timezone="Asia/Tokyo", exclude=["2026-12-08"])
    runs = next_runs(window_rrule(cfg), cfg.timezone, datetime(2026, 11, 20, tzinfo=UTC), 2)
    assert [r.astimezone(TOKYO).date().isoformat() for r in runs] == ["2027-01-12", "2027-02-09"]


def test_an_exclusion_date_without_a_window_is_refused_naming_the_nearest() -> None:
    cfg = WindowConfig(rrule="FREQ=MONTHLY;BYDAY=+2TU;BYHOUR=22", timezone="Asia/Tokyo", exclude=["2026-12-09"])
    with pytest.raises(InputError, match=r"exclude 2026-12-09: no patch window falls on that date .*2026-12-08"):
        window_rrule(cfg)


def test_a_window_in_the_hour_the_clocks_skip_opens_after_the_jump_never_before() -> None:
    # 02:30 does not exist in Berlin on 2027-03-28; Prefect alone (dateutil) would start it at 01:30 CET,
    # an hour before the window an operator agreed
    cfg = WindowConfig(rrule="FREQ=DAILY;BYHOUR=2;BYMINUTE=30", timezone="Europe/Berlin")
    berlin = ZoneInfo("Europe/Berlin")
    bare = f"DTSTART:20260101T000000\nRRULE:{cfg.rrule}"
    [early] = next_runs(bare, cfg.timezone, datetime(2027, 3, 27, 12, tzinfo=UTC), 1)
    assert early.astimezone(berlin).hour == 1  # the behaviour this guards against
    runs = next_runs(window_rrule(cfg), cfg.timezone, datetime(2027, 3, 26, 12, tzinfo=UTC), 3)
    assert [r.astimezone(UTC) for r in runs] == [datetime(2027, 3, 27, 1, 30, tzinfo=UTC),  # 02:30 CET
                                                 datetime(2027, 3, 28, 1, 30, tzinfo=UTC),  # 03:30 CEST
                                                 datetime(2027, 3, 29, 0, 30, tzinfo=UTC)]  # 02:30 CEST
    # the night clocks go back 02:30 happens twice: the window opens at the first
    [autumn] = next_runs(window_rrule(cfg), cfg.timezone, datetime(2026, 10, 24, 12, tzinfo=UTC), 1)
    assert autumn.astimezone(UTC) == datetime(2026, 10, 25, 0, 30, tzinfo=UTC)  # PEP 495: compare in UTC


@pytest.mark.parametrize("timezone,rrule", [
    ("Europe/Berlin", "FREQ=DAILY;BYHOUR=2;BYMINUTE=30"),
    ("America/New_York", "FREQ=WEEKLY;BYDAY=SU;BYHOUR=2;BYMINUTE=0"),
    ("America/Santiago", "FREQ=DAILY;BYHOUR=0;BYMINUTE=0"),  # its clocks jump at midnight
    ("Australia/Lord_Howe", "FREQ=DAILY;BYHOUR=2;BYMINUTE=15"),  # a 30-minute jump
    ("Asia/Tokyo", "FREQ=MONTHLY;BYDAY=+2TU;BYHOUR=22"),
])
def test_every_window_opens_where_rfc_5545_puts_its_local_time(timezone: str, rrule: str) -> None:
    # the oracle is Python's zoneinfo, not dateutil: fold=0 reads a skipped time with the offset before
    # the jump and a repeated one as its first occurrence, which is RFC 5545's reading
    cfg = WindowConfig(rrule=rrule, timezone=timezone)
    zone = ZoneInfo(timezone)
    after, end = datetime(2026, 12, 7, tzinfo=UTC), datetime(2029, 1, 1, tzinfo=UTC)
    schedule = RRuleSchedule(rrule=window_rrule(cfg, today=after.date()), timezone=timezone)
    runs = [datetime.fromtimestamp(r.timestamp(), UTC) for r in asyncio.run(schedule.get_dates(start=after, end=end))]
    nominal = rrulestr(f"DTSTART:20260101T000000\nRRULE:{rrule}").between(datetime(2026, 12, 6), datetime(2029, 1, 2))
    expected = [(n, n.replace(tzinfo=zone).astimezone(UTC)) for n in nominal]
    expected = [(n, e) for n, e in expected if after <= e <= end]
    assert runs == [e for _, e in expected]
    assert len(runs) >= 24  # two years of windows compared
    assert all(e.astimezone(zone).replace(tzinfo=None) >= n for n, e in expected)  # never before its local time


@pytest.mark.parametrize("field,value,message", [
    ("timezone", "Mars/Olympus", "unknown timezone 'Mars/Olympus'"),
    ("rrule", "FREQ=SOMETIMES", "not a valid RRULE"),
    ("rrule", "DTSTART:20260101T000000\nRRULE:FREQ=DAILY", "give only the RRULE part"),
])
def test_window_config_rejects_bad_values(field: str, value: str, message: str) -> None:
    base = {"rrule": "FREQ=DAILY", "timezone": "UTC"}
    with pytest.raises(ValidationError, match=message):
        WindowConfig.model_validate({**base, field: value})


# --- prefect.yaml ------------------------------------------------------------------------------------------


def test_prefect_yaml_describes_the_served_deployments(inventory: Path) -> None:
    spec = yaml.safe_load(PREFECT_YAML.read_text())
    served = {d.name: d for d in build_deployments(inventory)}
    listed = {d["name"]: d for d in spec["deployments"]}
    assert set(listed) - {"patch-window-lab"} == set(ENTRYPOINTS)
    for name, dep in listed.items():
        assert dep["work_pool"]["name"] == "hostmaint"
        path, _, fn = dep["entrypoint"].partition(":")
        flow = load_flow_from_entrypoint(f"{ROOT / path}:{fn}")
        twin = served["patch-window-demo" if name == "patch-window-lab" else name]
        assert flow.name == twin.flow_name, name
        assert dep["entrypoint"] == twin.entrypoint
        if dep.get("parameters"):
            flow.validate_parameters(dep["parameters"])
    cfg, _ = load_windows(WINDOWS_FILE)
    [schedule] = listed["patch-window-lab"]["schedules"]
    assert schedule["rrule"] == window_rrule(cfg) and schedule["timezone"] == cfg.timezone
    assert schedule["parameters"]["cluster"] == "lab"
    for name, trigger in (("degraded-host", degraded_trigger()), ("hardware-check-failed", hardware_trigger())):
        [declared] = listed[name]["triggers"]
        assert set(declared["expect"]) == trigger.expect
        assert declared["match"] == dict(trigger.match.root if hasattr(trigger.match, "root") else trigger.match)
        assert declared["parameters"] == trigger.parameters


@pytest.mark.slow
def test_prefect_deploy_applies_prefect_yaml(prefect_server: None, tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    from deployments.server import ensure_work_pool, prefect_executable

    ensure_work_pool("hostmaint")
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "HOSTMAINT_SRC": str(ROOT)}
    done = subprocess.run([prefect_executable(), "--no-prompt", "deploy", "--all", "--prefect-file",
                           str(PREFECT_YAML)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with get_client(sync_client=True) as client:
        window = client.read_deployment_by_name("patch-window/patch-window-lab")
        assert window.work_pool_name == "hostmaint"
        assert window.schedules[0].schedule.timezone == "Asia/Tokyo"
        assert window.pull_steps[0]["prefect.deployments.steps.set_working_directory"]["directory"] == str(ROOT)
        degraded = client.read_deployment_by_name("degraded-host-runbook/degraded-host")
        assert degraded.entrypoint == ENTRYPOINTS["degraded-host"][0]


# --- parameter forms ------------------------------------------------------------------------------------------


def test_request_forms_have_titles_and_descriptions() -> None:
    schema = EvacuationRequest.model_json_schema()
    for name in ("host", "reason", "operator", "dry_run", "approval_required"):
        assert schema["properties"][name].get("description"), name
        assert schema["properties"][name].get("title"), name
    assert schema["properties"]["dry_run"]["default"] is True  # a form submitted as-is changes nothing


def test_unknown_host_is_refused_naming_it(inventory: Path) -> None:
    with pytest.raises(ValidationError) as info:
        EvacuationRequest(host="hv99", reason="disk", operator="judy", inventory=str(inventory))
    message = str(info.value)
    assert "unknown host 'hv99'" in message and "known hosts: hv01, hv02, hv03, hv04" in message
    with pytest.raises(ValidationError, match="unknown cluster 'nope'"):
        RebalanceRequest(cluster="nope", operator="judy", inventory=str(inventory))


def test_the_flow_refuses_an_unknown_host_before_running(inventory: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.exceptions import ParameterTypeError

    monkeypatch.setenv("HOSTMAINT_INVENTORY", str(inventory))
    with pytest.raises(ParameterTypeError, match="unknown host 'hv99'"):
        evacuate_on_request.validate_parameters({"request": {"host": "hv99", "reason": "disk", "operator": "k"}})
    ok = evacuate_on_request.validate_parameters({"request": {"host": "hv01", "reason": "disk", "operator": "k"}})
    assert ok["request"].dry_run is True


@pytest.mark.parametrize("request_body, bad", [
    ({"host": "no spaces allowed", "reason": "disk", "operator": "k"}, "host"),
    ({"host": "hv01", "reason": "", "operator": "k"}, "reason"),
    ({"host": "hv01", "reason": "disk", "operator": ""}, "operator"),
])
def test_the_server_refuses_a_bad_form(prefect_server: None, inventory: Path, request_body: dict[str, str],
                                       bad: str) -> None:
    from prefect.client.orchestration import get_client

    [dep] = [d for d in build_deployments(inventory) if d.name == "evacuate-host"]
    deployment_id = dep.apply()
    with get_client(sync_client=True) as client, pytest.raises(Exception, match="409|Validation") as info:
        client.create_flow_run_from_deployment(deployment_id, parameters={"request": request_body})
    assert bad in str(info.value) or "409" in str(info.value)


@pytest.mark.slow
def test_a_process_worker_runs_a_pool_deployment(prefect_server: None, tmp_path: Path, hostmaint_db: Path) -> None:
    """The scale-out path: a deployment registered with a process pool, run by `prefect worker start`."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    from deployments.server import ensure_work_pool, prefect_executable

    inventory = make_fleet(tmp_path / "fleet")
    pool = "hostmaint-worker-test"
    ensure_work_pool(pool)
    [dep] = [d for d in build_deployments(inventory, source=ROOT) if d.name == "evacuate-host"]
    dep.name = "evacuate-host-worker-test"  # its own deployment: other tests serve "evacuate-host"
    deployment_id = dep.apply(work_pool_name=pool)
    with get_client(sync_client=True) as client:
        run = client.create_flow_run_from_deployment(deployment_id, parameters={"request": {
            "host": "hv01", "reason": "worker test", "operator": "olivia", "dry_run": True}})
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "HOSTMAINT_INVENTORY": str(inventory),
           "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "1"}
    log = tmp_path / "worker.log"
    with log.open("w") as out:
        worker = subprocess.Popen([prefect_executable(), "worker", "start", "--pool", pool, "--type", "process"],
                                  cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        with get_client(sync_client=True) as client:
            while not (state := client.read_flow_run(run.id).state).is_final():
                assert worker.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, f"worker did not finish the run:\n{log.read_text()[-3000:]}"
                time.sleep(0.5)
    finally:
        worker.terminate()
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            # Prefect's worker sometimes takes longer than that to wind down after SIGTERM (seen once
            # in CI, after the run had completed); how it stops is not what this test is about
            worker.kill()
            worker.wait(10)
    assert state.is_completed(), f"{state}\n{log.read_text()[-3000:]}"
    # the worker's flow process wrote the dry run's plan to the same audit trail, under the form's operator
    from hostmaint.audit import AuditTrail
    from hostmaint.db import open_engine

    [plan] = [r for r in AuditTrail(open_engine()).records(host="hv01") if r.step == "plan"]
    assert (plan.operator, plan.outcome.value, plan.flow) == ("olivia", "dry-run", "evacuate-host")
