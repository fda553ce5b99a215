"""Stopping a run safely (issue 19 item 1), in the core: a Cancellation set mid-drain admits nothing
more, aborts what runs in pre-copy, lets post-copy finish, and leaves the host cordoned "cancelled by X"
with every VM on exactly one host and an audit record; a stand-down from outside the run finishes a
run that was killed, and a re-run then drains the rest."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from hostmaint import maintenance as steps
from hostmaint.cancel import UNKNOWN, Cancellation, RunCancelled
from hostmaint.migration import EventKind, SchedulerPolicy, drain
from hostmaint.models import HostState, Limits, MigrationOptions, StepOutcome
from hostmaint.runtime import Runtime, open_runtime
from tests.unit.test_migration_drain import ControllableFake, Script, fleet, make_plan


def test_cancel_lets_post_copy_finish_and_aborts_the_rest() -> None:
    moves = [("busy", "src", "dst", 1024), ("calm", "src", "dst", 1024), ("later", "src", "dst", 512)]
    # "calm" runs long enough to be in flight when the cancel comes; "later" waits behind the limit of 2
    hv = fleet(moves, cls=ControllableFake, scripts={"busy": Script(converges=False),
                                                     "calm": Script(steps=400, step_s=0.002)})
    stop = Cancellation()

    def on_event(event) -> None:  # type: ignore[no-untyped-def]
        if event.kind is EventKind.ESCALATED and event.detail.get("action") == "switch-to-post-copy":
            stop.cancel("alice")

    report = drain(make_plan(moves), hv, Limits(migrations_per_source=2), options=MigrationOptions(stall_seconds=3),
                   policy=SchedulerPolicy.fixed(2, allow_post_copy=True), cancel=stop, on_event=on_event,
                   poll_s=0.001)
    outcome = {r.vm: r.outcome for r in report.results}
    assert outcome == {"busy": StepOutcome.OK, "calm": StepOutcome.ABORTED, "later": StepOutcome.ABORTED}
    assert hv.location == {"busy": "dst", "calm": "src", "later": "src"}
    assert "busy" not in hv.aborts and "calm" in hv.aborts
    assert [vm for vm, _ in hv.calls] == ["busy", "calm"]  # nothing admitted after the cancel


class Ticking:
    """A fake clock and sleep for the stand-down's wait (no real time passes)."""

    def __init__(self) -> None:
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def rt(sim_inventory: Path) -> Runtime:
    return open_runtime(sim_inventory, fresh=True)


def _where(rt: Runtime) -> dict[str, tuple[str, ...]]:
    snap = steps.snapshot(rt, "demo")
    return {v.name: rt.hypervisor.locate(v.name) for v in snap.vms}


def test_drain_cancelled_mid_way_leaves_the_host_cordoned_with_who_and_every_vm_once(rt: Runtime) -> None:
    host = "hv01"
    run = steps.RunContext(run_id="run-1", flow="patch-host", operator="bob")
    before = _where(rt)
    steps.cordon(rt, run, host)
    plan = steps.plan_drain(rt, run, host)
    assert len(plan.placements) >= 2
    stop = Cancellation()
    started: list[str] = []

    def on_event(event) -> None:  # type: ignore[no-untyped-def]
        if event.kind is EventKind.STARTED:
            started.append(event.vm)
        if event.kind is EventKind.FINISHED:
            stop.cancel("carol (hostmaint run cancel)")

    with pytest.raises(RunCancelled, match="cancelled by carol"):
        steps.drain_host(rt, run, plan, on_event=on_event, cancel=stop)
    record = rt.states.get(host)
    assert record.state is HostState.CORDONED
    assert record.reason.startswith("cancelled by carol (hostmaint run cancel)")
    where = _where(rt)
    assert set(where) == set(before) and all(len(h) == 1 for h in where.values())
    assert any(h == (host,) for h in where.values()), "the cancel moved everything anyway"
    migrated = [r for r in rt.audit.records(host=host) if r.step == "migrate"]
    assert {r.vm for r in migrated} == {p.vm for p in plan.placements}  # every VM of the plan is accounted for
    assert {r.vm for r in migrated if r.outcome is StepOutcome.OK} <= set(started)
    assert set(started) < {p.vm for p in plan.placements}  # nothing was admitted after the cancel
    assert all(r.outcome is StepOutcome.ABORTED for r in migrated if r.vm not in started)
    drain_rec = [r for r in rt.audit.records(host=host) if r.step == "drain"][-1]
    assert drain_rec.outcome is StepOutcome.FAILED and drain_rec.details["cancelled_by"].startswith("carol")

    # the same stand-down from outside the run's process (Prefect's hook) finds nothing more to do
    ticks = Ticking()
    again = steps.stand_down(rt, run, host, stop.reason, sleep=ticks.sleep, clock=ticks.clock)
    assert again == rt.states.get(host) and again.state is HostState.CORDONED
    cancel_rec = [r for r in rt.audit.records(host=host) if r.step == "cancel"][-1]
    assert cancel_rec.details["note"] == "already stopped safely"

    # a re-run finishes the drain: nothing is left on the host, and it is drained, not active
    rerun = steps.RunContext(run_id="run-2", flow="patch-host", operator="bob")
    steps.cordon(rt, rerun, host)
    steps.drain_host(rt, rerun, steps.plan_drain(rt, rerun, host))
    assert rt.hypervisor.running_vms(host) == ()
    assert rt.states.state(host) is HostState.DRAINED


