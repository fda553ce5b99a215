"""Live resize on real libvirt/QEMU (issue 21): lab guests defined with room to grow are grown while
they run, and libvirt (virsh, not our parser) shows what they got; a grow that does not fit its host
migrates first; a grow past what a guest was defined with is refused and nothing changes.

hv01 is small (512 MiB, a SeaBIOS and a Linux guest): its SeaBIOS guest cannot grow there. SeaBIOS
guests need nothing of the guest for hot-plug; the Linux guest (TCG) says on its console what it sees
of its CPUs and memory (it leaves what was plugged offline, shared/lab-notes.md: present, not online).
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator

import pytest

from hostmaint.drivers.libvirt import LibvirtHypervisor
from hostmaint.fleet import discover_cluster
from hostmaint.inventory import load_inventory
from hostmaint.lab import LabInfo, lab_down, lab_up
from hostmaint.models import MigrationOptions, MigrationResult, Placement, StepOutcome
from hostmaint.resize import plan_resize
from hostmaint.resizing import carry_out
from tests.lab.labkit import WORKDIR, lab_skip_reason, leftovers, wait_for_no_foreign_lab

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def lab() -> Iterator[LabInfo]:
    reason = lab_skip_reason()
    if reason:
        pytest.skip(reason)
    wait_for_no_foreign_lab()
    lab_down(WORKDIR)
    info = lab_up(hosts=3, vms=2, workdir=WORKDIR, linux_guests=1, host_memory_mib=(512, 1024, 1024),
                  room_to_grow=True)
    try:
        yield info
    finally:
        lab_down(WORKDIR)
        assert not leftovers(WORKDIR)


@pytest.fixture(scope="module")
def hv(lab: LabInfo) -> Iterator[LibvirtHypervisor]:
    driver = LibvirtHypervisor.from_inventory(load_inventory(lab.inventory_path), "lab")
    yield driver
    driver.close()


def virsh(lab: LabInfo, host: str, *args: str) -> str:
    return subprocess.run(["virsh", "-q", "-c", lab.host(host).libvirt_uri, *args], check=True,
                          capture_output=True, text=True, timeout=60).stdout


def test_a_pinned_running_guest_grows_its_vcpus_pinned_in_its_cell_and_a_dimm(lab: LabInfo,
                                                                              hv: LibvirtHypervisor) -> None:
    virsh(lab, "hv02", "vcpupin", "vm02", "0", "0", "--live", "--config")
    snap = discover_cluster(load_inventory(lab.inventory_path), "lab", hv)
    plan = plan_resize(snap, "vm02", vcpus=2, memory_mib=128)
    assert plan.feasible and plan.migration is None, plan.refusals
    cell = snap.host("hv02").cells[0]
    assert plan.new_vcpus[0].pin and set(plan.new_vcpus[0].pin) <= set(cell.cpus) - {0}
    out = carry_out(plan, hv)
    assert out.outcome is StepOutcome.OK, out.error
    # what libvirt says, read with virsh
    assert "CPU(s):         2" in virsh(lab, "hv02", "dominfo", "vm02")
    pins = virsh(lab, "hv02", "vcpupin", "vm02", "--live")
    assert any(line.split()[:2] == ["1", str(plan.new_vcpus[0].pin[0])] for line in pins.splitlines()), pins
    for flags in ((), ("--inactive",)):
        xml = virsh(lab, "hv02", "dumpxml", "vm02", *flags)
        assert "current='2'" in xml and "<memory model='dimm'" in xml and "<node>0</node>" in xml
        assert "<memory unit='KiB'>131072</memory>" in xml
    # and QEMU itself: the running machine has the vCPU and the DIMM (64 MiB on guest node 0)
    cpus = virsh(lab, "hv02", "qemu-monitor-command", "vm02", "--hmp", "info cpus")
    assert len([line for line in cpus.splitlines() if "CPU #" in line]) == 2, cpus
    dimms = virsh(lab, "hv02", "qemu-monitor-command", "vm02", "--hmp", "info memory-devices")
    assert "dimm" in dimms and "size: 67108864" in dimms and "node: 0" in dimms, dimms


def test_a_grow_its_host_cannot_hold_migrates_first(lab: LabInfo, hv: LibvirtHypervisor) -> None:
    snap = discover_cluster(load_inventory(lab.inventory_path), "lab", hv)
    plan = plan_resize(snap, "vm01", memory_mib=256, vcpus=2)
    assert plan.feasible, plan.refusals
    assert plan.migration is not None and plan.migration.source == "hv01"
    target = plan.migration.target

    def migrate(p: Placement) -> MigrationResult:
        return hv.migrate(p.vm, p.source, p.target, MigrationOptions(placement=p))

    out = carry_out(plan, hv, migrate=migrate)
    assert out.outcome is StepOutcome.OK, out.error
    assert hv.locate("vm01") == (target,)
    assert "CPU(s):         2" in virsh(lab, target, "dominfo", "vm01")
    assert "<memory unit='KiB'>262144</memory>" in virsh(lab, target, "dumpxml", "vm01", "--inactive")


def test_a_grow_past_its_definition_is_refused_and_nothing_changes(lab: LabInfo, hv: LibvirtHypervisor) -> None:
    before = {flags: virsh(lab, "hv02", "dumpxml", "vm02", *flags) for flags in ((), ("--inactive",))}
    snap = discover_cluster(load_inventory(lab.inventory_path), "lab", hv)
    plan = plan_resize(snap, "vm02", vcpus=9, memory_mib=4096)
    assert not plan.feasible and not plan.changes
    assert "<vcpu current='2'>9</vcpu>" in plan.refusals[0] and "maxMemory" in plan.refusals[1]
    with pytest.raises(Exception, match="refused"):
        carry_out(plan, hv)
    assert {flags: virsh(lab, "hv02", "dumpxml", "vm02", *flags) for flags in ((), ("--inactive",))} == before


def console_says(lab: LabInfo, guest: str, text: str, timeout: float = 300.0) -> str:
    log = lab.workdir / "guests" / f"{guest}.console"
    deadline = time.monotonic() + timeout
    while True:
        said = log.read_text(errors="replace") if log.exists() else ""
        if text in said:
            return said
        assert time.monotonic() < deadline, f"{guest}'s console never said {text!r}:\n{said[-2000:]}"
        time.sleep(2)


def test_the_linux_guest_sees_its_new_vcpu_and_memory_from_inside(lab: LabInfo, hv: LibvirtHypervisor) -> None:
    # 256 MiB are two 128 MiB memory blocks; a DIMM of one block more (Linux adds memory by whole blocks)
    console_says(lab, "lnx01", "hostmaint-lab guest: cpus present 0, memory blocks 2")
    snap = discover_cluster(load_inventory(lab.inventory_path), "lab", hv)
    plan = plan_resize(snap, "lnx01", vcpus=2, memory_mib=384)
    assert plan.feasible, plan.refusals
    out = carry_out(plan, hv, migrate=lambda p: hv.migrate(p.vm, p.source, p.target, MigrationOptions(placement=p)))
    assert out.outcome is StepOutcome.OK, out.error
    console_says(lab, "lnx01", "hostmaint-lab guest: cpus present 0-1, memory blocks 3")
