"""What a drain's audit record says of how it ran, beside its migrations' results."""

from __future__ import annotations

from pathlib import Path

from hostmaint import maintenance as steps
from hostmaint.audit import AuditRecord
from hostmaint.drivers.memory import SimulatedFleet
from hostmaint.runtime import Runtime, open_runtime


def slow_fleet(sim_inventory: Path, **switchover_ms: float) -> Runtime:
    """A fresh simulated cluster whose hosts named take ``switchover_ms`` beyond QEMU's limit to switch over."""
    rt = open_runtime(sim_inventory, fresh=True)
    fleet = rt.hypervisor
    assert isinstance(fleet, SimulatedFleet)
    fleet.slow_switchover_ms.update(switchover_ms)
    return rt


def drain_record(rt: Runtime, host: str, run_id: str) -> AuditRecord:
    """Cordon and drain ``host`` as a patch does; its drain's audit record."""
    run = steps.RunContext(run_id=run_id, flow="patch-host", reason="patch")
    steps.cordon(rt, run, host)
    steps.drain_host(rt, run, steps.plan_drain(rt, run, host))
    return next(r for r in rt.audit.records(host=host, run_id=run_id) if r.step == "drain")


def test_a_drain_whose_pauses_outgrew_the_limit_says_what_switch_over_it_reserved(sim_inventory: Path) -> None:
    # hosts that switch over slower than the inventory says: the operator learns it from the record, and
    # can set migration.switchover_ms so the next drains' first migrations fit too
    drain = drain_record(slow_fleet(sim_inventory, hv02=180.0), "hv02", "run-1")
    learned = drain.details["switchover_learned_ms"]
    assert learned > 30, drain.details
    assert f"reserved {learned:.0f} ms for the switch-over" in drain.details["switchover_note"]
    assert "migration.switchover_ms is 30" in drain.details["switchover_note"]
    pauses = [m["downtime_ms"] for m in drain.details["migrations"]]
    assert max(pauses) > 300 and pauses[-1] <= 300, pauses  # the first ones overshot, the last fit


def test_a_drain_within_the_limit_says_nothing_of_the_switch_over(sim_inventory: Path) -> None:
    drain = drain_record(slow_fleet(sim_inventory), "hv02", "run-1")
    assert "switchover_learned_ms" not in drain.details


def test_the_clusters_next_drain_starts_from_the_switch_over_a_drain_learned(sim_inventory: Path) -> None:
    # a drain learns only from a pause over the limit, too late for what already runs: on the lab the
    # first migrations of every drain overshot; the next drain of the cluster starts where it ended
    rt = slow_fleet(sim_inventory, hv02=180.0, hv03=180.0)
    first = drain_record(rt, "hv02", "run-1")
    learned = first.details["switchover_learned_ms"]
    assert "switchover_start_ms" not in first.details  # the inventory's 30 ms: nothing learned before

    second = drain_record(rt, "hv03", "run-2")
    assert second.details["switchover_start_ms"] == learned
    assert all(m["downtime_ms"] <= 300 for m in second.details["migrations"]), second.details["migrations"]
    assert "switchover_learned_ms" not in second.details  # nothing over the limit: nothing more to learn


def test_a_learned_switch_over_goes_after_drains_that_learned_nothing_and_never_takes_the_whole_limit(
        sim_inventory: Path) -> None:
    rt = open_runtime(sim_inventory, fresh=True)
    rt.states.record_switchover("demo", 160.0, "run-1")
    assert steps.switchover_start_ms(rt.states, "demo", 30.0, 300) == 160.0
    assert steps.switchover_start_ms(rt.states, "other", 30.0, 300) == 30.0  # another cluster's hosts
    for i in range(steps.SWITCHOVER_RECENT - 1):
        rt.states.record_switchover("demo", None, f"run-{i + 2}")
    assert steps.switchover_start_ms(rt.states, "demo", 30.0, 300) == 160.0  # still among the recent drains
    rt.states.record_switchover("demo", None, "run-9")
    assert steps.switchover_start_ms(rt.states, "demo", 30.0, 300) == 30.0
    # a figure learned under a larger limit leaves QEMU a tenth of a smaller one
    rt.states.record_switchover("demo", 450.0, "run-10")
    assert steps.switchover_start_ms(rt.states, "demo", 30.0, 300) == 270.0
    assert steps.switchover_start_ms(rt.states, "demo", 100.0, 1000) == 450.0
