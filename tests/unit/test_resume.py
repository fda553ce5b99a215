"""What a patch run has left to do, decided from the host's recorded state and audit (hostmaint/resume.py).

Each row is one way a run finds a host; together they cover every state and the audit histories that
change the answer. The steps are written out here, not derived from the module's table.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from hostmaint.audit import GENESIS_HASH, AuditEntry, AuditRecord, AuditTrail
from hostmaint.db import audit_table
from hostmaint.models import Cell, Step, StepOutcome
from hostmaint.models import HostState as S
from hostmaint.resume import RUNBOOK, cells_before_reboot, drain_due, issued_boot_id, remaining_steps
from hostmaint.state import HostRecord
from tests.unit.conftest import T0, FakeClock

P = Step
SINCE = T0 + timedelta(hours=1)  # when the host entered the state it is in
TAIL = [P.VERIFY, P.START_VM, P.UNCORDON, P.RETURN_VMS]
FRESH = [P.PRECHECK, P.GATE, P.SILENCE, P.CORDON, P.DISCOVER, P.DRAIN, P.CONFIRM_EMPTY, P.UPDATE, P.REBOOT, *TAIL]


def rec(step: Step | str, at: datetime, outcome: StepOutcome = StepOutcome.OK, **details: Any) -> AuditRecord:
    return AuditRecord(seq=0, time=at.isoformat(), run_id="earlier", flow="patch-host", trigger=None, operator="",
                       cluster="demo", host="hv01", vm=None, step=step, inputs={}, outcome=outcome,
                       duration_s=0.0, details=details, prev_hash="", hash="")


def host(state: S) -> HostRecord:
    return HostRecord(host="hv01", state=state, reason="test", since=SINCE, run_id="earlier",
                      prior_state=S.ACTIVE)


ISSUED = rec(P.REBOOT_ISSUED, SINCE + timedelta(seconds=5), boot_id_before="boot-1")
ISSUED_BEFORE = rec(P.REBOOT_ISSUED, SINCE - timedelta(days=3), boot_id_before="boot-0")  # an earlier maintenance
ISSUE_FAILED = rec(P.REBOOT_ISSUED, SINCE + timedelta(seconds=5), StepOutcome.FAILED)
ISSUED_OLD_NAME = rec("reboot-issued", SINCE + timedelta(seconds=5), boot_id_before="boot-1")  # as read before

# (state, the host's audit trail, the steps left) - the rows name today's resume branches
ROWS: list[tuple[str, S, list[AuditRecord], list[Step]]] = [
    ("in service: the whole runbook", S.ACTIVE, [], FRESH),
    ("an operator's cordon: the whole runbook", S.CORDONED, [], FRESH),
    ("held by a reboot gate earlier (cordoned): the whole runbook again", S.CORDONED,
     [rec(P.UPDATE, SINCE - timedelta(minutes=5)), rec(P.KEEP_CORDONED, SINCE)], FRESH),
    ("died mid-drain: silence adopted, cordon takes over, the drain goes on", S.DRAINING, [],
     [P.SILENCE, P.CORDON, P.DISCOVER, P.DRAIN, P.CONFIRM_EMPTY, P.UPDATE, P.REBOOT, *TAIL]),
    ("evacuated, or died after the drain: no cordon, a drain of what is left", S.DRAINED, [],
     [P.SILENCE, P.DISCOVER, P.DRAIN, P.CONFIRM_EMPTY, P.UPDATE, P.REBOOT, *TAIL]),
    ("died during the update: the update again (a lost outcome is read back)", S.PATCHING,
     [rec(P.UPDATE_STARTED, SINCE), rec(P.UPDATE, SINCE, StepOutcome.UNKNOWN)],
     [P.SILENCE, P.DISCOVER, P.DRAIN, P.CONFIRM_EMPTY, P.UPDATE, P.REBOOT, *TAIL]),
    ("died while rebooting: the issued reboot is proven", S.REBOOTING, [ISSUED],
     [P.SILENCE, P.DISCOVER, P.PROVE_REBOOT, P.REBOOT, *TAIL]),
    ("rebooting, issued by the names old trails hold", S.REBOOTING, [ISSUED_OLD_NAME],
     [P.SILENCE, P.DISCOVER, P.PROVE_REBOOT, P.REBOOT, *TAIL]),
    ("rebooting, never issued: rebooted as a fresh run does", S.REBOOTING, [],
     [P.SILENCE, P.DISCOVER, P.REBOOT, *TAIL]),
    ("rebooting, issued only in an earlier maintenance: never issued in this one", S.REBOOTING, [ISSUED_BEFORE],
     [P.SILENCE, P.DISCOVER, P.REBOOT, *TAIL]),
    ("rebooting, the record of the issue failed: never issued", S.REBOOTING, [ISSUE_FAILED],
     [P.SILENCE, P.DISCOVER, P.REBOOT, *TAIL]),
    ("died after the reboot: verified", S.VERIFYING, [ISSUED, rec(P.REBOOT, SINCE)],
     [P.SILENCE, P.DISCOVER, *TAIL]),
    ("failed: refused at the cordon until an operator resets it", S.FAILED, [],
     [P.SILENCE, P.CORDON, P.DISCOVER, P.DRAIN, P.CONFIRM_EMPTY, P.UPDATE, P.REBOOT, *TAIL]),
]


def test_the_rows_cover_every_state() -> None:
    assert {state for _, state, _, _ in ROWS} == set(S)
    assert list(RUNBOOK) == FRESH


@pytest.mark.parametrize(("state", "audit", "left"), [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_remaining_steps(state: S, audit: list[AuditRecord], left: list[Step]) -> None:
    steps = remaining_steps(host(state), audit)
    assert list(steps) == left
    assert all(type(s) is Step for s in steps)
    # whatever is left comes in runbook order, ends with the return, and a reboot is never left out
    assert [s for s in steps if s in RUNBOOK] == [s for s in RUNBOOK if s in steps]
    assert steps[-1] is P.RETURN_VMS and (P.REBOOT in steps) == (state is not S.VERIFYING)


def test_the_boot_id_of_the_last_reboot_issued_in_this_state() -> None:
    again = rec(P.REBOOT_ISSUED, SINCE + timedelta(minutes=9), boot_id_before="boot-2")
    assert issued_boot_id(host(S.REBOOTING), [ISSUED_BEFORE, ISSUED, again]) == "boot-2"
    assert issued_boot_id(host(S.REBOOTING), [ISSUED_BEFORE, ISSUE_FAILED]) is None
    assert issued_boot_id(host(S.REBOOTING), [ISSUED_OLD_NAME]) == "boot-1"


def test_the_cells_recorded_before_the_last_reboot_of_this_maintenance() -> None:
    def cells(mib: int) -> list[dict[str, Any]]:
        return [{"id": 0, "memory_mib": mib, "free_mib": mib // 2, "cpus": [0, 1], "hugepages": []}]

    cordon = rec(P.CORDON, SINCE)
    first = rec(P.REBOOT_ISSUED, SINCE + timedelta(minutes=1), boot_id_before="b1", cells_before=cells(1024))
    again = rec(P.REBOOT_ISSUED, SINCE + timedelta(minutes=9), boot_id_before="b2", cells_before=cells(2048))
    assert cells_before_reboot([cordon, first, again]) == (Cell(id=0, memory_mib=2048, free_mib=1024, cpus=(0, 1)),)
    assert cells_before_reboot([cordon, first, ISSUE_FAILED]) == cells_before_reboot([cordon, first])
    # an earlier maintenance's reboot says nothing of this one's; nor does a record made before cells were kept
    assert cells_before_reboot([first, rec(P.CORDON, SINCE + timedelta(hours=2))]) is None
    assert cells_before_reboot([cordon, ISSUED]) is None


@pytest.mark.parametrize(("state", "vms_on_host", "due"), [
    (S.CORDONED, False, True),  # a fresh drain moves the host to drained, even with nothing on it
    (S.CORDONED, True, True),
    (S.DRAINING, False, True),  # a drain that died half way goes on
    (S.DRAINED, False, False),  # drained and empty: not drained again
    (S.DRAINED, True, True),  # a VM left on it (its shutdown never ran) or started since
    (S.PATCHING, False, False),  # died during the update: nothing to move
    (S.PATCHING, True, True),  # a tenant's VM started since the run died (chaos round 337982517)
])
def test_a_drain_is_due_unless_the_host_is_drained_and_empty(state: S, vms_on_host: bool, due: bool) -> None:
    assert drain_due(state, vms_on_host) is due


# The step names trails hold, as the code wrote them before they were members: each stays a member's value.
OLD_NAMES = ["approval", "cancel", "confirm-empty", "cordon", "drain", "gate", "hook", "incident", "keep-cordoned",
             "migrate", "migration-found", "migration-resolved", "moves-started", "operator-cordon",
             "operator-uncordon", "plan", "precheck", "preflight", "rebalance", "reboot", "reboot-decision",
             "reboot-issued", "replan", "reset", "return-vms", "shut-off-vms", "shutdown-vm", "silence",
             "silence-end", "start-vm", "uncordon", "update", "update-recovered", "update-started", "verify",
             "vm-not-found"]


def test_every_step_name_old_trails_hold_is_a_member() -> None:
    assert [Step(name).value for name in OLD_NAMES] == OLD_NAMES


def _old_row(seq: int, prev: str, step: str, at: datetime, **details: Any) -> dict[str, Any]:
    """A row as the code before the step enum stored it, hashed here by hand (sha256 of the canonical JSON)."""
    fields: dict[str, Any] = dict(seq=seq, time=at.isoformat(), run_id="old-run", flow="patch-host", trigger="cli",
                                  operator="alice", cluster="demo", host="hv01", vm=None, step=step, inputs={},
                                  outcome="ok", duration_s=0.0, details={"simulated": False, **details},
                                  prev_hash=prev)
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    fields["hash"] = hashlib.sha256(text.encode()).hexdigest()
    return fields


def test_an_audit_written_by_the_old_names_still_verifies_and_resumes(engine: sa.Engine) -> None:
    start = datetime(2026, 11, 20, 9, 0, tzinfo=UTC)
    rows = []
    prev = GENESIS_HASH
    for i, (step, details) in enumerate([("cordon", {}), ("drain", {}), ("update", {}),
                                         ("reboot-issued", {"boot_id_before": "boot-1"}),
                                         ("a-step-since-retired", {})], start=1):
        row = _old_row(i, prev, step, start + timedelta(minutes=i), **details)
        rows.append(row)
        prev = row["hash"]
    with engine.begin() as conn:
        for row in rows:
            conn.execute(sa.insert(audit_table).values(**{**row, "inputs": json.dumps(row["inputs"]),
                                                          "details": json.dumps(row["details"])}))
    trail = AuditTrail(engine, clock=FakeClock())

    assert trail.verify().ok
    records = trail.records(host="hv01")
    assert [r.step for r in records][:4] == [P.CORDON, P.DRAIN, P.UPDATE, P.REBOOT_ISSUED]
    assert records[3].step is P.REBOOT_ISSUED  # a member, matched as one
    assert records[4].step == "a-step-since-retired"  # a name this version does not know stays its text
    rebooting = HostRecord(host="hv01", state=S.REBOOTING, reason="rebooting", since=start + timedelta(minutes=3),
                           run_id="old-run", prior_state=S.ACTIVE)
    assert remaining_steps(rebooting, records) == (P.SILENCE, P.DISCOVER, P.PROVE_REBOOT, P.REBOOT, *TAIL)
    # a record appended now, with a member, lands in the same chain and stores the same text
    trail.append(AuditEntry(step=P.REBOOT, host="hv01"))
    assert trail.verify().ok
    with engine.connect() as conn:
        assert conn.execute(sa.select(audit_table.c.step).where(audit_table.c.seq == 6)).scalar_one() == "reboot"
