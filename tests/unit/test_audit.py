"""The hash-chained audit trail: chaining, tamper detection, redaction, concurrent writers, export."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import subprocess
import sys
import threading
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from hostmaint import audit, redaction
from hostmaint.audit import AuditEntry, AuditRecord, AuditTrail, redact
from hostmaint.db import open_engine
from hostmaint.errors import AuditError
from hostmaint.models import MigrationResult, Step, StepOutcome, Trigger
from tests import pg
from tests.unit.conftest import T0, FakeClock

REPO = Path(__file__).resolve().parents[2]
ZEROS = "0" * 64
STEPS = ("cordon", "drain", "update", "reboot", "verify", "uncordon")


@pytest.fixture
def trail(engine: sa.Engine) -> AuditTrail:
    return AuditTrail(engine, clock=FakeClock())


def entry(i: int, **over: object) -> AuditEntry:
    """The i-th step of a plausible run: host hv01..hv05, steps in runbook order."""
    fields: dict[str, object] = dict(
        run_id=f"run-{i // 10}", flow="patch_host", trigger=Trigger.SCHEDULE, operator="alice",
        cluster="lab", host=f"hv{i % 5 + 1:02d}", vm=f"vm{i}" if i % 3 == 0 else None,
        step=STEPS[i % len(STEPS)],
        inputs={"dry_run": False, "n": i}, outcome=StepOutcome.OK, duration_s=i / 10,
        details={"migrated": [f"vm{i}"], "bytes": i * 1024})
    fields.update(over)
    return AuditEntry(**fields)  # type: ignore[arg-type]


def fill(trail: AuditTrail, n: int) -> list[AuditRecord]:
    return [trail.append(entry(i)) for i in range(n)]


def sql(engine: sa.Engine, statement: str, **params: object) -> None:
    """Raw SQL, as someone with write access to the database file would tamper with it."""
    with engine.begin() as conn:
        conn.execute(sa.text(statement), params)


def expected_hash(rec: AuditRecord) -> str:
    """The hash as docs/audit.md defines it, computed here without hostmaint's helpers."""
    body = {
        "seq": rec.seq, "time": rec.time, "run_id": rec.run_id, "flow": rec.flow,
        "trigger": rec.trigger.value if rec.trigger else None, "operator": rec.operator,
        "cluster": rec.cluster, "host": rec.host, "vm": rec.vm, "step": rec.step, "inputs": rec.inputs,
        "outcome": rec.outcome.value, "duration_s": rec.duration_s, "details": rec.details,
        "prev_hash": rec.prev_hash,
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# --- the chain ------------------------------------------------------------------------


def test_chain_of_fifty_records_verifies(trail: AuditTrail) -> None:
    appended = fill(trail, 50)
    stored = trail.records()
    assert stored == appended
    assert [r.seq for r in stored] == list(range(1, 51))
    assert stored[0].prev_hash == ZEROS
    for before, after in zip(stored, stored[1:], strict=False):
        assert after.prev_hash == before.hash
    for rec in stored:
        assert rec.hash == expected_hash(rec)
    report = trail.verify()
    assert (report.ok, report.count, report.first_bad_seq) == (True, 50, None)
    assert report.last_hash == stored[-1].hash


def test_empty_trail_verifies(trail: AuditTrail) -> None:
    report = trail.verify()
    assert (report.ok, report.count, report.first_bad_seq) == (True, 0, None)


def test_record_holds_the_entry_with_utc_time_from_the_clock(trail: AuditTrail) -> None:
    result = MigrationResult(vm="web1", source="hv02", target="hv03", outcome=StepOutcome.FAILED, error="timeout")
    rec = trail.append(AuditEntry(run_id="r1", flow="evacuate_host", trigger=Trigger.UI, operator="bob",
                                  cluster="lab", host="hv02", vm="web1", step="migrate",
                                  inputs={"target": "hv03"}, outcome=StepOutcome.FAILED, duration_s=12.5,
                                  details={"result": result}))
    assert rec.time == (T0 + timedelta(seconds=1)).isoformat()
    assert rec.time.endswith("+00:00")
    assert (rec.trigger, rec.outcome, rec.duration_s) == (Trigger.UI, StepOutcome.FAILED, 12.5)
    assert rec.details["result"]["error"] == "timeout"  # a model is stored as its JSON
    assert trail.records() == [rec]


def test_defaults_are_enough_for_a_record(trail: AuditTrail) -> None:
    rec = trail.append(AuditEntry(step="plan"))
    assert (rec.run_id, rec.trigger, rec.inputs, rec.details) == (None, None, {}, {})
    assert rec.outcome == StepOutcome.OK
    assert trail.verify().ok


def test_records_filter_by_host_run_and_limit(trail: AuditTrail) -> None:
    fill(trail, 30)
    hv02 = trail.records(host="hv02")
    assert hv02 and {r.host for r in hv02} == {"hv02"}
    assert [r.seq for r in hv02] == sorted(r.seq for r in hv02)
    assert {r.run_id for r in trail.records(run_id="run-1")} == {"run-1"}
    assert len(trail.records(run_id="run-1")) == 10
    assert [r.seq for r in trail.records(limit=3)] == [28, 29, 30]  # the most recent, oldest first
    assert [r.seq for r in trail.records(host="hv01", limit=2)] == [21, 26]


def test_records_filter_by_cluster_and_steps_in_the_database(trail: AuditTrail) -> None:
    fill(trail, 30)
    trail.append(entry(30, cluster="other", step="drain"))
    drains = trail.records(cluster="lab", steps=(Step.DRAIN, Step.VERIFY))
    assert drains and {r.step for r in drains} == {Step.DRAIN, Step.VERIFY}
    assert {r.cluster for r in drains} == {"lab"}
    assert [r.seq for r in drains] == [r.seq for r in trail.records() if r.cluster == "lab"
                                       and r.step in (Step.DRAIN, Step.VERIFY)]
    assert [r.seq for r in trail.records(cluster="other")] == [31]
    assert trail.records(host="hv01", steps=(Step.UPDATE,)) == [
        r for r in trail.records(host="hv01") if r.step == Step.UPDATE]
    assert trail.records(steps=()) == []


AUDIT_INDEX = "ix_hostmaint_audit_cluster_step"


def audit_indexes(engine: sa.Engine) -> set[str]:
    with engine.connect() as conn:
        return {ix["name"] for ix in sa.inspect(conn).get_indexes("hostmaint_audit")}


def test_a_database_made_before_the_index_gets_it_when_opened(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = open_engine(url)
    fill(AuditTrail(engine), 5)
    sql(engine, f"DROP INDEX {AUDIT_INDEX}")  # as a database from before the index reads
    assert AUDIT_INDEX not in audit_indexes(engine)
    engine.dispose()
    engine = open_engine(url)
    try:
        assert AUDIT_INDEX in audit_indexes(engine)
        assert AuditTrail(engine).verify().count == 5
    finally:
        engine.dispose()


# --- tampering ---------------------------------------------------------------------------


@pytest.mark.parametrize(("column", "value"), [
    ("host", "hv99"),
    ("outcome", "failed"),
    ("outcome", "not-an-outcome"),
    ("operator", "mallory"),
    ("duration_s", 0.5),
    ("time", "2026-11-26T09:00:00+00:00"),
    ("inputs", '{"dry_run":true,"n":6}'),
    ("details", "not json at all"),
    ("prev_hash", "f" * 64),
    ("hash", "0" * 64),
])
def test_edited_field_is_detected_and_named(engine: sa.Engine, trail: AuditTrail, column: str,
                                            value: object) -> None:
    fill(trail, 12)
    original = trail.records()[6]
    sql(engine, f"UPDATE hostmaint_audit SET {column} = :v WHERE seq = 7", v=value)
    report = trail.verify()
    assert not report.ok
    assert report.first_bad_seq == 7
    assert report.count == 6  # records 1..6 still verify
    host = "hv99" if column == "host" else original.host
    assert report.problem == (f"record 7 ({original.step} {host}) was altered:"
                              " its hash does not match its content")


def test_problem_names_step_and_host_like_the_brief(engine: sa.Engine, trail: AuditTrail) -> None:
    for i in range(1, 8):
        trail.append(AuditEntry(step="drain", host=f"hv{i:02d}" if i != 7 else "hv02"))
    sql(engine, "UPDATE hostmaint_audit SET details = :d WHERE seq = 7", d='{"vms":0}')
    assert trail.verify().problem == "record 7 (drain hv02) was altered: its hash does not match its content"


def test_deleted_record_is_detected_and_named(engine: sa.Engine, trail: AuditTrail) -> None:
    records = fill(trail, 40)
    sql(engine, "DELETE FROM hostmaint_audit WHERE seq = 20")
    report = trail.verify()
    assert (report.ok, report.first_bad_seq, report.count) == (False, 20, 19)
    nxt = records[20]
    assert report.problem == f"record 20 was deleted: record 21 ({nxt.step} {nxt.host}) follows record 19"


def test_deleted_run_of_records_and_deleted_first_record(engine: sa.Engine, trail: AuditTrail) -> None:
    fill(trail, 10)
    sql(engine, "DELETE FROM hostmaint_audit WHERE seq BETWEEN 4 AND 6")
    report = trail.verify()
    assert report.first_bad_seq == 4
    assert report.problem.startswith("records 4..6 were deleted: record 7 (")
    sql(engine, "DELETE FROM hostmaint_audit WHERE seq = 1")
    report = trail.verify()
    assert report.first_bad_seq == 1
    assert "follows the start of the chain" in report.problem


def test_delete_and_renumber_is_detected(engine: sa.Engine, trail: AuditTrail) -> None:
    fill(trail, 10)
    sql(engine, "DELETE FROM hostmaint_audit WHERE seq = 5")
    sql(engine, "UPDATE hostmaint_audit SET seq = seq - 1 WHERE seq > 5")  # close the gap
    report = trail.verify()
    assert (report.ok, report.first_bad_seq) == (False, 5)


@pytest.mark.parametrize(("a", "b"), [(10, 11), (1, 2), (5, 12)])
def test_swapped_record_contents_are_detected(engine: sa.Engine, trail: AuditTrail, a: int, b: int) -> None:
    fill(trail, 20)
    columns = [c["name"] for c in sa.inspect(engine).get_columns("hostmaint_audit") if c["name"] != "seq"]
    assign = ", ".join(f"{c} = (SELECT {c} FROM keep WHERE seq = :other)" for c in columns)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TEMP TABLE keep AS SELECT * FROM hostmaint_audit WHERE seq IN (:a, :b)"),
                     {"a": a, "b": b})
        for seq, other in ((a, b), (b, a)):
            conn.execute(sa.text(f"UPDATE hostmaint_audit SET {assign} WHERE seq = :seq"),
                         {"seq": seq, "other": other})
    moved = trail.records()[a - 1]  # seq a now holds what was written as record b
    report = trail.verify()
    assert (report.ok, report.first_bad_seq, report.count) == (False, a, a - 1)
    assert report.problem == (f"record {a} ({moved.step} {moved.host}) holds the content of record {b}:"
                              " records were swapped or reordered")


def test_rewritten_chain_passes_verify_but_not_the_anchor(engine: sa.Engine, trail: AuditTrail) -> None:
    """The limit docs/audit.md states: whoever can write the DB can rebuild the whole chain."""
    fill(trail, 10)
    anchor = trail.verify().last_hash
    # the attacker edits record 5 and re-hashes it and everything after it
    sql(engine, "UPDATE hostmaint_audit SET outcome = 'ok', details = '{}' WHERE seq = 5")
    prev = trail.records()[3].hash
    for rec in trail.records()[4:]:
        fixed = AuditRecord(**{**rec.__dict__, "prev_hash": prev, "hash": ""})
        new_hash = expected_hash(fixed)
        sql(engine, "UPDATE hostmaint_audit SET prev_hash = :p, hash = :h WHERE seq = :s",
            p=prev, h=new_hash, s=rec.seq)
        prev = new_hash
    assert trail.verify().ok  # the chain alone cannot tell
    anchored = trail.verify(anchor=anchor)
    assert not anchored.ok
    assert anchor in anchored.problem


def test_truncated_tail_is_caught_only_by_the_anchor(engine: sa.Engine, trail: AuditTrail) -> None:
    fill(trail, 10)
    anchor = trail.verify().last_hash
    sql(engine, "DELETE FROM hostmaint_audit WHERE seq > 8")
    assert trail.verify().ok
    assert not trail.verify(anchor=anchor).ok
    fill(trail, 3)  # appending after the anchor keeps it valid
    assert trail.verify(anchor=trail.records()[7].hash).ok


def test_cut_tail_is_named_against_a_seq_anchor(engine: sa.Engine, trail: AuditTrail) -> None:
    """Deleting the newest records leaves a shorter chain that verifies; the anchor taken before names the loss."""
    fill(trail, 5)
    head = trail.verify().head
    assert (head.seq, head.hash) == (5, trail.records()[-1].hash)
    sql(engine, "DELETE FROM hostmaint_audit WHERE seq >= 4")
    alone = trail.verify()
    assert alone.ok and alone.count == 3  # the chain by itself cannot tell (docs/audit.md)
    anchored = trail.verify(anchor=head)
    assert (anchored.ok, anchored.first_bad_seq, anchored.count) == (False, 4, 3)
    assert anchored.problem.startswith("records 4..5 are missing: the chain ends at record 3")
    assert str(head) in anchored.problem
    # writing new records on top does not hide the cut: record 5 is not the one anchored
    fill(trail, 2)
    rewritten = trail.verify(anchor=head)
    assert (rewritten.ok, rewritten.first_bad_seq) == (False, 5)
    assert "record 5 (" in rewritten.problem and "is not the anchored record" in rewritten.problem


def test_seq_anchor_still_in_place_verifies(trail: AuditTrail) -> None:
    fill(trail, 3)
    head = trail.verify().head
    fill(trail, 2)  # records after the anchor are fine
    assert trail.verify(anchor=head).ok
    assert trail.verify(anchor=audit.Anchor.parse(str(head))).ok
    assert trail.verify(anchor=audit.Anchor(0, ZEROS)).ok  # the empty trail's head
    only_one = AuditTrail(open_engine("sqlite://"))
    assert only_one.verify().head == audit.Anchor(0, ZEROS)
    assert not only_one.verify(anchor=head).ok


@pytest.mark.parametrize(("text", "why"), [
    ("5", "expected SEQ:HASH"),
    ("x:" + "a" * 64, "expected SEQ:HASH"),
    ("-1:" + "a" * 64, "expected SEQ:HASH"),
    ("5:abc", "not a SHA-256 hash"),
    ("5:" + "g" * 64, "not a SHA-256 hash"),
    ("0:" + "a" * 64, "record 0 is the empty trail"),
])
def test_malformed_anchor_is_refused(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        audit.parse_anchor(text)


def test_parse_anchor_takes_both_forms() -> None:
    h = "Ab" * 32
    assert audit.parse_anchor(f" 7:{h} ") == audit.Anchor(7, h.lower())
    assert audit.parse_anchor(h) == h.lower()


# --- redaction ----------------------------------------------------------------------------------

PEM = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----\n"


def test_redact_nested_secrets_and_pem_text() -> None:
    value = {
        "host": "hv01",
        "ssh": {"user": "root", "Password": "hunter2", "key_id": "lab-ed25519",
                "identity": PEM, "options": ["-o", PEM]},
        "repos": [{"url": "https://repo.lab/", "Authorization": {"basic": "dXNlcjpwYXNz"}}],
        "vault_token": "s.abc", "API-Key": 12345, "db_secret_name": "patchdb",
        "kms": {"key_material": "AAAA", "private_key": "x", "passphrase": "y", "apiKey": "z"},
        "note": "rotate the private key next week",
    }
    out = redact(value)
    r = "***redacted***"
    assert out == {
        "host": "hv01",
        "ssh": {"user": "root", "Password": r, "key_id": "lab-ed25519", "identity": r, "options": ["-o", r]},
        "repos": [{"url": "https://repo.lab/", "Authorization": r}],
        "vault_token": r, "API-Key": r, "db_secret_name": r,
        "kms": {"key_material": r, "private_key": r, "passphrase": r, "apiKey": r},
        "note": "rotate the private key next week",
    }
    assert value["ssh"]["Password"] == "hunter2"  # the caller's value is not modified


def test_secrets_never_reach_the_database(engine: sa.Engine, trail: AuditTrail) -> None:
    rec = trail.append(AuditEntry(step="update", host="hv01",
                                  inputs={"repo": {"password": "hunter2"}, "keys": [PEM]},
                                  details={"ssh": {"token": "s.abc"}, "stderr": PEM}))
    assert rec.inputs == {"repo": {"password": "***redacted***"}, "keys": ["***redacted***"]}
    assert rec.details == {"ssh": {"token": "***redacted***"}, "stderr": "***redacted***"}
    with engine.connect() as conn:
        raw = json.dumps([list(r) for r in conn.execute(sa.text("SELECT * FROM hostmaint_audit"))])
    for secret in ("hunter2", "s.abc", "BEGIN OPENSSH", "b3BlbnNzaC1rZXktdjEAAAAA"):
        assert secret not in raw
    assert trail.verify().ok


# what dnf/librepo print when a repository's metadata cannot be fetched: the URL with its credentials
DNF_STDERR = ("Errors during downloading metadata for repository 'internal':\n"
              "  - Curl error (7): Couldn't connect to server for "
              "https://svc-patch:Hunter2pw@repo.corp/el9/repodata/repomd.xml\n"
              "Error: Failed to download metadata for repo 'internal'")


@pytest.mark.parametrize(("text", "expected"), [
    ("for https://svc-patch:Hunter2pw@repo.corp/el9/repomd.xml",
     "for https://svc-patch:***@repo.corp/el9/repomd.xml"),
    ("postgresql+psycopg://hm:S3cr3t@db/hostmaint", "postgresql+psycopg://hm:***@db/hostmaint"),
    ("https://u:p@ss@repo/x", "https://u:***@repo/x"),  # an unencoded "@" in the password
    ("baseurl=https://a:b1@c/ mirror=https://d:e2@f/", "baseurl=https://a:***@c/ mirror=https://d:***@f/"),
    ("GET https://repo/x?arch=x86_64&token=abc123&n=1", "GET https://repo/x?arch=x86_64&token=***&n=1"),
    ("mirrorlist?access_token=zz#top", "mirrorlist?access_token=***#top"),
    ("password=hunter2 user=bob", "password=*** user=bob"),
    ("PGPASSWORD='a b' psql", "PGPASSWORD=*** psql"),
    # an option whose value is a pair itself: the inner secret name's value goes
    ("dnf --setopt=internal.password=Hunter2 update", "dnf --setopt=internal.password=*** update"),
    ("curl --data=api_token=abc123 x", "curl --data=api_token=*** x"),
    ("opt=a=b=proxy_password=pw==", "opt=a=b=proxy_password=***"),
    # nothing secret: left as it was
    ("ftp://anon@mirror/pub", "ftp://anon@mirror/pub"),
    ("https://repo:8443/el9 mail root@hv01", "https://repo:8443/el9 mail root@hv01"),
    ("kernel-core 5.14.0-362.el9 arch=x86_64", "kernel-core 5.14.0-362.el9 arch=x86_64"),
    (PEM, "***redacted***"),
])
def test_redact_text_masks_credentials_inside_text(text: str, expected: str) -> None:
    assert redaction.redact_text(text) == expected
    assert redaction.redact_text(expected) == expected  # redacting again changes nothing


@pytest.mark.parametrize(("argv", "expected"), [
    (["curl", "--token", "abc123", "-u", "bob", "https://x"], ["curl", "--token", "***redacted***", "-u", "bob",
                                                              "https://x"]),
    (["tool", "--db-password", "pw", "--password-file=/etc/pw", "--verbose"],
     ["tool", "--db-password", "***redacted***", "--password-file=***", "--verbose"]),
    (["vm1", "vm2", "password"], ["vm1", "vm2", "password"]),  # names, not options: nothing to hide
])
def test_a_commands_secret_given_as_the_word_after_its_option_is_masked(argv: list[str], expected: list[str]) -> None:
    assert redact(argv) == expected and redact(tuple(argv)) == expected
    assert redact({"argv": argv}) == {"argv": expected}


def test_credentials_in_command_output_and_errors_are_stored_redacted(engine: sa.Engine,
                                                                        trail: AuditTrail) -> None:
    error = f"hv01: dnf update failed (exit 1): {DNF_STDERR}"
    trail.append(AuditEntry(step="update", host="hv01", outcome=StepOutcome.FAILED,
                            inputs={"repo_url": "https://svc-patch:Hunter2pw@repo.corp/el9"},
                            details={"stdout": "", "stderr": DNF_STDERR, "error": error,
                                     "db": "postgresql+psycopg://hm:S3cr3t@db/hostmaint",
                                     "argv": ["curl", "https://repo.corp/x?token=t0k3n"]}))
    rec = trail.records()[0]
    masked = DNF_STDERR.replace("svc-patch:Hunter2pw@", "svc-patch:***@")
    assert rec.details["stderr"] == masked
    assert rec.details["error"] == f"hv01: dnf update failed (exit 1): {masked}"
    assert rec.details["db"] == "postgresql+psycopg://hm:***@db/hostmaint"
    assert rec.details["argv"] == ["curl", "https://repo.corp/x?token=***"]
    assert rec.inputs == {"repo_url": "https://svc-patch:***@repo.corp/el9"}
    with engine.connect() as conn:
        raw = json.dumps([list(r) for r in conn.execute(sa.text("SELECT * FROM hostmaint_audit"))])
    for secret in ("Hunter2pw", "S3cr3t", "t0k3n"):
        assert secret not in raw
    assert trail.verify().ok


# --- concurrent writers ---------------------------------------------------------------------------


def append_from_threads(trail: AuditTrail, threads: int, each: int) -> list[BaseException]:
    """``threads`` writers, released together, each appending ``each`` records; what they raised."""
    barrier = threading.Barrier(threads)
    failures: list[BaseException] = []

    def writer(t: int) -> None:
        barrier.wait()
        try:
            for i in range(each):
                trail.append(AuditEntry(run_id=f"thread-{t}", step="drain", host=f"hv{t:02d}",
                                        inputs={"i": i}))
        except BaseException as exc:  # collected and asserted by the caller, so a failing thread fails the test
            failures.append(exc)

    workers = [threading.Thread(target=writer, args=(t,)) for t in range(threads)]
    for th in workers:
        th.start()
    for th in workers:
        th.join()
    return failures


def test_eight_threads_append_25_each_into_one_valid_chain(engine: sa.Engine) -> None:
    trail = AuditTrail(engine)
    assert append_from_threads(trail, 8, 25) == []
    records = trail.records()
    assert [r.seq for r in records] == list(range(1, 201))  # no duplicate, no gap
    assert sorted((r.run_id, r.inputs["i"]) for r in records) == sorted(
        (f"thread-{t}", i) for t in range(8) for i in range(25))
    report = trail.verify()
    assert (report.ok, report.count) == (True, 200)


WRITER = """
import sys
from hostmaint import audit
from hostmaint.audit import AuditEntry, AuditTrail
from hostmaint.db import open_engine
from hostmaint.errors import AuditError
trail = AuditTrail(open_engine(sys.argv[1]))
for i in range(int(sys.argv[3])):
    trail.append(AuditEntry(run_id=sys.argv[2], step="update", inputs={"i": i}))
"""


def test_separate_processes_append_into_one_valid_chain(db_url: str) -> None:
    open_engine(db_url).dispose()  # create the schema once, as a deployment would
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, db_url, f"proc-{p}", "20"], cwd=REPO)
             for p in range(3)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    eng = open_engine(db_url)
    try:
        trail = AuditTrail(eng)
        records = trail.records()
        assert [r.seq for r in records] == list(range(1, 61))
        assert {r.run_id for r in records} == {"proc-0", "proc-1", "proc-2"}
        assert trail.verify().ok
    finally:
        eng.dispose()


