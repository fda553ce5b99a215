"""SSH and libvirt must reach one machine before a patch moves anything: the drain empties the machine
libvirt reaches, the update and reboot go to the one SSH reaches (core steps on a SIMULATED fleet)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from hostmaint import maintenance as steps
from hostmaint import patching
from hostmaint.errors import StepError
from hostmaint.models import HostState, Step, StepOutcome
from hostmaint.runtime import open_runtime


class _Reaches:
    """The sim fleet's shell, where what is sent to ``host`` runs on ``other`` (an address of another host)."""

    def __init__(self, real: Any, host: str, other: str) -> None:
        self.real, self.host, self.other = real, host, other

    def run(self, host: str, argv: Any, timeout: float = 60.0) -> Any:
        return self.real.run(self.other if host == self.host else host, argv, timeout)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def test_a_host_whose_ssh_reaches_another_machine_is_refused_before_anything_moves(sim_inventory: Path) -> None:
    rt = open_runtime(sim_inventory, fresh=True)
    rt.shell = _Reaches(rt.shell, "hv02", "hv03")
    where = {vm: rt.hypervisor.locate(vm) for vm in rt.hypervisor.running_vms("hv03")}
    run = steps.RunContext(flow="patch-host", reason="patch")
    with pytest.raises(StepError, match=r"cannot be patched, nothing changed: SSH \(hv02\.simulated\) reaches a "
                                        r"machine named 'hv03', libvirt \(sim:///hv02\) one named 'hv02'"):
        steps.precheck(rt, run, "hv02")
    assert rt.states.state("hv02") is HostState.ACTIVE and rt.states.state("hv03") is HostState.ACTIVE
    assert {vm: rt.hypervisor.locate(vm) for vm in rt.hypervisor.running_vms("hv03")} == where
    [record] = rt.audit.records(host="hv02", steps=(Step.PRECHECK,))
    assert record.outcome is StepOutcome.FAILED and rt.audit.verify().ok


def test_the_same_machine_passes_and_its_names_are_recorded(sim_inventory: Path) -> None:
    rt = open_runtime(sim_inventory, fresh=True)
    steps.precheck(rt, steps.RunContext(flow="patch-host", reason="patch"), "hv02")
    [record] = rt.audit.records(host="hv02", steps=(Step.PRECHECK,))
    assert record.outcome is StepOutcome.OK and record.details["machine"] == {"ssh": "hv02", "libvirt": "hv02"}


@pytest.mark.parametrize(("ssh", "libvirt", "same"), [
    ("hv01", "hv01.example.internal", True),  # libvirt canonicalises through DNS, uname -n need not
    ("HV01.example.internal.", "hv01", True),
    ("hv01", "hv010", False),
    ("hv01", "hv02.example.internal", False),
    ("hv01.dc1.example", "hv01.dc2.example", False),  # both with their domain: the whole names
    ("hv01.dc1.example", "HV01.dc1.example.", True),
    # names every unnamed machine has say nothing about which one answered
    ("localhost.localdomain", "localhost.localdomain", False),
    ("localhost", "localhost", False),
    ("(none)", "(none)", False),
    (".", ".", False),
])
def test_names_are_one_machine_by_their_first_label(ssh: str, libvirt: str, same: bool) -> None:
    assert patching.same_machine(ssh, libvirt) is same


class _Canonical:
    """libvirt on hv02 names itself by its resolver's canonical name (a CNAME's target); ``hostname -f``
    there says ``full`` (None: hostname -f is not there)."""

    def __init__(self, rt: Any, full: str | None) -> None:
        self.real_hv, self.real_shell, self.full = rt.hypervisor, rt.shell, full

    def discover(self, host: str) -> Any:
        found = self.real_hv.discover(host)
        return found.model_copy(update={"hostname": "server-4711.dc.example"}) if host == "hv02" else found

    def run(self, host: str, argv: Any, timeout: float = 60.0) -> Any:
        if host == "hv02" and list(argv) == ["hostname", "-f"]:
            from hostmaint.models import CommandResult
            if self.full is None:
                return CommandResult(host=host, argv=tuple(argv), exit_code=127, stderr="hostname: not found\n")
            return CommandResult(host=host, argv=tuple(argv), exit_code=0, stdout=self.full + "\n")
        return self.real_shell.run(host, argv, timeout)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real_hv, name)


@pytest.mark.parametrize(("full", "passes"), [("server-4711.dc.example", True), ("hv02.example", False), (None, False)])
def test_a_name_libvirt_took_from_the_resolver_is_checked_against_the_hosts_own_resolver(
        sim_inventory: Path, full: str | None, passes: bool) -> None:
    rt = open_runtime(sim_inventory, fresh=True)
    both = _Canonical(rt, full)
    rt.hypervisor, rt.shell = both, both
    run = steps.RunContext(flow="patch-host", reason="patch")
    if passes:
        steps.precheck(rt, run, "hv02")
    else:
        with pytest.raises(StepError, match="libvirt .* one named 'server-4711.dc.example'"):
            steps.precheck(rt, run, "hv02")
    [record] = rt.audit.records(host="hv02", steps=(Step.PRECHECK,))
    assert (record.outcome is StepOutcome.OK) is passes


