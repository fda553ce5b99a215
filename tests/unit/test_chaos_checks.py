"""The fault campaign's judgement of a host's reason (hostmaint/lab/chaos.py, check_reasons), without a lab:
libvirt's view, the hosts' reboot logs and rpm databases are stubbed; the rules are the real ones."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from hostmaint.lab import chaos
from hostmaint.lab.chaos import Facts, FaultSpec, check_reasons, make_scenario


class Lab:
    """What the checks read from outside: where VMs run, reboots, packages."""

    def __init__(self, running: dict[str, list[str]]) -> None:
        self.running_vms = running
        self.first_seen: dict[str, float] = {}
        self.reboot_log: dict[str, list[dict[str, object]]] = {h: [] for h in chaos.HOSTS}
        self.packages: dict[str, set[str]] = {h: {"kernel-lab-6.1.0-1.lab"} for h in chaos.HOSTS}

    def running(self) -> dict[str, list[str]]:
        return self.running_vms


class Campaign:
    def __init__(self, lab: Lab) -> None:
        self.watcher = lab
        self.workdir = Path("/nonexistent")


@pytest.fixture
def lab(monkeypatch: pytest.MonkeyPatch) -> Lab:
    lab = Lab({"vm01": ["hv01"], "vm02": ["hv02"], "vm05": ["hv03"]})
    monkeypatch.setattr(chaos.faults, "reboots", lambda _w, h: lab.reboot_log[h])
    monkeypatch.setattr(chaos.faults, "installed_packages", lambda _w, h: set(lab.packages[h]))
    return lab


def states(**hosts: tuple[str, str]) -> dict[str, dict[str, Any]]:
    out = {h: {"state": "active", "reason": "maintenance finished: verified"} for h in chaos.HOSTS}
    out.update({h: {"state": s, "reason": r} for h, (s, r) in hosts.items()})
    return out


def facts(lab: Lab, *injected: FaultSpec, added: tuple[str, ...] = ()) -> Facts:
    return Facts(injected=list(injected), reboots_before={h: len(lab.reboot_log[h]) for h in chaos.HOSTS},
                 packages_before={h: set(lab.packages[h]) for h in chaos.HOSTS}, added=list(added),
                 at_start=states())


def judge(lab: Lab, f: Facts, st: dict[str, dict[str, Any]]) -> list[str]:
    return check_reasons(Campaign(lab), f, "now", st)  # type: ignore[arg-type]


def test_a_failed_drain_must_name_a_vm_that_is_still_on_the_host(lab: Lab) -> None:
    f = facts(lab)
    assert judge(lab, f, states(hv03=("cordoned", "drain failed: vm05 still on it"))) == []
    [bare] = judge(lab, f, states(hv03=("cordoned", "drain failed")))
    assert "names none of them" in bare and "vm05" in bare
    [stale] = judge(lab, f, states(hv03=("cordoned", "drain failed: vm05, vm01 still on it")))
    assert "vm01 does not run on it" in stale


def test_vms_named_away_must_run_where_the_reason_says(lab: Lab) -> None:
    f = facts(lab)
    fine = "maintenance cannot go on, not patched: no safe plan; its VMs away: vm02 (on hv02)"
    assert judge(lab, f, states(hv01=("cordoned", fine))) == []
    [wrong] = judge(lab, f, states(hv01=("cordoned", fine.replace("(on hv02)", "(on hv03)"))))
    assert "vm02 does not run on hv03" in wrong


def test_a_tenants_vm_on_a_cordoned_host_is_named(lab: Lab) -> None:
    lab.running_vms["cxv001"] = ["hv01"]
    f = facts(lab, FaultSpec("vm-started", "hv01", "planned", 0, 0), added=("cxv001",))
    named = "not drained: cxv001 started on it during the drain; run again to move it off"
    assert judge(lab, f, states(hv01=("cordoned", named))) == []
    [unnamed] = judge(lab, f, states(hv01=("cordoned", "draining")))
    assert "cxv001" in unnamed


def test_a_tenants_vm_started_after_the_reason_was_written_need_not_be_named(lab: Lab) -> None:
    # round 67616514: the drain failed and wrote its reason; the tenant's VM came up a moment later
    lab.running_vms["cxv003"] = ["hv02"]
    lab.first_seen["cxv003"] = 1000.5
    f = facts(lab, FaultSpec("vm-started", "hv02", "migrating", 0, 0), added=("cxv003",))
    st = states(hv02=("cordoned", "drain failed: vm05 still on it"))
    lab.running_vms["vm05"] = ["hv02"]
    st["hv02"]["since"] = datetime.fromtimestamp(1000.0, UTC).isoformat()
    assert judge(lab, f, st) == []
    st["hv02"]["since"] = datetime.fromtimestamp(1001.0, UTC).isoformat()  # written after it ran: named
    [unnamed] = judge(lab, f, st)
    assert "cxv003" in unnamed


def test_a_reboot_that_did_not_happen_must_be_the_failed_hosts_reason(lab: Lab) -> None:
    f = facts(lab, FaultSpec("reboot-skipped", "hv02", "start", 0, 0))
    lab.packages["hv02"].add("kernel-lab-6.1.0-2.lab")  # the update ran; no reboot was logged
    true = "reboot failed: hv02: host did not reboot: boot id still e914 after 15s"
    assert judge(lab, f, states(hv02=("failed", true))) == []
    [false] = judge(lab, f, states(hv02=("failed", "patch failed: hv02: verify: kernel mismatch")))
    assert "after reboot-skipped" in false


def test_a_host_that_did_not_come_back_says_so_unless_another_fault_may_have_failed_it(lab: Lab) -> None:
    f = facts(lab, FaultSpec("reboot-never", "hv03", "start", 0, 0))
    lab.reboot_log["hv03"].append({"guests_killed": []})  # its power cut was logged
    assert judge(lab, f, states(hv03=("failed", "reboot failed: host went down after 4.7s and did not come "
                                                "back within 15s"))) == []
    assert judge(lab, f, states(hv03=("failed", "patch failed: something else")))
    both = facts(lab, FaultSpec("reboot-never", "hv03", "start", 0, 0), FaultSpec("ssh-drop", "hv03", "ssh", 0, 0))
    lab.reboot_log["hv03"].append({"guests_killed": []})
    assert judge(lab, both, states(hv03=("failed", "patch failed: connection lost"))) == []


def test_rounds_replay_exactly_and_draw_more_faults_when_asked() -> None:
    assert make_scenario(1288) == make_scenario(1288)
    many = [len(make_scenario(seed, most=7).faults) for seed in range(1, 200)]
    few = [len(make_scenario(seed).faults) for seed in range(1, 200)]
    assert max(few) <= 3 and max(many) > 4 and sum(many) > sum(few)
    kinds = [f.kind for seed in range(1, 400) for f in make_scenario(seed, most=7).faults]
    assert set(kinds) == set(chaos.FAULT_CLASSES)  # every class is drawn
    for seed in range(1, 400):
        s = make_scenario(seed, most=7)
        assert sum(f.kind in chaos.ENDS_RUN for f in s.faults) <= 1
        assert {f.kind for f in s.faults} <= chaos.COMPATIBLE[s.op]


def _record(vm: str, src: str, dst: str, outcome: str, at: float) -> dict[str, Any]:
    from datetime import UTC, datetime

    return {"vm": vm, "host": src, "inputs": {"target": dst}, "outcome": outcome, "step": "migrate",
            "time": datetime.fromtimestamp(at, UTC).isoformat()}


def test_a_failed_attempt_that_never_landed_is_no_finding_when_a_later_one_moved_the_vm() -> None:
    # round 642953836: the first drain's migration failed (the target was full) and the VM stayed; a
    # re-run moved it. The failed record is true; the campaign called it a move recorded failed.
    records = [_record("vm03", "hv03", "hv02", "failed", 1000.0), _record("vm03", "hv03", "hv02", "ok", 1014.0)]
    assert chaos.check_moves_recorded([(1013.6, "vm03", "hv03", "hv02")], records) == ([], [])


def test_a_move_whose_own_attempt_is_recorded_failed_is_a_finding() -> None:
    # round 174666304: the VM landed during the first drain, that drain recorded the migration failed,
    # and only the next run's found-move record says it moved
    records = [_record("vm05", "hv02", "hv01", "failed", 1002.0), _record("vm05", "hv02", "hv01", "ok", 1030.0)]
    violations, findings = chaos.check_moves_recorded([(1001.2, "vm05", "hv02", "hv01")], records)
    assert violations == [] and findings and "vm05 moved hv02 -> hv01" in findings[0]
    violations, _ = chaos.check_moves_recorded([(1001.2, "vm05", "hv02", "hv01")], records[:1])
    assert violations == ["audit: vm05 moved hv02 -> hv01 with no successful record of it"]


def test_an_evacuation_whose_host_got_a_tenants_vm_after_it_ended_is_run_again(lab: Lab) -> None:
    # round 411835775: the evacuation ended with hv02 drained; the tenant's VM came up after it
    import threading

    lab.running_vms["cxv012"] = ["hv02"]
    lab.first_seen["cxv012"] = 1005.0
    lab.lock = threading.Lock()  # type: ignore[attr-defined]
    campaign = Campaign(lab)
    assert chaos.late_tenants(campaign, ["evacuate", "hv02"], ["cxv012"], 1000.0) == ["cxv012"]  # type: ignore[arg-type]
    assert chaos.late_tenants(campaign, ["evacuate", "hv02"], ["cxv012"], 1010.0) == []  # type: ignore[arg-type]
    assert chaos.late_tenants(campaign, ["patch", "hv02"], ["cxv012"], 1000.0) == []  # type: ignore[arg-type]


def test_a_tenants_vm_started_after_the_evacuations_last_look_is_run_again_not_a_false_success(lab: Lab) -> None:
    # round 175911973: confirm-empty at 59.8 found hv01 empty; the tenant's start returned at 60.2, the
    # watcher saw it at 60.3, the run ended at 60.8. Not the run's miss: the evacuation runs again
    import threading

    lab.running_vms["cxv011"] = ["hv01"]
    lab.first_seen["cxv011"] = 60.3
    lab.lock = threading.Lock()  # type: ignore[attr-defined]
    campaign = Campaign(lab)
    records = [{"step": "confirm-empty", "host": "hv01", "outcome": "ok", "time": "1970-01-01T00:00:59.800+00:00"},
               {"step": "confirm-empty", "host": "hv02", "outcome": "ok", "time": "1970-01-01T00:01:30+00:00"},
               {"step": "confirm-empty", "host": "hv01", "outcome": "failed", "time": "1970-01-01T00:01:40+00:00"}]
    look = chaos.last_look(records, "hv01")
    assert look == 59.8
    args = ["evacuate", "hv01"]
    assert chaos.late_tenants(campaign, args, ["cxv011"], 60.8, {"cxv011": 60.2}, look) == ["cxv011"]  # type: ignore[arg-type]
    # started before the last look: the run should have seen it, so no excuse (a false success stays one)
    assert chaos.late_tenants(campaign, args, ["cxv011"], 60.8, {"cxv011": 59.5}, look) == []  # type: ignore[arg-type]
    assert chaos.late_tenants(campaign, args, ["cxv011"], 60.8, {"cxv011": 60.2}, None) == []  # type: ignore[arg-type]


def test_a_changed_host_key_need_not_be_the_reason_when_another_fault_of_the_host_is(lab: Lab) -> None:
    # round 1272006114: the host key changed while the open connection ran dnf into a broken repository
    f = facts(lab, FaultSpec("host-key-changed", "hv03", "migrating", 0, 0),
              FaultSpec("repo-broken", "hv03", "migrating", 0, 0), FaultSpec("disk-full", "hv03", "start", 0, 0))
    repo = "patch failed: hv03: repositories not reachable: Failed to download metadata for repo 'hostmaint-lab'"
    assert judge(lab, f, states(hv03=("failed", repo))) == []
    [wrong] = judge(lab, f, states(hv03=("failed", "patch failed: something else")))
    assert "host-key-changed" in wrong
    alone = facts(lab, FaultSpec("host-key-changed", "hv03", "migrating", 0, 0))
    assert judge(lab, alone, states(hv03=("failed", repo)))  # with no broken repo injected, it must say so


def test_a_guest_its_tenant_destroyed_must_not_be_called_lost_by_any_record() -> None:
    true = [{"step": "vm-stopped-outside", "outcome": "ok", "vm": "vm03", "details": {"reason": "destroyed"}},
            {"step": "migrate", "outcome": "skipped", "vm": "vm03",
             "details": {"error": "stopped outside hostmaint before its migration: shut off on hv01 (destroyed)"}}]
    assert chaos.check_not_called_lost({"vm03": "hv01"}, true) == []
    lost = {"step": "invariants", "outcome": "failed", "vm": None,
            "details": {"error": "invariant broken: vm03 runs 0 times (nowhere)"}}
    [problem] = chaos.check_not_called_lost({"vm03": "hv01"}, [*true, lost])
    assert "vm03, destroyed by its tenant on hv01, is called lost by a invariants record (failed)" in problem
    assert chaos.check_not_called_lost({"vm04": "hv01"}, [lost]) == []  # another guest's loss is not this check's
    # a run that failed on it without a record (as before the invariant check recorded its breaches)
    [said] = chaos.check_not_called_lost({"vm03": "hv01"}, true, ["failed: invariant broken: vm03 runs 0 times"])
    assert said == "run: vm03, destroyed by its tenant on hv01, is called lost in a run's output"


def test_a_copy_appearing_on_a_host_after_the_operator_cordoned_it_is_a_violation() -> None:
    cordoned = {"hv03": [100.0, 200.0]}
    appeared = [(99.0, "vm01", "hv03"),  # before the cordon
                (100.5, "vm02", "hv03"),  # a migration started as the cordon committed
                (150.0, "cxv001", "hv03"),  # a tenant's own guest
                (150.0, "vm04", "hv02"),  # another host
                (250.0, "vm05", "hv03")]  # after the uncordon
    assert chaos.check_nothing_placed_on_cordoned(cordoned, appeared, ["cxv001"]) == []
    [problem] = chaos.check_nothing_placed_on_cordoned(cordoned, [*appeared, (130.0, "vm03", "hv03")], ["cxv001"])
    assert problem == "placement: vm03 appeared on hv03 30.0 s after the operator cordoned it"


def test_a_host_whose_guest_another_hosts_run_took_home_did_not_leave_service(
        lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    """Seen (patch-pair round 721510573): hv02's patch brought vm05 home from hv03; hv03's own patch was
    refused by N+1 before anything moved and it stayed active. The move off hv03 was hv02's run's."""
    scenario = chaos.Scenario(round_seed=1, op="patch-pair", hosts=("hv02", "hv03"), faults=())
    placed = {"vm01": ["hv01"], "vm02": ["hv02"], "vm05": ["hv03"]}
    lab.running_vms = {"vm01": ["hv01"], "vm02": ["hv02"], "vm05": ["hv02"]}  # vm05 went home to hv02
    now = states(hv03=("active", "maintenance not started, nothing moved: N+1 refused"))
    before = states()
    monkeypatch.setattr(chaos.faults, "running_kernel", lambda _w, _h: "6.1.0-1.lab.x86_64")  # not patched
    records = [{"run_id": "r2", "step": "cordon", "host": "hv02", "vm": None, "outcome": "ok"},
               {"run_id": "r2", "step": "migrate", "host": "hv03", "vm": "vm05", "outcome": "ok"},
               {"run_id": "r3", "step": "cordon", "host": "hv03", "vm": None, "outcome": "ok"}]
    check = chaos.check_states
    assert check(Campaign(lab), scenario, "6.1.0-2.lab.x86_64", "now", now, before, placed,  # type: ignore[arg-type]
                 records) == []
    # the same move made by hv03's own run (it cordoned hv03): hv03 left service and was never verified
    own = [{**r, "run_id": "r3"} if r["step"] == "migrate" else r for r in records]
    [problem] = check(Campaign(lab), scenario, "6.1.0-2.lab.x86_64", "now", now, before, placed,  # type: ignore[arg-type]
                      own)
    assert "hv03 is active" in problem and "left service (['vm05'] moved off)" in problem