def test_stand_down_after_a_killed_run_records_its_moves_and_cordons(rt: Runtime) -> None:
    # The run's process was killed mid-drain: its state says draining, one VM's origin was recorded and
    # the VM landed on its target with no migrate record (libvirt finished it without the run).
    host = "hv02"
    run = steps.RunContext(run_id="killed", flow="patch-host")
    steps.cordon(rt, run, host)
    plan = steps.plan_drain(rt, run, host)
    first = plan.placements[0]
    rt.states.transition(host, HostState.DRAINING, "draining", run.run_id)
    rt.states.record_origin(first.vm, host, run.run_id)
    rt.hypervisor.migrate(first.vm, host, first.target, MigrationOptions())
    ticks = Ticking()
    record = steps.stand_down(rt, run, host, "cancelled by the Prefect UI", sleep=ticks.sleep, clock=ticks.clock)
    assert record.state is HostState.CORDONED and record.reason.startswith("cancelled by the Prefect UI")
    found = [r for r in rt.audit.records(host=host) if r.step == "migration-found"]
    assert [(r.vm, r.inputs["target"]) for r in found] == [(first.vm, first.target)]
    assert all(len(h) == 1 for h in _where(rt).values())
    assert rt.states.get(host).prior_state is HostState.ACTIVE  # the maintenance stays open for a re-run


def test_stand_down_leaves_a_host_of_another_run_alone(rt: Runtime) -> None:
    steps.cordon(rt, steps.RunContext(run_id="other"), "hv03")
    ticks = Ticking()
    record = steps.stand_down(rt, steps.RunContext(run_id="mine"), "hv03", "cancelled by x",
                              sleep=ticks.sleep, clock=ticks.clock)
    assert record.reason != steps.cancelled_reason("cancelled by x")
    assert [r.outcome for r in rt.audit.records(host="hv03") if r.step == "cancel"] == [StepOutcome.SKIPPED]


def test_a_patching_host_keeps_its_state_so_a_rerun_resumes_and_verifies(rt: Runtime) -> None:
    host = "hv04"
    run = steps.RunContext(run_id="p")
    steps.cordon(rt, run, host)
    for to in (HostState.DRAINING, HostState.DRAINED, HostState.PATCHING):
        rt.states.transition(host, to, to.value, run.run_id)
    ticks = Ticking()
    record = steps.stand_down(rt, run, host, "cancelled by dave", sleep=ticks.sleep, clock=ticks.clock)
    assert record.state is HostState.PATCHING and record.reason.startswith("cancelled by dave")


def test_check_between_steps_raises_with_who() -> None:
    stop = Cancellation()
    stop.check("hv01", "update")
    stop.cancel()
    stop.cancel("erin")
    with pytest.raises(RunCancelled, match="hv01: cancelled by erin"):
        stop.check("hv01", "update")


# --- returns and rebalances: moves, not a host's maintenance -------------------------------------


def _evacuated_and_back(rt: Runtime, host: str) -> steps.RunContext:
    """``host`` drained by one run, then verified and back in service with its VMs away (origins kept)."""
    run = steps.RunContext(run_id="evac", flow="evacuate-host")
    steps.cordon(rt, run, host)
    steps.drain_host(rt, run, steps.plan_drain(rt, run, host))
    for to in (HostState.VERIFYING,):
        rt.states.transition(host, to, to.value, run.run_id)
    steps.uncordon(rt, run, host)
    assert rt.states.state(host) is HostState.ACTIVE and len(rt.states.origins(host)) >= 2
    return run


def _cancel_after_first_move(by: str) -> tuple[Cancellation, object]:
    stop = Cancellation()

    def on_event(event) -> None:  # type: ignore[no-untyped-def]
        if event.kind is EventKind.FINISHED:
            stop.cancel(by)

    return stop, on_event