# --- export -------------------------------------------------------------------------------------------


def test_export_jsonl_parses_back(trail: AuditTrail) -> None:
    records = fill(trail, 15)
    lines = trail.export("jsonl").splitlines()
    assert len(lines) == 15
    parsed = [json.loads(line) for line in lines]
    assert parsed == [r.to_dict() for r in records]
    assert parsed[0]["trigger"] == "schedule" and parsed[0]["prev_hash"] == ZEROS
    for rec in parsed:  # an exported record is checkable on its own, without hostmaint
        body = {k: v for k, v in rec.items() if k != "hash"}
        assert hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest() \
            == rec["hash"]


def test_export_csv_parses_back(trail: AuditTrail) -> None:
    records = fill(trail, 15)
    rows = list(csv.DictReader(io.StringIO(trail.export("csv"))))
    assert len(rows) == 15
    assert [int(r["seq"]) for r in rows] == list(range(1, 16))
    assert [r["hash"] for r in rows] == [r.hash for r in records]
    assert json.loads(rows[3]["details"]) == records[3].details
    assert rows[0]["vm"] == "vm0" and rows[1]["vm"] == ""


# a cell a spreadsheet evaluates (OWASP, CSV injection), a line break inside a field, quotes and commas
CSV_HOSTILE = ["=HYPERLINK(\"https://evil.example\",\"x\")", "+1+cmd|' /C calc'!A0", "-2+3", "@SUM(A1:A9)",
               "\tx", "\rx", "line1\nline2", "cr\r\nlf", 'quote"and,comma', "[bold red]x", "hv01", "a=b"]


