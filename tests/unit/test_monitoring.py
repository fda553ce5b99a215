"""Monitoring gates and silences against REAL Prometheus and Alertmanager servers (Debian's packages),
started on loopback ports for the session; skipped, saying why, only when the binaries are absent.

Prometheus scrapes a tiny exporter this file runs (a flag the tests raise and clear) and evaluates
two alerts every second: ``HostOnFire`` always fires for hv01, ``Toggle`` fires for hv02 while the
flag is 1. The pure parts (query templating, the verdict, the bounded wait) are table-tested too.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from hostmaint.errors import MonitoringError, StepError
from hostmaint.inventory import InventoryError, Monitoring, parse_inventory
from hostmaint.maintenance import RunContext
from hostmaint.models import HostState, StepOutcome
from hostmaint.monitoring import (
    GatePoint,
    GateResult,
    GateVerdict,
    OnHold,
    Series,
    end_silence,
    gate,
    hold_reboot,
    judge,
    open_silence,
    promql_string,
    render_query,
    wait_for_gates,
)
from hostmaint.runtime import Runtime, open_runtime
from tests.monitoring_servers import (
    ALERTMANAGER,
    MISSING,
    PROMETHEUS,
    Flag,
    Servers,
    free_port,
    running_servers,
    until,
)

GATE = 'ALERTS{alertstate="firing", instance="$host"}'


# --- pure parts ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("query", "host", "expected"), [
    (GATE, "hv01", 'ALERTS{alertstate="firing", instance="hv01"}'),
    # a name that would close the string and add a matcher stays one value
    ('up{instance="$host"}', 'x",job=~".*', 'up{instance="x\\",job=~\\".*"}'),
    ("up{instance='$host'}", "a'b", "up{instance='a\\'b'}"),
    # after =~ the name is a literal regex: its dot matches a dot only (and the backslash is doubled)
    ('up{instance=~"$host(:[0-9]+)?"}', "hv01.dc1", 'up{instance=~"hv01\\\\.dc1(:[0-9]+)?"}'),
    ('ceph_health_status{cluster="${cluster}"} > 0 or ALERTS{host="$host"}', "h", None),
])
def test_render_query_escapes_names_for_where_they_stand(query: str, host: str, expected: str | None) -> None:
    out = render_query(query, host=host, cluster="prod-a")
    if expected is not None:
        assert out == expected
    else:
        assert out == 'ceph_health_status{cluster="prod-a"} > 0 or ALERTS{host="h"}'


@pytest.mark.parametrize(("query", "error"), [
    ("up{instance=$host}", "outside a quoted label value"),
    ('up{instance="$hostname"}', "unknown placeholder $hostname"),
    ('up{instance="$1"}', "lone $"),
    ("up{instance=`$host`}", "raw"),
    ('up{instance="$host}', "unterminated"),
])
def test_bad_query_templates_are_refused(query: str, error: str) -> None:
    with pytest.raises(ValueError, match=error.replace("$", r"\$")):
        render_query(query, host="h", cluster="c")


def test_promql_string_escapes_everything_that_ends_a_string() -> None:
    assert promql_string('a"b\\c\nd') == 'a\\"b\\\\c\\nd'


def test_judge_names_what_held_and_follows_required() -> None:
    held = judge("host", "q", [Series({"alertname": "Down", "instance": "hv01"}, "1")], required=False)
    assert held.verdict is GateVerdict.HELD and "Down{instance='hv01'}" in held.reason
    assert judge("host", "q", [], required=True).verdict is GateVerdict.OPEN
    err = MonitoringError("refused", "http://prom:9090/api/v1/query")
    assert judge("host", "q", err, required=False).verdict is GateVerdict.UNREACHABLE
    blocked = judge("host", "q", err, required=True)
    assert blocked.verdict is GateVerdict.BLOCKED and "http://prom:9090" in blocked.reason


class FakeTime:
    def __init__(self) -> None:
        self.t = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.t += s


@pytest.mark.parametrize(("on_hold", "answers", "passed", "attempts"), [
    (OnHold.WAIT, [[]], True, 1),
    (OnHold.WAIT, [["x"], ["x"], []], True, 3),  # cleared while waiting
    (OnHold.WAIT, [["x"]] * 10, False, 4),  # bounded: 0, 20, 40, 60 s
    (OnHold.SKIP, [["x"], []], False, 1),  # skip: no waiting
])
def test_wait_for_gates_is_bounded(on_hold: OnHold, answers: list[list[str]], passed: bool, attempts: int) -> None:
    ft = FakeTime()
    it = iter(answers)

    def ask() -> list[Any]:
        series = [Series({"alertname": a}, "1") for a in next(it)]
        return [judge("g", "q", series, required=False)]

    result = wait_for_gates(GatePoint.BEFORE_DRAIN, ask, on_hold=on_hold, wait_s=60, interval_s=20,
                            clock=ft.clock, sleep=ft.sleep)
    assert (result.passed, result.attempts) == (passed, attempts)
    assert sum(ft.sleeps) <= 60
    if not passed:
        assert "gate g holds" in result.reason


def test_inventory_monitoring_and_hooks_errors_name_the_field(sim_inventory: Path) -> None:
    import yaml

    data = yaml.safe_load(sim_inventory.read_text())
    data["clusters"][0]["monitoring"] = {
        "prometheus": {"url": "prom:9090", "gates": [{"name": "a", "query": "up{instance=$host}"}],
                       "on_hold": "later"},
        "alertmanager": {"url": "http://am:9093", "matchers": [{"name": "instance", "value": "$hst"}],
                         "lease_s": 60, "extend_every_s": 90}}
    data["hosts"][1]["hooks"] = {"pre_drain": [{"name": "x", "argv": ["echo", "$HOME"]}],
                                 "pre_boot": []}
    with pytest.raises(InventoryError) as err:
        parse_inventory(data, "inv.yaml")
    text = str(err.value)
    for needle in ["clusters[0].monitoring.prometheus.url: must be an http",
                   "clusters[0].monitoring.prometheus.gates[0].query: placeholder",
                   "clusters[0].monitoring.prometheus.on_hold:",
                   "clusters[0].monitoring.alertmanager.matchers[0].value:",
                   "hosts[1].hooks.pre_drain[0].argv (host hv02): [1]",
                   "hosts[1].hooks.pre_boot (host hv02): unknown field"]:
        assert needle in text, (needle, text)
    # extend_every_s is checked once the matchers are valid
    data["clusters"][0]["monitoring"]["prometheus"] = None
    data["clusters"][0]["monitoring"]["alertmanager"]["matchers"][0]["value"] = "$host"
    data["hosts"][1]["hooks"] = {}
    with pytest.raises(InventoryError, match="extend_every_s .* must be shorter than lease_s"):
        parse_inventory(data, "inv.yaml")


# --- real servers ----------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    if not PROMETHEUS or not ALERTMANAGER:
        pytest.skip(MISSING)
    with running_servers(tmp_path_factory.mktemp("monitoring")) as s:
        yield s


def _with_monitoring(rt: Runtime, monitoring: dict[str, Any]) -> Runtime:
    cluster = rt.inventory.clusters[0].model_copy(update={"monitoring": Monitoring.model_validate(monitoring)})
    return dataclasses.replace(rt, inventory=rt.inventory.model_copy(update={"clusters": [cluster]}))


def _prom(url: str, **kw: Any) -> dict[str, Any]:
    return {"prometheus": {"url": url, "gates": [{"name": "host-alerts", "query": GATE}], "interval_s": 0.5, **kw}}


def _am(url: str, **kw: Any) -> dict[str, Any]:
    return {"alertmanager": {"url": url, "matchers": [{"name": "instance", "value": "$host"}], **kw}}


@pytest.fixture
def rt(sim_inventory: Path) -> Runtime:
    return open_runtime(sim_inventory, fresh=True)


def _records(rt: Runtime, host: str, step: str) -> list[Any]:
    return [r for r in rt.audit.records(host=host) if r.step == step]


def test_a_firing_alert_holds_the_host_and_is_recorded(servers: Servers, rt: Runtime) -> None:
    rt = _with_monitoring(rt, _prom(servers.prometheus, on_hold="skip"))
    result = gate(rt, RunContext(), "hv01", GatePoint.BEFORE_DRAIN)
    assert not result.passed and "HostOnFire" in result.reason
    rec = _records(rt, "hv01", "gate")[-1]
    assert rec.outcome is StepOutcome.SKIPPED
    assert rec.details["checks"][0]["series"][0]["alertname"] == "HostOnFire"
    assert rec.details["checks"][0]["query"] == 'ALERTS{alertstate="firing", instance="hv01"}'
    # another host has nothing firing: it goes
    assert gate(rt, RunContext(), "hv03", GatePoint.BEFORE_DRAIN).passed


def test_the_wait_is_bounded_and_the_reboot_gate_keeps_the_host_cordoned(servers: Servers, rt: Runtime) -> None:
    rt = _with_monitoring(rt, _prom(servers.prometheus, wait_s=120, interval_s=30))
    ft = FakeTime()
    result = gate(rt, RunContext(), "hv01", GatePoint.BEFORE_REBOOT, clock=ft.clock, sleep=ft.sleep)
    assert not result.passed and result.attempts == 5 and "still held after 120s" in result.reason
    run = RunContext()
    rt.states.begin_maintenance("hv01", run.run_id, "patch")
    with pytest.raises(StepError, match="not rebooted, held by monitoring"):
        hold_reboot(rt, run, "hv01", result)
    record = rt.states.get("hv01")
    assert record.state is HostState.CORDONED and "HostOnFire" in record.reason


def test_a_cleared_alert_lets_the_host_go(servers: Servers, rt: Runtime) -> None:
    rt = _with_monitoring(rt, _prom(servers.prometheus, wait_s=60))
    Flag.value = 1
    until("Toggle firing", lambda: httpx.get(f"{servers.prometheus}/api/v1/query", params={
        "query": 'ALERTS{alertstate="firing",instance="hv02"}'}).json()["data"]["result"])

    def clear_then_sleep(s: float) -> None:
        Flag.value = 0  # the alert clears while the host waits
        time.sleep(s)

    result = gate(rt, RunContext(), "hv02", GatePoint.BEFORE_DRAIN, sleep=clear_then_sleep)
    assert result.passed and result.attempts >= 2
    assert _records(rt, "hv02", "gate")[-1].details["attempts"] == result.attempts


def test_unreachable_prometheus_is_audited_and_only_blocks_when_required(rt: Runtime) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    lenient = _with_monitoring(rt, _prom(dead))
    result = gate(lenient, RunContext(), "hv01", GatePoint.BEFORE_DRAIN)
    assert result.passed and "did not answer" in result.reason
    assert _records(rt, "hv01", "gate")[-1].details["checks"][0]["verdict"] == "unreachable"
    strict = _with_monitoring(rt, _prom(dead, required=True, on_hold="skip"))
    result = gate(strict, RunContext(), "hv01", GatePoint.BEFORE_DRAIN)
    assert not result.passed and dead in result.reason and "required" in result.reason


def _silence(url: str, sid: str) -> dict[str, Any]:
    return httpx.get(f"{url}/api/v2/silence/{sid}").json()  # type: ignore[no-any-return]


def test_silence_is_created_extended_and_expired(servers: Servers, rt: Runtime) -> None:
    rt = _with_monitoring(rt, _am(servers.alertmanager, lease_s=30, extend_every_s=0.3))
    run = RunContext()
    lease = open_silence(rt, run, "hv01")
    assert lease is not None
    body = _silence(servers.alertmanager, lease.silence_id)
    assert body["status"]["state"] == "active"
    assert body["matchers"] == [{"name": "instance", "value": "hv01", "isRegex": False, "isEqual": True}]
    first_end = body["endsAt"]
    until("two extensions", lambda: lease.extensions >= 2, timeout=20)
    body = _silence(servers.alertmanager, lease.silence_id)
    assert body["endsAt"] > first_end and body["id"] == lease.silence_id
    end_silence(rt, run, "hv01", lease)
    assert _silence(servers.alertmanager, lease.silence_id)["status"]["state"] == "expired"
    created = _records(rt, "hv01", "silence")[-1]
    ended = _records(rt, "hv01", "silence-end")[-1]
    assert created.details["silence_id"] == ended.details["silence_id"] == lease.silence_id
    assert ended.details["expired"] is True and ended.details["extensions"] >= 2


def test_a_silence_nobody_extends_lapses_by_itself(servers: Servers, rt: Runtime) -> None:
    rt = _with_monitoring(rt, _am(servers.alertmanager, lease_s=1))
    lease = open_silence(rt, RunContext(), "hv03", start=False)  # the run "dies": nothing extends it
    assert lease is not None
    until("the silence lapsed",
           lambda: _silence(servers.alertmanager, lease.silence_id)["status"]["state"] == "expired", timeout=15)


def test_a_resumed_run_adopts_the_recorded_silence(servers: Servers, rt: Runtime) -> None:
    rt = _with_monitoring(rt, _am(servers.alertmanager, lease_s=60))
    first = open_silence(rt, RunContext(), "hv04", start=False)
    assert first is not None  # and that run died without ending it
    resumed_run = RunContext()
    second = open_silence(rt, resumed_run, "hv04", start=False)
    assert second is not None and second.silence_id == first.silence_id
    rec = _records(rt, "hv04", "silence")[-1]
    assert rec.run_id == resumed_run.run_id and rec.details["adopted"] == first.silence_id
    end_silence(rt, resumed_run, "hv04", second)
    # ended: the next maintenance makes a new one
    third = open_silence(rt, RunContext(), "hv04", start=False)
    assert third is not None and third.silence_id != first.silence_id
    end_silence(rt, RunContext(), "hv04", third)


def test_unreachable_alertmanager_never_blocks_unless_required(rt: Runtime) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    lenient = _with_monitoring(rt, _am(dead))
    assert open_silence(lenient, RunContext(), "hv02") is None
    rec = _records(rt, "hv02", "silence")[-1]
    assert rec.outcome is StepOutcome.SKIPPED and dead in rec.details["error"]
    strict = _with_monitoring(rt, _am(dead, required=True))
    with pytest.raises(StepError, match=f"Alertmanager is required.*{dead}"):
        open_silence(strict, RunContext(), "hv02")


def test_silence_times_are_sent_in_utc(servers: Servers, rt: Runtime) -> None:
    rt = _with_monitoring(rt, _am(servers.alertmanager, lease_s=120))
    fixed = datetime.now(UTC)
    lease = open_silence(rt, RunContext(), "hv02", now=lambda: fixed, start=False)
    assert lease is not None
    ends = datetime.fromisoformat(_silence(servers.alertmanager, lease.silence_id)["endsAt"].replace("Z", "+00:00"))
    assert abs(ends - (fixed + timedelta(seconds=120))) < timedelta(seconds=1)
    end_silence(rt, RunContext(), "hv02", lease)


def test_extensions_keep_the_silence_when_alertmanager_moved_its_start(servers: Servers, rt: Runtime) -> None:
    # Alertmanager moves a start in the past to its own now; an extension sending the start the
    # run asked for (seconds off) would make Alertmanager replace the silence with a new id
    rt = _with_monitoring(rt, _am(servers.alertmanager, lease_s=120))
    lease = open_silence(rt, RunContext(), "hv03", now=lambda: datetime.now(UTC) - timedelta(seconds=5), start=False)
    assert lease is not None
    first = lease.silence_id
    assert lease.extend() == first and lease.extend() == first
    assert _silence(servers.alertmanager, first)["status"]["state"] == "active"
    end_silence(rt, RunContext(), "hv03", lease)


def test_the_silence_of_a_killed_run_lapses(servers: Servers) -> None:
    import os
    import signal
    import subprocess
    import sys

    # a run's process, extending its lease every 0.3 s, is killed (-9): nothing ends the silence
    script = f"""
