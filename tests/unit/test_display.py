"""Names and text from hosts are shown as data on every output: the helpers, plan rendering, the CLI's tables.

Every hostile name (tests/hostile.py) goes through each path; the operator must see the name as
written (escaped where it holds control or invisible characters), one row per record, and no
markup, link, colour, emoji or traceback.
"""

from __future__ import annotations

import json
import sqlite3
import unicodedata
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hostmaint.audit import AuditEntry, AuditTrail
from hostmaint.cli import app
from hostmaint.display import command_line, labelled, markdown_code, markdown_text, masked, spreadsheet_cell, visible
from hostmaint.fleet import dump_snapshot
from hostmaint.models import StepOutcome
from hostmaint.placement import plan_evacuation, plan_rebalance, plan_window, render_plan
from tests.hostile import HOSTILE_CLUSTER, HOSTILE_HOSTS, HOSTILE_NAMES, hostile_snapshot

runner = CliRunner()
NAMES = list(HOSTILE_NAMES.values())
IDS = list(HOSTILE_NAMES)


@pytest.fixture(autouse=True)
def _wide_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    # rich reads COLUMNS when it prints: wide enough that no cell wraps, so a row is a line
    monkeypatch.setenv("COLUMNS", "300")


def _hidden(text: str) -> list[str]:
    return [c for c in text if unicodedata.category(c) in ("Cc", "Cf", "Cs", "Zl", "Zp") and c != "\n"]


# --- the helpers ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "shown"), [
    ("hv01", "hv01"),
    ("line1\nline2", "line1\\nline2"),
    ("cr\rx", "cr\\rx"),
    ("tab\tx", "tab\\tx"),
    ("esc\x1b[31mred", "esc\\x1b[31mred"),
    ("bidi\u202eevil", "bidi\\u202eevil"),
    ("zero\u200bwidth", "zero\\u200bwidth"),
    ("para\u2029graph", "para\\u2029graph"),
    ("del\x7f", "del\\x7f"),
    ("c1\x9b", "c1\\x9b"),
    ("tag\U000e0041", "tag\\U000e0041"),
    ("lone\udcff", "lone\\udcff"),  # undecodable byte kept by surrogateescape: printing it would raise
    ("back\\slash", "back\\\\slash"),  # so that a real escape cannot be faked with a backslash
    ("[bold red]x", "[bold red]x"),  # printable: unchanged (the rich layer keeps it from being markup)
    ("Zürich-東京", "Zürich-東京"),
])
def test_visible_escapes_what_would_act_and_keeps_what_prints(text: str, shown: str) -> None:
    assert visible(text) == shown
    assert "\n" not in visible(text) and not _hidden(visible(text))


@pytest.mark.parametrize(("argv", "shown"), [
    (["dnf", "-y", "update", "--exclude=kernel*"], "dnf -y update '--exclude=kernel*'"),
    (["curl", "https://svc:pw@repo.corp/x", "-d", "token=abc"], "curl 'https://svc:***@repo.corp/x' -d 'token=***'"),
    (["sh", "-c", "echo a\nb"], "sh -c 'echo a\\nb'"),  # one line: the shell's line break shows as \n
    (["ls", "\x1b[2J\u202e"], "ls '\\x1b[2J\\u202e'"),
])
def test_a_logged_command_is_one_line_with_its_secrets_masked(argv: list[str], shown: str) -> None:
    assert command_line(argv) == shown


def test_masked_text_hides_secrets_before_escaping() -> None:
    # escaped first, the line break would join the lines into one value, "mode=1\\npassword=x", not secret
    assert masked("mode=1\npassword=x \x1b[31m") == "mode=1\\npassword=*** \\x1b[31m"


def test_a_labelled_message_breaks_lines_only_between_its_lines() -> None:
    text = labelled("error:", "red", "host 'x\nerror: all fine' [/]", ["problem 1: \x1b[2J", "problem 2: \u202e"])
    assert text.plain == "error: host 'x\\nerror: all fine' [/]\n  problem 1: \\x1b[2J\n  problem 2: \\u202e"
    assert [span.style for span in text.spans] == ["red"]


