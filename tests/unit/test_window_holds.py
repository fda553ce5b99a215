"""Which hosts a patch window takes, and which it leaves alone because an operator took them out."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from hostmaint.audit import AuditRecord
from hostmaint.models import HostState, Step, StepOutcome
from hostmaint.state import NEVER_SEEN, HostRecord
from hostmaint.window import Held, HostHold, hosts_held, operator_hold, window_held

S = HostState
T0 = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)


def rec(i: int, state: HostState, reason: str, run: str | None, prior: HostState | None) -> HostRecord:
    return HostRecord(host="hv03", state=state, reason=reason, since=T0 + timedelta(minutes=i), run_id=run,
                      prior_state=prior)


def ran(run: str, flow: str, operator: str, step: Step = Step.CORDON) -> AuditRecord:
    return AuditRecord(seq=0, time=T0.isoformat(), run_id=run, flow=flow, trigger=None, operator=operator,
                       cluster="demo", host="hv03", vm=None, step=step, inputs={}, outcome=StepOutcome.OK,
                       duration_s=0.0, details={}, prev_hash="", hash="")


EVACUATED = [rec(0, S.CORDONED, "fan failure", "e1", S.ACTIVE), rec(1, S.DRAINING, "draining", "e1", S.ACTIVE),
             rec(2, S.DRAINED, "drained", "e1", S.ACTIVE)]
INCIDENT = [rec(0, S.CORDONED, "degraded: DIMM errors", "i1", S.ACTIVE),
            rec(1, S.CORDONED, "degraded: DIMM errors", "e2", S.ACTIVE),
            rec(2, S.DRAINING, "draining", "e2", S.ACTIVE), rec(3, S.DRAINED, "drained", "e2", S.ACTIVE),
            rec(4, S.CORDONED, "degraded: DIMM errors", "i1", None)]
INCIDENT_AUDIT = [ran("i1", "degraded-host-runbook", "alertmanager", Step.INCIDENT),
                  ran("e2", "evacuate-host", "bob"), ran("i1", "degraded-host-runbook", "bob", Step.KEEP_CORDONED)]
# alice cordoned it; a patch later found it so and left it cordoned with her reason, under its own run
CORDONED_THEN_PATCHED = [rec(0, S.ACTIVE, "verified", "p0", None), rec(1, S.CORDONED, "fan noisy", "c1", None),
                         rec(2, S.CORDONED, "patch", "p1", S.CORDONED), rec(3, S.DRAINED, "drained", "p1", S.CORDONED),
                         rec(4, S.VERIFYING, "verifying", "p1", S.CORDONED),
                         rec(5, S.CORDONED, "fan noisy", "p1", None)]
PATCH_AUDIT = [ran("p1", "patch-host", "scheduler")]


@pytest.mark.parametrize("history, audit, held, reason, by, since", [
    pytest.param([], [], None, "", "", None, id="never seen: taken"),
    pytest.param([rec(0, S.ACTIVE, "verified", "p0", None)], PATCH_AUDIT, None, "", "", None, id="active: taken"),
    pytest.param(EVACUATED, [ran("e1", "evacuate-host", "alice")], Held.EVACUATED, "fan failure", "alice", 0,
                 id="drained by an evacuation: left alone with the evacuation's reason"),
    pytest.param(EVACUATED[:2], [ran("e1", "evacuate-host", "alice")], Held.EVACUATED, "fan failure", "alice", 0,
                 id="an evacuation that died draining: left alone"),
    pytest.param(EVACUATED, [ran("e1", "evacuate-on-request", "carol")], Held.EVACUATED, "fan failure", "carol", 0,
                 id="an evacuation asked for by request: left alone"),
    pytest.param(INCIDENT[:4], INCIDENT_AUDIT[:2], Held.EVACUATED, "degraded: DIMM errors", "alertmanager", 0,
                 id="an incident runbook that died after its evacuation: left alone"),
    pytest.param(INCIDENT, INCIDENT_AUDIT, Held.CORDONED, "degraded: DIMM errors", "bob", 4,
                 id="an incident's cordon: left alone, named by its approver"),
    pytest.param([rec(0, S.CORDONED, "fan noisy", "c1", None)], [ran("c1", "cli", "alice", Step.OPERATOR_CORDON)],
                 Held.CORDONED, "fan noisy", "alice", 0, id="an operator's cordon: left alone"),
    pytest.param(CORDONED_THEN_PATCHED, [ran("c1", "cli", "alice", Step.OPERATOR_CORDON), *PATCH_AUDIT],
                 Held.CORDONED, "fan noisy", "alice", 1, id="an operator's cordon a patch kept: still alice's"),
    pytest.param([rec(0, S.CORDONED, "patch window w1", "p1", S.ACTIVE), rec(1, S.DRAINED, "drained", "p1", S.ACTIVE)],
                 PATCH_AUDIT, None, "", "", None, id="left drained by this window's patch: taken, goes on"),
    pytest.param([rec(0, S.CORDONED, "patch window w1", "p1", S.ACTIVE),
                  rec(1, S.CORDONED, "maintenance cannot go on, not patched: drain failed", "p1", S.ACTIVE)],
                 PATCH_AUDIT, None, "", "", None, id="kept out by a patch that could not go on: taken"),
    pytest.param([rec(0, S.CORDONED, "patch window w1", "p1", S.ACTIVE), rec(1, S.FAILED, "update failed", "p1",
                                                                              S.ACTIVE)],
                 PATCH_AUDIT, None, "", "", None, id="failed: taken as before (its patch refuses it)"),
    pytest.param([rec(0, S.CORDONED, "fan failure", "e1", S.ACTIVE),
                  rec(1, S.DRAINED, "drained", "e1", S.ACTIVE), rec(2, S.DRAINED, "maintenance resumed", "p9",
                                                                     S.ACTIVE)],
                 [ran("e1", "evacuate-host", "alice"), ran("p9", "patch-host", "scheduler")], Held.EVACUATED,
                 "fan failure", "alice", 0, id="an evacuation a patch took over: still the evacuation's"),
    pytest.param(EVACUATED, [], None, "", "", None, id="no audit of the run that began it: taken as before"),
])
def test_a_window_leaves_alone_the_hosts_an_operator_took_out(history: list[HostRecord], audit: list[AuditRecord],
                                                              held: Held | None, reason: str, by: str,
                                                              since: int | None) -> None:
    record = history[-1] if history else HostRecord("hv03", S.ACTIVE, "never seen", NEVER_SEEN, None, None)

    hold = operator_hold(record, history, audit)

    if held is None:
        assert hold is None
        return
    assert hold is not None
    assert (hold.host, hold.held, hold.reason, hold.by) == ("hv03", held, reason, by)
    assert since is not None and hold.since == history[since].since


def hold(host: str, held: Held, reason: str, by: str) -> HostHold:
    return HostHold(host, held, reason, by, "evacuate-host" if held is Held.EVACUATED else "cli", T0)


def test_the_window_takes_the_rest_in_order_and_says_how_to_include_the_held() -> None:
    holds = {"hv02": hold("hv02", Held.EVACUATED, "fan failure", "alice"), "hv01": None,
             "hv04": hold("hv04", Held.CORDONED, "incident: DIMM errors", "bob")}

    taken, held = hosts_held(["hv04", "hv01", "hv03", "hv02"], holds)

    assert taken == ["hv01", "hv03"]
    assert [h.host for h in held] == ["hv04", "hv02"]
    assert "evacuated by alice" in held[1].detail() and "fan failure" in held[1].detail()
    assert "hostmaint host return hv02" in held[1].detail()
    assert "hostmaint host uncordon hv04" in held[0].detail()
    summary = window_held("w1", "demo", held, started=[])
    assert summary.startswith("window w1 started no host: 2 host(s) of demo left alone")
    assert "hv02 (evacuated by alice: fan failure)" in summary and "incident: DIMM errors" in summary


def test_hosts_left_in_maintenance_come_first_each_group_in_its_order() -> None:
    from hostmaint.window import unfinished_first

    def at(host: str, state: HostState, prior: HostState | None) -> HostRecord:
        return HostRecord(host=host, state=state, reason="", since=T0, run_id=None, prior_state=prior)

    records = {"hv01": at("hv01", S.ACTIVE, None), "hv02": at("hv02", S.CORDONED, S.ACTIVE),
               "hv03": at("hv03", S.CORDONED, None), "hv04": at("hv04", S.PATCHING, S.ACTIVE),
               "hv05": at("hv05", S.FAILED, S.ACTIVE)}
    # hv03 is an operator's cordon (no maintenance open), hv05 needs an operator: neither is resumed first
    assert unfinished_first(["hv01", "hv02", "hv03", "hv04", "hv05"], records) == [
        "hv02", "hv04", "hv01", "hv03", "hv05"]


@pytest.mark.parametrize("state_reason, held, expected", [
    pytest.param("drained", hold("hv03", Held.EVACUATED, "replace the DIMM", "alice"),
                 "replace the DIMM (evacuated by alice, evacuate-host)", id="drained: the evacuation's words, by whom"),
    pytest.param("draining", hold("hv03", Held.EVACUATED, "replace the DIMM", "alice"),
                 "replace the DIMM (evacuated by alice, evacuate-host)", id="draining: the same"),
    pytest.param("replace the DIMM", hold("hv03", Held.EVACUATED, "replace the DIMM", "alice"),
                 "replace the DIMM (evacuated by alice, evacuate-host)", id="cordoned by it: said once"),
    pytest.param("drain failed: vm3 still on it", hold("hv03", Held.EVACUATED, "replace the DIMM", "alice"),
                 "replace the DIMM (evacuated by alice, evacuate-host); drain failed: vm3 still on it",
                 id="a drain that failed: why it is out, then what holds it"),
    pytest.param("fan noisy", hold("hv03", Held.CORDONED, "fan noisy", "alice"), "fan noisy",
                 id="an operator's cordon: its reason already is theirs"),
    pytest.param("update failed", None, "update failed", id="no hold: the state's reason"),
])
def test_host_status_says_why_an_evacuated_host_is_out_and_who_asked(
        state_reason: str, held: HostHold | None, expected: str) -> None:
    from hostmaint.window import status_reason

    assert status_reason(state_reason, held) == expected