import time
from datetime import UTC, datetime, timedelta
import httpx
from hostmaint.monitoring import Alertmanager, SilenceLease
am = Alertmanager({servers.alertmanager!r}, httpx.Client(trust_env=False))
m = [{{"name": "instance", "value": "killed-run", "isRegex": False, "isEqual": True}}]
now = datetime.now(UTC)
sid = am.put(m, now, now + timedelta(seconds=2), comment="test", created_by="test")
lease = SilenceLease(am, sid, m, am.started(sid, now), 2, "test", "test")
lease.start(0.3)
print(sid, flush=True)
time.sleep(3600)
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[2])
    assert proc.stdout is not None
    sid = proc.stdout.readline().strip()
    first_end = _silence(servers.alertmanager, sid)["endsAt"]
    until("an extension", lambda: _silence(servers.alertmanager, sid)["endsAt"] != first_end, timeout=15)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    until("the dead run's silence lapsed",
          lambda: _silence(servers.alertmanager, sid)["status"]["state"] == "expired", timeout=15)


def test_a_held_reboot_records_that_it_kept_the_host_out(rt: Runtime) -> None:
    run = RunContext()
    rt.states.begin_maintenance("hv02", run.run_id, "patch")
    for step in (HostState.DRAINING, HostState.DRAINED, HostState.PATCHING):
        rt.states.transition("hv02", step, step.value, run.run_id)
    held = GateResult(GatePoint.BEFORE_REBOOT, False, "before-reboot: HostOnFire firing; still held after 120s")
    with pytest.raises(StepError, match="not rebooted, held by monitoring"):
        hold_reboot(rt, run, "hv02", held)

    # the state changed (patching -> cordoned): the audit says so, as every other keep-out does
    [kept] = _records(rt, "hv02", "keep-cordoned")
    assert kept.details["state_before"] == "patching" and kept.details["state"] == "cordoned"
    assert "HostOnFire" in kept.inputs["why"]