@pytest.mark.parametrize("name", NAMES, ids=IDS)
def test_markdown_text_cannot_end_a_cell_or_open_syntax(name: str) -> None:
    shown = markdown_text(name)
    assert "\n" not in shown and "\r" not in shown and not _hidden(shown)
    assert "<" not in shown and ">" not in shown
    # every |, `, *, [ and ] is backslash-escaped (preceded by an odd number of backslashes)
    for i, c in enumerate(shown):
        if c in "|`*[]_":
            run = len(shown[:i]) - len(shown[:i].rstrip("\\"))
            assert run % 2 == 1, (name, shown, i)


def test_markdown_code_cannot_be_closed_by_its_text() -> None:
    text = "VM ````evil```\n```\n# heading\x1b[2J"
    block = markdown_code(text)
    fence = block.split("\n", 1)[0]
    assert fence == "`````"
    body = block[len(fence) + 1:-len(fence) - 2]
    assert all(not line.startswith(fence) for line in body.split("\n"))
    assert "\\x1b[2J" in block and "\x1b" not in block


@pytest.mark.parametrize(("value", "cell"), [
    ("=1+2", "'=1+2"), ("+1", "'+1"), ("-1", "'-1"), ("@SUM(A1)", "'@SUM(A1)"), ("\tx", "'\tx"), ("\rx", "'\rx"),
    ("hv01", "hv01"), ("a=b", "a=b"), ("", ""), (3, 3), (-1.5, -1.5), (None, None),
])
def test_spreadsheet_cell_neutralises_formulas_only(value: object, cell: object) -> None:
    assert spreadsheet_cell(value) == cell


# --- plan rendering ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("hosts", [False, True], ids=["hostile-vms", "hostile-hosts-too"])
def test_every_plan_shows_each_vm_once_on_one_line_as_written(hosts: bool) -> None:
    snap = hostile_snapshot(hosts=hosts)
    drained = snap.hosts[0].name
    texts = {"evacuation": render_plan(plan_evacuation(snap, [drained])),
             "window": render_plan(plan_window(snap)),
             "rebalance": render_plan(plan_rebalance(snap, 20))}
    for kind, text in texts.items():
        assert not _hidden(text), kind
        for name in NAMES:
            vm = snap.vms[NAMES.index(name)]
            rows = [line for line in text.splitlines() if line.startswith(visible(name) + " ")]
            if kind == "evacuation" and vm.host == drained or kind == "window":
                assert rows, (kind, name)
            # no row is cut by the name: every VM line has every column
            for row in rows:
                assert len(row[len(visible(name)):].split()) >= 5, (kind, name, row)
    if hosts:
        assert visible(HOSTILE_CLUSTER) in texts["window"]
        for host in HOSTILE_HOSTS.values():
            assert f"drain {visible(host)}" in texts["window"]


# --- the CLI ------------------------------------------------------------------------------------------------------


def _snapshot_file(tmp_path: Path, *, hosts: bool = False) -> Path:
    path = tmp_path / "snap.json"
    path.write_text(dump_snapshot(hostile_snapshot(hosts=hosts)))
    return path


def _shown_once_per_row(output: str, names: list[str]) -> None:
    assert "Traceback" not in output
    assert not _hidden(output.replace("\n", "")), output
    for name in names:
        assert visible(name) in output, (name, output)


@pytest.mark.parametrize("hosts", [False, True], ids=["hostile-vms", "hostile-hosts-too"])
@pytest.mark.parametrize("command", [["plan", "drain", "hv01"], ["plan", "window", "CLUSTER"],
                                     ["plan", "rebalance", "CLUSTER", "--max-moves", "20"],
                                     ["simulate", "window", "CLUSTER"]])
def test_plans_print_hostile_names_literally(command: list[str], hosts: bool, tmp_path: Path) -> None:
    snap = hostile_snapshot(hosts=hosts)
    args = [snap.cluster if a == "CLUSTER" else a for a in command]
    result = runner.invoke(app, [*args, "--snapshot", str(_snapshot_file(tmp_path, hosts=hosts)),
                                 "-i", str(tmp_path / "none.yaml")])
    assert result.exit_code == 0, result.output
    if command[1] == "drain":
        _shown_once_per_row(result.output, [v.name for v in snap.vms if v.host == "hv01"])
    elif command[1] == "window" and command[0] == "plan":
        _shown_once_per_row(result.output, NAMES)
    elif command[1] == "rebalance":
        moved = plan_rebalance(snap, 20).moves
        assert moved
        _shown_once_per_row(result.output, [m.placement.vm for m in moved])
    else:
        _shown_once_per_row(result.output, [])
    if hosts:
        _shown_once_per_row(result.output, [h for h in HOSTILE_HOSTS.values() if h != "hv01"])
        if command[0] == "simulate":  # one row per host
            for host in HOSTILE_HOSTS.values():
                assert sum(line.strip().startswith(f"│ {visible(host)} ") for line in result.output.splitlines()) == 1


