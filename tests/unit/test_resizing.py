"""A resize carried out through the libvirt driver on fake hosts: hot-plug live and persistent, verified
from libvirt, rolled back where it can be when a step fails (hostmaint/resizing.py,
hostmaint/drivers/libvirt/resize.py)."""

from __future__ import annotations

import libvirt
import pytest

from hostmaint.drivers.base import GuestResize
from hostmaint.drivers.libvirt import LibvirtHypervisor
from hostmaint.drivers.libvirt.resize import cpumap, dimm_xml
from hostmaint.errors import PlanError
from hostmaint.models import (
    Cell,
    FleetSnapshot,
    GuestCell,
    Host,
    Limits,
    MigrationResult,
    Placement,
    StepOutcome,
    VirtioMem,
    Vm,
)
from hostmaint.resize import plan_resize
from hostmaint.resizing import carry_out
from tests.fakes.libvirtd import FakeConnector, FakeError, FakeHost
from tests.fakes.resizable import ResizableDomain, add_resizable, growable_xml

URIS = {"hv01": "qemu+tcp://10.213.7.11/system", "hv02": "qemu+tcp://10.213.7.12/system"}
VIRTIO = ("<memory model='virtio-mem'><target><size unit='MiB'>4096</size><node>0</node>"
          "<block unit='KiB'>2048</block><requested unit='MiB'>1024</requested></target></memory>")


def snapshot(vm: Vm, hv01_free: int = 12000) -> FleetSnapshot:
    def host(name: str, free: int) -> Host:
        return Host(name=name, cluster="c", cells=(Cell(id=0, memory_mib=16384, free_mib=free, cpus=(0, 1, 2, 3)),
                                                   Cell(id=1, memory_mib=16384, free_mib=free, cpus=(4, 5, 6, 7))))
    return FleetSnapshot(cluster="c", taken_at="t", limits=Limits(spare_hosts=0),
                         hosts=(host("hv01", hv01_free), host("hv02", 12000)), vms=(vm,))


def vm(**kw: object) -> Vm:
    fields: dict[str, object] = dict(name="db", uuid="uuid-db", host="hv01", memory_mib=2048, vcpus=2, max_vcpus=4,
                                     vnuma=(GuestCell(id=0, memory_mib=2048, vcpus=(0, 1, 2, 3)),),
                                     max_memory_mib=8192, memory_slots=4, vcpupin={0: (4,), 1: (5,)})
    fields.update(kw)
    return Vm(**fields)  # type: ignore[arg-type]


def lab(xml: str) -> tuple[LibvirtHypervisor, dict[str, FakeHost], ResizableDomain]:
    hosts = {"hv01": FakeHost("hv01"), "hv02": FakeHost("hv02")}
    dom = add_resizable(hosts["hv01"], "db", xml)
    hv = LibvirtHypervisor(URIS, connector=FakeConnector({URIS[h]: hosts[h] for h in hosts}), sleep=lambda s: None)
    return hv, hosts, dom


def test_the_driver_is_a_guest_resize() -> None:
    hv, _, _ = lab(growable_xml())
    assert isinstance(hv, GuestResize)


def test_grow_vcpus_pins_and_a_dimm_live_and_persistent() -> None:
    hv, _, dom = lab(growable_xml(pins={0: 4, 1: 5}))
    plan = plan_resize(snapshot(vm()), "db", vcpus=4, memory_mib=3072)
    out = carry_out(plan, hv)
    assert out.outcome is StepOutcome.OK, out.error
    for size in (out.after, out.after_persistent):
        assert size is not None
        assert size.vcpus == 4 and size.memory_mib == 3072 and size.dimms == ((1024, 0),)
        assert size.vcpupin == {0: (4,), 1: (5,), 2: (6,), 3: (7,)}
    assert dom.calls == ["setVcpusFlags", "pinVcpuFlags", "pinVcpuFlags", "attachDeviceFlags"]
    details = out.details()
    assert details["before"]["vcpus"] == 2 and details["after"]["vcpupin"]["3"] == [7]


def test_a_failed_dimm_rolls_the_new_vcpus_back() -> None:
    hv, _, dom = lab(growable_xml(pins={0: 4, 1: 5}))
    dom.fail["attachDeviceFlags"] = FakeError(libvirt.VIR_ERR_INTERNAL_ERROR, "unable to execute QEMU command "
                                                                             "'device_add'")
    out = carry_out(plan_resize(snapshot(vm()), "db", vcpus=4, memory_mib=3072), hv)
    assert out.outcome is StepOutcome.FAILED and "device_add" in (out.error or "")
    assert out.rolled_back == ["vCPUs back to 2"]
    assert out.left == ["the pins of offline vCPUs 2, 3 stay in the definition (they hold CPUs 6, 7)"]
    for flags in (0, libvirt.VIR_DOMAIN_XML_INACTIVE):
        assert 'current="2"' in dom.XMLDesc(flags) and 'model="dimm"' not in dom.XMLDesc(flags)