# --- gates per kind of work, an evacuation's silence (issue 19: evacuations and incident runbooks) ------


def test_each_kind_of_work_is_held_by_the_gates_that_name_it(servers: Servers, rt: Runtime) -> None:
    from hostmaint.monitoring import WorkKind

    # HostOnFire fires for hv01: maintenance and a planned evacuation wait for it (the default kinds)
    default = _with_monitoring(rt, _prom(servers.prometheus, on_hold="skip"))
    for kind in (WorkKind.MAINTENANCE, WorkKind.EVACUATION):
        result = gate(default, RunContext(), "hv01", GatePoint.BEFORE_DRAIN, kind=kind)
        assert not result.passed and "HostOnFire" in result.reason, kind
    # an incident's evacuation exists because alerts fire: not held, and the record says so and why
    result = gate(default, RunContext(), "hv01", GatePoint.BEFORE_DRAIN, kind=WorkKind.INCIDENT)
    assert result.passed and "bypassed for an incident evacuation" in result.reason
    rec = _records(rt, "hv01", "gate")[-1]
    assert rec.inputs["kind"] == "incident" and rec.outcome is StepOutcome.OK
    assert rec.details["checks"] == [{"gate": "host-alerts", "query": 'ALERTS{alertstate="firing", instance="hv01"}',
                                      "verdict": "bypassed", "reason": result.checks[0].reason, "series": []}]
    # a gate the operator says holds incidents too (the storage cluster's health) holds one
    storage = _with_monitoring(rt, {"prometheus": {
        "url": servers.prometheus, "on_hold": "skip",
        "gates": [{"name": "host-alerts", "query": GATE, "kinds": ["maintenance"]},
                  {"name": "storage", "query": 'ALERTS{alertstate="firing", cluster="$cluster"}',
                   "kinds": ["incident", "evacuation", "maintenance"]}]}})
    result = gate(storage, RunContext(), "hv01", GatePoint.BEFORE_DRAIN, kind=WorkKind.INCIDENT)
    assert not result.passed and "StorageDegraded" in result.reason
    assert [c.verdict for c in result.checks] == [GateVerdict.BYPASSED, GateVerdict.HELD]
    planned = gate(storage, RunContext(), "hv01", GatePoint.BEFORE_DRAIN, kind=WorkKind.EVACUATION)
    assert "holds maintenance only, not evacuation" in planned.checks[0].reason