def test_the_reboot_is_refused_when_ssh_reaches_another_machine_than_the_drained_one(sim_inventory: Path) -> None:
    # a run resuming a drained host skips the precheck: the inventory (or DNS) changed since the first run
    from hostmaint.drivers.memory import SimulatedFleet

    rt = open_runtime(sim_inventory, fresh=True)
    run = steps.RunContext(flow="patch-host", reason="patch")
    fleet = rt.hypervisor
    assert isinstance(fleet, SimulatedFleet)
    steps.cordon(rt, run, "hv02")
    for vm in sorted(fleet.running["hv02"]):
        fleet.running["hv02"].discard(vm)
        fleet.running["hv01"].add(vm)
    fleet.save()
    rt.states.transition("hv02", HostState.DRAINING, "draining", run.run_id)
    rt.states.transition("hv02", HostState.DRAINED, "drained", run.run_id)
    steps.confirm_empty(rt, run, "hv02", Step.REBOOT)  # the same machine: passes
    rt.shell = _Reaches(rt.shell, "hv02", "hv03")
    with pytest.raises(StepError, match=r"refused before the reboot: SSH \(hv02\.simulated\) reaches a machine "
                                        r"named 'hv03'"):
        steps.reboot(rt, run, "hv02")
    assert [name for name, h in fleet.shell.hosts.items() if h.reboots] == []  # no reboot went anywhere
    assert rt.states.state("hv02") is HostState.DRAINED  # out of service, as it was
    assert not rt.audit.records(host="hv02", steps=(Step.REBOOT_ISSUED,))


class _Unnamed:
    """hv02's libvirt and the machine its ssh.address reaches (hv03) both call themselves localhost.localdomain."""

    def __init__(self, rt: Any) -> None:
        self.real_hv, self.real_shell = rt.hypervisor, _Reaches(rt.shell, "hv02", "hv03")

    def discover(self, host: str) -> Any:
        found = self.real_hv.discover(host)
        return found.model_copy(update={"hostname": "localhost.localdomain"}) if host == "hv02" else found

    def run(self, host: str, argv: Any, timeout: float = 60.0) -> Any:
        if host == "hv02" and list(argv) in (["uname", "-n"], ["hostname", "-f"]):
            from hostmaint.models import CommandResult
            return CommandResult(host=host, argv=tuple(argv), exit_code=0, stdout="localhost.localdomain\n")
        return self.real_shell.run(host, argv, timeout)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real_hv, name)


def test_two_unnamed_machines_are_not_taken_for_one(sim_inventory: Path) -> None:
    # fresh installs are all localhost.localdomain: equal names passed, and hv03 (its VMs on it) would have
    # been updated and rebooted while hv02 was drained
    rt = open_runtime(sim_inventory, fresh=True)
    both = _Unnamed(rt)
    rt.hypervisor, rt.shell = both, both
    run = steps.RunContext(flow="patch-host", reason="patch")
    with pytest.raises(StepError, match=r"cannot be patched, nothing changed: SSH \(hv02\.simulated\) reaches a "
                                        r"machine named 'localhost\.localdomain'.*give hv02 its own hostname"):
        steps.precheck(rt, run, "hv02")
    assert rt.states.state("hv02") is HostState.ACTIVE
    [record] = rt.audit.records(host="hv02", steps=(Step.PRECHECK,))
    assert record.outcome is StepOutcome.FAILED


def _declare(rt: Any, host: str, ssh: str, libvirt: str) -> None:
    """``host`` with ``machine_names`` in the runtime's inventory, as an operator would write it."""
    from hostmaint.inventory import MachineNames

    hosts = [h.model_copy(update={"machine_names": MachineNames(ssh=ssh, libvirt=libvirt)}) if h.name == host else h
             for h in rt.inventory.hosts]
    rt.inventory = rt.inventory.model_copy(update={"hosts": hosts})


def test_names_the_inventory_declares_let_a_host_the_usual_matching_refuses_pass(sim_inventory: Path) -> None:
    # libvirt's name comes from another DNS view than the host's own resolver: no rule can match it, and
    # before machine_names such a host could never be patched
    rt = open_runtime(sim_inventory, fresh=True)
    both = _Canonical(rt, "hv02.mgmt.example")
    rt.hypervisor, rt.shell = both, both
    _declare(rt, "hv02", ssh="hv02", libvirt="SERVER-4711.dc.example.")
    steps.precheck(rt, steps.RunContext(flow="patch-host", reason="patch"), "hv02")
    [record] = rt.audit.records(host="hv02", steps=(Step.PRECHECK,))
    assert record.outcome is StepOutcome.OK
    assert record.details["machine"]["declared"] == {"ssh": "hv02", "libvirt": "SERVER-4711.dc.example."}


def test_declared_names_still_refuse_an_address_that_reaches_another_machine(sim_inventory: Path) -> None:
    rt = open_runtime(sim_inventory, fresh=True)
    rt.shell = _Reaches(rt.shell, "hv02", "hv03")
    _declare(rt, "hv02", ssh="hv02", libvirt="hv02")
    with pytest.raises(StepError, match=r"SSH \(hv02\.simulated\) reaches a machine named 'hv03', the "
                                        r"inventory's machine_names\.ssh is 'hv02'") as caught:
        steps.precheck(rt, steps.RunContext(flow="patch-host", reason="patch"), "hv02")
    assert "libvirt (" not in str(caught.value)  # libvirt's name was the declared one
    assert rt.states.state("hv02") is HostState.ACTIVE


@pytest.mark.parametrize("names", [{"ssh": "localhost.localdomain", "libvirt": "hv02"},
                                   {"ssh": "hv02", "libvirt": "hv02 hv03"}, {"ssh": "hv02", "libvirt": ""},
                                   {"ssh": "hv02\n", "libvirt": "hv02"}, {"ssh": "hv02"}])
def test_machine_names_that_cannot_name_one_machine_are_refused_naming_the_field(names: dict[str, str]) -> None:
    from pydantic import ValidationError

    from hostmaint.inventory import MachineNames

    with pytest.raises(ValidationError) as caught:
        MachineNames.model_validate(names)
    assert {str(e["loc"][0]) for e in caught.value.errors()} <= {"ssh", "libvirt"}
