"""What a drain's audit record says of how it ran, beside its migrations' results."""

from __future__ import annotations

from pathlib import Path

from hostmaint import maintenance as steps
from hostmaint.drivers.memory import SimulatedFleet
from hostmaint.runtime import open_runtime


def test_a_drain_whose_pauses_outgrew_the_limit_says_what_switch_over_it_reserved(sim_inventory: Path) -> None:
    # hosts that switch over slower than the inventory says: the operator learns it from the record, and
    # can set migration.switchover_ms so the next drains' first migrations fit too
    rt = open_runtime(sim_inventory, fresh=True)
    run = steps.RunContext(run_id="run-1", flow="patch-host", reason="patch")
    steps.cordon(rt, run, "hv02")
    plan = steps.plan_drain(rt, run, "hv02")
    fleet = rt.hypervisor
    assert isinstance(fleet, SimulatedFleet)
    fleet.slow_switchover_ms["hv02"] = 180.0

    steps.drain_host(rt, run, plan)

    drain = next(r for r in rt.audit.records(host="hv02") if r.step == "drain")
    learned = drain.details["switchover_learned_ms"]
    assert learned > 30, drain.details
    assert f"reserved {learned:.0f} ms for the switch-over" in drain.details["switchover_note"]
    assert "migration.switchover_ms is 30" in drain.details["switchover_note"]
    pauses = [m["downtime_ms"] for m in drain.details["migrations"]]
    assert max(pauses) > 300 and pauses[-1] <= 300, pauses  # the first ones overshot, the last fit


def test_a_drain_within_the_limit_says_nothing_of_the_switch_over(sim_inventory: Path) -> None:
    rt = open_runtime(sim_inventory, fresh=True)
    run = steps.RunContext(run_id="run-1", flow="patch-host", reason="patch")
    steps.cordon(rt, run, "hv02")
    steps.drain_host(rt, run, steps.plan_drain(rt, run, "hv02"))
    drain = next(r for r in rt.audit.records(host="hv02") if r.step == "drain")
    assert "switchover_learned_ms" not in drain.details
