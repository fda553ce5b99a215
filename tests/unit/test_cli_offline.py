"""CLI commands that work offline from a snapshot: no Prefect server, no hosts."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hostmaint.audit import AuditTrail
from hostmaint.cli import app
from hostmaint.fleet import dump_snapshot
from hostmaint.simulated_fleet import demo_snapshot

runner = CliRunner()


def test_simulate_window_estimates_and_judges_the_window(tmp_path: Path) -> None:
    snap = tmp_path / "snap.json"
    snap.write_text(dump_snapshot(demo_snapshot(4, 12)))
    result = runner.invoke(app, ["simulate", "window", "demo", "--snapshot", str(snap), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert {h["host"] for h in data["hosts"]} == {"hv01", "hv02", "hv03", "hv04"}
    assert data["makespan_s"] >= data["lower_bound_s"] > 0
    # Ten minutes cannot hold four hosts at ten minutes each: exit 1, and it says so.
    short = runner.invoke(app, ["simulate", "window", "demo", "--snapshot", str(snap), "--window-hours", "0.1"])
    assert short.exit_code == 1 and "NO" in short.output
    bad = runner.invoke(app, ["simulate", "window", "demo", "--snapshot", str(snap), "--parallel", "0"])
    assert bad.exit_code == 2
    other = runner.invoke(app, ["simulate", "window", "prod", "--snapshot", str(snap)])
    assert other.exit_code == 2


def test_simulate_window_takes_measured_dirty_rates(tmp_path: Path) -> None:
    snap_model = demo_snapshot(4, 12)
    snap = tmp_path / "snap.json"
    snap.write_text(dump_snapshot(snap_model))
    base = ["simulate", "window", "demo", "--snapshot", str(snap), "--json",
            "--inventory", str(tmp_path / "none.yaml")]
    idle = runner.invoke(app, base)
    rates = tmp_path / "rates.json"
    rates.write_text(json.dumps({v.name: 400.0 for v in snap_model.vms}))
    busy = runner.invoke(app, [*base, "--dirty-rates", str(rates)])
    assert idle.exit_code == busy.exit_code == 0, busy.output
    # guests rewriting 400 MiB/s re-send their memory: the same window takes longer
    assert json.loads(busy.stdout)["makespan_s"] > json.loads(idle.stdout)["makespan_s"]
    rates.write_text(json.dumps({"nosuchvm": 1.0}))
    unknown = runner.invoke(app, [*base, "--dirty-rates", str(rates)])
    assert unknown.exit_code == 2 and "nosuchvm" in unknown.output
    first = snap_model.vms[0].name
    rates.write_text(json.dumps({first: -3}))
    negative = runner.invoke(app, [*base, "--dirty-rates", str(rates)])
    assert negative.exit_code == 2 and first in negative.output and "from 0 to" in negative.output
    for bad in ("NaN", "Infinity", "1e30"):  # json reads NaN and Infinity; NaN passed "rate < 0" before
        rates.write_text(f'{{"{first}": {bad}}}')
        refused = runner.invoke(app, [*base, "--dirty-rates", str(rates)])
        assert refused.exit_code == 2 and first in refused.output, (bad, refused.output)


@pytest.mark.parametrize(("option", "value"), [
    # --patch-seconds nan never let the simulator's clock reach the end: the command ran forever
    ("--patch-seconds", "nan"), ("--patch-seconds", "inf"), ("--patch-seconds", "-5"),
    ("--window-hours", "nan"), ("--window-hours", "0"), ("--window-hours", "-1"),
    ("--parallel", "100000"),
])
def test_simulate_window_refuses_numbers_no_window_has(tmp_path: Path, option: str, value: str) -> None:
    snap = tmp_path / "snap.json"
    snap.write_text(dump_snapshot(demo_snapshot(4, 12)))
    result = runner.invoke(app, ["simulate", "window", "demo", "--snapshot", str(snap), option, value])
    assert result.exit_code == 2, result.output
    assert f"{option}: must be" in result.output, result.output


def test_the_simulator_refuses_a_patch_time_or_dirty_rate_it_could_not_run_with() -> None:
    from hostmaint.migration.simulate import simulate_window

    snap = demo_snapshot(4, 12)
    with pytest.raises(ValueError, match="patch_s"):
        simulate_window(snap, ["hv01"], patch_s=float("nan"))
    with pytest.raises(ValueError, match=snap.vms[0].name):
        simulate_window(snap, ["hv01"], dirty_rate={snap.vms[0].name: float("inf")})


def test_simulate_window_reports_its_closing_rebalance(tmp_path: Path) -> None:
    snap = tmp_path / "snap.json"
    snap.write_text(dump_snapshot(demo_snapshot(4, 12)))
    text_base = ["simulate", "window", "demo", "--snapshot", str(snap), "--inventory", str(tmp_path / "none.yaml")]
    base = [*text_base, "--json"]
    runs = {name: runner.invoke(app, [*base, *extra]) for name, extra in
            {"default": [], "level": ["--rebalance-within-pct", "0"], "none": ["--no-rebalance"]}.items()}
    for name, run in runs.items():
        assert run.exit_code == 0, (name, run.output)
    data = {name: json.loads(run.stdout) for name, run in runs.items()}
    for name, d in data.items():
        # the window with its levelling: the patching, then the rebalance after the last host
        assert d["total_s"] == pytest.approx(d["makespan_s"] + d["rebalance_s"], abs=0.002), name
        assert d["rebalance_moves"] >= 0 and d["rebalance_s"] >= 0, name
    # the rebalance follows the patching: asking for it, or not, leaves the makespan as it was
    assert data["default"]["makespan_s"] == data["level"]["makespan_s"] == data["none"]["makespan_s"]
    assert data["none"]["rebalance_moves"] == 0 and data["none"]["rebalance_s"] == 0
    # no move is free: a rebalance that moves VMs takes time
    assert (data["level"]["rebalance_moves"] > 0) == (data["level"]["rebalance_s"] > 0)
    text = runner.invoke(app, [*text_base, "--no-rebalance"])
    assert text.exit_code == 0 and "closing rebalance: none" in text.output
    for bad in ("100", "-1", "250"):
        refused = runner.invoke(app, [*base, "--rebalance-within-pct", bad])
        assert refused.exit_code == 2 and "--rebalance-within-pct" in refused.output, (bad, refused.output)


def test_audit_verify_prints_the_head_and_catches_a_cut_tail_only_against_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hostmaint.audit import AuditEntry, AuditTrail
    from hostmaint.db import open_engine

    db = tmp_path / "hostmaint.db"
    monkeypatch.setenv("HOSTMAINT_DB", str(db))
    trail = AuditTrail(open_engine())
    records = [trail.append(AuditEntry(host="hv01", step=step)) for step in ("cordon", "drain", "update",
                                                                            "reboot", "verify")]
    before = runner.invoke(app, ["audit", "verify", "--json"])
    assert before.exit_code == 0, before.output
    head = json.loads(before.stdout)["head"]
    assert head == f"5:{records[-1].hash}"
    text = runner.invoke(app, ["audit", "verify"])
    assert text.exit_code == 0 and f"head: {head}" in text.output
    with sqlite3.connect(db) as conn:
        conn.execute("DELETE FROM hostmaint_audit WHERE seq >= 4")
    # documented limit: without an anchor the shorter chain is consistent
    alone = runner.invoke(app, ["audit", "verify"])
    assert alone.exit_code == 0 and "3 record(s), chain intact" in alone.output
    anchored = runner.invoke(app, ["audit", "verify", "--anchor", head])
    assert anchored.exit_code == 1
    assert "records 4..5 are missing" in anchored.output
    bare = runner.invoke(app, ["audit", "verify", "--anchor", records[-1].hash])  # the hash alone: still caught
    assert bare.exit_code == 1 and "is not in the chain" in bare.output
    kept = runner.invoke(app, ["audit", "verify", "--anchor", f"3:{records[2].hash}"])
    assert kept.exit_code == 0, kept.output
    bad = runner.invoke(app, ["audit", "verify", "--anchor", "5:nothex"])
    assert bad.exit_code == 2 and "--anchor" in bad.output


def test_demo_uses_its_own_database_whatever_is_exported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """An exported production HOSTMAINT_DB is overridden (never written by the demo) and its password never shown."""
    import os

    from hostmaint_cli.runs import _shown_db, _use_demo_db

    production = "postgresql+psycopg://hostmaint:S3cr3t@db.example/hostmaint"
    monkeypatch.setenv("HOSTMAINT_DB", production)
    stale = [tmp_path / name for name in ("hostmaint.db", "hostmaint.db-wal", "hostmaint.db-shm")]
    for path in stale:
        path.write_text("an earlier demo's")
    db = _use_demo_db(tmp_path)
    assert db == tmp_path / "hostmaint.db"
    assert os.environ["HOSTMAINT_DB"] == str(db)
    assert not any(path.exists() for path in stale)
    said = capsys.readouterr()
    assert "S3cr3t" not in said.out + said.err
    assert "postgresql+psycopg://hostmaint:***@db.example/hostmaint" in said.err
    assert _shown_db(production) == "postgresql+psycopg://hostmaint:***@db.example/hostmaint"
    assert _shown_db(str(db)) == str(db)


@pytest.mark.parametrize(("url", "why"), [
    ("postgresql+psycopg://hm:S3cr3t@db.example:54x2/hostmaint", "'54x2'"),
    ("postgresql+nosuchdriver://hm:S3cr3t@db.example/hostmaint", "no SQLAlchemy dialect or driver"),
    ("post gres://hm:S3cr3t@db.example/hostmaint", "Could not parse"),
])
def test_a_bad_database_url_is_bad_input_naming_hostmaint_db(url: str, why: str,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from hostmaint.db import open_engine
    from hostmaint.errors import InputError

    monkeypatch.setenv("HOSTMAINT_DB", url)
    result = runner.invoke(app, ["audit", "verify"])
    assert result.exit_code == 2, result.output
    said = " ".join(result.output.split())
    assert said.startswith("error: HOSTMAINT_DB: not a usable database URL")
    assert why in said and "hm:***@db.example" in said
    assert "S3cr3t" not in result.output and "Traceback" not in result.output
    with pytest.raises(InputError, match="^the database URL: ") as info:
        open_engine(url)  # given directly, not through the environment
    assert "S3cr3t" not in str(info.value) and info.value.__cause__ is None


def test_host_status_masks_credentials_in_a_failed_hosts_reason(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed host's reason is its error, which may quote dnf's output with a repository password."""
    from hostmaint.db import open_engine
    from hostmaint.models import HostState
    from hostmaint.simulated_fleet import demo_packages, write_simulated_fleet
    from hostmaint.state import HostStateStore

    monkeypatch.setenv("HOSTMAINT_DB", str(tmp_path / "hostmaint.db"))
    snap = demo_snapshot(4, 12)
    inventory = write_simulated_fleet(tmp_path, snap, demo_packages(snap))
    states = HostStateStore(open_engine())
    states.transition("hv01", HostState.CORDONED, "patch")
    states.transition("hv01", HostState.FAILED, "patch failed: Curl error (7) for "
                                                "https://svc-patch:Hunter2pw@repo.corp/el9/repodata/repomd.xml")
    for args in (["--json"], []):
        result = runner.invoke(app, ["host", "status", "-i", str(inventory), *args])
        assert result.exit_code == 0, result.output
        assert "Hunter2pw" not in result.output
    rows = json.loads(runner.invoke(app, ["host", "status", "-i", str(inventory), "--json"]).stdout)
    assert rows[0]["reason"] == ("patch failed: Curl error (7) for "
                                 "https://svc-patch:***@repo.corp/el9/repodata/repomd.xml")