def test_an_evacuations_silence_lasts_while_the_host_is_out_and_ends_when_it_is_back(
        servers: Servers, rt: Runtime) -> None:
    from hostmaint.monitoring import end_recorded_silence

    rt = _with_monitoring(rt, _am(servers.alertmanager, lease_s=30, extend_every_s=0.3))
    run = RunContext()
    lease = open_silence(rt, run, "hv02", hold_s=7200)
    assert lease is not None
    time.sleep(1.0)  # an extension thread (there must be none) would have moved its end by now
    body = _silence(servers.alertmanager, lease.silence_id)
    ends = datetime.fromisoformat(body["endsAt"].replace("Z", "+00:00"))
    assert body["status"]["state"] == "active" and lease.extensions == 0
    assert timedelta(minutes=119) < ends - datetime.now(UTC) <= timedelta(hours=2)
    created = _records(rt, "hv02", "silence")[-1]
    assert created.inputs["lease_s"] == 7200 and "return-host" in created.inputs["until"]
    lease.am.client.close()
    # the evacuation ended; later, whatever puts the host back ends its silence
    assert end_recorded_silence(rt, RunContext(), "hv02")
    assert _silence(servers.alertmanager, lease.silence_id)["status"]["state"] == "expired"
    ended = _records(rt, "hv02", "silence-end")[-1]
    assert ended.details["silence_id"] == lease.silence_id and ended.details["expired"] is True
    assert not end_recorded_silence(rt, RunContext(), "hv02")  # nothing left to end