def test_export_csv_is_safe_in_a_spreadsheet_and_keeps_one_row_per_record(trail: AuditTrail) -> None:
    records = [trail.append(AuditEntry(run_id=text, flow=text, operator=text, cluster=text, host=text, vm=text,
                                       step=text, inputs={"vm": text}, details={"error": text}))
               for text in CSV_HOSTILE]
    exported = trail.export("csv")
    rows = list(csv.DictReader(io.StringIO(exported, newline="")))
    assert len(rows) == len(CSV_HOSTILE)
    for row, text in zip(rows, CSV_HOSTILE, strict=True):
        shown = "'" + text if text[0] in "=+-@\t\r" else text
        for column in ("run_id", "flow", "operator", "cluster", "host", "vm", "step"):
            assert row[column] == shown, (column, row[column])
        assert json.loads(row["inputs"]) == {"vm": text}  # JSON text starts with "{": never a formula
    for row in rows:
        assert not any(v.startswith(("=", "+", "-", "@", "\t", "\r")) for v in row.values() if v), row
    # exact data elsewhere: the stored records and the JSON lines are unchanged, and the chain verifies
    assert [json.loads(line)["vm"] for line in trail.export("jsonl").splitlines()] == CSV_HOSTILE
    assert [r.vm for r in trail.records()] == [r.vm for r in records] == CSV_HOSTILE
    assert trail.verify().ok