def test_verification_reads_libvirt_and_says_what_stays() -> None:
    hv, _, dom = lab(growable_xml(pins={0: 4, 1: 5}))
    real = dom.attachDeviceFlags

    def live_only(xml: str, flags: int) -> int:  # a libvirt that forgot the persistent definition
        return real(xml, flags & ~libvirt.VIR_DOMAIN_AFFECT_CONFIG)

    dom.attachDeviceFlags = live_only  # type: ignore[method-assign]
    out = carry_out(plan_resize(snapshot(vm()), "db", memory_mib=3072), hv)
    assert out.outcome is StepOutcome.FAILED
    assert "persistent: 2048 MiB, planned 3072" in (out.error or "")
    assert out.left == ["the 1024 MiB DIMM stays: unplugging memory needs the guest's cooperation"]


def test_virtio_mem_is_grown_by_its_requested_size() -> None:
    hv, _, dom = lab(growable_xml(slots=0, pins={0: 4, 1: 5}, virtio_mem=VIRTIO, memory_mib=5120))
    plan = plan_resize(snapshot(vm(max_memory_mib=None, memory_slots=0, memory_mib=5120,
                                   virtio_mem=VirtioMem(node=0, size_mib=4096, requested_mib=1024))),
                       "db", memory_mib=3072)
    out = carry_out(plan, hv)
    assert out.outcome is StepOutcome.OK, out.error
    assert out.after is not None and out.after.virtio_mem_requested_mib == 2048
    assert out.after.guest_memory_mib == 3072 and out.after.memory_mib == 5120
    assert dom.calls == ["updateDeviceFlags"]


def test_a_refused_plan_changes_nothing() -> None:
    hv, _, dom = lab(growable_xml())
    with pytest.raises(PlanError, match="refused"):
        carry_out(plan_resize(snapshot(vm()), "db", vcpus=8), hv)
    assert dom.calls == []


def test_a_vm_that_changed_since_the_plan_is_not_touched() -> None:
    hv, _, dom = lab(growable_xml(vcpus=3, pins={0: 4, 1: 5}))
    out = carry_out(plan_resize(snapshot(vm()), "db", vcpus=4), hv)
    assert out.outcome is StepOutcome.FAILED and "re-plan" in (out.error or "") and dom.calls == []


def test_migrates_first_then_grows_on_the_target() -> None:
    hv, hosts, dom = lab(growable_xml(pins={0: 0, 1: 1}))
    plan = plan_resize(snapshot(vm(vcpupin={0: (0,), 1: (1,)}), hv01_free=2500), "db", memory_mib=4096, vcpus=4)
    assert plan.migration is not None and plan.migration.target == "hv02"
    moved: list[Placement] = []

    def migrate(p: Placement) -> MigrationResult:
        moved.append(p)
        hosts["hv02"].domains["db"] = hosts["hv01"].domains.pop("db")
        return MigrationResult(vm="db", source="hv01", target="hv02", outcome=StepOutcome.OK)

    out = carry_out(plan, hv, migrate=migrate)
    assert out.outcome is StepOutcome.OK, out.error
    assert moved == [plan.migration] and out.host == "hv02"
    assert out.after is not None and out.after.vcpus == 4 and out.after.memory_mib == 4096
    assert {v: c for v, c in out.after.vcpupin.items() if v >= 2} == {v.vcpu: v.pin for v in plan.new_vcpus}
    assert out.details()["migration"]["target"] == "hv02"
    assert "attachDeviceFlags" in dom.calls


def test_a_failed_migration_leaves_the_vm_as_it_was() -> None:
    hv, _, dom = lab(growable_xml(pins={0: 0, 1: 1}))
    plan = plan_resize(snapshot(vm(vcpupin={0: (0,), 1: (1,)}), hv01_free=2500), "db", memory_mib=4096)
    out = carry_out(plan, hv, migrate=lambda p: MigrationResult(vm="db", source="hv01", target="hv02",
                                                                outcome=StepOutcome.FAILED, error="aborted"))
    assert out.outcome is StepOutcome.FAILED and "stays on hv01" in (out.error or "") and dom.calls == []


def test_device_xml_and_cpu_map() -> None:
    assert dimm_xml(1024, 1) == ("<memory model=\"dimm\"><target><size unit=\"MiB\">1024</size><node>1</node>"
                                 "</target></memory>")
    assert "<pagesize unit=\"KiB\">2048</pagesize>" in dimm_xml(1024, 0, 2048)
    assert cpumap([1, 3]) == (False, True, False, True)


def test_hot_plugged_vcpus_are_taken_offline_live_and_persistent() -> None:
    hv, _, dom = lab(growable_xml(vcpus=4, pins={0: 4, 1: 5, 2: 6, 3: 7}))
    plan = plan_resize(snapshot(vm(vcpus=4, fixed_vcpus=2, vcpupin={0: (4,), 1: (5,), 2: (6,), 3: (7,)})), "db",
                       vcpus=2)
    assert plan.removed_vcpus == (3, 2)
    out = carry_out(plan, hv)
    assert out.outcome is StepOutcome.OK, out.error
    assert out.after is not None and out.after_persistent is not None
    assert out.after.vcpus == out.after_persistent.vcpus == 2
    assert dom.calls == ["setVcpusFlags"]
