"""What a run that died mid-drain left is found by the next run and recorded truthfully (issue 15 b):
core steps on a SIMULATED fleet, no Prefect."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from hostmaint import maintenance as steps
from hostmaint.drivers.memory import SimulatedFleet
from hostmaint.errors import StepError, TransientDriverError
from hostmaint.models import HostState, Placement, Step, StepOutcome, Vm
from hostmaint.runtime import Runtime, open_runtime


def test_a_vm_whose_origin_was_recorded_and_that_runs_nowhere_is_recorded_once(sim_inventory: Path) -> None:
    rt = open_runtime(sim_inventory, fresh=True)
    rt.states.record_origin("ghost", "hv01", "run-that-died")  # its migration began; now it runs on no host
    run = steps.RunContext(flow="patch-host", reason="patch")

    assert steps.record_found_moves(rt, run, "hv01", steps.snapshot(rt, "demo")) == []
    [missing] = [r for r in rt.audit.records(host="hv01") if r.step == "vm-not-found"]
    assert missing.vm == "ghost" and missing.outcome is StepOutcome.UNKNOWN
    assert missing.inputs == {"started_by_run": "run-that-died"} and "runs on no host" in missing.details["note"]
    assert rt.states.origins("hv01") == {"ghost": "hv01"}  # still away: host status keeps naming it

    again = steps.RunContext(flow="patch-host", reason="patch")
    steps.record_found_moves(rt, again, "hv01", steps.snapshot(rt, "demo"))
    assert len([r for r in rt.audit.records(host="hv01") if r.step == "vm-not-found"]) == 1


def test_a_found_move_is_logged_with_the_vm_name_escaped(sim_inventory: Path, caplog: pytest.LogCaptureFixture) -> None:
    rt = open_runtime(sim_inventory, fresh=True)
    fleet = rt.hypervisor
    assert isinstance(fleet, SimulatedFleet)
    name = "web\n2026-12-06 hostmaint: all VMs verified"  # a tenant's name, forging a log line
    fleet.vms[name] = Vm(name=name, uuid="00000000-0000-0000-0000-00000000e011", host="hv02", memory_mib=512, vcpus=1)
    fleet.running["hv02"].add(name)
    fleet.save()
    rt.states.record_origin(name, "hv01", "run-that-died")

    with caplog.at_level(logging.WARNING, logger="hostmaint.maintenance"):
        found = steps.record_found_moves(rt, steps.RunContext(flow="patch-host"), "hv01", steps.snapshot(rt, "demo"))

    assert found == [name]
    lines = [r.getMessage() for r in caplog.records if "run-that-died" in r.getMessage()]
    assert lines and all("\n" not in line for line in lines), lines


class _SilentHosts:
    """The simulated fleet, with hosts whose libvirtd answers nothing while they are in ``dead``."""

    fleet: SimulatedFleet
    dead: set[str]

    def __getattr__(self, name: str) -> object:
        return getattr(self.fleet, name)

    def _alive(self, host: str) -> None:
        if host in self.dead:
            raise TransientDriverError("cannot connect to libvirtd: Connection refused", host)

    def discover(self, host: str):  # type: ignore[no-untyped-def]
        self._alive(host)
        return self.fleet.discover(host)

    def running_vms(self, host: str) -> tuple[str, ...]:
        self._alive(host)
        return self.fleet.running_vms(host)

    def _hidden(self, vm: str) -> bool:
        return False

    def locate(self, vm: str) -> tuple[str, ...]:  # as the libvirt driver: found nowhere + a host silent = error
        found = tuple(h for h in self.fleet.locate(vm) if h not in self.dead and not self._hidden(vm))
        if not found and self.dead:
            raise TransientDriverError(f"{vm} not found on the reachable hosts", sorted(self.dead)[0])
        return found


class TargetDiesAtSwitchOver(_SilentHosts):
    """The simulated fleet, but the target's libvirtd dies as ``vm``'s migration completes: the VM runs
    on the target, the migration reports an error, and the target answers nothing until ``revive``.
    With ``lands=False`` the VM is paused on its source for the switch-over when asked (running nowhere
    that answers), and resumes there: the migration did not happen."""

    def __init__(self, fleet: SimulatedFleet, vm: str, lands: bool = True) -> None:
        self.fleet, self.vm, self.lands = fleet, vm, lands
        self.dead: set[str] = set()
        self.paused: set[str] = set()

    def _hidden(self, vm: str) -> bool:
        return vm in self.paused  # paused for the switch-over: libvirt lists it nowhere that answers

    def migrate(self, vm, source, target, options, on_progress=None):  # type: ignore[no-untyped-def]
        if vm != self.vm:
            return self.fleet.migrate(vm, source, target, options, on_progress)
        if self.lands:
            self.fleet.migrate(vm, source, target, options, on_progress)
        else:
            self.paused.add(vm)
        self.dead.add(target)
        raise TransientDriverError("end of file while reading data: Input/output error", target)

    def revive(self) -> None:
        self.dead.clear()
        self.paused.clear()


@pytest.mark.parametrize("lands", [True, False], ids=["it-moved", "it-stayed"])
def test_a_migration_whose_target_died_mid_way_is_recorded_unknown_then_resolved_by_the_next_run(
        sim_inventory: Path, lands: bool) -> None:
    rt = open_runtime(sim_inventory, fresh=True)
    run = steps.RunContext(run_id="run-1", flow="patch-host", reason="patch")
    steps.cordon(rt, run, "hv01")
    plan = steps.plan_drain(rt, run, "hv01")
    first = plan.placements[0]
    fleet = rt.hypervisor
    assert isinstance(fleet, SimulatedFleet)
    faulty = TargetDiesAtSwitchOver(fleet, first.vm, lands=lands)
    rt.hypervisor = faulty  # type: ignore[assignment]

    with pytest.raises(StepError, match=f"whether {first.vm} moved is unknown"):
        steps.drain_host(rt, run, plan)

    [record] = [r for r in rt.audit.records(host="hv01") if r.step == "migrate" and r.vm == first.vm]
    assert record.outcome is StepOutcome.UNKNOWN  # not "failed": it may well have moved (and did, if lands)
    assert rt.states.origins("hv01").get(first.vm) == "hv01"  # kept: the next run must look
    assert rt.states.state("hv01") is not HostState.ACTIVE

    faulty.revive()
    rt.hypervisor = fleet
    again = steps.RunContext(run_id="run-2", flow="patch-host", reason="patch")
    found = steps.record_found_moves(rt, again, "hv01", steps.snapshot(rt, "demo"))

    resolved = [r for r in rt.audit.records(host="hv01") if r.vm == first.vm and r.seq > record.seq]
    if lands:
        assert found == [first.vm]
        assert [(r.step, r.outcome, r.inputs["target"]) for r in resolved] == \
            [("migration-found", StepOutcome.OK, first.target)]
    else:
        assert found == [] and rt.states.origins("hv01").get(first.vm) is None
        assert [(r.step, r.inputs["resolves"], r.inputs["planned_target"]) for r in resolved] == \
            [("migration-resolved", record.seq, first.target)]
        assert "did not happen" in resolved[0].details["note"]
    # a third run finds nothing more to say
    steps.record_found_moves(rt, steps.RunContext(run_id="run-3", flow="patch-host"), "hv01",
                             steps.snapshot(rt, "demo"))
    assert len([r for r in rt.audit.records(host="hv01") if r.vm == first.vm and r.seq > record.seq]) == 1


def test_a_failed_drain_leaves_the_host_cordoned_naming_the_vms_still_on_it(sim_inventory: Path) -> None:
    # what keeps the host out is the VM on it: "drain failed" alone sent the operator looking (issue 15)
    rt = open_runtime(sim_inventory, fresh=True)
    run = steps.RunContext(run_id="run-1", flow="patch-host", reason="patch")
    steps.cordon(rt, run, "hv02")
    plan = steps.plan_drain(rt, run, "hv02")
    stuck = plan.placements[-1].vm
    fleet = rt.hypervisor
    assert isinstance(fleet, SimulatedFleet)
    fleet.fail_migrations.add(stuck)

    with pytest.raises(StepError, match="drain of hv02 failed"):
        steps.drain_host(rt, run, plan)

    record = rt.states.get("hv02")
    assert record.state is HostState.CORDONED
    assert record.reason == f"drain failed: {stuck} still on it"
    assert stuck in fleet.running_vms("hv02")


class SourceLeftPaused(_SilentHosts):
    """The simulated fleet, but ``vm``'s migration ends with a copy of the VM paused on its source for a
    migration that no longer runs (what the lab showed when the source's libvirtd was killed at the
    switch-over: rounds 533955319 and 108838150). ``lands``: the target took the VM over (it runs
    there; the source's copy is stale); ``target_paused``: the target's copy is paused the same way;
    ``source_dies``: the source answers nothing until ``revive``."""

    def __init__(self, fleet: SimulatedFleet, vm: str, *, lands: bool = False, target_paused: bool = False,
                 source_dies: bool = False) -> None:
        self.fleet, self.vm, self.lands, self.target_paused, self.source_dies = fleet, vm, lands, target_paused, \
            source_dies
        self.dead: set[str] = set()
        self.left_paused: set[tuple[str, str]] = set()
        self.resumed: list[tuple[str, str]] = []
        self.discarded: list[tuple[str, str, str]] = []


    def migrate(self, vm, source, target, options, on_progress=None):  # type: ignore[no-untyped-def]
        if vm != self.vm:
            return self.fleet.migrate(vm, source, target, options, on_progress)
        self.left_paused.add((vm, source))
        if self.lands or self.target_paused:
            self.fleet.running[target].add(vm)  # the target's copy; the source's stays
            if self.target_paused:
                self.left_paused.add((vm, target))
        if self.source_dies:
            self.dead.add(source)
        raise TransientDriverError("cannot connect to libvirt: Connection refused", source)

    def stranded(self, host: str) -> tuple[str, ...]:
        self._alive(host)
        return tuple(sorted(v for v, h in self.left_paused if h == host))

    def resume(self, vm: str, host: str) -> None:
        self._alive(host)
        self.left_paused.remove((vm, host))
        self.resumed.append((vm, host))

    def discard_stale(self, vm: str, host: str, running_on: str) -> None:
        self._alive(host)
        self.left_paused.remove((vm, host))
        self.fleet.running[host].discard(vm)
        self.discarded.append((vm, host, running_on))

    def revive(self) -> None:
        self.dead.clear()


def _drained_with(sim_inventory: Path, **fault: bool) -> tuple[Runtime, SourceLeftPaused, Placement]:
    """A run's drain of hv01 whose first migration leaves its VM paused on hv01 (``fault``: how)."""
    rt = open_runtime(sim_inventory, fresh=True)
    run = steps.RunContext(run_id="run-1", flow="patch-host", reason="patch")
    steps.cordon(rt, run, "hv01")
    plan = steps.plan_drain(rt, run, "hv01")
    fleet = rt.hypervisor
    assert isinstance(fleet, SimulatedFleet)
    faulty = SourceLeftPaused(fleet, plan.placements[0].vm, **fault)
    rt.hypervisor = faulty  # type: ignore[assignment]
    with pytest.raises(StepError):
        steps.drain_host(rt, run, plan)
    return rt, faulty, plan.placements[0]


def test_a_vm_a_failed_migration_left_paused_on_its_source_is_resumed_by_the_drain(sim_inventory: Path) -> None:
    rt, faulty, first = _drained_with(sim_inventory)

    assert faulty.resumed == [(first.vm, "hv01")] and not faulty.left_paused
    [resumed] = [r for r in rt.audit.records(host="hv01") if r.step == "vm-resumed"]
    assert resumed.vm == first.vm and resumed.outcome is StepOutcome.OK and resumed.run_id == "run-1"
    assert "resumed there" in resumed.details["note"]


def test_a_vm_left_paused_on_a_source_that_died_is_resumed_by_the_next_run(sim_inventory: Path) -> None:
    rt, faulty, first = _drained_with(sim_inventory, source_dies=True)
    vm = first.vm
    assert faulty.left_paused == {(vm, "hv01")} and not faulty.resumed  # its host did not answer

    faulty.revive()
    vms = sorted(faulty.fleet.vms)
    with pytest.raises(StepError, match=f"{vm} is paused on hv01 by a migration that no longer runs"):
        steps.check_invariants(rt, "demo", vms)  # not running, nor in transit
    again = steps.RunContext(run_id="run-2", flow="patch-host", reason="patch")
    steps.record_found_moves(rt, again, "hv01", steps.snapshot(rt, "demo"))

    assert faulty.resumed == [(vm, "hv01")]
    after = [(r.step, r.run_id) for r in rt.audit.records(host="hv01") if r.vm == vm and r.step != "migrate"]
    assert after == [("vm-resumed", "run-2"), ("migration-resolved", "run-2")], after
    steps.check_invariants(rt, "demo", vms)


def test_the_stale_source_copy_of_a_migration_that_completed_is_removed(sim_inventory: Path) -> None:
    # round 108838150: the target ran the VM, its source's copy stayed paused, and every later discovery
    # refused the cluster ("vm01 runs more than once") until an operator stepped in
    rt, faulty, first = _drained_with(sim_inventory, lands=True, source_dies=True)
    faulty.revive()
    snap = steps.snapshot(rt, "demo")  # the paused copy is not a second run of the VM
    assert [v.host for v in snap.vms if v.name == first.vm] == [first.target]

    again = steps.RunContext(run_id="run-2", flow="patch-host", reason="patch")
    steps.record_found_moves(rt, again, "hv01", snap)

    assert faulty.discarded == [(first.vm, "hv01", first.target)] and not faulty.resumed
    [removed] = [r for r in rt.audit.records(host="hv01") if r.step == "stale-copy-removed"]
    assert removed.vm == first.vm and removed.inputs == {"paused_on": "hv01", "runs_on": first.target}
    assert rt.hypervisor.locate(first.vm) == (first.target,)
    steps.check_invariants(rt, "demo", sorted(faulty.fleet.vms))


def test_a_vm_paused_on_two_hosts_is_left_to_the_operator(sim_inventory: Path) -> None:
    rt, faulty, first = _drained_with(sim_inventory, target_paused=True)

    assert not faulty.resumed and not faulty.discarded
    assert faulty.left_paused == {(first.vm, "hv01"), (first.vm, first.target)}
    left = [r for r in rt.audit.records() if r.step == "vm-resumed"]
    assert left and all(r.outcome is StepOutcome.UNKNOWN for r in left)
    assert "for an operator to say" in left[0].details["note"]


class RecoveredByLibvirt(SourceLeftPaused):
    """A restarted libvirtd that recovers the migration job itself: the first reading after it answers
    shows the VM paused with no job, the next finds libvirt has resumed it (the lab's race)."""

    def __init__(self, fleet: SimulatedFleet, vm: str) -> None:
        super().__init__(fleet, vm, source_dies=True)
        self.readings = 0

    def stranded(self, host: str) -> tuple[str, ...]:
        if any(h == host for _, h in self.left_paused):
            self.readings += 1
            if self.readings > 1:  # libvirt's reconnect thread got there between our two readings
                self.left_paused.clear()
        return super().stranded(host)


def test_a_vm_libvirt_resumes_itself_after_a_restart_is_left_to_it(sim_inventory: Path) -> None:
    # a VM read once as stranded is settled only when a second reading, a moment later, agrees: the
    # restarted libvirtd's own recovery would otherwise race ours and the record would claim its work
    rt, _, first = _drained_with(sim_inventory, source_dies=True)
    racing = RecoveredByLibvirt(rt.hypervisor.fleet, first.vm)  # type: ignore[attr-defined]
    racing.left_paused.add((first.vm, "hv01"))
    rt.hypervisor = racing  # type: ignore[assignment]

    settled = steps.settle_stranded(rt, steps.RunContext(run_id="run-2", flow="patch-host"), "demo")

    assert settled == [] and racing.readings == 2 and not racing.resumed and not racing.discarded
    assert not [r for r in rt.audit.records() if r.run_id == "run-2"]


def _died_mid_move(sim_inventory: Path, *, drain: bool, autostarts: bool) -> tuple[Runtime, SimulatedFleet, Placement]:
    """A run that started hv01's first planned move (``drain``: as a drain, with the VM's origin; else
    as a return or rebalance) and died: libvirt finished the move without it, so the VM runs on its
    target defined without its autostart flag (``autostarts``: what it had on hv01)."""
    rt = open_runtime(sim_inventory, fresh=True)
    dead = steps.RunContext(run_id="run-that-died", flow="patch-host" if drain else "return-host", reason="patch")
    steps.cordon(rt, dead, "hv01")
    plan = steps.plan_drain(rt, dead, "hv01")
    first = plan.placements[0]
    fleet = rt.hypervisor
    assert isinstance(fleet, SimulatedFleet)
    if autostarts:
        fleet.set_autostart(first.vm, "hv01", True)
    if drain:
        rt.states.record_origin(first.vm, "hv01", dead.run_id)
    steps.record_moves(rt, dead, plan, "hv01" if drain else None, drain=drain)
    fleet.land_unwatched(first.vm, first.target)
    assert fleet.autostarts(first.target)[first.vm] is False  # what PERSIST_DEST leaves on the target
    return rt, fleet, first


@pytest.mark.parametrize("autostarts", [True, False], ids=["autostart", "no-autostart"])
@pytest.mark.parametrize("drain", [True, False], ids=["drain", "return"])
def test_a_move_a_dead_run_left_gets_back_the_autostart_it_had_on_its_source(
        sim_inventory: Path, drain: bool, autostarts: bool) -> None:
    # after a power loss the VM must start with its new host as it did with its old one; the dead run's
    # driver never saw the move end, so never put the flag back (libvirt's PERSIST_DEST drops it)
    rt, fleet, first = _died_mid_move(sim_inventory, drain=drain, autostarts=autostarts)
    again = steps.RunContext(run_id="run-2", flow="patch-host", reason="patch")

    if drain:
        found = steps.record_found_moves(rt, again, "hv01", steps.snapshot(rt, "demo"))
    else:
        found = steps.settle_earlier_moves(rt, again, "demo")

    assert found == [first.vm]
    assert fleet.autostarts(first.target)[first.vm] is autostarts
    [record] = [r for r in rt.audit.records(host="hv01") if r.step == "migration-found"]
    assert record.details["autostart"] is autostarts
    assert "recorded by run run-that-died" in record.details["autostart_from"]
    assert record.details.get("autostart_set") == (first.target if autostarts else None)


def _moved_by_an_older_run(sim_inventory: Path) -> tuple[Runtime, Placement, SimulatedFleet]:
    """A run of an older version recorded a move of hv01's first VM without its autostart flag and died;
    libvirt finished the move (the flag dropped). Returns the runtime, the move and the fleet."""
    rt = open_runtime(sim_inventory, fresh=True)
    dead = steps.RunContext(run_id="run-that-died", flow="return-host")
    first = steps.plan_drain(rt, dead, "hv01").placements[0]
    fleet = rt.hypervisor
    assert isinstance(fleet, SimulatedFleet)
    with steps.audited(rt, dead, Step.MOVES_STARTED, cluster="demo",
                       inputs={"moves": [{"vm": first.vm, "source": "hv01", "target": first.target}]}):
        pass
    fleet.land_unwatched(first.vm, first.target)
    return rt, first, fleet


def test_a_found_move_whose_autostart_nothing_tells_says_so_and_sets_nothing(
        sim_inventory: Path, caplog: pytest.LogCaptureFixture) -> None:
    # a run of an older version recorded its moves without the flag, and the source defines the VM no
    # more (the move undefined it there): hostmaint cannot know, and must not guess either way
    rt, first, fleet = _moved_by_an_older_run(sim_inventory)

    with caplog.at_level(logging.WARNING, logger="hostmaint.maintenance"):
        assert steps.settle_earlier_moves(rt, steps.RunContext(run_id="run-2"), "demo") == [first.vm]

    [record] = [r for r in rt.audit.records(host="hv01") if r.step == "migration-found"]
    assert record.details["autostart"] == "unknown"
    assert "no longer defines" in record.details["autostart_note"]
    assert f"virsh autostart {first.vm}" in record.details["autostart_note"]
    assert fleet.autostarts(first.target)[first.vm] is False  # untouched
    assert any("is not known" in r.getMessage() for r in caplog.records)


def test_a_found_move_takes_the_autostart_from_the_source_definition_when_no_record_has_it(
        sim_inventory: Path) -> None:
    # an older run's record, but the VM's definition still on its source says (its libvirtd never
    # undefined it): that is what it had there
    rt, first, fleet = _moved_by_an_older_run(sim_inventory)
    rt.hypervisor = _DefinedOnSourceToo(fleet, first.vm, "hv01")  # type: ignore[assignment]

    steps.settle_earlier_moves(rt, steps.RunContext(run_id="run-2"), "demo")

    [record] = [r for r in rt.audit.records(host="hv01") if r.step == "migration-found"]
    assert record.details["autostart"] is True and record.details["autostart_from"] == "its definition still on hv01"
    assert fleet.autostarts(first.target)[first.vm] is True


class _DefinedOnSourceToo:
    """The simulated fleet, where ``vm`` is still defined (shut off, autostart) on ``source`` as well."""

    def __init__(self, fleet: SimulatedFleet, vm: str, source: str) -> None:
        self.fleet, self.vm, self.source = fleet, vm, source

    def __getattr__(self, name: str) -> object:
        return getattr(self.fleet, name)

    def autostarts(self, host: str) -> dict[str, bool]:
        flags = self.fleet.autostarts(host)
        return {**flags, self.vm: True} if host == self.source else flags