def test_a_return_cancelled_mid_way_stops_its_moves_and_the_host_stays_truly_active(rt: Runtime) -> None:
    host = "hv01"
    _evacuated_and_back(rt, host)
    away = set(rt.states.origins(host))
    before = _where(rt)
    run = steps.RunContext(run_id="ret", flow="return-host", operator="fay")
    stop, on_event = _cancel_after_first_move("fay (hostmaint run cancel)")
    with pytest.raises(RunCancelled, match="return of VMs to hv01 cancelled by fay"):
        steps.return_vms(rt, run, host, on_event=on_event, cancel=stop)  # type: ignore[arg-type]
    where = _where(rt)
    assert set(where) == set(before) and all(len(h) == 1 for h in where.values())
    home = {vm for vm in away if where[vm] == (host,)}
    assert home and home < away, "the cancel stopped nothing, or nothing moved before it"
    # a VM that came home has no origin left; one still away keeps it, so a later return brings it
    assert set(rt.states.origins(host)) == away - home
    # a return takes no host out of service: the host was verified and stays active
    assert rt.states.state(host) is HostState.ACTIVE
    records = rt.audit.records(run_id="ret")
    (ret,) = [r for r in records if r.step == "return-vms"]
    assert ret.outcome is StepOutcome.FAILED and ret.details["cancelled_by"].startswith("fay")
    migrated = {r.vm: r.outcome for r in records if r.step == "migrate"}
    assert set(migrated) == away and {vm for vm, o in migrated.items() if o is StepOutcome.OK} == home
    # the stand-down from outside finds every move recorded: nothing more to do
    ticks = Ticking()
    assert steps.stand_down_moves(rt, run, "demo", stop.reason, sleep=ticks.sleep, clock=ticks.clock) == []
    (cancel,) = [r for r in rt.audit.records(run_id="ret") if r.step == "cancel"]
    assert cancel.details["note"] == "already stopped safely" and cancel.host is None

    # the next return brings the rest home
    steps.return_vms(rt, steps.RunContext(run_id="ret-2"), host)
    assert rt.states.origins(host) == {}
    assert all(_where(rt)[vm] == (host,) for vm in away)


def test_a_return_stopped_by_a_signal_records_who_asked_once_the_lookup_ends(rt: Runtime) -> None:
    # a SIGTERM says only that someone asked; who is looked up on the orchestrator meanwhile. Seen in
    # the suite under load: the return's moves settled first and its record said "not recorded".
    host = "hv01"
    _evacuated_and_back(rt, host)
    run = steps.RunContext(run_id="sig", flow="return-host", operator="fay")
    stop = Cancellation()

    def on_event(event) -> None:  # type: ignore[no-untyped-def]
        if event.kind is EventKind.FINISHED and not stop.is_set():
            stop.naming()
            stop.cancel()  # what the signal handler does: stop now, the name comes later
            threading.Timer(0.5, stop.named, args=("nina (hostmaint run cancel)",)).start()

    with pytest.raises(RunCancelled, match="cancelled by nina"):
        steps.return_vms(rt, run, host, on_event=on_event, cancel=stop)  # type: ignore[arg-type]
    (ret,) = [r for r in rt.audit.records(run_id="sig") if r.step == "return-vms"]
    assert ret.details["cancelled_by"] == "nina (hostmaint run cancel)"


def test_who_waits_only_for_a_lookup_under_way() -> None:
    stop = Cancellation()
    stop.cancel()
    assert stop.who(wait_s=5) == UNKNOWN  # nobody is looking: no wait, and the truth is "not recorded"
    looked_up = Cancellation()
    looked_up.naming()
    looked_up.cancel()
    threading.Timer(0.2, looked_up.named).start()  # the lookup found nobody
    assert looked_up.who(wait_s=5) == UNKNOWN and looked_up.is_set()
    slow = Cancellation()
    slow.naming()
    slow.cancel()
    assert slow.who(wait_s=0.1) == UNKNOWN  # a lookup that hangs holds the record up only so long