def test_export_unknown_format_is_refused(trail: AuditTrail) -> None:
    with pytest.raises(ValueError, match="xml"):
        trail.export("xml")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="xml"):
        trail.export_lines("xml")  # type: ignore[arg-type]  # refused when asked, not when first read


def test_export_comes_a_record_at_a_time_as_it_is_read(trail: AuditTrail) -> None:
    assert list(trail.export_lines("csv")) == [",".join(audit.FIELDS) + "\r\n"]  # an empty trail: the header
    fill(trail, 5)
    lines = trail.export_lines("jsonl")
    assert json.loads(next(lines))["seq"] == 1
    trail.append(entry(5))  # written while the export reads: the export is the trail as it was when it began
    assert [json.loads(line)["seq"] for line in lines] == [2, 3, 4, 5]
    rows = list(trail.export_lines("csv"))
    assert len(rows) == 6 and rows[0].startswith(",".join(audit.FIELDS))
    assert "".join(rows) == trail.export("csv")
    assert [r["seq"] for r in csv.DictReader(io.StringIO("".join(rows)))] == ["1", "2", "3", "4", "5", "6"]


def test_reading_a_record_with_a_tampered_enum_raises_audit_error(engine: sa.Engine, trail: AuditTrail) -> None:
    fill(trail, 3)
    sql(engine, "UPDATE hostmaint_audit SET outcome = 'fine' WHERE seq = 2")
    with pytest.raises(AuditError, match="record 2 cannot be read"):
        trail.records()
    assert trail.verify().problem.startswith("record 2 (")  # verify still names it instead of crashing