def test_new_integration_fields_name_the_field_and_check_exits_2(sim_inventory: Path) -> None:
    import yaml
    from typer.testing import CliRunner

    from hostmaint.cli import app

    data = yaml.safe_load(sim_inventory.read_text())
    data["clusters"][0]["monitoring"] = {
        "prometheus": {"url": "http://prom:9090",
                       "gates": [{"name": "a", "query": 'up{instance="$host"}', "kinds": ["outage"]},
                                 {"name": "b", "query": 'up{instance="$host"}', "kinds": []}]},
        "alertmanager": {"url": "http://am:9093", "matchers": [{"name": "instance", "value": "$host"}],
                         "evacuation_silence_s": 5}}
    with pytest.raises(InventoryError) as err:
        parse_inventory(data, "inv.yaml")
    text = str(err.value)
    for needle in ["clusters[0].monitoring.prometheus.gates[0].kinds[0]: Input should be 'maintenance', "
                   "'evacuation' or 'incident'",
                   "clusters[0].monitoring.prometheus.gates[1].kinds: List should have at least 1 item",
                   "clusters[0].monitoring.alertmanager.evacuation_silence_s: must be 0 (no silence for "
                   "evacuations) or at least 60 seconds, got 5"]:
        assert needle in text, (needle, text)
    sim_inventory.write_text(yaml.safe_dump(data))
    checked = CliRunner().invoke(app, ["inventory", "check", "--no-files", str(sim_inventory)])
    assert checked.exit_code == 2 and "evacuation_silence_s" in checked.output, checked.output