def test_a_rebalance_cancelled_mid_way_admits_nothing_more_and_every_vm_runs_once(rt: Runtime) -> None:
    from hostmaint.placement import plan_rebalance

    _evacuated_and_back(rt, "hv02")  # an empty host: the rebalance has work
    before = _where(rt)
    states = {h: r.state for h, r in rt.states.all().items()}
    plan = plan_rebalance(steps.snapshot(rt, "demo"), 10, prefer_origin=False)
    assert len(plan.moves) >= 3
    run = steps.RunContext(run_id="reb", flow="rebalance-cluster", operator="gus")
    stop, on_event = _cancel_after_first_move("gus")
    with pytest.raises(RunCancelled, match="rebalance of demo cancelled by gus"):
        steps.rebalance(rt, run, plan, on_event=on_event, cancel=stop)  # type: ignore[arg-type]
    where = _where(rt)
    assert set(where) == set(before) and all(len(h) == 1 for h in where.values())
    moved = {vm for vm in where if where[vm] != before[vm]}
    assert moved and len(moved) < len(plan.moves)
    assert {h: r.state for h, r in rt.states.all().items()} == states  # no host's state changed
    migrated = {r.vm: r.outcome for r in rt.audit.records(run_id="reb") if r.step == "migrate"}
    assert set(migrated) == {m.placement.vm for m in plan.moves}
    assert {vm for vm, o in migrated.items() if o is StepOutcome.OK} == moved
    assert all(o is StepOutcome.ABORTED for vm, o in migrated.items() if vm not in moved)


class MigratingFleet:
    """The simulated fleet as a killed run's libvirt left it: one move still in pre-copy (a paused copy on
    its target), one in post-copy (paused on its source); aborts are recorded (and undo the copy)."""

    def __init__(self, hv: object, precopy: tuple[str, str, str], postcopy: tuple[str, str, str]) -> None:
        self.hv = hv
        self.copies = {precopy[0]: precopy[2], postcopy[0]: postcopy[2]}
        self.paused_source = {postcopy[0]: postcopy[1]}
        self.aborts: list[str] = []

    def __getattr__(self, name: str) -> object:
        return getattr(self.hv, name)

    def in_migration(self, host: str) -> tuple[str, ...]:
        incoming = [vm for vm, target in self.copies.items() if target == host]
        return tuple(incoming + [vm for vm, source in self.paused_source.items() if source == host])

    def abort(self, vm: str, source: str) -> None:
        self.aborts.append(vm)
        self.copies.pop(vm, None)


def test_stand_down_of_a_killed_rebalance_aborts_pre_copy_lets_post_copy_land_and_records_it(rt: Runtime) -> None:
    from hostmaint.placement import plan_rebalance

    _evacuated_and_back(rt, "hv03")
    plan = plan_rebalance(steps.snapshot(rt, "demo"), 10, prefer_origin=False)
    first, second, *_ = [m.placement for m in plan.moves]
    run = steps.RunContext(run_id="killed-reb", flow="rebalance-cluster")
    evac = steps.EvacuationPlan(cluster="demo", hosts=(), snapshot_digest=plan.snapshot_digest,
                                placements=tuple(m.placement for m in plan.moves))
    steps.record_moves(rt, run, evac)  # then the process was killed while two moves ran
    fake = MigratingFleet(rt.hypervisor, (first.vm, first.source, first.target),
                          (second.vm, second.source, second.target))
    rt.hypervisor = fake  # type: ignore[assignment]
    ticks = Ticking()

    def post_copy_lands(seconds: float) -> None:
        ticks.sleep(seconds)
        if fake.paused_source:  # the post-copy move ends on its target a moment later
            fake.hv.migrate(second.vm, second.source, second.target, MigrationOptions())  # type: ignore[attr-defined]
            fake.paused_source.clear()
            fake.copies.pop(second.vm, None)

    found = steps.stand_down_moves(rt, run, "demo", "cancelled by hal", sleep=post_copy_lands, clock=ticks.clock)
    assert fake.aborts == [first.vm]  # the post-copy move was let finish
    assert found == [second.vm]
    assert rt.hypervisor.locate(first.vm) == (first.source,) and rt.hypervisor.locate(second.vm) == (second.target,)
    recs = rt.audit.records(run_id="killed-reb")
    (cancel,) = [r for r in recs if r.step == "cancel"]
    assert cancel.details["aborted"] == [first.vm] and cancel.details["unsettled"] == []
    assert [(r.vm, r.inputs["target"]) for r in recs if r.step == "migration-found"] == [(second.vm, second.target)]
    # again (the hook after the flow's own stand-down): the found move is recorded now; the aborted one
    # is looked at again (named in the cancel record, no move of its own) and found on its source
    assert steps.stand_down_moves(rt, run, "demo", "cancelled by hal", sleep=ticks.sleep, clock=ticks.clock) == []


def test_a_run_that_moved_nothing_gets_no_cancel_record_for_moves(rt: Runtime) -> None:
    ticks = Ticking()
    assert steps.stand_down_moves(rt, steps.RunContext(run_id="none"), "demo", "cancelled by x",
                                  sleep=ticks.sleep, clock=ticks.clock) == []
    assert not rt.audit.records(run_id="none")