def test_negative_zero_duration_verifies(trail: AuditTrail) -> None:
    """-0.0 hashes as "-0.0" but SQLite returns 0.0: it is stored as 0.0, so the record still verifies."""
    rec = trail.append(entry(1, duration_s=-0.0))
    assert str(rec.duration_s) == "0.0"
    assert trail.verify().ok


def test_non_finite_duration_is_refused(trail: AuditTrail) -> None:
    with pytest.raises(ValueError, match="duration_s"):
        trail.append(AuditEntry(step="drain", duration_s=float("nan")))
    assert trail.records() == []


def test_concurrent_appends_queue_instead_of_racing(engine: sa.Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """Appenders wait for each other (SQLite's write lock, a PostgreSQL advisory lock): no append needs a retry."""
    monkeypatch.setattr(audit, "_APPEND_ATTEMPTS", 1)  # a lost seq race now fails the append
    trail = AuditTrail(engine)
    assert append_from_threads(trail, 6, 20) == []
    assert [r.seq for r in trail.records()] == list(range(1, 121))
    assert trail.verify().ok


def test_audit_verify_command_names_the_tampered_record(db_url: str, engine: sa.Engine, trail: AuditTrail,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """``hostmaint audit verify`` on the database HOSTMAINT_DB names (SQLite file or PostgreSQL URL)."""
    from typer.testing import CliRunner

    from hostmaint.cli import app

    monkeypatch.setenv("HOSTMAINT_DB", db_url)
    records = fill(trail, 5)
    intact = CliRunner().invoke(app, ["audit", "verify"])
    assert intact.exit_code == 0, intact.output
    assert "5 record(s), chain intact" in intact.output
    sql(engine, "UPDATE hostmaint_audit SET operator = 'mallory' WHERE seq = 3")
    broken = CliRunner().invoke(app, ["audit", "verify"])
    assert broken.exit_code == 1
    assert f"record 3 ({records[2].step} {records[2].host}) was altered" in broken.output


def test_postgres_role_that_may_only_select_and_insert_appends_but_cannot_edit(postgres: pg.Cluster) -> None:
    """The hardening docs/deployments.md suggests: the workers' role gets no UPDATE or DELETE on the trail."""
    postgres.reset()
    open_engine(postgres.url).dispose()  # the schema, created by its owner
    admin = sa.create_engine(postgres.url, poolclass=sa.pool.NullPool)
    with admin.begin() as conn:
        conn.execute(sa.text("CREATE ROLE hm_appender LOGIN"))
        conn.execute(sa.text("GRANT USAGE ON SCHEMA public TO hm_appender"))
        conn.execute(sa.text("GRANT SELECT, INSERT ON hostmaint_audit TO hm_appender"))
    eng = open_engine(postgres.url_as("hm_appender"))
    try:
        trail = AuditTrail(eng)
        threads = [threading.Thread(target=fill, args=(trail, 5)) for _ in range(3)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert (trail.verify().ok, trail.verify().count) == (True, 15)
        with pytest.raises(sa.exc.ProgrammingError, match="permission denied"):
            sql(eng, "UPDATE hostmaint_audit SET operator = 'mallory' WHERE seq = 1")
        with pytest.raises(sa.exc.ProgrammingError, match="permission denied"):
            sql(eng, "DELETE FROM hostmaint_audit WHERE seq = 15")
        assert trail.verify().count == 15
    finally:
        eng.dispose()
        with admin.begin() as conn:
            conn.execute(sa.text("DROP OWNED BY hm_appender"))
            conn.execute(sa.text("DROP ROLE hm_appender"))
        admin.dispose()


def test_a_role_that_may_not_create_the_new_index_still_opens_and_appends(
        postgres: pg.Cluster, caplog: pytest.LogCaptureFixture) -> None:
    """A database made before the audit index, opened by the select-and-insert role: it cannot create
    the index (not the tables' owner), works without it and says so; the owner's next open adds it."""
    postgres.reset()
    open_engine(postgres.url).dispose()
    admin = sa.create_engine(postgres.url, poolclass=sa.pool.NullPool)
    with admin.begin() as conn:
        conn.execute(sa.text(f"DROP INDEX {AUDIT_INDEX}"))
        conn.execute(sa.text("CREATE ROLE hm_appender LOGIN"))
        conn.execute(sa.text("GRANT USAGE ON SCHEMA public TO hm_appender"))
        conn.execute(sa.text("GRANT SELECT, INSERT ON hostmaint_audit TO hm_appender"))
    try:
        with caplog.at_level("WARNING", logger="hostmaint.db"):
            eng = open_engine(postgres.url_as("hm_appender"))
        try:
            assert "an index could not be created" in caplog.text
            trail = AuditTrail(eng)
            fill(trail, 3)
            assert [r.seq for r in trail.records(cluster="lab", steps=(Step.DRAIN,))] == [2]
        finally:
            eng.dispose()
        assert AUDIT_INDEX not in audit_indexes(admin)
        open_engine(postgres.url).dispose()
        assert AUDIT_INDEX in audit_indexes(admin)
    finally:
        with admin.begin() as conn:
            conn.execute(sa.text("DROP OWNED BY hm_appender"))
            conn.execute(sa.text("DROP ROLE hm_appender"))
        admin.dispose()


def test_an_error_quoting_host_output_never_carries_its_password() -> None:
    from hostmaint.errors import InputError, StepError

    said = "Curl error (67): https://mirror:s3cret@repo.example/el9/repodata/repomd.xml; token=abc123"
    for err in (StepError(f"dnf failed: {said}", host="hv01", step="update"), InputError(said)):
        assert "s3cret" not in str(err) and "abc123" not in str(err)
        assert "https://mirror:***@repo.example" in str(err) and "token=***" in str(err)


@pytest.mark.parametrize("line", ["a." * 100_000, "a-b+" * 50_000, "k." * 99_999 + "password=hunter2",
                                  "a=" * 100_000 + "password=hunter2"])
def test_redacting_a_long_line_of_host_output_takes_linear_time(line: str) -> None:
    # every error quoting a host's output is redacted when it is made: the patterns tried every position
    # of one long token again, so 200 kB of "a.a.a..." on a failed command's stderr held the worker for hours
    code = ("import sys, time; from hostmaint.errors import StepError; line = sys.stdin.read(); t = time.monotonic(); "
            "e = StepError('df -Pm / failed: ' + line, host='hv1'); print(time.monotonic() - t, 'hunter2' in str(e))")
    done = subprocess.run([sys.executable, "-c", code], input=line, capture_output=True, text=True, timeout=60,
                          check=True)
    seconds, leaked = done.stdout.split()
    assert float(seconds) < 5 and leaked == "False"
