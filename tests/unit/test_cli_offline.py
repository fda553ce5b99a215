"""CLI commands that work offline from a snapshot: no Prefect server, no hosts."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from hostmaint.cli import app
from hostmaint.fleet import dump_snapshot
from hostmaint.simulation import demo_snapshot

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
    assert negative.exit_code == 2 and first in negative.output and ">= 0" in negative.output