def test_an_operator_cordons_uncordons_and_resets_hosts_only_from_states_that_allow_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typing import Any

    from hostmaint.db import open_engine
    from hostmaint.models import HostState
    from hostmaint.simulated_fleet import demo_packages, write_simulated_fleet
    from hostmaint.state import HostStateStore

    monkeypatch.setenv("HOSTMAINT_DB", str(tmp_path / "hostmaint.db"))
    snap = demo_snapshot(4, 12)
    inventory = str(write_simulated_fleet(tmp_path, snap, demo_packages(snap)))
    states = HostStateStore(open_engine())

    def host(*args: str) -> Any:
        return runner.invoke(app, ["host", *args, "-i", inventory, "--operator", "olga"])

    cordon = host("cordon", "hv01", "--reason", "fan noise")
    assert cordon.exit_code == 0, cordon.output
    assert states.get("hv01").state is HostState.CORDONED and states.get("hv01").prior_state is None
    # a later maintenance begins from the operator's cordon and leaves it there
    assert states.begin_maintenance("hv01", "run-1", "patch").prior_state is HostState.CORDONED
    refused = host("uncordon", "hv01")  # that maintenance has not finished: it is its run's
    assert refused.exit_code == 2 and "in maintenance" in refused.output
    states.transition("hv01", HostState.DRAINING, "draining")
    states.transition("hv01", HostState.CORDONED, "maintenance finished")  # the run ends at its prior state
    assert host("uncordon", "hv01").exit_code == 0 and states.get("hv01").state is HostState.ACTIVE

    # reset clears only a failed host: one a run holds mid-maintenance is not taken from under it
    states.transition("hv02", HostState.CORDONED, "patch")
    states.transition("hv02", HostState.DRAINING, "draining")
    busy = host("reset", "hv02")
    assert busy.exit_code == 2 and "draining, not failed" in busy.output
    assert states.get("hv02").state is HostState.DRAINING
    states.transition("hv02", HostState.FAILED, "drain failed")
    assert host("reset", "hv02").exit_code == 0 and states.get("hv02").state is HostState.CORDONED
    steps = [r.step for r in AuditTrail(open_engine()).records(host="hv02")]
    assert steps == ["reset", "reset"]  # the refusal is recorded too