# --- what monitoring answers is data (a fake server: httpx.MockTransport) -----------------------------

HOSTILE = "Evil\x1b[2J\x1b]8;;http://evil\x07\u202e\nhv01: gates open"


def test_labels_and_errors_from_monitoring_reach_the_log_as_one_line(
        rt: Runtime, caplog: pytest.LogCaptureFixture) -> None:
    # a metric name (UTF-8 names, Prometheus 3) or a label a target chose, and the body of a refusal
    def prometheus(request: httpx.Request) -> httpx.Response:
        if "hv01" in request.content.decode():
            return httpx.Response(200, json={"status": "success", "data": {"resultType": "vector", "result": [
                {"metric": {"__name__": HOSTILE, HOSTILE: "x"}, "value": [0, "1"]}]}})
        return httpx.Response(500, text=HOSTILE)

    rt = _with_monitoring(rt, _prom("http://prom.test", on_hold="skip"))
    with caplog.at_level("INFO", logger="hostmaint"):
        held = gate(rt, RunContext(), "hv01", GatePoint.BEFORE_DRAIN, transport=httpx.MockTransport(prometheus))
        unreachable = gate(rt, RunContext(), "hv02", GatePoint.BEFORE_DRAIN,
                           transport=httpx.MockTransport(prometheus))
    assert not held.passed and unreachable.passed
    assert _records(rt, "hv01", "gate")[-1].details["checks"][0]["series"][0]["__name__"] == HOSTILE  # exact
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("hostmaint")]
    assert len(lines) == 2 and all("\\x1b[2J" in line for line in lines)
    assert not any(c in line for line in lines for c in "\x1b\n\u202e")