@pytest.mark.parametrize("name", NAMES, ids=IDS)
def test_an_error_quoting_a_hostile_name_prints_it_literally(name: str, tmp_path: Path) -> None:
    result = runner.invoke(app, ["plan", "drain", name, "--snapshot", str(_snapshot_file(tmp_path))])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: host ") and "Traceback" not in result.output
    assert repr(name) in result.output or visible(repr(name)) in result.output
    assert result.output.count("\n") == 1


def test_host_status_shows_a_hostile_reason_literally_on_its_row(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from hostmaint.db import open_engine
    from hostmaint.simulated_fleet import demo_packages, demo_snapshot, write_simulated_fleet
    from hostmaint.state import HostStateStore

    monkeypatch.setenv("HOSTMAINT_DB", str(tmp_path / "hostmaint.db"))
    snap = demo_snapshot(4, 12)
    inventory = write_simulated_fleet(tmp_path, snap, demo_packages(snap))
    reason = "patch failed: " + " ".join(NAMES)
    HostStateStore(open_engine()).set_aside("hv01", reason)
    result = runner.invoke(app, ["host", "status", "-i", str(inventory)])
    assert result.exit_code == 0, result.output
    _shown_once_per_row(result.output, NAMES)
    rows = [line for line in result.output.splitlines() if "hv0" in line]
    assert len(rows) == 4, result.output
    as_json = json.loads(runner.invoke(app, ["host", "status", "-i", str(inventory), "--json"]).stdout)
    assert as_json[0]["reason"] == reason  # JSON carries the exact data


def _hostile_trail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[AuditTrail, Path]:
    from hostmaint.db import open_engine

    db = tmp_path / "hostmaint.db"
    monkeypatch.setenv("HOSTMAINT_DB", str(db))
    trail = AuditTrail(open_engine())
    for i, name in enumerate(NAMES):
        trail.append(AuditEntry(run_id=f"run-{i}", flow=name, operator=name, cluster=name, host=name, vm=name,
                                step="drain", inputs={"vm": name}, details={"error": name},
                                outcome=StepOutcome.FAILED))
    return trail, db


def test_audit_show_prints_each_record_on_one_row_literally(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _hostile_trail(tmp_path, monkeypatch)
    result = runner.invoke(app, ["audit", "show"])
    assert result.exit_code == 0, result.output
    _shown_once_per_row(result.output, NAMES)
    rows = [line for line in result.output.splitlines() if " drain " in line]
    assert len(rows) == len(NAMES), result.output
    for seq, (row, name) in enumerate(zip(rows, NAMES, strict=True), start=1):
        assert row.split("│")[1].strip() == str(seq) and visible(name) in row
    exact = json.loads(runner.invoke(app, ["audit", "show", "--json"]).stdout)
    assert [r["vm"] for r in exact] == NAMES


@pytest.mark.parametrize("name", NAMES, ids=IDS)
def test_audit_verify_names_an_altered_hostile_record_literally(name: str, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    _, db = _hostile_trail(tmp_path, monkeypatch)
    seq = NAMES.index(name) + 1
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE hostmaint_audit SET outcome = 'ok' WHERE seq = ?", (seq,))
    result = runner.invoke(app, ["audit", "verify"])
    assert result.exit_code == 1, result.output
    assert f"audit trail broken: record {seq} (drain {visible(name)}) was altered" in result.output
    assert "Traceback" not in result.output and not _hidden(result.output.replace("\n", ""))


def test_the_run_summary_shows_hostile_names_and_details_literally(capsys: pytest.CaptureFixture[str],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.common import HostOutcome
    from hostmaint.models import MigrationResult
    from hostmaint_cli.runs import _show_outcomes

    migrations = [MigrationResult(vm=name, source="hv01", target="hv02", outcome=StepOutcome.OK) for name in NAMES]
    outcome = HostOutcome(host="hv01", outcome=StepOutcome.FAILED, state="failed",
                          detail="update failed: " + " ".join(NAMES), migrations=migrations)
    _show_outcomes([outcome], False)
    printed = capsys.readouterr().out
    _shown_once_per_row(printed, NAMES)
    assert sum(" hv01 " in line and " hv02 " in line for line in printed.splitlines()) == len(NAMES)
    _show_outcomes([outcome], True)
    exact = json.loads(capsys.readouterr().out)
    assert [m["vm"] for m in exact[0]["migrations"]] == NAMES


def test_audit_export_csv_reads_back_one_row_per_record_with_no_formula(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import csv
    import io

    _hostile_trail(tmp_path, monkeypatch)
    result = runner.invoke(app, ["audit", "export", "--format", "csv"])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout, newline="")))
    assert [r["vm"] for r in rows] == [spreadsheet_cell(n) for n in NAMES]
    assert rows[NAMES.index(HOSTILE_NAMES["formula"])]["host"].startswith("'=")
    exact = [json.loads(line) for line in runner.invoke(app, ["audit", "export"]).stdout.splitlines()]
    assert [r["vm"] for r in exact] == NAMES
    assert runner.invoke(app, ["audit", "verify"]).exit_code == 0


def test_the_core_logs_shut_off_vms_by_escaped_name_on_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """Core log records reach the run's log in the UI (tasks.common.CoreLogForwarder) and the worker's terminal."""
    import logging

    from hostmaint.maintenance import RunContext, report_shut_off
    from hostmaint.models import Trigger
    from hostmaint.runtime import open_runtime
    from hostmaint.simulated_fleet import demo_packages, write_simulated_fleet

    monkeypatch.setenv("HOSTMAINT_DB", str(tmp_path / "hostmaint.db"))
    snap = hostile_snapshot()
    inventory = write_simulated_fleet(tmp_path, snap, demo_packages(snap), vm_policies=[])
    rt = open_runtime(inventory, fresh=True)
    fleet = rt.hypervisor
    on_hv01 = sorted(fleet.running["hv01"])
    for vm in on_hv01:
        fleet.running["hv01"].discard(vm)
        fleet.stopped[vm] = "hv01"
    with caplog.at_level(logging.WARNING, logger="hostmaint"):
        off = report_shut_off(rt, RunContext(flow="test", trigger=Trigger.TEST, operator="t", reason="t"), "hv01")
    assert sorted(off) == on_hv01
    [message] = [r.getMessage() for r in caplog.records if "shut-off VMs" in r.getMessage()]
    assert "\n" not in message and not _hidden(message)
    assert all(visible(vm) in message for vm in on_hv01)


def test_host_status_shows_an_evacuations_own_reason_and_who_asked_escaped(sim_inventory: Path) -> None:
    # the operator's words were in the audit trail, but host status said "drained": not why the host is out
    from hostmaint import maintenance as steps
    from hostmaint.runtime import open_runtime

    words = "replace the DIMM [bold]B2[/bold]\x1b[2J\nhv02 active"  # markup, a screen clear, a forged row
    rt = open_runtime(sim_inventory, fresh=True)
    run = steps.RunContext(flow="evacuate-host", operator="alice", reason=words)
    steps.cordon(rt, run, "hv01")
    steps.drain_host(rt, run, steps.plan_drain(rt, run, "hv01"))
    assert rt.states.get("hv01").reason == "drained"

    table = runner.invoke(app, ["host", "status", "-i", str(sim_inventory)])
    assert table.exit_code == 0, table.output
    [row] = [line for line in table.output.splitlines() if "hv01" in line]
    assert f"{visible(words)} (evacuated by alice, evacuate-host)" in row, row
    assert "\x1b" not in table.output and "[bold]" in row  # shown as typed, not acted on
    assert len([line for line in table.output.splitlines() if "hv0" in line]) == 4  # no forged row
    rows = {r["host"]: r for r in json.loads(runner.invoke(
        app, ["host", "status", "-i", str(sim_inventory), "--json"]).stdout)}
    assert rows["hv01"]["reason"] == "drained"  # the state's own reason, exactly as stored
    assert {k: rows["hv01"]["out_of_service"][k] for k in ("held", "reason", "by", "flow")} == {
        "held": "evacuated", "reason": words, "by": "alice", "flow": "evacuate-host"}
    assert rows["hv02"]["out_of_service"] is None