@pytest.mark.parametrize("args,option", [
    (["degraded", "hv01", "--reason", "  "], "--reason"),
    (["hardware-failed", "hv01", "--check", ""], "--check"),
])
def test_an_event_without_its_cause_is_refused_before_it_is_sent(args: list[str], option: str) -> None:
    from deployments.cli import app as deployments_app

    # an API URL that nothing listens on: the refusal must come before any request
    result = runner.invoke(deployments_app, ["event", *args, "--api-url", "http://127.0.0.1:9/api"])
    assert result.exit_code == 2 and option in result.output


@pytest.mark.parametrize("command", [["plan", "window"], ["plan", "rebalance"]])
def test_a_plan_for_another_cluster_than_the_snapshots_is_refused(command: list[str], tmp_path: Path) -> None:
    # The snapshot is of cluster demo: planning "prod" from it would silently plan demo under prod's name.
    snap = tmp_path / "snap.json"
    snap.write_text(dump_snapshot(demo_snapshot(4, 12)))
    wrong = runner.invoke(app, [*command, "prod", "--snapshot", str(snap)])
    assert wrong.exit_code == 2 and "'demo', not 'prod'" in wrong.output
    assert runner.invoke(app, [*command, "demo", "--snapshot", str(snap)]).exit_code == 0


