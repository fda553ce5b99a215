"""The resize-vm flow and the vm-starved runbook on a SIMULATED fleet, under a real temporary Prefect
server: plan, lock, carry out, audit; a refused or dry-run plan changes nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.resize_vm import ResizeRequest, resize_vm
from flows.runbooks.vm_starved import MEMORY_EVENT, vm_starved_runbook
from hostmaint.audit import AuditTrail
from hostmaint.db import open_engine
from hostmaint.drivers.memory import SimulatedFleet
from hostmaint.errors import InputError
from hostmaint.models import GuestCell, HostState, Step, StepOutcome, Trigger
from hostmaint.runtime import open_runtime
from hostmaint.simulated_fleet import demo_packages, demo_snapshot, write_simulated_fleet

pytestmark = pytest.mark.usefixtures("prefect_server")


def the_vm(inventory: Path) -> tuple[str, int, int]:
    fleet = SimulatedFleet.load(inventory.parent / "fleet-state.json")
    vm = demo_snapshot(4, 12).vms[0].name
    return vm, fleet.vms[vm].vcpus, fleet.vms[vm].memory_mib


def resize_records(vm: str) -> list[dict[str, object]]:
    return [r.to_dict() for r in AuditTrail(open_engine()).records() if r.step == Step.RESIZE and r.vm == vm]


def test_resize_vm_grows_the_vm_and_audits_before_and_after(growable_inventory: Path) -> None:
    vm, vcpus, mib = the_vm(growable_inventory)
    result = resize_vm(ResizeRequest(vm=vm, vcpus=vcpus + 1, memory=f"{mib + 512}M", reason="ticket 42",
                                     operator="alice", dry_run=False, approval_required=False,
                                     inventory=str(growable_inventory)), trigger=Trigger.TEST)
    assert not isinstance(result, type(None)) and getattr(result, "outcome", None) is StepOutcome.OK, result
    assert the_vm(growable_inventory)[1:] == (vcpus + 1, mib + 512)
    [record] = resize_records(vm)
    details = record["details"]
    assert isinstance(details, dict)
    assert details["before"]["vcpus"] == vcpus and details["after"]["vcpus"] == vcpus + 1
    assert details["after"]["memory_mib"] == mib + 512 and details["after_persistent"]["memory_mib"] == mib + 512
    assert record["operator"] == "alice" and record["outcome"] == "ok"


def test_a_dry_run_and_a_refused_plan_change_nothing(growable_inventory: Path) -> None:
    vm, vcpus, mib = the_vm(growable_inventory)
    dry = resize_vm(ResizeRequest(vm=vm, vcpus=vcpus + 1, reason="look first", inventory=str(growable_inventory)),
                    trigger=Trigger.TEST)
    assert getattr(dry, "outcome", None) is StepOutcome.DRY_RUN and "+ vCPU" in getattr(dry, "detail", "")
    refused = resize_vm(ResizeRequest(vm=vm, vcpus=vcpus + 5, reason="too much", dry_run=False,
                                      approval_required=False, inventory=str(growable_inventory)),
                        trigger=Trigger.TEST)
    assert getattr(refused, "outcome", None) is StepOutcome.SKIPPED and "<vcpu" in getattr(refused, "detail", "")
    assert the_vm(growable_inventory)[1:] == (vcpus, mib)
    assert [r["outcome"] for r in resize_records(vm)] == ["dry-run", "skipped"]


def test_a_vm_on_a_host_in_maintenance_is_refused(growable_inventory: Path) -> None:
    vm, vcpus, mib = the_vm(growable_inventory)
    rt = open_runtime(growable_inventory)
    host = rt.hypervisor.locate(vm)[0]
    rt.states.transition(host, HostState.CORDONED, "maintenance")
    result = resize_vm(ResizeRequest(vm=vm, vcpus=vcpus + 1, reason="now", dry_run=False, approval_required=False,
                                     inventory=str(growable_inventory)), trigger=Trigger.TEST)
    assert getattr(result, "outcome", None) is StepOutcome.SKIPPED and "in maintenance" in getattr(result, "detail", "")
    assert the_vm(growable_inventory)[1:] == (vcpus, mib)


def test_the_runbook_refuses_a_bad_event_before_anything(growable_inventory: Path) -> None:
    vm, _, _ = the_vm(growable_inventory)
    with pytest.raises(InputError, match="^memory: "):
        vm_starved_runbook(vm=vm, event=MEMORY_EVENT, reason="pressure", memory="lots",
                           inventory=str(growable_inventory))
    with pytest.raises(InputError, match="gives no reason"):
        vm_starved_runbook(vm=vm, event=MEMORY_EVENT, reason=" ", inventory=str(growable_inventory))
    assert resize_records(vm) == []


def test_cli_prints_the_plan_and_a_dry_run_changes_nothing(growable_inventory: Path) -> None:
    from typer.testing import CliRunner

    from hostmaint_cli.main import app

    vm, vcpus, mib = the_vm(growable_inventory)
    runner = CliRunner()
    dry = runner.invoke(app, ["vm", "resize", vm, "--vcpus", str(vcpus + 1), "--memory", f"{mib + 256}M",
                              "--dry-run", "--inventory", str(growable_inventory)])
    assert dry.exit_code == 0, dry.output
    assert f"resize {vm}" in dry.output and f"+ vCPU {vcpus}" in dry.output and "as a DIMM" in dry.output
    assert the_vm(growable_inventory)[1:] == (vcpus, mib)
    refused = runner.invoke(app, ["vm", "resize", vm, "--vcpus", str(vcpus + 9), "--inventory",
                                  str(growable_inventory)])
    assert refused.exit_code == 1 and "REFUSED" in refused.output
    for args, words in ((["--memory", "lots"], "memory: 'lots' is not a size"),
                        (["--vcpus", "0"], "vcpus: Input should be greater than or equal to 1"),
                        ([], "vcpus, memory: give")):
        bad = runner.invoke(app, ["vm", "resize", vm, *args, "--inventory", str(growable_inventory)])
        assert bad.exit_code == 2 and words in bad.output, bad.output
    unknown = runner.invoke(app, ["vm", "resize", "nope", "--vcpus", "2", "--inventory", str(growable_inventory)])
    assert unknown.exit_code == 2 and "vm: 'nope' is not running" in unknown.output
    assert the_vm(growable_inventory)[1:] == (vcpus, mib)


def test_a_grow_its_host_cannot_hold_migrates_first(tmp_path: Path, hostmaint_db: Path) -> None:
    from flows.locks import ensure_limits
    from hostmaint.models import Cell, FleetSnapshot, Host, Limits, Vm

    def host(name: str, gib: int) -> Host:
        return Host(name=name, cluster="demo", cells=(Cell(id=0, memory_mib=gib * 1024, free_mib=gib * 1024,
                                                           cpus=tuple(range(16))),))
    vm = Vm(name="db", uuid="u-db", host="hv01", memory_mib=4096, vcpus=2, max_vcpus=4, max_memory_mib=32768,
            memory_slots=4, vnuma=(GuestCell(id=0, memory_mib=4096, vcpus=(0, 1, 2, 3)),))
    snap = FleetSnapshot(cluster="demo", taken_at="t", limits=Limits(spare_hosts=0),
                         hosts=(host("hv01", 8), host("hv02", 64)), vms=(vm,))
    inventory = write_simulated_fleet(tmp_path / "fleet", snap, demo_packages(snap), time_scale=0.001)
    ensure_limits(inventory)
    result = resize_vm(ResizeRequest(vm="db", memory="16G", reason="grow", dry_run=False, approval_required=False,
                                     inventory=str(inventory)), trigger=Trigger.TEST)
    assert getattr(result, "outcome", None) is StepOutcome.OK, result
    fleet = SimulatedFleet.load(inventory.parent / "fleet-state.json")
    assert fleet.running["hv02"] == {"db"} and fleet.running["hv01"] == set()
    assert fleet.vms["db"].memory_mib == 16384
    [record] = resize_records("db")
    assert record["details"]["migration"]["target"] == "hv02"  # type: ignore[index]
    assert [m.target for m in getattr(result, "migrations", [])] == ["hv02"]