def test_a_silence_id_that_is_not_one_never_becomes_a_path(rt: Runtime) -> None:
    # Alertmanager (or whatever answers at its url) names the silence "../../../-/quit": pasted into the
    # url, the extension and expiry would go to another endpoint with the url's credentials
    paths: list[str] = []

    def alertmanager(request: httpx.Request) -> httpx.Response:
        paths.append(request.url.path)
        if request.method == "POST":
            return httpx.Response(200, json={"silenceID": "../../../-/quit"})
        return httpx.Response(404)

    rt = _with_monitoring(rt, _am("http://am.test"))
    lease = open_silence(rt, RunContext(), "hv01", transport=httpx.MockTransport(alertmanager), start=False)
    assert lease is None  # not required: no silence, said so
    rec = _records(rt, "hv01", "silence")[-1]
    assert rec.outcome is StepOutcome.SKIPPED and "silence id '../../../-/quit'" in rec.details["error"]
    assert paths == ["/api/v2/silences"]


@pytest.mark.parametrize("result", [["x"], [{"metric": ["a"], "value": [0, "1"]}], [{"metric": {}, "value": 5}],
                                    [{"metric": {}, "value": []}], "abc"])
def test_a_vector_that_is_no_prometheus_answer_is_unreachable_not_a_crash(rt: Runtime, result: Any) -> None:
    # an AttributeError or TypeError escaped gate(): the run crashed instead of going on (not required)
    body = {"status": "success", "data": {"resultType": "vector", "result": result}}
    transport = httpx.MockTransport(lambda request: httpx.Response(200, json=body))
    lenient = _with_monitoring(rt, _prom("http://prom.test"))
    checked = gate(lenient, RunContext(), "hv01", GatePoint.BEFORE_DRAIN, transport=transport)
    assert checked.passed and "not a Prometheus answer" in checked.reason
    strict = _with_monitoring(rt, _prom("http://prom.test", required=True, on_hold="skip"))
    assert not gate(strict, RunContext(), "hv01", GatePoint.BEFORE_DRAIN, transport=transport).passed


@pytest.mark.parametrize("silence", [
    {"id": "a-1", "matchers": "abc", "startsAt": "2026-01-01T00:00:00Z", "endsAt": "2026-01-01T01:00:00Z",
     "status": {"state": "active"}},
    {"id": "a-1", "matchers": [], "startsAt": 5, "endsAt": "2026-01-01T01:00:00Z", "status": {"state": "active"}},
    {"id": "a-1", "matchers": [{}], "startsAt": "2026-01-01T00:00:00Z", "endsAt": "2026-01-01T01:00:00Z",
     "status": {"state": "active"}},
])
def test_a_silence_alertmanager_garbles_is_no_silence_not_a_crash(rt: Runtime, silence: dict[str, Any]) -> None:
    # the run adopting the silence it recorded read it back: an AttributeError (startsAt not text) or a
    # KeyError (a matcher without a name) escaped open_silence
    def alertmanager(request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            return httpx.Response(200, json=silence)
        return httpx.Response(200, json={"silenceID": "b-2"})

    rt = _with_monitoring(rt, _am("http://am.test"))
    transport = httpx.MockTransport(alertmanager)
    for _ in range(2):  # the second run finds the first one's silence recorded, and reads it back
        lease = open_silence(rt, RunContext(), "hv01", transport=transport, start=False)
        rec = _records(rt, "hv01", "silence")[-1]
        if lease is None:
            assert rec.outcome is StepOutcome.SKIPPED and "not an Alertmanager silence" in rec.details["error"]
        else:
            assert "adopted" not in rec.details  # a garbled silence is not this host's


def test_a_refusal_quoting_a_password_is_masked_before_it_is_cut(rt: Runtime) -> None:
    said = " upstream http://svc:hun"  # the first 300 characters end inside the password
    body = "x" * (300 - len(said)) + " upstream http://svc:hunter2@10.0.0.1:9090/api"
    transport = httpx.MockTransport(lambda request: httpx.Response(502, text=body))
    result = gate(_with_monitoring(rt, _prom("http://prom.test")), RunContext(), "hv01", GatePoint.BEFORE_DRAIN,
                  transport=transport)
    assert result.passed and "query refused (HTTP 502)" in result.reason and "svc:hun" not in result.reason
    assert "svc:hun" not in str(_records(rt, "hv01", "gate")[-1].details)