def test_dirty_rates_of_an_unknown_cluster_are_refused(sim_inventory: Path, tmp_path: Path) -> None:
    # 'simulate dirty-rates lab' on an inventory without 'lab' wrote "{}" and exited 0
    out = tmp_path / "rates.json"
    wrong = runner.invoke(app, ["simulate", "dirty-rates", "lab", "-i", str(sim_inventory), "-o", str(out)])
    assert wrong.exit_code == 2 and "unknown cluster 'lab'" in wrong.output and not out.exists()
    right = runner.invoke(app, ["simulate", "dirty-rates", "demo", "-i", str(sim_inventory), "-o", str(out)])
    assert right.exit_code == 0 and out.exists()


def test_host_status_does_not_call_a_host_without_records_never_seen(sim_inventory: Path) -> None:
    # every host of a fresh inventory showed reason "never seen" (and since 1970-01-01): read as "not
    # reachable", of hosts libvirt answers for
    table = runner.invoke(app, ["host", "status", "-i", str(sim_inventory)])
    assert table.exit_code == 0 and "never seen" not in table.output
    assert "no maintenance recorded" in table.output
    rows = json.loads(runner.invoke(app, ["host", "status", "-i", str(sim_inventory), "--json"]).stdout)
    assert {(r["reason"], r["since"]) for r in rows} == {("no maintenance recorded", None)}


def test_a_database_that_does_not_answer_is_one_line_naming_it_with_its_password_masked(
        sim_inventory: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # nothing listens on loopback port 1: the connection is refused at once
    monkeypatch.setenv("HOSTMAINT_DB", "postgresql+psycopg://hm:S3cretPw@127.0.0.1:1/hostmaint")
    result = runner.invoke(app, ["host", "cordon", "hv01", "--inventory", str(sim_inventory), "--operator", "lee"])
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())
    assert text.startswith("failed: the hostmaint database did not answer (") and "run it again" in text, text
    assert "S3cretPw" not in result.output and "Traceback" not in result.output
